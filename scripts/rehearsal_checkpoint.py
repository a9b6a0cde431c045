"""A random-weights Hugging Face checkpoint with Command R7B's exact configuration, for the rehearsal.

The tokenizer is the real one (tests/realvocab.py rebuilds it from llama.cpp's Command-R
vocabulary). Weights are bf16 in shards of at most 5 GB, named and indexed like the published
checkpoint, and written tensor by tensor from one fixed random block read at shifting offsets:
generating 8 billion normal samples would take longer than everything the rehearsal measures,
and the block keeps the generator's memory at a few hundred MiB whatever the model's size.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import realvocab  # noqa: E402

from r7b.cohere2 import Cohere2Dims  # noqa: E402

FULL = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
            head_dim=128, num_hidden_layers=32, sliding_window=4096, max_position_embeddings=131072,
            logit_scale=0.25, sliding_window_pattern=4, use_embedding_sharing=True, tie_word_embeddings=True)
SMALL = dict(FULL, hidden_size=256, intermediate_size=768, num_attention_heads=4, num_key_value_heads=2,
             head_dim=64, num_hidden_layers=4, sliding_window=256, max_position_embeddings=8192)
SHARD_BYTES = 5 * 10**9
BLOCK = 1 << 26  # 64 Mi random bf16 words (128 MiB), reused at shifting offsets
ONE_BF16 = 0x3F80


def config(small: bool) -> dict:
    """config.json of the rehearsal model: realvocab's stand-in config with R7B's (or small) sizes."""
    cfg = realvocab.model_config()
    cfg.update(SMALL if small else FULL)
    return cfg


def shard_plan(shapes: dict[str, tuple[int, ...]]) -> list[list[str]]:
    """Tensor names per shard, in order, each shard at most SHARD_BYTES (one tensor may exceed it alone)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = 2 * int(np.prod(shape))
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def random_block(seed: int = 0) -> np.ndarray:
    """BLOCK bf16 words of N(0, 0.02), the scale of Cohere2's initializer."""
    rng = np.random.default_rng(seed)
    out = np.empty(BLOCK, dtype=np.uint16)
    step = 1 << 22
    for i in range(0, BLOCK, step):
        out[i:i + step] = realvocab._bf16(rng.standard_normal(step, dtype=np.float32) * 0.02)
    return out


def _write_tensor(fh, shape: tuple[int, ...], block: np.ndarray, start: int) -> None:
    count = int(np.prod(shape))
    if len(shape) == 1:
        fh.write(np.full(count, ONE_BF16, dtype=np.uint16).tobytes())
        return
    pos = start % BLOCK
    while count:
        n = min(count, BLOCK - pos, 1 << 24)
        fh.write(block[pos:pos + n].data)
        count -= n
        pos = (pos + n) % BLOCK


def write_shard(path: Path, names: list[str], shapes: dict, block: np.ndarray, salt: int) -> None:
    with open(path, "wb") as fh:
        fh.write(realvocab.safetensors_head({name: shapes[name] for name in names}))
        for i, name in enumerate(names):
            _write_tensor(fh, shapes[name], block, start=(salt + i) * 7_919_933)


def write_checkpoint(target: Path, small: bool = False) -> Path:
    """The checkpoint folder at `target` (built beside it and renamed, so a half-written one never counts)."""
    cfg = config(small)
    shapes = Cohere2Dims.from_hf_config(cfg).hf_weights()
    tok_path = realvocab.tokenizer_json()
    tok = json.loads(tok_path.read_bytes())
    if target.exists():
        shutil.rmtree(target)
    with realvocab._staged_dir(target) as tmp:
        shutil.copyfile(tok_path, tmp / "tokenizer.json")
        (tmp / "config.json").write_bytes(realvocab._dump(cfg))
        (tmp / "tokenizer_config.json").write_bytes(realvocab._dump(realvocab.tokenizer_config(tok)))
        (tmp / "generation_config.json").write_bytes(realvocab._dump(
            {"bos_token_id": realvocab.BOS_ID, "eos_token_id": realvocab.EOS_ID, "pad_token_id": realvocab.PAD_ID}))
        shards = shard_plan(shapes)
        block = random_block()
        weight_map = {}
        for i, names in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            write_shard(tmp / fname, names, shapes, block, salt=i * 1000)
            weight_map.update({n: fname for n in names})
        total = sum(2 * int(np.prod(s)) for s in shapes.values())
        (tmp / "model.safetensors.index.json").write_bytes(realvocab._dump(
            {"metadata": {"total_size": total}, "weight_map": weight_map}))
    return target


def checkpoint_bytes(small: bool = False) -> int:
    shapes = Cohere2Dims.from_hf_config(config(small)).hf_weights()
    return sum(2 * int(np.prod(s)) for s in shapes.values())


if __name__ == "__main__":
    out = write_checkpoint(Path(sys.argv[1]), small="--small" in sys.argv[2:])
    print(out)

"""Write a Cohere2 checkpoint with random weights, big enough that decoding is memory-bound.

The stand-in (5 M parameters) fits in cache, so it measures per-token overhead, not what a
real model costs. This one has the real architecture at about half a billion parameters: the
same code paths, and weights that stream from RAM on every token. The tokenizer files are the
stand-in's; the converter pads the vocabulary to `vocab_size` with unused tokens.

Tensors are generated and written one at a time (bf16 safetensors), so memory stays near the
largest tensor however many layers are asked for.

    python scripts/synthetic_model.py build/synthetic/r7b-synth-16l --layers 16
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
from pathlib import Path
from typing import Iterator

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
STAND_IN = ROOT / "tests" / "fixtures" / "tiny-r7b"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
INIT_STD = 0.02
CHUNK_VALUES = 1 << 22  # generated per write; bounds memory


def config(layers: int = 16, hidden: int = 1536, ffn: int = 4096, heads: int = 12, kv_heads: int = 4,
           vocab: int = 32000, window: int = 4096, context: int = 131072) -> dict:
    """The stand-in's config.json with the sizes replaced."""
    cfg = json.loads((STAND_IN / "config.json").read_text())
    cfg.update(num_hidden_layers=layers, hidden_size=hidden, intermediate_size=ffn, num_attention_heads=heads,
               num_key_value_heads=kv_heads, head_dim=hidden // heads, vocab_size=vocab, sliding_window=window,
               max_position_embeddings=context)
    return cfg


def tensor_shapes(cfg: dict) -> Iterator[tuple[str, tuple[int, ...]]]:
    """HF names and (rows, cols) shapes, as transformers stores a tied-embedding Cohere2."""
    h, ff = cfg["hidden_size"], cfg["intermediate_size"]
    q = cfg["num_attention_heads"] * cfg["head_dim"]
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    yield "model.embed_tokens.weight", (cfg["vocab_size"], h)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (h,)
        yield p + "self_attn.q_proj.weight", (q, h)
        yield p + "self_attn.k_proj.weight", (kv, h)
        yield p + "self_attn.v_proj.weight", (kv, h)
        yield p + "self_attn.o_proj.weight", (h, q)
        yield p + "mlp.gate_proj.weight", (ff, h)
        yield p + "mlp.up_proj.weight", (ff, h)
        yield p + "mlp.down_proj.weight", (h, ff)
    yield "model.norm.weight", (h,)


def n_params(cfg: dict) -> int:
    return sum(int(np.prod(shape)) for _, shape in tensor_shapes(cfg))


def to_bf16(values: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits, rounded to nearest even."""
    bits = values.astype(np.float32, copy=False).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def random_tensor(rng: np.random.Generator, shape: tuple[int, ...]) -> Iterator[bytes]:
    """bf16 bytes in row chunks: norm weights are ones (as initialized), matrices N(0, INIT_STD)."""
    if len(shape) == 1:
        yield np.full(shape, 0x3F80, dtype=np.uint16).tobytes()  # 1.0 in bf16
        return
    rows, cols = shape
    step = max(1, CHUNK_VALUES // cols)
    for start in range(0, rows, step):
        values = rng.standard_normal((min(step, rows - start), cols), dtype=np.float32)
        values *= INIT_STD
        yield to_bf16(values).tobytes()


def safetensors_header(shapes: list[tuple[str, tuple[int, ...]]]) -> bytes:
    """The JSON header (8-byte aligned, length-prefixed) for bf16 tensors in this order."""
    entries: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes:
        size = 2 * int(np.prod(shape))
        entries[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write_snapshot(out: Path, cfg: dict, seed: int = 0) -> Path:
    """Write config, tokenizer files and model.safetensors into `out` (replaced atomically)."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shapes = list(tensor_shapes(cfg))
    rng = np.random.default_rng(seed)
    with open(tmp / "model.safetensors", "wb") as fh:
        fh.write(safetensors_header(shapes))
        for name, shape in shapes:
            for chunk in random_tensor(rng, shape):
                fh.write(chunk)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    for name in TOKENIZER_FILES:
        shutil.copy2(STAND_IN / name, tmp / name)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="snapshot folder to write (replaced if present)")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--ffn", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--window", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    cfg = config(args.layers, args.hidden, args.ffn, args.heads, args.kv_heads, args.vocab, args.window)
    write_snapshot(args.out, cfg, args.seed)
    print(f"{args.out}: {n_params(cfg) / 1e9:.3f}B parameters")


if __name__ == "__main__":
    main()

"""Read a Hugging Face Cohere2 checkpoint: its architecture and its tensors, one at a time.

Safetensors files are memory-mapped and parsed here (8-byte header length, JSON header, raw data)
rather than loaded, so converting a 16 GB model needs about one tensor's worth of RAM. bf16 is
read as raw 16-bit words, since numpy has no bfloat16.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from r7b.errors import R7BError

SAFETENSORS_DTYPES = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32}
MAX_HEADER_BYTES = 100 * 1024 * 1024
SLIDING_PATTERN = 4  # llama.cpp fixes Cohere2 at three sliding-window layers, then one global


@dataclass(frozen=True)
class Cohere2Arch:
    """The hyperparameters llama.cpp needs, normalized across old and new config styles."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    layer_norm_eps: float
    logit_scale: float
    rope_theta: float
    sliding_window: int
    context_length: int
    tied_embeddings: bool
    rope_dim: int


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise R7BError(f"missing file: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise R7BError(f"invalid JSON in {path}: {exc}") from None


def _rope_theta(cfg: dict) -> float:
    params = cfg.get("rope_parameters") or {}
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    scaling = cfg.get("rope_scaling") or {}
    rope_type = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if rope_type not in (None, "default"):
        raise R7BError(f"unsupported RoPE scaling {rope_type!r}: llama.cpp runs Cohere2 with plain RoPE")
    return float(theta)


def _check_layer_pattern(cfg: dict, num_layers: int) -> None:
    """Refuse checkpoints whose sliding/global layout differs from the one llama.cpp hard-codes."""
    expected = ["sliding_attention" if (i + 1) % SLIDING_PATTERN else "full_attention" for i in range(num_layers)]
    layer_types = cfg.get("layer_types")
    if layer_types is not None and list(layer_types) != expected:
        raise R7BError("layer_types must repeat 3 sliding-window layers then 1 global layer, as llama.cpp expects")
    pattern = cfg.get("sliding_window_pattern", SLIDING_PATTERN)
    if layer_types is None and pattern != SLIDING_PATTERN:
        raise R7BError(f"sliding_window_pattern {pattern} is not supported (llama.cpp expects {SLIDING_PATTERN})")


def _require(cfg: dict, key: str):
    if key not in cfg:
        raise R7BError(f"config.json lacks {key!r}")
    return cfg[key]


def read_arch(folder: Path) -> Cohere2Arch:
    """Read config.json; accepts both the published R7B keys and transformers 5's layer_types/rope_parameters."""
    cfg = _read_json(folder / "config.json")
    if not isinstance(cfg, dict):
        raise R7BError(f"{folder / 'config.json'} is not a JSON object")
    model_type = cfg.get("model_type")
    if model_type != "cohere2":
        raise R7BError(f"not a Command R7B (Cohere2) checkpoint: model_type is {model_type!r}, expected 'cohere2'")
    hidden, heads = int(_require(cfg, "hidden_size")), int(_require(cfg, "num_attention_heads"))
    if hidden % heads:
        raise R7BError(f"hidden_size {hidden} is not divisible by num_attention_heads {heads}")
    head_dim = hidden // heads
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    if heads % kv_heads:
        raise R7BError(f"num_attention_heads {heads} is not divisible by num_key_value_heads {kv_heads}")
    layers = int(_require(cfg, "num_hidden_layers"))
    _check_layer_pattern(cfg, layers)
    rotary = float(cfg.get("rotary_pct", (cfg.get("rope_parameters") or {}).get("partial_rotary_factor", 1.0)))
    window = cfg.get("sliding_window")
    if not window or int(window) < 1:
        raise R7BError("config.json needs a positive sliding_window for Cohere2")
    return Cohere2Arch(
        vocab_size=int(_require(cfg, "vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(_require(cfg, "intermediate_size")),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-5)),
        logit_scale=float(cfg.get("logit_scale", 1.0)),
        rope_theta=_rope_theta(cfg),
        sliding_window=int(window),
        context_length=int(cfg.get("max_position_embeddings", 8192)),
        tied_embeddings=bool(cfg.get("use_embedding_sharing", cfg.get("tie_word_embeddings", True))),
        rope_dim=int(rotary * head_dim),
    )


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor lives: file, dtype, shape and byte range."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def _header(path: Path) -> tuple[dict, int]:
    try:
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise R7BError(f"not a safetensors file (too short): {path}")
            (size,) = struct.unpack("<Q", raw)
            if size > MAX_HEADER_BYTES:
                raise R7BError(f"not a safetensors file (header of {size} bytes): {path}")
            header = json.loads(fh.read(size))
    except FileNotFoundError:
        raise R7BError(f"missing file: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise R7BError(f"not a safetensors file (bad header): {path}") from None
    return header, 8 + size


def _refs_in_file(path: Path) -> Iterator[TensorRef]:
    header, base = _header(path)
    size = path.stat().st_size
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, (start, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        if dtype not in SAFETENSORS_DTYPES:
            raise R7BError(f"tensor {name} has dtype {dtype}; only BF16, F16 and F32 checkpoints are supported")
        itemsize = np.dtype(SAFETENSORS_DTYPES[dtype]).itemsize
        if end - start != itemsize * int(np.prod(shape)) or base + end > size:
            raise R7BError(f"tensor {name} in {path.name} has inconsistent size or lies past the end of the file")
        yield TensorRef(name, path, dtype, shape, base + start, base + end)


def safetensors_files(folder: Path) -> list[Path]:
    """The shard list from model.safetensors.index.json, or the single model.safetensors."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise R7BError(f"{index} has no weight_map")
        return [folder / name for name in dict.fromkeys(weight_map.values())]
    single = folder / "model.safetensors"
    if not single.exists():
        raise R7BError(f"no model.safetensors or model.safetensors.index.json in {folder}")
    return [single]


def tensor_refs(folder: Path) -> dict[str, TensorRef]:
    """Every tensor in the checkpoint by name, without reading any data."""
    refs: dict[str, TensorRef] = {}
    for path in safetensors_files(folder):
        for ref in _refs_in_file(path):
            if ref.name in refs:
                raise R7BError(f"tensor {ref.name} appears in more than one shard")
            refs[ref.name] = ref
    return refs


def read_tensor(ref: TensorRef) -> np.ndarray:
    """Memory-map one tensor; bf16 comes back as uint16 words."""
    count = ref.nbytes // np.dtype(SAFETENSORS_DTYPES[ref.dtype]).itemsize
    data = np.memmap(ref.file, dtype=SAFETENSORS_DTYPES[ref.dtype], mode="r", offset=ref.start, shape=(count,))
    return data.reshape(ref.shape)


def bf16_to_f32(words: np.ndarray) -> np.ndarray:
    return (words.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(values: np.ndarray) -> np.ndarray:
    """Round to nearest even, as torch does."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)
    return (rounded >> 16).astype(np.uint16)

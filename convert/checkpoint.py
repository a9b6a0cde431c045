"""Read a Hugging Face Cohere2 checkpoint: its architecture and its tensors, one at a time.

Safetensors files are parsed here (8-byte header length, JSON header, raw data) and read in
blocks of rows with plain file reads rather than memory-mapped: mapped pages stay in the
process's resident set until the mapping goes, so a 2 GB embedding would cost 2 GB of RSS, while
a block costs a few dozen MiB whatever the model's size. bf16 is read as raw 16-bit words, since
numpy has no bfloat16.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from r7b.cohere2 import Cohere2Dims
from r7b.errors import R7BError

SAFETENSORS_DTYPES = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32}
MAX_HEADER_BYTES = 100 * 1024 * 1024


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise R7BError(f"missing file: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise R7BError(f"invalid JSON in {path}: {exc}") from None


def read_dims(folder: Path) -> Cohere2Dims:
    """The model's sizes from config.json (see `Cohere2Dims.from_hf_config` for the accepted keys)."""
    cfg = _read_json(folder / "config.json")
    if not isinstance(cfg, dict):
        raise R7BError(f"{folder / 'config.json'} is not a JSON object")
    return Cohere2Dims.from_hf_config(cfg)


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


BLOCK_BYTES = 32 * 1024 * 1024  # source bytes read at a time


def read_tensor(ref: TensorRef) -> np.ndarray:
    """One whole tensor in memory; bf16 comes back as uint16 words. For small tensors and tests."""
    return np.concatenate(list(read_blocks(ref))).reshape(ref.shape)


def read_blocks(ref: TensorRef, block_bytes: int | None = None) -> Iterator[np.ndarray]:
    """The tensor's elements in order, flat, in pieces of whole rows of about `block_bytes` each."""
    block_bytes = block_bytes or BLOCK_BYTES
    dtype = np.dtype(SAFETENSORS_DTYPES[ref.dtype])
    row = int(ref.shape[-1]) if ref.shape else 1
    step = max(1, block_bytes // (row * dtype.itemsize)) * row
    total = ref.nbytes // dtype.itemsize
    with open(ref.file, "rb") as fh:
        fh.seek(ref.start)
        done = 0
        while done < total:
            n = min(step, total - done)
            data = np.fromfile(fh, dtype=dtype, count=n)
            if data.size != n:
                raise R7BError(f"{ref.file.name} ends inside tensor {ref.name}")
            yield data
            done += n


def bf16_to_f32(words: np.ndarray) -> np.ndarray:
    return (words.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(values: np.ndarray) -> np.ndarray:
    """Round to nearest even, as torch does."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)
    return (rounded >> 16).astype(np.uint16)

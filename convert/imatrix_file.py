"""Importance-matrix files: llama.cpp's GGUF imatrix layout and its legacy `.dat` format.

GGUF files carry `general.type = imatrix`, tensors `<weight>.in_sum2` and `<weight>.counts`, and
`imatrix.datasets`, `imatrix.chunk_count`, `imatrix.chunk_size`, so they work with llama-quantize
and vice versa. A path ending in `.dat` selects the legacy binary format.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from r7b.errors import R7BError
from r7b.gguf_reader import MAX_NAME_BYTES, GGUFFile, TensorRecord, read_gguf


@dataclass
class Imatrix:
    """Per-weight sums of squared input activations, as llama.cpp stores them."""

    sums: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (n_mat, n_cols) float64
    counts: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (n_mat,) rows seen
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0

    def means(self) -> dict[str, np.ndarray]:
        """Mean squared activation per column, flattened: what the quantizer receives."""
        out = {}
        for name, sums in self.sums.items():
            counts = self.counts[name].reshape(-1, 1).astype(np.float64)
            mean = np.where(counts > 0, sums / np.maximum(counts, 1), 1.0)
            out[name] = mean.astype(np.float32).ravel()
        return out


# -- reading ------------------------------------------------------------------------------------

def read_imatrix(path: str | Path) -> Imatrix:
    """Read a GGUF or legacy `.dat` imatrix; a damaged file is an R7BError."""
    p = Path(path)
    if not p.is_file():
        raise R7BError(f"imatrix file not found: {p}")
    with open(p, "rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        try:
            return _read_legacy(p)
        except (ValueError, UnicodeDecodeError, struct.error):
            raise R7BError(f"{p} is not an imatrix file (neither GGUF nor the legacy .dat format)") from None
    gf = read_gguf(p)
    try:
        return _read_gguf(gf)
    except (ValueError, KeyError, IndexError) as exc:
        raise R7BError(f"{p} is not a valid GGUF imatrix ({exc})") from None


def load_imatrix(path: str | Path) -> dict[str, np.ndarray]:
    """Weight name -> per-column mean squared activation (float32), from either file format."""
    return read_imatrix(path).means()


def _read_gguf(gf: GGUFFile) -> Imatrix:
    kind = gf.get_field("general.type")
    if kind is not None and kind != "imatrix":
        raise ValueError(f"general.type is {kind!r}, not 'imatrix'")
    datasets = gf.get_field("imatrix.datasets") or []
    imx = Imatrix(datasets=list(datasets) if isinstance(datasets, list) else [],
                  chunk_count=int(gf.get_field("imatrix.chunk_count") or 0),
                  chunk_size=int(gf.get_field("imatrix.chunk_size") or 0))
    for t in gf.tensors:
        if not t.name.endswith(".in_sum2"):
            continue
        base = t.name.removesuffix(".in_sum2")
        counts = gf.by_name.get(f"{base}.counts")
        if counts is None:
            raise ValueError(f"{base} has sums but no counts")
        n_mat = math.prod(counts.shape)
        imx.sums[base] = _f32(gf, t).astype(np.float64).reshape(n_mat, -1)
        imx.counts[base] = _f32(gf, counts).astype(np.float64).reshape(n_mat)
    if not imx.sums:
        raise ValueError("no .in_sum2 tensors")
    return imx


def _f32(gf: GGUFFile, t: TensorRecord) -> np.ndarray:
    if t.type != gguf.GGMLQuantizationType.F32:
        raise ValueError(f"{t.name} is {t.type.name}, expected F32")
    return np.fromfile(gf.path, dtype="<f4", count=t.nbytes // 4, offset=gf.data_offset + t.offset)


def _read_legacy(path: Path) -> Imatrix:
    """llama.cpp's original format: entries of (name, ncall, values = mean * ncall)."""
    data = path.read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        out = struct.unpack_from(fmt, data, pos)
        pos += struct.calcsize(fmt)
        return out

    (n_entries,) = take("<i")
    if n_entries < 1:
        raise ValueError("no entries")
    imx = Imatrix()
    for _ in range(n_entries):
        (n,) = take("<i")
        if not 0 < n <= MAX_NAME_BYTES + 1:
            raise ValueError("bad name length")
        name = data[pos:pos + n].decode("utf-8")
        pos += n
        ncall, nval = take("<ii")
        if nval < 1 or pos + 4 * nval > len(data):
            raise ValueError(f"bad entry {name!r}")
        values = np.frombuffer(data, dtype="<f4", count=nval, offset=pos).astype(np.float64)
        pos += 4 * nval
        imx.sums[name] = values.reshape(1, -1)
        imx.counts[name] = np.array([float(max(ncall, 0))]) if ncall > 0 else np.array([1.0])
    if pos + 4 <= len(data):
        (imx.chunk_count,) = take("<i")
    if pos + 4 <= len(data):
        (n,) = take("<i")
        if 0 < n <= len(data) - pos:
            imx.datasets = [data[pos:pos + n].decode("utf-8", "replace")]
    return imx


# -- writing ------------------------------------------------------------------------------------

def write_imatrix(imx: Imatrix, path: str | Path) -> None:
    """Write `imx` in GGUF, or in the legacy format when the path ends in `.dat`."""
    if str(path).endswith(".dat"):
        _write_legacy(imx, Path(path))
        return
    writer = gguf.GGUFWriter(path, arch="imatrix")
    writer.kv_data[0].pop("general.architecture", None)  # llama-imatrix files carry none
    writer.add_type("imatrix")
    writer.add_array("imatrix.datasets", imx.datasets)
    writer.add_uint32("imatrix.chunk_count", imx.chunk_count)
    writer.add_uint32("imatrix.chunk_size", imx.chunk_size)
    for name in sorted(imx.sums):
        sums = imx.sums[name]
        writer.add_tensor(f"{name}.in_sum2", sums.astype(np.float32))
        writer.add_tensor(f"{name}.counts", imx.counts[name].astype(np.float32).reshape(-1, 1))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _write_legacy(imx: Imatrix, path: Path) -> None:
    chunk = max(imx.chunk_size, 1)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<i", len(imx.sums)))
        means = imx.means()
        for name in sorted(imx.sums):
            ncall = max(1, -(-int(imx.counts[name].max()) // chunk))
            values = means[name] * ncall
            raw = name.encode("utf-8")
            fh.write(struct.pack("<i", len(raw)) + raw + struct.pack("<ii", ncall, values.size))
            fh.write(values.astype("<f4").tobytes())
        fh.write(struct.pack("<i", imx.chunk_count))
        dataset = (imx.datasets[-1] if imx.datasets else "").encode("utf-8")
        fh.write(struct.pack("<i", len(dataset)) + dataset)

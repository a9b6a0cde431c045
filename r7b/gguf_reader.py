"""The project's GGUF reader: header, metadata and tensor records, read in pure Python with bounds checks.

llama.cpp's C++ GGUF parser has had out-of-bounds reads on malformed files, so the project reads
every GGUF here first: through bounds-checked helpers that size every loop and allocation against
the bytes actually left in the file, turning the first problem into a one-line `GGUFError`. The
public API follows gguf-py's `GGUFReader` in spirit: `read_gguf(path)` gives a `GGUFFile` with
`get_field(key)` and `get_tensor(name)`. Model rules (what a cohere2 file must hold) live in
`gguf_validate.py`.

Layout rules follow ggml's gguf.cpp (tensors packed in file order, names under 64 bytes, 1-4 dims).
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Mapping

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from r7b.errors import R7BError

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
HEADER_BYTES = 24  # magic, version, tensor count, KV count
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME_BYTES = 63  # GGML_MAX_NAME is 64 including the NUL
# Caps far above any real model (Command R7B: ~40 keys, 258 tensors, 256000 tokens) that keep a
# hostile file from turning a few bytes per entry into hundreds of bytes of Python objects.
MAX_KV = 1 << 16
MAX_TENSORS = 1 << 16
MAX_ARRAY = 1 << 24
MAX_VOCAB = 1 << 22
DECODE_LIMIT = 1024  # longer arrays appear in the summary as their length only
SCAN_CHUNK = 1 << 24
TOKENS_KEY = "tokenizer.ggml.tokens"

# Smallest encodings, used to bound counts before looping over them.
MIN_KV_BYTES = 8 + 1 + 4 + 1  # key length, 1-byte key, value type, 1-byte value
MIN_TENSOR_INFO_BYTES = 8 + 1 + 4 + 8 + 4 + 8  # name length, 1-byte name, n_dims, one dim, type, offset

_V = GGUFValueType
_SCALARS: dict[GGUFValueType, struct.Struct] = {
    _V.UINT8: struct.Struct("<B"), _V.INT8: struct.Struct("<b"), _V.UINT16: struct.Struct("<H"),
    _V.INT16: struct.Struct("<h"), _V.UINT32: struct.Struct("<I"), _V.INT32: struct.Struct("<i"),
    _V.FLOAT32: struct.Struct("<f"), _V.BOOL: struct.Struct("<B"), _V.UINT64: struct.Struct("<Q"),
    _V.INT64: struct.Struct("<q"), _V.FLOAT64: struct.Struct("<d"),
}
_U32, _U64 = _SCALARS[_V.UINT32], _SCALARS[_V.UINT64]
INTEGER_TYPES = (_V.UINT8, _V.INT8, _V.UINT16, _V.INT16, _V.UINT32, _V.INT32, _V.UINT64, _V.INT64)

# Bit patterns whose exponent field is all ones (Inf or NaN) for the float tensor types.
_NONFINITE_MASKS: dict[GGMLQuantizationType, tuple[type, int]] = {
    GGMLQuantizationType.F32: (np.uint32, 0x7F800000),
    GGMLQuantizationType.F16: (np.uint16, 0x7C00),
    GGMLQuantizationType.BF16: (np.uint16, 0x7F80),
}


class GGUFError(R7BError):
    """A GGUF file that must not be handed to llama.cpp; the message names the file and the problem."""


class Invalid(Exception):
    """A problem in the file; the reader or validator prefixes the path and re-raises it as GGUFError."""


@dataclass(frozen=True)
class ArrayInfo:
    """Element type and length of a metadata array, kept even when its values are not decoded."""

    type: GGUFValueType
    count: int


@dataclass(frozen=True)
class TensorRecord:
    """One tensor as the file describes it; `offset` is relative to the data section, as in GGUF."""

    name: str
    shape: tuple[int, ...]  # GGUF order: shape[0] is the contiguous (row) dimension
    type: GGMLQuantizationType
    offset: int
    nbytes: int

    @property
    def layer(self) -> int:
        """The block number of a `blk.N.*` tensor, else -1."""
        if not self.name.startswith("blk."):
            return -1
        head = self.name[4:].partition(".")[0]
        return int(head) if head.isdigit() else -1


@dataclass(frozen=True)
class GGUFFile:
    """What a GGUF holds, read without loading the weights."""

    path: Path
    version: int
    architecture: str | None
    metadata: dict[str, Any]  # arrays longer than DECODE_LIMIT are given as their length
    value_types: dict[str, GGUFValueType]
    arrays: dict[str, ArrayInfo]
    tensors: tuple[TensorRecord, ...]
    file_size: int
    data_offset: int
    alignment: int = DEFAULT_ALIGNMENT
    by_name: dict[str, TensorRecord] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_name", {t.name: t for t in self.tensors})

    def get_field(self, key: str, default: Any = None) -> Any:
        """A metadata value (arrays longer than DECODE_LIMIT as their length)."""
        return self.metadata.get(key, default)

    def get_tensor(self, name: str) -> TensorRecord:
        try:
            return self.by_name[name]
        except KeyError:
            raise GGUFError(f"{self.path}: no tensor {show(name)}") from None

    @property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def read_gguf(path: str | Path, *, check_tensor_data: bool = False) -> GGUFFile:
    """Read the container (any architecture), or raise GGUFError naming the first problem.

    check_tensor_data scans F32/F16/BF16 tensors for NaN/Inf in bounded memory: cheap on quantized
    files, whose float tensors are the norms, but it reads every byte of an F16/BF16 file.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = _file_size(f)
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                gf = _parse(_Reader(mm, size), path)
            if check_tensor_data:
                _check_float_data(f, gf)
        return gf
    except Invalid as e:
        raise GGUFError(f"{path}: {e}") from None
    except OSError as e:
        raise GGUFError(f"{path}: cannot read: {e.strerror or e}") from None


def _file_size(f: BinaryIO) -> int:
    size = f.seek(0, 2)
    f.seek(0)
    if size < HEADER_BYTES:
        raise Invalid(f"file is {size} bytes, too small for a GGUF header ({HEADER_BYTES} bytes)")
    return size


# -- bounded reading ---------------------------------------------------------------------------


class _Reader:
    """Little-endian cursor over the mapped file; every read is checked against the file size."""

    def __init__(self, buf: mmap.mmap, size: int) -> None:
        self.buf, self.size, self.pos = buf, size, 0

    @property
    def remaining(self) -> int:
        return self.size - self.pos

    def take(self, n: int, what: str) -> int:
        """Advance past n bytes and return where they start."""
        if n > self.remaining:
            raise Invalid(f"truncated at offset {self.pos}: {what} needs {n} bytes, {self.remaining} left")
        start = self.pos
        self.pos += n
        return start

    def scalar(self, fmt: struct.Struct, what: str) -> Any:
        return fmt.unpack_from(self.buf, self.take(fmt.size, what))[0]

    def u32(self, what: str) -> int:
        return self.scalar(_U32, what)

    def u64(self, what: str) -> int:
        return self.scalar(_U64, what)

    def string(self, what: str) -> bytes:
        n = self.u64(f"length of {what}")
        if n > self.remaining:
            raise Invalid(f"{what} has length {n}, past the end of the file ({self.remaining} bytes left "
                           f"at offset {self.pos})")
        start = self.take(n, what)
        return self.buf[start:start + n]


def show(text: str, limit: int = 80) -> str:
    """Quote a name from the file for a one-line message: escaped, and cut if long."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _name(r: _Reader, what: str, max_bytes: int | None = None) -> str:
    raw = r.string(what)
    if not raw:
        raise Invalid(f"{what} is empty")
    if max_bytes is not None and len(raw) > max_bytes:
        raise Invalid(f"{what} is {len(raw)} bytes; llama.cpp allows at most {max_bytes}")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise Invalid(f"{what} is not valid UTF-8: {raw[:40]!r}") from None


def align(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


# -- container: header, metadata, tensor infos -----------------------------------------------------


def _parse(r: _Reader, path: Path) -> GGUFFile:
    version, n_tensors, n_kv = _header(r)
    metadata, types, arrays = _metadata(r, n_kv)
    alignment = _alignment(metadata, types)
    tensors = _tensor_infos(r, n_tensors)
    data_offset = align(r.pos, alignment)
    if tensors and data_offset > r.size:
        raise Invalid(f"truncated: the data section should start at offset {data_offset}, "
                       f"the file is {r.size} bytes")
    _check_layout(tensors, data_offset, r.size, alignment)
    architecture = metadata.get("general.architecture")
    if architecture is not None and types["general.architecture"] != _V.STRING:
        raise Invalid(f"general.architecture is {types['general.architecture'].name}, expected a string")
    return GGUFFile(path, version, architecture, metadata, types, arrays, tuple(tensors), r.size, data_offset,
                       alignment)


def _header(r: _Reader) -> tuple[int, int, int]:
    magic = r.buf[0:4]
    r.take(4, "magic")
    if magic != MAGIC:
        raise Invalid(f"not a GGUF file: magic is {magic!r}, expected {MAGIC!r}")
    version = r.u32("version")
    if version not in SUPPORTED_VERSIONS:
        raise Invalid(_version_problem(version))
    n_tensors, n_kv = r.u64("tensor count"), r.u64("metadata count")
    room = r.size - HEADER_BYTES
    for count, what, least, cap in ((n_tensors, "tensors", MIN_TENSOR_INFO_BYTES, MAX_TENSORS),
                                    (n_kv, "metadata entries", MIN_KV_BYTES, MAX_KV)):
        if count > room // least:
            raise Invalid(f"header claims {count} {what}; a {r.size}-byte file can hold at most {room // least}")
        if count > cap:
            raise Invalid(f"header claims {count} {what}; more than {cap} is not a plausible model")
    return version, n_tensors, n_kv


def _version_problem(version: int) -> str:
    swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
    if version & 0xFFFF == 0 and swapped in (1, 2, 3):
        return f"big-endian GGUF (version {swapped} byte-swapped); only little-endian files are supported"
    supported = " and ".join(map(str, SUPPORTED_VERSIONS))
    return f"unsupported GGUF version {version} (versions {supported} are supported)"


def _metadata(r: _Reader, n_kv: int) -> tuple[dict[str, Any], dict[str, GGUFValueType], dict[str, ArrayInfo]]:
    values: dict[str, Any] = {}
    types: dict[str, GGUFValueType] = {}
    arrays: dict[str, ArrayInfo] = {}
    for i in range(n_kv):
        key = _name(r, f"metadata key #{i}")
        if key in values:
            raise Invalid(f"duplicate metadata key {show(key)}")
        vtype = _value_type(r.u32(f"value type of {show(key)}"), f"metadata key {show(key)}")
        types[key] = vtype
        if vtype == _V.ARRAY:
            arrays[key], values[key] = _array(r, key)
        else:
            values[key] = _scalar(r, vtype, key)
    return values, types, arrays


def _value_type(raw: int, what: str) -> GGUFValueType:
    try:
        return GGUFValueType(raw)
    except ValueError:
        raise Invalid(f"{what} has unknown value type {raw}") from None


def _scalar(r: _Reader, vtype: GGUFValueType, key: str) -> Any:
    if vtype == _V.STRING:
        raw = r.string(f"value of {show(key)}")
        try:
            return raw.decode("utf-8")  # llama-cpp-python decodes these strictly when it loads a model
        except UnicodeDecodeError:
            raise Invalid(f"value of {show(key)} is not valid UTF-8") from None
    value = r.scalar(_SCALARS[vtype], f"value of {show(key)}")
    if vtype == _V.BOOL:
        if value > 1:
            raise Invalid(f"bool {show(key)} holds {value}, expected 0 or 1")
        return bool(value)
    return value


def _array(r: _Reader, key: str) -> tuple[ArrayInfo, Any]:
    etype = _value_type(r.u32(f"element type of {show(key)}"), f"array {show(key)}")
    if etype == _V.ARRAY:
        raise Invalid(f"array {show(key)} holds arrays; nested arrays are not supported by llama.cpp")
    count = r.u64(f"length of array {show(key)}")
    least = 8 if etype == _V.STRING else _SCALARS[etype].size
    if count > r.remaining // least:
        raise Invalid(f"array {show(key)} claims {count} elements, more than the {r.remaining} bytes left can hold")
    cap = MAX_VOCAB if key == TOKENS_KEY else MAX_ARRAY
    if count > cap:
        raise Invalid(f"array {show(key)} claims {count} elements; the limit is {cap}")
    keep = count <= DECODE_LIMIT
    if etype == _V.STRING:
        values = _strings(r, count, key, keep, unique=key == TOKENS_KEY)
    else:
        values = _numbers(r, etype, count, key, keep)
    return ArrayInfo(etype, count), values if keep else count


def _numbers(r: _Reader, etype: GGUFValueType, count: int, key: str, keep: bool) -> list | None:
    fmt = _SCALARS[etype]
    start = r.take(count * fmt.size, f"elements of {show(key)}")
    if not keep:
        return None
    values = list(struct.unpack_from(f"<{count}{fmt.format[-1]}", r.buf, start))
    return [bool(v) for v in values] if etype == _V.BOOL else values


def _strings(r: _Reader, count: int, key: str, keep: bool, unique: bool = False) -> list[str] | None:
    """Walk `count` length-prefixed strings; the loop is kept tight because vocabularies are large.

    unique: llama.cpp's vocab loader aborts the process on duplicate token texts (after renaming
    empty ones to "[EMPTY_<id>]"), so the token list is checked here while it is walked.
    """
    buf, pos, size, unpack = r.buf, r.pos, r.size, _U64.unpack_from
    out: list[str] | None = [] if keep else None
    seen: set[bytes] | None = set() if unique else None
    for i in range(count):
        if size - pos < 8:
            raise Invalid(f"truncated at offset {pos}: element {i} of {show(key)} needs 8 bytes, {size - pos} left")
        n = unpack(buf, pos)[0]
        pos += 8
        if n > size - pos:
            raise Invalid(f"element {i} of {show(key)} has length {n}, past the end of the file "
                           f"({size - pos} bytes left at offset {pos})")
        if seen is not None:
            text = buf[pos:pos + n] if n else f"[EMPTY_{i}]".encode()
            if text in seen:
                raise Invalid(f"token {i} of {show(key)} repeats an earlier token: {text[:40]!r}")
            seen.add(text)
        if out is not None:
            out.append(buf[pos:pos + n].decode("utf-8", "replace"))
        pos += n
    r.pos = pos
    return out


def _alignment(metadata: Mapping[str, Any], types: Mapping[str, GGUFValueType]) -> int:
    if "general.alignment" not in metadata:
        return DEFAULT_ALIGNMENT
    if types["general.alignment"] != _V.UINT32:
        raise Invalid(f"general.alignment is {types['general.alignment'].name}, expected UINT32")
    value = metadata["general.alignment"]
    if value == 0 or value & (value - 1):
        raise Invalid(f"general.alignment is {value}, not a power of two")
    return value


def _tensor_infos(r: _Reader, n_tensors: int) -> list[TensorRecord]:
    tensors: list[TensorRecord] = []
    seen: set[str] = set()
    for i in range(n_tensors):
        name = _name(r, f"name of tensor #{i}", MAX_NAME_BYTES)
        if name in seen:
            raise Invalid(f"duplicate tensor name {show(name)}")
        seen.add(name)
        tensors.append(_tensor_info(r, name))
    return tensors


def _tensor_info(r: _Reader, name: str) -> TensorRecord:
    shown = show(name)
    n_dims = r.u32(f"n_dims of tensor {shown}")
    if not 1 <= n_dims <= MAX_DIMS:
        raise Invalid(f"tensor {shown} has {n_dims} dimensions, expected 1 to {MAX_DIMS}")
    shape = tuple(r.u64(f"dimension {d} of tensor {shown}") for d in range(n_dims))
    if min(shape) < 1:
        raise Invalid(f"tensor {shown} has an empty dimension: shape {list(shape)}")
    n_elements = math.prod(shape)
    if n_elements >= 1 << 63:
        raise Invalid(f"tensor {shown} has {n_elements} elements, which overflows int64")
    qtype = _ggml_type(r.u32(f"type of tensor {shown}"), shown)
    block, type_size = GGML_QUANT_SIZES[qtype]
    if shape[0] % block:
        raise Invalid(f"tensor {shown} is {qtype.name} (blocks of {block}) but its rows have {shape[0]} elements")
    offset = r.u64(f"data offset of tensor {shown}")
    return TensorRecord(name, shape, qtype, offset, n_elements // block * type_size)


def _ggml_type(raw: int, shown: str) -> GGMLQuantizationType:
    try:
        qtype = GGMLQuantizationType(raw)
    except ValueError:
        qtype = None
    if qtype is None or qtype not in GGML_QUANT_SIZES:
        raise Invalid(f"tensor {shown} has unknown ggml type {raw}")
    return qtype


def _check_layout(tensors: list[TensorRecord], data_offset: int, file_size: int, alignment: int) -> None:
    """Bounds, alignment and overlap first (clear messages), then gguf.cpp's packed-in-order rule."""
    for t in tensors:
        if t.offset % alignment:
            raise Invalid(f"tensor {show(t.name)} data offset {t.offset} is not a multiple of "
                           f"the alignment {alignment}")
        start = data_offset + t.offset
        if start + t.nbytes > file_size:
            raise Invalid(f"tensor {show(t.name)} data [{start}, {start + t.nbytes}) runs past the end of the file "
                           f"({file_size} bytes)")
    ordered = sorted(tensors, key=lambda t: t.offset)
    for a, b in zip(ordered, ordered[1:]):
        if b.offset < a.offset + a.nbytes:
            raise Invalid(f"tensors {show(a.name)} and {show(b.name)} overlap in the data section")
    expected = 0
    for t in tensors:
        if t.offset != expected:
            raise Invalid(f"tensor {show(t.name)} starts at data offset {t.offset}; llama.cpp needs tensors packed "
                           f"in file order, so it should start at {expected}")
        expected = align(t.offset + t.nbytes, alignment)


# -- tensor data -------------------------------------------------------------------------------


def _check_float_data(f: BinaryIO, s: GGUFFile) -> None:
    """Scan float tensors for Inf/NaN in fixed-size chunks, so memory stays bounded."""
    buf = bytearray(SCAN_CHUNK)
    view = memoryview(buf)
    for t in s.tensors:
        spec = _NONFINITE_MASKS.get(t.type)
        if spec is not None and _has_nonfinite(f, view, s.data_offset + t.offset, t.nbytes, *spec):
            raise Invalid(f"tensor {show(t.name)} ({t.type.name}) holds Inf or NaN values")


def _has_nonfinite(f: BinaryIO, view: memoryview, start: int, nbytes: int, dtype: type, mask: int) -> bool:
    f.seek(start)
    left = nbytes
    while left:
        n = min(left, len(view))
        if f.readinto(view[:n]) != n:
            raise Invalid(f"truncated: tensor data at offset {start + nbytes - left} could not be read")
        words = np.frombuffer(view[:n], dtype=dtype)
        if np.any(np.bitwise_and(words, mask) == mask):
            return True
        left -= n
    return False

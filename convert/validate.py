"""Check a GGUF file in pure Python before llama.cpp parses it.

llama.cpp's C++ GGUF parser has had out-of-bounds reads on malformed files, and its model code
still aborts the whole process on some inconsistent hyperparameters (an odd or oversized
`rope.dimension_count` trips a GGML_ASSERT in the first forward pass, for one). Every GGUF the
project loads goes through `validate_gguf` first: it reads the file through bounds-checked
helpers, sizes every loop and allocation against the bytes actually left in the file, and turns
the first problem it finds into a one-line `GGUFError`.

Layout rules follow ggml's gguf.cpp (tensors packed in file order, names under 64 bytes, 1-4
dims); cohere2 rules follow llama.cpp's cohere2 loader and gguf-py's MODEL_TENSORS.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Mapping

import numpy as np
from gguf import (GGML_QUANT_SIZES, MODEL_ARCH, MODEL_TENSOR, MODEL_TENSORS, TENSOR_NAMES, GGMLQuantizationType,
                  GGUFValueType, RopeScalingType)

from r7b.errors import R7BError

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
HEADER_BYTES = 24  # magic, version, tensor count, KV count
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME_BYTES = 63  # GGML_MAX_NAME is 64 including the NUL
MAX_LAYERS = 512  # LLAMA_MAX_LAYERS: llama.cpp asserts block_count is within it
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
_INTEGERS = (_V.UINT8, _V.INT8, _V.UINT16, _V.INT16, _V.UINT32, _V.INT32, _V.UINT64, _V.INT64)

# Bit patterns whose exponent field is all ones (Inf or NaN) for the float tensor types.
_NONFINITE_MASKS: dict[GGMLQuantizationType, tuple[type, int]] = {
    GGMLQuantizationType.F32: (np.uint32, 0x7F800000),
    GGMLQuantizationType.F16: (np.uint16, 0x7C00),
    GGMLQuantizationType.BF16: (np.uint16, 0x7F80),
}


# Expected shape of a tensor kind in a given layer; None for kinds without a rule.
_ShapeRule = Callable[[MODEL_TENSOR, int], tuple[int, ...] | None]


class GGUFError(R7BError):
    """A GGUF file that must not be handed to llama.cpp; the message names the file and the problem."""


class _Invalid(Exception):
    """A problem in the file; validate_gguf prefixes the path and re-raises it as GGUFError."""


@dataclass(frozen=True)
class ArrayInfo:
    """Element type and length of a metadata array, kept even when its values are not decoded."""

    type: GGUFValueType
    count: int


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as the file describes it; `offset` is relative to the data section, as in GGUF."""

    name: str
    shape: tuple[int, ...]  # GGUF order: shape[0] is the contiguous (row) dimension
    type: GGMLQuantizationType
    offset: int
    nbytes: int


@dataclass(frozen=True)
class GGUFSummary:
    """What a validated file holds, read without loading the weights."""

    path: Path
    version: int
    architecture: str | None
    metadata: dict[str, Any]  # arrays longer than DECODE_LIMIT are given as their length
    value_types: dict[str, GGUFValueType]
    arrays: dict[str, ArrayInfo]
    tensors: tuple[TensorInfo, ...]
    file_size: int
    data_offset: int
    alignment: int = DEFAULT_ALIGNMENT
    by_name: dict[str, TensorInfo] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_name", {t.name: t for t in self.tensors})


def validate_gguf(path: str | Path, *, arch: str | None = "cohere2", check_tensor_data: bool = False) -> GGUFSummary:
    """Check `path` and return its summary, or raise GGUFError naming the first problem.

    arch=None checks the container only (any architecture, imatrix files included); a name also
    checks that the file declares it, and for cohere2 its hyperparameters, tokenizer and tensor
    shapes. check_tensor_data scans F32/F16/BF16 tensors for NaN/Inf in bounded memory: cheap on
    quantized files, whose float tensors are the norms, but it reads every byte of an F16/BF16
    file (about 3 GB/s from the page cache, disk speed when cold), so it is off by default.
    """
    path = Path(path)
    try:
        return _validate(path, arch, check_tensor_data)
    except _Invalid as e:
        raise GGUFError(f"{path}: {e}") from None
    except OSError as e:
        raise GGUFError(f"{path}: cannot read: {e.strerror or e}") from None


def _validate(path: Path, arch: str | None, check_tensor_data: bool) -> GGUFSummary:
    with open(path, "rb") as f:
        size = _file_size(f)
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            summary = _parse(_Reader(mm, size), path)
        _check_architecture(summary, arch)
        if check_tensor_data:
            _check_float_data(f, summary)
    return summary


def _file_size(f: BinaryIO) -> int:
    size = f.seek(0, 2)
    f.seek(0)
    if size < HEADER_BYTES:
        raise _Invalid(f"file is {size} bytes, too small for a GGUF header ({HEADER_BYTES} bytes)")
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
            raise _Invalid(f"truncated at offset {self.pos}: {what} needs {n} bytes, {self.remaining} left")
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
            raise _Invalid(f"{what} has length {n}, past the end of the file ({self.remaining} bytes left "
                           f"at offset {self.pos})")
        start = self.take(n, what)
        return self.buf[start:start + n]


def _show(text: str, limit: int = 80) -> str:
    """Quote a name from the file for a one-line message: escaped, and cut if long."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _name(r: _Reader, what: str, max_bytes: int | None = None) -> str:
    raw = r.string(what)
    if not raw:
        raise _Invalid(f"{what} is empty")
    if max_bytes is not None and len(raw) > max_bytes:
        raise _Invalid(f"{what} is {len(raw)} bytes; llama.cpp allows at most {max_bytes}")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _Invalid(f"{what} is not valid UTF-8: {raw[:40]!r}") from None


def _align(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


# -- container: header, metadata, tensor infos -----------------------------------------------------


def _parse(r: _Reader, path: Path) -> GGUFSummary:
    version, n_tensors, n_kv = _header(r)
    metadata, types, arrays = _metadata(r, n_kv)
    alignment = _alignment(metadata, types)
    tensors = _tensor_infos(r, n_tensors)
    data_offset = _align(r.pos, alignment)
    if tensors and data_offset > r.size:
        raise _Invalid(f"truncated: the data section should start at offset {data_offset}, "
                       f"the file is {r.size} bytes")
    _check_layout(tensors, data_offset, r.size, alignment)
    architecture = metadata.get("general.architecture")
    if architecture is not None and types["general.architecture"] != _V.STRING:
        raise _Invalid(f"general.architecture is {types['general.architecture'].name}, expected a string")
    return GGUFSummary(path, version, architecture, metadata, types, arrays, tuple(tensors), r.size, data_offset,
                       alignment)


def _header(r: _Reader) -> tuple[int, int, int]:
    magic = r.buf[0:4]
    r.take(4, "magic")
    if magic != MAGIC:
        raise _Invalid(f"not a GGUF file: magic is {magic!r}, expected {MAGIC!r}")
    version = r.u32("version")
    if version not in SUPPORTED_VERSIONS:
        raise _Invalid(_version_problem(version))
    n_tensors, n_kv = r.u64("tensor count"), r.u64("metadata count")
    room = r.size - HEADER_BYTES
    for count, what, least, cap in ((n_tensors, "tensors", MIN_TENSOR_INFO_BYTES, MAX_TENSORS),
                                    (n_kv, "metadata entries", MIN_KV_BYTES, MAX_KV)):
        if count > room // least:
            raise _Invalid(f"header claims {count} {what}; a {r.size}-byte file can hold at most {room // least}")
        if count > cap:
            raise _Invalid(f"header claims {count} {what}; more than {cap} is not a plausible model")
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
            raise _Invalid(f"duplicate metadata key {_show(key)}")
        vtype = _value_type(r.u32(f"value type of {_show(key)}"), f"metadata key {_show(key)}")
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
        raise _Invalid(f"{what} has unknown value type {raw}") from None


def _scalar(r: _Reader, vtype: GGUFValueType, key: str) -> Any:
    if vtype == _V.STRING:
        raw = r.string(f"value of {_show(key)}")
        try:
            return raw.decode("utf-8")  # llama-cpp-python decodes these strictly when it loads a model
        except UnicodeDecodeError:
            raise _Invalid(f"value of {_show(key)} is not valid UTF-8") from None
    value = r.scalar(_SCALARS[vtype], f"value of {_show(key)}")
    if vtype == _V.BOOL:
        if value > 1:
            raise _Invalid(f"bool {_show(key)} holds {value}, expected 0 or 1")
        return bool(value)
    return value


def _array(r: _Reader, key: str) -> tuple[ArrayInfo, Any]:
    etype = _value_type(r.u32(f"element type of {_show(key)}"), f"array {_show(key)}")
    if etype == _V.ARRAY:
        raise _Invalid(f"array {_show(key)} holds arrays; nested arrays are not supported by llama.cpp")
    count = r.u64(f"length of array {_show(key)}")
    least = 8 if etype == _V.STRING else _SCALARS[etype].size
    if count > r.remaining // least:
        raise _Invalid(f"array {_show(key)} claims {count} elements, more than the {r.remaining} bytes left can hold")
    cap = MAX_VOCAB if key == TOKENS_KEY else MAX_ARRAY
    if count > cap:
        raise _Invalid(f"array {_show(key)} claims {count} elements; the limit is {cap}")
    keep = count <= DECODE_LIMIT
    if etype == _V.STRING:
        values = _strings(r, count, key, keep, unique=key == TOKENS_KEY)
    else:
        values = _numbers(r, etype, count, key, keep)
    return ArrayInfo(etype, count), values if keep else count


def _numbers(r: _Reader, etype: GGUFValueType, count: int, key: str, keep: bool) -> list | None:
    fmt = _SCALARS[etype]
    start = r.take(count * fmt.size, f"elements of {_show(key)}")
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
            raise _Invalid(f"truncated at offset {pos}: element {i} of {_show(key)} needs 8 bytes, {size - pos} left")
        n = unpack(buf, pos)[0]
        pos += 8
        if n > size - pos:
            raise _Invalid(f"element {i} of {_show(key)} has length {n}, past the end of the file "
                           f"({size - pos} bytes left at offset {pos})")
        if seen is not None:
            text = buf[pos:pos + n] if n else f"[EMPTY_{i}]".encode()
            if text in seen:
                raise _Invalid(f"token {i} of {_show(key)} repeats an earlier token: {text[:40]!r}")
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
        raise _Invalid(f"general.alignment is {types['general.alignment'].name}, expected UINT32")
    value = metadata["general.alignment"]
    if value == 0 or value & (value - 1):
        raise _Invalid(f"general.alignment is {value}, not a power of two")
    return value


def _tensor_infos(r: _Reader, n_tensors: int) -> list[TensorInfo]:
    tensors: list[TensorInfo] = []
    seen: set[str] = set()
    for i in range(n_tensors):
        name = _name(r, f"name of tensor #{i}", MAX_NAME_BYTES)
        if name in seen:
            raise _Invalid(f"duplicate tensor name {_show(name)}")
        seen.add(name)
        tensors.append(_tensor_info(r, name))
    return tensors


def _tensor_info(r: _Reader, name: str) -> TensorInfo:
    shown = _show(name)
    n_dims = r.u32(f"n_dims of tensor {shown}")
    if not 1 <= n_dims <= MAX_DIMS:
        raise _Invalid(f"tensor {shown} has {n_dims} dimensions, expected 1 to {MAX_DIMS}")
    shape = tuple(r.u64(f"dimension {d} of tensor {shown}") for d in range(n_dims))
    if min(shape) < 1:
        raise _Invalid(f"tensor {shown} has an empty dimension: shape {list(shape)}")
    n_elements = math.prod(shape)
    if n_elements >= 1 << 63:
        raise _Invalid(f"tensor {shown} has {n_elements} elements, which overflows int64")
    qtype = _ggml_type(r.u32(f"type of tensor {shown}"), shown)
    block, type_size = GGML_QUANT_SIZES[qtype]
    if shape[0] % block:
        raise _Invalid(f"tensor {shown} is {qtype.name} (blocks of {block}) but its rows have {shape[0]} elements")
    offset = r.u64(f"data offset of tensor {shown}")
    return TensorInfo(name, shape, qtype, offset, n_elements // block * type_size)


def _ggml_type(raw: int, shown: str) -> GGMLQuantizationType:
    try:
        qtype = GGMLQuantizationType(raw)
    except ValueError:
        qtype = None
    if qtype is None or qtype not in GGML_QUANT_SIZES:
        raise _Invalid(f"tensor {shown} has unknown ggml type {raw}")
    return qtype


def _check_layout(tensors: list[TensorInfo], data_offset: int, file_size: int, alignment: int) -> None:
    """Bounds, alignment and overlap first (clear messages), then gguf.cpp's packed-in-order rule."""
    for t in tensors:
        if t.offset % alignment:
            raise _Invalid(f"tensor {_show(t.name)} data offset {t.offset} is not a multiple of "
                           f"the alignment {alignment}")
        start = data_offset + t.offset
        if start + t.nbytes > file_size:
            raise _Invalid(f"tensor {_show(t.name)} data [{start}, {start + t.nbytes}) runs past the end of the file "
                           f"({file_size} bytes)")
    ordered = sorted(tensors, key=lambda t: t.offset)
    for a, b in zip(ordered, ordered[1:]):
        if b.offset < a.offset + a.nbytes:
            raise _Invalid(f"tensors {_show(a.name)} and {_show(b.name)} overlap in the data section")
    expected = 0
    for t in tensors:
        if t.offset != expected:
            raise _Invalid(f"tensor {_show(t.name)} starts at data offset {t.offset}; llama.cpp needs tensors packed "
                           f"in file order, so it should start at {expected}")
        expected = _align(t.offset + t.nbytes, alignment)


# -- architecture ------------------------------------------------------------------------------


def _check_architecture(s: GGUFSummary, arch: str | None) -> None:
    if arch is not None and s.architecture is None:
        raise _Invalid("missing required key 'general.architecture'")
    if arch is not None and s.architecture != arch:
        raise _Invalid(f"architecture is {_show(s.architecture)}, expected {_show(arch)}")
    _check_special_tokens(s)
    check = _ARCH_CHECKS.get(arch) if arch is not None else None
    if check is not None:
        check(s)


def _get(s: GGUFSummary, key: str, types: tuple[GGUFValueType, ...], *, required: bool = True) -> Any:
    if key not in s.metadata:
        if required:
            raise _Invalid(f"missing required key {_show(key)}")
        return None
    vtype = s.value_types[key]
    if vtype not in types:
        expected = " or ".join(t.name for t in types)
        raise _Invalid(f"key {_show(key)} is {vtype.name}, expected {expected}")
    return s.metadata[key]


def _count(s: GGUFSummary, key: str, *, lo: int = 1, hi: int | None = None, required: bool = True) -> int | None:
    value = _get(s, key, (_V.UINT32,), required=required)
    if value is not None and (value < lo or (hi is not None and value > hi)):
        bound = f"at least {lo}" if hi is None else f"between {lo} and {hi}"
        raise _Invalid(f"{key} is {value}, expected {bound}")
    return value


def _real(s: GGUFSummary, key: str, *, positive: bool, required: bool = True) -> float | None:
    value = _get(s, key, (_V.FLOAT32,), required=required)
    if value is not None and (not math.isfinite(value) or (positive and value <= 0)):
        raise _Invalid(f"{key} is {value}, expected a finite{' positive' if positive else ''} number")
    return value


def _per_layer(s: GGUFSummary, key: str, n_layer: int, *, default: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """A count given once or per layer (llama.cpp's get_key_or_arr), each value at least 1."""
    if key in s.metadata and s.value_types[key] == _V.ARRAY:
        info = s.arrays[key]
        if info.type not in (_V.UINT32, _V.INT32) or info.count != n_layer:
            raise _Invalid(f"{key} is an array of {info.count} {info.type.name}; expected {n_layer} UINT32 "
                           "(one per layer) or a single UINT32")
        values = tuple(s.metadata[key])
    elif key in s.metadata or default is None:
        values = (_count(s, key),) * n_layer
    else:
        values = default
    if min(values) < 1:
        raise _Invalid(f"{key} holds {min(values)}, expected at least 1")
    return values


def _check_special_tokens(s: GGUFSummary) -> None:
    """Token ids llama.cpp looks up in the vocabulary must name a token."""
    tokens = s.arrays.get(TOKENS_KEY)
    n_vocab = tokens.count if tokens is not None and tokens.type == _V.STRING else None
    for key, value in s.metadata.items():
        if not (key.startswith("tokenizer.ggml.") and key.endswith("_token_id")):
            continue
        if s.value_types[key] not in _INTEGERS:
            raise _Invalid(f"key {_show(key)} is {s.value_types[key].name}, expected an integer token id")
        if n_vocab is not None and not 0 <= value < n_vocab:
            raise _Invalid(f"{key} is {value}, outside the vocabulary of {n_vocab} tokens")


def _check_tokenizer(s: GGUFSummary, model: str | None = None) -> int:
    """llama.cpp's vocab loader: a model name, a string token list, same-length side arrays."""
    found = _get(s, "tokenizer.ggml.model", (_V.STRING,))
    if model is not None and found != model:
        raise _Invalid(f"tokenizer.ggml.model is {_show(found)}, expected {_show(model)}")
    n_vocab = _string_array(s, TOKENS_KEY, required=True)
    if not 1 <= n_vocab <= MAX_VOCAB:
        raise _Invalid(f"vocabulary has {n_vocab} tokens, expected 1 to {MAX_VOCAB}")
    for key, etype in (("tokenizer.ggml.token_type", _V.INT32), ("tokenizer.ggml.scores", _V.FLOAT32)):
        info = s.arrays.get(key)
        if key in s.metadata and (info is None or info.type != etype or info.count != n_vocab):
            got = f"{info.count} {info.type.name}" if info else s.value_types[key].name
            raise _Invalid(f"{key} should be {n_vocab} {etype.name} (one per token), got {got}")
    _string_array(s, "tokenizer.ggml.merges", required=found == "gpt2")
    return n_vocab


def _string_array(s: GGUFSummary, key: str, *, required: bool) -> int:
    if _get(s, key, (_V.ARRAY,), required=required) is None:
        return 0
    info = s.arrays[key]
    if info.type != _V.STRING:
        raise _Invalid(f"{key} is an array of {info.type.name}, expected strings")
    return info.count


def _check_rope_scaling(s: GGUFSummary, key: str) -> None:
    """llama.cpp asserts (aborting the process) on a scaling type it does not know."""
    value = _get(s, key, (_V.STRING,), required=False)
    known = [t.value for t in RopeScalingType]
    if value is not None and value not in known:
        raise _Invalid(f"{key} is {_show(value)}, expected one of {', '.join(known)}")


@dataclass(frozen=True)
class _Cohere2Dims:
    n_embd: int
    n_vocab: int
    n_layer: int
    n_ff: tuple[int, ...]
    n_head: tuple[int, ...]
    n_head_kv: tuple[int, ...]
    head_dim: int


_C2 = "cohere2."
# Keys of features cohere2 does not have; llama.cpp asserts on some non-zero values of them.
_COHERE2_ABSENT = ("expert_count", "expert_used_count", "expert_group_count", "expert_group_used_count",
                   "nextn_predict_layers")


def _check_cohere2(s: GGUFSummary) -> None:
    dims = _cohere2_dims(s)
    _check_tensor_shapes(s, _cohere2_shapes(dims), MODEL_ARCH.COHERE2, dims.n_layer)


def _cohere2_dims(s: GGUFSummary) -> _Cohere2Dims:
    """Keys llama.cpp's cohere2 loader needs, and the relations its loader and graph assert on."""
    _count(s, _C2 + "context_length")
    _count(s, _C2 + "attention.sliding_window")
    _real(s, _C2 + "attention.layer_norm_epsilon", positive=True)
    _real(s, _C2 + "logit_scale", positive=False)
    _real(s, _C2 + "rope.freq_base", positive=True, required=False)
    _check_rope_scaling(s, _C2 + "rope.scaling.type")
    _check_dense(s)
    n_layer = _count(s, _C2 + "block_count", hi=MAX_LAYERS)
    n_embd = _count(s, _C2 + "embedding_length")
    n_ff = _per_layer(s, _C2 + "feed_forward_length", n_layer)
    n_head, n_head_kv = _cohere2_heads(s, n_layer, n_embd)
    head_dim = _cohere2_head_dim(s, n_embd, n_head)
    n_vocab = _check_tokenizer(s, model="gpt2")  # Command R7B's tokenizer is byte-level BPE
    vocab_size = _count(s, _C2 + "vocab_size", required=False)
    if vocab_size is not None and vocab_size != n_vocab:
        raise _Invalid(f"{_C2}vocab_size is {vocab_size} but the tokenizer lists {n_vocab} tokens")
    return _Cohere2Dims(n_embd, n_vocab, n_layer, n_ff, n_head, n_head_kv, head_dim)


def _check_dense(s: GGUFSummary) -> None:
    for name in _COHERE2_ABSENT:
        key = _C2 + name
        if key in s.metadata and (s.value_types[key] != _V.UINT32 or s.metadata[key] != 0):
            raise _Invalid(f"{key} is set, but cohere2 has no experts or extra prediction layers")


def _cohere2_heads(s: GGUFSummary, n_layer: int, n_embd: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    n_head = _per_layer(s, _C2 + "attention.head_count", n_layer)
    n_head_kv = _per_layer(s, _C2 + "attention.head_count_kv", n_layer, default=n_head)
    for il, (h, kv) in enumerate(zip(n_head, n_head_kv)):
        if h % kv:
            raise _Invalid(f"layer {il}: {_C2}attention.head_count {h} is not divisible by head_count_kv {kv}")
        if n_embd % h:
            raise _Invalid(f"layer {il}: {_C2}embedding_length {n_embd} is not divisible by attention.head_count {h}")
    return n_head, n_head_kv


def _cohere2_head_dim(s: GGUFSummary, n_embd: int, n_head: tuple[int, ...]) -> int:
    """One head size and rotary width for every layer, as the cohere2 graph and ggml's rope assert.

    llama.cpp's cohere2 loader sizes attn_q and attn_output as [n_embd, n_embd], so every layer's
    heads must span exactly the embedding.
    """
    head_dim = _count(s, _C2 + "attention.key_length", required=False) or n_embd // n_head[0]
    value_dim = _count(s, _C2 + "attention.value_length", required=False) or n_embd // n_head[0]
    if value_dim != head_dim:
        raise _Invalid(f"{_C2}attention.key_length {head_dim} differs from value_length {value_dim}; "
                       "llama.cpp needs them equal")
    for il, h in enumerate(n_head):
        if h * head_dim != n_embd:
            raise _Invalid(f"layer {il}: {_C2}attention.head_count {h} x key_length {head_dim} "
                           f"!= embedding_length {n_embd}")
    n_rot = _count(s, _C2 + "rope.dimension_count", required=False) or head_dim
    if n_rot > head_dim or n_rot % 2:
        raise _Invalid(f"{_C2}rope.dimension_count is {n_rot}; it must be even and at most the head size {head_dim}")
    for key, want in (("attention.key_length_swa", head_dim), ("attention.value_length_swa", head_dim),
                      ("rope.dimension_count_swa", n_rot)):
        value = _count(s, _C2 + key, required=False)
        if value is not None and value != want:
            raise _Invalid(f"{_C2}{key} is {value}; cohere2 uses one head layout, so it must be {want}")
    return head_dim


def _cohere2_shapes(d: _Cohere2Dims) -> _ShapeRule:
    """Expected GGUF-order shape of each cohere2 tensor kind in layer `il`."""

    def shape(kind: MODEL_TENSOR, il: int) -> tuple[int, ...] | None:
        q, kv, ff = d.n_head[il] * d.head_dim, d.n_head_kv[il] * d.head_dim, d.n_ff[il]
        return {
            MODEL_TENSOR.TOKEN_EMBD: (d.n_embd, d.n_vocab),
            MODEL_TENSOR.OUTPUT_NORM: (d.n_embd,),
            MODEL_TENSOR.ATTN_NORM: (d.n_embd,),
            MODEL_TENSOR.ATTN_Q: (d.n_embd, q),
            MODEL_TENSOR.ATTN_K: (d.n_embd, kv),
            MODEL_TENSOR.ATTN_V: (d.n_embd, kv),
            MODEL_TENSOR.ATTN_OUT: (q, d.n_embd),
            MODEL_TENSOR.FFN_GATE: (d.n_embd, ff),
            MODEL_TENSOR.FFN_UP: (d.n_embd, ff),
            MODEL_TENSOR.FFN_DOWN: (ff, d.n_embd),
        }.get(kind)

    return shape


def _expected_tensors(arch: MODEL_ARCH, n_layer: int, shape: _ShapeRule) -> dict[str, tuple[int, ...] | None]:
    """Every `.weight` gguf-py lists for the architecture, per layer where it has a block id."""
    names: dict[str, tuple[int, ...] | None] = {}
    for kind in MODEL_TENSORS[arch]:
        template = TENSOR_NAMES[kind]
        layers = range(n_layer) if "{bid}" in template else (0,)
        for il in layers:
            names[template.format(bid=il) + ".weight"] = shape(kind, il)
    return names


def _check_tensor_shapes(s: GGUFSummary, shape: _ShapeRule, arch: MODEL_ARCH, n_layer: int) -> None:
    expected = _expected_tensors(arch, n_layer, shape)
    arch_name = s.architecture
    for t in s.tensors:
        if t.name not in expected:
            hint = " (llama.cpp ties the output projection to token_embd)" if t.name == "output.weight" else ""
            raise _Invalid(f"unexpected tensor {_show(t.name)} for architecture {arch_name}{hint}")
        want = expected[t.name]
        if want is not None and _padded(t.shape) != _padded(want):
            raise _Invalid(f"tensor {_show(t.name)} has shape {list(t.shape)}, expected {list(want)}")
    for name, want in expected.items():
        if want is not None and name not in s.by_name:
            raise _Invalid(f"missing tensor {_show(name)}")


def _padded(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shapes compared as ggml does: trailing dimensions of 1 are implied."""
    return tuple(shape) + (1,) * (MAX_DIMS - len(shape))


_ARCH_CHECKS: dict[str, Callable[[GGUFSummary], None]] = {"cohere2": _check_cohere2}


# -- tensor data -------------------------------------------------------------------------------


def _check_float_data(f: BinaryIO, s: GGUFSummary) -> None:
    """Scan float tensors for Inf/NaN in fixed-size chunks, so memory stays bounded."""
    buf = bytearray(SCAN_CHUNK)
    view = memoryview(buf)
    for t in s.tensors:
        spec = _NONFINITE_MASKS.get(t.type)
        if spec is not None and _has_nonfinite(f, view, s.data_offset + t.offset, t.nbytes, *spec):
            raise _Invalid(f"tensor {_show(t.name)} ({t.type.name}) holds Inf or NaN values")


def _has_nonfinite(f: BinaryIO, view: memoryview, start: int, nbytes: int, dtype: type, mask: int) -> bool:
    f.seek(start)
    left = nbytes
    while left:
        n = min(left, len(view))
        if f.readinto(view[:n]) != n:
            raise _Invalid(f"truncated: tensor data at offset {start + nbytes - left} could not be read")
        words = np.frombuffer(view[:n], dtype=dtype)
        if np.any(np.bitwise_and(words, mask) == mask):
            return True
        left -= n
    return False

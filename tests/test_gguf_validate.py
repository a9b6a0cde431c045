"""GGUF validation: a sound cohere2 file passes, each kind of damage gets its own one-line message,
and a seeded fuzz gets nothing but GGUFError (and no accepted file kills llama.cpp)."""

from __future__ import annotations

import os
import random
import struct
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as V

from r7b.gguf_reader import GGUFError, GGUFFile
from r7b.gguf_validate import validate_gguf
from r7b.errors import R7BError

N_LAYER, N_EMBD, N_HEAD, N_HEAD_KV, N_FF = 4, 64, 4, 2, 128
HEAD_DIM = N_EMBD // N_HEAD
FUZZ_SEED = 20241213
FUZZ_CASES = 400
FUZZ_CASE_SECONDS = 2.0  # per validate_gguf call; generous for a loaded machine
LLAMA_LOADS = 48  # accepted mutants handed to llama.cpp, header mutants first


# -- building files ----------------------------------------------------------------------------


def _byte_tokens() -> list[str]:
    """GPT-2's byte-to-unicode alphabet: one printable character per byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b if b in printable else next(extra)) for b in range(256)]


def _vocab() -> tuple[list[str], list[int], list[str]]:
    tokens = _byte_tokens()
    pairs = [("t", "h"), ("th", "e"), ("a", "n"), ("i", "n"), ("e", "r"), ("o", "n"), ("r", "e"), ("a", "t")]
    merges = [f"{a} {b}" for a, b in pairs]
    tokens += [a + b for a, b in pairs]
    specials = ["<PAD>", "<BOS_TOKEN>", "<EOS_TOKEN>", *(f"<SPECIAL_{i}>" for i in range(33))]
    types = [gguf.TokenType.NORMAL] * len(tokens) + [gguf.TokenType.CONTROL] * len(specials)
    return tokens + specials, [int(t) for t in types], merges


@dataclass
class Spec:
    """Everything a test file holds; tests edit a fresh copy, then write it with gguf-py."""

    kv: dict[str, tuple[Any, V, V | None]] = field(default_factory=dict)
    tensors: dict[str, tuple[np.ndarray, Q | None]] = field(default_factory=dict)
    arch: str | None = "cohere2"


def cohere2_spec(seed: int = 0) -> Spec:
    rng = np.random.default_rng(seed)
    tokens, types, merges = _vocab()
    a = "cohere2."
    kv = {
        a + "context_length": (256, V.UINT32, None),
        a + "embedding_length": (N_EMBD, V.UINT32, None),
        a + "block_count": (N_LAYER, V.UINT32, None),
        a + "feed_forward_length": (N_FF, V.UINT32, None),
        a + "attention.head_count": (N_HEAD, V.UINT32, None),
        a + "attention.head_count_kv": (N_HEAD_KV, V.UINT32, None),
        a + "attention.sliding_window": (32, V.UINT32, None),
        a + "attention.layer_norm_epsilon": (1e-5, V.FLOAT32, None),
        a + "logit_scale": (0.25, V.FLOAT32, None),
        a + "rope.freq_base": (10000.0, V.FLOAT32, None),
        "general.name": ("tiny-validate", V.STRING, None),
        "tokenizer.ggml.model": ("gpt2", V.STRING, None),
        "tokenizer.ggml.tokens": (tokens, V.ARRAY, V.STRING),
        "tokenizer.ggml.token_type": (types, V.ARRAY, V.INT32),
        "tokenizer.ggml.merges": (merges, V.ARRAY, V.STRING),
        "tokenizer.ggml.bos_token_id": (tokens.index("<BOS_TOKEN>"), V.UINT32, None),
        "tokenizer.ggml.eos_token_id": (tokens.index("<EOS_TOKEN>"), V.UINT32, None),
    }

    def weight(rows: int, cols: int) -> np.ndarray:  # numpy (rows, cols) is GGUF [cols, rows]
        return (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)

    qkv = N_HEAD_KV * HEAD_DIM
    embd = weight(len(tokens), N_EMBD).astype(np.float16)
    tensors: dict[str, tuple[np.ndarray, Q | None]] = {"token_embd.weight": (embd, None)}
    for i in range(N_LAYER):
        b = f"blk.{i}."
        tensors |= {
            b + "attn_norm.weight": (np.ones(N_EMBD, np.float32), None),
            b + "attn_q.weight": (weight(N_EMBD, N_EMBD).astype(np.float16), None),
            b + "attn_k.weight": (weight(qkv, N_EMBD).astype(np.float16), None),
            b + "attn_v.weight": (weight(qkv, N_EMBD).astype(np.float16), None),
            b + "attn_output.weight": (weight(N_EMBD, N_EMBD), None),
            b + "ffn_gate.weight": (weight(N_FF, N_EMBD).astype(np.float16), None),
            b + "ffn_up.weight": (weight(N_FF, N_EMBD).astype(np.float16), None),
            b + "ffn_down.weight": (gguf.quants.quantize(weight(N_EMBD, N_FF), Q.Q8_0), Q.Q8_0),
        }
    tensors["output_norm.weight"] = (np.ones(N_EMBD, np.float32), None)
    return Spec(kv, tensors)


def write_gguf(path: Path, spec: Spec) -> Path:
    writer = gguf.GGUFWriter(path, spec.arch or "none")
    if spec.arch is None:
        writer.kv_data[0].pop("general.architecture")
    for key, (value, vtype, sub_type) in spec.kv.items():
        writer.add_key_value(key, value, vtype, sub_type)
    for name, (array, raw_dtype) in spec.tensors.items():
        writer.add_tensor(name, array, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_gguf(tmp_path_factory.mktemp("validate") / "tiny-cohere2.gguf", cohere2_spec())


@pytest.fixture
def build(tmp_path) -> Callable[[Callable[[Spec], None]], Path]:
    """Write a variant of the good file: `edit` changes a fresh Spec in place."""

    def make(edit: Callable[[Spec], None]) -> Path:
        spec = cohere2_spec()
        edit(spec)
        return write_gguf(tmp_path / "variant.gguf", spec)

    return make


def _layout(path: Path) -> gguf.GGUFReader:
    """gguf-py's independent reading of the file, used to find the bytes to damage."""
    return gguf.GGUFReader(path)


def _field_at(path: Path, key: str) -> int:
    return _layout(path).fields[key].offset


def _tensor_field_at(path: Path, name: str) -> tuple[int, int]:
    """(offset of the tensor info, its size in bytes) for tensor `name`."""
    t = next(t for t in _layout(path).tensors if t.name == name)
    return t.field.offset, sum(p.nbytes for p in t.field.parts)


def _patched(src: Path, dst: Path, at: int, data: bytes) -> Path:
    blob = bytearray(src.read_bytes())
    blob[at:at + len(data)] = data
    dst.write_bytes(bytes(blob))
    return dst


def _truncated(src: Path, dst: Path, size: int) -> Path:
    dst.write_bytes(src.read_bytes()[:size])
    return dst


def _expect(path: Path, *fragments: str, **kwargs: Any) -> str:
    with pytest.raises(GGUFError) as info:
        validate_gguf(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path}: ")
    for fragment in fragments:
        assert fragment in message, message
    return message


# -- the good file -----------------------------------------------------------------------------


def test_valid_file_passes_and_summarises(tiny_gguf):
    s = validate_gguf(tiny_gguf, check_tensor_data=True)
    assert isinstance(s, GGUFFile)
    assert (s.version, s.architecture, s.file_size) == (3, "cohere2", tiny_gguf.stat().st_size)
    assert s.data_offset % s.alignment == 0 and s.alignment == 32
    assert len(s.tensors) == 2 + N_LAYER * 8
    assert s.metadata["cohere2.block_count"] == N_LAYER
    assert s.value_types["cohere2.logit_scale"] == V.FLOAT32
    assert s.metadata["tokenizer.ggml.model"] == "gpt2"
    assert len(s.metadata["tokenizer.ggml.tokens"]) == s.arrays["tokenizer.ggml.tokens"].count == 300
    embd = s.by_name["token_embd.weight"]
    assert (embd.shape, embd.type, embd.nbytes) == ((N_EMBD, 300), Q.F16, N_EMBD * 300 * 2)
    down = s.by_name["blk.0.ffn_down.weight"]
    assert (down.shape, down.type, down.nbytes) == ((N_FF, N_EMBD), Q.Q8_0, N_FF * N_EMBD // 32 * 34)
    ends = [s.data_offset + t.offset + t.nbytes for t in s.tensors]
    assert max(ends) <= s.file_size


def test_summary_matches_gguf_py(tiny_gguf):
    reader = gguf.GGUFReader(tiny_gguf)
    s = validate_gguf(tiny_gguf)
    assert [(t.name, t.offset + s.data_offset, t.nbytes) for t in s.tensors] == \
           [(t.name, t.data_offset, int(t.n_bytes)) for t in reader.tensors]
    assert set(s.metadata) == {k for k in reader.fields if not k.startswith("GGUF.")}


def test_error_is_an_r7b_error(tmp_path):
    assert issubclass(GGUFError, R7BError) and issubclass(GGUFError, ValueError)
    _expect(tmp_path / "absent.gguf", "cannot read")
    (tmp_path / "empty.gguf").write_bytes(b"")
    _expect(tmp_path / "empty.gguf", "too small")


def test_large_arrays_are_summarised_by_length(build):
    path = build(lambda s: s.kv.__setitem__("r7b.test.big", (list(range(5000)), V.ARRAY, V.UINT32)))
    s = validate_gguf(path)
    assert s.metadata["r7b.test.big"] == 5000 and s.arrays["r7b.test.big"].type == V.UINT32


def test_container_only_mode_accepts_other_files(build):
    def imatrix_like(s: Spec) -> None:
        s.arch = None
        s.kv = {"general.type": ("imatrix", V.STRING, None)}
        s.tensors = {"blk.0.attn_q.weight.in_sum2": (np.ones(64, np.float32), None)}

    path = build(imatrix_like)
    assert validate_gguf(path, arch=None).architecture is None
    _expect(path, "missing required key 'general.architecture'")


# -- header ------------------------------------------------------------------------------------


def test_wrong_magic(tiny_gguf, tmp_path):
    _expect(_patched(tiny_gguf, tmp_path / "m.gguf", 0, b"GGML"), "not a GGUF file", "b'GGML'")


@pytest.mark.parametrize("version", [0, 1, 4, 0xFFFF])
def test_unsupported_version(tiny_gguf, tmp_path, version):
    bad = _patched(tiny_gguf, tmp_path / "v.gguf", 4, struct.pack("<I", version))
    _expect(bad, f"unsupported GGUF version {version}")


def test_big_endian_file_is_named(tiny_gguf, tmp_path):
    _expect(_patched(tiny_gguf, tmp_path / "be.gguf", 4, struct.pack(">I", 3)), "big-endian")


@pytest.mark.parametrize("at, what", [(8, "tensors"), (16, "metadata entries")])
def test_huge_counts_rejected_before_looping(tiny_gguf, tmp_path, at, what):
    bad = _patched(tiny_gguf, tmp_path / "n.gguf", at, struct.pack("<Q", 2**62))
    _expect(bad, f"header claims {2**62} {what}")


def test_implausible_counts_rejected_even_if_the_file_is_large(tiny_gguf, tmp_path):
    blob = bytearray(tiny_gguf.read_bytes()) + bytes(1 << 20)
    blob[16:24] = struct.pack("<Q", 70000)
    (tmp_path / "big.gguf").write_bytes(bytes(blob))
    _expect(tmp_path / "big.gguf", "header claims 70000 metadata entries", "not a plausible model")


def test_truncation_everywhere(tiny_gguf, tmp_path):
    s = validate_gguf(tiny_gguf)
    key = _field_at(tiny_gguf, "cohere2.logit_scale")
    tokens = _field_at(tiny_gguf, "tokenizer.ggml.tokens")
    info, info_size = _tensor_field_at(tiny_gguf, "blk.1.attn_k.weight")
    cuts = {
        "header": [0, 3, 12, 23, 24, 30],
        "metadata": [key + 3, key + 12, key + 40, tokens + 60, tokens + 2000],
        "tensor infos": [info + 4, info + info_size - 3],
        "data": [s.data_offset, s.data_offset + 1000, s.file_size - 1],
    }
    for section, sizes in cuts.items():
        for size in sizes:
            message = _expect(_truncated(tiny_gguf, tmp_path / f"t{size}.gguf", size))
            signs = ("truncated", "past the end", "too small", "can hold", "can describe")
            assert any(w in message for w in signs), (section, message)


# -- metadata ----------------------------------------------------------------------------------


def test_string_length_past_end(tiny_gguf, tmp_path):
    at = _field_at(tiny_gguf, "general.name")
    _expect(_patched(tiny_gguf, tmp_path / "s.gguf", at, struct.pack("<Q", 2**40)), "length 1099511627776",
            "past the end of the file")


def test_token_length_past_end(tiny_gguf, tmp_path):
    at = _field_at(tiny_gguf, "tokenizer.ggml.tokens") + 8 + len("tokenizer.ggml.tokens") + 4 + 4 + 8
    _expect(_patched(tiny_gguf, tmp_path / "s.gguf", at, struct.pack("<Q", 2**33)), "element 0",
            "past the end of the file")


def test_unknown_value_type(tiny_gguf, tmp_path):
    at = _field_at(tiny_gguf, "cohere2.logit_scale") + 8 + len("cohere2.logit_scale")
    _expect(_patched(tiny_gguf, tmp_path / "t.gguf", at, struct.pack("<I", 99)), "unknown value type 99")


def test_array_length_bounded_by_file(tiny_gguf, tmp_path):
    at = _field_at(tiny_gguf, "tokenizer.ggml.token_type") + 8 + len("tokenizer.ggml.token_type") + 4 + 4
    _expect(_patched(tiny_gguf, tmp_path / "a.gguf", at, struct.pack("<Q", 2**50)), "claims 1125899906842624 elements")


def test_nested_arrays_rejected(build):
    path = build(lambda s: s.kv.__setitem__("r7b.test.nested", ([[1, 2], [3]], V.ARRAY, V.ARRAY)))
    _expect(path, "nested arrays")


def test_key_must_be_utf8(tiny_gguf, tmp_path):
    at = _field_at(tiny_gguf, "general.name") + 8
    _expect(_patched(tiny_gguf, tmp_path / "u.gguf", at, b"\xff\xfe"), "not valid UTF-8")


def test_duplicate_key(tiny_gguf, tmp_path):
    at = _field_at(tiny_gguf, "tokenizer.ggml.eos_token_id") + 8
    _expect(_patched(tiny_gguf, tmp_path / "d.gguf", at, b"tokenizer.ggml.bos_token_id"),
            "duplicate metadata key 'tokenizer.ggml.bos_token_id'")


@pytest.mark.parametrize("value, message", [(48, "not a power of two"), (0, "not a power of two")])
def test_alignment_power_of_two(build, value, message):
    _expect(build(lambda s: s.kv.__setitem__("general.alignment", (value, V.UINT32, None))), message)


def test_alignment_type(build):
    _expect(build(lambda s: s.kv.__setitem__("general.alignment", (32, V.UINT64, None))),
            "general.alignment is UINT64, expected UINT32")


# -- tensor infos ------------------------------------------------------------------------------


def _patch_tensor(src: Path, dst: Path, name: str, field_from_end: int, data: bytes) -> Path:
    """Overwrite part of tensor `name`'s info, counted back from its end (offset: 8, type: 12)."""
    start, size = _tensor_field_at(src, name)
    return _patched(src, dst, start + size - field_from_end, data)


def test_unknown_ggml_type(tiny_gguf, tmp_path):
    bad = _patch_tensor(tiny_gguf, tmp_path / "g.gguf", "blk.0.attn_q.weight", 12, struct.pack("<I", 200))
    _expect(bad, "tensor 'blk.0.attn_q.weight' has unknown ggml type 200")


def test_tensor_offset_out_of_file(tiny_gguf, tmp_path):
    bad = _patch_tensor(tiny_gguf, tmp_path / "o.gguf", "output_norm.weight", 8, struct.pack("<Q", 2**40))
    _expect(bad, "tensor 'output_norm.weight'", "runs past the end of the file")


def test_misaligned_offset(tiny_gguf, tmp_path):
    t = validate_gguf(tiny_gguf).by_name["output_norm.weight"]
    bad = _patch_tensor(tiny_gguf, tmp_path / "a.gguf", "output_norm.weight", 8, struct.pack("<Q", t.offset + 4))
    _expect(bad, "data offset", "not a multiple of the alignment 32")


def test_overlapping_tensors(tiny_gguf, tmp_path):
    bad = _patch_tensor(tiny_gguf, tmp_path / "o.gguf", "blk.0.attn_norm.weight", 8, struct.pack("<Q", 0))
    _expect(bad, "overlap")


def test_tensors_must_be_packed_in_order(tiny_gguf, tmp_path):
    last = validate_gguf(tiny_gguf).tensors[-1]
    blob = bytearray(tiny_gguf.read_bytes()) + bytes(64)  # room for the last tensor to move 64 bytes on
    start, size = _tensor_field_at(tiny_gguf, last.name)
    blob[start + size - 8:start + size] = struct.pack("<Q", last.offset + 64)
    (tmp_path / "p.gguf").write_bytes(bytes(blob))
    _expect(tmp_path / "p.gguf", "packed in file order")


def test_bad_dims(tiny_gguf, tmp_path):
    start, _ = _tensor_field_at(tiny_gguf, "token_embd.weight")
    n_dims_at = start + 8 + len("token_embd.weight")
    _expect(_patched(tiny_gguf, tmp_path / "d.gguf", n_dims_at, struct.pack("<I", 5)), "has 5 dimensions")
    _expect(_patched(tiny_gguf, tmp_path / "z.gguf", n_dims_at + 4, struct.pack("<Q", 0)), "empty dimension")
    _expect(_patched(tiny_gguf, tmp_path / "b.gguf", n_dims_at + 4, struct.pack("<Q", 2**62)), "overflows int64")


def test_row_not_multiple_of_block(tiny_gguf, tmp_path):
    start, _ = _tensor_field_at(tiny_gguf, "blk.3.ffn_down.weight")
    at = start + 8 + len("blk.3.ffn_down.weight") + 4
    _expect(_patched(tiny_gguf, tmp_path / "q.gguf", at, struct.pack("<Q", 100)), "Q8_0 (blocks of 32)",
            "100 elements")


def test_duplicate_tensor_name(tiny_gguf, tmp_path):
    start, _ = _tensor_field_at(tiny_gguf, "blk.0.attn_k.weight")
    _expect(_patched(tiny_gguf, tmp_path / "d.gguf", start + 8, b"blk.0.attn_q.weight"),
            "duplicate tensor name 'blk.0.attn_q.weight'")


def test_tensor_name_too_long(build):
    def long_name(s: Spec) -> None:
        s.arch = None
        s.kv = {}
        s.tensors = {"x" * 70: (np.ones(4, np.float32), None)}

    _expect(build(long_name), "70 bytes", "at most 63", arch=None)


# -- cohere2 rules -----------------------------------------------------------------------------


def _drop_key(key: str) -> Callable[[Spec], None]:
    return lambda s: s.kv.pop(key)


def _set_key(key: str, value: Any, vtype: V = V.UINT32, sub_type: V | None = None) -> Callable[[Spec], None]:
    return lambda s: s.kv.__setitem__(key, (value, vtype, sub_type))


def test_wrong_architecture(build):
    def llama(s: Spec) -> None:
        s.arch = "llama"

    _expect(build(llama), "architecture is 'llama', expected 'cohere2'")


@pytest.mark.parametrize("key", ["cohere2.context_length", "cohere2.embedding_length", "cohere2.block_count",
                                 "cohere2.attention.sliding_window", "cohere2.attention.layer_norm_epsilon",
                                 "cohere2.logit_scale", "cohere2.feed_forward_length", "cohere2.attention.head_count",
                                 "tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.merges"])
def test_missing_required_key(build, key):
    _expect(build(_drop_key(key)), f"missing required key '{key}'")


@pytest.mark.parametrize("key", ["cohere2.rope.freq_base", "tokenizer.ggml.token_type",
                                 "tokenizer.ggml.bos_token_id", "general.name"])
def test_optional_keys_may_be_absent(build, key):
    validate_gguf(build(_drop_key(key)))


def test_missing_head_count_kv_defaults_to_head_count(build):
    def mha(s: Spec) -> None:
        s.kv.pop("cohere2.attention.head_count_kv")
        for i in range(N_LAYER):
            for kind in ("attn_k", "attn_v"):
                s.tensors[f"blk.{i}.{kind}.weight"] = (np.zeros((N_EMBD, N_EMBD), np.float16), None)

    validate_gguf(build(mha))


@pytest.mark.parametrize("edit, message", [
    (_set_key("cohere2.attention.sliding_window", 7, V.INT32), "is INT32, expected UINT32"),
    (_set_key("cohere2.logit_scale", 1, V.UINT32), "is UINT32, expected FLOAT32"),
    (_set_key("cohere2.attention.head_count_kv", 3), "head_count 4 is not divisible by head_count_kv 3"),
    (_set_key("cohere2.attention.head_count", 6), "embedding_length 64 is not divisible by attention.head_count 6"),
    (_set_key("cohere2.attention.sliding_window", 0), "sliding_window is 0, expected at least 1"),
    (_set_key("cohere2.context_length", 0), "context_length is 0"),
    (_set_key("cohere2.block_count", 0), "block_count is 0, expected between 1 and 512"),
    (_set_key("cohere2.block_count", 100000), "block_count is 100000"),
    (_set_key("cohere2.feed_forward_length", [N_FF] * 3, V.ARRAY, V.UINT32), "array of 3 UINT32"),
    (_set_key("cohere2.attention.layer_norm_epsilon", float("nan"), V.FLOAT32), "layer_norm_epsilon is nan"),
    (_set_key("cohere2.attention.key_length", 8), "key_length 8 differs from value_length 16"),
    (_set_key("cohere2.rope.dimension_count", 15), "rope.dimension_count is 15"),
    (_set_key("cohere2.rope.dimension_count", 32), "at most the head size 16"),
    (_set_key("cohere2.vocab_size", 256000), "vocab_size is 256000 but the tokenizer lists 300"),
    (_set_key("tokenizer.ggml.bos_token_id", 300), "bos_token_id is 300, outside the vocabulary of 300 tokens"),
    (_set_key("tokenizer.ggml.eos_token_id", 2**31), "eos_token_id is 2147483648, outside the vocabulary"),
    (_set_key("tokenizer.ggml.token_type", [1] * 10, V.ARRAY, V.INT32), "should be 300 INT32 (one per token), got 10"),
    (_set_key("tokenizer.ggml.scores", [0] * 300, V.ARRAY, V.INT32),
     "should be 300 FLOAT32 (one per token), got 300 INT32"),
    (_set_key("tokenizer.ggml.tokens", [1, 2, 3], V.ARRAY, V.UINT32), "array of UINT32, expected strings"),
    (_set_key("tokenizer.ggml.model", 2), "tokenizer.ggml.model' is UINT32, expected STRING"),
    (_set_key("tokenizer.ggml.model", "llama", V.STRING), "tokenizer.ggml.model is 'llama', expected 'gpt2'"),
    (_set_key("cohere2.rope.scaling.type", "zzz", V.STRING), "rope.scaling.type is 'zzz', expected one of none"),
    (_set_key("cohere2.expert_count", 4), "expert_count is set, but cohere2 has no experts"),
    (_set_key("cohere2.expert_used_count", 2), "expert_used_count is set"),
    (_set_key("cohere2.nextn_predict_layers", 9), "nextn_predict_layers is set"),
    (_set_key("cohere2.attention.key_length_swa", 8), "key_length_swa is 8; cohere2 uses one head layout"),
    (_set_key("cohere2.rope.dimension_count_swa", 15), "rope.dimension_count_swa is 15"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_bad_hyperparameters(build, edit, message):
    _expect(build(edit), message)


def test_dense_keys_at_zero_are_fine(build):
    validate_gguf(build(_set_key("cohere2.expert_count", 0)))


def _tokens_with(index: int, text: str) -> Callable[[Spec], None]:
    def edit(s: Spec) -> None:
        s.kv["tokenizer.ggml.tokens"][0][index] = text

    return edit


def test_duplicate_tokens_rejected(build):
    """llama.cpp's vocab loader aborts the whole process on these."""
    _expect(build(_tokens_with(94, "]")), "token 94 of 'tokenizer.ggml.tokens' repeats an earlier token: b']'",
            arch=None)
    _expect(build(lambda s: (_tokens_with(7, "")(s), _tokens_with(9, "[EMPTY_7]")(s))), "token 9", arch=None)


def test_string_values_must_be_utf8(tiny_gguf, tmp_path):
    at = _field_at(tiny_gguf, "general.name") + 8 + len("general.name") + 4 + 8
    _expect(_patched(tiny_gguf, tmp_path / "u.gguf", at, b"\xc4("), "value of 'general.name' is not valid UTF-8")


def test_every_layer_must_span_the_embedding(build):
    edit = _set_key("cohere2.attention.head_count", [4, 4, 4, 2], V.ARRAY, V.UINT32)
    _expect(build(edit), "layer 3: cohere2.attention.head_count 2 x key_length 16 != embedding_length 64")


def test_per_layer_arrays_accepted(build):
    validate_gguf(build(_set_key("cohere2.attention.head_count_kv", [N_HEAD_KV] * N_LAYER, V.ARRAY, V.INT32)))


def test_wrong_shape_for_attn_k(build):
    path = build(lambda s: s.tensors.__setitem__("blk.1.attn_k.weight", (np.zeros((N_EMBD, N_EMBD), np.float16), None)))
    _expect(path, "tensor 'blk.1.attn_k.weight' has shape [64, 64], expected [64, 32]")


def test_wrong_embedding_rows(build):
    path = build(lambda s: s.tensors.__setitem__("token_embd.weight", (np.zeros((299, N_EMBD), np.float16), None)))
    _expect(path, "tensor 'token_embd.weight' has shape [64, 299], expected [64, 300]")


def test_missing_layer_tensor(build):
    _expect(build(lambda s: s.tensors.pop("blk.2.ffn_up.weight")), "missing tensor 'blk.2.ffn_up.weight'")


def test_missing_last_layer(build):
    def three_layers(s: Spec) -> None:
        for name in [n for n in s.tensors if n.startswith("blk.3.")]:
            s.tensors.pop(name)

    _expect(build(three_layers), "missing tensor 'blk.3.")


@pytest.mark.parametrize("name, hint", [("output.weight", "ties the output projection"),
                                        ("blk.4.attn_q.weight", ""), ("blk.0.attn_q.bias", "")])
def test_unexpected_tensors(build, name, hint):
    path = build(lambda s: s.tensors.__setitem__(name, (np.zeros((4, N_EMBD), np.float32), None)))
    _expect(path, f"unexpected tensor '{name}' for architecture cohere2", hint)


# -- tensor data -------------------------------------------------------------------------------


@pytest.mark.parametrize("name, value, dtype", [("output_norm.weight", np.nan, np.float32),
                                                ("blk.2.attn_q.weight", np.inf, np.float16)])
def test_nonfinite_data_only_when_asked(build, name, value, dtype):
    def poison(s: Spec) -> None:
        array = s.tensors[name][0].astype(dtype)
        array.flat[7] = value
        s.tensors[name] = (array, None)

    path = build(poison)
    validate_gguf(path)
    _expect(path, f"tensor '{name}'", "Inf or NaN", check_tensor_data=True)


def test_bf16_scan(build):
    def bf16_norm(s: Spec) -> None:
        bits = (np.ones(N_EMBD, np.float32).view(np.uint32) >> 16).astype(np.uint16)
        s.tensors["output_norm.weight"] = (bits, Q.BF16)

    path = build(bf16_norm)
    validate_gguf(path, check_tensor_data=True)
    blob = bytearray(path.read_bytes())
    t = validate_gguf(path).by_name["output_norm.weight"]
    at = validate_gguf(path).data_offset + t.offset + 2 * 5
    blob[at:at + 2] = struct.pack("<H", 0x7FC0)  # bf16 NaN
    path.write_bytes(bytes(blob))
    _expect(path, "BF16", "Inf or NaN", check_tensor_data=True)


# -- fuzz --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_source(stand_in_gguf) -> Path:
    """The file the fuzz mutates: the stand-in's F16 conversion, or a GGUF named by R7B_FUZZ_GGUF."""
    override = os.environ.get("R7B_FUZZ_GGUF")
    return Path(override) if override else stand_in_gguf("f16")


def _integer_fields(path: Path) -> list[tuple[int, int]]:
    """(offset, width) of every length, count, type and offset field, from gguf-py's reading."""
    reader = gguf.GGUFReader(path)
    fields = list(reader.fields.values()) + [t.field for t in reader.tensors]
    found = []
    for f in fields:
        at = f.offset
        for part in f.parts:
            if part.size == 1 and part.dtype.kind in "iu" and part.nbytes in (4, 8):
                found.append((at, part.nbytes))
            at += part.nbytes
    return found


@dataclass
class FuzzOutcome:
    tried: int = 0
    rejected: int = 0
    accepted: list[Path] = field(default_factory=list)  # header mutants first, then data-only ones
    surprises: list[str] = field(default_factory=list)
    slowest: float = 0.0
    seconds: float = 0.0


class Mutator:
    """Seeded damage to a GGUF: bit flips, hostile integers in length/count fields, inserted and
    deleted bytes, random overwrites and truncation, aimed mostly at the header."""

    def __init__(self, source: Path, seed: int) -> None:
        self.blob = source.read_bytes()
        self.header = validate_gguf(source, arch=None).data_offset
        self.fields = _integer_fields(source)
        self.rng = random.Random(seed)

    def _spot(self, b: bytearray) -> int:
        limit = min(self.header, len(b)) if self.rng.random() < 0.85 else len(b)
        return self.rng.randrange(max(limit, 1))

    def flip(self, b: bytearray) -> str:
        for _ in range(self.rng.randint(1, 4) if b else 0):
            b[self._spot(b)] ^= 1 << self.rng.randrange(8)
        return "flip"

    def field(self, b: bytearray) -> str:
        at, width = self.rng.choice(self.fields)
        old = int.from_bytes(b[at:at + width], "little")
        top = (1 << (8 * width)) - 1
        value = self.rng.choice([0, 1, top, top >> 1, 1 << (8 * width - 1), 2**31, 2**32 - 1, len(b), old + 1,
                                 max(old - 1, 0), old * 2, self.rng.getrandbits(8 * width)]) & top
        b[at:at + width] = value.to_bytes(width, "little")
        return f"field@{at}={value}"

    def insert(self, b: bytearray) -> str:
        at = self._spot(b)
        b[at:at] = self.rng.randbytes(self.rng.randint(1, 16))
        return f"insert@{at}"

    def delete(self, b: bytearray) -> str:
        at = self._spot(b)
        del b[at:at + self.rng.randint(1, 16)]
        return f"delete@{at}"

    def overwrite(self, b: bytearray) -> str:
        at, n = self._spot(b), self.rng.randint(1, 32)
        b[at:at + n] = self.rng.randbytes(max(min(n, len(b) - at), 0))
        return f"overwrite@{at}"

    def truncate(self, b: bytearray) -> str:
        del b[self._spot(b):]
        return "truncate"

    def touches_header(self, blob: bytes) -> bool:
        n = min(self.header, len(blob))
        return blob[:n] != self.blob[:n] or len(blob) < self.header

    def mutant(self) -> tuple[bytes, str]:
        b = bytearray(self.blob)
        ops = [self.flip, self.field, self.field, self.insert, self.delete, self.overwrite, self.truncate]
        labels = [self.rng.choice(ops)(b) for _ in range(self.rng.choice([1, 1, 1, 2, 3]))]
        return bytes(b), "+".join(labels)


@pytest.fixture(scope="module")
def fuzz_outcome(fuzz_source, tmp_path_factory, security_tally) -> FuzzOutcome:
    folder = tmp_path_factory.mktemp("fuzz")
    mutator, outcome = Mutator(fuzz_source, FUZZ_SEED), FuzzOutcome()
    data_only: list[Path] = []
    start = time.perf_counter()
    for case in range(FUZZ_CASES):
        blob, label = mutator.mutant()
        path = folder / f"case{case}.gguf"
        path.write_bytes(blob)
        t0 = time.perf_counter()
        try:
            validate_gguf(path, check_tensor_data=True)
        except GGUFError:
            outcome.rejected += 1
            path.unlink()
        except Exception as e:  # the property under test: nothing but GGUFError escapes
            outcome.surprises.append(f"case {case} ({label}): {type(e).__name__}: {e}")
        else:
            (outcome.accepted if mutator.touches_header(blob) else data_only).append(path)
        outcome.slowest = max(outcome.slowest, time.perf_counter() - t0)
        outcome.tried += 1
    outcome.seconds = time.perf_counter() - start
    header_accepted = len(outcome.accepted)
    outcome.accepted += data_only
    line = (f"{outcome.tried} mutants of {fuzz_source.name} (seed {FUZZ_SEED}): {outcome.rejected} rejected, "
            f"{len(outcome.accepted)} accepted ({header_accepted} with header changes), {len(outcome.surprises)} "
            f"other exceptions, {outcome.seconds:.2f} s, slowest {outcome.slowest * 1000:.0f} ms")
    print(f"\nGGUF fuzz: {line}")
    security_tally("GGUF fuzz", line)
    return outcome


def test_fuzz_raises_only_gguf_error(fuzz_outcome):
    assert fuzz_outcome.tried == FUZZ_CASES
    assert not fuzz_outcome.surprises, "\n".join(fuzz_outcome.surprises[:10])
    assert fuzz_outcome.slowest < FUZZ_CASE_SECONDS
    assert fuzz_outcome.rejected > FUZZ_CASES // 2  # the mutations mostly land where they matter


LOADER = textwrap.dedent("""
    import sys, llama_cpp
    for path in sys.argv[1:]:
        print(path, flush=True)
        try:
            model = llama_cpp.Llama(model_path=path, vocab_only=False, n_ctx=64, n_threads=1, verbose=False)
            model.eval([0, 1, 2, 3])
            model.close()
        except Exception:
            pass
""")


def test_accepted_mutants_do_not_kill_llama_cpp(fuzz_outcome):
    """What the validator lets through must at worst make llama.cpp refuse, never die by a signal."""
    pytest.importorskip("llama_cpp")
    if not fuzz_outcome.accepted:
        pytest.skip("no mutant was accepted")
    picks = fuzz_outcome.accepted[:LLAMA_LOADS]
    proc = subprocess.run([sys.executable, "-c", LOADER, *map(str, picks)], capture_output=True, text=True,
                          timeout=120)
    last = proc.stdout.strip().splitlines()[-1:] or ["(none)"]
    assert proc.returncode >= 0, f"llama.cpp died by signal {-proc.returncode} loading {last[0]}"
    assert proc.returncode == 0, proc.stderr[-2000:]

"""What a GGUF must hold before llama.cpp may load it: architecture, tokenizer and cohere2 rules.

llama.cpp's model code aborts the whole process on some inconsistent hyperparameters (an odd or
oversized `rope.dimension_count` trips a GGML_ASSERT in the first forward pass, for one), so every
GGUF the project loads goes through `validate_gguf` first. The cohere2 rules follow llama.cpp's
cohere2 loader; tensor shapes come from `r7b.cohere2`, the one description of the model.
"""

from __future__ import annotations

import math
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable

from gguf import MODEL_ARCH, MODEL_TENSOR, MODEL_TENSORS, TENSOR_NAMES, GGUFValueType, RopeScalingType

from r7b import cohere2
from r7b.gguf_reader import (INTEGER_TYPES, MAX_DIMS, MAX_VOCAB, TOKENS_KEY, GGUFError, GGUFFile, Invalid,
                             read_gguf, show)

MAX_LAYERS = 512  # LLAMA_MAX_LAYERS: llama.cpp asserts block_count is within it
_V = GGUFValueType

# Expected shape of a tensor kind in a given layer; None for kinds without a rule.
_ShapeRule = Callable[[MODEL_TENSOR, int], "tuple[int, ...] | None"]


def validate_gguf(path: str | Path, *, arch: str | None = cohere2.ARCH, check_tensor_data: bool = False) -> GGUFFile:
    """Read `path` and check it, or raise GGUFError naming the first problem.

    arch=None checks the container only (any architecture, imatrix files included); a name also
    checks that the file declares it, and for cohere2 its hyperparameters, tokenizer and tensor
    shapes. check_tensor_data: see `read_gguf`.
    """
    gf = read_gguf(path, check_tensor_data=check_tensor_data)
    try:
        _check_architecture(gf, arch)
    except Invalid as e:
        raise GGUFError(f"{gf.path}: {e}") from None
    return gf


def _check_architecture(s: GGUFFile, arch: str | None) -> None:
    if arch is not None and s.architecture is None:
        raise Invalid("missing required key 'general.architecture'")
    if arch is not None and s.architecture != arch:
        raise Invalid(f"architecture is {show(s.architecture)}, expected {show(arch)}")
    _check_special_tokens(s)
    check = _ARCH_CHECKS.get(arch) if arch is not None else None
    if check is not None:
        check(s)


def _get(s: GGUFFile, key: str, types: tuple[GGUFValueType, ...], *, required: bool = True) -> Any:
    if key not in s.metadata:
        if required:
            raise Invalid(f"missing required key {show(key)}")
        return None
    vtype = s.value_types[key]
    if vtype not in types:
        expected = " or ".join(t.name for t in types)
        raise Invalid(f"key {show(key)} is {vtype.name}, expected {expected}")
    return s.metadata[key]


def _count(s: GGUFFile, key: str, *, lo: int = 1, hi: int | None = None, required: bool = True) -> int | None:
    value = _get(s, key, (_V.UINT32,), required=required)
    if value is not None and (value < lo or (hi is not None and value > hi)):
        bound = f"at least {lo}" if hi is None else f"between {lo} and {hi}"
        raise Invalid(f"{key} is {value}, expected {bound}")
    return value


def _real(s: GGUFFile, key: str, *, positive: bool, required: bool = True) -> float | None:
    value = _get(s, key, (_V.FLOAT32,), required=required)
    if value is not None and (not math.isfinite(value) or (positive and value <= 0)):
        raise Invalid(f"{key} is {value}, expected a finite{' positive' if positive else ''} number")
    return value


def _per_layer(s: GGUFFile, key: str, n_layer: int, *, default: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """A count given once or per layer (llama.cpp's get_key_or_arr), each value at least 1."""
    if key in s.metadata and s.value_types[key] == _V.ARRAY:
        info = s.arrays[key]
        if info.type not in (_V.UINT32, _V.INT32) or info.count != n_layer:
            raise Invalid(f"{key} is an array of {info.count} {info.type.name}; expected {n_layer} UINT32 "
                           "(one per layer) or a single UINT32")
        values = tuple(s.metadata[key])
    elif key in s.metadata or default is None:
        values = (_count(s, key),) * n_layer
    else:
        values = default
    if min(values) < 1:
        raise Invalid(f"{key} holds {min(values)}, expected at least 1")
    return values


def _check_special_tokens(s: GGUFFile) -> None:
    """Token ids llama.cpp looks up in the vocabulary must name a token."""
    tokens = s.arrays.get(TOKENS_KEY)
    n_vocab = tokens.count if tokens is not None and tokens.type == _V.STRING else None
    for key, value in s.metadata.items():
        if not (key.startswith("tokenizer.ggml.") and key.endswith("_token_id")):
            continue
        if s.value_types[key] not in INTEGER_TYPES:
            raise Invalid(f"key {show(key)} is {s.value_types[key].name}, expected an integer token id")
        if n_vocab is not None and not 0 <= value < n_vocab:
            raise Invalid(f"{key} is {value}, outside the vocabulary of {n_vocab} tokens")


def _check_tokenizer(s: GGUFFile, model: str | None = None) -> int:
    """llama.cpp's vocab loader: a model name, a string token list, same-length side arrays."""
    found = _get(s, "tokenizer.ggml.model", (_V.STRING,))
    if model is not None and found != model:
        raise Invalid(f"tokenizer.ggml.model is {show(found)}, expected {show(model)}")
    n_vocab = _string_array(s, TOKENS_KEY, required=True)
    if not 1 <= n_vocab <= MAX_VOCAB:
        raise Invalid(f"vocabulary has {n_vocab} tokens, expected 1 to {MAX_VOCAB}")
    for key, etype in (("tokenizer.ggml.token_type", _V.INT32), ("tokenizer.ggml.scores", _V.FLOAT32)):
        info = s.arrays.get(key)
        if key in s.metadata and (info is None or info.type != etype or info.count != n_vocab):
            got = f"{info.count} {info.type.name}" if info else s.value_types[key].name
            raise Invalid(f"{key} should be {n_vocab} {etype.name} (one per token), got {got}")
    _string_array(s, "tokenizer.ggml.merges", required=found == "gpt2")
    return n_vocab


def _string_array(s: GGUFFile, key: str, *, required: bool) -> int:
    if _get(s, key, (_V.ARRAY,), required=required) is None:
        return 0
    info = s.arrays[key]
    if info.type != _V.STRING:
        raise Invalid(f"{key} is an array of {info.type.name}, expected strings")
    return info.count


def _check_rope_scaling(s: GGUFFile, key: str) -> None:
    """llama.cpp asserts (aborting the process) on a scaling type it does not know."""
    value = _get(s, key, (_V.STRING,), required=False)
    known = [t.value for t in RopeScalingType]
    if value is not None and value not in known:
        raise Invalid(f"{key} is {show(value)}, expected one of {', '.join(known)}")


@dataclass(frozen=True)
class _Cohere2Dims:
    n_embd: int
    n_vocab: int
    n_layer: int
    n_ff: tuple[int, ...]
    n_head: tuple[int, ...]
    n_head_kv: tuple[int, ...]
    head_dim: int


_C2 = cohere2.ARCH + "."
# Keys of features cohere2 does not have; llama.cpp asserts on some non-zero values of them.
_COHERE2_ABSENT = ("expert_count", "expert_used_count", "expert_group_count", "expert_group_used_count",
                   "nextn_predict_layers")


def _check_cohere2(s: GGUFFile) -> None:
    dims = _cohere2_dims(s)
    _check_tensor_shapes(s, _cohere2_shapes(dims), MODEL_ARCH.COHERE2, dims.n_layer)


def _cohere2_dims(s: GGUFFile) -> _Cohere2Dims:
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
        raise Invalid(f"{_C2}vocab_size is {vocab_size} but the tokenizer lists {n_vocab} tokens")
    return _Cohere2Dims(n_embd, n_vocab, n_layer, n_ff, n_head, n_head_kv, head_dim)


def _check_dense(s: GGUFFile) -> None:
    for name in _COHERE2_ABSENT:
        key = _C2 + name
        if key in s.metadata and (s.value_types[key] != _V.UINT32 or s.metadata[key] != 0):
            raise Invalid(f"{key} is set, but cohere2 has no experts or extra prediction layers")


def _cohere2_heads(s: GGUFFile, n_layer: int, n_embd: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    n_head = _per_layer(s, _C2 + "attention.head_count", n_layer)
    n_head_kv = _per_layer(s, _C2 + "attention.head_count_kv", n_layer, default=n_head)
    for il, (h, kv) in enumerate(zip(n_head, n_head_kv)):
        if h % kv:
            raise Invalid(f"layer {il}: {_C2}attention.head_count {h} is not divisible by head_count_kv {kv}")
        if n_embd % h:
            raise Invalid(f"layer {il}: {_C2}embedding_length {n_embd} is not divisible by attention.head_count {h}")
    return n_head, n_head_kv


def _cohere2_head_dim(s: GGUFFile, n_embd: int, n_head: tuple[int, ...]) -> int:
    """One head size and rotary width for every layer, as the cohere2 graph and ggml's rope assert.

    llama.cpp's cohere2 loader sizes attn_q and attn_output as [n_embd, n_embd], so every layer's
    heads must span exactly the embedding.
    """
    head_dim = _count(s, _C2 + "attention.key_length", required=False) or n_embd // n_head[0]
    value_dim = _count(s, _C2 + "attention.value_length", required=False) or n_embd // n_head[0]
    if value_dim != head_dim:
        raise Invalid(f"{_C2}attention.key_length {head_dim} differs from value_length {value_dim}; "
                       "llama.cpp needs them equal")
    for il, h in enumerate(n_head):
        if h * head_dim != n_embd:
            raise Invalid(f"layer {il}: {_C2}attention.head_count {h} x key_length {head_dim} "
                           f"!= embedding_length {n_embd}")
    n_rot = _count(s, _C2 + "rope.dimension_count", required=False) or head_dim
    if n_rot > head_dim or n_rot % 2:
        raise Invalid(f"{_C2}rope.dimension_count is {n_rot}; it must be even and at most the head size {head_dim}")
    for key, want in (("attention.key_length_swa", head_dim), ("attention.value_length_swa", head_dim),
                      ("rope.dimension_count_swa", n_rot)):
        value = _count(s, _C2 + key, required=False)
        if value is not None and value != want:
            raise Invalid(f"{_C2}{key} is {value}; cohere2 uses one head layout, so it must be {want}")
    return head_dim


def _cohere2_shapes(d: _Cohere2Dims) -> _ShapeRule:
    """Expected GGUF-order shape of each cohere2 tensor kind in layer `il`, from `r7b.cohere2`'s tables."""
    outside = cohere2.global_shapes(d.n_embd, d.n_vocab)

    def shape(kind: MODEL_TENSOR, il: int) -> tuple[int, ...] | None:
        name = TENSOR_NAMES[kind]
        if "{bid}" not in name:
            return outside.get(name + ".weight")
        q, kv = d.n_head[il] * d.head_dim, d.n_head_kv[il] * d.head_dim
        return cohere2.block_shapes(d.n_embd, q, kv, d.n_ff[il]).get(name.rsplit(".", 1)[1])

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


def _check_tensor_shapes(s: GGUFFile, shape: _ShapeRule, arch: MODEL_ARCH, n_layer: int) -> None:
    expected = _expected_tensors(arch, n_layer, shape)
    arch_name = s.architecture
    for t in s.tensors:
        if t.name not in expected:
            hint = " (llama.cpp ties the output projection to token_embd)" if t.name == "output.weight" else ""
            raise Invalid(f"unexpected tensor {show(t.name)} for architecture {arch_name}{hint}")
        want = expected[t.name]
        if want is not None and _padded(t.shape) != _padded(want):
            raise Invalid(f"tensor {show(t.name)} has shape {list(t.shape)}, expected {list(want)}")
    for name, want in expected.items():
        if want is not None and name not in s.by_name:
            raise Invalid(f"missing tensor {show(name)}")


def _padded(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shapes compared as ggml does: trailing dimensions of 1 are implied."""
    return tuple(shape) + (1,) * (MAX_DIMS - len(shape))


_ARCH_CHECKS: dict[str, Callable[[GGUFFile], None]] = {"cohere2": _check_cohere2}


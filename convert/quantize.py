"""Quantize a Command R7B GGUF with llama.cpp's own quantizer (`r7b quantize`).

The work is done in-process by `llama_model_quantize` from llama-cpp-python's C API, exactly as
llama-quantize does it; this module checks the input first (llama.cpp can abort the process on
some malformed files), maps names to llama.cpp's parameters, turns its per-tensor log into a
progress bar, and writes the result atomically.

Types: Q8_0, Q6_K, Q5_K_M, Q5_K_S, Q4_K_M, Q4_K_S, Q4_0, IQ4_XS, and the project's recipe
Q4_K_R7B. For every type the tied token embedding, which is also the output projection, stays at
Q6_K or better, as llama.cpp does for tied embeddings: on the stand-in a Q4_K embedding triples
the KL divergence of a Q4_K_M file. llama.cpp does not require an importance matrix for any of
these types; for IQ4_XS and Q4_K_R7B a note suggests one.

Q4_K_R7B spends Q4_K_M's bit budget where the KL divergence from F16 says it matters.
Quantizing one tensor family, or one layer, at a time on the stand-in showed that the FFN of the
first layer is several times more sensitive than that of any other, and that attn_v and ffn_down
lose less at Q5_K everywhere than at Q4_K_M's Q6_K in about half the layers and Q4_K in the rest,
for the same bytes. For n layers:

  ffn_gate, ffn_up, ffn_down of layers < max(1, n/8)       Q5_K
  ffn_down of layers < n/2 and of the last n/8 layers       Q5_K   (others Q4_K)
  attn_v                                                    Q5_K
  attn_q, attn_k, attn_output, the other ffn matrices       Q4_K
  token_embd (tied output)                                  Q6_K

It is no larger than Q4_K_M (about 35 MiB smaller for Command R7B) and, with or without an
importance matrix, has a clearly lower KL divergence on held-out text. Files record it as
`r7b.quantize.recipe`; their `general.file_type` is Q4_K_M's.

`r7b quantize --list [IN.gguf]` prints, for each type, the bits per weight, file size and RAM
needed at 4K/32K/128K tokens of context with the small sliding-window KV cache, for the given
file or for the real Command R7B.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import gguf
import numpy as np

from r7b.cohere2 import ARCH, COMMAND_R7B, Cohere2Dims
from r7b.errors import R7BError
from r7b.fsutil import atomic_output, check_free_space, check_output_path
from r7b.gguf_reader import GGUFError, GGUFFile, TensorRecord
from r7b.gguf_validate import validate_gguf
from r7b.llama import LlamaLog
from r7b.memory import RUNTIME_OVERHEAD, estimate_ram, format_bytes, repacked_bytes, tensor_bytes

from .imatrix_file import read_imatrix

GT = gguf.GGMLQuantizationType
FT = gguf.LlamaFileType
UNQUANTIZED = (GT.F32, GT.F16, GT.BF16)
OVERRIDE_TYPES = (GT.F32, GT.F16, GT.BF16, GT.Q8_0, GT.Q6_K, GT.Q5_K, GT.Q5_1, GT.Q5_0, GT.Q4_K, GT.Q4_1,
                  GT.Q4_0, GT.IQ4_XS, GT.IQ4_NL, GT.Q3_K)
RECIPE_KEY = "r7b.quantize.recipe"
IMATRIX_KEYS = ("quantize.imatrix.file", "quantize.imatrix.dataset", "quantize.imatrix.entries_count",
                "quantize.imatrix.chunks_count")
LIST_CONTEXTS = (4096, 32768, 131072)
R7B_METADATA_BYTES = 12 * 1024**2  # vocabulary, merges and templates of the real model


def _layers(indices: Iterable[int]) -> str:
    return "|".join(str(i) for i in indices)


def r7b_recipe(n_layers: int) -> list[tuple[str, str]]:
    """Q4_K_R7B's per-tensor types as (regex, type) pairs; the first match wins."""
    head = range(max(1, n_layers // 8))
    down = [i for i in range(n_layers) if i < n_layers // 2 or i >= n_layers - n_layers // 8]
    return [
        (rf"^blk\.({_layers(head)})\.ffn_(gate|up|down)\.weight$", "Q5_K"),
        (rf"^blk\.({_layers(down)})\.ffn_down\.weight$", "Q5_K"),
        (r"ffn_down\.weight$", "Q4_K"),
        (r"attn_v\.weight$", "Q5_K"),
    ]


@dataclass(frozen=True)
class QuantType:
    """A `--type` name: llama.cpp's file type, plus per-tensor choices for a recipe."""

    name: str
    ftype: FT
    base: GT
    summary: str
    recipe: Callable[[int], list[tuple[str, str]]] | None = None

    @property
    def is_recipe(self) -> bool:
        return self.recipe is not None

    def overrides(self, n_layers: int) -> list[tuple[str, GT]]:
        return [(p, GT[q]) for p, q in self.recipe(n_layers)] if self.recipe else []


RECIPE = QuantType("Q4_K_R7B", FT.MOSTLY_Q4_K_M, GT.Q4_K, "Q4_K_M size, lower KLD; best with an imatrix",
                   recipe=r7b_recipe)
QUANT_TYPES: dict[str, QuantType] = {q.name: q for q in (
    QuantType("Q8_0", FT.MOSTLY_Q8_0, GT.Q8_0, "near-lossless"),
    QuantType("Q6_K", FT.MOSTLY_Q6_K, GT.Q6_K, "very close to F16"),
    QuantType("Q5_K_M", FT.MOSTLY_Q5_K_M, GT.Q5_K, "attn_v and ffn_down partly Q6_K"),
    QuantType("Q5_K_S", FT.MOSTLY_Q5_K_S, GT.Q5_K, "all matrices Q5_K"),
    QuantType("Q4_K_M", FT.MOSTLY_Q4_K_M, GT.Q4_K, "the usual choice; attn_v and ffn_down partly Q6_K"),
    QuantType("Q4_K_S", FT.MOSTLY_Q4_K_S, GT.Q4_K, "smaller Q4_K mix"),
    QuantType("Q4_0", FT.MOSTLY_Q4_0, GT.Q4_0, "fast on ARM (repacked at load)"),
    QuantType("IQ4_XS", FT.MOSTLY_IQ4_XS, GT.IQ4_XS, "non-linear 4-bit; best with an imatrix"),
    RECIPE,
)}


# -- the input file -----------------------------------------------------------------------------

def read_model(path: str | Path, *, allow_quantized: bool = False) -> GGUFFile:
    """Validate a cohere2 GGUF's header and layout; every problem is one R7BError line."""
    p = Path(path)
    if not p.is_file():
        raise R7BError(f"no such file: {p}")
    try:
        model = validate_gguf(p, arch=ARCH)
    except GGUFError:
        _explain_not_cohere2(p)
        raise
    quantized = [t for t in model.tensors if t.type not in UNQUANTIZED]
    if quantized and not allow_quantized:
        kinds = sorted({t.type.name for t in quantized})
        raise R7BError(f"{p} is already quantized ({', '.join(kinds)}); quantize from the F16/BF16 GGUF, "
                       "or pass --allow-requantize to accept the extra loss")
    return model


def model_dims(model: GGUFFile) -> Cohere2Dims:
    try:
        return Cohere2Dims.from_gguf_metadata(model.metadata, name=model.path.name)
    except (TypeError, ValueError) as exc:
        raise R7BError(f"{model.path}: {exc}") from None


def _explain_not_cohere2(p: Path) -> None:
    """A clearer message than the validator's for the usual mix-ups; returns if there is none."""
    try:
        summary = validate_gguf(p, arch=None)
    except GGUFError:
        return
    if summary.metadata.get("general.type") == "imatrix":
        raise R7BError(f"{p} is an importance matrix, not a model")
    if summary.architecture != ARCH:
        raise R7BError(f"{p} is a {summary.architecture or 'model of unknown architecture'} GGUF; "
                       f"expected {ARCH} (Command R7B)")


# -- which type each tensor gets ----------------------------------------------------------------

def parse_type(name: str) -> GT:
    """A ggml type for --override / --token-embedding-type, e.g. 'q8_0' or 'Q6_K'."""
    try:
        qtype = GT[name.strip().upper()]
    except KeyError:
        qtype = None
    if qtype not in OVERRIDE_TYPES:
        raise R7BError(f"unknown tensor type {name!r}; choose from {', '.join(t.name for t in OVERRIDE_TYPES)}")
    return qtype


def parse_overrides(overrides: Mapping[str, str] | Iterable[str] | None) -> list[tuple[str, GT]]:
    """Regex -> type pairs from a dict or from 'PATTERN=TYPE' strings; the first match wins."""
    if not overrides:
        return []
    items = overrides.items() if isinstance(overrides, Mapping) else (_split_override(s) for s in overrides)
    out = []
    for pattern, type_name in items:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise R7BError(f"bad override pattern {pattern!r}: {exc}") from None
        out.append((pattern, parse_type(type_name)))
    return out


def _split_override(spec: str) -> tuple[str, str]:
    pattern, sep, type_name = spec.rpartition("=")
    if not sep or not pattern or not type_name:
        raise R7BError(f"bad --override {spec!r}; expected PATTERN=TYPE, e.g. token_embd.weight=Q8_0")
    return pattern, type_name


def quantizable(t: TensorRecord) -> bool:
    """llama.cpp quantizes 2-D weights except norms."""
    return len(t.shape) >= 2 and t.name.endswith("weight") and "_norm.weight" not in t.name


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


@dataclass
class _Counters:
    attn_v: int = 0
    ffn_down: int = 0


def _mixture_type(qt: QuantType, t: TensorRecord, n_layers: int, n_gqa: float, has_imatrix: bool,
                  c: _Counters) -> GT:
    """llama.cpp's per-tensor choice for the k-quant mixes (llama_tensor_get_type_impl), for our types."""
    ft, new = qt.ftype, qt.base
    if t.name == "token_embd.weight":  # tied: it is also the output projection
        if t.shape[0] % gguf.GGML_QUANT_SIZES[new][0]:
            return GT.Q8_0
        return new if new == GT.Q8_0 else GT.Q6_K
    if "attn_v.weight" in t.name:
        i, c.attn_v = c.attn_v, c.attn_v + 1
        if ft == FT.MOSTLY_IQ4_XS and n_gqa >= 4:
            return GT.Q5_K
        if ft in (FT.MOSTLY_Q4_K_M, FT.MOSTLY_Q5_K_M) and _use_more_bits(i, n_layers):
            return GT.Q6_K
        if ft == FT.MOSTLY_Q4_K_S and i < 4:
            return GT.Q5_K
        return new
    if "ffn_down" in t.name:
        i, c.ffn_down = c.ffn_down, c.ffn_down + 1
        if ft == FT.MOSTLY_Q4_K_M:
            return GT.Q6_K if _use_more_bits(i, n_layers) else new
        if i < n_layers // 8 and ft == FT.MOSTLY_IQ4_XS and not has_imatrix:
            return GT.Q5_K
        if ft == FT.MOSTLY_Q5_K_M and _use_more_bits(i, n_layers):
            return GT.Q6_K
        if ft == FT.MOSTLY_Q4_K_S and i < n_layers // 8:
            return GT.Q5_K
        if ft == FT.MOSTLY_Q4_0 and has_imatrix and i < n_layers // 8:
            return GT.Q4_1
    return new


_FALLBACK = {GT.IQ4_XS: GT.IQ4_NL, GT.Q3_K: GT.Q4_0, GT.Q4_K: GT.Q5_0, GT.Q5_K: GT.Q5_1, GT.Q6_K: GT.Q8_0}


def _fallback(t: TensorRecord, qtype: GT) -> GT:
    """Rows that do not split into whole blocks get a type with smaller blocks, as in llama.cpp."""
    if t.shape[0] % gguf.GGML_QUANT_SIZES[qtype][0] == 0:
        return qtype
    qtype = _FALLBACK.get(qtype, GT.F16)
    return qtype if t.shape[0] % gguf.GGML_QUANT_SIZES[qtype][0] == 0 else GT.F16


def plan_types(tensors: Iterable[TensorRecord], qt: QuantType, *, n_layers: int, n_gqa: float,
               overrides: Iterable[tuple[str, GT]] = (), token_embedding_type: GT | None = None,
               has_imatrix: bool = False) -> dict[str, GT]:
    """The type llama.cpp will give each tensor (llama_tensor_get_type), for size estimates."""
    patterns = [(re.compile(p), q) for p, q in [*overrides, *qt.overrides(n_layers)]]
    counters, plan = _Counters(), {}
    for t in sorted(tensors, key=lambda t: (t.layer, t.name)):
        if not quantizable(t):
            plan[t.name] = t.type
            continue
        if token_embedding_type is not None and t.name == "token_embd.weight":
            plan[t.name] = token_embedding_type
            continue
        manual = next((q for p, q in patterns if p.search(t.name)), None)
        new = manual or _mixture_type(qt, t, n_layers, n_gqa, has_imatrix, counters)
        plan[t.name] = _fallback(t, new)
    return plan


def planned_bytes(tensors: Iterable[TensorRecord], plan: Mapping[str, GT], metadata_bytes: int) -> int:
    align = gguf.GGUF_DEFAULT_ALIGNMENT
    return metadata_bytes + sum(-(-tensor_bytes(t.shape, plan[t.name]) // align) * align for t in tensors)


def _check_overrides(model: GGUFFile, overrides: list[tuple[str, GT]]) -> None:
    weights = [t.name for t in model.tensors if quantizable(t)]
    for pattern, _ in overrides:
        if not any(re.search(pattern, name) for name in weights):
            raise R7BError(f"override pattern {pattern!r} matches no tensor (names look like blk.0.ffn_down.weight)")


# -- importance matrix ---------------------------------------------------------------------------

@dataclass
class _ImatrixInput:
    path: Path
    values: dict[str, np.ndarray]
    dataset: str | None
    chunks: int


def _imatrix_for(model: GGUFFile, path: str | Path) -> _ImatrixInput:
    """Load an imatrix and make sure it was made for this model before llama.cpp sees it."""
    imx = read_imatrix(path)
    values = imx.means()
    by_name = {t.name: t for t in model.tensors}
    unknown = [n for n in values if n not in by_name]
    if unknown:
        raise R7BError(f"imatrix {path} does not match {model.path.name}: it has {unknown[0]!r}, "
                       f"which the model lacks ({len(unknown)} such entries)")
    for name, v in values.items():
        cols = by_name[name].shape[0]
        if v.size != cols:
            raise R7BError(f"imatrix {path} does not match {model.path.name}: {name} has {v.size} columns "
                           f"in the imatrix and {cols} in the model")
        if not np.isfinite(v).all():
            raise R7BError(f"imatrix {path} holds non-finite values for {name}")
    return _ImatrixInput(Path(path), values, imx.datasets[0] if imx.datasets else None, imx.chunk_count)


# -- llama.cpp parameters ------------------------------------------------------------------------

@dataclass
class _CParams:
    """llama_model_quantize_params plus the C arrays it points to, kept alive together."""

    params: Any
    keep: list = field(default_factory=list)

    def pin(self, array: Any, ctype: Any) -> Any:
        """A pointer to a NULL-terminated C array that lives as long as these params."""
        self.keep.append(array)
        return ctypes.cast(array, ctypes.POINTER(ctype))


# Rows llama.cpp converts at once. Its default (8 GiB) holds all of R7B's 256,000 x 4096 embedding
# as float32 plus its quantized copy: 5 GiB of anonymous memory for one tensor. Slabs give the same
# bytes (each row is quantized alone) in bounded memory.
SLAB_BYTES = 256 * 1024**2


def _c_params(qt: QuantType, threads: int | None, allow_requantize: bool, overrides: list[tuple[str, GT]],
              embd_type: GT | None, imx: _ImatrixInput | None, kv: dict[str, str | int]) -> _CParams:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = threads or 0
    params.ftype = int(qt.ftype)
    params.allow_requantize = allow_requantize
    params.max_buf_size = SLAB_BYTES
    if embd_type is not None:
        params.token_embedding_type = int(embd_type)
    out = _CParams(params)
    if overrides:
        arr = (llama_cpp.llama_model_tensor_override * (len(overrides) + 1))()
        for slot, (pattern, qtype) in zip(arr, overrides):
            slot.pattern, slot.type = pattern.encode(), int(qtype)
        params.tt_overrides = out.pin(arr, llama_cpp.llama_model_tensor_override)
    if imx is not None:
        arr = (llama_cpp.llama_model_imatrix_data * (len(imx.values) + 1))()
        for slot, (name, values) in zip(arr, imx.values.items()):
            data = np.ascontiguousarray(values, dtype=np.float32)
            out.keep.append(data)
            slot.name = name.encode()
            slot.data = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            slot.size = data.size
        params.imatrix = out.pin(arr, llama_cpp.llama_model_imatrix_data)
    if kv:
        arr = (llama_cpp.llama_model_kv_override * (len(kv) + 1))()
        for slot, (key, value) in zip(arr, kv.items()):
            slot.key = key.encode()[:127]
            if isinstance(value, int):
                slot.tag, slot.value.val_i64 = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT, value
            else:
                slot.tag, slot.value.val_str = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR, _c_string(value)
        params.kv_overrides = out.pin(arr, llama_cpp.llama_model_kv_override)
    return out


def _c_string(text: str, size: int = 128) -> bytes:
    """UTF-8 that fits a char[size] with its NUL, cut on a character boundary."""
    return text.encode()[:size - 1].decode("utf-8", "ignore").encode()


def _metadata(qt: QuantType, imx: _ImatrixInput | None) -> dict[str, str | int]:
    kv: dict[str, str | int] = {}
    if imx is not None:
        kv[IMATRIX_KEYS[0]] = str(imx.path)
        if imx.dataset:
            kv[IMATRIX_KEYS[1]] = imx.dataset
        kv[IMATRIX_KEYS[2]] = len(imx.values)
        if imx.chunks > 0:
            kv[IMATRIX_KEYS[3]] = imx.chunks
    if qt.is_recipe:
        kv[RECIPE_KEY] = qt.name
    return kv


# -- the command ----------------------------------------------------------------------------------

def quant_type(name: str) -> QuantType:
    qt = QUANT_TYPES.get(name.strip().upper())
    if qt is None:
        raise R7BError(f"unknown quantization type {name!r}; choose from {', '.join(QUANT_TYPES)}")
    return qt


def quantize(src: str | Path, dst: str | Path, qtype: str, *, imatrix: str | Path | None = None,
             threads: int | None = None, overrides: Mapping[str, str] | Iterable[str] | None = None,
             token_embedding_type: str | None = None, allow_requantize: bool = False, force: bool = False,
             progress: bool = True) -> Path:
    """Quantize the cohere2 GGUF `src` to `dst` as `qtype`; returns the path written."""
    qt = quant_type(qtype)
    tt = parse_overrides(overrides)
    embd = parse_type(token_embedding_type) if token_embedding_type else None
    if threads is not None and threads < 1:
        raise R7BError("--threads must be at least 1")
    out = check_output_path(dst, force=force)
    if Path(src).exists() and out.exists() and out.resolve() == Path(src).resolve():
        raise R7BError("the output file is the input file")
    model = read_model(src, allow_quantized=allow_requantize)
    _check_overrides(model, tt)
    imx = _imatrix_for(model, imatrix) if imatrix is not None else None
    if imx is None and progress and (qt.base == GT.IQ4_XS or qt.is_recipe):
        print(f"note: {qt.name} without an importance matrix; one usually lowers the loss (see `r7b imatrix`)",
              file=sys.stderr)
    recipe = qt.overrides(model_dims(model).n_layers)
    kv = _metadata(qt, imx)
    check_free_space(out, output_bytes(model, qt, overrides=tt, token_embedding_type=embd,
                                       has_imatrix=imx is not None, extra_metadata=kv), f"the {qt.name} GGUF")
    cparams = _c_params(qt, threads, allow_requantize, [*tt, *recipe], embd, imx, kv)
    with atomic_output(out, force=force) as tmp, LlamaLog(progress, f"quantize {qt.name}") as log:
        _run(model.path, tmp, cparams, log)
    return out


def output_bytes(model: GGUFFile, qt: QuantType, *, overrides: Iterable[tuple[str, GT]] = (),
                 token_embedding_type: GT | None = None, has_imatrix: bool = False,
                 extra_metadata: Mapping[str, str | int] | None = None) -> int:
    """About how big `model` quantized as `qt` will be (for the free-space check)."""
    dims = model_dims(model)
    plan = plan_types(model.tensors, qt, n_layers=dims.n_layers, n_gqa=dims.n_heads / dims.n_kv_heads,
                      overrides=overrides, token_embedding_type=token_embedding_type, has_imatrix=has_imatrix)
    extra = sum(len(str(k)) + len(str(v)) + 16 for k, v in (extra_metadata or {}).items())
    return planned_bytes(model.tensors, plan, model.data_offset + extra + 4096)


class MappedPagesTrim:
    """Keeps the memory-mapped input's pages out of this process's resident set while llama.cpp
    quantizes.

    llama.cpp maps the input file (shared, read-only) and unmaps a tensor only once it is done, so
    R7B's 2 GB F16 embedding stays resident while it is converted slab by slab. Every `every`
    seconds a thread gives the mapping's pages back with MADV_DONTNEED: for a read-only file
    mapping that only drops them from this process (they stay in the page cache, and a page read
    again comes back from there), so the output is unchanged. Linux only; elsewhere it does nothing.
    """

    MADV_DONTNEED = 4

    def __init__(self, path: Path, every: float = 0.25):
        self.path, self.every = str(Path(path).resolve()), every
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.trimmed = 0  # bytes given back, summed over every pass

    def __enter__(self) -> "MappedPagesTrim":
        if sys.platform.startswith("linux") and os.path.exists("/proc/self/maps"):
            self._madvise = ctypes.CDLL(None, use_errno=True).madvise
            self._madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
            self._thread = threading.Thread(target=self._run, name="r7b-trim", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            for start, end in self._ranges():
                if self._madvise(start, end - start, self.MADV_DONTNEED) == 0:
                    self.trimmed += end - start

    def _ranges(self) -> list[tuple[int, int]]:
        """Address ranges of the input's read-only shared mappings, from /proc/self/maps."""
        out = []
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].rstrip("\n") == self.path and fields[1].startswith("r--s"):
                    start, end = (int(x, 16) for x in fields[0].split("-"))
                    out.append((start, end))
        return out


def _run(src: Path, tmp: Path, cparams: _CParams, log: LlamaLog) -> None:
    import llama_cpp

    llama_cpp.llama_backend_init()
    with MappedPagesTrim(src):
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(cparams.params))
    if rc != 0:
        raise R7BError(f"llama.cpp could not quantize {src.name}: {log.reason()}")


# -- the memory-fit table --------------------------------------------------------------------------

@dataclass(frozen=True)
class TypeEstimate:
    name: str
    bits_per_weight: float
    file_bytes: int
    ram_bytes: dict[int, int | None]  # context length -> bytes; None beyond the model's context
    repacked: int = 0  # of which the CPU backend's repacked copy of some weights, on this CPU


def estimate_types(path: str | Path | None = None, contexts: Iterable[int] = LIST_CONTEXTS,
                   kv_type: str = "f16") -> tuple[Cohere2Dims, list[TypeEstimate]]:
    """Size and RAM of every type for the model in `path`, or for the real Command R7B."""
    if path is None:
        shape = COMMAND_R7B
        tensors = [_planned(n, s) for n, s in shape.weights()]
        meta_bytes = R7B_METADATA_BYTES
    else:
        model = read_model(path, allow_quantized=True)
        shape, tensors, meta_bytes = model_dims(model), model.tensors, model.data_offset
    n_params = sum(int(np.prod(t.shape)) for t in tensors)
    rows = []
    for qt in QUANT_TYPES.values():
        plan = plan_types(tensors, qt, n_layers=shape.n_layers, n_gqa=shape.n_heads / shape.n_kv_heads)
        size = planned_bytes(tensors, plan, meta_bytes)
        weights = size - meta_bytes
        repacked = repacked_bytes(_as_planned(tensors, plan))
        ram = {n: estimate_ram(size, shape, n, kv_type=kv_type, repacked=repacked).total
               if n <= shape.context_length else None for n in contexts}
        rows.append(TypeEstimate(qt.name, 8 * weights / n_params, size, ram, repacked))
    return shape, rows


def planned_model_bytes(shape: Cohere2Dims, qt: QuantType | None, metadata_bytes: int = R7B_METADATA_BYTES) -> int:
    """About how big a model of `shape` is as `qt` (None: F16, norms F32), without a file."""
    tensors = [_planned(n, s) for n, s in shape.weights()]
    if qt is None:
        plan = {t.name: GT.F32 if len(t.shape) == 1 else GT.F16 for t in tensors}
    else:
        plan = plan_types(tensors, qt, n_layers=shape.n_layers, n_gqa=shape.n_heads / shape.n_kv_heads)
    return planned_bytes(tensors, plan, metadata_bytes)


def _as_planned(tensors: Iterable[TensorRecord], plan: Mapping[str, GT]) -> list[TensorRecord]:
    """The tensors as the quantized file will hold them."""
    return [TensorRecord(t.name, t.shape, plan[t.name], 0, tensor_bytes(t.shape, plan[t.name])) for t in tensors]


def _planned(name: str, shape: tuple[int, ...]) -> TensorRecord:
    """A tensor of the published bf16 checkpoint, for planning without a file."""
    qtype = GT.F32 if len(shape) == 1 else GT.BF16
    return TensorRecord(name, shape, qtype, 0, tensor_bytes(shape, qtype))


def format_estimates(shape: Cohere2Dims, rows: list[TypeEstimate], kv_type: str = "f16") -> str:
    contexts = list(rows[0].ram_bytes) if rows else []
    head = (f"{shape.name}: {shape.n_params / 1e9:.2f}B parameters, {shape.n_layers} layers, "
            f"sliding window {shape.sliding_window}, KV cache {kv_type} (small sliding-window cache)")
    cols = "".join(f"{'RAM @' + _ctx_label(n):>13}" for n in contexts)
    lines = [head, "", f"{'type':<10}{'bpw':>6}{'file':>12}{cols}  notes"]
    for r in rows:
        ram = "".join(f"{format_bytes(b) if b else '-':>13}" for b in r.ram_bytes.values())
        repack = f"{format_bytes(r.repacked)} repacked copy; " if r.repacked else ""
        lines.append(f"{r.name:<10}{r.bits_per_weight:>6.2f}{format_bytes(r.file_bytes):>12}{ram}  "
                     f"{repack}{QUANT_TYPES[r.name].summary}")
    lines += ["", "RAM = weights (memory-mapped, all touched) + KV cache + compute buffer (512-token batches; "
                  "without flash attention it holds the attention scores, which grow with the context) "
                  f"+ {RUNTIME_OVERHEAD // 2**20} MiB runtime,",
              "as the resident set shows it at its peak. On this CPU llama.cpp copies some weight types into a "
              "repacked layout: the",
              "file pages of those weights stay resident beside the copy until the kernel needs them back, so "
              "loading needs that much less."]
    return "\n".join(lines)


def _ctx_label(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


# -- CLI -------------------------------------------------------------------------------------------

def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("quantize", help="quantize a GGUF with llama.cpp (or --list the types)",
                              description=__doc__.splitlines()[0])
    p.add_argument("input", nargs="?", metavar="IN.gguf", help="F16/BF16/F32 cohere2 GGUF")
    p.add_argument("output", nargs="?", metavar="OUT.gguf", help="output file")
    p.add_argument("--type", dest="qtype", metavar="T", help=f"one of {', '.join(QUANT_TYPES)}")
    p.add_argument("--imatrix", metavar="FILE", help="importance matrix from `r7b imatrix` or llama-imatrix")
    p.add_argument("--threads", type=int, help="threads (default: all cores)")
    p.add_argument("--override", action="append", default=[], metavar="PATTERN=TYPE",
                   help="type for tensors whose name matches the regex, e.g. 'ffn_down=Q6_K' (repeatable)")
    p.add_argument("--token-embedding-type", metavar="T", help="type of the (tied) token embedding")
    p.add_argument("--allow-requantize", action="store_true", help="accept an already-quantized input")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.add_argument("--list", action="store_true",
                   help="show bits per weight, file size and RAM of each type, for IN.gguf or Command R7B")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    if args.list:
        if args.output:
            raise R7BError("--list takes at most one file")
        print(format_estimates(*estimate_types(args.input)))
        return 0
    if not args.input or not args.output or not args.qtype:
        raise R7BError("usage: r7b quantize IN.gguf OUT.gguf --type T (or r7b quantize --list [IN.gguf])")
    out = quantize(args.input, args.output, args.qtype, imatrix=args.imatrix, threads=args.threads,
                   overrides=args.override, token_embedding_type=args.token_embedding_type,
                   allow_requantize=args.allow_requantize, force=args.force, progress=not args.quiet)
    print(out)
    return 0

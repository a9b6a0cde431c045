"""Collect an importance matrix from text (`r7b imatrix`).

Quantizers round each weight row to minimise an error weighted per input column. Columns that
carry large activations matter most, so llama.cpp weighs them by the mean squared activation
feeding each matrix: the importance matrix. This module collects it the way llama-imatrix does,
in-process: the model runs over the calibration text in independent chunks of `--ctx` tokens
(each starting with BOS), and an evaluation callback sees every matrix multiplication by a layer
weight and accumulates the sum of squared inputs per column and the number of rows. The output
projection is collected as well: in Command R7B it is the tied token embedding, which llama-imatrix
skips, and weighting its columns lowered the KL divergence a little on the stand-in.

Files are written in llama.cpp's imatrix layouts (see `imatrix_file.py`).
"""

from __future__ import annotations

import argparse
import ctypes
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
from tqdm import tqdm

from r7b.errors import R7BError
from r7b.fsutil import atomic_output, check_free_space, check_output_path
from r7b.gguf_validate import validate_gguf
from r7b.llama import Batch, LlamaModel, free_context

from .imatrix_file import Imatrix, write_imatrix

GGML_MAX_DIMS = 4
GGML_MAX_OP_PARAMS = 64
GGML_MAX_SRC = 10
GGML_MAX_NAME = 64
GGML_TYPE_F32 = 0
GGML_OBJECT_SIZE = 32  # struct ggml_object, which ggml_tensor_overhead() adds to the tensor


class GGMLTensor(ctypes.Structure):
    """`struct ggml_tensor` from ggml.h, field for field."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * GGML_MAX_DIMS),
        ("nb", ctypes.c_size_t * GGML_MAX_DIMS),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * (GGML_MAX_OP_PARAMS // 4)),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * GGML_MAX_SRC),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * GGML_MAX_NAME),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


# -- collecting ---------------------------------------------------------------------------------

class _Ggml:
    """The few libggml-base functions the callback needs, loaded from llama-cpp-python's build."""

    def __init__(self) -> None:
        from llama_cpp._ctypes_extensions import load_shared_library

        lib = load_shared_library("ggml-base", Path(llama_cpp.__file__).parent / "lib")
        lib.ggml_op_name.restype = ctypes.c_char_p
        lib.ggml_op_name.argtypes = [ctypes.c_int]
        lib.ggml_tensor_overhead.restype = ctypes.c_size_t
        lib.ggml_backend_buffer_is_host.restype = ctypes.c_bool
        lib.ggml_backend_buffer_is_host.argtypes = [ctypes.c_void_p]
        lib.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
        lib.ggml_backend_tensor_get.restype = None
        self.lib = lib
        if ctypes.sizeof(GGMLTensor) != lib.ggml_tensor_overhead() - GGML_OBJECT_SIZE:
            raise R7BError("this llama-cpp-python build has an unexpected ggml_tensor layout; imatrix is unavailable")
        self.op_mul_mat = self._op("MUL_MAT")

    def _op(self, wanted: str) -> int:
        # Early enum values only: MUL_MAT sits well inside the table, so the scan never runs past it.
        for op in range(128):
            name = self.lib.ggml_op_name(op)
            if name is None:
                break
            if name.decode() == wanted:
                return op
        raise R7BError(f"ggml has no {wanted} op in this build")

    def rows(self, t: GGMLTensor, ptr: int) -> np.ndarray:
        """src1 of a matmul as a (rows, cols) float32 array, copied off-device if needed."""
        ne, nb = list(t.ne), list(t.nb)
        if nb[0] != 4:
            raise R7BError("matmul input with non-contiguous rows; cannot collect the imatrix")
        span = sum((n - 1) * s for n, s in zip(ne, nb)) + 4
        if t.buffer and not self.lib.ggml_backend_buffer_is_host(t.buffer):
            host = np.empty(span, dtype=np.uint8)
            self.lib.ggml_backend_tensor_get(ptr, host.ctypes.data, 0, span)
            base = host
        else:
            base = np.ctypeslib.as_array((ctypes.c_uint8 * span).from_address(t.data))
        view = np.lib.stride_tricks.as_strided(base.view(np.uint8), shape=(ne[3], ne[2], ne[1], ne[0] * 4),
                                               strides=(nb[3], nb[2], nb[1], 1))
        return np.ascontiguousarray(view).view(np.float32).reshape(-1, ne[0])


class _Collector:
    """The evaluation callback: claims weight matmuls when asked, accumulates when called."""

    def __init__(self, ggml: _Ggml) -> None:
        self.ggml = ggml
        self.imx = Imatrix()
        self.error: BaseException | None = None
        self.callback = llama_cpp.ggml_backend_sched_eval_callback(self._on_eval)

    def _on_eval(self, t_ptr: int, ask: bool, _user: int) -> bool:
        try:
            t = GGMLTensor.from_address(t_ptr)
            if t.op != self.ggml.op_mul_mat or not t.src[0] or not t.src[1]:
                return not ask
            src0 = GGMLTensor.from_address(t.src[0])
            src1 = GGMLTensor.from_address(t.src[1])
            name = _weight_name(src0.name.decode("utf-8", "replace"))
            if not _is_weight(name) or src1.type != GGML_TYPE_F32:
                return not ask
            if not ask:
                self._accumulate(name, src0, src1, t.src[1])
            return True
        except BaseException as exc:  # a callback must not raise into C
            self.error = self.error or exc
            return False

    def _accumulate(self, name: str, src0: GGMLTensor, src1: GGMLTensor, src1_ptr: int) -> None:
        if src0.ne[2] * src0.ne[3] != 1:
            raise R7BError(f"{name} is not a 2-D weight; stacked (expert) weights are not supported")
        x = self.ggml.rows(src1, src1_ptr).astype(np.float64)
        sums = self.imx.sums.get(name)
        if sums is None:
            sums = self.imx.sums[name] = np.zeros((1, x.shape[1]))
            self.imx.counts[name] = np.zeros(1)
        sums[0] += np.einsum("ij,ij->j", x, x)
        self.imx.counts[name][0] += x.shape[0]


def _is_weight(name: str) -> bool:
    """Layer matrices, and the output projection (the tied token embedding for cohere2)."""
    return name.startswith("blk.") or name in ("token_embd.weight", "output.weight")


def _weight_name(name: str) -> str:
    """Backend copies are named like 'CUDA0#blk.0.attn_q.weight#0'."""
    parts = name.split("#")
    return parts[1] if len(parts) > 1 else name


def collect_imatrix(model_path: str | Path, text: str, *, ctx: int = 512, chunks: int | None = None,
                    threads: int | None = None, progress: bool = True, dataset: str = "") -> Imatrix:
    """Run `text` through the model in chunks of `ctx` tokens and collect the importance matrix."""
    if ctx < 8:
        raise R7BError("--ctx must be at least 8 tokens")
    if chunks is not None and chunks < 1:
        raise R7BError("--chunks must be at least 1")
    validate_gguf(model_path)  # a bad file becomes an R7BError, not an abort in llama.cpp
    collector = _Collector(_Ggml())
    with LlamaModel(model_path) as model:
        chunk_list = _chunks(model, text, ctx, chunks)
        lctx = model.new_context(n_ctx=ctx, n_batch=512, n_threads=threads, cb_eval=collector.callback)
        try:
            with Batch(min(ctx, 512)) as batch:
                for chunk in tqdm(chunk_list, desc="imatrix", unit="chunk", disable=not progress):
                    _eval_chunk(lctx, batch, chunk, collector)
        finally:
            free_context(lctx)
    imx = collector.imx
    imx.chunk_count, imx.chunk_size = len(chunk_list), ctx
    imx.datasets = [dataset] if dataset else []
    return imx


def _chunks(model: LlamaModel, text: str, ctx: int, limit: int | None) -> list[list[int]]:
    """Tokenize with BOS and cut into whole chunks, each starting with BOS, as llama-imatrix does."""
    tokens = model.tokenize(text, special=False, add_bos=True)
    count = len(tokens) // ctx if limit is None else min(limit, len(tokens) // ctx)
    if count < 1:
        raise R7BError(f"the text has {len(tokens)} tokens; one chunk needs {ctx} (lower --ctx or add text)")
    chunks = [tokens[i * ctx:(i + 1) * ctx] for i in range(count)]
    if model.add_bos:
        for chunk in chunks:
            chunk[0] = model.bos
    return chunks


def _eval_chunk(lctx: Any, batch: Batch, chunk: list[int], collector: _Collector) -> None:
    """Evaluate one chunk from an empty cache, every token an output so no layer is pruned."""
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(lctx), True)
    for start in range(0, len(chunk), batch.capacity):
        rc = llama_cpp.llama_decode(lctx, batch.fill(chunk[start:start + batch.capacity], start, outputs=True))
        if collector.error is not None:
            raise collector.error
        if rc != 0:
            raise R7BError(f"llama.cpp failed to evaluate a chunk (code {rc})")


def imatrix(model: str | Path, text_file: str | Path, output: str | Path, *, ctx: int = 512,
            chunks: int | None = None, threads: int | None = None, force: bool = False,
            progress: bool = True) -> Path:
    """Collect an importance matrix for `model` from the text in `text_file` and write it atomically."""
    out = check_output_path(output, force=force)
    text_path = Path(text_file)
    try:
        text = text_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise R7BError(f"cannot read calibration text {text_path}: {exc}") from None
    check_free_space(out, imatrix_bytes(model, str(text_path)), "the importance matrix")
    imx = collect_imatrix(model, text, ctx=ctx, chunks=chunks, threads=threads, progress=progress,
                          dataset=str(text_path))
    if not imx.sums:
        raise R7BError("no weight matrices were seen while evaluating; is this a cohere2 model?")
    with atomic_output(out, force=force) as tmp:
        write_imatrix(imx, tmp)
    return out


def imatrix_bytes(model: str | Path, dataset: str = "") -> int:
    """About how big the importance matrix of `model` will be: one float per input column of each
    weight matrix, a count, and their names (small: a few MiB for Command R7B)."""
    matrices = [t for t in validate_gguf(model).tensors if len(t.shape) == 2]
    per_tensor = sum(-(-t.shape[0] * 4 // 32) * 32 + 32 + 2 * (len(t.name) + 64) for t in matrices)
    return per_tensor + len(dataset.encode()) + 4096


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("imatrix", help="collect an importance matrix for quantization",
                              description=__doc__.splitlines()[0])
    p.add_argument("model", metavar="MODEL.gguf", help="the model, ideally F16 or BF16")
    p.add_argument("--text", required=True, metavar="FILE", help="calibration text (UTF-8)")
    p.add_argument("-o", "--output", required=True, metavar="IMATRIX",
                   help="output file: GGUF imatrix, or the legacy format if it ends in .dat")
    p.add_argument("--ctx", type=int, default=512, help="tokens per chunk (default 512)")
    p.add_argument("--chunks", type=int, help="evaluate at most this many chunks (default: all)")
    p.add_argument("--threads", type=int, help="CPU threads (default: one per core, at most 8)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    out = imatrix(args.model, args.text, args.output, ctx=args.ctx, chunks=args.chunks,
                  threads=args.threads, force=args.force, progress=not args.quiet)
    print(out)
    return 0

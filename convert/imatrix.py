"""Collect an importance matrix from text (`r7b imatrix`) and read imatrix files.

Quantizers round each weight row to minimise an error weighted per input column. Columns that
carry large activations matter most, so llama.cpp weighs them by the mean squared activation
feeding each matrix: the importance matrix. This module collects it the way llama-imatrix does,
in-process: the model runs over the calibration text in independent chunks of `--ctx` tokens
(each starting with BOS), and an evaluation callback sees every matrix multiplication by a layer
weight and accumulates the sum of squared inputs per column and the number of rows. The output
projection is collected as well: in Command R7B it is the tied token embedding, which llama-imatrix
skips, and weighting its columns lowered the KL divergence a little on the stand-in.

Files use llama.cpp's GGUF imatrix layout (`general.type = imatrix`; tensors `<weight>.in_sum2`
and `<weight>.counts`; `imatrix.datasets`, `imatrix.chunk_count`, `imatrix.chunk_size`), so they
work with llama-quantize and vice versa. A path ending in `.dat` selects the legacy binary format.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import gguf
import numpy as np
from tqdm import tqdm

from r7b.errors import R7BError
from r7b.fsutil import atomic_output, check_output_path

from .validate import validate_gguf

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
    validate_gguf(p, arch=None)  # bounds and layout, before gguf's reader trusts them
    try:
        return _read_gguf(p)
    except (ValueError, KeyError, IndexError) as exc:
        raise R7BError(f"{p} is not a valid GGUF imatrix ({exc})") from None


def load_imatrix(path: str | Path) -> dict[str, np.ndarray]:
    """Weight name -> per-column mean squared activation (float32), from either file format."""
    return read_imatrix(path).means()


def _read_gguf(path: Path) -> Imatrix:
    reader = gguf.GGUFReader(path)
    kind = _field(reader, "general.type")
    if kind is not None and kind != "imatrix":
        raise ValueError(f"general.type is {kind!r}, not 'imatrix'")
    imx = Imatrix(datasets=list(_field(reader, "imatrix.datasets") or []),
                  chunk_count=int(_field(reader, "imatrix.chunk_count") or 0),
                  chunk_size=int(_field(reader, "imatrix.chunk_size") or 0))
    tensors = {t.name: t for t in reader.tensors}
    for name, t in tensors.items():
        if not name.endswith(".in_sum2"):
            continue
        base = name.removesuffix(".in_sum2")
        counts = tensors.get(f"{base}.counts")
        if counts is None:
            raise ValueError(f"{base} has sums but no counts")
        n_mat = int(counts.n_elements)
        sums = np.asarray(t.data, dtype=np.float64).reshape(n_mat, -1)
        imx.sums[base] = sums
        imx.counts[base] = np.asarray(counts.data, dtype=np.float64).reshape(n_mat)
    if not imx.sums:
        raise ValueError("no .in_sum2 tensors")
    return imx


def _field(reader: gguf.GGUFReader, key: str):
    f = reader.get_field(key)
    return None if f is None else f.contents()


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
        if not 0 < n <= GGML_MAX_NAME:
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


# -- collecting ---------------------------------------------------------------------------------

class _Ggml:
    """The few libggml-base functions the callback needs, loaded from llama-cpp-python's build."""

    def __init__(self) -> None:
        import llama_cpp
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
        import llama_cpp

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
    from .quantize import LlamaLog

    if ctx < 8:
        raise R7BError("--ctx must be at least 8 tokens")
    if chunks is not None and chunks < 1:
        raise R7BError("--chunks must be at least 1")
    collector = _Collector(_Ggml())
    with LlamaLog() as log, _model(model_path, log) as model:
        chunk_list = _chunks(model, text, ctx, chunks)
        with _context(model, ctx, threads, collector.callback) as lctx:
            for chunk in tqdm(chunk_list, desc="imatrix", unit="chunk", disable=not progress):
                _eval_chunk(lctx, chunk, collector)
    imx = collector.imx
    imx.chunk_count, imx.chunk_size = len(chunk_list), ctx
    imx.datasets = [dataset] if dataset else []
    return imx


@contextlib.contextmanager
def _model(path: str | Path, log) -> Iterator[Any]:
    import llama_cpp

    from .quantize import read_model

    read_model(path, allow_quantized=True)  # a bad file becomes an R7BError, not an abort in llama.cpp
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_default_params()
    params.n_gpu_layers = 0
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise R7BError(f"llama.cpp could not load {path}: {log.reason()}")
    try:
        yield model
    finally:
        llama_cpp.llama_model_free(model)


def _chunks(model, text: str, ctx: int, limit: int | None) -> list[list[int]]:
    """Tokenize with BOS and cut into whole chunks, each starting with BOS, as llama-imatrix does."""
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(model)
    data = text.encode("utf-8")
    buf = (llama_cpp.llama_token * (len(data) + 8))()
    n = llama_cpp.llama_tokenize(vocab, data, len(data), buf, len(buf), True, False)
    if n < 0:
        raise R7BError("tokenization failed")
    tokens = list(buf[:n])
    count = len(tokens) // ctx if limit is None else min(limit, len(tokens) // ctx)
    if count < 1:
        raise R7BError(f"the text has {len(tokens)} tokens; one chunk needs {ctx} (lower --ctx or add text)")
    chunks = [tokens[i * ctx:(i + 1) * ctx] for i in range(count)]
    if llama_cpp.llama_vocab_get_add_bos(vocab):
        for chunk in chunks:
            chunk[0] = llama_cpp.llama_vocab_bos(vocab)
    return chunks


@contextlib.contextmanager
def _context(model, ctx: int, threads: int | None, callback) -> Iterator[Any]:
    import llama_cpp

    from r7b.runtime.engine import default_threads

    params = llama_cpp.llama_context_default_params()
    params.n_ctx = ctx
    params.n_batch = params.n_ubatch = min(ctx, 512)
    params.n_seq_max = 1
    params.swa_full = False
    params.n_threads = params.n_threads_batch = threads or default_threads()
    params.cb_eval = callback
    params.cb_eval_user_data = None
    lctx = llama_cpp.llama_init_from_model(model, params)
    if not lctx:
        raise R7BError(f"llama.cpp could not create a context of {ctx} tokens")
    try:
        yield lctx
    finally:
        llama_cpp.llama_free(lctx)


def _eval_chunk(lctx, chunk: list[int], collector: _Collector) -> None:
    """Evaluate one chunk from an empty cache, every token an output so no layer is pruned."""
    import llama_cpp

    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(lctx), True)
    n_batch = llama_cpp.llama_n_batch(lctx)
    batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
    try:
        for start in range(0, len(chunk), n_batch):
            part = chunk[start:start + n_batch]
            batch.n_tokens = len(part)
            for j, tok in enumerate(part):
                batch.token[j] = tok
                batch.pos[j] = start + j
                batch.n_seq_id[j] = 1
                batch.seq_id[j][0] = 0
                batch.logits[j] = 1
            rc = llama_cpp.llama_decode(lctx, batch)
            if collector.error is not None:
                raise collector.error
            if rc != 0:
                raise R7BError(f"llama.cpp failed to evaluate a chunk (code {rc})")
    finally:
        llama_cpp.llama_batch_free(batch)


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
    imx = collect_imatrix(model, text, ctx=ctx, chunks=chunks, threads=threads, progress=progress,
                          dataset=str(text_path))
    if not imx.sums:
        raise R7BError("no weight matrices were seen while evaluating; is this a cohere2 model?")
    with atomic_output(out, force=force) as tmp:
        write_imatrix(imx, tmp)
    return out


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

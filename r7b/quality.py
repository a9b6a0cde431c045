"""`r7b eval`: what a quantization costs, in the figures llama-perplexity --kl-divergence reports.

Chunking follows llama-perplexity. The text is tokenized once, with BOS, and cut into consecutive
chunks of `ctx` tokens (a short tail is dropped); the text must hold at least two chunks. Each
chunk is evaluated from an empty cache with its first token replaced by BOS, and the predictions
made at positions ctx/2 .. ctx-2 (of the tokens at ctx/2+1 .. ctx-1) are scored, so every scored
token has at least ctx/2 tokens of context.

The reference runs once. Its log-probabilities at the scored positions go to a memory-mapped
file, with the token ids and ctx they belong to; each model then runs chunk by chunk against that
file, so memory stays at one chunk's logits whatever the vocabulary. The file can be kept
(`--save-reference`) and reused (`--load-reference`). A row of log-probabilities is stored as the
float32 logits plus the row's float64 log-normalizer: the size of float32 log-probabilities
(4 * n_vocab bytes, about 1 MiB a position for Command R7B) without their rounding, which moved
the mean KL divergence of a Q8_0 stand-in by 2 parts in 1e5.

llama-perplexity's base file holds 16-bit log-probabilities and its KL sum leaves out terms with
p_ref < e^-16; here the sum runs over the whole vocabulary and everything after the logits is
float64. The definitions of the figures are otherwise its own.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import shutil
import struct
import sys
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from tqdm import tqdm

from r7b.errors import R7BError
from r7b.fsutil import atomic_output, check_output_path

DEFAULT_CTX = 512
MIN_CTX = 8
MAX_BATCH = 512  # llama.cpp's default micro-batch; it also caps the logits buffer at 512 rows
KV_TYPES = {"f32": 0, "f16": 1}  # GGML_TYPE_F32, GGML_TYPE_F16
BLOCK_ELEMENTS = 1 << 22  # float64 elements per scoring block: 32 MiB per temporary array
PERCENTILES = {"kld_median": 0.5, "kld_p90": 0.9, "kld_p99": 0.99, "kld_p999": 0.999}


# -- statistics ---------------------------------------------------------------------------------

def standard_error(values: np.ndarray) -> float:
    """Standard error of the mean, sqrt(var / (n - 1)), the uncertainty llama-perplexity prints."""
    n = len(values)
    if n < 2:
        return 0.0
    return float(np.sqrt(np.var(values, dtype=np.float64) / (n - 1)))


def percentile(sorted_values: np.ndarray, fraction: float) -> float:
    """Linear interpolation between the nearest ranks (llama-perplexity's rule, numpy's default)."""
    n = len(sorted_values)
    if fraction <= 0:
        return float(sorted_values[0])
    if fraction >= 1:
        return float(sorted_values[-1])
    pos = fraction * (n - 1)
    i = int(pos)
    frac = pos - i
    return float((1 - frac) * sorted_values[i] + frac * sorted_values[min(i + 1, n - 1)])


def log_normalizer(logits: np.ndarray) -> np.ndarray:
    """log(sum(exp(row))) per row, in float64: log p = logit - this, with no rounding of p."""
    x = logits.astype(np.float64)
    top = x.max(axis=1, keepdims=True)
    return (top + np.log(np.exp(x - top).sum(axis=1, keepdims=True)))[:, 0]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-probabilities in float64, so that float32 logits lose nothing on the way."""
    return logits.astype(np.float64) - log_normalizer(logits)[:, None]


@dataclass(frozen=True)
class TokenScores:
    """Per scored position: NLL of the true token (model, reference), KL(ref || model), Δp, same top."""

    nll: np.ndarray
    nll_ref: np.ndarray
    kld: np.ndarray
    dp: np.ndarray
    same_top: np.ndarray

    @classmethod
    def concat(cls, parts: Sequence[TokenScores]) -> TokenScores:
        return cls(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(cls)))


def score_rows(logits: np.ndarray, ref_logits: np.ndarray, ref_lognorm: np.ndarray,
               targets: np.ndarray) -> TokenScores:
    """Compare a model's logits with the reference's, one row per scored position."""
    lp = log_softmax(logits)
    ref = ref_logits.astype(np.float64) - ref_lognorm[:, None]
    rows = np.arange(len(targets))
    kld = (np.exp(ref) * (ref - lp)).sum(axis=1)
    nll, nll_ref = -lp[rows, targets], -ref[rows, targets]
    dp = np.exp(-nll) - np.exp(-nll_ref)
    return TokenScores(nll, nll_ref, kld, dp, logits.argmax(axis=1) == ref_logits.argmax(axis=1))


def summarize(s: TokenScores) -> dict[str, float | int]:
    """The headline figures, each as llama-perplexity's KL-divergence summary defines it."""
    n = len(s.nll)
    ppl, ref_ppl = math.exp(s.nll.mean()), math.exp(s.nll_ref.mean())
    se, se_ref = standard_error(s.nll), standard_error(s.nll_ref)
    cov = float(np.mean(s.nll * s.nll_ref) - s.nll.mean() * s.nll_ref.mean()) / (n - 1)
    ratio = math.exp(s.nll.mean() - s.nll_ref.mean())
    kld = np.sort(s.kld)
    top1 = float(s.same_top.mean())
    msq = float(np.mean(s.dp ** 2))
    rms = math.sqrt(msq)
    return {
        "tokens_scored": n,
        "ppl": ppl, "ppl_stderr": ppl * se,
        "ppl_ratio": ratio, "ppl_ratio_stderr": ratio * math.sqrt(max(0.0, se**2 + se_ref**2 - 2 * cov)),
        "kld_mean": float(kld.mean()), "kld_stderr": standard_error(kld),
        **{key: percentile(kld, f) for key, f in PERCENTILES.items()},
        "kld_max": float(kld[-1]),
        "top1_agreement": top1, "top1_stderr": math.sqrt(top1 * (1 - top1) / (n - 1)),
        "rms_dp": rms, "rms_dp_stderr": 0.5 / rms * standard_error(s.dp ** 2) if rms > 0 else 0.0,
        "reference_ppl": ref_ppl, "reference_ppl_stderr": ref_ppl * se_ref,
    }


# -- files --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FileInfo:
    """A GGUF as the table shows it: its type, size and bits per weight."""

    model: str
    type: str
    file_bytes: int
    bits_per_weight: float


def file_info(path: str | os.PathLike) -> FileInfo:
    """Read a GGUF's header (any architecture); a file that is not a valid GGUF is an R7BError."""
    from r7b.convert.validate import validate_gguf

    p = Path(path)
    if not p.is_file():
        raise R7BError(f"no such model file: {p}")
    summary = validate_gguf(p, arch=None)
    n_params = sum(math.prod(t.shape) for t in summary.tensors)
    data_bytes = sum(t.nbytes for t in summary.tensors)
    bpw = 8 * data_bytes / n_params if n_params else 0.0
    return FileInfo(str(path), type_label(summary.metadata), summary.file_size, bpw)


def type_label(metadata: dict[str, Any]) -> str:
    """'Q4_K_M', 'F16', the project's recipe name, '+imatrix' when one was used."""
    import gguf

    name = metadata.get("r7b.quantize.recipe")
    if name is None:
        try:
            name = gguf.LlamaFileType(int(metadata["general.file_type"])).name
        except (KeyError, ValueError, TypeError):
            name = "unknown"
        name = name.removeprefix("MOSTLY_").removeprefix("ALL_")
    return f"{name}+imatrix" if "quantize.imatrix.file" in metadata else str(name)


def read_text(path: str | os.PathLike) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise R7BError(f"cannot read text {path}: {exc}") from None


# -- llama.cpp ----------------------------------------------------------------------------------

class _Llama:
    """One GGUF through llama.cpp's C API: its vocabulary, and with `ctx` a context for chunks."""

    def __init__(self, path: Path, *, ctx: int = 0, threads: int | None = None, kv_type: str = "f32"):
        import llama_cpp as ll

        from r7b.convert.quantize import LlamaLog

        self._ll, self.path, self._ctx, self._batch = ll, path, None, None
        ll.llama_backend_init()
        params = ll.llama_model_default_params()
        params.vocab_only = ctx == 0
        with LlamaLog() as log:
            self._model = ll.llama_model_load_from_file(str(path).encode(), params)
            if not self._model:
                raise R7BError(f"llama.cpp could not load {path}: {log.reason()}")
            self._vocab = ll.llama_model_get_vocab(self._model)
            self.n_vocab = ll.llama_vocab_n_tokens(self._vocab)
            self.bos = ll.llama_vocab_bos(self._vocab) if ll.llama_vocab_get_add_bos(self._vocab) else None
            if ctx:
                self._open_context(ctx, threads, kv_type, log)

    def _open_context(self, ctx: int, threads: int | None, kv_type: str, log: Any) -> None:
        from r7b.runtime.engine import default_threads

        ll = self._ll
        p = ll.llama_context_default_params()
        p.n_ctx = ctx
        p.n_batch = p.n_ubatch = min(ctx, MAX_BATCH)
        p.n_seq_max = 1
        p.n_threads = p.n_threads_batch = threads or default_threads()
        p.type_k = p.type_v = KV_TYPES[kv_type]
        p.flash_attn_type = ll.LLAMA_FLASH_ATTN_TYPE_DISABLED  # plain f32 softmax, same on every backend
        p.swa_full = False
        self._ctx = ll.llama_init_from_model(self._model, p)
        if not self._ctx:
            self._free()
            raise R7BError(f"llama.cpp could not create a {ctx}-token context for {self.path}: {log.reason()}")
        self._batch = ll.llama_batch_init(p.n_batch, 0, 1)

    def close(self) -> None:
        from r7b.convert.quantize import LlamaLog

        with LlamaLog():
            self._free()

    def _free(self) -> None:
        ll = self._ll
        if self._batch is not None:
            ll.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx:
            ll.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            ll.llama_model_free(self._model)
            self._model = None

    def __enter__(self) -> _Llama:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def token_texts(self) -> list[bytes]:
        return [self._ll.llama_vocab_get_text(self._vocab, i) for i in range(self.n_vocab)]

    def tokenize(self, text: str) -> np.ndarray:
        """Tokens with BOS and without parsing special-token text, as llama-perplexity tokenizes."""
        data = text.encode("utf-8")
        buf = (self._ll.llama_token * (len(data) + 2))()
        n = self._ll.llama_tokenize(self._vocab, data, len(data), buf, len(buf), True, False)
        if n < 0:
            raise R7BError("tokenization failed")
        return np.ctypeslib.as_array(buf)[:n].astype(np.int32)

    def scored_logits(self, chunk: np.ndarray, first: int) -> Iterator[tuple[int, np.ndarray]]:
        """Evaluate one chunk from an empty cache; yield (position, logits rows) for positions
        first .. len-2, batch by batch. The rows are llama.cpp's buffer: use them before the next step."""
        ll = self._ll
        ll.llama_memory_clear(ll.llama_get_memory(self._ctx), True)
        step = ll.llama_n_batch(self._ctx)
        last = len(chunk) - 2
        for b0 in range(0, len(chunk), step):
            b1 = min(b0 + step, len(chunk))
            self._decode(chunk, b0, b1, first, last)
            n_out = min(b1 - 1, last) - max(b0, first) + 1
            if n_out > 0:
                ptr = ll.llama_get_logits(self._ctx)
                yield max(b0, first), np.ctypeslib.as_array(ptr, shape=(n_out, self.n_vocab))

    def _decode(self, chunk: np.ndarray, b0: int, b1: int, first: int, last: int) -> None:
        batch = self._batch
        batch.n_tokens = b1 - b0
        for j, pos in enumerate(range(b0, b1)):
            batch.token[j] = int(chunk[pos])
            batch.pos[j] = pos
            batch.n_seq_id[j] = 1
            batch.seq_id[j][0] = 0
            batch.logits[j] = first <= pos <= last
        rc = self._ll.llama_decode(self._ctx, batch)
        if rc != 0:
            raise R7BError(f"llama.cpp failed to evaluate a chunk of {self.path} (code {rc})")


def vocab_digest(texts: Sequence[bytes]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(struct.pack("<I", len(t)))
        h.update(t)
    return h.hexdigest()


def _show(token: bytes) -> str:
    return repr(token.decode("utf-8", "backslashreplace"))


def _vocab_difference(a: Sequence[bytes], b: Sequence[bytes]) -> str | None:
    if len(a) != len(b):
        return f"{len(b)} tokens vs {len(a)}"
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"token {i} is {_show(y)} vs {_show(x)}"
    return None


# -- the reference's log-probabilities ------------------------------------------------------------

def _align(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


class ReferenceLogProbs:
    """The reference's log-probabilities at the scored positions, memory-mapped.

    Layout: magic, a JSON header (ctx, chunk count, n_vocab, vocabulary digest, reference name),
    then int32 token ids (chunks * ctx), the float64 log-normalizer of each scored position, and
    page-aligned float32 logits (positions * n_vocab): log p = logit - normalizer.
    """

    MAGIC = b"R7BLOGP1"
    HEADER_BYTES = 4096

    def __init__(self, path: Path, header: dict[str, Any], mode: str):
        self.path, self.header = path, header
        self.ctx, self.n_chunks, self.n_vocab = header["ctx"], header["n_chunks"], header["n_vocab"]
        self.first = self.ctx // 2
        self.n_scored = self.ctx - 1 - self.first
        off = self._offsets(self.ctx, self.n_chunks, self.n_vocab)
        self.tokens = np.memmap(path, np.int32, mode, off["tokens"], (self.n_chunks * self.ctx,))
        self.lognorm = np.memmap(path, np.float64, mode, off["lognorm"], (self.n_rows,))
        self.logits = np.memmap(path, np.float32, mode, off["logits"], (self.n_rows, self.n_vocab))

    @property
    def n_rows(self) -> int:
        return self.n_chunks * self.n_scored

    @classmethod
    def _offsets(cls, ctx: int, n_chunks: int, n_vocab: int) -> dict[str, int]:
        tokens = cls.HEADER_BYTES
        rows = n_chunks * (ctx - 1 - ctx // 2)
        lognorm = _align(tokens + 4 * n_chunks * ctx, 64)
        logits = _align(lognorm + 8 * rows, 4096)
        return {"tokens": tokens, "lognorm": lognorm, "logits": logits, "end": logits + 4 * rows * n_vocab}

    @classmethod
    def file_bytes(cls, ctx: int, n_chunks: int, n_vocab: int) -> int:
        return cls._offsets(ctx, n_chunks, n_vocab)["end"]

    @classmethod
    def create(cls, path: Path, tokens: np.ndarray, *, ctx: int, n_vocab: int, vocab_sha256: str,
               reference: str) -> ReferenceLogProbs:
        """Make an empty file for `tokens` (whole chunks), refusing early if the disk cannot hold it."""
        n_chunks = len(tokens) // ctx
        size = cls.file_bytes(ctx, n_chunks, n_vocab)
        free = shutil.disk_usage(path.parent).free
        if size > free:
            raise R7BError(f"the reference log-probs need {size / 2**30:.2f} GiB in {path.parent}, "
                           f"which has {free / 2**30:.2f} GiB free (fewer --chunks, or another folder)")
        header = {"format": 1, "ctx": ctx, "n_chunks": n_chunks, "n_vocab": n_vocab,
                  "vocab_sha256": vocab_sha256, "reference": reference}
        blob = json.dumps(header).encode()
        with open(path, "wb") as f:
            f.write(cls.MAGIC + struct.pack("<I", len(blob)) + blob)
            f.truncate(size)
        store = cls(path, header, "r+")
        store.tokens[:] = tokens[:n_chunks * ctx]
        return store

    @classmethod
    def open(cls, path: str | os.PathLike) -> ReferenceLogProbs:
        p = Path(path)
        try:
            with open(p, "rb") as f:
                head = f.read(cls.HEADER_BYTES)
                size = os.fstat(f.fileno()).st_size
        except OSError as exc:
            raise R7BError(f"cannot read reference log-probs {p}: {exc.strerror or exc}") from None
        if not head.startswith(cls.MAGIC):
            raise R7BError(f"{p} is not a reference log-probs file from `r7b eval --save-reference`")
        try:
            (n,) = struct.unpack_from("<I", head, len(cls.MAGIC))
            header = json.loads(head[len(cls.MAGIC) + 4:len(cls.MAGIC) + 4 + n])
            expected = cls.file_bytes(header["ctx"], header["n_chunks"], header["n_vocab"])
        except (struct.error, ValueError, KeyError, TypeError):
            raise R7BError(f"{p} has a damaged header") from None
        if header.get("format") != 1:
            raise R7BError(f"{p} is in format {header.get('format')!r}; this version reads format 1")
        if size != expected:
            raise R7BError(f"{p} is truncated or damaged ({size} bytes, expected {expected})")
        return cls(p, header, "r")

    def chunk_input(self, c: int, bos: int | None) -> np.ndarray:
        """Chunk `c` as the model sees it: first token replaced by BOS."""
        chunk = np.array(self.tokens[c * self.ctx:(c + 1) * self.ctx])
        if bos is not None:
            chunk[0] = bos
        return chunk

    def row(self, c: int, pos: int) -> int:
        return c * self.n_scored + pos - self.first

    def targets(self, c: int) -> np.ndarray:
        """The tokens predicted at the scored positions of chunk `c`."""
        start = c * self.ctx + self.first + 1
        return np.asarray(self.tokens[start:start + self.n_scored])

    def flush(self) -> None:
        for m in (self.tokens, self.lognorm, self.logits):
            m.flush()


# -- evaluation ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Settings:
    ctx: int | None = None
    chunks: int | None = None
    threads: int | None = None
    kv_type: str = "f32"
    progress: bool = False

    def check(self) -> None:
        if self.ctx is not None and self.ctx < MIN_CTX:
            raise R7BError(f"--ctx must be at least {MIN_CTX}")
        if self.chunks is not None and self.chunks < 1:
            raise R7BError("--chunks must be at least 1")
        if self.threads is not None and self.threads < 1:
            raise R7BError("--threads must be at least 1")
        if self.kv_type not in KV_TYPES:
            raise R7BError(f"unknown KV cache type {self.kv_type!r}; choose from {', '.join(KV_TYPES)}")


@dataclass(frozen=True)
class ModelQuality:
    """One model against the reference on the same tokens; the field names are the JSON keys."""

    model: str
    type: str
    file_bytes: int
    bits_per_weight: float
    tokens_scored: int
    ppl: float
    ppl_stderr: float
    ppl_ratio: float
    ppl_ratio_stderr: float
    kld_mean: float
    kld_stderr: float
    kld_median: float
    kld_p90: float
    kld_p99: float
    kld_p999: float
    kld_max: float
    top1_agreement: float
    top1_stderr: float
    rms_dp: float
    rms_dp_stderr: float
    reference: str
    reference_ppl: float
    reference_ppl_stderr: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _row_blocks(n_rows: int, n_vocab: int) -> Iterator[slice]:
    step = max(1, BLOCK_ELEMENTS // n_vocab)
    for i in range(0, n_rows, step):
        yield slice(i, min(i + step, n_rows))


def _chunk_bar(n: int, desc: str, settings: Settings) -> tqdm:
    return tqdm(range(n), desc=desc, unit="chunk", disable=not settings.progress, file=sys.stderr)


def compute_reference(llm: _Llama, store: ReferenceLogProbs, settings: Settings) -> None:
    """Fill `store` with the reference's logits and log-normalizers, one chunk at a time."""
    for c in _chunk_bar(store.n_chunks, f"reference {llm.path.name}", settings):
        for pos, logits in llm.scored_logits(store.chunk_input(c, llm.bos), store.first):
            r0 = store.row(c, pos)
            for b in _row_blocks(len(logits), store.n_vocab):
                rows = slice(r0 + b.start, r0 + b.stop)
                store.logits[rows] = logits[b]
                store.lognorm[rows] = log_normalizer(logits[b])
    store.flush()


def score_model(llm: _Llama, store: ReferenceLogProbs, n_chunks: int, settings: Settings) -> TokenScores:
    """Run the model over the first `n_chunks` chunks and compare each scored row with the reference."""
    parts = []
    for c in _chunk_bar(n_chunks, llm.path.name, settings):
        targets = store.targets(c)
        for pos, logits in llm.scored_logits(store.chunk_input(c, llm.bos), store.first):
            r0, t0 = store.row(c, pos), pos - store.first
            for b in _row_blocks(len(logits), store.n_vocab):
                rows = slice(r0 + b.start, r0 + b.stop)
                parts.append(score_rows(logits[b], store.logits[rows], store.lognorm[rows],
                                        targets[t0 + b.start:t0 + b.stop]))
    return TokenScores.concat(parts)


def _tokens_for(text: str, llm: _Llama, ctx: int, chunks: int | None) -> np.ndarray:
    tokens = llm.tokenize(text)
    if len(tokens) < 2 * ctx:
        raise R7BError(f"the text has {len(tokens)} tokens; --ctx {ctx} needs at least {2 * ctx} "
                       f"(two chunks, as llama-perplexity requires): give more text or a smaller --ctx")
    n_chunks = len(tokens) // ctx if chunks is None else min(chunks, len(tokens) // ctx)
    return tokens[:n_chunks * ctx]


def _check_vocab(path: Path, *, ref_texts: Sequence[bytes] | None = None, digest: str | None = None) -> None:
    """Refuse a model whose token list differs from the reference's (given as texts or as a digest)."""
    with _Llama(path) as llm:
        texts = llm.token_texts()
    diff = _vocab_difference(ref_texts, texts) if ref_texts is not None else None
    if diff is None and digest is not None and vocab_digest(texts) != digest:
        diff = "its token list differs from the one the saved reference used"
    if diff:
        raise R7BError(f"{path} does not share the reference's vocabulary ({diff}); "
                       "KL divergence needs the same tokens")


def _prepare(reference: Path, models: Sequence[Path], text: str, s: Settings) -> tuple[np.ndarray, list[bytes]]:
    """Everything cheap that can fail, before the reference pass: vocabularies and the token count."""
    with _Llama(reference) as ref:
        ref_texts = ref.token_texts()
        tokens = _tokens_for(text, ref, s.ctx or DEFAULT_CTX, s.chunks)
    for path in models:
        _check_vocab(path, ref_texts=ref_texts)
    return tokens, ref_texts


def _check_saved(store: ReferenceLogProbs, reference: Path | None, models: Sequence[Path], text: str | None,
                 s: Settings) -> int:
    """Check saved log-probs against this run; return the number of chunks to use."""
    if s.ctx is not None and s.ctx != store.ctx:
        raise R7BError(f"{store.path} was computed with --ctx {store.ctx}, not {s.ctx}")
    if s.chunks is not None and s.chunks > store.n_chunks:
        raise R7BError(f"{store.path} holds {store.n_chunks} chunks; --chunks {s.chunks} asks for more")
    paths = [reference, *models] if reference is not None else list(models)
    for path in paths:
        _check_vocab(path, digest=store.header["vocab_sha256"])
    if text is not None:
        with _Llama(paths[0]) as llm:
            tokens = llm.tokenize(text)[:len(store.tokens)]
        if not np.array_equal(tokens, store.tokens):
            raise R7BError(f"{store.path} was computed on a different text")
    return s.chunks or store.n_chunks


def _compute_store(path: Path, reference: Path, tokens: np.ndarray, ref_texts: list[bytes],
                   s: Settings) -> ReferenceLogProbs:
    ctx = s.ctx or DEFAULT_CTX
    store = ReferenceLogProbs.create(path, tokens, ctx=ctx, n_vocab=len(ref_texts),
                                     vocab_sha256=vocab_digest(ref_texts), reference=reference.name)
    with _Llama(reference, ctx=ctx, threads=s.threads, kv_type=s.kv_type) as llm:
        compute_reference(llm, store, s)
    return store


@contextlib.contextmanager
def _reference_store(reference: Path | None, text: str | None, models: Sequence[Path], s: Settings,
                     save: Path | None, load: Path | None, force: bool) -> Iterator[tuple[ReferenceLogProbs, int]]:
    """The reference's log-probabilities and the chunk count to score: loaded, saved, or temporary."""
    if load is not None:
        store = ReferenceLogProbs.open(load)
        yield store, _check_saved(store, reference, models, text, s)
        return
    tokens, ref_texts = _prepare(reference, models, text, s)
    if save is not None:
        with atomic_output(save, force=force) as tmp:
            _compute_store(tmp, reference, tokens, ref_texts, s).flush()
        store = ReferenceLogProbs.open(save)
        yield store, store.n_chunks
        return
    fd, tmp = tempfile.mkstemp(prefix="r7b-eval-", suffix=".logprobs")
    os.close(fd)
    try:
        store = _compute_store(Path(tmp), reference, tokens, ref_texts, s)
        yield store, store.n_chunks
    finally:
        Path(tmp).unlink(missing_ok=True)


def evaluate(reference: str | os.PathLike | None, models: Sequence[str | os.PathLike], text: str | None = None,
             *, ctx: int | None = None, chunks: int | None = None, threads: int | None = None,
             kv_type: str = "f32", save_reference: str | os.PathLike | None = None,
             load_reference: str | os.PathLike | None = None, force: bool = False,
             progress: bool = False) -> list[ModelQuality]:
    """Score each model against the reference on the same tokens (rules in the module docstring).

    `reference` may be None when `load_reference` names a file saved by an earlier run; `text`
    may be None then too (the saved token ids are used). `ctx` defaults to 512.
    """
    s = Settings(ctx, chunks, threads, kv_type, progress)
    s.check()
    if reference is None and load_reference is None:
        raise R7BError("a reference model (or saved reference log-probs) is needed")
    if text is None and load_reference is None:
        raise R7BError("a text to evaluate on is needed")
    if not models:
        raise R7BError("no models to evaluate")
    infos = [file_info(m) for m in models]
    ref_path = Path(reference) if reference is not None else None
    if ref_path is not None:
        file_info(ref_path)
    save, load = (Path(p) if p is not None else None for p in (save_reference, load_reference))
    with _reference_store(ref_path, text, [Path(m) for m in models], s, save, load, force) as (store, n_chunks):
        return [_quality(info, store, n_chunks, s) for info in infos]


def _quality(info: FileInfo, store: ReferenceLogProbs, n_chunks: int, s: Settings) -> ModelQuality:
    with _Llama(Path(info.model), ctx=store.ctx, threads=s.threads, kv_type=s.kv_type) as llm:
        scores = score_model(llm, store, n_chunks, s)
    return ModelQuality(**asdict(info), **summarize(scores), reference=store.header["reference"])


# -- the command --------------------------------------------------------------------------------

def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="quality drop of quantized models: PPL, KL divergence, top-1 agreement",
                              description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", metavar="MODEL.gguf", help="models to compare with the reference")
    p.add_argument("--reference", metavar="REF.gguf", help="the unquantized model (F16/BF16/F32)")
    p.add_argument("--text", metavar="FILE", help="UTF-8 text to evaluate on")
    p.add_argument("--ctx", type=int, help=f"tokens per chunk (default {DEFAULT_CTX})")
    p.add_argument("--chunks", type=int, help="evaluate at most this many chunks (default: all)")
    p.add_argument("--threads", type=int, help="CPU threads (default: one per core, at most 8)")
    p.add_argument("--kv-type", choices=list(KV_TYPES), default="f32",
                   help="KV cache type (default f32, so the cache adds no error of its own)")
    p.add_argument("--json", action="store_true", help="print a JSON list, one object per model")
    p.add_argument("--plot", metavar="OUT.png", help="plot mean KL divergence against bits per weight")
    p.add_argument("--save-reference", metavar="FILE", help="keep the reference's log-probs for later runs")
    p.add_argument("--load-reference", metavar="FILE", help="reuse log-probs saved by --save-reference")
    p.add_argument("--force", action="store_true", help="overwrite existing --plot / --save-reference files")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    from r7b.quality_report import markdown_table, plot_kld

    for out in (args.plot, args.save_reference):
        if out is not None:
            check_output_path(out, force=args.force)
    if args.reference is None and args.load_reference is None:
        raise R7BError("--reference REF.gguf is required (or --load-reference FILE)")
    if args.text is None and args.load_reference is None:
        raise R7BError("--text FILE is required (or --load-reference FILE)")
    text = read_text(args.text) if args.text else None
    results = evaluate(args.reference, args.models, text, ctx=args.ctx, chunks=args.chunks,
                       threads=args.threads, kv_type=args.kv_type, save_reference=args.save_reference,
                       load_reference=args.load_reference, force=args.force, progress=not args.quiet)
    if args.json:
        print(json.dumps([r.to_json() for r in results], indent=2))
    else:
        ref = file_info(args.reference) if args.reference else None
        print(markdown_table(results, ref))
    if args.plot:
        with atomic_output(args.plot, force=args.force) as tmp:
            plot_kld(results, tmp)
    return 0

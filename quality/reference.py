"""The reference's log-probabilities at the scored positions, 16-bit, in a memory-mapped file.

Each model is scored chunk by chunk against this file, so memory stays at one chunk's rows whatever
the vocabulary; the file can be kept (`--save-reference`) and reused (`--load-reference`).

A row is stored as llama-perplexity's --kl-divergence-base stores it, 2 bytes a token plus a small
header: log-probabilities within LOGP_RANGE nats of the row's highest are linear 16-bit codes over
that span (step = span / 65534, so each is within step / 2 of its float64 value), and lower ones
are left out (code 0). Unlike llama-perplexity's, the row also keeps the true next token's float64
log-probability and the reference's top token, so PPL, Δp and same-top are exact; only the KL
divergence sees the codes (its bound is stated in eval.py and derived in tests/test_reference_store.py).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from r7b.errors import R7BError
from r7b.fsutil import check_free_space

from .kld import ReferenceRows, log_normalizer

LOGP_RANGE = 32.0  # nats kept below a row's top: what is left out weighs at most n_vocab * e^-32
CODE_MAX = 65535  # codes 1 .. CODE_MAX cover the kept span; 0 marks a token left out
MAX_STEP = LOGP_RANGE / (CODE_MAX - 1)  # 4.9e-4 nats: the widest step a row can have


def vocab_digest(texts: Sequence[bytes]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(struct.pack("<I", len(t)))
        h.update(t)
    return h.hexdigest()


def _show(token: bytes) -> str:
    return repr(token.decode("utf-8", "backslashreplace"))


def vocab_difference(a: Sequence[bytes], b: Sequence[bytes]) -> str | None:
    if len(a) != len(b):
        return f"{len(b)} tokens vs {len(a)}"
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"token {i} is {_show(y)} vs {_show(x)}"
    return None


def _align(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


def row_dtype(n_vocab: int) -> np.dtype:
    """One scored position: the true token's log p, the top token, the code span, the codes."""
    return np.dtype([("target_logp", "<f8"), ("top", "<i4"), ("floor", "<f4"), ("step", "<f4"),
                     ("codes", "<u2", (n_vocab,))])


def _float32_toward(x: np.ndarray, direction: float) -> np.ndarray:
    """`x` as float32, rounded toward `direction` (-inf or +inf) so the stored bound still holds."""
    y = x.astype(np.float32)
    off = y < x if direction > 0 else y > x
    y[off] = np.nextafter(y[off], np.float32(direction))
    return y


def encode_rows(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Rows of 16-bit log-probabilities for `logits` (one row per scored position)."""
    lp = logits.astype(np.float64) - log_normalizer(logits)[:, None]
    out = np.empty(len(lp), row_dtype(logits.shape[1]))
    out["target_logp"] = lp[np.arange(len(targets)), targets]
    out["top"] = logits.argmax(axis=1)
    top = lp.max(axis=1)
    floor = _float32_toward(top - np.minimum(LOGP_RANGE, top - lp.min(axis=1)), -np.inf)
    step = _float32_toward((top - floor) / (CODE_MAX - 1), np.inf)
    out["floor"], out["step"] = floor, step
    lp -= floor[:, None]  # in place: one float64 copy of the rows at a time
    lp /= np.where(step > 0, step, 1)[:, None]
    out["codes"] = np.where(lp >= 0, 1 + np.rint(lp), 0)
    return out


def decode_rows(rows: np.ndarray) -> ReferenceRows:
    """The distribution the codes stand for, renormalized over the tokens kept, in float64."""
    codes = rows["codes"]
    logp = codes.astype(np.float64)
    logp -= 1
    logp *= rows["step"].astype(np.float64)[:, None]
    logp += rows["floor"].astype(np.float64)[:, None]
    p = np.exp(logp)
    p[codes == 0] = 0
    total = p.sum(axis=1)
    p /= total[:, None]
    logp -= np.log(total)[:, None]
    return ReferenceRows(logp, p, np.asarray(rows["target_logp"]), np.asarray(rows["top"]))


class ReferenceLogProbs:
    """The reference's log-probabilities at the scored positions, memory-mapped.

    Layout: magic, a JSON header (ctx, chunk count, n_vocab, vocabulary digest, reference name,
    the code range), then int32 token ids (chunks * ctx), then page-aligned rows of `row_dtype`.
    """

    MAGIC = b"R7BLOGP2"
    OLD_MAGICS = (b"R7BLOGP1",)  # float32 logits plus float64 log-normalizers, 4 bytes a token
    FORMAT = 2
    HEADER_BYTES = 4096

    def __init__(self, path: Path, header: dict[str, Any], mode: str):
        self.path, self.header = path, header
        self.ctx, self.n_chunks, self.n_vocab = header["ctx"], header["n_chunks"], header["n_vocab"]
        self.first = self.ctx // 2
        self.n_scored = self.ctx - 1 - self.first
        off = self._offsets(self.ctx, self.n_chunks, self.n_vocab)
        self.tokens = np.memmap(path, np.int32, mode, off["tokens"], (self.n_chunks * self.ctx,))
        self.rows = np.memmap(path, row_dtype(self.n_vocab), mode, off["rows"], (self.n_rows,))

    @property
    def n_rows(self) -> int:
        return self.n_chunks * self.n_scored

    @classmethod
    def _offsets(cls, ctx: int, n_chunks: int, n_vocab: int) -> dict[str, int]:
        tokens = cls.HEADER_BYTES
        n_rows = n_chunks * (ctx - 1 - ctx // 2)
        rows = _align(tokens + 4 * n_chunks * ctx, 4096)
        return {"tokens": tokens, "rows": rows, "end": rows + n_rows * row_dtype(n_vocab).itemsize}

    @classmethod
    def file_bytes(cls, ctx: int, n_chunks: int, n_vocab: int) -> int:
        """The file's size: header, token ids, then one row (`row_dtype(n_vocab).itemsize`) per scored position."""
        return cls._offsets(ctx, n_chunks, n_vocab)["end"]

    @classmethod
    def create(cls, path: Path, tokens: np.ndarray, *, ctx: int, n_vocab: int, vocab_sha256: str,
               reference: str, hint: str = " (fewer --chunks, or another folder)") -> ReferenceLogProbs:
        """Make a file for `tokens` (whole chunks), refusing early if the disk cannot hold it.

        The space is allocated up front, so a disk that fills later cannot fault a write into the map."""
        n_chunks = len(tokens) // ctx
        size = cls.file_bytes(ctx, n_chunks, n_vocab)
        check_free_space(path, size, "the reference log-probs", hint=hint)
        header = {"format": cls.FORMAT, "ctx": ctx, "n_chunks": n_chunks, "n_vocab": n_vocab,
                  "vocab_sha256": vocab_sha256, "reference": reference,
                  "logp_range": LOGP_RANGE, "codes": CODE_MAX}
        _new_file(path, cls.MAGIC, header, size)
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
        if head.startswith(cls.OLD_MAGICS):
            raise R7BError(f"{p} holds reference log-probs in an older format (float32 logits); "
                           "recompute it with `r7b eval --reference REF.gguf --text FILE --save-reference FILE`")
        if not head.startswith(cls.MAGIC):
            raise R7BError(f"{p} is not a reference log-probs file from `r7b eval --save-reference`")
        header = cls._header(p, head)
        expected = cls.file_bytes(header["ctx"], header["n_chunks"], header["n_vocab"])
        if size != expected:
            raise R7BError(f"{p} is truncated or damaged ({size} bytes, expected {expected})")
        return cls(p, header, "r")

    @classmethod
    def _header(cls, p: Path, head: bytes) -> dict[str, Any]:
        try:
            (n,) = struct.unpack_from("<I", head, len(cls.MAGIC))
            header = json.loads(head[len(cls.MAGIC) + 4:len(cls.MAGIC) + 4 + n])
            cls.file_bytes(header["ctx"], header["n_chunks"], header["n_vocab"])
        except (struct.error, ValueError, KeyError, TypeError):
            raise R7BError(f"{p} has a damaged header") from None
        if header.get("format") != cls.FORMAT:
            raise R7BError(f"{p} is in format {header.get('format')!r}; this version reads format {cls.FORMAT}")
        return header

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
        self.tokens.flush()
        self.rows.flush()


def _new_file(path: Path, magic: bytes, header: dict[str, Any], size: int) -> None:
    """Write the magic and header and reserve `size` bytes; on any failure leave no file."""
    blob = json.dumps(header).encode()
    try:
        with open(path, "wb") as f:
            f.write(magic + struct.pack("<I", len(blob)) + blob)
            _allocate(f, size, path)
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def _allocate(f: Any, size: int, path: Path) -> None:
    """Reserve `size` bytes for the file (sparse where the system cannot reserve)."""
    f.flush()
    try:
        if hasattr(os, "posix_fallocate"):
            os.posix_fallocate(f.fileno(), 0, size)
        else:
            f.truncate(size)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise R7BError(f"no space left on device for the reference log-probs in {path.parent}") from None
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
        f.truncate(size)

"""The reference's log-probabilities at the scored positions, in a memory-mapped file.

Each model is scored chunk by chunk against this file, so memory stays at one chunk's logits
whatever the vocabulary; the file can be kept (`--save-reference`) and reused (`--load-reference`).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from r7b.errors import R7BError
from r7b.fsutil import check_free_space


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
        check_free_space(path, size, "the reference log-probs", hint=" (fewer --chunks, or another folder)")
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

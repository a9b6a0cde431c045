"""One GGUF through llama.cpp for scoring: its vocabulary, and the logits of every scored position."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import llama_cpp as ll
import numpy as np

from r7b.errors import R7BError
from r7b.llama import Batch, LlamaLog, LlamaModel, free_context

MAX_BATCH = 512  # llama.cpp's default micro-batch; it also caps the logits buffer at 512 rows
KV_TYPES = ("f32", "f16")  # what `r7b eval` offers: caches that add no quantization error of their own


class Scorer:
    """A model (vocabulary only when `ctx` is 0) and, with `ctx`, a context that evaluates whole chunks."""

    def __init__(self, path: Path, *, ctx: int = 0, threads: int | None = None, kv_type: str = "f32",
                 flash_attn: str = "off", configure: Any = None):
        self.path = Path(path)
        self.model = LlamaModel(path, vocab_only=ctx == 0, configure=configure)
        self.n_vocab = self.model.n_vocab
        self.bos = self.model.bos if self.model.add_bos else None
        self._ctx = None
        self._batch: Batch | None = None
        if ctx:
            try:  # flash attention off by default: plain f32 softmax, the same on every backend
                self._ctx = self.model.new_context(n_ctx=ctx, n_batch=MAX_BATCH, n_threads=threads,
                                                   kv_type=kv_type, flash_attn=flash_attn)
            except R7BError:
                self.model.close()
                raise
            self._batch = Batch(min(ctx, MAX_BATCH))

    def close(self) -> None:
        with LlamaLog():
            if self._batch is not None:
                self._batch.close()
            free_context(self._ctx)
            self._ctx = None
            self.model.close()

    def __enter__(self) -> "Scorer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def token_texts(self) -> list[bytes]:
        return self.model.token_texts()

    def tokenize(self, text: str) -> np.ndarray:
        """Tokens with BOS and without parsing special-token text, as llama-perplexity tokenizes."""
        return np.asarray(self.model.tokenize(text, special=False, add_bos=True), dtype=np.int32)

    def scored_logits(self, chunk: np.ndarray, first: int) -> Iterator[tuple[int, np.ndarray]]:
        """Evaluate one chunk from an empty cache; yield (position, logits rows) for positions
        first .. len-2, batch by batch. The rows are llama.cpp's buffer: use them before the next step."""
        ll.llama_memory_clear(ll.llama_get_memory(self._ctx), True)
        step = self._batch.capacity
        last = len(chunk) - 2
        for b0 in range(0, len(chunk), step):
            b1 = min(b0 + step, len(chunk))
            batch = self._batch.fill(chunk[b0:b1], b0, outputs=lambda pos: first <= pos <= last)
            rc = ll.llama_decode(self._ctx, batch)
            if rc != 0:
                raise R7BError(f"llama.cpp failed to evaluate a chunk of {self.path} (code {rc})")
            n_out = min(b1 - 1, last) - max(b0, first) + 1
            if n_out > 0:
                ptr = ll.llama_get_logits(self._ctx)
                yield max(b0, first), np.ctypeslib.as_array(ptr, shape=(n_out, self.n_vocab))

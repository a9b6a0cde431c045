"""The baseline for `r7b bench`: prefill and greedy decoding written directly on llama.cpp's C API.

This is the least Python a program can run per token through llama-cpp-python's bindings (what
llama-bench does in C++): one `llama_decode` per prompt batch, then sample, turn the token into
its bytes, decode it, repeat. It deliberately shares no code with the project's engine, so the
r7b/raw ratio shows what the engine's per-token path costs. It can run on a model loaded by
someone else (a `llama_model *`), so that both sides of a comparison read the same weights.
"""

from __future__ import annotations

import ctypes
import os
from typing import Any, Callable, Sequence

import llama_cpp

F16 = 1  # GGML_TYPE_F16
FLASH_ATTN_AUTO = llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO


def seq_state(ctx: Any) -> tuple[Any, int]:
    """Sequence 0's KV cells (a buffer and its used length), as llama-bench keeps the context of a
    depth run between repetitions."""
    size = llama_cpp.llama_state_seq_get_size(ctx, 0)
    buf = (ctypes.c_uint8 * size)()
    return buf, llama_cpp.llama_state_seq_get_data(ctx, buf, size, 0)


def restore_seq_state(ctx: Any, state: tuple[Any, int]) -> None:
    """Put back what `seq_state` saved into a cleared context."""
    buf, size = state
    if llama_cpp.llama_state_seq_set_data(ctx, buf, size, 0) == 0:
        raise RuntimeError("llama.cpp could not restore the saved context")


class RawLoop:
    """One context on a loaded model, cleared before each run; mirrors the engine's context settings.

    `kv_type` is a GGML type id and `flash_attn` a llama_flash_attn_type, so that the caller
    decides what the engine's names mean (the same values reach both sides).
    """

    def __init__(self, model: Any, *, n_ctx: int, n_batch: int, n_threads: int, swa_full: bool = False,
                 kv_type: int = F16, flash_attn: int = FLASH_ATTN_AUTO, owns_model: bool = False):
        self.model, self.owns_model, self.n_batch = model, owns_model, n_batch
        self.depth_state: tuple[Any, int] | None = None
        self.vocab = llama_cpp.llama_model_get_vocab(model)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = params.n_ubatch = n_batch
        params.n_threads = params.n_threads_batch = n_threads
        params.type_k = params.type_v = kv_type
        params.flash_attn_type = flash_attn
        params.swa_full = swa_full
        params.n_seq_max = 1
        self.ctx = llama_cpp.llama_init_from_model(model, params)
        if not self.ctx:
            self.close()
            raise RuntimeError(f"llama.cpp could not create a context of {n_ctx} tokens")
        self.mem = llama_cpp.llama_get_memory(self.ctx)
        self.sampler = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        llama_cpp.llama_sampler_chain_add(self.sampler, llama_cpp.llama_sampler_init_greedy())
        self.piece = ctypes.create_string_buffer(256)

    @classmethod
    def load(cls, path: str | os.PathLike, **context: Any) -> "RawLoop":
        """Load the model from a GGUF file (CPU, memory-mapped) and own it."""
        llama_cpp.llama_backend_init()
        model = llama_cpp.llama_model_load_from_file(str(path).encode(), llama_cpp.llama_model_default_params())
        if not model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        return cls(model, owns_model=True, **context)

    def set_depth(self, tokens: Sequence[int], state: tuple[Any, int] | None = None) -> tuple[Any, int] | None:
        """Evaluate `tokens` once (or take `state`, another context's evaluation of them) and start every
        later run from them (llama-bench's -d); returns the state."""
        llama_cpp.llama_memory_clear(self.mem, True)
        self.depth_state = None
        if tokens and state is None:
            self._prefill(tokens)
            state = seq_state(self.ctx)
        self.depth_state = state if tokens else None
        return self.depth_state

    def _prefill(self, tokens: Sequence[int]) -> None:
        for i in range(0, len(tokens), self.n_batch):
            chunk = tokens[i:i + self.n_batch]
            arr = (llama_cpp.llama_token * len(chunk))(*chunk)
            if llama_cpp.llama_decode(self.ctx, llama_cpp.llama_batch_get_one(arr, len(chunk))) != 0:
                raise RuntimeError("llama_decode failed during prefill")

    def _restore(self) -> None:
        llama_cpp.llama_memory_clear(self.mem, True)
        if self.depth_state:
            restore_seq_state(self.ctx, self.depth_state)

    def run(self, tokens: Sequence[int], n_gen: int,
            clock: Callable[[], float]) -> tuple[float, float, float, float, float]:
        """Prefill `tokens` after the depth (an empty cache without one), then greedily generate `n_gen`
        tokens (EOG ignored). At a depth, decoding is timed as llama-bench's "tg @ dN": after the
        first token the cache goes back to the depth and decoding restarts from there.

        Returns the clock at start, after prefill, at the first token, when decoding was timed from
        and at the end.
        """
        self._restore()
        t_start = clock()
        self._prefill(tokens)
        t_prefilled = t_gen = clock()
        one = (llama_cpp.llama_token * 1)()
        for i in range(n_gen):
            tok = llama_cpp.llama_sampler_sample(self.sampler, self.ctx, -1)
            llama_cpp.llama_token_to_piece(self.vocab, tok, self.piece, 256, 0, True)
            if i == 0:
                t_first = clock()
                if self.depth_state:
                    self._restore()
                    t_gen = clock()
            one[0] = tok
            if llama_cpp.llama_decode(self.ctx, llama_cpp.llama_batch_get_one(one, 1)) != 0:
                raise RuntimeError("llama_decode failed during generation")
        return t_start, t_prefilled, t_first, t_gen, clock()

    def close(self) -> None:
        if getattr(self, "sampler", None):
            llama_cpp.llama_sampler_free(self.sampler)
            self.sampler = None
        if getattr(self, "ctx", None):
            llama_cpp.llama_free(self.ctx)
            self.ctx = None
        if self.model and self.owns_model:
            llama_cpp.llama_model_free(self.model)
        self.model = None

"""One llama.cpp model and context, driven through the C API with as little Python per token as possible.

The engine owns the KV cache of one conversation (sequence 0). `prefill` keeps whatever prefix of
the new prompt is already cached and evaluates only the rest, which is what makes turn N of a
chat cost only turn N's tokens. With the small sliding-window cache, positions that left the
window are gone, so a rollback past them falls back to re-evaluating the prompt (as llama-server
does).
"""

from __future__ import annotations

import codecs
import ctypes
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import llama_cpp
from llama_cpp import _logger as llama_logger

from r7b.errors import R7BError

KV_TYPES = {"f32": 0, "f16": 1, "bf16": 30, "q8_0": 8, "q5_1": 7, "q5_0": 6, "q4_1": 3, "q4_0": 2}
_backend_ready = False


@dataclass(frozen=True)
class EngineConfig:
    n_ctx: int = 8192
    n_batch: int = 512
    n_threads: int | None = None
    n_gpu_layers: int = 0
    kv_type: str = "f16"
    swa_full: bool = False
    flash_attn: bool | None = None
    verbose: bool = False


@dataclass(frozen=True)
class Sampling:
    """Sampling settings; temperature 0 means greedy."""

    temperature: float = 0.3
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    grammar: str | None = None


def default_threads() -> int:
    """Physical-ish core count: llama.cpp decodes fastest with one thread per core."""
    return max(1, min(os.cpu_count() or 1, 8))


def _init_backend(verbose: bool) -> None:
    global _backend_ready
    llama_logger.set_verbose(verbose)
    if not _backend_ready:
        llama_cpp.llama_backend_init()
        _backend_ready = True


class Engine:
    """A loaded model with one context; not thread-safe (callers serialize access)."""

    def __init__(self, path: str | os.PathLike, config: EngineConfig = EngineConfig()):
        if config.kv_type not in KV_TYPES:
            raise R7BError(f"unknown kv_type {config.kv_type!r}; choose from {', '.join(KV_TYPES)}")
        _init_backend(config.verbose)
        self.path = Path(path)
        self.config = config
        self.n_threads = config.n_threads or default_threads()
        self._model = self._load_model()
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self._ctx = self._new_context()
        self._mem = llama_cpp.llama_get_memory(self._ctx)
        self.n_ctx = llama_cpp.llama_n_ctx(self._ctx)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        self.n_swa = llama_cpp.llama_model_n_swa(self._model)
        self.bos = llama_cpp.llama_vocab_bos(self._vocab)
        self.cached: list[int] = []
        self._pieces: dict[int, bytes] = {}
        self._piece_buf = ctypes.create_string_buffer(256)
        self._token_buf = (llama_cpp.llama_token * config.n_batch)()

    # -- set-up ------------------------------------------------------------------------------

    def _load_model(self):
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = self.config.n_gpu_layers if self.config.n_gpu_layers >= 0 else 0x7FFFFFFF
        model = llama_cpp.llama_model_load_from_file(str(self.path).encode(), params)
        if not model:
            raise R7BError(f"llama.cpp could not load {self.path} (run `r7b info` on it for details)")
        return model

    def _new_context(self):
        cfg = self.config
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = cfg.n_ctx
        params.n_batch = params.n_ubatch = cfg.n_batch
        params.n_threads = params.n_threads_batch = self.n_threads
        params.type_k = params.type_v = KV_TYPES[cfg.kv_type]
        params.swa_full = cfg.swa_full
        params.n_seq_max = 1
        if cfg.flash_attn is not None:
            params.flash_attn_type = int(cfg.flash_attn)
        elif cfg.kv_type not in ("f16", "f32", "bf16"):
            params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED  # a quantized V cache needs it
        ctx = llama_cpp.llama_init_from_model(self._model, params)
        if not ctx:
            llama_cpp.llama_model_free(self._model)
            raise R7BError(f"llama.cpp could not create a context of {cfg.n_ctx} tokens with a {cfg.kv_type} KV cache")
        return ctx

    def close(self) -> None:
        if getattr(self, "_ctx", None):
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
        if getattr(self, "_model", None):
            llama_cpp.llama_model_free(self._model)
            self._model = None

    def __del__(self):
        self.close()

    # -- vocabulary ----------------------------------------------------------------------------

    def tokenize(self, text: str, *, special: bool, add_bos: bool = False) -> list[int]:
        """Tokenize; `special=False` keeps control-token text as plain text."""
        data = text.encode("utf-8")
        cap = len(data) + 8
        buf = (llama_cpp.llama_token * cap)()
        n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buf, cap, add_bos, special)
        if n < 0:
            raise R7BError("tokenization failed")
        return buf[:n]

    def piece(self, token: int) -> bytes:
        """Token bytes, with special tokens rendered as their text; memoized."""
        out = self._pieces.get(token)
        if out is None:
            n = llama_cpp.llama_token_to_piece(self._vocab, token, self._piece_buf, 256, 0, True)
            out = self._piece_buf.raw[:max(n, 0)]
            self._pieces[token] = out
        return out

    def detokenize(self, tokens: Sequence[int]) -> str:
        return b"".join(self.piece(t) for t in tokens).decode("utf-8", errors="replace")

    def control_tokens(self) -> dict[str, int]:
        """Text of every control token, e.g. '<|END_OF_TURN_TOKEN|>' -> 255001."""
        out = {}
        for tok in range(self.n_vocab):
            if llama_cpp.llama_vocab_get_attr(self._vocab, tok) & llama_cpp.LLAMA_TOKEN_ATTR_CONTROL:
                out[llama_cpp.llama_vocab_get_text(self._vocab, tok).decode("utf-8", "replace")] = tok
        return out

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))

    def metadata(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(4096)
        n = llama_cpp.llama_model_meta_val_str(self._model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace") if n >= 0 else None

    # -- evaluation ----------------------------------------------------------------------------

    def reset(self) -> None:
        llama_cpp.llama_memory_clear(self._mem, True)
        self.cached = []

    def _reusable_prefix(self, tokens: Sequence[int]) -> int:
        n = 0
        for a, b in zip(self.cached, tokens):
            if a != b:
                break
            n += 1
        n = min(n, len(tokens) - 1)  # the last prompt token is always evaluated, for its logits
        if n <= 0:
            return 0
        if n < len(self.cached):
            pos_min = llama_cpp.llama_memory_seq_pos_min(self._mem, 0)
            window = self.n_swa if (self.n_swa and not self.config.swa_full) else 0
            if window and pos_min > max(0, n - window):
                return 0  # the window positions before n were already evicted
            if not llama_cpp.llama_memory_seq_rm(self._mem, 0, n, -1):
                return 0
        return n

    def prefill(self, tokens: Sequence[int]) -> int:
        """Make the cache hold exactly `tokens`; returns how many had to be evaluated."""
        if len(tokens) == 0:
            raise R7BError("empty prompt")
        if len(tokens) > self.n_ctx:
            raise R7BError(f"prompt has {len(tokens)} tokens; the context holds {self.n_ctx}")
        keep = self._reusable_prefix(tokens)
        if keep == 0:
            self.reset()
        else:
            self.cached = list(self.cached[:keep])
        self._decode(tokens[keep:])
        return len(tokens) - keep

    def _decode(self, tokens: Sequence[int]) -> None:
        step = self.config.n_batch
        for start in range(0, len(tokens), step):
            chunk = tokens[start:start + step]
            for i, tok in enumerate(chunk):
                self._token_buf[i] = tok
            rc = llama_cpp.llama_decode(self._ctx, llama_cpp.llama_batch_get_one(self._token_buf, len(chunk)))
            if rc != 0:
                self.reset()
                raise R7BError(f"llama.cpp decode failed (code {rc}); the KV cache may be full")
            self.cached.extend(chunk)

    def logits(self) -> "ctypes.Array[ctypes.c_float]":
        """Logits of the last evaluated token (a view into llama.cpp's buffer)."""
        return llama_cpp.llama_get_logits_ith(self._ctx, -1)

    def generate(self, sampling: Sampling, max_tokens: int, stop_ids: frozenset[int] = frozenset(),
                 ignore_eog: bool = False) -> Iterator[int]:
        """Sample up to max_tokens after a prefill; yields each token, ends after a stop/EOG token.

        `ignore_eog` keeps going past end-of-generation tokens, so a benchmark always produces
        `max_tokens` (stop_ids still apply).
        """
        sampler = self._sampler(sampling)
        try:
            room = self.n_ctx - len(self.cached)
            for _ in range(min(max_tokens, room)):
                tok = llama_cpp.llama_sampler_sample(sampler, self._ctx, -1)
                yield tok
                if tok in stop_ids or (not ignore_eog and llama_cpp.llama_vocab_is_eog(self._vocab, tok)):
                    return
                self._token_buf[0] = tok
                if llama_cpp.llama_decode(self._ctx, llama_cpp.llama_batch_get_one(self._token_buf, 1)) != 0:
                    self.reset()
                    raise R7BError("llama.cpp decode failed during generation")
                self.cached.append(tok)
        finally:
            llama_cpp.llama_sampler_free(sampler)

    def _sampler(self, s: Sampling):
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        add = lambda smpl: llama_cpp.llama_sampler_chain_add(chain, smpl)  # noqa: E731
        if s.grammar:
            grammar = llama_cpp.llama_sampler_init_grammar(self._vocab, s.grammar.encode(), b"root")
            if not grammar:
                llama_cpp.llama_sampler_free(chain)
                raise R7BError("invalid grammar")
            add(grammar)
        if s.temperature <= 0:
            add(llama_cpp.llama_sampler_init_greedy())
            return chain
        if s.top_k > 0:
            add(llama_cpp.llama_sampler_init_top_k(s.top_k))
        if s.top_p < 1.0:
            add(llama_cpp.llama_sampler_init_top_p(s.top_p, 1))
        if s.min_p > 0:
            add(llama_cpp.llama_sampler_init_min_p(s.min_p, 1))
        add(llama_cpp.llama_sampler_init_temp(s.temperature))
        seed = s.seed if s.seed is not None else llama_cpp.LLAMA_DEFAULT_SEED
        add(llama_cpp.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        return chain


class TextStream:
    """Incremental UTF-8 decoding of token bytes: a character split across tokens comes out whole."""

    def __init__(self, engine: Engine):
        self._engine = engine
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        return self._decoder.decode(self._engine.piece(token))

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)

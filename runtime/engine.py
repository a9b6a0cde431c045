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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import llama_cpp
import numpy as np

from r7b.cohere2 import kv_type_id
from r7b.errors import R7BError
from r7b.llama import LlamaModel, default_threads, free_context, resolve_flash_attn

@dataclass(frozen=True)
class EngineConfig:
    n_ctx: int = 8192
    n_batch: int = 512
    n_threads: int | None = None
    n_gpu_layers: int = 0
    kv_type: str = "f16"
    swa_full: bool = False
    flash_attn: str = "auto"  # "on", "off" or "auto" (off on the CPU: r7b.llama.resolve_flash_attn)
    n_seq: int = 1  # conversations batched in the context (runtime/slots.py), each with n_ctx tokens
    verbose: bool = False
    rpc: tuple[str, ...] = ()  # RPC workers "host:port" that take a share of the layers
    tensor_split: tuple[float, ...] | None = None  # this machine, then each worker (default: by free memory)
    placement: Any = field(default=None, compare=False)  # an r7b.rpc.Placement already planned (Model.load)


DRY_BREAKERS = ("\n", ":", "\"", "*")  # llama-server's default DRY sequence breakers


@dataclass(frozen=True)
class Sampling:
    """Sampling settings; temperature 0 means greedy."""

    temperature: float = 0.3
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    grammar: str | None = None
    # Repetition control, named as llama-server names it; the defaults leave it off. The penalties
    # and DRY see the last `repeat_last_n` / `dry_penalty_last_n` tokens, prompt included, as in
    # llama-server (-1: the whole context).
    repeat_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repeat_last_n: int = 64
    dry_multiplier: float = 0.0
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_penalty_last_n: int = 64
    dry_sequence_breakers: tuple[str, ...] = DRY_BREAKERS
    # (token, bias) pairs added to the raw logits before any other sampler, as llama-server does;
    # a bias of -inf bans the token.
    logit_bias: tuple[tuple[int, float], ...] = ()

    @property
    def penalized(self) -> bool:
        return self.repeat_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    @property
    def dry(self) -> bool:
        return self.dry_multiplier != 0.0 and self.dry_base >= 1.0 and self.dry_penalty_last_n != 0


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens two sequences share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class Engine:
    """A loaded model with one context; not thread-safe (callers serialize access)."""

    def __init__(self, path: str | os.PathLike, config: EngineConfig = EngineConfig()):
        kv_type_id(config.kv_type)
        self.flash_attn = resolve_flash_attn(config.flash_attn, config.kv_type, config.n_gpu_layers != 0, config.n_ctx)
        self.path = Path(path)
        self.config = config
        self.n_threads = config.n_threads or default_threads()
        placement = config.placement
        if placement is None and config.rpc:
            from r7b import rpc
            from r7b.gguf_reader import read_gguf

            n_layers = int(read_gguf(self.path).metadata["cohere2.block_count"])
            placement = rpc.plan(config.rpc, n_layers, config.tensor_split)
        self.placement = placement
        self.model = LlamaModel(self.path, n_gpu_layers=config.n_gpu_layers, verbose=config.verbose,
                                placement=placement)
        self._vocab = self.model.vocab
        try:
            self._ctx = self.model.new_context(n_ctx=config.n_ctx * config.n_seq, n_batch=config.n_batch,
                                               n_threads=self.n_threads, kv_type=config.kv_type,
                                               swa_full=config.swa_full, n_seq_max=config.n_seq,
                                               flash_attn=self.flash_attn)
        except R7BError:
            self.model.close()
            raise
        self._mem = llama_cpp.llama_get_memory(self._ctx)
        self.n_ctx = llama_cpp.llama_n_ctx_seq(self._ctx)  # one conversation's room
        self.n_vocab = self.model.n_vocab
        self.n_swa = self.model.n_swa
        self.bos = self.model.bos
        self.cached: list[int] = []
        self._pieces: dict[int, bytes] = {}
        self._token_buf = (llama_cpp.llama_token * config.n_batch)()

    def close(self) -> None:
        free_context(getattr(self, "_ctx", None))
        self._ctx = None
        if getattr(self, "model", None) is not None:
            self.model.close()

    def __del__(self):
        self.close()

    # -- vocabulary ----------------------------------------------------------------------------

    def tokenize(self, text: str, *, special: bool, add_bos: bool = False) -> list[int]:
        """Tokenize; `special=False` keeps control-token text as plain text."""
        return self.model.tokenize(text, special=special, add_bos=add_bos)

    def piece(self, token: int) -> bytes:
        """Token bytes, with special tokens rendered as their text; memoized (thread-safe: parallel
        slots decode text in their own threads)."""
        out = self._pieces.get(token)
        if out is None:
            buf = ctypes.create_string_buffer(256)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, 256, 0, True)
            out = buf.raw[:max(n, 0)]
            self._pieces[token] = out
        return out

    def detokenize(self, tokens: Sequence[int]) -> str:
        return b"".join(self.piece(t) for t in tokens).decode("utf-8", errors="replace")

    def control_tokens(self) -> dict[str, int]:
        """Text of every control token, e.g. '<|END_OF_TURN_TOKEN|>' -> 255001."""
        out = {}
        for tok in range(self.n_vocab):
            if self.model.token_attr(tok) & llama_cpp.LLAMA_TOKEN_ATTR_CONTROL:
                out[self.model.token_text(tok).decode("utf-8", "replace")] = tok
        return out

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))

    def ends_turn(self, token: int, stop_ids: frozenset[int], ignore_eog: bool = False) -> bool:
        """A stop id, or end of generation unless the caller ignores it (a benchmark)."""
        return token in stop_ids or (not ignore_eog and self.is_eog(token))

    def metadata(self, key: str) -> str | None:
        return self.model.metadata(key)

    # -- evaluation ----------------------------------------------------------------------------

    def reset(self) -> None:
        llama_cpp.llama_memory_clear(self._mem, True)
        self.cached = []

    def clear_seq(self, seq: int) -> None:
        """Free every KV cell of one sequence."""
        llama_cpp.llama_memory_seq_rm(self._mem, seq, -1, -1)

    def seq_cells(self, seq: int) -> int:
        """Positions a sequence holds in the cache (0 when its cells are free)."""
        return llama_cpp.llama_memory_seq_pos_max(self._mem, seq) + 1

    def check_prompt(self, tokens: Sequence[int]) -> None:
        if len(tokens) == 0:
            raise R7BError("empty prompt")
        if len(tokens) > self.n_ctx:
            raise R7BError(f"prompt has {len(tokens)} tokens; the context holds {self.n_ctx}")

    def keep_prefix(self, cached: Sequence[int], tokens: Sequence[int], seq: int = 0) -> int:
        """How much of sequence `seq`'s cache (holding `cached`) the prompt `tokens` can keep; the rest
        of the sequence's cells are freed."""
        # the last prompt token is always evaluated, for its logits
        n = min(common_prefix(cached, tokens), len(tokens) - 1)
        if n > 0 and n < len(cached):
            pos_min = llama_cpp.llama_memory_seq_pos_min(self._mem, seq)
            window = self.n_swa if (self.n_swa and not self.config.swa_full) else 0
            if window and pos_min > max(0, n - window):
                n = 0  # the window positions before n were already evicted
            elif not llama_cpp.llama_memory_seq_rm(self._mem, seq, n, -1):
                n = 0
        if n <= 0:
            self.clear_seq(seq)
            return 0
        return n

    def prefill(self, tokens: Sequence[int]) -> int:
        """Make the cache hold exactly `tokens`; returns how many had to be evaluated."""
        self.check_prompt(tokens)
        keep = self.keep_prefix(self.cached, tokens)
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

    def logits(self, idx: int = -1) -> "ctypes.Array[ctypes.c_float]":
        """Logits of the last evaluated token, or of batch row `idx` (a view into llama.cpp's buffer)."""
        return llama_cpp.llama_get_logits_ith(self._ctx, idx)

    def generate(self, sampling: Sampling, max_tokens: int, stop_ids: frozenset[int] = frozenset(),
                 ignore_eog: bool = False, logprobs: int | None = None) -> Iterator[int]:
        """Sample up to max_tokens after a prefill; yields each token, ends after a stop/EOG token.

        `ignore_eog` keeps going past end-of-generation tokens, so a benchmark always produces
        `max_tokens` (stop_ids still apply). Between a token's yield and the next step,
        `logprobs` reads the distribution it was sampled from (`logprobs=` is for the batched
        slots, which must know in advance; here it is read on demand).
        """
        sampler = self.sampler(sampling, history=self.cached)
        try:
            room = self.n_ctx - len(self.cached)
            for _ in range(min(max_tokens, room)):
                tok = llama_cpp.llama_sampler_sample(sampler, self._ctx, -1)
                yield tok
                if self.ends_turn(tok, stop_ids, ignore_eog):
                    return
                self._token_buf[0] = tok
                if llama_cpp.llama_decode(self._ctx, llama_cpp.llama_batch_get_one(self._token_buf, 1)) != 0:
                    self.reset()
                    raise R7BError("llama.cpp decode failed during generation")
                self.cached.append(tok)
        finally:
            llama_cpp.llama_sampler_free(sampler)

    def logprobs(self, token: int, top: int = 0, idx: int = -1) -> tuple[float, list[tuple[int, float]]]:
        """Log-probability of `token` and the `top` likeliest tokens, from the last logits.

        As llama-server reports them by default: log-softmax of the model's raw logits over the
        whole vocabulary, before any sampler (penalties, temperature, truncation) touched them.
        """
        logits = np.ctypeslib.as_array(self.logits(idx), shape=(self.n_vocab,))
        peak = float(logits.max())
        log_z = peak + float(np.log(np.exp(logits - peak, dtype=np.float64).sum()))
        best: list[tuple[int, float]] = []
        if top > 0:
            idx = np.argpartition(logits, -top)[-top:]
            idx = idx[np.argsort(-logits[idx], kind="stable")]
            best = [(int(i), float(logits[i]) - log_z) for i in idx]
        return float(logits[token]) - log_z, best

    def sampler(self, s: Sampling, history: Sequence[int] = ()):
        """llama.cpp's sampler chain for `s`; penalties and DRY first see `history` (the prompt)."""
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        add = lambda smpl: llama_cpp.llama_sampler_chain_add(chain, smpl)  # noqa: E731
        if s.grammar:
            grammar = llama_cpp.llama_sampler_init_grammar(self._vocab, s.grammar.encode(), b"root")
            if not grammar:
                llama_cpp.llama_sampler_free(chain)
                raise R7BError("invalid grammar")
            add(grammar)
        if s.logit_bias:
            pairs = (llama_cpp.llama_logit_bias * len(s.logit_bias))(*s.logit_bias)
            add(llama_cpp.llama_sampler_init_logit_bias(self.n_vocab, len(pairs), pairs))  # copies the pairs
        # As llama-server's chain: logit bias, penalties, DRY, top-k, top-p, min-p, temperature, then
        # the draw. The grammar is the chain's own; the history goes to the penalty samplers alone.
        seen = []
        if s.penalized and s.repeat_last_n != 0:
            last_n = self.n_ctx if s.repeat_last_n < 0 else min(s.repeat_last_n, self.n_ctx)
            seen.append((llama_cpp.llama_sampler_init_penalties(self.n_vocab, last_n, s.repeat_penalty,
                                                                s.frequency_penalty, s.presence_penalty), last_n))
        if s.dry:
            last_n = self.n_ctx if s.dry_penalty_last_n < 0 else min(s.dry_penalty_last_n, self.n_ctx)
            breakers = [b.encode("utf-8") for b in s.dry_sequence_breakers if b]
            arr = (ctypes.c_char_p * max(len(breakers), 1))(*breakers)
            seen.append((llama_cpp.llama_sampler_init_dry(self._vocab, s.dry_multiplier, s.dry_base,
                                                          s.dry_allowed_length, last_n, arr, len(breakers)), last_n))
        for smpl, last_n in seen:
            add(smpl)
            for tok in history[-last_n:]:
                llama_cpp.llama_sampler_accept(smpl, tok)
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

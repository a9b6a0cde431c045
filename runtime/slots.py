"""Several conversations batched in one llama.cpp context: continuous batching.

Each slot is one llama.cpp sequence with KV cells of its own. One thread, the step loop, owns the
context: each step puts one token for every slot that is generating, and in the room the batch has
left the next chunk of any prompt being prefilled, into a single `llama_decode`, then samples every
slot's next token from its own row of logits. A newcomer's long prompt so goes in between decode
steps while the running answers keep flowing.

The request threads (one per conversation) see a `Slot` with the engine's `prefill` / `generate` /
`logprobs`, so `Model` runs a turn the same way on either. The loop does not wait for them between
tokens: it decodes each sampled token in the next step and queues it, up to `LOOKAHEAD` ahead of
the reader, which parses, checks stop strings and streams meanwhile. Stop ids, end of generation
and `max_tokens` end a turn in the loop itself; a reader that stops early (a stop string, a hang-up)
leaves at most `LOOKAHEAD` decoded tokens behind, which the next turn's prefix match trims. A slot keeps its conversation in
its cells after the turn, so a follow-up turn that lands on it (`SlotPool.acquire` prefers the slot
sharing the longest prefix) evaluates only its new tokens; a turn that is abandoned (the client
hung up) frees its cells.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any, Iterator, Sequence

import llama_cpp

from r7b.errors import R7BError
from r7b.llama import Batch

from .engine import Engine, Sampling, common_prefix

GRACE_S = 0.005  # how long a step waits for slow request threads, to keep their tokens in one batch
LOOKAHEAD = 4  # tokens the loop may sample ahead of a request thread that has not taken them yet


class Slot:
    """One sequence of the shared context, as a request thread sees it; fields are guarded by the
    pool's lock and changed by the step loop unless said otherwise."""

    def __init__(self, pool: "SlotPool", seq: int):
        self.pool, self.seq = pool, seq
        self.cached: list[int] = []  # what this sequence's cells hold
        self.busy = False  # held by a request (acquire .. release)
        self.last_used = 0.0
        self.prompt: list[int] | None = None  # a prefill asked for, not yet planned
        self.history: list[int] = []  # the prompt of the running turn, for the penalty samplers
        self.pending: list[int] = []  # prompt tokens still to decode
        self.evaluated: int | None = None
        self.sampler: Any = None  # set while `generate` runs
        self.want = False  # a turn is generating
        self.budget = 0  # tokens the loop may still sample this turn
        self.stop_ids: frozenset[int] = frozenset()
        self.ignore_eog = False
        self.feed: int | None = None  # the token to decode before sampling the next
        # (token, its log-probabilities, whether it ends the turn), sampled, not yet taken
        self.out: deque[tuple[int, Any, bool]] = deque()
        self.logprob_top: int | None = None
        self.logprob: tuple[float, list[tuple[int, float]]] | None = None  # the last taken token's
        self.in_step = False  # the loop is decoding or sampling for this slot right now
        self.error: BaseException | None = None
        self.arrived = 0.0

    # -- the request thread's side: the Engine's interface ------------------------------------

    def prefill(self, tokens: Sequence[int]) -> int:
        """Ask for `tokens` in the cache; returns how many will be evaluated (the rest is reused)."""
        pool = self.pool
        pool.engine.check_prompt(tokens)
        with pool.cond:
            self.prompt, self.history, self.evaluated, self.error = list(tokens), list(tokens), None, None
            self.arrived = time.monotonic()
            pool.cond.notify_all()
            pool.wait_for(lambda: self.evaluated is not None or self.error is not None)
            self._raise()
            return self.evaluated  # type: ignore[return-value]

    def generate(self, sampling: Sampling, max_tokens: int, stop_ids: frozenset[int] = frozenset(),
                 ignore_eog: bool = False, logprobs: int | None = None) -> Iterator[int]:
        """As `Engine.generate`; `logprobs` (top-k, or None) is read at sampling time, in the loop."""
        pool = self.pool
        sampler = pool.engine.sampler(sampling, history=self.history)
        budget = min(max_tokens, pool.engine.n_ctx - len(self.history))
        try:
            with pool.cond:
                self.sampler, self.logprob_top, self.feed = sampler, logprobs, None
                self.budget, self.stop_ids, self.ignore_eog, self.want = budget, stop_ids, ignore_eog, True
                self.out.clear()
                pool.cond.notify_all()
            for _ in range(budget):
                tok, last = self._next()
                yield tok
                if last:
                    return
        finally:
            with pool.cond:
                self.want = False
                pool.wait_for(lambda: not self.in_step)
                self.sampler, self.feed, self.pending = None, None, []
                self.out.clear()
            llama_cpp.llama_sampler_free(sampler)

    def logprobs(self, token: int, top: int = 0) -> tuple[float, list[tuple[int, float]]]:
        if self.logprob is None:
            raise R7BError("logprobs were not asked for when generation started")
        return self.logprob

    def _next(self) -> tuple[int, bool]:
        pool = self.pool
        with pool.cond:
            pool.wait_for(lambda: self.out or self.error is not None)
            self._raise()
            tok, self.logprob, last = self.out.popleft()
            if len(self.out) == LOOKAHEAD - 1:  # the loop may be holding this slot back
                pool.cond.notify_all()
            return tok, last

    def _raise(self) -> None:
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    # -- what the loop asks of it --------------------------------------------------------------

    def has_work(self) -> bool:
        if self.prompt is not None:
            return True
        if self.pending:
            return len(self.pending) > 1 or self.want
        return self.want and self.feed is not None and len(self.out) < LOOKAHEAD

    def lagging(self) -> bool:
        """A token to decode, held back until the request thread takes what is queued."""
        return self.want and self.feed is not None and len(self.out) >= LOOKAHEAD


class SlotPool:
    """`n` slots over one engine whose context was made with `n_seq=n`; thread-safe."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.n = engine.config.n_seq
        self.cond = threading.Condition()
        self.slots = [Slot(self, i) for i in range(self.n)]
        self._batch = Batch(engine.config.n_batch, 1)
        self._closing = False
        self._stepping = False  # llama.cpp is decoding: the cache is not to be read
        self.stats = {"steps": 0, "mixed_steps": 0}  # mixed: decode tokens and a prompt chunk in one batch
        self._loop = threading.Thread(target=self._run, name="r7b-steps", daemon=True)
        self._loop.start()

    def wait_for(self, predicate) -> None:
        """Wait (holding `cond`) until `predicate` holds; a closed pool raises instead."""
        while not predicate():
            if self._closing:
                raise R7BError("the model was closed")
            self.cond.wait()

    # -- requests ------------------------------------------------------------------------------

    def acquire(self, tokens: Sequence[int]) -> Slot:
        """A free slot, waiting for one: the one whose conversation `tokens` continue (sharing at
        least half its cache, as llama-server's slot similarity), else an empty one, else the least
        recently used, so a shared preamble alone does not evict another conversation."""
        def score(s: Slot) -> tuple[int, bool, float]:
            shared = common_prefix(s.cached, tokens)
            return (shared if 2 * shared >= len(s.cached) else 0, not s.cached, -s.last_used)

        with self.cond:
            self.wait_for(lambda: any(not s.busy for s in self.slots))
            slot = max((s for s in self.slots if not s.busy), key=score)
            slot.busy = True
            return slot

    def release(self, slot: Slot, *, drop: bool) -> None:
        """End a request's hold; `drop` (an abandoned turn) frees the slot's cells."""
        with self.cond:
            self.wait_for(lambda: not self._stepping)  # holding the lock, no step can start
            slot.busy, slot.last_used, slot.prompt, slot.pending = False, time.monotonic(), None, []
            if drop:
                self.engine.clear_seq(slot.seq)
                slot.cached = []
            self.cond.notify_all()

    def occupancy(self) -> list[int]:
        """Cells each slot's sequence holds, read from llama.cpp's cache between steps."""
        with self.cond:
            self.wait_for(lambda: not self._stepping)
            return [self.engine.seq_cells(s.seq) for s in self.slots]

    def states(self) -> list[dict[str, Any]]:
        """Each slot as `GET /slots` shows it: busy or idle, and the cells its conversation holds."""
        cells = self.occupancy()
        with self.cond:
            return [{"id": s.seq, "n_ctx": self.engine.n_ctx, "busy": s.busy, "cells": n}
                    for s, n in zip(self.slots, cells)]

    def close(self) -> None:
        with self.cond:
            self._closing = True
            self.cond.notify_all()
        self._loop.join()
        self._batch.close()

    # -- the step loop -------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self.cond:
                if not self._wait_for_work():
                    return
                self._housekeep()
                plan = self._plan()
                for slot, _, _ in plan:
                    slot.in_step = True
                self._stepping = bool(plan)
            rc = self._decode(plan) if plan else 0
            with self.cond:
                self._after(plan, rc)
                self.cond.notify_all()

    def _wait_for_work(self) -> bool:
        """Until some slot has work and no generating slot waits for its reader (or a short grace has
        passed, so that the slots' tokens share a batch); False when closing."""
        deadline = None
        while not self._closing:
            if any(s.has_work() for s in self.slots):
                if not any(s.lagging() for s in self.slots):
                    return True
                now = time.monotonic()
                deadline = deadline or now + GRACE_S
                if now >= deadline:
                    return True
                self.cond.wait(deadline - now)
            else:
                deadline = None
                self.cond.wait()
        return False

    def _housekeep(self) -> None:
        """Plan new prompts against what each slot's cache holds."""
        engine = self.engine
        for s in self.slots:
            if s.prompt is not None:
                keep = engine.keep_prefix(s.cached, s.prompt, s.seq)
                s.cached = s.cached[:keep]
                s.pending, s.evaluated, s.prompt = s.prompt[keep:], len(s.prompt) - keep, None

    def _plan(self) -> list[tuple[Slot, list[int], bool]]:
        """This step's batch: (slot, tokens, sample after them), decode tokens first, then prompt
        chunks oldest first; a prompt's last token waits until its sampler is there."""
        room = self.engine.config.n_batch
        plan: list[tuple[Slot, list[int], bool]] = []
        for s in self.slots:
            if not s.pending and s.has_work():
                plan.append((s, [s.feed], True))
                room -= 1
        for s in sorted((s for s in self.slots if s.pending), key=lambda s: s.arrived):
            ready = len(s.pending) if s.want else len(s.pending) - 1
            take = min(room, ready)
            if take > 0:
                plan.append((s, s.pending[:take], s.want and take == len(s.pending)))
                room -= take
        return plan

    def _decode(self, plan: list[tuple[Slot, list[int], bool]]) -> int:
        batch = self._batch.ptr
        j = 0
        for slot, tokens, sample in plan:
            start = len(slot.cached)
            for i, tok in enumerate(tokens):
                batch.token[j], batch.pos[j], batch.n_seq_id[j] = tok, start + i, 1
                batch.seq_id[j][0] = slot.seq
                batch.logits[j] = sample and i == len(tokens) - 1
                j += 1
        batch.n_tokens = j
        return llama_cpp.llama_decode(self.engine._ctx, batch)

    def _after(self, plan: list[tuple[Slot, list[int], bool]], rc: int) -> None:
        engine, row = self.engine, 0
        self._stepping = False
        if plan:
            self.stats["steps"] += 1
            kinds = {bool(slot.pending) for slot, _, _ in plan}
            self.stats["mixed_steps"] += len(kinds) == 2
        for slot, tokens, sample in plan:
            slot.in_step = False
            row += len(tokens)
            if rc != 0:
                engine.clear_seq(slot.seq)
                slot.cached, slot.pending, slot.want = [], [], False
                slot.error = R7BError(f"llama.cpp decode failed (code {rc}); the KV cache may be full")
                continue
            slot.cached.extend(tokens)
            if slot.pending:
                slot.pending = slot.pending[len(tokens):]
            else:
                slot.feed = None
            if sample:
                self._sample(slot, row - 1)

    def _sample(self, slot: Slot, row: int) -> None:
        """The slot's next token, queued for its reader and, unless it ends the turn, fed to the next step."""
        tok = llama_cpp.llama_sampler_sample(slot.sampler, self.engine._ctx, row)
        scored = self.engine.logprobs(tok, slot.logprob_top, row) if slot.logprob_top is not None else None
        slot.budget -= 1
        ends = self.engine.ends_turn(tok, slot.stop_ids, slot.ignore_eog)
        slot.out.append((tok, scored, ends))
        slot.feed = tok if slot.budget > 0 and not ends else None


MAX_AUTO_SLOTS = 4


def plan_slots(summary: Any, parallel: int | None, *, n_ctx: int, kv_type: str = "f16", swa_full: bool = False,
               flash_attn: str = "auto", check_memory: bool = True) -> int:
    """How many slots: `parallel` checked against free memory, or for None the most (up to 4) whose
    KV caches fit beside the weights; each slot holds `n_ctx` tokens."""
    from r7b.cohere2 import Cohere2Dims
    from r7b.memory import available_memory, estimate_ram, format_bytes, repacked_bytes

    if parallel is not None and not 1 <= parallel <= llama_cpp.llama_max_parallel_sequences():
        raise R7BError(f"parallel must be between 1 and {llama_cpp.llama_max_parallel_sequences()}, not {parallel}")
    if parallel == 1 or (parallel is not None and not check_memory):
        return parallel
    one = estimate_ram(sum(t.nbytes for t in summary.tensors), Cohere2Dims.from_gguf_metadata(summary.metadata),
                       n_ctx, kv_type=kv_type, swa_full=swa_full, flash_attn=flash_attn,
                       repacked=repacked_bytes(summary.tensors))
    available = available_memory()
    fits = 1 + max(0, available - one.working_set) // max(one.kv_cache, 1)
    if parallel is None:
        return int(max(1, min(MAX_AUTO_SLOTS, fits)))
    if parallel > fits:
        need = one.working_set + (parallel - 1) * one.kv_cache
        raise R7BError(f"{parallel} slots of {n_ctx} tokens need about {format_bytes(need)} (weights "
                       f"{format_bytes(one.weights)} + {parallel} x {kv_type} KV cache {format_bytes(one.kv_cache)} "
                       f"+ compute and runtime {format_bytes(one.compute + one.overhead)}) but only "
                       f"{format_bytes(available)} is available: use fewer slots, a shorter context or a "
                       "quantized KV cache")
    return parallel

"""The Python embedding API: `Model.load(path)` then `model.chat(messages, tools=..., documents=...)`.

A prompt is rendered with the project's templates, tokenized so that only template-written
special tokens are control tokens, generated with llama.cpp, and parsed into text, thinking,
tool calls and citations. The engine keeps the conversation's KV cache, so each new turn only
evaluates its new tokens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

from llama_cpp import LLAMA_TOKEN_ATTR_CONTROL

from r7b.cohere2 import STOP_TEXTS
from r7b.errors import R7BError
from r7b.fsutil import atomic_output
from r7b.gguf_validate import validate_gguf
from r7b.memory import check_fits
from r7b.templates import gguf_templates

from .engine import Engine, EngineConfig, Sampling, TextStream
from .parse import StreamParser
from .prompt import render_prompt
from .protect import Protector, check_vocab
from .request import ChatRequest, PreparedPrompt, prepare
from .slots import SlotPool, plan_slots
from .template_worker import TemplateWorker
from .turn import ChatResult, Choice, Done, TokenLogprob, TurnAPI, Usage, final_result  # noqa: F401 -- re-exported

CHAT_TEMPLATES = ("builtin", "gguf")


def file_templates(summary: Any, worker: TemplateWorker | None = None) -> dict[str, str]:
    """A GGUF's own chat templates, each tried once so a bad one fails at load.

    They render in `worker` (a separate process under OS limits; closed here if a template
    fails), or in a worker of their own, closed afterwards.
    """
    sources = gguf_templates(summary.metadata)
    if not sources:
        raise R7BError(f"{summary.path} carries no chat template; use chat_template='builtin'")
    own = worker is None
    worker = TemplateWorker(summary.path) if own else worker
    try:
        for name in sources:
            messages, tools, documents = _SAMPLES[name]
            try:
                render_prompt(messages, tools, documents, template=name, sources=sources, worker=worker)
            except R7BError as exc:
                worker.close()
                message = str(exc)
                raise R7BError(message if str(summary.path) in message else f"{summary.path}: {message}") from None
    finally:
        if own:
            worker.close()
    return sources


_TOOL = {"type": "function", "function": {"name": "search", "description": "Search the web.",
                                          "parameters": {"type": "object", "properties": {}}}}
_SAMPLES = {"default": ([{"role": "user", "content": "Hello"}], None, None),
            "tool_use": ([{"role": "user", "content": "Hello"}], [_TOOL], None),
            "rag": ([{"role": "user", "content": "Hello"}], None, [{"title": "t", "text": "Some text."}])}


class Model(TurnAPI):
    """A Command R7B GGUF loaded with llama.cpp.

    Loaded with `parallel=1` (the default), one call at a time. With `parallel=N`, up to N turns
    may run at once from different threads (or `chat_many`): they are batched into the same
    llama.cpp steps, each conversation in a slot of its own (runtime/slots.py).
    """

    def __init__(self, engine: Engine, template_sources: dict[str, str] | None = None,
                 template_worker: TemplateWorker | None = None):
        self.engine = engine
        self.parallel = engine.config.n_seq
        self.slots = SlotPool(engine) if self.parallel > 1 else None
        self.path = engine.path
        self.template_sources = template_sources
        # A file's own templates render in a process of this model's (started on first use).
        self.template_worker = template_worker or (TemplateWorker(engine.path) if template_sources else None)
        check_vocab(engine.n_vocab, engine.model.token_attr, engine.model.token_text, str(engine.path))
        control = engine.control_tokens()
        self.protector = Protector(control)
        self._stop_ids = frozenset(control[t] for t in STOP_TEXTS if t in control)
        # What `ignore_eos` bans: every token that would end the turn.
        self._end_ids = sorted(self._stop_ids | {t for t in control.values() if engine.is_eog(t)})

    @classmethod
    def load(cls, path: str | os.PathLike, *, n_ctx: int = 8192, n_threads: int | None = None,
             n_gpu_layers: int = 0, kv_type: str = "f16", swa_full: bool = False, n_batch: int = 512,
             flash_attn: str = "auto", check_memory: bool = True, chat_template: str = "builtin",
             verbose: bool = False, rpc: Sequence[str] | str | None = None,
             tensor_split: Sequence[float] | str | None = None, parallel: int | None = 1) -> "Model":
        """Load a GGUF. CPU by default; n_gpu_layers=-1 offloads all layers (Metal, CUDA) where built.

        `parallel=N` gives N conversations `n_ctx` tokens each of KV cache and batches their turns
        (see the class); `None` picks N from the memory their caches need (at most 4).

        `chat_template="gguf"` formats prompts with the file's own templates instead of the
        project's (for a fine-tune that changed them); they are checked here, in the sandbox.

        `rpc=["host:port", ...]` shares the layers between this CPU and `r7b worker`s (llama.cpp's
        RPC backend), by each device's free memory or by `tensor_split` (this machine first, then
        each worker). A worker that drops mid-answer makes llama.cpp abort the process;
        `remote.load_model(..., isolate=True)` runs the model in a supervised child process
        instead, where such a failure becomes an R7BError for that request only.
        """
        from r7b import rpc as rpc_mod

        endpoints = rpc_mod.parse_endpoints(rpc)
        split = rpc_mod.parse_split(tensor_split)
        if split is not None and not endpoints:
            raise R7BError("tensor_split needs RPC workers (rpc=[...] / --rpc HOST:PORT,...)")
        path = Path(path)
        if not path.is_file():
            raise R7BError(f"no such model file: {path}")
        summary = validate_gguf(path, arch="cohere2", check_tensor_data=False)
        if chat_template not in CHAT_TEMPLATES:
            raise R7BError(f"chat_template must be one of {', '.join(CHAT_TEMPLATES)}, not {chat_template!r}")
        # A process of its own renders the file's templates (template_worker.py).
        template_worker = TemplateWorker(path) if chat_template == "gguf" else None
        sources = file_templates(summary, template_worker) if template_worker is not None else None
        n_ctx = min(n_ctx, int(summary.metadata.get("cohere2.context_length", n_ctx))) or n_ctx
        placement = None
        if endpoints and n_ctx >= 256:  # connects to the workers (each probed first)
            placement = rpc_mod.plan(endpoints, int(summary.metadata["cohere2.block_count"]), split)
        if check_memory:
            check_fits(summary, n_ctx=n_ctx, kv_type=kv_type, swa_full=swa_full, placement=placement,
                       flash_attn=flash_attn)
        if n_ctx < 256:
            raise R7BError(f"n_ctx must be at least 256 tokens, got {n_ctx}")
        n_seq = plan_slots(summary, parallel, n_ctx=n_ctx, kv_type=kv_type, swa_full=swa_full,
                           flash_attn=flash_attn, check_memory=check_memory)
        if n_seq > 1 and endpoints:
            raise R7BError("parallel slots are not available with RPC workers yet: use parallel=1")
        config = EngineConfig(n_ctx=n_ctx, n_batch=min(n_batch, n_ctx), n_threads=n_threads, n_gpu_layers=n_gpu_layers,
                              kv_type=kv_type, swa_full=swa_full, flash_attn=flash_attn, verbose=verbose, n_seq=n_seq,
                              rpc=tuple(endpoints), tensor_split=tuple(split) if split else None, placement=placement)
        engine = Engine(path, config)
        try:
            return cls(engine, sources, template_worker)
        except BaseException:
            engine.close()
            if template_worker is not None:
                template_worker.close()
            raise

    def close(self) -> None:
        if self.slots is not None:
            self.slots.close()
        self.engine.close()
        if self.template_worker is not None:
            self.template_worker.close()

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- prompt ------------------------------------------------------------------------------

    def render(self, messages: Sequence[dict], tools: list | None = None, documents: list | None = None,
               **options: Any) -> str:
        """The fenced prompt string (see protect.py); `Protector.strip` gives the plain one."""
        fence = self.protector.fence
        return render_prompt(fence(list(messages)), fence(tools) if tools is not None else None,
                             fence(documents) if documents is not None else None, sources=self.template_sources,
                             worker=self.template_worker,
                             **options)

    def tokenize_prompt(self, rendered: str) -> list[int]:
        return self.protector.tokenize(rendered, lambda text, special: self.engine.tokenize(text, special=special))

    # -- chat --------------------------------------------------------------------------------

    def prepare(self, request: ChatRequest) -> PreparedPrompt:
        """The request's prompt tokens, limits and grammar (see request.py)."""
        return prepare(self, request)

    def generate(self, prompt: PreparedPrompt, sampling: dict[str, Any]) -> Iterator[object]:
        """Run a prepared prompt: parser events, then `Done(result)`; with n > 1, each answer after a `Choice`.

        With parallel slots, the turn holds one slot; a turn abandoned before its end (the
        generator closed early, an error) frees the slot's cells, a finished one keeps them for
        the conversation's next turn.
        """
        if self.slots is None:
            yield from self._turn(prompt, sampling, self.engine)
            return
        slot = self.slots.acquire(prompt.tokens)
        finished = False
        try:
            for event in self._turn(prompt, sampling, slot):
                finished = isinstance(event, Done)  # the consumer may stop reading at the result
                yield event
        finally:
            self.slots.release(slot, drop=not finished)

    def slot_states(self) -> list[dict[str, Any]]:
        """Each conversation slot: busy or idle, and the KV cells it holds (one slot: the tokens cached)."""
        if self.slots is not None:
            return self.slots.states()
        return [{"id": 0, "n_ctx": self.engine.n_ctx, "busy": None, "cells": len(self.engine.cached)}]

    def chat_many(self, conversations: Sequence[Sequence[dict]], **options: Any) -> list[ChatResult]:
        """One assistant turn for each conversation, run side by side (batched with `parallel` > 1);
        `options` are `chat`'s, shared by all."""
        from concurrent.futures import ThreadPoolExecutor

        if options.get("stream"):
            raise R7BError("chat_many returns whole results: stream is not available")
        with ThreadPoolExecutor(max_workers=self.parallel, thread_name_prefix="r7b-chat") as pool:
            return list(pool.map(lambda messages: self.chat(messages, **options), conversations))

    def _turn(self, prompt: PreparedPrompt, sampling: dict[str, Any], seq: Any) -> Iterator[object]:
        if prompt.n == 1:
            result = yield from self._generate_one(prompt, sampling, seq)
            yield Done(result)
            return
        results = []
        for i in range(prompt.n):
            yield Choice(i)
            seed = sampling.get("seed")
            # each answer re-evaluates only the prompt's last token: prefill keeps the rest cached
            results.append((yield from self._generate_one(prompt, sampling if seed is None or i == 0
                                                          else {**sampling, "seed": seed + i}, seq)))
        usage = Usage(prompt_tokens=len(prompt.tokens), completion_tokens=sum(r.usage.completion_tokens
                                                                             for r in results),
                      cached_tokens=results[0].usage.cached_tokens)
        yield Done(dataclasses.replace(results[0], usage=usage, choices=results))

    def _generate_one(self, prompt: PreparedPrompt, sampling: dict[str, Any], seq: Any) -> Iterator[object]:
        """One answer's events on `seq` (the engine, or a slot); returns its `ChatResult`."""
        sampler = self._sampling(sampling, prompt.grammar)
        evaluated = seq.prefill(prompt.tokens)
        parser = StreamParser(tool_call_ids=prompt.tool_call_ids, has_documents=prompt.has_documents)
        yield from parser.feed(prompt.prefix)
        raw, n_out, finish = [], 0, "length"
        logprobs: list[dict] | None = None if prompt.logprobs is None else []
        text_out = TextStream(self.engine)
        holdback = _StopScanner(prompt.stop)
        # closed on the way out, whatever happens: a slot's sampler must be let go before the slot is
        with contextlib.closing(seq.generate(sampler, prompt.max_tokens, self._stop_ids,
                                             logprobs=prompt.logprobs)) as tokens:
            for tok in tokens:
                n_out += 1
                if logprobs is not None and not self.engine.model.token_attr(tok) & LLAMA_TOKEN_ATTR_CONTROL:
                    entry = self._logprob_entry(tok, seq.logprobs(tok, prompt.logprobs))
                    logprobs.append(entry)
                    yield TokenLogprob(entry)
                piece = text_out.push(tok)
                if self.engine.ends_turn(tok, self._stop_ids):
                    raw.append(piece)
                    yield from parser.feed(holdback.flush() + piece)
                    finish = "stop"
                    break
                safe, hit = holdback.push(piece)
                raw.append(piece)
                if safe:
                    yield from parser.feed(safe)
                if hit:
                    finish = "stop"
                    break
            else:
                yield from parser.feed(holdback.flush() + text_out.flush())
        tail_events, parsed = parser.finish(finish_reason=finish)
        yield from tail_events
        raw_text = holdback.text if holdback.hit is not None else "".join(raw)
        usage = Usage(prompt_tokens=len(prompt.tokens), completion_tokens=n_out,
                      cached_tokens=len(prompt.tokens) - evaluated)
        return ChatResult(text=parsed.text, thinking=parsed.thinking, tool_calls=parsed.tool_calls,
                          citations=parsed.citations, finish_reason=parsed.finish_reason or finish,
                          usage=usage, raw=prompt.prefix + raw_text, malformed=parsed.malformed,
                          error=parsed.error, parsed=parsed, logprobs=logprobs)

    def _sampling(self, sampling: dict[str, Any], grammar: str | None) -> Sampling:
        """`ignore_eos` bans the tokens that end a turn, as llama-server does: the answer runs to its limit."""
        options = {k: v for k, v in sampling.items() if k != "ignore_eos"}
        bias = tuple(options.pop("logit_bias", ()))
        if sampling.get("ignore_eos"):
            bias += tuple((t, float("-inf")) for t in self._end_ids)
        return Sampling(**options, grammar=grammar, logit_bias=bias)

    def _logprob_entry(self, token: int, scored: tuple[float, list[tuple[int, float]]]) -> dict:
        logprob, best = scored

        def item(tok: int, lp: float) -> dict:
            data = self.engine.piece(tok)
            return {"token": data.decode("utf-8", "replace"), "logprob": lp, "bytes": list(data)}

        return {**item(token, logprob), "top_logprobs": [item(t, lp) for t, lp in best]}


class _StopScanner:
    """Finds user stop strings in the streamed text, holding back only a possible partial match."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.keep = max((len(s) for s in self.stops), default=1) - 1
        self.text = ""
        self._emitted = 0
        self.hit: str | None = None

    def push(self, piece: str) -> tuple[str, bool]:
        self.text += piece
        if not self.stops:
            out, self._emitted = self.text[self._emitted:], len(self.text)
            return out, False
        cut = min((i for i in (self.text.find(s, max(0, self._emitted - self.keep)) for s in self.stops) if i >= 0),
                  default=-1)
        if cut >= 0:
            self.hit = self.text[cut:]
            out = self.text[self._emitted:cut]
            self.text = self.text[:cut]
            self._emitted = cut
            return out, True
        safe_end = max(self._emitted, len(self.text) - self.keep)
        out, self._emitted = self.text[self._emitted:safe_end], safe_end
        return out, False

    def flush(self) -> str:
        out, self._emitted = self.text[self._emitted:], len(self.text)
        return out


class ChatSession:
    """A conversation that remembers its messages; each `send` reuses the cached prefix."""

    def __init__(self, model: Model, *, system: str | None = None, tools: list | None = None,
                 documents: list | None = None, **defaults: Any):
        self.model, self.tools, self.documents, self.defaults = model, tools, documents, defaults
        self.system = system
        self.messages: list[dict] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def send(self, content: str | None = None, *, role: str = "user", stream: bool = False, **options: Any):
        """Add a message (user by default) and generate the assistant's turn."""
        if content is not None:
            self.messages.append({"role": role, "content": content})
        kwargs = {**self.defaults, **options}
        result = self.model.chat(self.messages, self.tools, self.documents, stream=stream, **kwargs)
        if not stream:
            self.messages.append(result.message())
            return result
        return self._record(result)

    def _record(self, events: Iterator[object]) -> Iterator[object]:
        for event in events:
            if isinstance(event, Done):
                self.messages.append(event.result.message())
            yield event

    def save(self, path: str | os.PathLike) -> None:
        with atomic_output(path, force=True) as tmp:
            tmp.write_text(json.dumps({"messages": self.messages, "tools": self.tools,
                                       "documents": self.documents}, ensure_ascii=False, indent=2))

    def load(self, path: str | os.PathLike) -> None:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise R7BError(f"cannot load conversation from {path}: {exc}") from None
        if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
            raise R7BError(f"{path} is not a saved conversation (no 'messages' list)")
        self.messages = data["messages"]
        self.tools = data.get("tools", self.tools)
        self.documents = data.get("documents", self.documents)

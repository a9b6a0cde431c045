"""The Python embedding API: `Model.load(path)` then `model.chat(messages, tools=..., documents=...)`.

A prompt is rendered with the project's templates, tokenized so that only template-written
special tokens are control tokens, generated with llama.cpp, and parsed into text, thinking,
tool calls and citations. The engine keeps the conversation's KV cache, so each new turn only
evaluates its new tokens.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from r7b.cohere2 import STOP_TEXTS
from r7b.errors import R7BError
from r7b.fsutil import atomic_output
from r7b.gguf_validate import validate_gguf
from r7b.memory import check_fits
from r7b.templates import gguf_templates

from .engine import Engine, EngineConfig, Sampling, TextStream
from .parse import ParsedOutput, StreamParser, to_assistant_message
from .prompt import render_prompt
from .protect import Protector, check_vocab
from .request import ChatRequest, PreparedPrompt, prepare

CHAT_TEMPLATES = ("builtin", "gguf")


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_dict(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.total_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}


@dataclass
class ChatResult:
    """What one assistant turn produced."""

    text: str
    thinking: str | None
    tool_calls: list[dict]
    citations: list
    finish_reason: str
    usage: Usage
    raw: str
    malformed: bool = False
    error: str | None = None
    parsed: ParsedOutput | None = field(default=None, repr=False)

    def message(self) -> dict:
        """The assistant message to append to the conversation."""
        return to_assistant_message(self.parsed)


@dataclass
class Done:
    """Last streaming event: the full result, equal to what `stream=False` returns."""

    result: ChatResult


def file_templates(summary: Any) -> dict[str, str]:
    """A GGUF's own chat templates, each tried once in the sandbox so a bad one fails at load."""
    sources = gguf_templates(summary.metadata)
    if not sources:
        raise R7BError(f"{summary.path} carries no chat template; use chat_template='builtin'")
    for name in sources:
        messages, tools, documents = _SAMPLES[name]
        try:
            render_prompt(messages, tools, documents, template=name, sources=sources)
        except R7BError as exc:
            raise R7BError(f"{summary.path}: {exc}") from None
    return sources


_TOOL = {"type": "function", "function": {"name": "search", "description": "Search the web.",
                                          "parameters": {"type": "object", "properties": {}}}}
_SAMPLES = {"default": ([{"role": "user", "content": "Hello"}], None, None),
            "tool_use": ([{"role": "user", "content": "Hello"}], [_TOOL], None),
            "rag": ([{"role": "user", "content": "Hello"}], None, [{"title": "t", "text": "Some text."}])}


class Model:
    """A Command R7B GGUF loaded with llama.cpp. Not thread-safe: one call at a time."""

    def __init__(self, engine: Engine, template_sources: dict[str, str] | None = None):
        self.engine = engine
        self.path = engine.path
        self.template_sources = template_sources
        check_vocab(engine.n_vocab, engine.model.token_attr, engine.model.token_text, str(engine.path))
        control = engine.control_tokens()
        self.protector = Protector(control)
        self._stop_ids = frozenset(control[t] for t in STOP_TEXTS if t in control)

    @classmethod
    def load(cls, path: str | os.PathLike, *, n_ctx: int = 8192, n_threads: int | None = None,
             n_gpu_layers: int = 0, kv_type: str = "f16", swa_full: bool = False, n_batch: int = 512,
             flash_attn: str = "auto", check_memory: bool = True, chat_template: str = "builtin",
             verbose: bool = False) -> "Model":
        """Load a GGUF. CPU by default; n_gpu_layers=-1 offloads all layers (Metal, CUDA) where built.

        `chat_template="gguf"` formats prompts with the file's own templates instead of the
        project's (for a fine-tune that changed them); they are checked here, in the sandbox.
        """
        path = Path(path)
        if not path.is_file():
            raise R7BError(f"no such model file: {path}")
        summary = validate_gguf(path, arch="cohere2", check_tensor_data=False)
        if chat_template not in CHAT_TEMPLATES:
            raise R7BError(f"chat_template must be one of {', '.join(CHAT_TEMPLATES)}, not {chat_template!r}")
        sources = file_templates(summary) if chat_template == "gguf" else None
        n_ctx = min(n_ctx, int(summary.metadata.get("cohere2.context_length", n_ctx))) or n_ctx
        if check_memory:
            check_fits(summary, n_ctx=n_ctx, kv_type=kv_type, swa_full=swa_full)
        if n_ctx < 256:
            raise R7BError(f"n_ctx must be at least 256 tokens, got {n_ctx}")
        config = EngineConfig(n_ctx=n_ctx, n_batch=min(n_batch, n_ctx), n_threads=n_threads, n_gpu_layers=n_gpu_layers,
                              kv_type=kv_type, swa_full=swa_full, flash_attn=flash_attn, verbose=verbose)
        engine = Engine(path, config)
        try:
            return cls(engine, sources)
        except BaseException:
            engine.close()
            raise

    def close(self) -> None:
        self.engine.close()

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
                             **options)

    def tokenize_prompt(self, rendered: str) -> list[int]:
        return self.protector.tokenize(rendered, lambda text, special: self.engine.tokenize(text, special=special))

    # -- chat --------------------------------------------------------------------------------

    def chat(self, messages: Sequence[dict], tools: list | None = None, documents: list | None = None, *,
             stream: bool = False, max_tokens: int = 512, temperature: float = 0.3, top_p: float = 1.0,
             top_k: int = 0, min_p: float = 0.0, seed: int | None = None, stop: Sequence[str] | str | None = None,
             mode: str | None = None, safety: str | None = None, template: str = "auto",
             enable_citations: bool | None = None, grammar: str | None = None, tool_choice: str = "auto",
             response_format: dict | None = None, constrain_tools: bool = False) -> ChatResult | Iterator[object]:
        """One assistant turn. With stream=True, yields parser events and finally `Done(result)`.

        `tool_choice` ("auto", "none", "required" or a tool's name) and `response_format`
        ({"schema": ...}) are enforced with a grammar; `constrain_tools` holds any tool call to
        the tools' schemas without forcing one.
        """
        if max_tokens < 1:
            raise R7BError("max_tokens must be at least 1")
        request = ChatRequest(
            messages=list(messages), tools=tools, documents=documents, citations=enable_citations,
            tool_choice=tool_choice, response_format=response_format, grammar=grammar,
            constrain_tools=constrain_tools, max_tokens=max_tokens,
            sampling={"temperature": temperature, "top_p": top_p, "top_k": top_k, "min_p": min_p, "seed": seed},
            stop=[stop] if isinstance(stop, str) else list(stop or []), template=template, mode=mode, safety=safety)
        events = self.generate(self.prepare(request), request.sampling)
        if stream:
            return events
        return final_result(events)

    def prepare(self, request: ChatRequest) -> PreparedPrompt:
        """The request's prompt tokens, limits and grammar (see request.py)."""
        return prepare(self, request)

    def generate(self, prompt: PreparedPrompt, sampling: dict[str, Any]) -> Iterator[object]:
        """Run a prepared prompt: parser events, then `Done(result)`."""
        sampler = Sampling(**{**sampling, "grammar": prompt.grammar})
        evaluated = self.engine.prefill(prompt.tokens)
        parser = StreamParser(tool_call_ids=prompt.tool_call_ids, has_documents=prompt.has_documents)
        yield from parser.feed(prompt.prefix)
        raw, n_out, finish = [], 0, "length"
        text_out = TextStream(self.engine)
        holdback = _StopScanner(prompt.stop)
        for tok in self.engine.generate(sampler, prompt.max_tokens, self._stop_ids):
            n_out += 1
            piece = text_out.push(tok)
            if tok in self._stop_ids or self.engine.is_eog(tok):
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
        yield Done(ChatResult(text=parsed.text, thinking=parsed.thinking, tool_calls=parsed.tool_calls,
                              citations=parsed.citations, finish_reason=parsed.finish_reason or finish,
                              usage=usage, raw=prompt.prefix + raw_text, malformed=parsed.malformed,
                              error=parsed.error, parsed=parsed))


def final_result(events: Iterator[object]) -> ChatResult:
    """The result at the end of an event stream."""
    for event in events:
        if isinstance(event, Done):
            return event.result
    raise AssertionError("generation ended without a result")


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

"""The Python embedding API: `Model.load(path)` then `model.chat(messages, tools=..., documents=...)`.

A prompt is rendered with the project's templates, tokenized so that only template-written
special tokens are control tokens, generated with llama.cpp, and parsed into text, thinking,
tool calls and citations. The engine keeps the conversation's KV cache, so each new turn only
evaluates its new tokens.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from r7b.errors import R7BError

from .engine import Engine, EngineConfig, Sampling, TextStream
from .parse import ParsedOutput, StreamParser, parse_output, to_assistant_message
from .prompt import render_prompt
from .protect import Protector, tokenize_rendered

CHAT_TEMPLATES = ("builtin", "gguf")
STOP_TEXTS = ("<|END_OF_TURN_TOKEN|>", "<|END_RESPONSE|>")
RESPONSE_OPEN = "<|START_RESPONSE|>"


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


def tool_call_ids(messages: Sequence[dict]) -> list[str]:
    """Ids of the tool calls in the conversation, in prompt order (citations refer to them)."""
    ids = []
    for msg in messages:
        for call in msg.get("tool_calls") or []:
            if isinstance(call, dict) and call.get("id") is not None:
                ids.append(str(call["id"]))
    return ids


def file_templates(summary: Any) -> dict[str, str]:
    """A GGUF's own chat templates, each tried once in the sandbox so a bad one fails at load."""
    from r7b.templates import gguf_templates

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
        control = engine.control_tokens()
        self.protector = Protector(control)
        self._stop_ids = frozenset(control[t] for t in STOP_TEXTS if t in control)

    @classmethod
    def load(cls, path: str | os.PathLike, *, n_ctx: int = 8192, n_threads: int | None = None,
             n_gpu_layers: int = 0, kv_type: str = "f16", swa_full: bool = False, n_batch: int = 512,
             check_memory: bool = True, chat_template: str = "builtin", verbose: bool = False) -> "Model":
        """Load a GGUF. CPU by default; n_gpu_layers=-1 offloads all layers (Metal, CUDA) where built.

        `chat_template="gguf"` formats prompts with the file's own templates instead of the
        project's (for a fine-tune that changed them); they are checked here, in the sandbox.
        """
        path = Path(path)
        if not path.is_file():
            raise R7BError(f"no such model file: {path}")
        from r7b.convert.validate import validate_gguf

        summary = validate_gguf(path, arch="cohere2", check_tensor_data=False)
        if chat_template not in CHAT_TEMPLATES:
            raise R7BError(f"chat_template must be one of {', '.join(CHAT_TEMPLATES)}, not {chat_template!r}")
        sources = file_templates(summary) if chat_template == "gguf" else None
        n_ctx = min(n_ctx, int(summary.metadata.get("cohere2.context_length", n_ctx))) or n_ctx
        if check_memory:
            from .memory import check_fits

            check_fits(summary, n_ctx=n_ctx, kv_type=kv_type, swa_full=swa_full)
        if n_ctx < 256:
            raise R7BError(f"n_ctx must be at least 256 tokens, got {n_ctx}")
        config = EngineConfig(n_ctx=n_ctx, n_batch=min(n_batch, n_ctx), n_threads=n_threads, n_gpu_layers=n_gpu_layers,
                              kv_type=kv_type, swa_full=swa_full, verbose=verbose)
        return cls(Engine(path, config), sources)

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
        return tokenize_rendered(rendered, lambda text, special: self.engine.tokenize(text, special=special))

    # -- chat --------------------------------------------------------------------------------

    def chat(self, messages: Sequence[dict], tools: list | None = None, documents: list | None = None, *,
             stream: bool = False, max_tokens: int = 512, temperature: float = 0.3, top_p: float = 1.0,
             top_k: int = 0, min_p: float = 0.0, seed: int | None = None, stop: Sequence[str] | str | None = None,
             mode: str | None = None, safety: str | None = None, template: str = "auto",
             enable_citations: bool | None = None, grammar: str | None = None,
             constrain_tools: bool = False) -> ChatResult | Iterator[object]:
        """One assistant turn. With stream=True, yields parser events and finally `Done(result)`."""
        if max_tokens < 1:
            raise R7BError("max_tokens must be at least 1")
        if enable_citations is None:
            enable_citations = bool(documents)
        rendered = self.render(messages, tools, documents, template=template, mode=mode, safety=safety,
                               enable_citations=enable_citations)
        if constrain_tools and tools and grammar is None:
            from .grammar import tool_call_grammar

            grammar = tool_call_grammar(tools)
        sampling = Sampling(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed,
                            grammar=grammar)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        events = self._run(rendered, sampling, max_tokens, stops, tool_call_ids(messages), bool(documents))
        if stream:
            return events
        for event in events:
            if isinstance(event, Done):
                return event.result
        raise AssertionError("generation ended without a result")

    def _run(self, rendered: str, sampling: Sampling, max_tokens: int, stops: list[str],
             call_ids: list[str], has_documents: bool) -> Iterator[object]:
        tokens = self.tokenize_prompt(rendered)
        evaluated = self.engine.prefill(tokens)
        plain = Protector.strip(rendered)
        prefix = RESPONSE_OPEN if plain.endswith(RESPONSE_OPEN) else ""
        parser = StreamParser(tool_call_ids=call_ids, has_documents=has_documents)
        yield from parser.feed(prefix)
        raw, n_out, finish = [], 0, "length"
        text_out = TextStream(self.engine)
        holdback = _StopScanner(stops)
        for tok in self.engine.generate(sampling, max_tokens, self._stop_ids):
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
        raw_text = "".join(raw)
        if holdback.hit is not None:
            raw_text = holdback.text
        usage = Usage(prompt_tokens=len(tokens), completion_tokens=n_out, cached_tokens=len(tokens) - evaluated)
        yield Done(ChatResult(text=parsed.text, thinking=parsed.thinking, tool_calls=parsed.tool_calls,
                              citations=parsed.citations, finish_reason=parsed.finish_reason or finish,
                              usage=usage, raw=prefix + raw_text, malformed=parsed.malformed,
                              error=parsed.error, parsed=parsed))


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
        from r7b.fsutil import atomic_output

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

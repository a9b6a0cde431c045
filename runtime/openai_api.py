"""OpenAI's chat-completions wire format, mapped to and from the model's terms; no web framework here.

`to_request` turns a validated `ChatCompletionRequest` into a `ChatRequest`; `Reply` and
`ChunkWriter` turn a `ChatResult` and the model's streaming events into OpenAI's completion and
`chat.completion.chunk` objects.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import time
from typing import Any

from .model import ChatResult, Done
from .openai_schema import ChatCompletion, ChatCompletionChunk, ChatCompletionRequest
from .parse import TextDelta, ThinkingDelta, ToolCallEvent
from .request import ChatRequest


def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n".join(part.text for part in content)


def _json_or_text(text: str) -> Any:
    """Tool output that is a JSON object or array is shown to the model as JSON, not as a quoted string."""
    if not text.lstrip().startswith(("{", "[")):
        return text
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return text
    return value if isinstance(value, (dict, list)) else text


def template_message(msg: Any) -> dict:
    """An OpenAI message as the chat templates take it (prompt.py maps the remaining OpenAI fields)."""
    if msg.role in ("system", "developer"):
        return {"role": "system", "content": _text(msg.content)}
    if msg.role == "user":
        return {"role": "user", "content": _text(msg.content)}
    if msg.role == "tool":
        return {"role": "tool", "tool_call_id": msg.tool_call_id, "content": _json_or_text(_text(msg.content))}
    out: dict[str, Any] = {"role": "assistant", "content": _text(msg.content)}
    if msg.tool_calls:
        out["tool_calls"] = [c.model_dump() for c in msg.tool_calls]
    plan = msg.tool_plan or msg.reasoning_content
    if plan:
        out["tool_plan"] = plan
    return out


def _tools(req: ChatCompletionRequest) -> list[dict] | None:
    if not req.tools or req.tool_choice == "none":
        return None
    return [_tool(t.function) for t in req.tools]


def _tool(fn: Any) -> dict:
    """The template prints `description` and `parameters` of every tool; OpenAI lets clients omit both."""
    parameters = fn.parameters if fn.parameters is not None else {"type": "object", "properties": {}}
    return {"type": "function", "function": {"name": fn.name, "description": fn.description or "",
                                             "parameters": parameters}}


def _tool_choice(req: ChatCompletionRequest) -> str:
    choice = req.tool_choice
    if choice is None or isinstance(choice, str):
        return choice or "auto"
    return choice.function.name


def _response_format(req: ChatCompletionRequest) -> dict | None:
    fmt = req.response_format
    if fmt is None or fmt.type == "text":
        return None
    return {"schema": fmt.json_schema.schema_ if fmt.type == "json_schema" else None}


def to_request(req: ChatCompletionRequest, max_tokens: int | None = None) -> ChatRequest:
    """`max_tokens`: the server's ceiling; a request asking for more gets that many (finish_reason "length")."""
    documents = [{"text": d} if isinstance(d, str) else d for d in req.documents] if req.documents else None
    citations = next((f for f in (req.citations_enabled, req.enable_citations) if f is not None), bool(documents))
    sampling = {k: v for k, v in (("temperature", req.temperature), ("top_p", req.top_p), ("top_k", req.top_k),
                                  ("seed", req.seed)) if v is not None}
    stop = [] if req.stop is None else [req.stop] if isinstance(req.stop, str) else list(req.stop)
    return ChatRequest(messages=[template_message(m) for m in req.messages], tools=_tools(req), documents=documents,
                       citations=citations, tool_choice=_tool_choice(req), response_format=_response_format(req),
                       max_tokens=min(filter(None, (req.max_completion_tokens or req.max_tokens, max_tokens)),
                                      default=None),
                       sampling=sampling, stop=stop)


def finish_reason(result: ChatResult) -> str:
    if result.tool_calls:
        return "tool_calls"
    return "length" if result.finish_reason == "length" else "stop"


def _tool_call_out(call: dict) -> dict:
    fn = call["function"]
    args = fn["arguments"]
    return {"id": str(call["id"]), "type": "function",
            "function": {"name": fn["name"], "arguments": args if isinstance(args, str) else json.dumps(args)}}


def _citations(result: ChatResult) -> list[dict]:
    return [c.to_dict() for c in result.citations]


@dataclasses.dataclass
class Reply:
    """What every chunk or completion of one request shares."""

    model: str
    citations: bool
    include_usage: bool = False
    id: str = dataclasses.field(default_factory=lambda: "chatcmpl-" + secrets.token_hex(12))
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))

    def completion(self, result: ChatResult) -> dict:
        message: dict[str, Any] = {"content": result.text if result.text or not result.tool_calls else None}
        if result.tool_calls:
            message["tool_calls"] = [_tool_call_out(c) for c in result.tool_calls]
        if result.thinking:
            message["reasoning_content"] = result.thinking
        if self.citations or result.citations:
            message["citations"] = _citations(result)
        body = ChatCompletion(id=self.id, created=self.created, model=self.model, usage=result.usage.to_dict(),
                              choices=[{"message": message, "finish_reason": finish_reason(result)}])
        return body.model_dump(mode="json")

    def chunk(self, delta: dict | None, finish: str | None = None, usage: dict | None = None) -> str:
        choices = [] if delta is None else [{"delta": delta, "finish_reason": finish}]
        chunk = ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)
        return f"data: {chunk.model_dump_json()}\n\n"


class ChunkWriter:
    """Turns model events into `chat.completion.chunk` lines."""

    def __init__(self, reply: Reply):
        self.reply = reply
        self.tool_calls = 0

    def start(self) -> str:
        return self.reply.chunk({"role": "assistant", "content": ""})

    def event(self, event: object) -> list[str]:
        if isinstance(event, (TextDelta, ThinkingDelta)) and event.text:
            key = "content" if isinstance(event, TextDelta) else "reasoning_content"
            return [self.reply.chunk({key: event.text})]
        if isinstance(event, ToolCallEvent):
            return [self._tool_call(event.tool_call)]
        if isinstance(event, Done):
            return self._finish(event.result)
        return []

    def _tool_call(self, call: dict) -> str:
        line = self.reply.chunk({"tool_calls": [{"index": self.tool_calls, **_tool_call_out(call)}]})
        self.tool_calls += 1
        return line

    def _finish(self, result: ChatResult) -> list[str]:
        lines = [self._tool_call(c) for c in result.tool_calls[self.tool_calls:]]  # any the parser held back
        delta = {"citations": _citations(result)} if self.reply.citations or result.citations else {}
        lines.append(self.reply.chunk(delta, finish=finish_reason(result)))
        if self.reply.include_usage:
            lines.append(self.reply.chunk(None, usage=result.usage.to_dict()))
        return lines

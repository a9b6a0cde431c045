"""Cohere's Chat API v2 wire format, mapped to and from the model's terms; no web framework here.

`to_request` turns a validated `CohereChatRequest` into a `ChatRequest` and a `Reply`, which
knows the request's documents and tool results by the ids the client gave them; `Reply.response`
and `EventWriter` turn a `ChatResult` and the model's streaming events into v2 response objects
and stream events (the order and shapes of /work/shared/cohere-v2-api.md §3-§5).

Tool-call ids: the model numbers its calls "0", "1", ... in each turn, so the server issues
unique ones (`<name>_<12 hex>`). Nothing has to map them back: the templates show earlier calls
and their results to the model by position in the conversation (the tool message's
`tool_call_id` finds its call among the assistant turns), and citations of a tool result come
back from the parser under the id the client sent, which is the server's.
"""

from __future__ import annotations

import dataclasses
import json
import re
import secrets
import uuid
from typing import Any

from .cohere_schema import CohereChatRequest, CohereDocument
from .engine import Sampling
from .model import ChatResult, Done
from .parse import DOCUMENTS_CALL_ID, Citation, TextDelta, ThinkingDelta, ToolCallEvent
from .request import ChatRequest, RequestError, json_or_text

DEFAULT_P = 0.75  # Cohere's default top-p
# A turn the model ended itself ends in the text of the end-of-generation token; one cut by a stop
# sequence ends where the stop sequence began.
_ENDED_BY_MODEL = re.compile(r"<\|?[A-Za-z_]+\|?>$")
_SAMPLING_FIELDS = frozenset(f.name for f in dataclasses.fields(Sampling))


def error_body(message: str) -> dict:
    """Cohere's error shape."""
    return {"id": str(uuid.uuid4()), "message": message}


def _sse(event: dict) -> str:
    return f"data: {json.dumps(event, ensure_ascii=True)}\n\n"


# -- request -------------------------------------------------------------------------------------


def _as_object(value: Any) -> dict:
    """A source's document or tool output must be an object."""
    if isinstance(value, dict):
        return value
    return {"text": value} if isinstance(value, str) else {"result": value}


def _data(doc: CohereDocument) -> dict:
    return _as_object(json_or_text(doc.data) if isinstance(doc.data, str) else doc.data)


def _text(content: Any, what: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if part.type == "image_url":
            raise RequestError(f"{what}: images are not supported (Command R7B reads text only)", param="messages",
                               code="unsupported_content")
        if part.type == "text":
            parts.append(part.text)
    return "\n".join(parts)


@dataclasses.dataclass
class Sources:
    """What a citation can name: the request's documents by position, tool results by call id."""

    documents: list[dict] = dataclasses.field(default_factory=list)
    tools: dict[str, list[dict]] = dataclasses.field(default_factory=dict)

    def resolve(self, citation: Citation) -> list[dict]:
        out: list[dict] = []
        for source in citation.sources:
            found: list[dict] = []
            if source.tool_call_id == DOCUMENTS_CALL_ID and 0 <= source.index < len(self.documents):
                found = [self.documents[source.index]]
            elif source.tool_call_id in self.tools:
                found = self.tools[source.tool_call_id]
            out += [s for s in found if s not in out]
        return out


def _tool_result(msg: Any, sources: Sources) -> dict:
    """A tool message as the templates take it; its parts are recorded as citable tool outputs."""
    items: list[tuple[str | None, Any, dict]] = []  # (id, value shown to the model, tool_output)
    if isinstance(msg.content, str):
        value = json_or_text(msg.content)
        items.append((None, value, _as_object(value)))
    else:
        for part in msg.content:
            if part.type == "text":
                value = json_or_text(part.text)
                items.append((None, value, _as_object(value)))
            else:
                data = _data(part.document)
                items.append((part.document.id, data, data))
    outputs = sources.tools.setdefault(msg.tool_call_id, [])
    for n, (item_id, _, output) in enumerate(items, start=len(outputs)):
        outputs.append({"type": "tool", "id": item_id or f"{msg.tool_call_id}:{n}", "tool_output": output})
    values = [value for _, value, _ in items]
    content = values[0] if len(values) == 1 else values
    return {"role": "tool", "tool_call_id": msg.tool_call_id, "content": content}


def _tool_call(call: Any) -> dict:
    args = call.function.arguments
    return {"id": call.id, "type": "function",
            "function": {"name": call.function.name, "arguments": "{}" if args is None else args}}


def template_message(msg: Any, i: int, sources: Sources) -> dict:
    """A v2 message as the chat templates take it."""
    where = f"messages.{i}"
    if msg.role == "system":
        return {"role": "system", "content": _text(msg.content, where)}
    if msg.role == "user":
        return {"role": "user", "content": _text(msg.content, where)}
    if msg.role == "tool":
        return _tool_result(msg, sources)
    out: dict[str, Any] = {"role": "assistant", "content": _text(msg.content, where)}
    if msg.tool_calls:
        out["tool_calls"] = [_tool_call(c) for c in msg.tool_calls]
        out["tool_plan"] = msg.tool_plan or ""
    elif msg.tool_plan:
        out["tool_plan"] = msg.tool_plan
    return out


def _documents(req: CohereChatRequest, sources: Sources) -> list[dict] | None:
    if not req.documents:
        return None
    shown = []
    for i, doc in enumerate(req.documents):
        doc_id, data = (f"doc:{i}", {"text": doc}) if isinstance(doc, str) else (doc.id or f"doc:{i}", _data(doc))
        sources.documents.append({"type": "document", "id": doc_id, "document": {"id": doc_id, **data}})
        shown.append(data)
    return shown


def _sampling(req: CohereChatRequest) -> dict:
    asked = {"temperature": req.temperature, "top_p": req.p if req.p is not None else DEFAULT_P, "top_k": req.k,
             "seed": req.seed, "frequency_penalty": req.frequency_penalty, "presence_penalty": req.presence_penalty}
    sampling = {}
    for name, value in asked.items():
        if value is None:
            continue
        if name not in _SAMPLING_FIELDS:  # only if the engine lost a setting it has today
            if value:
                raise RequestError(f"{name} is not supported by this server", param=name, code="unsupported_value")
            continue
        sampling[name] = value
    if sampling.get("top_p") == 0:  # Cohere's minimum is 0.01; llama.cpp keeps at least one token either way
        sampling["top_p"] = 0.01
    return sampling


def _response_format(req: CohereChatRequest) -> dict | None:
    fmt = req.response_format
    if fmt is None or fmt.type == "text":
        return None
    return {"schema": fmt.json_schema if fmt.json_schema is not None else fmt.schema_}


def _citations_on(req: CohereChatRequest, has_tool_results: bool) -> bool | None:
    """Cohere cites documents and tool results unless told not to. With tools the grounding rules are
    in the prompt from the first turn, so that every turn of a tool loop has the same system turn."""
    mode = req.citation_options.mode if req.citation_options else None
    if mode in ("OFF", "DISABLED"):
        return False
    if mode is not None or req.documents or req.tools or has_tool_results:
        return True
    return None


def to_request(req: CohereChatRequest, max_tokens: int | None = None) -> tuple[ChatRequest, "Reply"]:
    """`max_tokens`: the server's ceiling; a request asking for more gets that many (finish_reason MAX_TOKENS)."""
    sources = Sources()
    messages = [template_message(m, i, sources) for i, m in enumerate(req.messages)]
    documents = _documents(req, sources)
    tools = [{"type": "function", "function": {
        "name": t.function.name, "description": t.function.description or "",
        "parameters": t.function.parameters if t.function.parameters is not None else
        {"type": "object", "properties": {}}}} for t in req.tools] if req.tools else None
    choice = {"REQUIRED": "required", "NONE": "none"}.get(req.tool_choice or "", "auto")
    stop = list(req.stop_sequences or [])
    chat = ChatRequest(messages=messages, tools=tools, documents=documents,
                       citations=_citations_on(req, bool(sources.tools)), tool_choice=choice,
                       response_format=_response_format(req), constrain_tools=bool(req.strict_tools and tools),
                       max_tokens=min(filter(None, (req.max_tokens, max_tokens)), default=None),
                       sampling=_sampling(req), stop=stop,
                       safety="strict" if req.safety_mode == "STRICT" else None)
    return chat, Reply(sources=sources, citations=chat.wants_citations, stop_sequences=bool(stop))


# -- response ------------------------------------------------------------------------------------


def server_call_id(call: dict) -> str:
    """A fresh id for one of the model's tool calls: `<name>_<12 hex>`."""
    return f"{call['function']['name']}_{secrets.token_hex(6)}"


def _arguments(call: dict) -> str:
    args = call["function"]["arguments"]
    return args if isinstance(args, str) else json.dumps(args)


def _usage(result: ChatResult | None) -> dict:
    n_in, n_out = (result.usage.prompt_tokens, result.usage.completion_tokens) if result else (0, 0)
    tokens = {"input_tokens": n_in, "output_tokens": n_out}
    return {"billed_units": dict(tokens), "tokens": tokens,
            "cached_tokens": result.usage.cached_tokens if result else 0}


@dataclasses.dataclass
class Reply:
    """What the response objects or events of one request share."""

    sources: Sources
    citations: bool  # send `message.citations`, a list even when empty
    stop_sequences: bool = False
    id: str = dataclasses.field(default_factory=lambda: str(uuid.uuid4()))
    call_ids: list[str] = dataclasses.field(default_factory=list)

    def finish_reason(self, result: ChatResult) -> str:
        if result.tool_calls:
            return "TOOL_CALL"
        if result.finish_reason == "length":
            return "MAX_TOKENS"
        if self.stop_sequences and not _ENDED_BY_MODEL.search(result.raw):  # cut by the caller's stop string
            return "STOP_SEQUENCE"
        return "COMPLETE"

    def call_id(self, index: int, call: dict) -> str:
        while len(self.call_ids) <= index:
            self.call_ids.append("")
        if not self.call_ids[index]:
            self.call_ids[index] = server_call_id(call)
        return self.call_ids[index]

    def tool_call(self, index: int, call: dict) -> dict:
        return {"id": self.call_id(index, call), "type": "function",
                "function": {"name": call["function"]["name"], "arguments": _arguments(call)}}

    def citation(self, citation: Citation) -> dict | None:
        sources = self.sources.resolve(citation)
        if not sources:
            return None
        return {"start": citation.start, "end": citation.end, "text": citation.text, "type": "TEXT_CONTENT",
                "sources": sources}

    def citation_list(self, result: ChatResult) -> list[dict]:
        return [c for c in map(self.citation, result.citations) if c is not None]

    def response(self, result: ChatResult) -> dict:
        """The non-streaming response body."""
        message: dict[str, Any] = {"role": "assistant"}
        if result.tool_calls:
            message["tool_plan"] = result.thinking or ""
            message["tool_calls"] = [self.tool_call(i, c) for i, c in enumerate(result.tool_calls)]
        elif result.thinking:
            message["tool_plan"] = result.thinking
        if result.text or not result.tool_calls:
            message["content"] = [{"type": "text", "text": result.text}]
        if self.citations or result.citations:
            message["citations"] = self.citation_list(result)
        return {"id": self.id, "finish_reason": self.finish_reason(result), "message": message,
                "usage": _usage(result)}


class EventWriter:
    """Turns model events into v2 stream events (`data: {...}` lines), in the documented order."""

    def __init__(self, reply: Reply):
        self.reply = reply
        self.tool_calls = 0
        self.content = "none"  # "none", "open", "closed"

    def start(self) -> str:
        return _sse({"id": self.reply.id, "type": "message-start", "delta": {"message": {
            "role": "assistant", "content": [], "tool_plan": "", "tool_calls": [], "citations": []}}})

    def event(self, event: object) -> list[str]:
        if isinstance(event, TextDelta) and event.text:
            delta = {"message": {"content": {"text": event.text}}}
            return [*self._open_content(), _sse({"type": "content-delta", "index": 0, "delta": delta})]
        if isinstance(event, ThinkingDelta) and event.text:
            return [_sse({"type": "tool-plan-delta", "delta": {"message": {"tool_plan": event.text}}})]
        if isinstance(event, ToolCallEvent):
            return self._tool_call(event.tool_call)
        if isinstance(event, Done):
            return self._finish(event.result)
        return []

    def error(self, message: str) -> list[str]:
        """After the status line: the failure goes in message-end."""
        return [*self._close_content(), _sse({"type": "message-end", "delta": {
            "finish_reason": "ERROR", "error": message, "usage": _usage(None)}})]

    def failure(self, message: str, body: dict) -> list[str]:
        """The stream's last lines when generation fails after the status line was sent."""
        return [*self.error(message), "data: [DONE]\n\n"]

    def _open_content(self) -> list[str]:
        if self.content != "none":
            return []
        self.content = "open"
        return [_sse({"type": "content-start", "index": 0,
                      "delta": {"message": {"content": {"type": "text", "text": ""}}}})]

    def _close_content(self, citations: list[dict] = ()) -> list[str]:
        if self.content != "open":
            return []
        self.content = "closed"
        lines = []
        for k, citation in enumerate(citations):
            lines += [_sse({"type": "citation-start", "index": k, "delta": {"message": {"citations": citation}}}),
                      _sse({"type": "citation-end", "index": k})]
        return [*lines, _sse({"type": "content-end", "index": 0})]

    def _tool_call(self, call: dict) -> list[str]:
        i = self.tool_calls
        self.tool_calls += 1
        out = self.reply.tool_call(i, call)
        start = {**out, "function": {"name": out["function"]["name"], "arguments": ""}}
        return [*self._close_content(),
                _sse({"type": "tool-call-start", "index": i, "delta": {"message": {"tool_calls": start}}}),
                _sse({"type": "tool-call-delta", "index": i, "delta": {"message": {"tool_calls": {
                    "function": {"arguments": out["function"]["arguments"]}}}}}),
                _sse({"type": "tool-call-end", "index": i})]

    def _finish(self, result: ChatResult) -> list[str]:
        lines = [line for c in result.tool_calls[self.tool_calls:] for line in self._tool_call(c)]
        if not result.tool_calls:
            lines += self._open_content()
        lines += self._close_content(self.reply.citation_list(result))
        lines.append(_sse({"type": "message-end", "delta": {"finish_reason": self.reply.finish_reason(result),
                                                             "usage": _usage(result)}}))
        return lines

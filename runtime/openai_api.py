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

from .model import ChatResult, Choice, Done, TokenLogprob
from .openai_schema import ChatCompletion, ChatCompletionChunk, ChatCompletionRequest
from .parse import TextDelta, ThinkingDelta, ToolCallEvent
from .request import ChatRequest, RequestError, json_or_text


def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n".join(part.text for part in content)


def template_message(msg: Any) -> dict:
    """An OpenAI message as the chat templates take it (prompt.py maps the remaining OpenAI fields)."""
    if msg.role in ("system", "developer"):
        return {"role": "system", "content": _text(msg.content)}
    if msg.role == "user":
        return {"role": "user", "content": _text(msg.content)}
    if msg.role == "tool":
        return {"role": "tool", "tool_call_id": msg.tool_call_id, "content": json_or_text(_text(msg.content))}
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


SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "seed", "frequency_penalty", "presence_penalty",
                   "repeat_penalty", "repeat_last_n", "dry_multiplier", "dry_base", "dry_allowed_length",
                   "dry_penalty_last_n")


def to_request(req: ChatCompletionRequest, max_tokens: int | None = None) -> ChatRequest:
    """`max_tokens`: the server's ceiling; a request asking for more gets that many (finish_reason "length")."""
    documents = [{"text": d} if isinstance(d, str) else d for d in req.documents] if req.documents else None
    citations = next((f for f in (req.citations_enabled, req.enable_citations) if f is not None), bool(documents))
    sampling = {k: getattr(req, k) for k in SAMPLING_FIELDS if getattr(req, k) is not None}
    if req.dry_sequence_breakers is not None:
        sampling["dry_sequence_breakers"] = tuple(req.dry_sequence_breakers)
    if req.logit_bias:
        sampling["logit_bias"] = tuple({int(k): v for k, v in req.logit_bias.items()}.items())
    if req.ignore_eos:
        sampling["ignore_eos"] = True
    if req.top_logprobs and not req.logprobs:
        raise RequestError("top_logprobs needs logprobs: true", param="top_logprobs")
    stop = [] if req.stop is None else [req.stop] if isinstance(req.stop, str) else list(req.stop)
    return ChatRequest(messages=[template_message(m) for m in req.messages], tools=_tools(req), documents=documents,
                       citations=citations, tool_choice=_tool_choice(req), response_format=_response_format(req),
                       max_tokens=min(filter(None, (req.max_completion_tokens or req.max_tokens, max_tokens)),
                                      default=None),
                       sampling=sampling, stop=stop, n=req.n or 1,
                       logprobs=(req.top_logprobs or 0) if req.logprobs else None)


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
        """With n > 1 the result holds every answer in `choices`, and the usage of them all."""
        choices = [self._choice(i, r) for i, r in enumerate(result.choices or [result])]
        body = ChatCompletion(id=self.id, created=self.created, model=self.model, usage=result.usage.to_dict(),
                              choices=choices)
        return body.model_dump(mode="json")

    def _choice(self, index: int, result: ChatResult) -> dict:
        message: dict[str, Any] = {"content": result.text if result.text or not result.tool_calls else None}
        if result.tool_calls:
            message["tool_calls"] = [_tool_call_out(c) for c in result.tool_calls]
        if result.thinking:
            message["reasoning_content"] = result.thinking
        if self.citations or result.citations:
            message["citations"] = _citations(result)
        logprobs = None if result.logprobs is None else {"content": result.logprobs}
        return {"index": index, "message": message, "finish_reason": finish_reason(result), "logprobs": logprobs}

    def chunk(self, delta: dict | None, finish: str | None = None, usage: dict | None = None, index: int = 0,
              logprobs: list[dict] | None = None) -> str:
        choices = [] if delta is None else [{"index": index, "delta": delta, "finish_reason": finish,
                                             "logprobs": None if logprobs is None else {"content": logprobs}}]
        chunk = ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)
        return f"data: {chunk.model_dump_json()}\n\n"


class ChunkWriter:
    """Turns model events into `chat.completion.chunk` lines.

    With n > 1 each answer's events follow a `Choice` marker and its chunks carry its index; every
    answer's last chunk (its finish_reason) is sent once all are done. Token log-probabilities go
    with the next chunk of the answer that has content, or with its last chunk.
    """

    def __init__(self, reply: Reply):
        self.reply = reply
        self.index = 0
        self.tool_calls: dict[int, int] = {}
        self.logprobs: list[dict] = []

    def start(self) -> str:
        return self.reply.chunk({"role": "assistant", "content": ""})

    def failure(self, message: str, body: dict) -> list[str]:
        """The stream's last line when generation fails after the status line: the error body, as OpenAI does."""
        return [f"data: {json.dumps(body)}\n\n"]

    def event(self, event: object) -> list[str]:
        if isinstance(event, TokenLogprob):
            self.logprobs.append(event.entry)
            return []
        if isinstance(event, (TextDelta, ThinkingDelta)) and event.text:
            key = "content" if isinstance(event, TextDelta) else "reasoning_content"
            return [self._chunk({key: event.text})]
        if isinstance(event, ToolCallEvent):
            return [self._tool_call(self.index, event.tool_call)]
        if isinstance(event, Choice):
            return self._open(event.index)
        if isinstance(event, Done):
            return self._finish(event.result)
        return []

    def _chunk(self, delta: dict, finish: str | None = None, index: int | None = None) -> str:
        logprobs, self.logprobs = (self.logprobs or None), []
        return self.reply.chunk(delta, finish=finish, index=self.index if index is None else index,
                                logprobs=logprobs)

    def _open(self, index: int) -> list[str]:
        lines = [self._chunk({}, index=self.index)] if self.logprobs else []  # the last answer's leftovers
        self.index = index
        if index > 0:
            lines.append(self.reply.chunk({"role": "assistant", "content": ""}, index=index))
        return lines

    def _tool_call(self, index: int, call: dict) -> str:
        n = self.tool_calls.get(index, 0)
        line = self.reply.chunk({"tool_calls": [{"index": n, **_tool_call_out(call)}]}, index=index)
        self.tool_calls[index] = n + 1
        return line

    def _finish(self, result: ChatResult) -> list[str]:
        lines = []
        for index, choice in enumerate(result.choices or [result]):
            held = choice.tool_calls[self.tool_calls.get(index, 0):]  # any the parser held back
            lines.extend(self._tool_call(index, c) for c in held)
            delta = {"citations": _citations(choice)} if self.reply.citations or choice.citations else {}
            if index == self.index:
                lines.append(self._chunk(delta, finish=finish_reason(choice), index=index))
            else:
                lines.append(self.reply.chunk(delta, finish=finish_reason(choice), index=index))
        if self.reply.include_usage:
            lines.append(self.reply.chunk(None, usage=result.usage.to_dict()))
        return lines

"""`r7b serve`: an OpenAI-compatible HTTP API for a local Command R7B GGUF.

Routes: `POST /v1/chat/completions` (JSON, or server-sent events with `"stream": true`),
`GET /v1/models`, `GET /v1/models/{id}`, `GET /health`, and the OpenAPI document at
`/openapi.json`. Point an OpenAI client at `http://HOST:PORT/v1`.

Command R7B extensions, all optional:
  request    `documents`: objects (or strings) to ground the answer in;
             `citations_enabled` (or `enable_citations`): ask for citations (default: on with documents);
             `top_k`: top-k sampling.
  response   `message.reasoning_content`: the tool plan the model writes before its tool calls;
             `message.citations`: `[{start, end, text, sources: [{tool_call_id, index}]}]`, spans of
             `content` grounded in documents (`tool_call_id` "0") or in tool results.
  stream     deltas carry `reasoning_content` as it is written, and the last chunk's delta `citations`.

A llama.cpp context is not thread-safe, so one worker thread owns the model and requests wait for
it in arrival order. Generation runs in that thread, leaving the event loop free to answer
/health and to notice clients that hang up: their generation is stopped (or, if still queued,
never started), so it does not hold up the requests behind it.
`r7b serve --max-tokens N` caps every answer at N tokens, as llama-server's --n-predict does: a
request asking for more (or for nothing, which means the rest of the context) gets N, and
finish_reason "length" if the answer is cut there.
The engine keeps the KV cache of the last request, so the next turn of the same conversation only
evaluates its new tokens (`usage.prompt_tokens_details.cached_tokens`).

Without an API key the server only listens on loopback addresses.
"""

import argparse
import asyncio
import contextlib
import dataclasses
import hmac
import ipaddress
import json
import logging
import os
import re
import secrets
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Iterable

from r7b.errors import R7BError

from .chat_cli import add_chat_template_arg

if TYPE_CHECKING:
    from .model import ChatResult, Model
    from .openai_schema import ChatCompletionRequest

log = logging.getLogger("r7b.serve")

DEFAULT_MAX_BODY = 8 * 1024 * 1024
PUBLIC_PATHS = frozenset({"/health", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
MAX_REPEAT = 2000  # llama.cpp's grammar parser refuses larger repetitions anyway
SIZE_KEYS = frozenset({"minItems", "maxItems", "minLength", "maxLength", "minProperties", "maxProperties"})
REPEAT = re.compile(r"\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}")


# -- errors --------------------------------------------------------------------------------------


class APIError(Exception):
    """An error the client should see, in OpenAI's `{"error": {...}}` shape."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")  # lone surrogates from JSON escapes
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


async def _send_error(send, error: APIError, headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
    """Answer straight from ASGI middleware, before the application has read anything."""
    body = json.dumps(error.body(), ensure_ascii=False).encode("utf-8")
    await send({"type": "http.response.start", "status": error.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


# -- ASGI middleware -----------------------------------------------------------------------------


class ApiKeyMiddleware:
    """Checks `Authorization: Bearer KEY` first, so that strangers cannot make the server read a body."""

    def __init__(self, app, api_key: str):
        self.app = app
        self._key = api_key.encode("utf-8")

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] not in PUBLIC_PATHS:
            error = self._check(scope["headers"])
            if error is not None:
                await _send_error(send, error, [(b"www-authenticate", b"Bearer")])
                return
        await self.app(scope, receive, send)

    def _check(self, headers: list[tuple[bytes, bytes]]) -> APIError | None:
        values = [v for k, v in headers if k == b"authorization"]
        if not values:
            return APIError(401, "missing API key: send it as 'Authorization: Bearer KEY'", code="invalid_api_key")
        scheme, _, token = values[0].strip().partition(b" ")
        matches = hmac.compare_digest(token.strip(), self._key)  # whatever the scheme, so every key costs the same
        if matches and scheme.lower() == b"bearer":
            return None
        return APIError(401, "incorrect API key", code="invalid_api_key")


class BodyLimitMiddleware:
    """Reads the whole body up to `max_bytes` before the application parses it, then replays it.

    Checking Content-Length alone would miss chunked uploads; counting bytes alone would make a
    client with an honest Content-Length wait for its upload to be read and thrown away.
    """

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = APIError(413, f"request body is larger than {self.max_bytes} bytes", code="request_too_large")
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and not declared.isdigit():
            await _send_error(send, APIError(400, "invalid Content-Length header"))
            return
        if declared is not None and int(declared) > self.max_bytes:
            await _send_error(send, too_large)
            return
        body = await self._read(receive)
        if body is None:
            await _send_error(send, too_large)
            return
        await self.app(scope, _replay(body, receive), send)

    async def _read(self, receive) -> bytes | None:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left; the app will see it too
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)


def _replay(body: bytes, receive):
    sent = False

    async def replay():
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


# -- the worker that owns the model --------------------------------------------------------------


_END = object()


class EventStream:
    """One request's model events, passed from the worker thread to the event loop."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._finished = False
        self.cancelled = threading.Event()

    def put(self, item: object) -> None:
        """Called from the worker thread."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone: nobody is listening any more
            self.cancelled.set()

    def cancel(self) -> None:
        self.cancelled.set()

    def __aiter__(self) -> "EventStream":
        return self

    async def __anext__(self) -> object:
        if self._finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        if item is _END:
            self._finished = True
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self._finished = True
            raise item
        return item


@dataclasses.dataclass
class Job:
    """A chat request translated into the model's terms (see `to_job`)."""

    messages: list[dict]
    tools: list[dict] | None
    documents: list[dict] | None
    citations: bool
    tool_choice: Any
    response_format: Any
    max_tokens: int | None
    sampling: dict[str, Any]


class Worker:
    """Runs jobs on the model one at a time in a single thread; the executor's queue is the request queue."""

    def __init__(self, model: "Model"):
        self.model = model
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="r7b-generate")
        self._streams: set[EventStream] = set()
        self._lock = threading.Lock()

    def submit(self, job: Job) -> EventStream:
        stream = EventStream()
        with self._lock:
            self._streams.add(stream)
        self._pool.submit(self._run, job, stream)
        return stream

    def close(self) -> None:
        """Stop every queued or running generation and wait for the thread to let go of the model."""
        with self._lock:
            for stream in self._streams:
                stream.cancel()
        self._pool.shutdown(wait=True)

    def _run(self, job: Job, stream: EventStream) -> None:
        try:
            if not stream.cancelled.is_set():
                self._generate(job, stream)
        except BaseException as exc:  # handed to the request, which decides what the client sees
            stream.put(exc)
        finally:
            stream.put(_END)
            with self._lock:
                self._streams.discard(stream)

    def _generate(self, job: Job, stream: EventStream) -> None:
        options = prepare(self.model, job)
        events = self.model.chat(job.messages, job.tools, job.documents, stream=True, **options)
        try:
            for event in events:
                stream.put(event)
                if stream.cancelled.is_set():
                    return
        finally:
            events.close()


# -- request → model -----------------------------------------------------------------------------


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


def _tools(req: "ChatCompletionRequest") -> list[dict] | None:
    if not req.tools or req.tool_choice == "none":
        return None
    return [_tool(t.function) for t in req.tools]


def _tool(fn: Any) -> dict:
    """The template prints `description` and `parameters` of every tool; OpenAI lets clients omit both."""
    parameters = fn.parameters if fn.parameters is not None else {"type": "object", "properties": {}}
    return {"type": "function", "function": {"name": fn.name, "description": fn.description or "",
                                             "parameters": parameters}}


def _check_tool_choice(req: "ChatCompletionRequest") -> None:
    choice = req.tool_choice
    if choice in (None, "auto", "none"):
        return
    if not req.tools:
        raise APIError(400, "tool_choice needs a non-empty 'tools' list", param="tool_choice")
    if choice != "required" and choice.function.name not in {t.function.name for t in req.tools}:
        raise APIError(400, f"tool_choice names '{choice.function.name}', which is not in 'tools'", param="tool_choice")


def to_job(req: "ChatCompletionRequest", max_tokens: int | None = None) -> Job:
    """`max_tokens`: the server's ceiling; a request asking for more gets that many (finish_reason "length")."""
    messages = [template_message(m) for m in req.messages]
    documents = [{"text": d} if isinstance(d, str) else d for d in req.documents] if req.documents else None
    citations = next((f for f in (req.citations_enabled, req.enable_citations) if f is not None), bool(documents))
    _check_tool_choice(req)
    sampling = {k: v for k, v in (("temperature", req.temperature), ("top_p", req.top_p), ("top_k", req.top_k),
                                  ("seed", req.seed)) if v is not None}
    if req.stop is not None:
        sampling["stop"] = [req.stop] if isinstance(req.stop, str) else list(req.stop)
    return Job(messages=messages, tools=_tools(req), documents=documents, citations=citations,
               tool_choice=req.tool_choice, response_format=req.response_format,
               max_tokens=min(filter(None, (req.max_completion_tokens or req.max_tokens, max_tokens)), default=None),
               sampling=sampling)


def _grammar(job: Job, response_open: bool) -> str | None:
    """The grammar that enforces tool_choice or response_format, if any.

    `response_open`: the model must write `<|START_RESPONSE|>` itself (the agentic format).
    """
    from .grammar import PLAN_CHARS, json_response_grammar, tool_call_grammar

    choice, fmt = job.tool_choice, job.response_format
    if choice == "required" or (choice is not None and not isinstance(choice, str)):
        only = None if choice == "required" else choice.function.name
        schemas = [t["function"].get("parameters") for t in job.tools]
        return _schema_grammar("tools", schemas, lambda: tool_call_grammar(job.tools, only=only))
    if fmt is not None and fmt.type != "text":
        schema = fmt.json_schema.schema_ if fmt.type == "json_schema" else None
        return _schema_grammar("response_format", schema,
                               lambda: json_response_grammar(schema, response_open=response_open))
    if choice == "none" and response_open:  # an answer, never an action
        return f'root ::= "<|START_RESPONSE|>" ({PLAN_CHARS})* "<|END_RESPONSE|>"'
    return None


def _schema_grammar(param: str, schema: Any, build: Callable[[], str]) -> str:
    """Convert a client's JSON schema; whatever goes wrong is the schema's fault."""
    _check_schema_size(schema, param)
    try:
        return build()
    except Exception as exc:  # the converter asserts and raises freely on schemas it cannot handle
        raise APIError(400, f"cannot turn the JSON schema in '{param}' into a grammar: {exc}", param=param) from None


def _check_schema_size(schema: Any, param: str) -> None:
    """Refuse repetition counts that the schema-to-grammar converter would write out in full."""
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict):
            for key, value in node.items():
                counts = [value] if key in SIZE_KEYS and isinstance(value, int) else []
                if key == "pattern" and isinstance(value, str):
                    counts = [int(n) for m in REPEAT.findall(value) for n in m if n]
                if any(n > MAX_REPEAT for n in counts):
                    raise APIError(400, f"'{key}' in the JSON schema is above {MAX_REPEAT}, too large for a grammar",
                                   param=param)
                stack.append(value)


@contextlib.contextmanager
def _client_errors(what: str):
    """Turn errors caused by what the client sent into a 400 that says so."""
    from jinja2 import TemplateError

    try:
        yield
    except (R7BError, TemplateError) as exc:
        raise APIError(400, f"{what}: {exc}") from None
    except UnicodeError:
        raise APIError(400, f"{what}: the request holds text that is not valid Unicode") from None
    except RecursionError:
        raise APIError(400, f"{what}: the request is nested too deeply") from None


def prepare(model: "Model", job: Job) -> dict[str, Any]:
    """Render and measure the prompt and pick the grammar; the `model.chat` options for `job`."""
    from .model import RESPONSE_OPEN
    from .protect import Protector

    with _client_errors("cannot build the prompt"):
        rendered = model.render(job.messages, job.tools, job.documents, enable_citations=job.citations)
        n_prompt = len(model.tokenize_prompt(rendered))
    room = model.engine.n_ctx - n_prompt
    if room < 1:
        raise APIError(400, f"the prompt has {n_prompt} tokens, but the model's context holds {model.engine.n_ctx}"
                            " (including the answer); shorten the messages", param="messages",
                       code="context_length_exceeded")
    response_open = not Protector.strip(rendered).endswith(RESPONSE_OPEN)
    return {**job.sampling, "max_tokens": min(job.max_tokens or room, room), "grammar": _grammar(job, response_open),
            "enable_citations": job.citations}


# -- model → response ----------------------------------------------------------------------------


def finish_reason(result: "ChatResult") -> str:
    if result.tool_calls:
        return "tool_calls"
    return "length" if result.finish_reason == "length" else "stop"


def _tool_call_out(call: dict) -> dict:
    fn = call["function"]
    args = fn["arguments"]
    return {"id": str(call["id"]), "type": "function",
            "function": {"name": fn["name"], "arguments": args if isinstance(args, str) else json.dumps(args)}}


def _citations(result: "ChatResult") -> list[dict]:
    return [c.to_dict() for c in result.citations]


@dataclasses.dataclass
class Reply:
    """What every chunk or completion of one request shares."""

    model: str
    citations: bool
    include_usage: bool = False
    id: str = dataclasses.field(default_factory=lambda: "chatcmpl-" + secrets.token_hex(12))
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))

    def completion(self, result: "ChatResult") -> dict:
        from .openai_schema import ChatCompletion

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
        from .openai_schema import ChatCompletionChunk

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
        from .model import Done
        from .parse import TextDelta, ThinkingDelta, ToolCallEvent

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

    def _finish(self, result: "ChatResult") -> list[str]:
        lines = [self._tool_call(c) for c in result.tool_calls[self.tool_calls:]]  # any the parser held back
        delta = {"citations": _citations(result)} if self.reply.citations or result.citations else {}
        lines.append(self.reply.chunk(delta, finish=finish_reason(result)))
        if self.reply.include_usage:
            lines.append(self.reply.chunk(None, usage=result.usage.to_dict()))
        return lines


# -- the application -----------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def cancel_on_disconnect(request, stream: EventStream, every: float = 0.25):
    """Stop the generation if the client hangs up while the handler waits for it."""

    async def watch() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(every)
        stream.cancel()

    watcher = asyncio.create_task(watch())
    try:
        yield
    except BaseException:
        stream.cancel()
        raise
    finally:
        watcher.cancel()


async def _result(stream: EventStream) -> "ChatResult":
    from .model import Done

    async for event in stream:
        if isinstance(event, Done):
            return event.result
    raise APIError(503, "the generation was cancelled", type="server_error")


def _client_error(exc: BaseException) -> APIError | None:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, R7BError):  # the project's "bad input" error, e.g. a grammar llama.cpp rejects
        return APIError(400, str(exc))
    return None


async def _sse(first: object, stream: EventStream, writer: ChunkWriter) -> AsyncIterator[str]:
    try:
        yield writer.start()
        for line in writer.event(first):
            yield line
        async for event in stream:
            for line in writer.event(event):
                yield line
        yield "data: [DONE]\n\n"
    except Exception as exc:  # the status line is gone already: report in the stream, as OpenAI does
        error = _client_error(exc)
        if error is None:
            log.error("generation failed", exc_info=exc)
            error = APIError(500, "internal server error", type="server_error")
        yield f"data: {json.dumps(error.body())}\n\n"
    finally:
        stream.cancel()


def _validation_error(errors: list[dict]) -> APIError:
    if not errors:
        return APIError(400, "invalid request")
    err = max(errors, key=lambda e: len(e.get("loc", ())))  # the deepest is the most specific
    if err.get("type") == "json_invalid":
        detail = (err.get("ctx") or {}).get("error", "")
        return APIError(400, f"the request body is not valid JSON: {detail}".rstrip(": "))
    # Union branch labels such as 'str' or 'list[TextPart]' say nothing to a client.
    loc = [str(p) for p in err.get("loc", ()) if p != "body" and p != "str" and "[" not in str(p)]
    if not loc:
        return APIError(400, "the request body must be a JSON object")
    if loc == ["n"]:
        return APIError(400, "only n=1 is supported", param="n", code="unsupported_value")
    return APIError(400, f"{'.'.join(loc)}: {err.get('msg', 'invalid value')}", param=loc[0])


def _openapi_schema(app, model_name: str, secured: bool, max_tokens: int | None = None) -> dict:
    """FastAPI's document, corrected: 400 instead of 422, the one model name, the bearer key, the token cap."""
    from fastapi.openapi.utils import get_openapi

    from .openai_schema import stream_components

    doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    schemas = doc.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    for path, ops in doc["paths"].items():
        for op in ops.values():
            op.get("responses", {}).pop("422", None)
            if secured and path not in PUBLIC_PATHS:
                op["security"] = [{"bearer": []}]
    for name, schema in stream_components().items():
        schemas.setdefault(name, schema)
    model_prop = schemas["ChatCompletionRequest"]["properties"]["model"]
    model_prop["anyOf"] = [{"type": "string", "enum": [model_name]}, {"type": "null"}]
    for param in doc["paths"]["/v1/models/{model_id}"]["get"]["parameters"]:
        param["schema"]["enum"] = [model_name]
    if max_tokens is not None:
        for name in ("max_tokens", "max_completion_tokens"):
            prop = schemas["ChatCompletionRequest"]["properties"][name]
            prop["description"] += f" This server answers with at most {max_tokens} tokens (--max-tokens)."
    if secured:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    return doc


def create_app(model: "Model", *, model_name: str, api_key: str | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY, max_tokens: int | None = None):
    """The ASGI application serving `model` under `model_name`; `max_tokens` caps every answer."""
    from fastapi import FastAPI

    from r7b import __version__

    worker = Worker(model)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.to_thread(worker.close)

    app = FastAPI(title="r7b-edge", version=__version__, lifespan=lifespan,
                  description=__doc__.partition("\n\n")[2])
    _add_error_handlers(app)
    _add_routes(app, worker, model_name, max_tokens)

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = _openapi_schema(app, model_name, secured=bool(api_key), max_tokens=max_tokens)
        return app.openapi_schema

    app.openapi = openapi
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)
    if api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)
    return app


def _add_error_handlers(app) -> None:
    """Every error leaves in OpenAI's shape; FastAPI's 422 for a malformed body becomes OpenAI's 400."""
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    def respond(error: APIError, headers: dict | None = None) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=headers)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return respond(exc)

    @app.exception_handler(R7BError)
    async def bad_input(request: Request, exc: R7BError) -> JSONResponse:
        return respond(_client_error(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return respond(_validation_error(list(exc.errors())))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return respond(APIError(exc.status_code, str(exc.detail)), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Starlette re-raises after answering, so the traceback reaches the server log, not the client.
        return respond(APIError(500, "internal server error", type="server_error"))


def _add_routes(app, worker: Worker, model_name: str, max_tokens: int | None) -> None:
    from fastapi import Request
    from fastapi.responses import JSONResponse, StreamingResponse

    from . import openai_schema as oa

    errors = {code: {"model": oa.ErrorResponse} for code in (400, 401, 404, 413, 500, 503)}
    card = oa.ModelCard(id=model_name, created=int(Path(worker.model.path).stat().st_mtime), owned_by="r7b-edge")

    @app.get("/health", response_model=oa.Health)
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models", response_model=oa.ModelList, responses=errors)
    async def list_models() -> oa.ModelList:
        return oa.ModelList(data=[card])

    @app.get("/v1/models/{model_id:path}", response_model=oa.ModelCard, responses=errors)
    async def get_model(model_id: str) -> oa.ModelCard:
        _check_model(model_id, model_name)
        return card

    @app.post("/v1/chat/completions", response_model=oa.ChatCompletion,
              responses={**errors, 200: {"content": {"text/event-stream": {"schema": oa.SSE_EVENT}}}})
    async def chat_completions(body: oa.ChatCompletionRequest, request: Request):
        _check_model(body.model, model_name)
        job = to_job(body, max_tokens)
        reply = Reply(model=model_name, citations=job.citations,
                      include_usage=bool(body.stream_options and body.stream_options.include_usage))
        stream = worker.submit(job)
        async with cancel_on_disconnect(request, stream):
            if not body.stream:
                return JSONResponse(reply.completion(await _result(stream)))
            first = await anext(stream, None)  # errors found before any output still get their status
        if first is None:
            raise APIError(503, "the generation was cancelled", type="server_error")
        return StreamingResponse(_sse(first, stream, ChunkWriter(reply)), media_type="text/event-stream",
                                 headers=SSE_HEADERS)


def _check_model(name: str | None, served: str) -> None:
    if name is not None and name != served:
        raise APIError(404, f"the model '{name}' does not exist; this server runs '{served}'", param="model",
                       code="model_not_found")


# -- command line --------------------------------------------------------------------------------


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP API (chat completions, tools, documents)")
    p.add_argument("model", metavar="MODEL.gguf")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", metavar="KEY", default=os.environ.get("R7B_API_KEY") or None,
                   help="require 'Authorization: Bearer KEY' (default: $R7B_API_KEY)")
    p.add_argument("--allow-insecure-no-key", action="store_true",
                   help="allow a non-loopback --host without an API key")
    p.add_argument("--model-name", metavar="NAME",
                   help="name clients use (default: the GGUF's general.name, else the file name)")
    p.add_argument("--n-ctx", type=int, metavar="N", default=8192, help="context size in tokens (default 8192)")
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads (default: cores, up to 8)")
    p.add_argument("--gpu-layers", type=int, metavar="N", default=0,
                   help="layers to offload (-1: all, on Metal/CUDA builds)")
    p.add_argument("--kv-type", metavar="TYPE", default="f16", help="KV cache type: f16, q8_0, q4_0 ... (default f16)")
    add_chat_template_arg(p)
    p.add_argument("--max-tokens", type=int, metavar="N",
                   help="most tokens one answer may have; requests asking for more get N, with finish_reason "
                        "'length' (default: the rest of the context)")
    p.add_argument("--max-body-bytes", type=int, metavar="N", default=DEFAULT_MAX_BODY,
                   help=f"largest request body accepted (default {DEFAULT_MAX_BODY})")
    p.set_defaults(func=_serve_main)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _check_args(args: argparse.Namespace) -> None:
    if not is_loopback(args.host) and not args.api_key and not args.allow_insecure_no_key:
        raise R7BError(f"refusing to listen on {args.host} without an API key: pass --api-key (or set "
                       "R7B_API_KEY), or --allow-insecure-no-key")
    if not 0 < args.port < 65536:
        raise R7BError(f"--port must be between 1 and 65535, not {args.port}")
    if args.max_body_bytes < 1:
        raise R7BError("--max-body-bytes must be positive")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise R7BError("--max-tokens must be positive")


def _serve_main(args: argparse.Namespace) -> int:
    _check_args(args)
    import uvicorn

    from .model import Model

    model = Model.load(args.model, n_ctx=args.n_ctx, n_threads=args.threads, n_gpu_layers=args.gpu_layers,
                       kv_type=args.kv_type, chat_template=args.chat_template)
    name = args.model_name or model.engine.metadata("general.name") or Path(args.model).stem
    app = create_app(model, model_name=name, api_key=args.api_key, max_body_bytes=args.max_body_bytes,
                     max_tokens=args.max_tokens)
    print(f"r7b serve: '{name}' on http://{args.host}:{args.port}/v1 (context {model.engine.n_ctx} tokens)",
          file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=5)
    model.close()
    return 0

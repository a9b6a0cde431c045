"""`r7b serve`: an OpenAI-compatible HTTP API for a local Command R7B GGUF.

Routes: `POST /v1/chat/completions` (JSON, or server-sent events with `"stream": true`),
`GET /v1/models`, `GET /v1/models/{id}`, `GET /health`, and the OpenAPI document at
`/openapi.json`. Point an OpenAI client at `http://HOST:PORT/v1`.
`POST /v2/chat` is Cohere's Chat API v2 (cohere_api.py): point a Cohere client (`cohere.ClientV2`,
langchain-cohere's `ChatCohere`) at `http://HOST:PORT`; its errors are Cohere's `{"id", "message"}`.
Pass `model=` to `ChatCohere` (any name): without it, langchain-cohere asks Cohere's model list,
which this server does not serve.

Command R7B extensions, all optional:
  request    `documents`: objects (or strings) to ground the answer in;
             `citations_enabled` (or `enable_citations`): ask for citations (default: on with documents);
             `top_k`, `min_p`: top-k and min-p sampling; `repeat_penalty`, `repeat_last_n` and DRY
             (`dry_multiplier`, `dry_base`, `dry_allowed_length`, `dry_penalty_last_n`,
             `dry_sequence_breakers`), named as llama-server names them; `ignore_eos`, as
             llama-server: the answer runs to `max_tokens` (for benchmarks).
  response   `message.reasoning_content`: the tool plan the model writes before its tool calls;
             `message.citations`: `[{start, end, text, sources: [{tool_call_id, index}]}]`, spans of
             `content` grounded in documents (`tool_call_id` "0") or in tool results.
  stream     deltas carry `reasoning_content` as it is written, and the last chunk's delta `citations`.

This module holds the application, its middleware, routes and command line; the wire formats are
mapped in openai_api.py and cohere_api.py, prompts are prepared in request.py, and scheduler.py queues requests for
the threads that run the model.
`r7b serve --parallel N` serves N conversations at once, batched into the same llama.cpp steps
(continuous batching, slots.py); without it N is chosen from the memory their KV caches need.
Past `--max-queue` waiting requests, a new one gets 429 with a Retry-After header.
`r7b serve --max-tokens N` caps every answer at N tokens, as llama-server's --n-predict does: a
request asking for more (or for nothing, which means the rest of the context) gets N, and
finish_reason "length" if the answer is cut there.
Each slot keeps the KV cache of its last request, and a request goes to the slot sharing most of its
prompt, so the next turn of a conversation only evaluates its new tokens
(`usage.prompt_tokens_details.cached_tokens`).

Without an API key the server only listens on loopback addresses.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterable

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from r7b import __version__
from r7b.errors import R7BError

from . import cohere_schema as co
from . import openai_schema as oa
from .cohere_api import EventWriter, error_body as cohere_error_body, to_request as cohere_request
from .model import ChatResult, Done, Model
from .openai_api import ChunkWriter, Reply, to_request
from .remote import WorkerLost, load_model
from .options import add_model_options, is_loopback, load_kwargs
from .scheduler import DEFAULT_MAX_QUEUE, EventStream, QueueFull, Scheduler

log = logging.getLogger("r7b.serve")

DEFAULT_MAX_BODY = 8 * 1024 * 1024
PUBLIC_PATHS = frozenset({"/health", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


# -- errors --------------------------------------------------------------------------------------


class APIError(Exception):
    """An error the client should see, in OpenAI's `{"error": {...}}` shape."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None):
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")  # lone surrogates from JSON escapes
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers

    def body(self, path: str = "") -> dict:
        """OpenAI's shape, or Cohere's `{"id", "message"}` under /v2/."""
        if is_cohere_path(path):
            return cohere_error_body(self.message)
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def is_cohere_path(path: str) -> bool:
    return path == "/v2" or path.startswith("/v2/")


async def _send_error(send, error: APIError, headers: Iterable[tuple[bytes, bytes]] = (), path: str = "") -> None:
    """Answer straight from ASGI middleware, before the application has read anything."""
    body = json.dumps(error.body(path), ensure_ascii=False).encode("utf-8")
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
                await _send_error(send, error, [(b"www-authenticate", b"Bearer")], scope["path"])
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
        path = scope["path"]
        if declared is not None and not declared.isdigit():
            await _send_error(send, APIError(400, "invalid Content-Length header"), path=path)
            return
        if declared is not None and int(declared) > self.max_bytes:
            await _send_error(send, too_large, path=path)
            return
        body = await self._read(receive)
        if body is None:
            await _send_error(send, too_large, path=path)
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


async def _result(stream: EventStream) -> ChatResult:
    async for event in stream:
        if isinstance(event, Done):
            return event.result
    raise APIError(503, "the generation was cancelled", type="server_error")


def _client_error(exc: BaseException) -> APIError | None:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, WorkerLost):  # not the client's fault, and it may pass: retry later
        return APIError(503, str(exc), code=exc.code, type="server_error")
    if isinstance(exc, R7BError):  # the project's "bad input" error, e.g. a grammar llama.cpp rejects
        return APIError(400, str(exc), param=getattr(exc, "param", None), code=getattr(exc, "code", None))
    return None


async def _sse(first: object, stream: EventStream, writer: ChunkWriter | EventWriter) -> AsyncIterator[str]:
    """One answer's event stream in the writer's wire format; a failure after the status line is
    reported inside the stream, as each format does."""
    try:
        yield writer.start()
        for line in writer.event(first):
            yield line
        async for event in stream:
            for line in writer.event(event):
                yield line
        yield "data: [DONE]\n\n"
    except Exception as exc:
        error = _client_error(exc)
        if error is None:
            log.error("generation failed", exc_info=exc)
            error = APIError(500, "internal server error", type="server_error")
        for line in writer.failure(error.message, error.body()):
            yield line
    finally:
        stream.cancel()


async def _answer(scheduler: Scheduler, chat: Any, request: Request, *, streamed: bool,
                  whole: Callable[[ChatResult], dict], writer: Callable[[], ChunkWriter | EventWriter]):
    """Run one chat request for either wire format: the whole answer as `whole(result)`, or its
    events as server-sent events in `writer()`'s format."""
    stream = scheduler.submit(chat)
    async with cancel_on_disconnect(request, stream):
        if not streamed:
            return JSONResponse(whole(await _result(stream)))
        first = await anext(stream, None)  # errors found before any output still get their status
    if first is None:
        raise APIError(503, "the generation was cancelled", type="server_error")
    return StreamingResponse(_sse(first, stream, writer()), media_type="text/event-stream", headers=SSE_HEADERS)


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
        return APIError(400, f"n must be between 1 and {oa.MAX_N}", param="n", code="unsupported_value")
    return APIError(400, f"{'.'.join(loc)}: {err.get('msg', 'invalid value')}", param=loc[0])


def _openapi_schema(app, model_name: str, secured: bool, max_tokens: int | None = None) -> dict:
    """FastAPI's document, corrected: 400 instead of 422, the one model name, the bearer key, the token cap."""
    doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    schemas = doc.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    for path, ops in doc["paths"].items():
        for op in ops.values():
            op.get("responses", {}).pop("422", None)
            if secured and path not in PUBLIC_PATHS:
                op["security"] = [{"bearer": []}]
    for name, schema in oa.stream_components().items():
        schemas.setdefault(name, schema)
    model_prop = schemas["ChatCompletionRequest"]["properties"]["model"]
    model_prop["anyOf"] = [{"type": "string", "enum": [model_name]}, {"type": "null"}]
    for param in doc["paths"]["/v1/models/{model_id}"]["get"]["parameters"]:
        param["schema"]["enum"] = [model_name]
    if max_tokens is not None:
        capped = (("ChatCompletionRequest", "max_tokens"), ("ChatCompletionRequest", "max_completion_tokens"),
                  ("CohereChatRequest", "max_tokens"))
        for schema, name in capped:
            prop = schemas[schema]["properties"][name]
            prop["description"] += f" This server answers with at most {max_tokens} tokens (--max-tokens)."
    if secured:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    return doc


def create_app(model: Model, *, model_name: str, api_key: str | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY, max_tokens: int | None = None,
               max_queue: int = DEFAULT_MAX_QUEUE):
    """The ASGI application serving `model` under `model_name`; `max_tokens` caps every answer."""
    scheduler = Scheduler(model, max_queue=max_queue)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.to_thread(scheduler.close)

    app = FastAPI(title="r7b-edge", version=__version__, lifespan=lifespan,
                  description=__doc__.partition("\n\n")[2])
    _add_error_handlers(app)
    _add_routes(app, scheduler, model_name, max_tokens)

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
    """Every error leaves in OpenAI's shape (Cohere's under /v2/); FastAPI's 422 for a malformed body becomes a 400."""
    def respond(request: Request, error: APIError, headers: dict | None = None) -> JSONResponse:
        return JSONResponse(error.body(request.url.path), status_code=error.status, headers=headers)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return respond(request, exc, exc.headers)

    @app.exception_handler(QueueFull)
    async def busy(request: Request, exc: QueueFull) -> JSONResponse:
        return respond(request, APIError(429, str(exc), code="server_busy", type="server_error"),
                       {"Retry-After": str(exc.retry_after)})

    @app.exception_handler(R7BError)
    async def bad_input(request: Request, exc: R7BError) -> JSONResponse:
        return respond(request, _client_error(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return respond(request, _validation_error(list(exc.errors())))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return respond(request, APIError(exc.status_code, str(exc.detail)), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Starlette re-raises after answering, so the traceback reaches the server log, not the client.
        return respond(request, APIError(500, "internal server error", type="server_error"))


def _add_routes(app, scheduler: Scheduler, model_name: str, max_tokens: int | None) -> None:
    errors = {code: {"model": oa.ErrorResponse} for code in (400, 401, 404, 413, 429, 500, 503)}
    card = oa.ModelCard(id=model_name, created=int(Path(scheduler.model.path).stat().st_mtime), owned_by="r7b-edge")

    @app.get("/health", response_model=oa.Health)
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/slots", responses=errors)
    async def slots() -> list[dict]:
        """Each conversation slot: `busy`, and `cells`, the KV-cache cells its conversation holds."""
        states = getattr(scheduler.model, "slot_states", None)
        if states is None:
            raise APIError(404, "slot states are not available for a model served over RPC")
        return await asyncio.to_thread(states)

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
        chat = to_request(body, max_tokens)
        reply = Reply(model=model_name, citations=chat.wants_citations,
                      include_usage=bool(body.stream_options and body.stream_options.include_usage))
        return await _answer(scheduler, chat, request, streamed=bool(body.stream), whole=reply.completion,
                             writer=lambda: ChunkWriter(reply))

    cohere_errors = {code: {"model": co.CohereError} for code in (400, 401, 413, 429, 500, 503)}

    @app.post("/v2/chat", response_model=co.CohereChatResponse, tags=["cohere"],
              responses={**cohere_errors, 200: {"content": {"text/event-stream": {"schema": co.SSE_EVENT}}}})
    async def cohere_chat(body: co.CohereChatRequest, request: Request):
        """Cohere's Chat API v2; `model` may name anything."""
        chat, reply = cohere_request(body, max_tokens)
        return await _answer(scheduler, chat, request, streamed=bool(body.stream), whole=reply.response,
                             writer=lambda: EventWriter(reply))


def _check_model(name: str | None, served: str) -> None:
    if name is not None and name != served:
        raise APIError(404, f"the model '{name}' does not exist; this server runs '{served}'", param="model",
                       code="model_not_found")


# -- command line --------------------------------------------------------------------------------


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP API (chat completions, tools, documents)")
    add_model_options(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", metavar="KEY", default=os.environ.get("R7B_API_KEY") or None,
                   help="require 'Authorization: Bearer KEY' (default: $R7B_API_KEY)")
    p.add_argument("--allow-insecure-no-key", action="store_true",
                   help="allow a non-loopback --host without an API key")
    p.add_argument("--model-name", metavar="NAME",
                   help="name clients use (default: the GGUF's general.name, else the file name)")
    p.add_argument("--max-tokens", type=int, metavar="N",
                   help="most tokens one answer may have; requests asking for more get N, with finish_reason "
                        "'length' (default: the rest of the context)")
    p.add_argument("--max-body-bytes", type=int, metavar="N", default=DEFAULT_MAX_BODY,
                   help=f"largest request body accepted (default {DEFAULT_MAX_BODY})")
    p.add_argument("--parallel", "-np", type=int, metavar="N",
                   help="conversations served at once, batched together, each with --n-ctx tokens of KV cache "
                        "(default: as many as fit in memory, at most 4)")
    p.add_argument("--max-queue", type=int, metavar="N", default=DEFAULT_MAX_QUEUE,
                   help=f"requests that may wait for a free slot; more get 429 (default {DEFAULT_MAX_QUEUE})")
    p.set_defaults(func=_serve_main)


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
    if args.max_queue < 0:
        raise R7BError("--max-queue must be 0 or more")
    if args.rpc and args.parallel not in (None, 1):
        raise R7BError("--parallel is not available with --rpc yet: serve one conversation at a time")


def _serve_main(args: argparse.Namespace) -> int:
    _check_args(args)
    slots = {} if args.rpc else {"parallel": args.parallel}
    model = load_model(args.model, **load_kwargs(args), **slots)
    name = args.model_name or model.engine.metadata("general.name") or Path(args.model).stem
    app = create_app(model, model_name=name, api_key=args.api_key, max_body_bytes=args.max_body_bytes,
                     max_tokens=args.max_tokens, max_queue=args.max_queue)
    parallel = getattr(model, "parallel", 1)
    print(f"r7b serve: '{name}' on http://{args.host}:{args.port}/v1 ({parallel} slot{'s' * (parallel > 1)} "
          f"of {model.engine.n_ctx} tokens)", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=5)
    model.close()
    return 0

"""Where a request becomes a prompt: render, tokenize, open the response and pick the grammar, once.

Every way of asking for an assistant turn (the Python API, the OpenAI and Cohere wire formats,
the chat CLI) fills a `ChatRequest`; `prepare` turns it into a `PreparedPrompt`, the exact tokens
and generation limits the engine runs. Nothing here knows about HTTP: a request the model cannot
serve is a `RequestError` naming the offending parameter, which a server maps to a 400.
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol

from jinja2 import TemplateError

from r7b.cohere2 import END_RESPONSE, START_RESPONSE
from r7b.errors import R7BError

from .grammar import PLAN_CHARS, json_response_grammar, tool_call_grammar
from .protect import Protector

TOOL_CHOICES = ("auto", "none", "required")
MAX_N = 4  # answers per request (`n`)
MAX_TOP_LOGPROBS = 20  # OpenAI's limit on `top_logprobs`
MAX_BIAS = 100  # OpenAI's limit on a `logit_bias` value
MAX_REPEAT = 2000  # llama.cpp's grammar parser refuses larger repetitions anyway
SIZE_KEYS = frozenset({"minItems", "maxItems", "minLength", "maxLength", "minProperties", "maxProperties"})
REPEAT = re.compile(r"\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}")


class PromptModel(Protocol):
    """What preparing a prompt needs of a model (`Model` has it)."""

    engine: Any

    def render(self, messages: list[dict], tools: list | None = None, documents: list | None = None,
               **options: Any) -> str: ...

    def tokenize_prompt(self, rendered: str) -> list[int]: ...


class RequestError(R7BError):
    """A request the model cannot serve as asked; `param` names the field, `code` is a machine-readable reason."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


@dataclass
class ChatRequest:
    """One assistant turn, in the model's terms (messages as the chat templates take them)."""

    messages: list[dict]
    tools: list[dict] | None = None
    documents: list[dict] | None = None
    citations: bool | None = None  # None: on when there are documents
    tool_choice: str = "auto"  # "auto", "none", "required", or the name of the one tool to call
    response_format: dict | None = None  # {"schema": JSON schema or None for any JSON}
    grammar: str | None = None  # a GBNF grammar of the caller's own; overrides the two above
    constrain_tools: bool = False  # hold tool calls to the tools' schemas without forcing one
    max_tokens: int | None = None  # None: the rest of the context
    # Sampling's fields, and `ignore_eos`: ban the tokens that end the turn
    sampling: dict[str, Any] = field(default_factory=dict)
    stop: list[str] = field(default_factory=list)
    n: int = 1  # independent answers to the same prompt (the prompt is evaluated once)
    logprobs: int | None = None  # None: off; k: each token's log-probability and the k likeliest alternatives
    template: str = "auto"
    mode: str | None = None
    safety: str | None = None

    @property
    def wants_citations(self) -> bool:
        return bool(self.documents) if self.citations is None else self.citations


@dataclass(frozen=True)
class PreparedPrompt:
    """What the engine runs for a request: tokens, the text already written, limits and grammar."""

    rendered: str  # fenced (see protect.py)
    tokens: list[int]
    prefix: str  # the response opening the prompt already wrote, if any
    grammar: str | None
    max_tokens: int
    stop: list[str]
    tool_call_ids: list[str]
    has_documents: bool
    n: int = 1
    logprobs: int | None = None


def prepare(model: PromptModel, req: ChatRequest) -> PreparedPrompt:
    """Render and tokenize the prompt once, check it fits, and choose the grammar."""
    if req.max_tokens is not None and req.max_tokens < 1:
        raise RequestError("max_tokens must be at least 1", param="max_tokens")
    if not 1 <= req.n <= MAX_N:
        raise RequestError(f"n must be between 1 and {MAX_N}", param="n")
    if req.logprobs is not None and not 0 <= req.logprobs <= MAX_TOP_LOGPROBS:
        raise RequestError(f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}", param="top_logprobs")
    check_logit_bias(req.sampling.get("logit_bias", ()), model.engine.n_vocab)
    with _client_errors("cannot build the prompt"):
        rendered = model.render(req.messages, req.tools, req.documents, template=req.template, mode=req.mode,
                                safety=req.safety, enable_citations=req.wants_citations)
        tokens = model.tokenize_prompt(rendered)
    room = model.engine.n_ctx - len(tokens)
    if room < 1:
        raise RequestError(f"the prompt has {len(tokens)} tokens, but the model's context holds {model.engine.n_ctx}"
                           " (including the answer); shorten the messages", param="messages",
                           code="context_length_exceeded")
    prefix = START_RESPONSE if Protector.strip(rendered).endswith(START_RESPONSE) else ""
    grammar = choose_grammar(req, response_open=not prefix)
    if grammar and req.sampling.get("ignore_eos"):
        # a finished grammar allows nothing but the end of the turn, which ignore_eos bans
        raise RequestError("ignore_eos cannot be combined with a grammar (tool_choice, response_format or grammar)",
                           param="ignore_eos")
    return PreparedPrompt(rendered=rendered, tokens=tokens, prefix=prefix, grammar=grammar,
                          max_tokens=min(req.max_tokens or room, room), stop=[s for s in req.stop if s],
                          tool_call_ids=tool_call_ids(req.messages), has_documents=bool(req.documents),
                          n=req.n, logprobs=req.logprobs)


def check_logit_bias(pairs: Any, n_vocab: int) -> None:
    """OpenAI's rule: token ids of the model's vocabulary, biases from -100 to 100."""
    for tok, bias in pairs:
        if not 0 <= tok < n_vocab:
            raise RequestError(f"logit_bias: token {tok} is not in the vocabulary (ids 0 to {n_vocab - 1})",
                               param="logit_bias")
        if not -MAX_BIAS <= bias <= MAX_BIAS:
            raise RequestError(f"logit_bias: the bias of token {tok} must be between -{MAX_BIAS} and {MAX_BIAS}",
                               param="logit_bias")


@contextlib.contextmanager
def _client_errors(what: str) -> Iterator[None]:
    """Errors caused by what the caller sent become a RequestError that says so."""
    try:
        yield
    except RequestError:
        raise
    except (R7BError, TemplateError) as exc:
        raise RequestError(f"{what}: {exc}") from None
    except UnicodeError:
        raise RequestError(f"{what}: the request holds text that is not valid Unicode") from None
    except RecursionError:
        raise RequestError(f"{what}: the request is nested too deeply") from None


def json_or_text(text: str) -> Any:
    """Tool output that is JSON text of an object or array is shown to the model as JSON; anything else stays text."""
    if not text.lstrip().startswith(("{", "[")):
        return text
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return text
    return value if isinstance(value, (dict, list)) else text


def tool_call_ids(messages: list[dict]) -> list[str]:
    """Ids of the tool calls in the conversation, in prompt order (citations refer to them)."""
    ids = []
    for msg in messages:
        for call in msg.get("tool_calls") or []:
            if isinstance(call, dict) and call.get("id") is not None:
                ids.append(str(call["id"]))
    return ids


def check_tool_choice(choice: str, tools: list[dict] | None) -> None:
    if choice in ("auto", "none"):
        return
    if not tools:
        raise RequestError("tool_choice needs a non-empty 'tools' list", param="tool_choice")
    names = {t["function"]["name"] for t in tools}
    if choice != "required" and choice not in names:
        raise RequestError(f"tool_choice names '{choice}', which is not in 'tools'", param="tool_choice")


def choose_grammar(req: ChatRequest, *, response_open: bool) -> str | None:
    """The grammar that enforces tool_choice or response_format, if any.

    `response_open`: the model must write `<|START_RESPONSE|>` itself (the agentic format).
    """
    if req.grammar is not None:
        return req.grammar
    tools = req.tools if req.tool_choice != "none" else None
    check_tool_choice(req.tool_choice, tools)
    if tools and req.tool_choice != "auto":
        only = None if req.tool_choice == "required" else req.tool_choice
        schemas = [t["function"].get("parameters") for t in tools]
        return _schema_grammar("tools", schemas, lambda: tool_call_grammar(tools, only=only))
    if req.response_format is not None:
        schema = req.response_format.get("schema")
        return _schema_grammar("response_format", schema,
                               lambda: json_response_grammar(schema, response_open=response_open))
    if tools and req.constrain_tools:
        return _schema_grammar("tools", [t["function"].get("parameters") for t in tools],
                               lambda: tool_call_grammar(tools))
    if req.tool_choice == "none" and response_open:  # an answer, never an action
        return f'root ::= "{START_RESPONSE}" ({PLAN_CHARS})* "{END_RESPONSE}"'
    return None


def _schema_grammar(param: str, schema: Any, build: Callable[[], str]) -> str:
    """Convert a client's JSON schema; whatever goes wrong is the schema's fault."""
    _check_schema_size(schema, param)
    try:
        return build()
    except Exception as exc:  # the converter asserts and raises freely on schemas it cannot handle
        raise RequestError(f"cannot turn the JSON schema in '{param}' into a grammar: {exc}", param=param) from None


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
                    raise RequestError(f"'{key}' in the JSON schema is above {MAX_REPEAT}, too large for a grammar",
                                       param=param)
                stack.append(value)

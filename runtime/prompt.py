"""Render Command R7B prompts from the project's chat templates, in a locked-down Jinja sandbox.

`render_prompt` is the one way the runtime builds a prompt: it checks and normalizes the
conversation once, picks a template that can show it, and renders. Templates read from model files
are untrusted code, so every template (ours included) runs in the same sandbox, which is configured
like transformers' chat-template environment minus the globals no chat template needs.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
from jinja2.exceptions import SecurityError
from jinja2.ext import loopcontrols
from jinja2.filters import do_attr
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

from r7b.errors import R7BError
from r7b.templates import TEMPLATE_NAMES, preambles, template_source

BOS_TOKEN = "<BOS_TOKEN>"
EOS_TOKEN = "<|END_OF_TURN_TOKEN|>"
MODES = ("conversational", "instruct")
SAFETY_MODES = ("contextual", "strict")
MAX_REPEAT_ITEMS = 1_000_000  # `"x" * n` and `[x] * n` in a template
MAX_POWER_EXPONENT = 1024  # `a ** n`
_MIN_JINJA = (3, 1, 6)  # earlier versions have known sandbox escapes


class TemplateError(R7BError):
    """A prompt could not be rendered: bad input, a template that failed, or one that was unsafe."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()) or "the chat template failed")


# -- the sandbox ---------------------------------------------------------------------------


def _is_private(name: Any) -> bool:
    return isinstance(name, str) and name.startswith("_")


def _refuse_private(obj: Any, name: Any) -> None:
    """Underscore names reach Python internals; only a mapping's own data keys may use them."""
    if _is_private(name) and not (isinstance(obj, Mapping) and name in obj):
        raise SecurityError(f"a chat template may not access {name!r}")


class _Sandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox, made to fail loudly instead of yielding empty strings.

    Stock Jinja turns a blocked attribute into an undefined value that prints as "", so a probing
    template renders quietly. Here any private name or unsafe attribute raises at once.
    """

    intercepted_binops = frozenset({"*", "**"})

    def getattr(self, obj: Any, attribute: str) -> Any:
        _refuse_private(obj, attribute)
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        _refuse_private(obj, argument)
        return super().getitem(obj, argument)

    def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
        raise SecurityError(f"a chat template may not access {attribute!r} of a {type(obj).__name__}")

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        """Bound the two operators that turn a short template into gigabytes or hours."""
        if operator == "*":
            sized, count = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(sized, (str, list, tuple)) and isinstance(count, int):
                if len(sized) * count > MAX_REPEAT_ITEMS:
                    raise SecurityError(f"a chat template may not build sequences over {MAX_REPEAT_ITEMS} items")
        elif operator == "**" and isinstance(right, int) and right > MAX_POWER_EXPONENT:
            raise SecurityError(f"a chat template may not raise to powers over {MAX_POWER_EXPONENT}")
        return super().call_binop(context, operator, left, right)


class _TemplateNamespace(Namespace):
    """`namespace()` for templates, refusing underscore names (they would shadow internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 -- Jinja's signature: `self` may be a key
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace.check_name(name)
        Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace.check_name(name)
        Namespace.__setitem__(self, name, value)

    @staticmethod
    def check_name(name: Any) -> None:
        if _is_private(name):
            raise SecurityError(f"a chat template may not store {name!r} in a namespace")


class _TemplateDict:
    """`dict()` for templates, without exposing the `dict` type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, keys: Any, value: Any = None) -> dict:
        return dict.fromkeys(keys, value)


def _raise_exception(message: Any) -> None:
    raise jinja2.TemplateError(str(message))


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    """transformers' `tojson`: plain `json.dumps`, non-ASCII kept, no HTML escaping."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@jinja2.pass_environment
def _attr(environment: jinja2.Environment, obj: Any, name: Any) -> Any:
    """`|attr` looks names up outside the sandbox's getattr, so it gets the same guard."""
    _refuse_private(obj, name)
    return do_attr(environment, obj, name)


@lru_cache(maxsize=1)
def _environment() -> _Sandbox:
    if _jinja_version() < _MIN_JINJA:
        raise TemplateError(f"jinja2 {jinja2.__version__} has known sandbox escapes; install jinja2>=3.1.6")
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    for name in ("cycler", "joiner", "lipsum"):
        env.globals.pop(name, None)
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now,
                       namespace=_TemplateNamespace, dict=_TemplateDict())
    env.filters.update(tojson=_tojson, attr=_attr)
    return env


def _jinja_version() -> tuple[int, ...]:
    return tuple(int(part) for part in jinja2.__version__.split(".")[:3] if part.isdigit())


@lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    return _environment().from_string(source)


def _render(source: str, label: str, variables: dict[str, Any]) -> str:
    """Render `source`; any failure, whatever its kind, becomes a TemplateError naming it."""
    try:
        return _compile(source).render(**variables)
    except TemplateError:
        raise
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"{label} has a syntax error on line {exc.lineno}: {exc.message}") from None
    except SecurityError as exc:
        raise TemplateError(f"{label} tried an unsafe operation: {exc}") from None
    except jinja2.TemplateError as exc:
        raise TemplateError(f"{label} failed: {exc.message or type(exc).__name__}") from None
    except RecursionError:
        raise TemplateError(f"{label} failed: recursion too deep") from None
    except Exception as exc:  # a template can raise anything Python can (TypeError, ...)
        raise TemplateError(f"{label} failed: {type(exc).__name__}: {exc}") from None


def render_template_source(source: str, **variables: Any) -> str:
    """Render any template string (for example one read from a GGUF file) in the sandbox.

    Variables are first copied into plain JSON values, so the template cannot call methods of
    whatever objects the caller had. Code execution and data access are blocked; very slow or
    very large renders are only partly bounded, so run unknown templates with a time limit.
    """
    if not isinstance(source, str):
        raise TemplateError("a chat template must be a string")
    return _render(source, "chat template", _plain(variables, "template variables"))


# -- input data ----------------------------------------------------------------------------


def _plain(value: Any, where: str) -> Any:
    """A copy built only from JSON types, so nothing a template sees has callable methods."""
    try:
        return _copy_plain(value, where)
    except RecursionError:
        raise TemplateError(f"{where} are nested too deeply (or refer to themselves)") from None


def _copy_plain(value: Any, where: str) -> Any:
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):  # subclasses (enums, ...) may carry methods
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_copy_plain(k, where): _copy_plain(v, where) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_copy_plain(v, where) for v in value)
    if isinstance(value, list):
        return [_copy_plain(v, where) for v in value]
    raise TemplateError(f"{where} hold a {type(value).__name__}; only JSON values can be rendered")


def _object_list(value: Any, what: str) -> list[dict]:
    if not isinstance(value, (list, tuple)):
        raise TemplateError(f"{what} must be a list of objects, not {type(value).__name__}")
    for i, item in enumerate(value):
        if not isinstance(item, Mapping):
            raise TemplateError(f"{what}[{i}] must be an object, not {type(item).__name__}")
    return _plain(list(value), what)


def prepare_messages(messages: Sequence[Mapping[str, Any]], *, normalize: bool = True) -> list[dict]:
    """The conversation as the templates receive it (new objects; the input is not changed).

    Like transformers' apply_chat_template: reject an empty conversation and drop keys whose value
    is None (OpenAI clients send `content: null`). With `normalize`, also `normalize_message`.
    """
    messages = _object_list(messages, "messages")
    if not messages:
        raise TemplateError("the conversation is empty: give at least one message")
    cleaned = [{k: v for k, v in m.items() if v is not None} for m in messages]
    return [normalize_message(m, i) for i, m in enumerate(cleaned)] if normalize else cleaned


def normalize_message(message: dict[str, Any], index: int = 0) -> dict[str, Any]:
    """Map OpenAI-style fields onto the ones Cohere's format reads.

    - role `chatbot` (Cohere's name) becomes `assistant`;
    - `reasoning_content` (OpenAI-style reasoning) becomes the plan, `tool_plan`, unless one is set;
    - tool call `function.arguments` given as a JSON string is parsed, so the call shows the
      arguments object (as the model writes it) instead of a quoted string.
    Tool results keep their content as given: an object, list or text each render as one result.
    """
    role = message.get("role")
    if not isinstance(role, str):
        raise TemplateError(f"message {index} needs a 'role' string")
    out = dict(message)
    if role.lower() == "chatbot":
        out["role"] = "assistant"
    if "tool_plan" not in out and isinstance(out.get("reasoning_content"), str):
        out["tool_plan"] = out.pop("reasoning_content")
    calls = out.get("tool_calls")
    if isinstance(calls, list):
        out["tool_calls"] = [_tool_call(call, f"message {index} tool call {k}") for k, call in enumerate(calls)]
    return out


def _tool_call(call: Any, where: str) -> Any:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("arguments"), str):
        return call  # already in shape, or malformed in a way the template reports
    return {**call, "function": {**function, "arguments": _parse_arguments(function["arguments"], where)}}


def _parse_arguments(text: str, where: str) -> Any:
    if not text.strip():
        return {}
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise TemplateError(f"{where}: arguments are not valid JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:
        raise TemplateError(f"{where}: arguments are nested too deeply") from None


# -- choosing a template -------------------------------------------------------------------


def select_template(messages: Sequence[Mapping[str, Any]], tools: list | None = None,
                    documents: list | None = None) -> str:
    """The template for `template="auto"`.

    As transformers: `tool_use` when tools are given (even an empty list), else `default`. But the
    default template's plain format can only show alternating user/assistant text; it raises on
    anything else, or silently drops tool messages. Such conversations get `tool_use` (with no
    tools listed), whose agentic format shows every turn.
    """
    if tools is not None:
        return "tool_use"
    if documents or fits_plain_chat(messages):
        return "default"
    return "tool_use"


def fits_plain_chat(messages: Sequence[Mapping[str, Any]]) -> bool:
    """True when the default template's plain format shows every message of the conversation."""
    if not messages:
        return False
    has_system = messages[0].get("role") == "system"
    if has_system and not isinstance(messages[0].get("content"), str):
        return False
    for i, message in enumerate(messages[1:] if has_system else messages):
        if message.get("role") != ("user" if i % 2 == 0 else "assistant"):
            return False
        if not isinstance(message.get("content"), str) or message.get("tool_calls"):
            return False
    return True


def uses_agentic_format(template: str, documents: list | None) -> bool:
    """`tool_use` and `rag` always use the agentic format; `default` does when given documents."""
    return template != "default" or bool(documents)


# -- preambles -----------------------------------------------------------------------------


def preamble(mode: str = "conversational", safety: str | None = "contextual") -> str:
    """Cohere's documented system preamble for a chat mode and safety mode (None: contextual).

    `conversational` suits chatbots; `instruct` suits one-shot tasks (extraction, summaries,
    classification): no small talk, no clarifying questions, no Markdown or LaTeX.
    """
    mode, safety = _check_mode(mode, safety)
    texts = preambles()
    text = texts[f"{mode}_preamble_contextual"]
    if safety == "strict":
        text = text.replace(texts["safety_contextual"], texts["safety_strict"])
    return text


def _check_mode(mode: str | None, safety: str | None) -> tuple[str, str]:
    mode = mode or "conversational"
    safety = safety or "contextual"
    if mode not in MODES:
        raise TemplateError(f"unknown mode {mode!r}: choose one of {', '.join(MODES)}")
    if safety not in SAFETY_MODES:
        raise TemplateError(f"unknown safety mode {safety!r}: choose one of {', '.join(SAFETY_MODES)}")
    return mode, safety


def _agentic_overrides(mode: str, safety: str) -> str:
    """What a mode changes relative to the agentic format's built-in conversational/contextual preamble."""
    texts = preambles()
    parts = []
    if safety == "strict":
        parts.append(texts["safety_strict"])
    if mode == "instruct":
        built_in = set(texts["conversational_preamble_contextual"].splitlines())
        parts.append("\n".join(line for line in texts["instruct_preamble_contextual"].splitlines()
                               if line.startswith("- ") and line not in built_in))
    return "\n\n".join(parts)


def with_preamble(messages: list[dict], *, agentic: bool, mode: str | None, safety: str | None) -> list[dict]:
    """The conversation with the chosen mode's preamble in its system message.

    Plain format: the full preamble is the system message; an existing first system message is kept
    after it, separated by a blank line. Agentic format: the template already carries the
    conversational preamble with contextual safety, so only the rules that differ (strict safety,
    instruct-mode bullets) go first in the developer preamble, which takes precedence.
    """
    mode, safety = _check_mode(mode, safety)
    text = _agentic_overrides(mode, safety) if agentic else preamble(mode, safety)
    if not text:
        return messages
    first, own = messages[0], messages[0].get("content")
    role = first.get("role")
    is_system = role == "system" or (agentic and str(role).lower() == "system")
    if is_system and isinstance(own, str):
        return [{**first, "content": f"{text}\n\n{own}" if own else text}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


# -- rendering -----------------------------------------------------------------------------


def render_prompt(messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping] | None = None,
                  documents: Sequence[Mapping] | None = None, *, template: str = "auto",
                  add_generation_prompt: bool = True, enable_citations: bool = False,
                  mode: str | None = None, safety: str | None = None, normalize: bool = True,
                  **extra: Any) -> str:
    """The prompt string for a conversation, exactly as Command R7B expects it.

    `template`: "auto" (see `select_template`) or a name from TEMPLATE_NAMES. `mode`/`safety`
    add one of Cohere's preambles (see `with_preamble`). `normalize=False` renders the messages as
    transformers would (None keys dropped, nothing else changed). `extra` become template
    variables; `bos_token` and `eos_token` default to Command R7B's.
    Raises TemplateError (an R7BError) for any input or template failure.
    """
    msgs = prepare_messages(messages, normalize=normalize)
    tool_list = None if tools is None else _object_list(tools, "tools")
    doc_list = None if documents is None else _object_list(documents, "documents")
    name = select_template(msgs, tool_list, doc_list) if template == "auto" else template
    if name not in TEMPLATE_NAMES:
        raise TemplateError(f"unknown template {template!r}: choose auto or one of {', '.join(TEMPLATE_NAMES)}")
    if mode is not None or safety is not None:
        msgs = with_preamble(msgs, agentic=uses_agentic_format(name, doc_list), mode=mode, safety=safety)
    variables = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, **_plain(extra, "template variables"),
                 "messages": msgs, "tools": tool_list, "documents": doc_list,
                 "add_generation_prompt": add_generation_prompt, "enable_citations": enable_citations}
    try:
        return _render(template_source(name), f"chat template {name!r}", variables)
    except TemplateError as exc:
        raise TemplateError(f"{exc}{_hint(name, tool_list, doc_list)}") from None


def _hint(name: str, tools: list | None, documents: list | None) -> str:
    """A pointer to the usual cause of a template failure, where there is one."""
    if name == "tool_use" and documents and tools is None:
        return " (documents with the tool_use template need a tools list: pass tools=[] or use the rag template)"
    if name == "tool_use" and any(not isinstance(t.get("function"), Mapping) for t in tools or ()):
        return ' (each tool must be {"type": "function", "function": {"name", "description", "parameters"}})'
    if name == "default" and not documents:
        return " (template='auto' picks a template that fits the conversation)"
    return ""


# -- `r7b render` --------------------------------------------------------------------------


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "render", help="print the prompt a conversation renders to",
        description="Print the exact prompt string for INPUT.json (keys: messages, tools, documents, "
                    "add_generation_prompt, enable_citations, bos_token, ...), with no newline added.")
    p.add_argument("input", metavar="INPUT.json", help="conversation file ('-' reads standard input)")
    p.add_argument("--template", choices=("auto", *TEMPLATE_NAMES), default="auto",
                   help="chat template (default: auto, as transformers picks, falling back to one that fits)")
    p.add_argument("--raw", action="store_true",
                   help="render the messages as given (as transformers would), without OpenAI-style normalization")
    p.set_defaults(func=_render_main)


def _render_main(args: argparse.Namespace) -> int:
    options = _read_inputs(args.input)
    messages = options.pop("messages")
    tools, documents = options.pop("tools", None), options.pop("documents", None)
    options.pop("template", None)
    options.pop("normalize", None)
    prompt = render_prompt(messages, tools, documents, template=args.template, normalize=not args.raw, **options)
    _write_exactly(prompt)
    return 0


def _read_inputs(path: str) -> dict[str, Any]:
    name = "standard input" if path == "-" else path
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise R7BError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise R7BError(f"{name} is not UTF-8 text") from None
    try:
        inputs = json.loads(text)
    except json.JSONDecodeError as exc:
        raise R7BError(f"{name} is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from None
    except RecursionError:
        raise R7BError(f"{name} is nested too deeply") from None
    if not isinstance(inputs, dict) or not isinstance(inputs.get("messages"), list):
        raise R7BError(f"{name} must hold a JSON object with a 'messages' list")
    return inputs


def _write_exactly(text: str) -> None:
    """Write UTF-8 bytes, untouched by the locale's encoding or newline translation."""
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:
        raise R7BError("the prompt holds text that is not valid Unicode (a lone surrogate)") from None
    buffer = getattr(sys.stdout, "buffer", None)
    if buffer is None:
        sys.stdout.write(text)
    else:
        buffer.write(data)
    sys.stdout.flush()

"""Render Command R7B prompts from the project's chat templates (or a model file's own).

`render_prompt` is the one way the runtime builds a prompt: it checks and normalizes the
conversation once, picks a template that can show it, and renders it in the sandbox
(sandbox.py). Templates read from model files render in a separate process under OS time and
memory limits (template_worker.py).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from r7b.cohere2 import BOS_TOKEN, END_OF_TURN
from r7b.templates import TEMPLATE_NAMES, preambles, template_source

from .sandbox import UNTRUSTED_SECONDS, TemplateError, plain_copy, render
from .template_worker import TemplateWorker, render_template_source, shared_worker  # noqa: F401 -- re-exported

MODES = ("conversational", "instruct")
SAFETY_MODES = ("contextual", "strict")


# -- input data ----------------------------------------------------------------------------


def _object_list(value: Any, what: str) -> list[dict]:
    if not isinstance(value, (list, tuple)):
        raise TemplateError(f"{what} must be a list of objects, not {type(value).__name__}")
    for i, item in enumerate(value):
        if not isinstance(item, Mapping):
            raise TemplateError(f"{what}[{i}] must be an object, not {type(item).__name__}")
    return plain_copy(list(value), what)


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
                  sources: Mapping[str, str] | None = None, worker: TemplateWorker | None = None,
                  **extra: Any) -> str:
    """The prompt string for a conversation, exactly as Command R7B expects it.

    `template`: "auto" (see `select_template`) or a name from TEMPLATE_NAMES. `mode`/`safety`
    add one of Cohere's preambles (see `with_preamble`). `normalize=False` renders the messages as
    transformers would (None keys dropped, nothing else changed). `extra` become template
    variables; `bos_token` and `eos_token` default to Command R7B's. `sources` replaces the
    built-in templates by name (a model file's own: `r7b.templates.gguf_templates`); they are
    untrusted code and render in a separate process under time and memory limits: `worker` (a
    TemplateWorker, one per loaded model), else this process's shared one.
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
    variables = {"bos_token": BOS_TOKEN, "eos_token": END_OF_TURN, **plain_copy(extra, "template variables"),
                 "messages": msgs, "tools": tool_list, "documents": doc_list,
                 "add_generation_prompt": add_generation_prompt, "enable_citations": enable_citations}
    source, label, seconds = _source(name, sources)
    try:
        if seconds is None:  # the project's own templates: trusted, rendered here
            return render(source, label, variables)
        return (worker or shared_worker()).render(source, label, variables, seconds=seconds)
    except TemplateError as exc:
        raise type(exc)(f"{exc}{_hint(name, tool_list, doc_list)}") from None


def _source(name: str, sources: Mapping[str, str] | None) -> tuple[str, str, float | None]:
    """(source, label for errors, time limit) of the template to render."""
    if sources is None:
        return template_source(name), f"chat template {name!r}", None
    if name not in sources:
        have = ", ".join(sources) or "none"
        raise TemplateError(f"the model file has no {name!r} chat template (it has: {have})")
    return sources[name], f"the model file's chat template {name!r}", UNTRUSTED_SECONDS


def _hint(name: str, tools: list | None, documents: list | None) -> str:
    """A pointer to the usual cause of a template failure, where there is one."""
    if name == "tool_use" and documents and tools is None:
        return " (documents with the tool_use template need a tools list: pass tools=[] or use the rag template)"
    if name == "tool_use" and any(not isinstance(t.get("function"), Mapping) for t in tools or ()):
        return ' (each tool must be {"type": "function", "function": {"name", "description", "parameters"}})'
    if name == "default" and not documents:
        return " (template='auto' picks a template that fits the conversation)"
    return ""

"""Run Python functions as Command R7B tools: plan → call → result → answer, with a step limit.

A function becomes a tool from its signature (type hints → JSON schema) and its docstring's first
line, or from an explicit OpenAI-style tool dict.
"""

from __future__ import annotations

import inspect
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from r7b.errors import R7BError

_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", dict: "object", list: "array"}


def _schema_for(annotation: Any) -> dict:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation in _JSON_TYPES:
        return {"type": _JSON_TYPES[annotation]}
    if origin in (list, tuple, Sequence) and args:
        return {"type": "array", "items": _schema_for(args[0])}
    if origin is typing.Literal:
        return {"enum": list(args)}
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        return _schema_for(options[0]) if len(options) == 1 else {"anyOf": [_schema_for(a) for a in options]}
    if origin is dict:
        return {"type": "object"}
    return {}


def function_tool(fn: Callable[..., Any], *, name: str | None = None, description: str | None = None) -> dict:
    """OpenAI-style tool dict for a Python function, from its signature and docstring."""
    props, required = {}, []
    hints = typing.get_type_hints(fn)
    for pname, param in inspect.signature(fn).parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        props[pname] = _schema_for(hints.get(pname, str))
        if param.default is inspect.Parameter.empty:
            required.append(pname)
    doc = (inspect.getdoc(fn) or "").strip().splitlines()
    return {"type": "function", "function": {
        "name": name or fn.__name__,
        "description": description if description is not None else (doc[0] if doc else ""),
        "parameters": {"type": "object", "properties": props, "required": required},
    }}


@dataclass
class ToolRun:
    """The outcome of a tool loop: the final answer and every message exchanged on the way."""

    result: Any
    messages: list[dict]
    steps: int
    calls: list[dict] = field(default_factory=list)


def _call(functions: dict[str, Callable[..., Any]], call: dict) -> Any:
    """Run one tool call; errors become results the model can read, not exceptions."""
    fn = functions.get(call["function"]["name"])
    if fn is None:
        return {"error": f"unknown tool {call['function']['name']!r}"}
    try:
        args = json.loads(call["function"]["arguments"] or "{}")
        if not isinstance(args, dict):
            return {"error": "arguments must be a JSON object"}
        return fn(**args)
    except Exception as exc:  # a tool's failure is data for the model
        return {"error": f"{type(exc).__name__}: {exc}"}


def _as_content(value: Any) -> Any:
    return value if isinstance(value, (dict, list, str)) else json.dumps(value, default=str)


def run_tools(model, messages: Sequence[dict], functions: Sequence[Callable[..., Any]] | dict[str, Callable[..., Any]],
              *, tools: list[dict] | None = None, max_steps: int = 5, **chat_options: Any) -> ToolRun:
    """Chat until the model answers without calling a tool, running its calls in between."""
    if not isinstance(functions, dict):
        functions = {fn.__name__: fn for fn in functions}
    if tools is None:
        tools = [function_tool(fn, name=name) for name, fn in functions.items()]
    history = list(messages)
    calls: list[dict] = []
    for step in range(1, max_steps + 1):
        result = model.chat(history, tools, **chat_options)
        history.append(result.message())
        if not result.tool_calls:
            return ToolRun(result, history, step, calls)
        for call in result.tool_calls:
            output = _call(functions, call)
            calls.append({"call": call, "output": output})
            history.append({"role": "tool", "tool_call_id": call["id"], "content": _as_content(output)})
    raise R7BError(f"no answer after {max_steps} tool steps (raise max_steps or check the tools)")

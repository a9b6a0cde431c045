"""GBNF grammars that make small quantized models write well-formed Command R7B output.

`tool_call_grammar` forces an action block whose JSON names only the given tools and whose
parameters follow each tool's JSON schema; `json_response_grammar` forces the answer to be JSON
(OpenAI's response_format). Special-token text in a grammar literal matches the control token,
since llama.cpp's grammar sampler compares against token text with specials rendered.
"""

from __future__ import annotations

import json
from typing import Any

from llama_cpp.llama_grammar import SchemaConverter

from r7b.errors import R7BError

PLAN_CHARS = r'[^<] | "<" [^|]'


def _converter() -> SchemaConverter:
    return SchemaConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)


def _literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _strict_strings(grammar: str) -> str:
    """JSON strings without raw control characters or special-token text (which would end generation)."""
    return grammar.replace('char ::= [^"\\\\] |', 'char ::= [^"\\\\\\x7F\\x00-\\x1F<] | "<" [^"\\\\\\x7F\\x00-\\x1F|A-Z] |')


def _tool_function(tool: Any) -> dict:
    if not isinstance(tool, dict) or not isinstance(tool.get("function"), dict) or "name" not in tool["function"]:
        raise R7BError("each tool must look like {'type': 'function', 'function': {'name': ..., 'parameters': ...}}")
    return tool["function"]


def tool_call_grammar(tools: list, *, allow_thinking: bool = True, only: str | None = None) -> str:
    """Grammar for `[<|START_THINKING|>plan<|END_THINKING|>]<|START_ACTION|>[calls]<|END_ACTION|>`.

    `only` restricts the calls to one tool (OpenAI's named tool_choice).
    """
    conv = _converter()
    alternatives = []
    for i, tool in enumerate(tools):
        fn = _tool_function(tool)
        if only is not None and fn["name"] != only:
            continue
        params = conv.visit(fn.get("parameters") or {"type": "object"}, f"tool-{i}-params")
        alternatives.append(f'{_literal(", " + chr(34) + "tool_name" + chr(34) + ": " + json.dumps(fn["name"]))} '
                            f'{_literal(", " + chr(34) + "parameters" + chr(34) + ": ")} {params}')
    if not alternatives:
        raise R7BError(f"tool_choice names {only!r}, which is not among the tools")
    rules = [
        f'root ::= {"thinking? " if allow_thinking else ""}action',
        f'thinking ::= "<|START_THINKING|>" ({PLAN_CHARS})* "<|END_THINKING|>"',
        r'action ::= "<|START_ACTION|>[\n" call (",\n" call)* "\n]<|END_ACTION|>"',
        r'call ::= "    {\"tool_call_id\": \"" [0-9]{1,4} "\"" call-body "}"',
        "call-body ::= " + " | ".join(f"( {alt} )" for alt in alternatives),
    ]
    return "\n".join(rules) + "\n" + _strict_strings(conv.format_grammar())


def json_response_grammar(schema: dict | None = None, *, response_open: bool = True) -> str:
    """Grammar for an answer that is a JSON value (any object, or one matching `schema`).

    `response_open` adds the `<|START_RESPONSE|>` the model writes itself in the agentic format;
    the plain format's prompt already ends with it.
    """
    conv = _converter()
    body = conv.visit(schema if schema is not None else {"type": "object"}, "answer")
    head = '"<|START_RESPONSE|>" ' if response_open else ""
    return f'root ::= {head}{body} "<|END_RESPONSE|>"\n' + _strict_strings(conv.format_grammar())

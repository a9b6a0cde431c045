"""`r7b render`: print the exact prompt a conversation renders to, without loading a model."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from r7b.errors import R7BError
from r7b.templates import TEMPLATE_NAMES

from .prompt import render_prompt


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

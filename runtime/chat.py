"""`r7b chat` (interactive, streamed) and `r7b generate` (one shot, for scripts)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from r7b.errors import R7BError

from .model import ChatSession, Done
from .options import add_model_options, load_kwargs
from .remote import load_model
from .parse import TextDelta, ThinkingDelta, ToolCallEvent

HELP = "commands: /reset  /save FILE  /load FILE  /exit  (Ctrl-D exits)"


def _add_model_args(p: argparse.ArgumentParser) -> None:
    add_model_options(p)
    p.add_argument("--system", help="system message (a developer preamble)")
    p.add_argument("--mode", choices=["conversational", "instruct"], help="use one of Cohere's preambles")
    p.add_argument("--tools", metavar="FILE", help="JSON list of OpenAI-style tools")
    p.add_argument("--documents", metavar="FILE", help="JSON list of documents for grounded answers")
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.3)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)


def register(subparsers: argparse._SubParsersAction) -> None:
    chat = subparsers.add_parser("chat", help="interactive offline chat in the terminal")
    _add_model_args(chat)
    chat.set_defaults(func=_chat_main)
    gen = subparsers.add_parser("generate", help="answer one prompt and print only the answer")
    _add_model_args(gen)
    gen.add_argument("--prompt", required=True, help="the user message ('-' reads standard input)")
    gen.set_defaults(func=_generate_main)


def _read_json_list(path: str | None, what: str) -> list | None:
    if path is None:
        return None
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise R7BError(f"cannot read {what} file {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise R7BError(f"{what} file {path} is not valid JSON: {exc}") from None
    if not isinstance(value, list):
        raise R7BError(f"{what} file {path} must hold a JSON list")
    return value


def _load(args: argparse.Namespace):
    model = load_model(args.model, **load_kwargs(args))
    return ChatSession(model, system=args.system, tools=_read_json_list(args.tools, "tools"),
                       documents=_read_json_list(args.documents, "documents"), mode=args.mode,
                       max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)


def _generate_main(args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    session = _load(args)
    result = session.send(prompt)
    if result.tool_calls:
        print(json.dumps(result.tool_calls, ensure_ascii=False))
    else:
        print(result.text)
    return 0


class _Style:
    """ANSI styles when writing to a terminal (and NO_COLOR is unset); plain text otherwise."""

    def __init__(self, stream):
        on = stream.isatty() and "NO_COLOR" not in os.environ
        self.dim = "\033[2m" if on else ""
        self.tool = "\033[36m" if on else ""
        self.reset = "\033[0m" if on else ""


def _print_stream(events, style: _Style):
    out = sys.stdout
    in_thinking = False
    for event in events:
        if isinstance(event, ThinkingDelta):
            if not in_thinking:
                out.write(f"{style.dim}[thinking] ")
                in_thinking = True
            out.write(event.text)
        else:
            if in_thinking:
                out.write(f"{style.reset}\n")
                in_thinking = False
            if isinstance(event, TextDelta):
                out.write(event.text)
            elif isinstance(event, ToolCallEvent):
                fn = event.tool_call["function"]
                out.write(f"{style.tool}[tool call {event.tool_call['id']}] {fn['name']}({fn['arguments']}){style.reset}\n")
            elif isinstance(event, Done):
                out.write("\n")
                out.flush()
                return event.result
        out.flush()
    return None


def _setup_history() -> None:
    try:
        import readline
    except ImportError:  # Windows without pyreadline
        return
    path = Path(os.environ.get("R7B_HISTORY", Path.home() / ".r7b_history"))
    try:
        readline.read_history_file(path)
    except OSError:
        pass
    import atexit

    atexit.register(lambda: _save_history(readline, path))


def _save_history(readline, path: Path) -> None:
    try:
        readline.write_history_file(path)
    except OSError:
        pass


def _command(session, line: str) -> bool:
    """Handle a /command; returns False to leave the chat."""
    name, _, arg = line.partition(" ")
    arg = arg.strip()
    if name in ("/exit", "/quit"):
        return False
    if name == "/reset":
        session.reset()
        print("(conversation cleared)")
    elif name in ("/save", "/load") and not arg:
        print(f"usage: {name} FILE")
    elif name == "/save":
        session.save(arg)
        print(f"(saved {len(session.messages)} messages to {arg})")
    elif name == "/load":
        try:
            session.load(arg)
            print(f"(loaded {len(session.messages)} messages from {arg})")
        except R7BError as exc:
            print(f"error: {exc}")
    else:
        print(HELP)
    return True


def _answer_tool_calls(session, result) -> bool:
    """Ask the user for each tool's result (there is no code to run in the terminal)."""
    for call in result.tool_calls:
        try:
            text = input(f"result of {call['function']['name']} (JSON or text)> ")
        except EOFError:
            return False
        try:
            content: Any = json.loads(text)
        except json.JSONDecodeError:
            content = text
        session.messages.append({"role": "tool", "tool_call_id": call["id"], "content": content})
    return True


def _chat_main(args: argparse.Namespace) -> int:
    session = _load(args)
    style = _Style(sys.stdout)
    _setup_history()
    print(f"r7b chat · {Path(args.model).name} · {HELP}")
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not line.strip():
            continue
        if line.startswith("/"):
            if not _command(session, line.strip()):
                return 0
            continue
        result = _print_stream(session.send(line, stream=True), style)
        while result is not None and result.tool_calls:
            if not _answer_tool_calls(session, result):
                return 0
            result = _print_stream(session.send(None, stream=True), style)

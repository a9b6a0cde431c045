"""The `r7b` command: one entry point, one subcommand per job.

The table below maps each command to the module that implements it; only the chosen module is
imported, so `r7b render` does not pay for llama.cpp or torch, and each module imports what it
needs at its top. A command module exposes `register(subparsers)`, which adds its parser and sets
`func(args) -> int | None` as the parser default. User errors (`R7BError`, bad files) print one
line and exit 1; only real bugs show a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from . import __version__
from .errors import R7BError

# command: (module, one line for `r7b --help`)
COMMANDS = {
    "convert": ("r7b.convert.convert", "convert a Hugging Face checkpoint (folder or hub id) to GGUF"),
    "quantize": ("r7b.convert.quantize", "quantize a GGUF with llama.cpp (or --list the types)"),
    "imatrix": ("r7b.convert.imatrix", "collect an importance matrix for quantization"),
    "pull": ("r7b.convert.pull", "download, convert and quantize in one step"),
    "info": ("r7b.convert.info", "describe a GGUF: architecture, sizes, vocabulary, templates"),
    "render": ("r7b.runtime.render", "print the prompt a conversation renders to"),
    "chat": ("r7b.runtime.chat", "interactive offline chat in the terminal"),
    "generate": ("r7b.runtime.chat", "answer one prompt and print only the answer"),
    "serve": ("r7b.runtime.server", "OpenAI-compatible HTTP API (chat completions, tools, documents)"),
    "eval": ("r7b.quality.eval", "quality drop of quantized models: PPL, KL divergence, top-1 agreement"),
    "bench": ("r7b.quality.bench", "prefill/decode speed and memory, beside raw llama.cpp"),
    "worker": ("r7b.runtime.worker", "lend this machine's CPU to another machine's model (llama.cpp RPC)"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser, with the full subparser of `command` only (every command when None)."""
    parser = argparse.ArgumentParser(prog="r7b", description="Run Cohere's Command R7B offline with llama.cpp.")
    parser.add_argument("--version", action="version", version=f"r7b-edge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = {module for name, (module, _) in COMMANDS.items() if command is None or name == command}
    for module in dict.fromkeys(m for m, _ in COMMANDS.values()):
        if module in wanted:
            importlib.import_module(module).register(sub)
    registered = set(sub.choices)
    for name, (_, help_text) in COMMANDS.items():
        if name not in registered:
            sub.add_parser(name, help=help_text, add_help=False)
    _order(sub)
    return parser


def _order(sub: argparse._SubParsersAction) -> None:
    """List commands in the table's order in `r7b --help`, whichever were imported."""
    rank = {name: i for i, name in enumerate(COMMANDS)}
    sub._choices_actions.sort(key=lambda a: rank.get(a.dest, len(rank)))


def _command(argv: Sequence[str]) -> str | None:
    for arg in argv:
        if not arg.startswith("-"):
            return arg if arg in COMMANDS else None
    return None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(_command(argv))
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except R7BError as exc:
        print(f"r7b {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"r7b {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 141


if __name__ == "__main__":
    sys.exit(main())

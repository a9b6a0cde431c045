"""The `r7b` command: one entry point, one subcommand per job.

Each command module exposes `register(subparsers)`, which adds its parser and sets
`func(args) -> int | None` as the parser default. User errors (`R7BError`, bad files)
print one line and exit 1; only real bugs show a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from . import __version__
from .errors import R7BError

# Command modules, imported lazily so that `r7b render` does not pay for llama.cpp or torch.
COMMAND_MODULES = (
    "r7b.convert.hf_to_gguf",
    "r7b.convert.quantize",
    "r7b.convert.imatrix",
    "r7b.convert.pull",
    "r7b.convert.info",
    "r7b.runtime.prompt",
    "r7b.runtime.chat_cli",
    "r7b.runtime.server",
    "r7b.quality",
    "r7b.runtime.bench",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="r7b", description="Run Cohere's Command R7B offline with llama.cpp."
    )
    parser.add_argument("--version", action="version", version=f"r7b-edge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # command not built yet
                continue
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
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

"""Command R7B's three chat templates (`default`, `tool_use`, `rag`), written by this project.

Each template is a short file that imports its pieces from partials (files named `_*.jinja`, one
part of the format each). GGUF metadata and `tokenizer_config.json` carry one string per template,
and the renderers that read them (transformers, llama.cpp) have no template loader, so
`template_source` inlines the partials into a single self-contained string.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

from r7b.errors import R7BError

TEMPLATE_NAMES = ("default", "tool_use", "rag")
# Where GGUF files keep each template (llama.cpp's and gguf-py's key names).
GGUF_KEYS = {"default": "tokenizer.chat_template", "tool_use": "tokenizer.chat_template.tool_use",
             "rag": "tokenizer.chat_template.rag"}
TEMPLATE_DIR = Path(__file__).resolve().parent

# `{% from "_part.jinja" import a, b %}` on its own line; only partials are ever imported.
_IMPORT = re.compile(r'\{%-?\s*from\s+"(_[a-z_]+\.jinja)"\s+import\s+[\w\s,]+?\s*-?%\}\n?')


def template_source(name: str) -> str:
    """The named template as one Jinja string, partials inlined (what GGUF files embed)."""
    if name not in TEMPLATE_NAMES:
        raise R7BError(f"unknown chat template {name!r}: choose one of {', '.join(TEMPLATE_NAMES)}")
    return _flattened(name)


def gguf_templates(metadata: Mapping[str, Any]) -> dict[str, str]:
    """The chat templates a GGUF's metadata carries, by name (untrusted: render them sandboxed)."""
    found = {name: metadata.get(key) for name, key in GGUF_KEYS.items()}
    return {name: value for name, value in found.items() if isinstance(value, str)}


@lru_cache(maxsize=None)
def _flattened(name: str) -> str:
    # Jinja drops one trailing newline itself; other renderers may not, so none is kept.
    return _inline(_read(f"{name}.jinja"), set()).rstrip("\n")


def _inline(text: str, seen: set[str]) -> str:
    """Replace each partial import by the partial's own macros (each partial once)."""

    def expand(match: re.Match) -> str:
        partial = match.group(1)
        if partial in seen:
            return ""
        seen.add(partial)
        return _inline(_read(partial), seen)

    return _IMPORT.sub(expand, text)


def _read(filename: str) -> str:
    return (TEMPLATE_DIR / filename).read_text(encoding="utf-8")


@lru_cache(maxsize=1)
def preambles() -> dict[str, str]:
    """Cohere's documented preambles and safety paragraphs (see preambles.json)."""
    data = json.loads(_read("preambles.json"))
    return {key: value for key, value in data.items() if key != "source"}

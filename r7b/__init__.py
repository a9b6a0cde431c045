"""r7b-edge: Cohere's Command R7B on hardware people already own."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public names and the modules that define them, imported on first use so `import r7b` stays cheap.
_LAZY_EXPORTS = {
    "render_prompt": "r7b.runtime.prompt",
    "Model": "r7b.runtime.model",
    "ChatSession": "r7b.runtime.model",
}

__all__ = ["__version__", *_LAZY_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _LAZY_EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'r7b' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY_EXPORTS})

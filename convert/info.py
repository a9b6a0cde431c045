"""`r7b info MODEL.gguf`: what a GGUF holds, read without loading the weights.

The file is checked by the validator first, so a damaged or hostile file gets a one-line error
instead of reaching llama.cpp.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path
from typing import Any

import gguf

from r7b.templates import gguf_templates, template_source

from r7b.gguf_validate import validate_gguf


def describe(path: str | Path) -> dict[str, Any]:
    """A JSON-ready summary: architecture, sizes, file type, vocabulary, templates."""
    summary = validate_gguf(path, arch=None, check_tensor_data=False)
    meta = summary.metadata
    arch = meta.get("general.architecture", "?")
    n_params = sum(_numel(t.shape) for t in summary.tensors)
    data_bytes = sum(t.nbytes for t in summary.tensors)
    file_type = meta.get("general.file_type")
    tokens = meta.get("tokenizer.ggml.tokens")
    return {
        "file": str(path),
        "file_bytes": summary.file_size,
        "gguf_version": summary.version,
        "architecture": arch,
        "name": meta.get("general.name"),
        "file_type": _ftype_name(file_type),
        "parameters": n_params,
        "bits_per_weight": round(8 * data_bytes / n_params, 3) if n_params else None,
        "tensor_types": dict(Counter(_type_name(t.type) for t in summary.tensors).most_common()),
        "hyperparameters": {k.split(".", 1)[1]: v for k, v in meta.items() if k.startswith(f"{arch}.")},
        "vocab_size": tokens if isinstance(tokens, int) else (len(tokens) if tokens is not None else None),
        "tokenizer": {"model": meta.get("tokenizer.ggml.model"), "pre": meta.get("tokenizer.ggml.pre"),
                      "bos_id": meta.get("tokenizer.ggml.bos_token_id"),
                      "eos_id": meta.get("tokenizer.ggml.eos_token_id")},
        "chat_templates": _templates(meta),
        "quantization": {k: v for k, v in meta.items() if k.startswith(("quantize.", "r7b."))},
    }


def _templates(meta: dict[str, Any]) -> dict[str, str]:
    """Each template the file carries: "builtin" when it is r7b-edge's own, byte for byte, else "custom".

    Only compared, never rendered: `--chat-template gguf` renders a custom one, sandboxed.
    """
    return {name: "builtin" if source == template_source(name) else "custom"
            for name, source in gguf_templates(meta).items()}


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _ftype_name(value) -> str | None:
    try:
        return gguf.LlamaFileType(int(value)).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except (TypeError, ValueError):
        return None if value is None else str(value)


def _type_name(value) -> str:
    try:
        return gguf.GGMLQuantizationType(int(value)).name
    except (TypeError, ValueError):
        return str(value)


def format_info(info: dict[str, Any]) -> str:
    hp = info["hyperparameters"]
    lines = [
        f"{info['file']}",
        f"  architecture   {info['architecture']} ({info['name'] or 'unnamed'}), GGUF v{info['gguf_version']}",
        f"  file type      {info['file_type']}, {info['bits_per_weight']} bits/weight, "
        f"{info['file_bytes'] / 2**20:,.1f} MiB on disk",
        f"  parameters     {info['parameters']:,}",
        f"  tensor types   " + ", ".join(f"{k}×{v}" for k, v in info["tensor_types"].items()),
        f"  layers         {hp.get('block_count')} (hidden {hp.get('embedding_length')}, "
        f"FFN {hp.get('feed_forward_length')}, heads {hp.get('attention.head_count')}/"
        f"{hp.get('attention.head_count_kv')} KV)",
        f"  context        {hp.get('context_length')} tokens, sliding window {hp.get('attention.sliding_window')}",
        f"  vocabulary     {info['vocab_size']} tokens ({info['tokenizer']['model']}, "
        f"pre-tokenizer {info['tokenizer']['pre']})",
        f"  chat templates " + (", ".join(f"{k} ({v})" for k, v in info["chat_templates"].items()) or "none"),
    ]
    for key, value in info["quantization"].items():
        lines.append(f"  {key:<14} {value}")
    return "\n".join(lines)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("info", help="describe a GGUF file (validated, weights not loaded)")
    p.add_argument("model", metavar="MODEL.gguf")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    info = describe(args.model)
    print(json.dumps(info, indent=2, default=str) if args.json else format_info(info))
    return 0

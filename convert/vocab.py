"""Turn a Hugging Face byte-level BPE tokenizer into GGUF's `gpt2` vocabulary.

llama.cpp re-implements the tokenizer from three arrays (tokens, token types, merges) plus a
pre-tokenizer name; for Command-R that name is `command-r` (single digits, then GPT-2's regex).
Added tokens marked special become CONTROL tokens, which llama.cpp only produces from text when
asked to parse special tokens; that is what keeps user text from turning into control tokens.
Command-R's tokenizer marks its chat tokens (`<|START_OF_TURN_TOKEN|>` ...) *not* special, and
llama.cpp matches the other added tokens (USER_DEFINED) inside any text, special parsing or not;
so every added token shaped like a chat-control token is CONTROL whatever its `special` flag says,
as llama.cpp's own converter does (`does_token_look_special`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from gguf import TokenType

from r7b.cohere2 import is_chat_control
from r7b.errors import R7BError



@dataclass
class Vocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    unk_id: int | None
    add_bos: bool
    add_eos: bool


def _load(folder: Path, name: str) -> dict:
    path = folder / name
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise R7BError(f"invalid JSON in {path}: {exc}") from None


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


def _merges(model: dict) -> list[str]:
    merges = model.get("merges", [])
    return [" ".join(m) if isinstance(m, list) else m for m in merges]


def read_vocab(folder: Path, vocab_size: int) -> Vocab:
    """Read tokenizer.json (+ tokenizer_config.json); pad to the model's vocab size as llama.cpp does."""
    tok = _load(folder, "tokenizer.json")
    if not tok:
        raise R7BError(f"missing file: {folder / 'tokenizer.json'}")
    model = tok.get("model") or {}
    if model.get("type") != "BPE":
        raise R7BError(f"tokenizer.json model is {model.get('type')!r}; Command R7B uses byte-level BPE")
    by_id: dict[int, tuple[str, int]] = {i: (t, TokenType.NORMAL) for t, i in model["vocab"].items()}
    for added in tok.get("added_tokens", []):
        control = added.get("special") or is_chat_control(added["content"])
        kind = TokenType.CONTROL if control else TokenType.USER_DEFINED
        by_id[added["id"]] = (added["content"], kind)
    if max(by_id) >= vocab_size:
        raise R7BError(f"tokenizer has id {max(by_id)} but the model's vocab_size is {vocab_size}")
    tokens, types = [], []
    for i in range(vocab_size):
        text, kind = by_id.get(i, (f"[PAD{i}]", TokenType.UNUSED))
        tokens.append(text)
        types.append(int(kind))
    ids = {t: i for i, t in enumerate(tokens)}
    cfg = _load(folder, "tokenizer_config.json")
    special = _load(folder, "special_tokens_map.json")

    def token_id(key: str) -> int | None:
        text = _token_text(cfg.get(key)) or _token_text(special.get(key))
        return ids.get(text) if text else None

    return Vocab(
        tokens=tokens, types=types, merges=_merges(model),
        bos_id=token_id("bos_token"), eos_id=token_id("eos_token"),
        pad_id=token_id("pad_token"), unk_id=token_id("unk_token"),
        add_bos=bool(cfg.get("add_bos_token", True)), add_eos=bool(cfg.get("add_eos_token", False)),
    )


def checkpoint_templates(folder: Path) -> list[dict[str, str]]:
    """The chat templates a checkpoint's tokenizer_config.json carries, as [{name, template}]."""
    value = _load(folder, "tokenizer_config.json").get("chat_template")
    if isinstance(value, str):
        return [{"name": "default", "template": value}]
    if isinstance(value, list):
        return [t for t in value if isinstance(t, dict)
                and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)]
    return []

"""Keep control-token text in user data from becoming control tokens.

Before rendering, every occurrence of a control token's text inside data (message content, tool
results, tool arguments, documents, tool descriptions) is fenced with two private-use characters.
After rendering, fenced spans are tokenized as plain text and the rest (written by the template)
with special-token parsing. The fences never reach the model or the user.

`Protector.tokenize` tokenizes a fenced prompt exactly as Hugging Face's tokenizer would if the
data were plain text: only the control tokens the template wrote are split out, and each stretch
between two of them (template text and data together) is one plain text, so data that spells a
control token gets the same ids as any other text there.

Keeping text plain relies on the control tokens being CONTROL in the model file: llama.cpp matches
USER_DEFINED tokens inside any text even when not parsing special tokens. `check_token_types` and
`check_vocab` refuse a model whose chat-control tokens are USER_DEFINED (as in files made by
converters that trust Command-R's `special: false` flags).
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any, Callable, Iterable

from r7b.cohere2 import PLAIN_CONTROL_TEXTS, is_chat_control
from r7b.errors import R7BError

OPEN, CLOSE = "\ue000", "\ue001"
_FENCED = re.compile(f"{OPEN}(.*?){CLOSE}", re.S)


class Protector:
    """Fences control-token text in data; splits a rendered prompt back into (text, is_data) pieces."""

    def __init__(self, control_texts: Iterable[str]):
        texts = sorted((t for t in control_texts if t), key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, texts))) if texts else None

    def fence(self, value: Any) -> Any:
        """Return a copy of a JSON-like value with control-token text fenced in every string, keys included
        (a tool result's or a document's keys are rendered as data too)."""
        if isinstance(value, str):
            value = value.replace(OPEN, "").replace(CLOSE, "")  # only fences made here may exist
            return self._pattern.sub(lambda m: OPEN + m.group(0) + CLOSE, value) if self._pattern else value
        if isinstance(value, dict):
            return {self.fence(k) if isinstance(k, str) else k: self.fence(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.fence(v) for v in value]
        return value

    @staticmethod
    def split(rendered: str) -> list[tuple[str, bool]]:
        """Pieces of a rendered prompt: (text, True) for fenced data, (text, False) for template text.

        A fence left unpaired (a template that cut a string it was given) would leave data outside
        any fence, so it is refused rather than guessed at.
        """
        pieces, pos = [], 0
        for m in _FENCED.finditer(rendered):
            if m.start() > pos:
                pieces.append((rendered[pos:m.start()], False))
            pieces.append((m.group(1), True))
            pos = m.end()
        if pos < len(rendered):
            pieces.append((rendered[pos:], False))
        if any(OPEN in text or CLOSE in text for text, _ in pieces):
            raise R7BError("the chat template cut a message apart where it holds control-token text, "
                           "so that text could not be kept from becoming control tokens")
        return pieces

    @staticmethod
    def strip(rendered: str) -> str:
        """The prompt as the model sees it, fences removed."""
        return rendered.replace(OPEN, "").replace(CLOSE, "")

    def segments(self, rendered: str) -> list[tuple[str, bool]]:
        """The prompt as (text, is_control): each control token the template wrote alone, and
        every stretch between two of them, fenced data included, as one plain text."""
        out: list[tuple[str, bool]] = []
        plain: list[str] = []

        def flush() -> None:
            if plain:
                out.append(("".join(plain), False))
                plain.clear()

        for text, is_data in self.split(rendered):
            if is_data or self._pattern is None:
                plain.append(text)
                continue
            pos = 0
            for m in self._pattern.finditer(text):
                plain.append(text[pos:m.start()])
                flush()
                out.append((m.group(0), True))
                pos = m.end()
            plain.append(text[pos:])
        flush()
        return [(text, control) for text, control in out if text]

    def tokenize(self, rendered: str, tokenize: Callable[[str, bool], list[int]]) -> list[int]:
        """Tokenize a fenced prompt: `tokenize(text, special)` with special=True only for the control
        tokens the template wrote; plain text is NFC-normalized first, as Command R7B's Hugging Face
        tokenizer does (llama.cpp does not)."""
        ids: list[int] = []
        for text, control in self.segments(rendered):
            ids.extend(tokenize(text, True) if control else tokenize(unicodedata.normalize("NFC", text), False))
        return ids


# -- the model's token types ------------------------------------------------------------------------

# llama.cpp's llama_token_attr bits (llama.h), as `llama_vocab_get_attr` returns them.
ATTR_CONTROL = 1 << 3
ATTR_USER_DEFINED = 1 << 4


def _must_be_control(text: str) -> bool:
    return is_chat_control(text) or text in PLAIN_CONTROL_TEXTS


def check_token_types(tokens: Iterable[tuple[str, int]], source: str = "the model") -> None:
    """Refuse a vocabulary, given as (text, llama.cpp attribute) by token id, whose control tokens
    are USER_DEFINED: llama.cpp would turn user text that spells one into that token."""
    bad = [(i, text) for i, (text, attr) in enumerate(tokens) if attr & ATTR_USER_DEFINED and _must_be_control(text)]
    if bad:
        _refuse(source, bad)


def check_vocab(n_vocab: int, attr: Callable[[int], int], text: Callable[[int], bytes | str],
                source: str = "the model") -> None:
    """`check_token_types` on a loaded llama.cpp vocabulary, e.g.
    `check_vocab(engine.n_vocab, engine.model.token_attr, engine.model.token_text, str(engine.path))`;
    fetches the text only of USER_DEFINED tokens (256,000 attribute reads take ~0.15 s)."""
    bad = []
    for i in range(n_vocab):
        if attr(i) & ATTR_USER_DEFINED:
            value = text(i)
            value = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
            if _must_be_control(value):
                bad.append((i, value))
    if bad:
        _refuse(source, bad)


def _refuse(source: str, bad: list[tuple[int, str]]) -> None:
    i, text = bad[0]
    more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
    raise R7BError(f"{source} marks control token {text} (id {i}){more} USER_DEFINED instead of CONTROL, so "
                   "llama.cpp would turn user text that spells it into that token; convert the checkpoint again "
                   "with `r7b convert`")

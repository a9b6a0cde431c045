"""Keep control-token text in user data from becoming control tokens.

Before rendering, every occurrence of a control token's text inside data (message content, tool
results, tool arguments, documents, tool descriptions) is fenced with two private-use characters.
After rendering, fenced spans are tokenized as plain text and the rest (written by the template)
with special-token parsing. The fences never reach the model or the user.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any, Callable, Iterable

from r7b.errors import R7BError

OPEN, CLOSE = "\ue000", "\ue001"
_FENCED = re.compile(f"{OPEN}(.*?){CLOSE}", re.S)


class Protector:
    """Fences control-token text in data; splits a rendered prompt back into (text, is_data) pieces."""

    def __init__(self, control_texts: Iterable[str]):
        texts = sorted((t for t in control_texts if t), key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, texts))) if texts else None

    def fence(self, value: Any) -> Any:
        """Return a copy of a JSON-like value with control-token text fenced in every string."""
        if isinstance(value, str):
            value = value.replace(OPEN, "").replace(CLOSE, "")  # only fences made here may exist
            return self._pattern.sub(lambda m: OPEN + m.group(0) + CLOSE, value) if self._pattern else value
        if isinstance(value, dict):
            return {k: self.fence(v) for k, v in value.items()}
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


def tokenize_rendered(rendered: str, tokenize: Callable[[str, bool], list[int]]) -> list[int]:
    """Tokenize a fenced prompt: `tokenize(text, special)` parses control tokens only outside fences.

    Text is NFC-normalized first, as the Hugging Face tokenizer of Command R7B does (llama.cpp does not).
    """
    ids: list[int] = []
    for text, is_data in Protector.split(rendered):
        text = unicodedata.normalize("NFC", text)
        ids.extend(tokenize(text, not is_data))
    return ids

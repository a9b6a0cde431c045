"""Split what Command R7B writes into thinking, tool calls, answer text and citations.

The model writes `<|START_THINKING|>plan<|END_THINKING|>` and `<|START_ACTION|>[calls]<|END_ACTION|>`,
or `<|START_RESPONSE|>answer<|END_RESPONSE|>`, then `<|END_OF_TURN_TOKEN|>`. Answers may ground spans
as `<co>span</co: 0:[1,2],1:[0]>`. One incremental parser serves streaming and whole outputs alike, so
both give the same result. Model output is untrusted: nothing here raises on it; what cannot be read
is kept as text and reported through `malformed` and `error`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Sequence, Union

from r7b.cohere2 import (END_ACTION, END_OF_TURN, END_RESPONSE, END_THINKING, START_ACTION, START_OF_TURN,
                         START_RESPONSE, START_THINKING)


# The documents turn is a pseudo tool call written as "tool_call_id": "0" in the prompt.
DOCUMENTS_CALL_ID = "0"

_TOP, _THINKING, _ACTION, _RESPONSE, _TAG, _ENDED = "top", "thinking", "action", "response", "tag", "ended"
_OPENERS = {START_THINKING: _THINKING, START_ACTION: _ACTION, START_RESPONSE: _RESPONSE}
_CLOSERS = {_THINKING: END_THINKING, _ACTION: END_ACTION, _RESPONSE: END_RESPONSE}
_TURN_ENDS = (END_OF_TURN, START_OF_TURN)
_SPECIAL = (*_OPENERS, *_CLOSERS.values(), *_TURN_ENDS)
_CITE_OPEN, _CITE_CLOSE, _CITE_CLOSE_BARE = "<co>", "</co:", "</co>"
_RESPONSE_MARKERS = (*_SPECIAL, _CITE_OPEN, _CITE_CLOSE, _CITE_CLOSE_BARE)
_LONGEST = max(len(m) for m in _RESPONSE_MARKERS)

_MAX_TAG = 256  # longer "</co: ..." bodies are text, so a stray "</co:" cannot swallow the answer
_TAG_STOP = re.compile(r"[^\w\s,:\[\]\-]")
_GROUP = re.compile(r"\s*([\w\-]+)\s*:\s*\[([^\]]*)\]\s*")
_DIGITS = re.compile(r"[0-9]+")
_MAX_ERRORS = 8


class Source(NamedTuple):
    """A cited result: the tool call that produced it and the result's index (a document's position)."""

    tool_call_id: str
    index: int


@dataclass(frozen=True)
class Citation:
    """A grounded span of the answer; `start`/`end` index the cleaned `text`."""

    start: int
    end: int
    text: str
    sources: list[Source]
    close_tag: str = field(default="", repr=False)  # as written, so the turn can be rendered back verbatim

    def to_dict(self) -> dict:
        return {"start": self.start, "end": self.end, "text": self.text,
                "sources": [{"tool_call_id": s.tool_call_id, "index": s.index} for s in self.sources]}


@dataclass(frozen=True)
class ParsedOutput:
    """One assistant turn. When `malformed`, `error` says what broke the format; whatever could be
    read is still filled in, and unreadable parts are kept in `text`."""

    text: str
    thinking: str | None
    tool_calls: list[dict]
    citations: list[Citation]
    finish_reason: str | None
    malformed: bool
    raw: str
    error: str | None = None


@dataclass(frozen=True, slots=True)
class ThinkingDelta:
    text: str


@dataclass(frozen=True, slots=True)
class TextDelta:
    text: str


@dataclass(frozen=True, slots=True)
class ToolCallEvent:
    tool_call: dict


@dataclass(frozen=True, slots=True)
class CitationEvent:
    citation: Citation


Event = Union[ThinkingDelta, TextDelta, ToolCallEvent, CitationEvent]


def parse_output(raw: str, *, tool_call_ids: Sequence[str] = (), documents_call_id: str | None = None,
                 has_documents: bool = False, finish_reason: str | None = "stop") -> ParsedOutput:
    """Parse one whole generation (the text after the prompt's generation header).

    `tool_call_ids` are the ids of the conversation's earlier tool calls in prompt order; citations
    name calls by their position in that list. Documents are cited under `documents_call_id`
    (`DOCUMENTS_CALL_ID` when only `has_documents` is set).
    """
    parser = StreamParser(tool_call_ids=tool_call_ids, documents_call_id=documents_call_id,
                          has_documents=has_documents, finish_reason=finish_reason)
    parser.feed(raw)
    return parser.finish()[1]


def to_assistant_message(parsed: ParsedOutput) -> dict:
    """The assistant message that renders back to the model's own turn.

    Arguments are dicts and the content keeps its `<co>` markup, because the templates print both
    as they are; the plan goes in `tool_plan`, the field the templates read.
    """
    content = _with_markup(parsed.text, parsed.citations)
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if parsed.tool_calls:
        message["content"] = content or None
        message["tool_calls"] = [_template_call(call) for call in parsed.tool_calls]
    if parsed.thinking is not None:
        message["tool_plan"] = parsed.thinking
    return message


def _template_call(call: dict) -> dict:
    fn = call["function"]
    args = fn["arguments"]
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except (ValueError, RecursionError):
            pass
    return {"id": call["id"], "type": "function", "function": {"name": fn["name"], "arguments": args}}


def _with_markup(text: str, citations: Sequence[Citation]) -> str:
    parts, pos = [], 0
    for c in sorted(citations, key=lambda c: (c.start, c.end)):
        if not c.close_tag or c.start < pos or c.end > len(text) or c.start > c.end:
            continue
        parts += [text[pos:c.start], _CITE_OPEN, text[c.start:c.end], c.close_tag]
        pos = c.end
    parts.append(text[pos:])
    return "".join(parts)


class _Sources:
    """Resolves `</co: k:[i]>` references to (tool call id, index).

    `k` counts tool calls the way the prompt numbers them in actions: from 0, or from 1 after the
    documents pseudo-call, which itself is `0` with one index per document.
    """

    def __init__(self, call_ids: Sequence[str], documents_id: str | None):
        self.call_ids = [str(i) for i in call_ids]
        self.documents_id = documents_id
        self.offset = 0 if documents_id is None else 1
        self.known = set(self.call_ids)

    def resolve(self, ref: str, index: int) -> Source | None:
        if _DIGITS.fullmatch(ref):
            n = int(ref)
            if self.documents_id is not None and n == 0:
                return Source(self.documents_id, index)
            if 0 <= n - self.offset < len(self.call_ids) and index == 0:
                return Source(self.call_ids[n - self.offset], 0)
        if ref in self.known and index == 0:
            return Source(ref, 0)
        return None


class _CallIds:
    """Keeps the model's own ids unless they clash; otherwise numbers calls as the prompt would."""

    def __init__(self, prior: Sequence[str], documents_id: str | None):
        self.used = {str(i) for i in prior}
        if documents_id is not None:
            self.used.add(documents_id)
        self.counter = len(prior) + (documents_id is not None)

    def take(self, written: Any) -> str:
        counter, self.counter = self.counter, self.counter + 1
        ok = isinstance(written, (str, int)) and not isinstance(written, bool) and str(written) != ""
        candidate, k = (str(written) if ok else str(counter)), 0
        if candidate in self.used:
            candidate = str(counter)
        while candidate in self.used:
            k += 1
            candidate = f"call_{counter}_{k}"
        self.used.add(candidate)
        return candidate


def _read_action(body: str) -> tuple[list[tuple[Any, str, str]], str | None]:
    """(written id, name, arguments JSON) for each readable call, and what was wrong, if anything."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as exc:
        return [], f"action is not valid JSON ({str(exc)[:80]})"
    problem = None
    if isinstance(data, dict):
        data, problem = [data], "action is a JSON object, not a list"
    if not isinstance(data, list):
        return [], "action is not a JSON list"
    if not data:
        return [], "action list is empty"
    calls = []
    for item in data:
        call = _read_call(item)
        if call is None:
            problem = problem or 'action item lacks a "tool_name" string or a "parameters" object'
        else:
            calls.append(call)
    return calls, problem


def _read_call(item: Any) -> tuple[Any, str, str] | None:
    if not isinstance(item, dict):
        return None
    name, params = item.get("tool_name"), item.get("parameters")
    if not isinstance(name, str) or not name or not isinstance(params, dict):
        return None
    try:
        args = json.dumps(params, ensure_ascii=False)
    except (ValueError, RecursionError):
        return None
    return item.get("tool_call_id"), name, args


def _read_sources(body: str) -> tuple[list[tuple[str, list[int]]], bool]:
    """Groups `id:[i,j]` of a closing tag's body, and whether the whole body was well formed."""
    groups: list[tuple[str, list[int]]] = []
    pos, ok = 0, True
    while True:
        m = _GROUP.match(body, pos)
        if m is None:
            return groups, False
        items = [s.strip() for s in m.group(2).split(",")]
        indices = [int(s) for s in items if _DIGITS.fullmatch(s)]
        ok = ok and len(indices) == len(items)
        groups.append((m.group(1), indices))
        pos = m.end()
        if pos == len(body):
            return groups, ok
        if body[pos] != ",":
            return groups, False
        pos += 1


def _match(buf: str, pos: int, markers: Sequence[str]) -> tuple[str | None, bool]:
    """The marker at `pos`, or whether the buffer ends in what may still become one."""
    rest = buf[pos:pos + _LONGEST]
    for marker in markers:
        if rest.startswith(marker):
            return marker, False
    return None, any(marker.startswith(rest) for marker in markers)


class StreamParser:
    """Incremental parser: `feed` pieces as they are generated, then `finish`.

    Held back are only what may still become a marker (a few characters), an action block until it
    closes, and whitespace between blocks (dropped unless the output turns out to be plain text),
    so the work is linear in the output's length. `finish` returns what `parse_output` returns for the
    concatenated pieces, however they were split.
    """

    def __init__(self, *, tool_call_ids: Sequence[str] = (), documents_call_id: str | None = None,
                 has_documents: bool = False, finish_reason: str | None = "stop"):
        if documents_call_id is None and has_documents:
            documents_call_id = DOCUMENTS_CALL_ID
        self._sources = _Sources(tool_call_ids, documents_call_id)
        self._ids = _CallIds(tool_call_ids, documents_call_id)
        self._finish_reason = finish_reason
        self._state = _TOP
        self._held = ""
        self._raw: list[str] = []
        self._text: list[str] = []
        self._text_len = 0
        self._thinking: list[str] | None = None
        self._action: list[str] = []
        self._calls: list[dict] = []
        self._citations: list[Citation] = []
        self._span: tuple[int, list[str]] | None = None
        self._tag: list[str] = []
        self._tag_len = 0
        self._ws: list[str] = []  # whitespace outside blocks, pending
        self._structured = False  # a block marker was seen: not plain-chat text
        self._bare = False  # non-space text outside blocks
        self._errors: list[str] = []
        self._events: list[Event] = []
        self._delta_kind: type | None = None
        self._delta: list[str] = []
        self._result: ParsedOutput | None = None

    # -- public ----------------------------------------------------------------------------------

    def feed(self, piece: str) -> list[Event]:
        """Parse one more piece of output; returns the events it completes."""
        if self._result is not None:
            raise RuntimeError("StreamParser.feed() called after finish()")
        if piece:
            self._raw.append(piece)
            self._held = self._scan(self._held + piece)
        return self._take_events()

    def finish(self, finish_reason: str | None = None) -> tuple[list[Event], ParsedOutput]:
        """End of output: flush what was held back and return the last events and the result."""
        if self._result is not None:
            return [], self._result
        held, self._held = self._held, ""
        if held:
            self._content(held)
        if self._state is _TAG:
            self._abort_tag("output ended inside a citation tag")
        if self._state in _CLOSERS:
            self._end_block(None)
        if self._state is _TOP:
            self._end_top()
        if self._structured and self._bare:
            self._error("text outside the response block")
        if not self._structured and not self._text_len:
            self._error("empty output")
        self._result = self._build(finish_reason if finish_reason is not None else self._finish_reason)
        return self._take_events(), self._result

    # -- scanning --------------------------------------------------------------------------------

    def _scan(self, buf: str) -> str:
        """Consume `buf`; returns the tail held back as a possible partial marker."""
        pos, n = 0, len(buf)
        while pos < n:
            if self._state is _ENDED:
                if buf[pos:].strip():
                    self._error("text after the end of the turn was ignored")
                return ""
            if self._state is _TAG:
                pos = self._scan_tag(buf, pos)
                continue
            lt = buf.find("<", pos)
            if lt < 0:
                self._content(buf[pos:])
                return ""
            if lt > pos:
                self._content(buf[pos:lt])
            marker, partial = _match(buf, lt, _RESPONSE_MARKERS if self._state is _RESPONSE else _SPECIAL)
            if partial:
                return buf[lt:]
            if marker is None:
                self._content("<")
                pos = lt + 1
            else:
                pos = lt + len(marker)
                self._marker(marker)
        return ""

    def _scan_tag(self, buf: str, pos: int) -> int:
        stop = _TAG_STOP.search(buf, pos)
        end = stop.start() if stop else len(buf)
        self._tag.append(buf[pos:end])
        self._tag_len += end - pos
        if self._tag_len > _MAX_TAG:
            self._abort_tag("citation tag too long")
        elif stop is None:
            pass
        elif buf[end] == ">":
            self._state = _RESPONSE
            self._close_citation(_CITE_CLOSE + "".join(self._tag) + ">")
            return end + 1
        else:
            self._abort_tag("unreadable citation tag")
        return end

    def _content(self, s: str) -> None:
        state = self._state
        if state is _RESPONSE:
            self._add_text(s)
        elif state is _THINKING:
            self._thinking.append(s)
            self._emit(ThinkingDelta, s)
        elif state is _ACTION:
            self._action.append(s)
        elif state is _TOP:
            self._top_text(s)

    def _marker(self, marker: str) -> None:
        if marker in _TURN_ENDS:
            self._end_turn(marker)
        elif marker in _OPENERS:
            self._end_block(marker)
            self._open(_OPENERS[marker])
        elif marker == _CLOSERS.get(self._state):
            self._end_block(marker)
        elif marker == END_RESPONSE and self._state is _TOP and not self._structured:
            self._implicit_response()
        elif marker == _CITE_OPEN:
            self._open_span()
        elif marker == _CITE_CLOSE:
            self._state, self._tag, self._tag_len = _TAG, [], 0
        elif marker == _CITE_CLOSE_BARE:
            self._close_citation(marker)
        else:
            self._error(f"stray {marker}")

    # -- blocks ----------------------------------------------------------------------------------

    def _open(self, state: str) -> None:
        self._ws, self._structured, self._state = [], True, state
        if state is _THINKING and self._thinking is None:
            self._thinking = []

    def _end_block(self, by: str | None) -> None:
        """Leave the current block; `by` is the marker that ended it (None: end of output)."""
        state = self._state
        if state is _TOP:
            self._ws = []
            return
        closer = _CLOSERS[state]
        lenient = state is _RESPONSE and (by is None or by in _TURN_ENDS)
        if by != closer and not lenient:
            self._error(f"{by or 'end of output'} before {closer}")
        if state is _RESPONSE and self._span is not None:
            self._error("<co> without a closing </co: ...> tag")
            self._span = None
        self._state = _TOP
        if state is _ACTION:
            self._finish_action()

    def _end_turn(self, marker: str) -> None:
        if self._state in _CLOSERS:
            self._end_block(marker)
        self._end_top()
        self._state = _ENDED

    def _end_top(self) -> None:
        if not self._structured:
            self._add_text("".join(self._ws))
        self._ws = []

    def _implicit_response(self) -> None:
        # The prompt's generation header already opened the response (plain-chat format).
        self._add_text("".join(self._ws))
        self._ws, self._structured, self._bare = [], True, False

    def _top_text(self, s: str) -> None:
        core_end = len(s.rstrip())
        if not core_end:
            self._ws.append(s)
            return
        self._bare = True
        self._add_text("".join(self._ws) + s[:core_end])
        self._ws = [s[core_end:]] if core_end < len(s) else []

    def _finish_action(self) -> None:
        body, self._action = "".join(self._action), []
        calls, problem = _read_action(body)
        if problem:
            self._error(problem)
        if not calls:
            self._add_text(body)
            return
        for written, name, args in calls:
            call = {"id": self._ids.take(written), "type": "function",
                    "function": {"name": name, "arguments": args}}
            self._calls.append(call)
            self._event(ToolCallEvent(call))

    # -- citations -------------------------------------------------------------------------------

    def _open_span(self) -> None:
        if self._span is not None:
            self._error("nested <co>")
        self._span = (self._text_len, [])

    def _abort_tag(self, why: str) -> None:
        self._error(why)
        self._state = _RESPONSE
        self._add_text(_CITE_CLOSE + "".join(self._tag))
        self._tag, self._tag_len = [], 0

    def _close_citation(self, tag: str) -> None:
        self._tag, self._tag_len = [], 0
        if self._span is None:
            self._error(f"citation tag {tag!r} without <co>")
            return
        (start, parts), self._span = self._span, None
        groups, ok = _read_sources(tag[len(_CITE_CLOSE):-1] if tag != _CITE_CLOSE_BARE else "")
        if not ok:
            self._error(f"unreadable citation sources {tag!r}")
        sources: list[Source] = []
        for ref, indices in groups:
            for index in indices:
                source = self._sources.resolve(ref, index)
                if source is None:
                    self._error(f"unknown citation source {ref}:[{index}]")
                elif source not in sources:
                    sources.append(source)
        citation = Citation(start, self._text_len, "".join(parts), sources, tag)
        self._citations.append(citation)
        self._event(CitationEvent(citation))

    # -- output ----------------------------------------------------------------------------------

    def _add_text(self, s: str) -> None:
        if not s:
            return
        self._text.append(s)
        self._text_len += len(s)
        if self._span is not None:
            self._span[1].append(s)
        self._emit(TextDelta, s)

    def _emit(self, kind: type, s: str) -> None:
        if kind is not self._delta_kind:
            self._flush_delta()
            self._delta_kind = kind
        self._delta.append(s)

    def _flush_delta(self) -> None:
        if self._delta:
            self._events.append(self._delta_kind("".join(self._delta)))
            self._delta = []

    def _event(self, event: Event) -> None:
        self._flush_delta()
        self._delta_kind = None
        self._events.append(event)

    def _take_events(self) -> list[Event]:
        self._flush_delta()
        self._delta_kind = None
        events, self._events = self._events, []
        return events

    def _error(self, message: str) -> None:
        if message not in self._errors and len(self._errors) < _MAX_ERRORS:
            self._errors.append(message)

    def _build(self, finish_reason: str | None) -> ParsedOutput:
        return ParsedOutput(
            text="".join(self._text),
            thinking=None if self._thinking is None else "".join(self._thinking),
            tool_calls=self._calls,
            citations=self._citations,
            finish_reason="tool_calls" if self._calls else finish_reason,
            malformed=bool(self._errors),
            raw="".join(self._raw),
            error="; ".join(self._errors) or None,
        )

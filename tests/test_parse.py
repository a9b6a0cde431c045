"""Parsing Command R7B's generations: thinking, tool calls, answer, citations, and bad output."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest

from r7b.runtime.parse import (
    DOCUMENTS_CALL_ID,
    Citation,
    CitationEvent,
    ParsedOutput,
    Source,
    StreamParser,
    TextDelta,
    ThinkingDelta,
    ToolCallEvent,
    parse_output,
    to_assistant_message,
)

EOT = "<|END_OF_TURN_TOKEN|>"


def action(*calls: tuple[str, str, dict]) -> str:
    """An action block laid out as the template writes it (one call per line)."""
    lines = [f'    {{"tool_call_id": "{i}", "tool_name": "{name}", "parameters": {json.dumps(p, ensure_ascii=False)}}}'
             for i, name, p in calls]
    return "<|START_ACTION|>[\n" + ",\n".join(lines) + "\n]<|END_ACTION|>"


TOOL_TURN = ("<|START_THINKING|>I will look up the weather in both cities in parallel.<|END_THINKING|>"
             + action(("0", "get_weather", {"city": "Paris", "unit": "celsius"}),
                      ("1", "get_weather", {"city": "Tokyo"}),
                      ("2", "web_search", {"query": "packing tips «rain»", "max_results": 2}))
             + EOT)
CITED_TURN = ("<|START_RESPONSE|>Paris is <co>12°C and rainy</co: 0:[0]>, while Tokyo is "
              "<co>clear</co: 1:[0],2:[0]>. <co>Pack an umbrella</co: 2:[0]>.<|END_RESPONSE|>" + EOT)
DOCS_TURN = ("<|START_RESPONSE|>Man has dreamed of <co>destroying the moon</co: 0:[0]> and of "
             "<co>finding love</co: 0:[1,2]>.<|END_RESPONSE|>" + EOT)
CALL_IDS = ["call_a", "call_b", "call_c"]


def stream(raw: str, pieces: list[str] | None = None, **options) -> tuple[list, ParsedOutput]:
    parser = StreamParser(**options)
    events = []
    for piece in pieces if pieces is not None else [raw]:
        events += parser.feed(piece)
    tail, parsed = parser.finish()
    return events + tail, parsed


def random_split(raw: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(raw)), min(len(raw) - 1, rng.randint(0, 12)))) if len(raw) > 1 else []
    return [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)])]


# -- well-formed output --------------------------------------------------------------------------


def test_thinking_and_parallel_tool_calls():
    parsed = parse_output(TOOL_TURN)
    assert parsed.thinking == "I will look up the weather in both cities in parallel."
    assert parsed.text == "" and parsed.citations == []
    assert parsed.finish_reason == "tool_calls" and not parsed.malformed and parsed.error is None
    assert [c["id"] for c in parsed.tool_calls] == ["0", "1", "2"]
    assert all(c["type"] == "function" for c in parsed.tool_calls)
    assert [c["function"]["name"] for c in parsed.tool_calls] == ["get_weather", "get_weather", "web_search"]
    args = [json.loads(c["function"]["arguments"]) for c in parsed.tool_calls]
    assert args == [{"city": "Paris", "unit": "celsius"}, {"city": "Tokyo"},
                    {"query": "packing tips «rain»", "max_results": 2}]
    assert parsed.raw == TOOL_TURN


def test_missing_or_clashing_ids_follow_the_prompt_numbering():
    raw = ('<|START_ACTION|>[{"tool_name": "a", "parameters": {}}, {"tool_call_id": "call_a", "tool_name": "b", '
           '"parameters": {}}, {"tool_call_id": 7, "tool_name": "c", "parameters": {}}]<|END_ACTION|>')
    parsed = parse_output(raw, tool_call_ids=["call_a", "call_b"])
    assert [c["id"] for c in parsed.tool_calls] == ["2", "3", "7"]
    assert not parsed.malformed
    with_docs = parse_output(raw.replace("call_a", "0"), has_documents=True)
    assert [c["id"] for c in with_docs.tool_calls] == ["1", "2", "7"]


def test_response_only():
    parsed = parse_output("<|START_RESPONSE|>Hello! How can I help you today?<|END_RESPONSE|>" + EOT,
                          finish_reason="stop")
    assert parsed.text == "Hello! How can I help you today?"
    assert parsed.thinking is None and parsed.tool_calls == [] and parsed.citations == []
    assert parsed.finish_reason == "stop" and not parsed.malformed


def test_response_keeps_its_whitespace_and_ignores_it_between_blocks():
    parsed = parse_output("\n<|START_RESPONSE|>  two\nlines \n<|END_RESPONSE|>\n" + EOT)
    assert parsed.text == "  two\nlines \n" and not parsed.malformed


def test_citations_with_several_sources():
    parsed = parse_output(CITED_TURN, tool_call_ids=CALL_IDS)
    assert parsed.text == "Paris is 12°C and rainy, while Tokyo is clear. Pack an umbrella."
    assert not parsed.malformed
    assert [(c.text, c.sources) for c in parsed.citations] == [
        ("12°C and rainy", [("call_a", 0)]),
        ("clear", [("call_b", 0), ("call_c", 0)]),
        ("Pack an umbrella", [("call_c", 0)]),
    ]
    for c in parsed.citations:
        assert parsed.text[c.start:c.end] == c.text
    assert parsed.citations[1].sources[0].tool_call_id == "call_b"
    assert parsed.citations[0].to_dict() == {"start": 9, "end": 23, "text": "12°C and rainy",
                                             "sources": [{"tool_call_id": "call_a", "index": 0}]}


def test_citations_to_documents():
    parsed = parse_output(DOCS_TURN, has_documents=True)
    assert parsed.text == "Man has dreamed of destroying the moon and of finding love."
    assert [c.sources for c in parsed.citations] == [[(DOCUMENTS_CALL_ID, 0)], [("0", 1), ("0", 2)]]
    named = parse_output(DOCS_TURN, documents_call_id="documents")
    assert named.citations[1].sources == [("documents", 1), ("documents", 2)]


def test_documents_and_tools_together():
    # The prompt numbers the documents pseudo-call 0, so the conversation's calls start at 1.
    raw = "<|START_RESPONSE|><co>It is 21°C in Lisbon</co: 0:[0],1:[0]>.<|END_RESPONSE|>"
    parsed = parse_output(raw, tool_call_ids=["L1"], has_documents=True)
    assert parsed.citations[0].sources == [("0", 0), ("L1", 0)] and not parsed.malformed


def test_citations_in_a_reflection_stay_in_the_thinking():
    raw = "<|START_THINKING|>It <co>rains</co: 0:[0]>.<|END_THINKING|>" + action(("1", "f", {})) + EOT
    parsed = parse_output(raw, tool_call_ids=["a"])
    assert parsed.thinking == "It <co>rains</co: 0:[0]>." and parsed.citations == []


def test_plain_chat_text_as_is():
    for raw in ["Hello there, friend.\n", "  padded  ", "<b>bold</b> 1 < 2 <co>x", "a <|not a token|> b"]:
        parsed = parse_output(raw)
        assert parsed.text == raw and not parsed.malformed and parsed.citations == []


def test_plain_chat_after_the_response_header():
    parsed = parse_output("Hi there.\n<|END_RESPONSE|>" + EOT)
    assert parsed.text == "Hi there.\n" and not parsed.malformed
    assert parse_output("Bye." + EOT).text == "Bye."


def test_finish_reason_passes_through():
    assert parse_output("<|START_RESPONSE|>cut", finish_reason="length").finish_reason == "length"
    assert parse_output(TOOL_TURN, finish_reason="length").finish_reason == "tool_calls"
    assert parse_output("x").finish_reason == "stop"


# -- malformed output ----------------------------------------------------------------------------

MALFORMED = [
    # raw, text, error fragment
    ("", "", "empty output"),
    (EOT, "", "empty output"),
    ('<|START_ACTION|>[{"tool_call_id": "0", "tool_na', '[{"tool_call_id": "0", "tool_na', "end of output"),
    ('<|START_ACTION|>[{"tool_name": "f", "parameters": {}]<|END_ACTION|>', '[{"tool_name": "f", "parameters": {}]',
     "not valid JSON"),
    ('<|START_ACTION|>"search"<|END_ACTION|>', '"search"', "not a JSON list"),
    ("<|START_ACTION|>[]<|END_ACTION|>", "[]", "empty"),
    ('<|START_ACTION|>[{"name": "f", "arguments": {}}]<|END_ACTION|>', '[{"name": "f", "arguments": {}}]', "tool_name"),
    ('<|START_ACTION|>[{"tool_name": "f", "parameters": "x"}]<|END_ACTION|>',
     '[{"tool_name": "f", "parameters": "x"}]', "parameters"),
    ("<|START_ACTION|>" + "[" * 100000 + "<|END_ACTION|>", "[" * 100000, "not valid JSON"),
    ("<|START_THINKING|>I will", "", "end of output before <|END_THINKING|>"),
    ("<|START_THINKING|>plan" + EOT, "", "before <|END_THINKING|>"),
    ("<|START_RESPONSE|>a <co>b</co: 0:[", "a b</co: 0:[", "inside a citation tag"),
    ("<|START_RESPONSE|>a <co>b</co: 9:[0]> c<|END_RESPONSE|>", "a b c", "unknown citation source 9:[0]"),
    ("<|START_RESPONSE|>a <co>b</co: 0:[3]> c<|END_RESPONSE|>", "a b c", "unknown citation source 0:[3]"),
    ("<|START_RESPONSE|>a <co>b c<|END_RESPONSE|>", "a b c", "<co> without"),
    ("<|START_RESPONSE|>a </co: 0:[0]>b<|END_RESPONSE|>", "a b", "without <co>"),
    ("<|START_RESPONSE|><co>a <co>b</co: 0:[0]><|END_RESPONSE|>", "a b", "nested"),
    ("<|START_RESPONSE|><co>a</co: 0:[x]><|END_RESPONSE|>", "a", "unreadable citation sources"),
    ("<|START_RESPONSE|><co>a</co>.<|END_RESPONSE|>", "a.", "unreadable citation sources"),
    ("<|START_RESPONSE|><co>a</co: 0:[0]. b<|END_RESPONSE|>", "a</co: 0:[0]. b", "unreadable citation tag"),
    ("<|START_RESPONSE|><co>a</co: " + "0" * 300 + ">", "a</co: " + "0" * 300 + ">", "too long"),
    ("<|END_THINKING|><|START_RESPONSE|>ok<|END_RESPONSE|>", "ok", "stray <|END_THINKING|>"),
    ("<|START_RESPONSE|>ok<|END_RESPONSE|>" + EOT + "more", "ok", "after the end of the turn"),
    ("Sure!<|START_RESPONSE|>ok<|END_RESPONSE|>", "Sure!ok", "outside the response"),
    ("<|START_RESPONSE|>ok<|START_THINKING|>hm<|END_THINKING|>", "ok", "before <|END_RESPONSE|>"),
    ("<|START_RESPONSE|>\x00\ufffd\ud800<co>\udfff</co:\x00>", "\x00\ufffd\ud800\udfff</co:\x00>", "citation tag"),
]


@pytest.mark.parametrize("raw,text,error", MALFORMED, ids=range(len(MALFORMED)))
def test_malformed_output_is_salvaged(raw, text, error):
    parsed = parse_output(raw, tool_call_ids=["a"])
    assert parsed.malformed and error in parsed.error
    assert parsed.text == text and parsed.tool_calls == [] and parsed.finish_reason == "stop"
    check_invariants(parsed, raw)


def test_unknown_sources_keep_the_span():
    parsed = parse_output("<|START_RESPONSE|><co>a</co: 0:[0],5:[0]><|END_RESPONSE|>", tool_call_ids=["x"])
    assert parsed.malformed and parsed.citations == [Citation(0, 1, "a", [Source("x", 0)], "</co: 0:[0],5:[0]>")]


def test_valid_calls_survive_invalid_neighbours():
    raw = '<|START_ACTION|>[{"tool_name": "f", "parameters": {"a": 1}}, 3, {"tool_name": ""}]<|END_ACTION|>'
    parsed = parse_output(raw)
    assert parsed.malformed and [c["function"]["name"] for c in parsed.tool_calls] == ["f"]
    assert parsed.finish_reason == "tool_calls"


def test_unclosed_action_with_complete_json_still_calls():
    parsed = parse_output('<|START_ACTION|>[{"tool_name": "f", "parameters": {}}]' + EOT)
    assert parsed.malformed and "before <|END_ACTION|>" in parsed.error
    assert [c["function"]["name"] for c in parsed.tool_calls] == ["f"]


def test_truncated_response_is_text_not_an_error():
    parsed = parse_output("<|START_RESPONSE|>The answer is", finish_reason="length")
    assert parsed.text == "The answer is" and not parsed.malformed and parsed.finish_reason == "length"


# -- streaming -----------------------------------------------------------------------------------


def test_stream_events_in_order():
    events, parsed = stream(TOOL_TURN, list(TOOL_TURN))
    kinds = [type(e) for e in events]
    assert ThinkingDelta in kinds and kinds.index(ThinkingDelta) < kinds.index(ToolCallEvent)
    assert "".join(e.text for e in events if isinstance(e, ThinkingDelta)) == parsed.thinking
    assert [e.tool_call for e in events if isinstance(e, ToolCallEvent)] == parsed.tool_calls
    assert not any(isinstance(e, TextDelta) for e in events)


def test_stream_special_tokens_split_anywhere():
    pieces = ["<|START_RESP", "ONSE|>Paris is <", "co>rai", "ny</c", "o: 0", ":[0]", "> to", "day<|END_", "RESPONSE|><",
              "|END_OF_TURN_TOKEN|>"]
    events, parsed = stream("".join(pieces), pieces, tool_call_ids=["w"])
    deltas = [e.text for e in events if isinstance(e, TextDelta)]
    assert "".join(deltas) == parsed.text == "Paris is rainy today"
    assert not any("<" in d for d in deltas)
    assert [e.citation for e in events if isinstance(e, CitationEvent)] == parsed.citations
    assert parsed.citations[0].sources == [("w", 0)] and not parsed.malformed


def test_stream_emits_text_before_the_end():
    parser = StreamParser()
    assert parser.feed("<|START_RESPONSE|>Hel") == [TextDelta("Hel")]
    assert parser.feed("lo <") == [TextDelta("lo ")]
    assert parser.feed("b>") == [TextDelta("<b>")]
    assert parser.feed(" <|END") == [TextDelta(" ")]
    assert parser.feed("_RESPONSE|>") == []
    assert parser.finish()[1].text == "Hello <b> "


def test_stream_is_linear():
    raw = "<|START_RESPONSE|>" + "a < b <co>c</co: 0:[0]> " * 4000 + "<|END_RESPONSE|>"
    parser = StreamParser(tool_call_ids=["x"])
    start = time.perf_counter()
    for ch in raw:
        parser.feed(ch)
    parsed = parser.finish()[1]
    assert time.perf_counter() - start < 10
    assert len(parsed.citations) == 4000 and not parsed.malformed


# -- back into the conversation -----------------------------------------------------------------


def test_assistant_message_for_tool_calls():
    msg = to_assistant_message(parse_output(TOOL_TURN))
    assert msg["role"] == "assistant" and msg["content"] is None
    assert msg["tool_plan"] == "I will look up the weather in both cities in parallel."
    first = {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}
    assert msg["tool_calls"][0] == {"id": "0", "type": "function", "function": first}


def test_assistant_message_keeps_citation_markup():
    msg = to_assistant_message(parse_output(CITED_TURN, tool_call_ids=CALL_IDS))
    assert msg == {"role": "assistant", "content": CITED_TURN[len("<|START_RESPONSE|>"):-len("<|END_RESPONSE|>" + EOT)]}


GOLDEN = Path(__file__).parent / "data" / "chat_golden.jsonl"
CHATBOT = "<|CHATBOT_TOKEN|>"


def golden_turns():
    """(rendered turn, the assistant message it came from, earlier call ids, documents?) from agentic cases."""
    for line in GOLDEN.read_text(encoding="utf-8").splitlines():
        case = json.loads(line)
        inputs, expected = case["inputs"], case["expected"]
        if expected is None or (case["template"] == "default" and not inputs.get("documents")):
            continue
        turns = [t[len(CHATBOT):] for t in expected.split("<|START_OF_TURN_TOKEN|>") if t.startswith(CHATBOT)]
        turns = turns[1:] if inputs.get("documents") else turns
        ids: list[str] = []
        for msg in (m for m in inputs["messages"] if str(m.get("role")).lower() in ("assistant", "chatbot")):
            yield case["id"], turns.pop(0), msg, list(ids), bool(inputs.get("documents"))
            ids += [c["id"] for c in msg.get("tool_calls") or []]


@pytest.mark.parametrize("turn,original,ids,docs", [pytest.param(*t[1:], id=f"{t[0]}-{i}")
                                                     for i, t in enumerate(golden_turns())])
def test_golden_assistant_turns_parse_back_to_their_messages(turn, original, ids, docs):
    # The template reads only these fields, so equal fields render to the same turn.
    parsed = parse_output(turn, tool_call_ids=ids, has_documents=docs)
    assert not parsed.malformed, parsed.error
    msg = to_assistant_message(parsed)
    if original.get("tool_calls"):
        assert msg["tool_plan"] == original.get("tool_plan", "")
        assert [c["function"] for c in msg["tool_calls"]] == [c["function"] for c in original["tool_calls"]]
    else:
        assert msg["content"] == original["content"] and "tool_calls" not in msg


TOOLS = [{"type": "function", "function": {
    "name": name, "description": "d", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
    for name in ("get_weather", "web_search")]


def test_round_trip_through_the_template():
    prompt = pytest.importorskip("r7b.runtime.prompt")
    history = [{"role": "user", "content": "Weather in Paris and Tokyo? Then packing tips."}]
    first = parse_output(TOOL_TURN)
    history.append(to_assistant_message(first))
    rendered = prompt.render_prompt(history, TOOLS, enable_citations=True)
    assert "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>" + TOOL_TURN + "<|START_OF_TURN_TOKEN|>" in rendered

    history += [{"role": "tool", "tool_call_id": c["id"], "content": {"temp": 12}} for c in first.tool_calls]
    ids = [c["id"] for m in history for c in m.get("tool_calls", [])]
    answer = parse_output(CITED_TURN, tool_call_ids=ids)
    assert [c.sources for c in answer.citations][1] == [("1", 0), ("2", 0)] and not answer.malformed
    rendered = prompt.render_prompt(history + [to_assistant_message(answer)], TOOLS, enable_citations=True)
    assert "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>" + CITED_TURN in rendered


# -- fuzz ----------------------------------------------------------------------------------------

VALID = [
    (TOOL_TURN, {}),
    (CITED_TURN, {"tool_call_ids": CALL_IDS}),
    (DOCS_TURN, {"has_documents": True}),
    ("<|START_THINKING|>Reflect <co>on</co: 1:[0]> it.<|END_THINKING|>" + action(("2", "f", {"q": "<|x|> </co"}))
     + EOT, {"tool_call_ids": ["p", "q"]}),
    ("Plain chat, <b>tags</b> and 1 < 2.\n<|END_RESPONSE|>" + EOT, {}),
    ("<|START_RESPONSE|><co>a</co: 0:[0]><co>b</co: 0:[0]>c<|END_RESPONSE|>", {"tool_call_ids": ["z"]}),
]
GARBAGE = ["<", ">", "<|", "|>", "<co>", "</co:", "</co>", "</co: 0:[0]>", "[", "]", "{", "}", '"', ",", ":",
           "\x00", "\ud800", "\ufffd", "é", " ", "\n", "<|START_ACTION|>", "<|END_ACTION|>", "<|START_RESPONSE|>",
           "<|END_RESPONSE|>", "<|START_THINKING|>", "<|END_THINKING|>", EOT, "<|START_OF_TURN_TOKEN|>", "<|END_",
           "</co: " + "1:[0]," * 50 + ">"]


def check_invariants(parsed: ParsedOutput, raw: str) -> None:
    assert parsed.raw == raw
    assert parsed.malformed == (parsed.error is not None)
    assert (parsed.finish_reason == "tool_calls") == bool(parsed.tool_calls)
    end = 0
    for c in parsed.citations:
        assert end <= c.start <= c.end <= len(parsed.text)
        assert parsed.text[c.start:c.end] == c.text
        assert all(isinstance(s, tuple) and isinstance(s.tool_call_id, str) and isinstance(s.index, int)
                   for s in c.sources)
        end = c.end
    ids = [c["id"] for c in parsed.tool_calls]
    assert len(set(ids)) == len(ids) and all(isinstance(i, str) and i for i in ids)
    for call in parsed.tool_calls:
        assert call["type"] == "function" and isinstance(json.loads(call["function"]["arguments"]), dict)
    msg = to_assistant_message(parsed)
    assert msg["role"] == "assistant"


def check_stream(raw: str, options: dict, rng: random.Random) -> ParsedOutput:
    parsed = parse_output(raw, **options)
    check_invariants(parsed, raw)
    events, streamed = stream(raw, random_split(raw, rng), **options)
    assert streamed == parsed
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == parsed.text
    assert "".join(e.text for e in events if isinstance(e, ThinkingDelta)) == (parsed.thinking or "")
    assert [e.tool_call for e in events if isinstance(e, ToolCallEvent)] == parsed.tool_calls
    assert [e.citation for e in events if isinstance(e, CitationEvent)] == parsed.citations
    return parsed


@pytest.mark.parametrize("case", range(len(VALID)))
def test_fuzz_every_truncation(case):
    raw, options = VALID[case]
    rng = random.Random(case)
    full = check_stream(raw, options, rng)
    assert not full.malformed
    for cut in range(len(raw)):
        check_stream(raw[:cut], options, rng)


def test_fuzz_garbage():
    rng = random.Random(1234)
    for _ in range(2000):
        raw, options = rng.choice(VALID)
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(raw) + 1)
            junk = rng.choice(GARBAGE) if rng.random() < 0.8 else "".join(
                chr(rng.randrange(0x110000)) for _ in range(rng.randint(1, 5)))
            raw = raw[:at] + junk + raw[at:]
        check_stream(raw, options, rng)


def test_fuzz_clean_answers_parse_back_from_their_message():
    rng = random.Random(7)
    for raw, options in VALID:
        parsed = check_stream(raw, options, rng)
        if parsed.tool_calls or parsed.malformed:
            continue
        again = parse_output("<|START_RESPONSE|>" + to_assistant_message(parsed)["content"], **options)
        assert (again.text, again.citations) == (parsed.text, parsed.citations)

"""Cohere's Chat API v2 (`POST /v2/chat`): the mapping from tables, then the real cohere 7.x SDK against
a real `r7b serve` with the stand-in model.

The stand-in writes the turn structure but not sensible content, so the SDK tests check shapes,
ids, offsets and protocol behaviour; what citations must look like is checked on constructed
model output in the unit tests.
"""

from __future__ import annotations

import json
import re
import subprocess

import pytest
import requests

from r7b.runtime.cohere_api import DEFAULT_P, EventWriter, to_request
from r7b.runtime.cohere_schema import CohereChatRequest
from r7b.runtime.model import ChatResult, Done, Usage
from r7b.runtime.parse import StreamParser, TextDelta
from r7b.runtime.request import RequestError

from test_server import KEY, WEATHER, launch
from test_server import model_path  # noqa: F401  (fixture)

HELLO = [{"role": "user", "content": "Hello"}]
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # cohere 7.3.1 reads pydantic's __fields__


def _map(**body):
    return to_request(CohereChatRequest.model_validate({"model": "command-r7b", "messages": HELLO, **body}), None)


# -- request mapping -------------------------------------------------------------------------------

REQUESTS = [  # (request fields, expected ChatRequest attributes)
    ({}, {"tool_choice": "auto", "citations": None, "response_format": None, "stop": [], "max_tokens": None,
          "sampling": {"top_p": DEFAULT_P}, "safety": None, "documents": None, "tools": None}),
    ({"temperature": 0, "p": 0.5, "k": 40, "seed": 7, "frequency_penalty": 0.2, "presence_penalty": 0.1},
     {"sampling": {"temperature": 0, "top_p": 0.5, "top_k": 40, "seed": 7, "frequency_penalty": 0.2,
                   "presence_penalty": 0.1}}),
    ({"stop_sequences": ["\n", "END"], "max_tokens": 12}, {"stop": ["\n", "END"], "max_tokens": 12}),
    ({"tools": [WEATHER], "tool_choice": "REQUIRED"}, {"tool_choice": "required", "citations": True}),
    ({"tools": [WEATHER], "tool_choice": "NONE"}, {"tool_choice": "none"}),
    ({"tools": [WEATHER], "strict_tools": True}, {"tool_choice": "auto", "constrain_tools": True}),
    ({"response_format": {"type": "text"}}, {"response_format": None}),
    ({"response_format": {"type": "json_object"}}, {"response_format": {"schema": None}}),
    ({"response_format": {"type": "json_object", "json_schema": {"type": "object"}}},
     {"response_format": {"schema": {"type": "object"}}}),
    ({"response_format": {"type": "json_object", "schema": {"type": "array"}}},  # langchain-cohere's key
     {"response_format": {"schema": {"type": "array"}}}),
    ({"documents": ["text"], "citation_options": {"mode": "OFF"}}, {"citations": False}),
    ({"documents": ["text"], "citation_options": {"mode": "DISABLED"}}, {"citations": False}),
    ({"documents": ["text"], "citation_options": {"mode": "FAST"}}, {"citations": True}),
    ({"documents": ["text"]}, {"citations": True, "documents": [{"text": "text"}]}),
    ({"safety_mode": "STRICT"}, {"safety": "strict"}),
    ({"safety_mode": "OFF", "thinking": {"type": "enabled"}, "logprobs": True, "priority": 1}, {"safety": None}),
    # null is absent; unknown keys are ignored
    ({"tools": None, "documents": None, "stop_sequences": None, "temperature": None, "extra": {"x": 1}},
     {"tools": None, "documents": None, "stop": [], "sampling": {"top_p": DEFAULT_P}}),
]


@pytest.mark.parametrize("fields,expected", REQUESTS, ids=[json.dumps(f)[:60] for f, _ in REQUESTS])
def test_request_mapping(fields, expected):
    chat, _ = _map(**fields)
    for name, value in expected.items():
        assert getattr(chat, name) == value, name


def test_server_max_tokens_caps_the_request():
    body = CohereChatRequest.model_validate({"messages": HELLO, "max_tokens": 500})
    assert to_request(body, 16)[0].max_tokens == 16
    assert to_request(CohereChatRequest.model_validate({"messages": HELLO}), 16)[0].max_tokens == 16
    assert to_request(CohereChatRequest.model_validate({"messages": HELLO, "max_tokens": 4}), 16)[0].max_tokens == 4


MESSAGES = [  # (v2 message, as the templates take it)
    ({"role": "system", "content": "Be brief."}, {"role": "system", "content": "Be brief."}),
    ({"role": "system", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
     {"role": "system", "content": "a\nb"}),
    ({"role": "user", "content": [{"type": "text", "text": "Hi"}]}, {"role": "user", "content": "Hi"}),
    ({"role": "assistant", "content": [{"type": "thinking", "thinking": "hm"}, {"type": "text", "text": "Yes."}],
      "citations": [{"start": 0, "end": 1}]}, {"role": "assistant", "content": "Yes."}),
    ({"role": "assistant", "tool_plan": "I will look.", "tool_calls": [
        {"id": "get_weather_0123456789ab", "type": "function",
         "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
     {"role": "assistant", "content": "", "tool_plan": "I will look.", "tool_calls": [
         {"id": "get_weather_0123456789ab", "type": "function",
          "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]}),
    ({"role": "tool", "tool_call_id": "c1", "content": "{\"temp\": 21}"},
     {"role": "tool", "tool_call_id": "c1", "content": {"temp": 21}}),
    ({"role": "tool", "tool_call_id": "c1", "content": "sunny"}, {"role": "tool", "tool_call_id": "c1",
                                                                  "content": "sunny"}),
    ({"role": "tool", "tool_call_id": "c1", "content": [{"type": "document", "document": {"data": {"temp": 21}}}]},
     {"role": "tool", "tool_call_id": "c1", "content": {"temp": 21}}),
    ({"role": "tool", "tool_call_id": "c1", "content": [
        {"type": "document", "document": {"id": "w", "data": "{\"temp\": 21}"}}, {"type": "text", "text": "ok"}]},
     {"role": "tool", "tool_call_id": "c1", "content": [{"temp": 21}, "ok"]}),
]


@pytest.mark.parametrize("message,expected", MESSAGES, ids=[f"{m['role']}-{i}" for i, (m, _) in enumerate(MESSAGES)])
def test_message_mapping(message, expected):
    chat, _ = _map(messages=[*HELLO, message])
    assert chat.messages[-1] == expected


def test_documents_and_tool_outputs_become_sources():
    documents = ["plain text", {"id": "emma", "data": {"title": "Emma", "text": "Handsome, clever, rich."}},
                 {"data": "{\"title\": \"JSON text\"}"}, {"data": "not JSON"}]
    tool = {"role": "tool", "tool_call_id": "search_1", "content": [
        {"type": "document", "document": {"id": "r1", "data": {"a": 1}}},
        {"type": "document", "document": {"data": {"b": 2}}}, {"type": "text", "text": "[1, 2]"}]}
    call = {"role": "assistant", "tool_plan": "p", "tool_calls": [{"id": "search_1", "type": "function",
                                                                   "function": {"name": "search", "arguments": "{}"}}]}
    chat, reply = _map(messages=[*HELLO, call, tool], documents=documents)
    assert chat.documents == [{"text": "plain text"}, {"title": "Emma", "text": "Handsome, clever, rich."},
                              {"title": "JSON text"}, {"text": "not JSON"}]
    assert [s["id"] for s in reply.sources.documents] == ["doc:0", "emma", "doc:2", "doc:3"]
    assert reply.sources.documents[1] == {"type": "document", "id": "emma", "document": {
        "id": "emma", "title": "Emma", "text": "Handsome, clever, rich."}}
    assert reply.sources.tools["search_1"] == [
        {"type": "tool", "id": "r1", "tool_output": {"a": 1}},
        {"type": "tool", "id": "search_1:1", "tool_output": {"b": 2}},
        {"type": "tool", "id": "search_1:2", "tool_output": {"result": [1, 2]}}]
    assert chat.messages[-1]["content"] == [{"a": 1}, {"b": 2}, [1, 2]]


@pytest.mark.parametrize("body,param", [
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]},
     "messages"),
])
def test_refused_requests(body, param):
    with pytest.raises(RequestError) as info:
        to_request(CohereChatRequest.model_validate(body))
    assert info.value.param == param


@pytest.mark.parametrize("body", [
    {"messages": []}, {}, {"messages": [{"role": "chatbot", "content": "x"}]}, {"messages": HELLO, "k": 501},
    {"messages": HELLO, "tool_choice": "required"}, {"messages": HELLO, "temperature": "0.3"},
    {"messages": HELLO, "stop_sequences": ["a"] * 6}, {"messages": HELLO, "documents": [{"id": "x"}]},
    {"messages": [{"role": "tool", "content": "x"}]},
])
def test_invalid_bodies(body):
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        CohereChatRequest.model_validate(body)


# -- response mapping ------------------------------------------------------------------------------


def _result(raw: str, *, finish: str = "stop", documents: bool = False, call_ids=(), prefix="") -> ChatResult:
    """What the model returns for `raw` output (parsed by the real parser), with token counts 10/5."""
    parser = StreamParser(tool_call_ids=call_ids, has_documents=documents)
    parser.feed(prefix + raw)
    parsed = parser.finish(finish)[1]
    return ChatResult(text=parsed.text, thinking=parsed.thinking, tool_calls=parsed.tool_calls,
                      citations=parsed.citations, finish_reason=parsed.finish_reason, usage=Usage(10, 5, 3),
                      raw=prefix + raw, parsed=parsed)


ANSWER = "<|START_RESPONSE|>Hello there.<|END_RESPONSE|><|END_OF_TURN_TOKEN|>"
ACTION = ('<|START_THINKING|>I will look it up.<|END_THINKING|><|START_ACTION|>[{"tool_call_id": "0", '
          '"tool_name": "get_weather", "parameters": {"city": "Paris"}}, {"tool_call_id": "1", "tool_name": '
          '"get_weather", "parameters": {"city": "London"}}]<|END_ACTION|><|END_OF_TURN_TOKEN|>')
FINISH = [  # (raw model output, finish, stop sequences asked, finish_reason)
    (ANSWER, "stop", False, "COMPLETE"),
    (ANSWER, "stop", True, "COMPLETE"),
    ("<|START_RESPONSE|>Hello th", "stop", True, "STOP_SEQUENCE"),
    ("<|START_RESPONSE|>Hello th", "length", False, "MAX_TOKENS"),
    (ACTION, "stop", False, "TOOL_CALL"),
]


@pytest.mark.parametrize("raw,finish,stops,expected", FINISH)
def test_finish_reason(raw, finish, stops, expected):
    _, reply = _map(stop_sequences=["x"] if stops else None)
    assert reply.response(_result(raw, finish=finish))["finish_reason"] == expected


def test_answer_response():
    _, reply = _map()
    body = reply.response(_result(ANSWER))
    assert body == {"id": reply.id, "finish_reason": "COMPLETE",
                    "message": {"role": "assistant", "content": [{"type": "text", "text": "Hello there."}]},
                    "usage": {"billed_units": {"input_tokens": 10, "output_tokens": 5},
                              "tokens": {"input_tokens": 10, "output_tokens": 5}, "cached_tokens": 3}}


def test_tool_call_response_issues_unique_ids():
    _, reply = _map(tools=[WEATHER])
    message = reply.response(_result(ACTION))["message"]
    assert "content" not in message and message["tool_plan"] == "I will look it up."
    calls = message["tool_calls"]
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"city": "Paris"}, {"city": "London"}]
    assert all(re.fullmatch(r"get_weather_[0-9a-f]{12}", c["id"]) for c in calls)
    _, other = _map(tools=[WEATHER])
    ids = {c["id"] for c in calls} | {c["id"] for c in other.response(_result(ACTION))["message"]["tool_calls"]}
    assert len(ids) == 4


CITED = ("<|START_RESPONSE|>Émma 🙂 is <co>handsome</co: 0:[1]> and <co>lives at Hartfield</co: 0:[0,1],1:[0]>."
         "<|END_RESPONSE|><|END_OF_TURN_TOKEN|>")


def _grounded_reply():
    call = {"role": "assistant", "tool_plan": "p", "tool_calls": [{"id": "lookup_1", "type": "function",
                                                                   "function": {"name": "lookup", "arguments": "{}"}}]}
    tool = {"role": "tool", "tool_call_id": "lookup_1", "content": [{"type": "document", "document": {
        "id": "house", "data": {"name": "Hartfield"}}}]}
    chat, reply = _map(messages=[*HELLO, call, tool],
                       documents=["Emma lives at Hartfield.", {"id": "looks", "data": {"text": "Emma is handsome."}}])
    return chat, reply


def test_citations_have_code_point_offsets_and_named_sources():
    chat, reply = _grounded_reply()
    assert chat.wants_citations
    from r7b.runtime.request import tool_call_ids

    body = reply.response(_result(CITED, documents=True, call_ids=tool_call_ids(chat.messages)))
    text = body["message"]["content"][0]["text"]
    assert text == "Émma 🙂 is handsome and lives at Hartfield."
    citations = body["message"]["citations"]
    assert [(c["start"], c["end"]) for c in citations] == [(10, 18), (23, 41)]
    for c in citations:
        assert c["text"] == text[c["start"]:c["end"]] and c["type"] == "TEXT_CONTENT"
    assert [s["id"] for s in citations[0]["sources"]] == ["looks"]
    assert citations[0]["sources"][0]["document"] == {"id": "looks", "text": "Emma is handsome."}
    assert [s["id"] for s in citations[1]["sources"]] == ["doc:0", "looks", "house"]
    assert citations[1]["sources"][2] == {"type": "tool", "id": "house", "tool_output": {"name": "Hartfield"}}


def test_citations_off_and_unresolvable_sources():
    _, reply = _map(documents=["Emma."], citation_options={"mode": "OFF"})
    assert "citations" not in reply.response(_result(ANSWER, documents=True))["message"]
    _, reply = _map(documents=["Emma."])
    out = reply.response(_result("<|START_RESPONSE|><co>Emma</co: 0:[5]>.<|END_RESPONSE|>", documents=True))
    assert out["message"]["citations"] == []  # index 5 names no document: dropped, never a source-less citation


# -- streaming -------------------------------------------------------------------------------------

GRAMMAR = re.compile(r"message-start (tool-plan-delta )*((tool-call-start tool-call-delta tool-call-end )+|"
                     r"content-start (content-delta )*(citation-start citation-end )*content-end )message-end")


def _stream(reply, raw: str, *, documents=False, call_ids=(), pieces: int = 3, finish: str = "stop") -> list[str]:
    """Stream `raw` through the real parser in `pieces`-character pieces, as the model does."""
    parser = StreamParser(tool_call_ids=call_ids, has_documents=documents)
    writer = EventWriter(reply)
    lines = [writer.start()]
    for i in range(0, len(raw), pieces):
        for event in parser.feed(raw[i:i + pieces]):
            lines += writer.event(event)
    tail, parsed = parser.finish(finish)
    for event in tail:
        lines += writer.event(event)
    result = ChatResult(text=parsed.text, thinking=parsed.thinking, tool_calls=parsed.tool_calls,
                        citations=parsed.citations, finish_reason=parsed.finish_reason, usage=Usage(10, 5), raw=raw,
                        parsed=parsed)
    return lines + writer.event(Done(result))


def _events(lines: list[str]) -> list[dict]:
    for line in lines:
        assert line.startswith("data: ") and line.endswith("\n\n") and line.count("\n") == 2 and line.isascii()
    return [json.loads(line[len("data: "):]) for line in lines]


def test_stream_of_an_answer_with_citations():
    chat, reply = _grounded_reply()
    from r7b.runtime.request import tool_call_ids

    ids = tool_call_ids(chat.messages)
    events = _events(_stream(reply, CITED, documents=True, call_ids=ids))
    types = " ".join(e["type"] for e in events)
    assert GRAMMAR.fullmatch(types) and "citation-start" in types, types
    text = "".join(e["delta"]["message"]["content"]["text"] for e in events if e["type"] == "content-delta")
    whole = reply.response(_result(CITED, documents=True, call_ids=ids))
    assert text == whole["message"]["content"][0]["text"]
    cited = [e["delta"]["message"]["citations"] for e in events if e["type"] == "citation-start"]
    assert cited == whole["message"]["citations"] and all(isinstance(c, dict) for c in cited)
    assert events[0]["id"] == reply.id and events[-1]["delta"]["finish_reason"] == "COMPLETE"
    assert events[-1]["delta"]["usage"]["billed_units"] == {"input_tokens": 10, "output_tokens": 5}


def test_stream_of_tool_calls():
    _, reply = _map(tools=[WEATHER])
    events = _events(_stream(reply, ACTION))
    types = " ".join(e["type"] for e in events)
    assert GRAMMAR.fullmatch(types), types
    plan = "".join(e["delta"]["message"]["tool_plan"] for e in events if e["type"] == "tool-plan-delta")
    assert plan == "I will look it up."
    starts = [e for e in events if e["type"] == "tool-call-start"]
    assert [e["index"] for e in starts] == [0, 1]
    for e in starts:
        call = e["delta"]["message"]["tool_calls"]
        assert isinstance(call, dict) and call["function"]["arguments"] == "" and call["id"].startswith("get_weather_")
    args = [e["delta"]["message"]["tool_calls"]["function"]["arguments"] for e in events
            if e["type"] == "tool-call-delta"]
    assert [json.loads(a) for a in args] == [{"city": "Paris"}, {"city": "London"}]
    assert events[-1]["delta"]["finish_reason"] == "TOOL_CALL"


def test_stream_error_ends_in_message_end():
    _, reply = _map()
    writer = EventWriter(reply)
    lines = [writer.start(), *writer.event(TextDelta("Hi "))]
    events = _events(lines + writer.error("the grammar ran out"))
    assert [e["type"] for e in events] == ["message-start", "content-start", "content-delta", "content-end",
                                           "message-end"]
    assert events[-1]["delta"]["finish_reason"] == "ERROR" and events[-1]["delta"]["error"] == "the grammar ran out"


def test_stream_is_ascii_json():
    _, reply = _map()
    lines = _stream(reply, "<|START_RESPONSE|>Ünïcödé 日本語 🙂<|END_RESPONSE|>", pieces=1)
    assert all(line.isascii() for line in lines)
    text = "".join(e["delta"]["message"]["content"]["text"] for e in _events(lines) if e["type"] == "content-delta")
    assert text == "Ünïcödé 日本語 🙂"


# -- the cohere 7.x SDK against a real server ------------------------------------------------------

cohere = pytest.importorskip("cohere")


@pytest.fixture(scope="module")
def server(model_path, tmp_path_factory):
    with launch(model_path, tmp_path_factory.mktemp("cohere"), "--max-body-bytes", str(64 * 1024)) as running:
        yield running


@pytest.fixture(scope="module")
def co(server):
    return cohere.ClientV2(api_key=KEY, base_url=server.url, timeout=60, max_retries=0)


def test_chat_and_stream_agree(co):
    request = dict(model="command-r7b", messages=[{"role": "user", "content": "Tell me a story."}], temperature=0,
                   seed=7, max_tokens=32)
    full = co.chat(**request)
    assert full.id and full.finish_reason in ("COMPLETE", "MAX_TOKENS") and full.message.role == "assistant"
    assert full.usage.tokens.output_tokens == full.usage.billed_units.output_tokens <= 32
    events = list(co.chat_stream(**request))
    assert events[0].type == "message-start" and events[-1].type == "message-end"
    text = "".join(e.delta.message.content.text for e in events if e.type == "content-delta")
    assert text == full.message.content[0].text
    assert events[-1].delta.finish_reason == full.finish_reason
    assert events[-1].delta.usage.billed_units.output_tokens == full.usage.billed_units.output_tokens


def test_documents_and_citations(co):
    """Greedy, the stand-in repeats itself uncited; at temperature 0.8 with seed 3 it writes one cited span
    (a property of this stand-in: the offsets and sources are what is checked)."""
    documents = [{"id": "emma", "data": {"title": "Emma", "text": "Emma Woodhouse, handsome, clever, and rich."}},
                 "Mr. Knightley lives at Donwell Abbey.",
                 {"data": json.dumps({"title": "Harriet", "text": "Harriet Smith is a friend."})}]  # JSON text
    asked = dict(model="command-r7b", messages=[{"role": "user", "content": "Who is Emma?"}], documents=documents,
                 max_tokens=120)
    greedy = co.chat(**asked, temperature=0)
    assert isinstance(greedy.message.citations, list)  # grounded: a list even when nothing is cited
    response = co.chat(**asked, temperature=0.8, seed=3)
    text = response.message.content[0].text
    assert response.message.citations, text
    for citation in response.message.citations:
        assert citation.text == text[citation.start:citation.end] and citation.type == "TEXT_CONTENT"
        assert citation.sources and all(s.id in ("emma", "doc:1", "doc:2") for s in citation.sources)
        assert all(s.type == "document" and s.document["id"] == s.id for s in citation.sources)
    events = list(co.chat_stream(**asked, temperature=0.8, seed=3))
    assert "".join(e.delta.message.content.text for e in events if e.type == "content-delta") == text
    streamed = [e.delta.message.citations for e in events if e.type == "citation-start"]
    assert [(c.start, c.end, c.text, [s.id for s in c.sources]) for c in streamed] == [
        (c.start, c.end, c.text, [s.id for s in c.sources]) for c in response.message.citations]
    off = co.chat(**{**asked, "max_tokens": 4}, citation_options={"mode": "OFF"}, temperature=0)
    assert off.message.citations is None


def test_tool_round_trip(co):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = co.chat(model="command-r7b", messages=messages, tools=[WEATHER], tool_choice="REQUIRED", temperature=0,
                    max_tokens=256)
    assert first.finish_reason == "TOOL_CALL" and first.message.content is None
    call = first.message.tool_calls[0]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments)["city"] in ("Paris", "London")
    assert re.fullmatch(r"get_weather_[0-9a-f]{12}", call.id)
    messages += [first.message, {"role": "tool", "tool_call_id": call.id, "content": [
        {"type": "document", "document": {"id": "w1", "data": {"temperature_c": 21}}}]}]
    final = co.chat(model="command-r7b", messages=messages, tools=[WEATHER], tool_choice="NONE", temperature=0,
                    max_tokens=48)
    assert final.finish_reason in ("COMPLETE", "MAX_TOKENS") and not final.message.tool_calls
    text = final.message.content[0].text
    assert isinstance(final.message.citations, list)  # a tool result was given: grounded
    for citation in final.message.citations:
        assert citation.text == text[citation.start:citation.end]
        assert [s.id for s in citation.sources] == ["w1"]


def test_streamed_tool_call(co):
    events = list(co.chat_stream(model="command-r7b", messages=[{"role": "user", "content": "Weather in London?"}],
                                 tools=[WEATHER], tool_choice="REQUIRED", temperature=0, max_tokens=256))
    starts = [e for e in events if e.type == "tool-call-start"]
    assert starts and all(e.delta.message.tool_calls.id.startswith("get_weather_") for e in starts)
    args = "".join(e.delta.message.tool_calls.function.arguments for e in events if e.type == "tool-call-delta")
    assert json.loads(args)["city"] in ("Paris", "London")
    assert events[-1].delta.finish_reason == "TOOL_CALL"


def test_stop_sequences_and_max_tokens(co):
    asked = dict(model="command-r7b", messages=[{"role": "user", "content": "Tell me a story."}], temperature=0)
    text = co.chat(**asked, max_tokens=24).message.content[0].text
    word = next(w for w in text.split() if len(w) > 2 and text.index(w) > 0)
    stopped = co.chat(**asked, max_tokens=24, stop_sequences=[word])
    assert stopped.finish_reason == "STOP_SEQUENCE"
    assert stopped.message.content[0].text == text[:text.index(word)]
    assert co.chat(**asked, max_tokens=3).finish_reason == "MAX_TOKENS"


def test_json_response_format(co):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}}, "required": ["name"]}
    response = co.chat(model="command-r7b", messages=[{"role": "user", "content": "Name a heroine as JSON."}],
                       response_format={"type": "json_object", "json_schema": schema}, temperature=0, max_tokens=64)
    assert isinstance(json.loads(response.message.content[0].text)["name"], str)


def test_sdk_errors(co, server):
    with pytest.raises(cohere.errors.BadRequestError) as info:
        co.chat(model="command-r7b", messages=[])
    assert set(info.value.body) == {"id", "message"} and "messages" in info.value.body["message"]
    with pytest.raises(cohere.errors.BadRequestError):
        co.chat(model="command-r7b", messages=[{"role": "user", "content": "hi"}], tool_choice="REQUIRED")
    with pytest.raises(cohere.errors.BadRequestError):
        co.chat(model="command-r7b", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}])
    with pytest.raises(cohere.errors.BadRequestError) as info:  # the prompt does not fit: 400, never retried
        co.chat(model="command-r7b", messages=[{"role": "user", "content": "the quick brown fox " * 2000}])
    with pytest.raises(cohere.errors.BadRequestError):  # streaming: raised before any event
        list(co.chat_stream(model="command-r7b", messages=[]))
    wrong = cohere.ClientV2(api_key="wrong-key", base_url=server.url, timeout=60, max_retries=0)
    with pytest.raises(cohere.errors.UnauthorizedError) as info:
        wrong.chat(model="command-r7b", messages=HELLO)
    assert set(info.value.body) == {"id", "message"}
    none = cohere.ClientV2(api_key="", base_url=server.url, timeout=60, max_retries=0)  # 7.x: no header at all
    with pytest.raises(cohere.errors.UnauthorizedError):
        none.chat(model="command-r7b", messages=HELLO)


def test_wire_format(server):
    """Raw HTTP: SSE framing and headers, Cohere's error shape on every /v2 error, even before routing."""
    auth = {"Authorization": f"Bearer {KEY}"}
    response = requests.post(server.url + "/v2/chat", headers=auth, timeout=60, stream=True,
                             json={"model": "m", "messages": HELLO, "stream": True, "max_tokens": 8})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache"
    body = response.raw.read()
    assert body.isascii() and body.endswith(b"data: [DONE]\n\n")
    blocks = body.decode().split("\n\n")[:-1]
    assert all(b.startswith("data: ") and "\n" not in b for b in blocks)
    assert json.loads(blocks[0][len("data: "):])["type"] == "message-start"
    for status, kwargs in ((400, {"data": b"{not json", "headers": {**auth, "Content-Type": "application/json"}}),
                           (400, {"json": {"messages": [{"role": "user"}]}, "headers": auth}),
                           (401, {"json": {"messages": HELLO}}),
                           (413, {"json": {"messages": HELLO, "pad": "x" * 70000}, "headers": auth}),
                           (404, {"json": {}, "headers": auth, "path": "/v2/nothing"})):
        path = kwargs.pop("path", "/v2/chat")
        response = requests.post(server.url + path, timeout=60, **kwargs)
        assert response.status_code == status, response.text
        assert set(response.json()) == {"id", "message"} and response.json()["message"], response.text
    v1 = requests.post(server.url + "/v1/chat/completions", json={"messages": []}, headers=auth, timeout=60)
    assert v1.status_code == 400 and set(v1.json()) == {"error"}  # OpenAI's shape stays on /v1
    doc = requests.get(server.url + "/openapi.json", timeout=10).json()
    op = doc["paths"]["/v2/chat"]["post"]
    assert {"200", "400", "401"} <= set(op["responses"]) and "422" not in op["responses"]
    assert doc["components"]["schemas"]["CohereChatRequest"]["required"] == ["messages"]


def test_open_server_accepts_any_token_or_none(model_path, tmp_path):
    """Without --api-key, cohere 7.x with api_key="" (no header) and any token both get answers."""
    from test_server import _env, _free_port, _serve_command, _wait_healthy

    port = _free_port()
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(_serve_command(model_path, "--port", str(port)), stdout=out,
                                stderr=subprocess.STDOUT, env=_env())
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(url, proc, log)
        for key in ("", "anything"):
            client = cohere.ClientV2(api_key=key, base_url=url, timeout=60, max_retries=0)
            assert client.chat(model="m", messages=HELLO, max_tokens=2).message.role == "assistant"
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def test_penalties_reach_the_sampler(co):
    """frequency_penalty/presence_penalty go to llama.cpp's penalty sampler: the greedy answer changes."""
    asked = dict(model="command-r7b", messages=[{"role": "user", "content": "Who is Emma?"}],
                 documents=["Emma Woodhouse, handsome, clever, and rich."], temperature=0, max_tokens=40)
    plain = co.chat(**asked).message.content[0].text
    assert co.chat(**asked, frequency_penalty=0.0, presence_penalty=0.0).message.content[0].text == plain
    penalized = co.chat(**asked, frequency_penalty=1.0, presence_penalty=1.0).message.content[0].text
    assert penalized != plain, plain

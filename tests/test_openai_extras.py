"""The rest of the OpenAI sampling surface: penalties and DRY, logprobs, `n`, stop strings.

Checked in the Python API (`Model.chat`) and through a real `r7b serve` with the `openai` client and
LangChain's `ChatOpenAI`. The stand-in model writes grammar, not sense, so these tests check shapes
and the arithmetic that must hold whatever it writes (greedy picks the top log-probability, seed
i of n matches a single run with that seed, a stop string never shows).
"""

from __future__ import annotations

import json
import math
from typing import Literal

import pytest

from test_server import KEY, N_CTX, launch, model_path  # noqa: F401  (model_path is a fixture)

DARCY = [{"role": "user", "content": "Tell me about Mr. Darcy."}]
GREEDY = {"temperature": 0.0, "max_tokens": 40}


@pytest.fixture(scope="module")
def model(model_path):  # noqa: F811
    from r7b.runtime.model import Model

    with Model.load(model_path, n_ctx=N_CTX, n_threads=1, check_memory=False) as loaded:
        yield loaded


@pytest.fixture(scope="module")
def server(model_path, tmp_path_factory):  # noqa: F811
    with launch(model_path, tmp_path_factory.mktemp("extras"), "--max-tokens", "256") as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def repeated_trigrams(text: str) -> float:
    words = text.split()
    grams = [tuple(words[i:i + 3]) for i in range(len(words) - 2)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def split_stop(tokens: list[str], text: str) -> tuple[str, str]:
    """A stop string made of the end of one token and the start of the next, and the text before it."""
    at = 0
    for left, right in zip(tokens, tokens[1:]):
        at += len(left)
        if len(left.strip()) >= 2 and len(right.strip()) >= 2:
            stop = left[-2:] + right[:2]
            if text.find(stop) == at - 2:
                return stop, text[:at - 2]
    raise AssertionError(f"no token boundary to split a stop string across in {tokens}")


# -- Python API -----------------------------------------------------------------------------------


def test_penalties_and_dry_run_in_the_sampler_chain(model):
    plain = model.chat(DARCY, **GREEDY)
    assert repeated_trigrams(plain.text) > 0.3  # greedy, the stand-in loops ("I am sure I am sure ...")
    for kwargs in ({"repeat_penalty": 1.3}, {"frequency_penalty": 1.0}, {"presence_penalty": 1.0},
                   {"dry_multiplier": 0.8, "dry_allowed_length": 1}):
        steered = model.chat(DARCY, **GREEDY, **kwargs)
        assert steered.text != plain.text, kwargs
        assert repeated_trigrams(steered.text) < repeated_trigrams(plain.text), (kwargs, steered.text)
    assert model.chat(DARCY, **GREEDY, repeat_penalty=1.3, repeat_last_n=0).text == plain.text  # window 0: off


def test_logprobs_are_the_raw_distribution(model):
    result = model.chat(DARCY, **GREEDY, logprobs=True, top_logprobs=3)
    assert result.logprobs and len(result.logprobs) <= result.usage.completion_tokens
    assert "".join(e["token"] for e in result.logprobs).startswith(result.text[:20])
    for entry in result.logprobs:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
        assert bytes(entry["bytes"]).decode("utf-8", "replace") == entry["token"]
        top = entry["top_logprobs"]
        assert len(top) == 3 and [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
        assert entry["logprob"] == pytest.approx(top[0]["logprob"]) and entry["token"] == top[0]["token"]  # greedy
        assert entry["logprob"] <= 0 and sum(math.exp(t["logprob"]) for t in top) <= 1 + 1e-6
    assert model.chat(DARCY, **GREEDY).logprobs is None  # computed only when asked for


def test_n_answers_share_the_prompt(model):
    from r7b.runtime.model import Choice, Done

    result = model.chat(DARCY, temperature=1.0, max_tokens=12, n=3, seed=11)
    assert len(result.choices) == 3 and result.choices[0].text == result.text
    assert result.usage.completion_tokens == sum(c.usage.completion_tokens for c in result.choices)
    assert all(c.usage.cached_tokens == result.usage.prompt_tokens - 1 for c in result.choices[1:])
    for i, choice in enumerate(result.choices):  # answer i is the single answer with seed + i
        assert model.chat(DARCY, temperature=1.0, max_tokens=12, seed=11 + i).text == choice.text
    events = list(model.chat(DARCY, temperature=1.0, max_tokens=12, n=3, seed=11, stream=True))
    assert [e.index for e in events if isinstance(e, Choice)] == [0, 1, 2]
    assert [c.text for c in events[-1].result.choices] == [c.text for c in result.choices]
    assert isinstance(events[-1], Done)
    with pytest.raises(Exception, match="n must be"):
        model.chat(DARCY, n=5)


def test_stop_string_split_across_tokens(model):
    from r7b.runtime.parse import TextDelta

    full = model.chat(DARCY, **GREEDY, logprobs=True)
    stop, before = split_stop([e["token"] for e in full.logprobs], full.text)
    cut = model.chat(DARCY, **GREEDY, stop=["never-there", stop])
    assert cut.text == before and stop not in cut.raw and cut.finish_reason == "stop"
    streamed = "".join(e.text for e in model.chat(DARCY, **GREEDY, stop=stop, stream=True)
                       if isinstance(e, TextDelta))
    assert streamed == before


def _first_choices(model, messages) -> tuple[str, list[int]]:
    """The answer's opening the prompt writes, and the two likeliest first tokens, from the raw logits."""
    from r7b.runtime.request import ChatRequest

    prompt = model.prepare(ChatRequest(messages=messages))
    model.engine.reset()
    model.engine.prefill(prompt.tokens)
    return prompt.prefix, [tok for tok, _ in model.engine.logprobs(0, top=2)[1]]


def _piece(model, tok: int) -> str:
    return model.engine.piece(tok).decode("utf-8", "replace")


def test_logit_bias_moves_the_logits_before_sampling(model):
    prefix, (top, second) = _first_choices(model, DARCY)
    banned = model.chat(DARCY, temperature=0, max_tokens=1, logit_bias={top: -100})
    assert banned.raw == prefix + _piece(model, second)
    forced = model.engine.tokenize(" Madrid", special=False)[0]
    assert model.chat(DARCY, temperature=0, max_tokens=4, logit_bias={forced: 100}).raw == prefix + _piece(
        model, forced) * 4
    for bias, message in (({model.engine.n_vocab: 1.0}, "not in the vocabulary"), ({5: 100.5}, "between -100")):
        with pytest.raises(Exception, match=message):
            model.chat(DARCY, logit_bias=bias)


def test_ignore_eos_runs_the_answer_to_max_tokens(model):
    from r7b.cohere2 import STOP_TEXTS

    sampled = {"messages": DARCY, "temperature": 1.0, "max_tokens": 48}
    ended = [seed for seed in range(8) if model.chat(**sampled, seed=seed).finish_reason == "stop"]
    assert ended, "the stand-in ended no answer early: nothing to check"
    for seed in ended[:3]:
        long = model.chat(**sampled, seed=seed, ignore_eos=True)
        assert long.finish_reason == "length" and long.usage.completion_tokens == 48
        assert not any(stop in long.raw for stop in STOP_TEXTS)
    with pytest.raises(Exception, match="ignore_eos cannot be combined with a grammar"):
        model.chat(DARCY, ignore_eos=True, grammar='root ::= "yes"')


def test_stop_scanner_never_lets_a_stop_string_out():
    from r7b.runtime.model import _StopScanner

    text = "Tell me, Mr. Darcy, of Mr. Bingley."
    for cut in range(1, 8):  # the text in pieces of every size: the stop string split every way
        scanner, out, hit = _StopScanner(["xyz", "Mr. D"]), "", False
        for i in range(0, len(text), cut):
            safe, hit = scanner.push(text[i:i + cut])
            out += safe
            assert "Mr. D" not in out
            if hit:
                break
        assert hit and out == "Tell me, " and scanner.hit.startswith("Mr. D"), cut
    scanner = _StopScanner(["xyz"])
    assert scanner.push("abcx") == ("ab", False) and scanner.push("y") == ("c", False)  # len("xyz") - 1 held
    assert scanner.flush() == "xy"  # the generation ended: what was held back was text after all


# -- the server, with the openai client -----------------------------------------------------------


def test_openai_client_penalties_and_extensions(client, server):
    ask = dict(model=server.name, messages=DARCY, temperature=0, max_tokens=40)
    plain = client.chat.completions.create(**ask).choices[0].message.content
    for extra in ({"frequency_penalty": 1.0}, {"presence_penalty": 1.0}):
        assert client.chat.completions.create(**ask, **extra).choices[0].message.content != plain
    for body in ({"repeat_penalty": 1.3, "repeat_last_n": 64}, {"dry_multiplier": 0.8, "dry_base": 1.75,
                 "dry_allowed_length": 1, "dry_penalty_last_n": -1, "dry_sequence_breakers": ["\n"]},
                 {"min_p": 0.05}):
        reply = client.chat.completions.create(**ask, extra_body=body)
        assert reply.choices[0].message.content, body
    bad = server.post({"messages": DARCY, "repeat_penalty": 0})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "repeat_penalty"


def test_openai_client_logit_bias_and_ignore_eos(client, server, model):
    ask = dict(model=server.name, messages=DARCY, temperature=0, max_tokens=4)
    forced = model.engine.tokenize(" Madrid", special=False)[0]
    reply = client.chat.completions.create(**ask, logit_bias={str(forced): 100})
    assert reply.choices[0].message.content.split() == [_piece(model, forced).strip()] * 4
    sampled = dict(ask, temperature=1.0, max_tokens=48)
    plain = [client.chat.completions.create(**sampled, seed=seed) for seed in range(6)]
    assert any(r.choices[0].finish_reason == "stop" for r in plain), "no answer ended early: nothing to check"
    for seed in range(6):
        long = client.chat.completions.create(**sampled, seed=seed, extra_body={"ignore_eos": True})
        assert long.choices[0].finish_reason == "length" and long.usage.completion_tokens == 48
    for body, param in (({"logit_bias": {"x1": 5}}, "logit_bias"), ({"logit_bias": {"5": 101}}, "logit_bias"),
                        ({"logit_bias": {"999999999": 1}}, "logit_bias"),
                        ({"ignore_eos": True, "response_format": {"type": "json_object"}}, "ignore_eos")):
        bad = server.post({"messages": DARCY, **body})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == param, (body, bad.text)


def test_openai_client_logprobs(client, server):
    ask = dict(model=server.name, messages=DARCY, temperature=0, max_tokens=30, logprobs=True, top_logprobs=2)
    reply = client.chat.completions.create(**ask)
    content = reply.choices[0].logprobs.content
    assert content and all(len(t.top_logprobs) == 2 and t.logprob == pytest.approx(t.top_logprobs[0].logprob)
                           for t in content)
    assert bytes(b for t in content for b in t.bytes).decode("utf-8", "replace").startswith(
        reply.choices[0].message.content[:20])
    streamed = [t for chunk in client.chat.completions.create(**ask, stream=True)
                for choice in chunk.choices if choice.logprobs for t in choice.logprobs.content]
    assert [(t.token, round(t.logprob, 4)) for t in streamed] == [(t.token, round(t.logprob, 4)) for t in content]
    plain = client.chat.completions.create(model=server.name, messages=DARCY, max_tokens=4)
    assert plain.choices[0].logprobs is None


def test_openai_client_n(client, server):
    ask = dict(model=server.name, messages=DARCY, temperature=1.0, max_tokens=12, seed=3)
    reply = client.chat.completions.create(**ask, n=3)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    texts = [c.message.content for c in reply.choices]
    singles = [client.chat.completions.create(**{**ask, "seed": 3 + i}) for i in range(3)]
    assert texts == [s.choices[0].message.content for s in singles]
    assert reply.usage.prompt_tokens == singles[0].usage.prompt_tokens  # the prompt counts once
    assert reply.usage.completion_tokens == sum(s.usage.completion_tokens for s in singles)
    parts: dict[int, str] = {}
    finished = {}
    for chunk in client.chat.completions.create(**ask, n=3, stream=True, stream_options={"include_usage": True}):
        for choice in chunk.choices:
            parts[choice.index] = parts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                finished[choice.index] = choice.finish_reason
        if chunk.usage:
            assert chunk.usage.completion_tokens == reply.usage.completion_tokens
    assert [parts[i] for i in range(3)] == texts and sorted(finished) == [0, 1, 2]
    too_many = server.post({"messages": DARCY, "n": 5})
    assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "n"


def test_openai_client_stop_split_across_tokens(client, server):
    ask = dict(model=server.name, messages=DARCY, temperature=0, max_tokens=40)
    full = client.chat.completions.create(**ask, logprobs=True)
    text = full.choices[0].message.content
    stop, before = split_stop([t.token for t in full.choices[0].logprobs.content], text)
    cut = client.chat.completions.create(**ask, stop=[stop])
    assert cut.choices[0].message.content == before and cut.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**ask, stop=stop,
                                                                                                stream=True)
                       if c.choices)
    assert streamed == before


# -- LangChain's ChatOpenAI against /v1 -----------------------------------------------------------


@pytest.fixture(scope="module")
def chat_openai(server):
    langchain_openai = pytest.importorskip("langchain_openai")
    return langchain_openai.ChatOpenAI(base_url=server.url + "/v1", api_key=KEY, model=server.name,
                                       temperature=0, max_tokens=40, max_retries=0, timeout=60)


def test_langchain_invoke_and_stream(chat_openai):
    reply = chat_openai.invoke("Tell me about Mr. Darcy.")
    assert isinstance(reply.content, str) and reply.content
    assert reply.usage_metadata["output_tokens"] > 0
    streamed = "".join(chunk.content for chunk in chat_openai.stream("Tell me about Mr. Darcy."))
    assert streamed == reply.content


def test_langchain_tool_round_trip(chat_openai):
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool

    @tool
    def get_weather(city: Literal["Paris", "London"]) -> str:  # an enum: the stand-in would ramble in a free string
        """Current weather in a city."""
        return f"Sunny in {city}"

    roomy = chat_openai.model_copy(update={"max_tokens": 256})  # a tool plan, then the call
    llm = roomy.bind_tools([get_weather], tool_choice="get_weather")
    messages = [HumanMessage("What is the weather in Paris?")]
    first = llm.invoke(messages)
    assert [c["name"] for c in first.tool_calls] == ["get_weather"], (first, first.response_metadata)
    assert first.tool_calls[0]["args"] in ({"city": "Paris"}, {"city": "London"})
    messages += [first, ToolMessage(get_weather.invoke(first.tool_calls[0]["args"]),
                                    tool_call_id=first.tool_calls[0]["id"])]
    answer = roomy.bind_tools([get_weather]).invoke(messages)
    assert answer.content or answer.tool_calls


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_structured_output(chat_openai, method):
    schema = {"title": "Person", "description": "A person in the story.", "type": "object",
              "properties": {"name": {"type": "string", "maxLength": 20},
                             "mood": {"type": "string", "enum": ["proud", "kind"]}},
              "required": ["name", "mood"], "additionalProperties": False}
    roomy = chat_openai.model_copy(update={"max_tokens": 256})
    out = roomy.with_structured_output(schema, method=method).invoke("Who is Mr. Darcy?")
    assert set(out) == {"name", "mood"} and out["mood"] in ("proud", "kind"), json.dumps(out)

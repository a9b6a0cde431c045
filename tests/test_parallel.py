"""Several conversations at once: `Model.load(parallel=N)` and `r7b serve --parallel N`.

Batched answers must equal the single-slot path's token for token, a follow-up turn must land on
its slot and reuse it, a newcomer's prompt must go in between the running answers' decode steps,
an abandoned turn must free its KV cells (read from llama.cpp's cache), and past the queue limit a
request gets 429 with Retry-After.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from r7b.errors import R7BError
from r7b.runtime.model import Model
from r7b.runtime.slots import plan_slots

from test_server import KEY, LONG_ANSWER, launch
from test_server import model_path  # noqa: F401  (fixture)

N_CTX = 4096
SEARCH = {"type": "function", "function": {"name": "search", "description": "Search the web.",
                                           "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}
DOCS = [{"title": "Tides", "text": "Tides are caused by the Moon's gravity pulling on the oceans."},
        {"title": "Sun", "text": "The Sun also raises smaller tides."}]
# (messages, options), greedy: plain, tools, documents, logprobs, a stop string, two answers, biased logits
TURNS = [
    ([{"role": "user", "content": "Tell me about cats."}], {}),
    ([{"role": "user", "content": "Find the weather in Paris."}], {"tools": [SEARCH]}),
    ([{"role": "user", "content": "What causes tides?"}], {"documents": DOCS}),
    ([{"role": "user", "content": "Say hello."}], {"logprobs": True, "top_logprobs": 3}),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count to ten."}], {"stop": ["5"]}),
    ([{"role": "user", "content": "Name a colour."}], {"n": 2}),
    ([{"role": "user", "content": "Tell me about dogs."}], {"logit_bias": {9: -100, 35: 2.5}, "ignore_eos": True}),
]
# sampled: rides in the same batches; a sampled answer may part from the serial one where float
# sums in another order tip a draw, so it is only checked to finish
SAMPLED = ([{"role": "user", "content": "Write a poem about the sea."}], {"temperature": 0.9, "seed": 11})


def _load(path, **kwargs) -> Model:
    return Model.load(path, n_ctx=N_CTX, n_threads=1, check_memory=False, **kwargs)


@pytest.fixture(scope="module")
def serial(model_path):
    model = _load(model_path)
    yield model
    model.close()


@pytest.fixture(scope="module")
def batched(model_path):
    model = _load(model_path, parallel=4)
    yield model
    model.close()


def _run(model: Model, turn, max_tokens: int = 40):
    messages, options = turn
    return model.chat(messages, **{"temperature": 0, "max_tokens": max_tokens, **options})


def _same(a, b) -> None:
    assert a.raw == b.raw
    assert (a.text, a.tool_calls, a.citations, a.finish_reason) == (b.text, b.tool_calls, b.citations, b.finish_reason)
    assert a.usage.completion_tokens == b.usage.completion_tokens
    assert [c.raw for c in a.choices] == [c.raw for c in b.choices]
    if a.logprobs is not None:
        assert [e["token"] for e in a.logprobs] == [e["token"] for e in b.logprobs]
        # a batch of several sequences sums in another order: the same tokens, log-probs within 1e-3
        for x, y in zip(a.logprobs, b.logprobs):
            assert y["logprob"] == pytest.approx(x["logprob"], abs=1e-3)
            assert [t["token"] for t in x["top_logprobs"]] == [t["token"] for t in y["top_logprobs"]]


def test_batched_answers_equal_the_single_slot_path(serial, batched):
    expected = [_run(serial, turn) for turn in TURNS]
    with ThreadPoolExecutor(max_workers=len(TURNS) + 1) as pool:  # more requests than slots: some wait
        got = list(pool.map(lambda turn: _run(batched, turn), [*TURNS, SAMPLED]))
    for a, b in zip(expected, got):
        _same(a, b)
    assert got[-1].usage.completion_tokens > 0
    assert batched.slots.stats["steps"] > 0
    print(f"{len(TURNS)} turns over {batched.parallel} slots: {batched.slots.stats}")


def test_chat_many_batches_conversations(serial, batched):
    conversations = [[{"role": "user", "content": f"Tell me a fact about the number {i}."}] for i in range(5)]
    got = batched.chat_many(conversations, temperature=0, max_tokens=24)
    for messages, result in zip(conversations, got):
        _same(serial.chat(messages, temperature=0, max_tokens=24), result)


def test_follow_up_turn_reuses_its_slot(model_path):
    with _load(model_path, parallel=2) as model:
        first = [[{"role": "user", "content": "Tell me about dogs."}],
                 [{"role": "system", "content": "You answer in French."}, {"role": "user", "content": "Hello!"}]]
        turn1 = model.chat_many(first, temperature=0, max_tokens=16)
        second = [m + [r.message(), {"role": "user", "content": "And then?"}] for m, r in zip(first, turn1)]
        turn2 = model.chat_many(second, temperature=0, max_tokens=16)
        for a, b in zip(turn1, turn2):
            # everything the first turn evaluated stays cached (the last answer token was never decoded)
            assert b.usage.cached_tokens >= a.usage.prompt_tokens, (a.usage, b.usage)
        assert all(state["cells"] > 0 and not state["busy"] for state in model.slot_states())


def test_reader_that_stops_early_leaves_the_slot_as_the_single_slot_path(model_path, serial):
    """The loop decodes ahead of a slow reader; a stop string then ends the turn with decoded tokens
    past it in the cells, which the follow-up turn's prefix match must trim."""
    import time

    from r7b.runtime.slots import LOOKAHEAD

    first = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count to ten."}]
    options = {"temperature": 0, "max_tokens": 40, "stop": ["am sure"]}
    with _load(model_path, parallel=2) as model:
        events = []
        for event in model.chat(first, stream=True, **options):
            events.append(event)
            time.sleep(0.05)  # a slow client: the loop fills its lookahead meanwhile
        a = events[-1].result
        assert a.finish_reason == "stop"
        ran_ahead = max(model.slots.occupancy()) - (a.usage.prompt_tokens + a.usage.completion_tokens - 1)
        assert 0 < ran_ahead <= LOOKAHEAD
        follow_up = first + [a.message(), {"role": "user", "content": "Go on."}]
        b = model.chat(follow_up, **options)
    expected_a = serial.chat(first, **options)
    _same(expected_a, a)
    _same(serial.chat(first + [expected_a.message(), {"role": "user", "content": "Go on."}], **options), b)
    assert b.usage.cached_tokens > 0


def test_newcomer_prompt_is_prefilled_between_decode_steps(model_path, serial):
    long_question = [{"role": "user", "content": "Summarize: " + "the quick brown fox jumps over the lazy dog. " * 60}]
    running = [{"role": "user", "content": "Count."}]
    with Model.load(model_path, n_ctx=N_CTX, n_threads=1, check_memory=False, parallel=2, n_batch=64) as model:
        stream = model.chat(running, stream=True, temperature=0, max_tokens=60, response_format=LONG_ANSWER)
        next(stream)
        newcomer = threading.Thread(target=lambda: model.chat(long_question, temperature=0, max_tokens=4))
        newcomer.start()
        events = list(stream)
        newcomer.join()
        stats = dict(model.slots.stats)
    result = events[-1].result
    assert result.usage.completion_tokens == 60
    assert result.raw == serial.chat(running, temperature=0, max_tokens=60, response_format=LONG_ANSWER).raw
    # the ~600-token prompt went in 64-token batches, most beside the running answer's next token
    assert stats["mixed_steps"] >= 5, stats


def test_abandoned_turn_frees_its_cells_and_finished_one_keeps_them(model_path):
    with _load(model_path, parallel=2) as model:
        done = model.chat([{"role": "user", "content": "Hi."}], temperature=0, max_tokens=8)
        kept = done.usage.prompt_tokens + done.usage.completion_tokens - 1  # the last token is not decoded
        assert sorted(model.slots.occupancy()) == [0, kept]
        stream = model.chat([{"role": "user", "content": "Count."}], stream=True, temperature=0, max_tokens=300,
                            response_format=LONG_ANSWER)
        for _ in range(5):
            next(stream)
        assert min(model.slots.occupancy()) > 0  # the other slot is filling
        stream.close()  # the client hangs up
        assert sorted(model.slots.occupancy()) == [0, kept]
        assert not any(state["busy"] for state in model.slot_states())


def test_slot_count_comes_from_memory(model_path, monkeypatch):
    from r7b import memory
    from r7b.cohere2 import Cohere2Dims
    from r7b.gguf_validate import validate_gguf

    summary = validate_gguf(model_path, arch="cohere2", check_tensor_data=False)
    one = memory.estimate_ram(sum(t.nbytes for t in summary.tensors),
                              Cohere2Dims.from_gguf_metadata(summary.metadata), N_CTX)
    monkeypatch.setattr(memory, "available_memory", lambda: one.total + 2 * one.kv_cache + one.kv_cache // 2)
    assert plan_slots(summary, None, n_ctx=N_CTX) == 3
    assert plan_slots(summary, 3, n_ctx=N_CTX) == 3
    with pytest.raises(R7BError, match="4 slots of 4096 tokens need about .* use fewer slots"):
        plan_slots(summary, 4, n_ctx=N_CTX)
    monkeypatch.setattr(memory, "available_memory", lambda: 1 << 50)
    assert plan_slots(summary, None, n_ctx=N_CTX) == 4  # at most 4 unless asked
    with pytest.raises(R7BError, match="parallel must be between 1 and"):
        plan_slots(summary, 0, n_ctx=N_CTX)


# -- the server --------------------------------------------------------------------------------


def _post(url: str, body: dict, **kwargs) -> requests.Response:
    return requests.post(url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                         **kwargs)


def test_server_slots_answer_as_the_serial_server(model_path, tmp_path):
    bodies = [{"messages": messages, "max_tokens": 24, "temperature": 0, **{k: v for k, v in options.items()
                                                                           if k in ("tools", "stop")}}
              for messages, options in TURNS[:5]]
    answers = {}
    for slots in ("1", "3"):
        (tmp_path / slots).mkdir()
        with launch(model_path, tmp_path / slots, "--parallel", slots) as server:
            with ThreadPoolExecutor(max_workers=len(bodies)) as pool:
                responses = list(pool.map(lambda body: _post(server.url, body, timeout=120), bodies))
            assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
            answers[slots] = [r.json()["choices"][0]["message"] for r in responses]
            states = requests.get(server.url + "/slots", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
            assert len(states.json()) == int(slots)
    assert answers["3"] == answers["1"]


def test_full_queue_gets_429_with_retry_after(model_path, tmp_path):
    long = {"messages": [{"role": "user", "content": "Count."}], "max_tokens": 200, "temperature": 0,
            "response_format": LONG_ANSWER}
    with launch(model_path, tmp_path, "--parallel", "1", "--max-queue", "1") as server:
        with ThreadPoolExecutor(max_workers=4) as pool:
            responses = list(pool.map(lambda _: _post(server.url, long, timeout=120), range(4)))
        codes = sorted(r.status_code for r in responses)
        busy = [r for r in responses if r.status_code == 429]
        assert codes.count(200) >= 2 and busy, codes
        for r in busy:
            assert int(r.headers["Retry-After"]) >= 1
            assert r.json()["error"]["code"] == "server_busy"
        assert _post(server.url, {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
                     timeout=60).status_code == 200

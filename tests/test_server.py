"""`r7b serve` end to end: a real server process on loopback, driven by the OpenAI client and raw HTTP.

The stand-in model writes the turn structure but not sensible content, so these tests check
shapes, counts and protocol behaviour, never what the answers say.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
import requests

from procs import stop_process

KEY = "test-key-123"
N_CTX = 4096
MAX_BODY = 256 * 1024
ERROR_KEYS = {"message", "type", "param", "code"}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "London"]}},
                   "required": ["city"], "additionalProperties": False}}}
# An answer that cannot end early: used where a generation must outlast the client.
LONG_ANSWER = {"type": "json_schema", "json_schema": {
    "name": "numbers", "schema": {"type": "array", "items": {"type": "integer"}, "minItems": 1000}}}


@dataclass
class Server:
    url: str
    name: str
    process: subprocess.Popen
    log: Path

    def post(self, body=None, *, key: str | None = KEY, timeout: float = 60, **kwargs) -> requests.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        headers.update(kwargs.pop("headers", {}))
        return requests.post(self.url + "/v1/chat/completions", json=body, headers=headers, timeout=timeout, **kwargs)

    def chat(self, content: str = "Hello", **fields) -> dict:
        response = self.post({"model": self.name, "messages": [{"role": "user", "content": content}], **fields})
        assert response.status_code == 200, response.text
        return response.json()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _serve_command(model: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "r7b.cli", "serve", str(model), "--threads", "1", "--n-ctx", str(N_CTX), *extra]


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "R7B_API_KEY"}


@pytest.fixture(scope="module")
def model_path(stand_in_gguf) -> Path:
    return stand_in_gguf("f16")


@contextlib.contextmanager
def launch(model: Path, log_dir: Path, *extra: str) -> Iterator[Server]:
    """`r7b serve MODEL --api-key KEY *extra` on a free loopback port, stopped (and checked) on exit."""
    port = _free_port()
    log = log_dir / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(_serve_command(model, "--port", str(port), "--api-key", KEY, *extra),
                                stdout=out, stderr=subprocess.STDOUT, env=_env())
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc, log)
        name = requests.get(url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).json()
        yield Server(url, name["data"][0]["id"], proc, log)
    finally:
        stop_process(proc, 15)
    assert proc.returncode in (0, -15), log.read_text()


@pytest.fixture(scope="module")
def server(model_path, tmp_path_factory):
    with launch(model_path, tmp_path_factory.mktemp("serve"), "--max-body-bytes", str(MAX_BODY)) as running:
        yield running


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"r7b serve exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if requests.get(url + "/health", timeout=1).json() == {"status": "ok"}:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    pytest.fail(f"r7b serve did not become healthy:\n{log.read_text()}")


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def local_model(model_path):
    """The same GGUF in this process, to count prompt tokens independently of the server."""
    from r7b.runtime.model import Model

    model = Model.load(model_path, n_ctx=N_CTX, n_threads=1, check_memory=False)
    yield model
    model.close()


def _assert_error(response: requests.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == ERROR_KEYS and isinstance(error["message"], str) and error["message"]
    if code is not None:
        assert error["code"] == code
    return error


def _sse(response: requests.Response) -> list:
    """The JSON payloads of an SSE body, with the final [DONE] as the string 'DONE'."""
    events = []
    for line in response.iter_lines(decode_unicode=True):
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append("DONE" if data == "[DONE]" else json.loads(data))
    return events


# -- basics ---------------------------------------------------------------------------------------


def test_health_models_and_openapi(server):
    assert requests.get(server.url + "/health", timeout=5).json() == {"status": "ok"}
    models = requests.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=5).json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [server.name]
    doc = requests.get(server.url + "/openapi.json", timeout=5).json()
    op = doc["paths"]["/v1/chat/completions"]["post"]
    assert "422" not in op["responses"] and {"400", "401", "404", "413"} <= set(op["responses"])
    request = doc["components"]["schemas"]["ChatCompletionRequest"]
    assert request["required"] == ["messages"]
    assert {"documents", "citations_enabled", "tool_choice", "response_format"} <= set(request["properties"])


def test_hosted_api_style_request(server):
    response = requests.post(server.url + "/v1/chat/completions",
                             headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"},
                             json={"model": server.name, "messages": [{"role": "user", "content": "Hello"}]},
                             timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion" and body["model"] == server.name
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_openai_message_shapes(server):
    messages = [{"role": "developer", "content": "Answer briefly."},
                {"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]}]
    response = server.post({"messages": messages, "max_tokens": 4, "stop": "\n", "user": "u-1", "metadata": {"k": "v"},
                            "frequency_penalty": 0, "presence_penalty": 0, "parallel_tool_calls": True, "store": False})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["role"] == "assistant"


# -- the OpenAI client ----------------------------------------------------------------------------


def test_stream_equals_non_stream(client, server):
    request = dict(model=server.name, messages=[{"role": "user", "content": "Tell me a story."}],
                   temperature=0, seed=7, max_tokens=32)
    full = client.chat.completions.create(**request)
    chunks = list(client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1


def test_usage_counts_match_the_tokenizer(client, server, local_model):
    messages = [{"role": "user", "content": "Who is Emma Woodhouse?"}]
    first = client.chat.completions.create(model=server.name, messages=messages, temperature=0, max_tokens=6)
    assert first.usage.prompt_tokens == len(local_model.tokenize_prompt(local_model.render(messages)))
    assert 1 <= first.usage.completion_tokens <= 6
    if first.choices[0].finish_reason == "length":
        assert first.usage.completion_tokens == 6
    follow = messages + [{"role": "assistant", "content": first.choices[0].message.content or "I see."},
                         {"role": "user", "content": "And her father?"}]
    second = client.chat.completions.create(model=server.name, messages=follow, temperature=0, max_tokens=6)
    assert second.usage.prompt_tokens == len(local_model.tokenize_prompt(local_model.render(follow)))
    assert second.usage.prompt_tokens_details.cached_tokens > 0  # the first turn's prompt was reused


def test_tool_call_round_trip(client, server):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.chat.completions.create(model=server.name, messages=messages, tools=[WEATHER],
                                           tool_choice="required", temperature=0, max_tokens=256)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments)["city"] in ("Paris", "London")
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature_c": 21})}]
    final = client.chat.completions.create(model=server.name, messages=messages, tools=[WEATHER],
                                           tool_choice="none", temperature=0, max_tokens=48)
    answer = final.choices[0]
    assert answer.finish_reason in ("stop", "length") and not answer.message.tool_calls
    assert isinstance(answer.message.content, str)


def test_named_tool_choice_streams_the_call(client, server):
    stream = client.chat.completions.create(
        model=server.name, messages=[{"role": "user", "content": "Weather in London?"}], tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, temperature=0, max_tokens=256,
        stream=True)
    chunks = list(stream)
    calls = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert calls and calls[0].index == 0 and calls[0].function.name == "get_weather"
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


# -- extensions and response formats --------------------------------------------------------------


def test_documents_give_citations(server):
    documents = [{"title": "Emma", "text": "Emma Woodhouse, handsome, clever, and rich."}, "Mr. Knightley is kind."]
    body = server.chat("Who is Emma?", documents=documents, max_tokens=48, temperature=0)
    message = body["choices"][0]["message"]
    assert isinstance(message["citations"], list)
    for citation in message["citations"]:
        assert {"start", "end", "text", "sources"} <= set(citation)
    events = _sse(server.post({"messages": [{"role": "user", "content": "Who is Emma?"}], "documents": documents,
                               "max_tokens": 48, "stream": True}, stream=True))
    assert events[-1] == "DONE" and isinstance(events[-2]["choices"][0]["delta"]["citations"], list)


def test_json_object_answer_parses(client, server):
    # A sampled answer ends on its own within a few hundred tokens; take the first that does.
    for seed in range(4):
        answer = client.chat.completions.create(
            model=server.name, messages=[{"role": "user", "content": "Describe Emma as JSON."}],
            response_format={"type": "json_object"}, temperature=0.7, seed=seed, max_tokens=300).choices[0]
        assert answer.message.content.startswith("{")
        if answer.finish_reason == "stop":
            assert isinstance(json.loads(answer.message.content), dict)
            return
    pytest.fail("no JSON answer ended within max_tokens")


def test_json_schema_answer_matches(client, server):
    schema = {"type": "object", "properties": {"name": {"type": "string", "enum": ["Emma", "Harriet"]},
                                               "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    answer = client.chat.completions.create(
        model=server.name, messages=[{"role": "user", "content": "Name and age of Emma, as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}},
        temperature=0, max_tokens=64).choices[0]
    value = json.loads(answer.message.content)
    assert set(value) == {"name", "age"} and value["name"] in ("Emma", "Harriet")


# -- errors ---------------------------------------------------------------------------------------


def test_malformed_requests_get_openai_errors(server):
    hello = [{"role": "user", "content": "Hello"}]
    post = server.post
    _assert_error(post(data="{not json", headers={"Content-Type": "application/json"}), 400)
    _assert_error(post({"model": server.name}), 400)
    _assert_error(post({"messages": "Hello"}), 400)
    _assert_error(post({"messages": hello, "temperature": "hot"}), 400)
    _assert_error(post({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
                  400)
    _assert_error(post({"messages": hello, "n": 5}), 400, "unsupported_value")  # n up to 4: test_openai_extras.py
    _assert_error(post({"messages": hello, "top_logprobs": 2}), 400)  # without logprobs: true
    _assert_error(post({"messages": hello, "response_format": {"type": "json_schema",
                                                                "json_schema": {"schema": {"type": 5}}}}), 400)
    _assert_error(post({"messages": hello, "tool_choice": "required"}), 400)
    _assert_error(post({"model": "gpt-4o", "messages": hello}), 404, "model_not_found")
    long_prompt = [{"role": "user", "content": "the quick brown fox jumps over the lazy dog " * 800}]
    _assert_error(post({"messages": long_prompt}), 400, "context_length_exceeded")
    _assert_error(post({"messages": hello}, key="wrong-key"), 401, "invalid_api_key")
    _assert_error(post({"messages": hello}, key=None), 401, "invalid_api_key")
    _assert_error(post({"messages": [{"role": "user", "content": "x" * MAX_BODY}]}), 413)
    chunks = (b"x" * 4096 for _ in range(MAX_BODY // 4096 + 2))  # no Content-Length: counted while read
    _assert_error(post(data=chunks), 413)
    assert requests.get(server.url + "/health", timeout=5).json() == {"status": "ok"}
    assert server.chat(max_tokens=4)["choices"][0]["message"]["role"] == "assistant"


def test_refuses_public_address_without_key(model_path):
    result = subprocess.run(_serve_command(model_path, "--host", "0.0.0.0", "--port", str(_free_port())),
                            capture_output=True, text=True, timeout=60, env=_env())
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "API key" in lines[0], result.stderr


# -- concurrency ----------------------------------------------------------------------------------


def test_concurrent_streams_all_complete(server):
    results: dict[int, list] = {}

    def run(i: int) -> None:
        body = {"messages": [{"role": "user", "content": f"Story number {i}"}], "max_tokens": 24, "stream": True,
                "seed": i}
        results[i] = _sse(server.post(body, stream=True))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    assert requests.get(server.url + "/health", timeout=5).status_code == 200  # the event loop stays free
    for t in threads:
        t.join(timeout=120)
    assert sorted(results) == [0, 1, 2, 3]
    for events in results.values():
        assert events[-1] == "DONE" and events[-2]["choices"][0]["finish_reason"] in ("stop", "length")


def test_client_gone_mid_stream_frees_the_model(server):
    long = {"messages": [{"role": "user", "content": "Count."}], "response_format": LONG_ANSWER, "max_tokens": 1500}
    start = time.monotonic()
    assert server.chat(**long)["choices"][0]["finish_reason"] == "length"
    full = time.monotonic() - start

    response = server.post({**long, "stream": True}, stream=True)
    lines = response.iter_lines()
    assert [next(lines) for _ in range(4)]  # a few chunks arrived: generation is running
    response.close()
    start = time.monotonic()
    assert server.chat(max_tokens=4)["choices"][0]["message"]["role"] == "assistant"
    assert time.monotonic() - start < max(0.5 * full, 0.5), f"waited for an abandoned generation ({full:.1f}s)"

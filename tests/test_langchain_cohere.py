"""langchain-cohere's `ChatCohere` against a real `r7b serve` (`POST /v2/chat`).

langchain-cohere pins cohere<6, which clashes with the cohere 7.x the other tests use, so it runs
in its own environment (scripts/clients_env.sh: ~/.cache/r7b-edge/venv-langchain-cohere, made once
from the package index, then reused offline). The client script below runs there and reports
what it saw as JSON; the checks that need the client's objects are asserted inside it.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from test_server import KEY, launch
from test_server import model_path  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parent.parent
MAX_TOKENS = 128

CLIENT = r'''
import json, os
from typing import Literal

from langchain_cohere import ChatCohere
from langchain_core.documents import Document
from langchain_core.messages import HumanMessage
from langchain_core.tools import tool
from pydantic import BaseModel, Field

llm = ChatCohere(model="command-r7b", base_url=os.environ["R7B_URL"], cohere_api_key=os.environ["R7B_KEY"],
                 temperature=0)
report = {}

# 1. invoke with documents: citations, if any, index the answer by code points and name the documents
docs = [Document(page_content="Emma Woodhouse, handsome, clever, and rich.", metadata={"id": "emma"}),
        Document(page_content="Mr. Knightley lives at Donwell Abbey.")]
answer = llm.invoke([HumanMessage("Who is Emma?")], documents=docs, max_tokens=48)
assert isinstance(answer.content, str) and answer.content, answer
citations = answer.additional_kwargs.get("citations") or []
for c in citations:
    assert c.text == answer.content[c.start:c.end], c
    assert {s.id for s in c.sources} <= {"emma", "doc-1"}, c
report["documents"] = {"chars": len(answer.content), "citations": len(citations),
                       "usage": answer.usage_metadata, "finish": answer.response_metadata.get("finish_reason")}

# 2. bind_tools: call -> result with the server's id -> answer. langchain-cohere sends only each
# parameter's type (no enum, no length), and the stand-in can ramble inside a free string, so the
# parameter is a boolean, which the grammar keeps short.
@tool
def get_weather(celsius: bool) -> dict:
    """Current weather in Paris."""
    return {"city": "Paris", "temperature": 21 if celsius else 70}

question = HumanMessage("What is the weather in Paris?")
ai = llm.bind_tools([get_weather], tool_choice="REQUIRED").invoke([question], max_tokens=256)
assert ai.tool_calls, ai
call = ai.tool_calls[0]
assert call["name"] == "get_weather" and isinstance(call["args"]["celsius"], bool), call
result = get_weather.invoke(call)
final = llm.bind_tools([get_weather], tool_choice="NONE").invoke([question, ai, result], max_tokens=48)
assert isinstance(final.content, str) and not final.tool_calls, final
tool_citations = final.additional_kwargs.get("citations") or []
for c in tool_citations:
    assert c.text == final.content[c.start:c.end], c
report["tools"] = {"call_id": call["id"], "args": call["args"], "plan": ai.content, "answer_chars": len(final.content),
                   "citations": len(tool_citations)}

# 3. with_structured_output (json_schema: langchain sends response_format.schema) and json_mode
class Heroine(BaseModel):
    name: str = Field(max_length=12)
    mood: Literal["happy", "sad"]

heroine = llm.with_structured_output(Heroine).invoke("Name a heroine as JSON.")
assert isinstance(heroine, Heroine), heroine
as_dict = llm.with_structured_output({"title": "Book", "type": "object", "properties": {
    "title": {"type": "string", "maxLength": 10}}, "required": ["title"]}).invoke("A book title?")
assert isinstance(as_dict, dict) and isinstance(as_dict["title"], str), as_dict
report["structured"] = {"heroine": heroine.model_dump(), "book": as_dict}

# 4. streaming equals invoking under greedy sampling; the last chunk carries the usage
story = [HumanMessage("Tell me a story.")]
chunks = list(llm.stream(story, max_tokens=24))
streamed = "".join(c.content for c in chunks if isinstance(c.content, str))
whole = llm.invoke(story, max_tokens=24)
assert streamed == whole.content, (streamed, whole.content)
usage = chunks[-1].additional_kwargs["token_count"]  # from message-end's usage.billed_units
assert usage["output_tokens"] == whole.usage_metadata["output_tokens"], usage
assert chunks[-1].additional_kwargs["finish_reason"] == whole.response_metadata["finish_reason"]
report["stream"] = {"chunks": len(chunks), "chars": len(streamed)}

print(json.dumps(report))
'''


@pytest.fixture(scope="module")
def lc_python() -> str:
    """The python of the langchain-cohere environment, made on first use."""
    script = ROOT / "scripts" / "clients_env.sh"
    run = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=600)
    if run.returncode != 0:
        pytest.skip(f"cannot create the langchain-cohere environment (offline?): {run.stderr.strip()[-400:]}")
    return run.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def server(model_path, tmp_path_factory):
    with launch(model_path, tmp_path_factory.mktemp("langchain"), "--max-tokens", str(MAX_TOKENS)) as running:
        yield running


def test_langchain_cohere_client(lc_python, server, tmp_path):
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    env = {**os.environ, "R7B_URL": server.url, "R7B_KEY": KEY}
    for name in ("CO_API_URL", "CO_API_KEY", "COHERE_API_KEY", "PYTHONPATH", "VIRTUAL_ENV"):
        env.pop(name, None)
    run = subprocess.run([lc_python, str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-4000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    print(json.dumps(report, indent=1))
    assert report["documents"]["usage"]["input_tokens"] > 0
    assert report["tools"]["call_id"].startswith("get_weather_")
    assert report["structured"]["heroine"]["mood"] in ("happy", "sad")
    assert report["stream"]["chunks"] >= 2

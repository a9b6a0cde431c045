"""The chat templates against the golden prompts, byte for byte: through `render_prompt`, through
transformers' own `apply_chat_template` (the flattened strings a GGUF embeds), and through `r7b render`."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from r7b.cli import main
from r7b.errors import R7BError
from r7b.runtime.prompt import (TemplateError, fits_plain_chat, prepare_messages, preamble, render_prompt,
                                select_template)
from r7b.templates import TEMPLATE_DIR, TEMPLATE_NAMES, preambles, template_source

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = [json.loads(line) for line in (ROOT / "tests" / "data" / "chat_golden.jsonl").open(encoding="utf-8")]
ROWS = {row["id"]: row for row in GOLDEN}
CASES: dict[str, dict[str, dict]] = defaultdict(dict)
for _row in GOLDEN:
    CASES[_row["case"]][_row["template"]] = _row
OK_ROWS = [row for row in GOLDEN if not row["error"]]
ERROR_ROWS = [row for row in GOLDEN if row["error"]]
HF_ROWS = [row for row in GOLDEN if row["hf_auto_selected"]]


def row_id(row: dict) -> str:
    return row["id"]


def split(inputs: dict) -> tuple[list, list | None, list | None, dict]:
    """(messages, tools, documents, other template variables) from a golden row's inputs."""
    options = copy.deepcopy(inputs)
    return options.pop("messages"), options.pop("tools", None), options.pop("documents", None), options


def render_row(row: dict, **kwargs) -> str:
    messages, tools, documents, options = split(row["inputs"])
    return render_prompt(messages, tools, documents, **{"template": row["template"], **options, **kwargs})


# -- golden rows ---------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", [True, False], ids=["normalized", "raw"])
@pytest.mark.parametrize("row", GOLDEN, ids=row_id)
def test_golden_row(row, normalize):
    if row["error"]:
        with pytest.raises(TemplateError) as info:
            render_row(row, normalize=normalize)
        assert str(info.value).strip()
    else:
        assert render_row(row, normalize=normalize) == row["expected"]


def test_golden_file_covers_every_template():
    assert {row["template"] for row in GOLDEN} == set(TEMPLATE_NAMES)
    assert len(OK_ROWS) > 60 and len(ERROR_ROWS) > 10


@pytest.mark.parametrize("row", HF_ROWS, ids=row_id)
def test_auto_selection(row):
    """Where transformers' pick renders, auto picks the same; where it fails, auto falls back."""
    messages, tools, documents, options = split(row["inputs"])
    if not row["error"]:
        assert select_template(prepare_messages(messages), tools, documents) == row["template"]
        assert render_prompt(messages, tools, documents, **options) == row["expected"]
    elif tools is not None or not messages:  # nothing to fall back to: the caller's input is wrong
        with pytest.raises(TemplateError):
            render_prompt(messages, tools, documents, **options)
    else:
        fallback = CASES[row["case"]]["tool_use"]
        assert not fallback["error"]
        assert render_prompt(messages, tools, documents, **options) == fallback["expected"]


def test_plain_chat_fit():
    user, bot = {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}
    assert fits_plain_chat([user, bot, user])
    assert fits_plain_chat([{"role": "system", "content": ""}, user])
    assert not fits_plain_chat([user, user])
    assert not fits_plain_chat([bot])
    assert not fits_plain_chat([{"role": "USER", "content": "a"}])
    assert not fits_plain_chat([user, {"role": "tool", "content": "x"}])
    assert not fits_plain_chat([user, {**bot, "tool_calls": [{}]}])
    assert not fits_plain_chat([{"role": "user", "content": [{"type": "text", "text": "a"}]}])
    assert not fits_plain_chat([user, bot, {"role": "system", "content": "late"}, user])


def test_auto_keeps_transformers_choice_for_tools_and_documents():
    user = [{"role": "user", "content": "hi"}]
    assert select_template(user, tools=[]) == "tool_use"
    assert select_template(user, documents=[{"text": "d"}]) == "default"
    assert select_template(user, documents=[]) == "default"


# -- the flattened template strings ----------------------------------------------------------


@pytest.fixture(scope="module")
def hf_tokenizer():
    """A transformers tokenizer whose chat templates are ours, as a converted checkpoint carries them."""
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<BOS_TOKEN>": 1, "<|END_OF_TURN_TOKEN|>": 2, "<PAD>": 3}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                                  bos_token="<BOS_TOKEN>", eos_token="<|END_OF_TURN_TOKEN|>", pad_token="<PAD>")
    tok.chat_template = {name: template_source(name) for name in TEMPLATE_NAMES}
    return tok


def hf_render(tok, row: dict, chat_template: str | None) -> str:
    messages, tools, documents, options = split(row["inputs"])
    return tok.apply_chat_template(messages, tools=tools, documents=documents, chat_template=chat_template,
                                   tokenize=False, **options)


@pytest.mark.parametrize("row", GOLDEN, ids=row_id)
def test_flattened_template_through_transformers(hf_tokenizer, row):
    if row["error"]:
        with pytest.raises(Exception):
            hf_render(hf_tokenizer, row, row["template"])
    else:
        assert hf_render(hf_tokenizer, row, row["template"]) == row["expected"]


@pytest.mark.parametrize("row", [r for r in HF_ROWS if not r["error"]], ids=row_id)
def test_transformers_own_selection(hf_tokenizer, row):
    assert hf_render(hf_tokenizer, row, None) == row["expected"]


@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_flattened_source_is_self_contained(name):
    source = template_source(name)
    for tag in ("{% from", "{% import", "{% include", "{% extends"):
        assert tag not in source
    assert not source.endswith("\n")
    assert source == template_source(name)


def loader_environment():
    """The sandbox with a loader over templates/, to render the files as written (imports and all)."""
    from jinja2 import FileSystemLoader

    from r7b.runtime.sandbox import _environment

    return _environment().overlay(loader=FileSystemLoader(str(TEMPLATE_DIR)))


@pytest.mark.parametrize("row", OK_ROWS, ids=row_id)
def test_template_files_match_flattened(row):
    """Inlining the partials changes nothing: the modular files render the same bytes."""
    messages, tools, documents, options = split(row["inputs"])
    rendered = loader_environment().get_template(f"{row['template']}.jinja").render(
        messages=messages, tools=tools, documents=documents, **options)
    assert rendered == row["expected"]


@pytest.mark.parametrize("partial", sorted(p.name for p in TEMPLATE_DIR.glob("_*.jinja")))
def test_partials_only_define_macros(partial):
    assert loader_environment().get_template(partial).render() == ""


def test_unknown_template_name():
    with pytest.raises(R7BError, match="unknown chat template"):
        template_source("chatml")
    with pytest.raises(TemplateError, match="unknown template"):
        render_prompt([{"role": "user", "content": "hi"}], template="chatml")


# -- normalization -------------------------------------------------------------------------


def test_arguments_as_json_string_render_like_objects():
    row = ROWS["tools_multi_step_agent__tool_use"]
    messages, tools, documents, options = split(row["inputs"])
    for message in messages:
        for call in message.get("tool_calls", []):
            call["function"]["arguments"] = json.dumps(call["function"]["arguments"])
    assert render_prompt(messages, tools, documents, **options) == row["expected"]


def test_empty_argument_string_is_no_arguments():
    row = ROWS["tool_result_string__tool_use"]
    messages, tools, documents, options = split(row["inputs"])
    messages[1]["tool_calls"][0]["function"]["arguments"] = ""
    assert render_prompt(messages, tools, documents, **options) == row["expected"]


def test_invalid_argument_json_is_an_error():
    messages = [{"role": "user", "content": "hi"},
                {"role": "assistant", "tool_calls": [{"id": "a", "function": {"name": "f", "arguments": "{oops"}}]}]
    with pytest.raises(TemplateError, match="not valid JSON"):
        render_prompt(messages, tools=[])


def test_reasoning_content_is_the_plan():
    row = ROWS["tools_docs_example_step2__tool_use"]
    messages, tools, documents, options = split(row["inputs"])
    messages[1]["reasoning_content"] = messages[1].pop("tool_plan")
    assert render_prompt(messages, tools, documents, **options) == row["expected"]


def test_tool_plan_wins_over_reasoning_content():
    row = ROWS["tools_docs_example_step2__tool_use"]
    messages, tools, documents, options = split(row["inputs"])
    messages[1]["reasoning_content"] = "something else"
    assert render_prompt(messages, tools, documents, **options) == row["expected"]


def test_chatbot_role_is_an_assistant_turn():
    as_chatbot = [{"role": "user", "content": "Ping"}, {"role": "chatbot", "content": "Pong"},
                  {"role": "user", "content": "Again"}]
    as_assistant = [dict(m, role="assistant") if m["role"] == "chatbot" else m for m in as_chatbot]
    expected = render_prompt(as_assistant, template="default")
    assert "<|CHATBOT_TOKEN|><|START_RESPONSE|>Pong<|END_RESPONSE|>" in expected
    assert render_prompt(as_chatbot, template="default") == expected
    assert render_prompt(as_chatbot) == expected


def test_openai_nulls_are_dropped():
    row = ROWS["tools_multi_step_agent__tool_use"]
    messages, tools, documents, options = split(row["inputs"])
    for message in messages:
        message.setdefault("content", None)
        message.setdefault("name", None)
    assert render_prompt(messages, tools, documents, **options) == row["expected"]


def test_inputs_are_not_modified():
    row = ROWS["tools_multi_step_agent__tool_use"]
    messages, tools, documents, options = split(row["inputs"])
    messages[1]["tool_calls"][0]["function"]["arguments"] = '{"city": "Paris"}'
    messages[1]["role"] = "chatbot"
    before = copy.deepcopy(messages)
    render_prompt(messages, tools, documents, **options)
    assert messages == before


def test_normalizing_twice_changes_nothing():
    for row in OK_ROWS:
        once = prepare_messages(row["inputs"]["messages"])
        assert prepare_messages(once) == once


@pytest.mark.parametrize("messages, match", [
    ([], "empty"),
    ({"role": "user", "content": "hi"}, "must be a list"),
    (["hi"], r"messages\[0\] must be an object"),
    ([{"content": "hi"}], "needs a 'role'"),
    ([{"role": "user", "content": object()}], "only JSON values"),
])
def test_bad_conversations(messages, match):
    with pytest.raises(TemplateError, match=match):
        render_prompt(messages)


def test_self_referencing_data_is_an_error():
    document: dict = {"title": "loop"}
    document["self"] = document
    with pytest.raises(TemplateError, match="nested too deeply"):
        render_prompt([{"role": "user", "content": "hi"}], documents=[document])


def test_raw_rendering_keeps_the_template_behaviour(tmp_path, capsysbinary):
    """Without normalization a JSON-string argument is shown as a quoted string, as transformers renders it."""
    row = ROWS["tool_result_string__tool_use"]
    inputs = copy.deepcopy(row["inputs"])
    inputs["messages"][1]["tool_calls"][0]["function"]["arguments"] = "{}"
    path = tmp_path / "raw.json"
    path.write_text(json.dumps(inputs), encoding="utf-8")
    assert main(["render", str(path), "--raw"]) == 0
    raw = capsysbinary.readouterr().out.decode("utf-8")
    assert raw == row["expected"].replace('"parameters": {}}', '"parameters": "{}"}')
    assert main(["render", str(path)]) == 0
    assert capsysbinary.readouterr().out.decode("utf-8") == row["expected"]


def test_documents_and_tools_must_be_objects():
    user = [{"role": "user", "content": "hi"}]
    with pytest.raises(TemplateError, match="documents"):
        render_prompt(user, documents=["just text"])
    with pytest.raises(TemplateError, match="tools"):
        render_prompt(user, tools={"type": "function"})


def test_error_names_the_usual_cause():
    row = ROWS["rag_docs_example__tool_use"]
    with pytest.raises(TemplateError, match="tools=\\[\\]"):
        render_row(row)


# -- preambles -----------------------------------------------------------------------------


def test_preambles_match_the_documented_text():
    texts = preambles()
    assert preamble() == texts["conversational_preamble_contextual"]
    assert preamble("instruct") == texts["instruct_preamble_contextual"]
    assert preamble("conversational", "strict") == texts["conversational_preamble_strict"]
    strict_instruct = preamble("instruct", "strict")
    assert texts["safety_strict"] in strict_instruct and texts["safety_contextual"] not in strict_instruct
    assert preamble("instruct", None) == preamble("instruct", "contextual")


@pytest.mark.parametrize("case, mode, safety", [
    ("system_instruct_preamble", "instruct", None),
    ("system_strict_safety_preamble", "conversational", "strict"),
    ("system_conversational_preamble_docs", "conversational", "contextual"),
])
def test_mode_puts_the_preamble_in_the_system_turn(case, mode, safety):
    row = CASES[case]["default"]
    messages, tools, documents, options = split(row["inputs"])
    assert render_prompt(messages[1:], tools, documents, mode=mode, safety=safety, **options) == row["expected"]


def test_mode_keeps_the_callers_system_message_after_the_preamble():
    messages = [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "hi"}]
    prompt = render_prompt(messages, mode="instruct")
    assert f"<|SYSTEM_TOKEN|>{preamble('instruct')}\n\nAnswer in French.<|END_OF_TURN_TOKEN|>" in prompt


def test_mode_in_the_agentic_format_overrides_through_the_developer_preamble():
    user = [{"role": "user", "content": "hi"}]
    built_in = render_prompt(user, tools=[])
    assert render_prompt(user, tools=[], mode="conversational", safety="contextual") == built_in
    prompt = render_prompt(user, tools=[], mode="instruct", safety="strict")
    developer = prompt.split("# Developer Preamble\n", 1)[1]
    assert preambles()["safety_strict"] in developer
    assert "- Do not use Markdown-specific formatting" in developer
    assert "- Your name is Command." not in developer  # unchanged rules are not repeated


def test_bad_mode():
    with pytest.raises(TemplateError, match="unknown mode"):
        render_prompt([{"role": "user", "content": "hi"}], mode="pirate")
    with pytest.raises(TemplateError, match="unknown safety"):
        preamble(safety="off")


# -- r7b render ----------------------------------------------------------------------------


def write_inputs(tmp_path: Path, row: dict) -> Path:
    path = tmp_path / f"{row['id']}.json"
    path.write_text(json.dumps(row["inputs"], ensure_ascii=False), encoding="utf-8")
    return path


@pytest.mark.parametrize("row", GOLDEN, ids=row_id)
def test_cli_render(tmp_path, capsysbinary, row):
    code = main(["render", str(write_inputs(tmp_path, row)), "--template", row["template"]])
    out, err = capsysbinary.readouterr()
    if row["error"]:
        assert code == 1 and out == b""
        assert err.startswith(b"r7b render: error: ") and err.count(b"\n") == 1
    else:
        assert code == 0 and out == row["expected"].encode("utf-8")


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "r7b.cli", "render", *args], input=stdin, capture_output=True,
                          timeout=60, cwd=ROOT)


def test_cli_subprocess_prints_exact_bytes(tmp_path):
    row = ROWS["tools_multi_step_agent__tool_use"]  # non-ASCII, tools, auto selection
    done = run_cli(str(write_inputs(tmp_path, row)))
    assert done.returncode == 0, done.stderr
    assert done.stdout == row["expected"].encode("utf-8")


@pytest.mark.parametrize("content, match", [
    (None, b"cannot read"),
    ("{not json", b"not valid JSON"),
    ("[1, 2]", b"must hold a JSON object"),
    ('{"tools": []}', b"'messages' list"),
    ('{"messages": []}', b"empty"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}', b"must alternate"),
])
def test_cli_bad_input(tmp_path, content, match):
    path = tmp_path / "input.json"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    args = [str(path)] + (["--template", "default"] if b"alternate" in match else [])
    done = run_cli(*args)
    assert done.returncode == 1
    assert done.stdout == b""
    assert done.stderr.startswith(b"r7b render: error: ") and done.stderr.count(b"\n") == 1
    assert match in done.stderr

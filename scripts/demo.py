"""`make demo`: the whole pipeline on the bundled stand-in model, explained as it runs.

Converts the Hugging Face snapshot in tests/fixtures/tiny-r7b to GGUF, quantizes it to 8 and 4
bits, then chats, runs one tool-use round and answers from documents with citations. The stand-in
is a 5M-parameter model trained on Jane Austen and two Bibles: expect its grammar, not its wisdom.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAND_IN = ROOT / "tests" / "fixtures" / "tiny-r7b"
OUT = ROOT / "build" / "demo"


def step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def show(result) -> None:
    if result.thinking:
        print(f"  thinking   : {result.thinking}")
    for call in result.tool_calls:
        print(f"  tool call  : {call['function']['name']}({call['function']['arguments']}) id={call['id']}")
    if result.text:
        print(f"  answer     : {result.text}")
    for c in result.citations:
        print(f"  citation   : {c.text!r} <- {c.sources}")
    u = result.usage
    print(f"  finish={result.finish_reason} prompt={u.prompt_tokens} (reused {u.cached_tokens}) "
          f"completion={u.completion_tokens}")


def main() -> int:
    from r7b.convert.convert import convert
    from r7b.convert.quantize import quantize
    from r7b.runtime.model import ChatSession, Model

    OUT.mkdir(parents=True, exist_ok=True)
    step(f"convert {STAND_IN.relative_to(ROOT)} (Hugging Face, bf16) -> GGUF F16")
    f16 = convert(str(STAND_IN), OUT / "tiny-r7b-F16.gguf", outtype="f16", force=True, progress=False)
    print(f"  {f16.relative_to(ROOT)}: {f16.stat().st_size / 1e6:.1f} MB")
    quants = {}
    for qtype in ("Q8_0", "Q4_K_M"):
        step(f"quantize -> {qtype} with llama.cpp's quantizer")
        quants[qtype] = quantize(f16, OUT / f"tiny-r7b-{qtype}.gguf", qtype, force=True, progress=False)
        print(f"  {quants[qtype].relative_to(ROOT)}: {quants[qtype].stat().st_size / 1e6:.1f} MB")

    model = Model.load(quants["Q8_0"], n_ctx=4096)
    step("chat (default template), two turns: the second reuses the first turn's KV cache")
    session = ChatSession(model, temperature=0.0, max_tokens=40)
    for text in ("Tell me about Mr. Darcy.", "And what of Elizabeth?"):
        print(f"  user       : {text}")
        show(session.send(text))

    step("tool use: the model plans and calls a tool; we run it and it answers")
    tools = [{"type": "function", "function": {
        "name": "search", "description": "Search the library for passages about a topic.",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}}]
    messages = [{"role": "user", "content": "What does the text say about marriage?"}]
    first = model.chat(messages, tools, temperature=0.0, max_tokens=80, constrain_tools=True)
    show(first)
    messages.append(first.message())
    for call in first.tool_calls:
        messages.append({"role": "tool", "tool_call_id": call["id"],
                         "content": {"text": "It is a truth universally acknowledged, that a single man in "
                                             "possession of a good fortune, must be in want of a wife."}})
    show(model.chat(messages, tools, temperature=0.0, max_tokens=60))

    step("grounded answer from documents, with citations")
    documents = [{"title": "Pride and Prejudice", "text": "Mr. Bennet was so odd a mixture of quick parts."},
                 {"title": "Emma", "text": "Emma Woodhouse, handsome, clever, and rich."}]
    show(model.chat([{"role": "user", "content": "Who was handsome, clever, and rich?"}],
                    documents=documents, temperature=0.0, max_tokens=60))
    model.close()
    print("\nDone. Files are in", OUT.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())

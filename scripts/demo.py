"""`make demo`: the whole pipeline on the bundled stand-in model, explained as it runs (well under 2 minutes).

Converts the Hugging Face snapshot in tests/fixtures/tiny-r7b to GGUF, quantizes it to 8 and 4
bits, then chats, runs one tool-use round, answers from documents with citations, measures what
quantization cost (KL divergence against the F16 file) and says how to serve the model. The
stand-in is a 5M-parameter model trained on Jane Austen and two Bibles: expect its grammar, not
its wisdom.

Sampling. Greedy, the stand-in loops ("I am sure I am sure ..."). The chat settings below were
picked by the fraction of repeated word 3-grams in the answer (0: none; a loop is near 1), over
5 questions x 4 seeds x 160 tokens on the Q8_0 file (greedy: one run per question):
    greedy                                   0.83  (5 of 5 answers loop)
    greedy + repeat_penalty 1.3              0.02
    greedy + frequency/presence 0.5          0.04
    greedy + DRY 0.8                         0.18  (2 of 5 loop)
    temperature 0.7, top_p 0.9               0.003
    temperature 0.7, min_p 0.1               0.025
    temperature 0.5, top_p 0.9, repeat_penalty 1.2, DRY 0.8   0.001, 17 of 20 end on their own
The last is what the demo uses: low temperature for the most coherent text, the penalties (in
llama.cpp's sampler chain, as llama-server has them) to keep it out of loops.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAND_IN = ROOT / "tests" / "fixtures" / "tiny-r7b"
HELD_OUT = ROOT / "tests" / "fixtures" / "held-out" / "en.txt"
OUT = ROOT / "build" / "demo"
# Seed 12: the stand-in often drifts from prose into Command R7B's action markup (a tool call nobody
# offered); with this seed both chat answers stay prose. Other seeds show the drift, not loops.
CHAT = {"temperature": 0.5, "top_p": 0.9, "repeat_penalty": 1.2, "dry_multiplier": 0.8, "seed": 12}
# The citation markup Command R7B writes, `<co>span</co: 0:[doc]>`, as a grammar for the whole response.
CITATION_GRAMMAR = r'''root ::= "<|START_RESPONSE|>" lead "<co>" span "</co: 0:[" [01] "]>" tail "<|END_RESPONSE|>"
lead ::= [^<]{0,40}
span ::= [^<]{1,60}
tail ::= [^<]{0,40}'''


def repeated_trigrams(text: str) -> float:
    """Fraction of the word 3-grams that repeat an earlier one: 0 for fresh text, near 1 for a loop."""
    words = text.split()
    grams = [tuple(words[i:i + 3]) for i in range(len(words) - 2)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def show(result, measure: bool = False) -> None:
    if result.thinking:
        print(f"  thinking   : {result.thinking}")
    for call in result.tool_calls:
        print(f"  tool call  : {call['function']['name']}({call['function']['arguments']}) id={call['id']}")
    if result.text:
        print(f"  answer     : {result.text}")
    u = result.usage
    extra = f" repeated 3-grams={repeated_trigrams(result.text):.2f}" if measure else ""
    print(f"  finish={result.finish_reason} prompt={u.prompt_tokens} (reused {u.cached_tokens}) "
          f"completion={u.completion_tokens}{extra}")


def mb(path: Path) -> str:
    return f"{path.stat().st_size / 2**20:.1f} MiB"


def main() -> int:
    from r7b.convert.convert import convert
    from r7b.convert.quantize import quantize
    from r7b.quality.eval import evaluate
    from r7b.quality.report import markdown_table
    from r7b.quality.results import file_info
    from r7b.runtime.model import ChatSession, Model

    started = time.monotonic()
    OUT.mkdir(parents=True, exist_ok=True)
    step(f"convert {STAND_IN.relative_to(ROOT)} (Hugging Face, bf16) -> GGUF F16")
    f16 = convert(str(STAND_IN), OUT / "tiny-r7b-F16.gguf", outtype="f16", force=True, progress=False)
    print(f"  {f16.relative_to(ROOT)}: {mb(f16)}")
    quants = {}
    for qtype in ("Q8_0", "Q4_K_M"):
        step(f"quantize -> {qtype} with llama.cpp's quantizer")
        quants[qtype] = quantize(f16, OUT / f"tiny-r7b-{qtype}.gguf", qtype, force=True, progress=False)
        size = quants[qtype].stat().st_size
        print(f"  {quants[qtype].relative_to(ROOT)}: {mb(quants[qtype])} ({size / f16.stat().st_size:.0%} of F16)")

    model = Model.load(quants["Q8_0"], n_ctx=4096)
    step("chat, two turns: the second reuses the first turn's KV cache")
    print(f"  sampling   : {CHAT}")
    session = ChatSession(model, max_tokens=60, **CHAT)
    for text in ("Tell me about Mr. Darcy.", "And what of Elizabeth?"):
        print(f"  user       : {text}")
        show(session.send(text), measure=True)
    greedy = model.chat([{"role": "user", "content": "Tell me about Mr. Darcy."}], temperature=0.0, max_tokens=80)
    print(f"  (greedy, the first question loops: repeated 3-grams={repeated_trigrams(greedy.text):.2f}, "
          f"{greedy.text[:60]!r}...)")

    step("tool use: the model plans and calls a tool; we run it and it answers")
    tools = [{"type": "function", "function": {
        "name": "search", "description": "Search the library for passages about a topic.",
        "parameters": {"type": "object", "properties": {"query": {"type": "string", "maxLength": 40}},
                       "required": ["query"]}}}]
    messages = [{"role": "user", "content": "What does the text say about marriage?"}]
    # constrain_tools: a grammar holds any call to the tools' schemas (the stand-in needs the help)
    first = model.chat(messages, tools, temperature=0.0, max_tokens=120, constrain_tools=True)
    show(first)
    messages.append(first.message())
    for call in first.tool_calls:
        messages.append({"role": "tool", "tool_call_id": call["id"],
                         "content": {"text": "It is a truth universally acknowledged, that a single man in "
                                             "possession of a good fortune, must be in want of a wife."}})
    # tool_choice="none": answer from the result now (a grammar rules out another call)
    show(model.chat(messages, tools, max_tokens=80, tool_choice="none", **CHAT), measure=True)

    step("grounded answer from documents; citations come back as structured data")
    documents = [{"title": "Pride and Prejudice", "text": "Mr. Bennet was so odd a mixture of quick parts."},
                 {"title": "Emma", "text": "Emma Woodhouse, handsome, clever, and rich."}]
    question = [{"role": "user", "content": "Who was handsome, clever, and rich?"}]
    grounded = model.chat(question, documents=documents, max_tokens=80, **CHAT)
    show(grounded)
    if grounded.citations:
        print("  citations  :", json.dumps([c.to_dict() for c in grounded.citations]))
    else:
        print(f"  The stand-in wrote no citation. It has seen Command R7B's <co>span</co: 0:[i]> markup but does\n"
              f"  not write it well-formed (its raw output: {grounded.raw[:70]!r}...); Command R7B\n"
              f"  does. To show what a citation returns, the same question with a grammar holding the answer to\n"
              f"  that markup:")
        forced = model.chat(question, documents=documents, max_tokens=80, grammar=CITATION_GRAMMAR, **CHAT)
        show(forced)
        print("  citations  :", json.dumps([c.to_dict() for c in forced.citations]))
        print("  (start/end index the answer text; sources name the document: tool_call_id '0' is the\n"
              "   request's documents, index the document's position)")
    name = model.engine.metadata("general.name") or quants["Q8_0"].stem  # what `r7b serve` calls it
    model.close()

    step("what quantization cost: each file against the F16 one on held-out text (KL divergence)")
    text = HELD_OUT.read_text(encoding="utf-8")[:20000]
    results = evaluate(f16, list(quants.values()), text, ctx=256, chunks=4)
    print(markdown_table(results, file_info(f16)))
    print("  Mean KLD: how far each file's next-token distribution is from F16's (0 = the same);\n"
          "  Same top: how often both pick the same likeliest token. `r7b eval` runs the full comparison.")

    step("serve it to the openai and cohere clients")
    served = quants["Q8_0"].relative_to(ROOT)
    print(f"  .venv/bin/r7b serve {served}          # http://127.0.0.1:8000, loopback only without --api-key")
    print('  openai: OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")'
          f'.chat.completions.create(model="{name}", messages=[...])')
    print('  cohere: cohere.ClientV2(base_url="http://127.0.0.1:8000", api_key="none")'
          f'.chat(model="{name}", messages=[...])')
    print(f"\nDone in {time.monotonic() - started:.0f} s. Files are in {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

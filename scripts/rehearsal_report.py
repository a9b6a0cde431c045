"""docs/rehearsal.md from the rehearsal's results.json: steps, memory predictions, speed, serving, eval."""

from __future__ import annotations

from pathlib import Path

from r7b.fsutil import atomic_output

GIB, MIB = 1024**3, 1024**2
GOAL_RSS = 1.5 * GIB
QUALITY_CTX = 512


def _gib(n: float | None) -> str:
    return "-" if n is None else f"{n / GIB:.2f} GiB"


def _err(pred: float, meas: float) -> str:
    return f"{100 * (pred - meas) / meas:+.1f} %" if meas else "-"


def header(res: dict) -> list[str]:
    m, bw = res.get("machine", {}), res.get("bandwidth") or {}
    size = "scaled-down (`--small`: 4 layers, hidden 256, real vocabulary)" if res.get("small") else \
        "Command R7B's full size (8.03 B parameters)"
    lines = ["# Full-size rehearsal", "",
             "`make rehearsal` (scripts/rehearsal.py) builds a random-weights checkpoint of " + size + " with the real "
             "tokenizer, bf16 safetensors in shards of at most 5 GB, and runs every step a user runs, each in its "
             "own process. Peak RSS is the kernel's high-water mark (VmHWM), or the sampled sum over the step's "
             "process tree where larger; anonymous RSS (RssAnon) leaves out file-backed pages such as "
             "memory-mapped weights, which the kernel can drop. Disk is the size of what the step wrote and kept; "
             "the work folder's peak is sampled each second.", "",
             f"Run {res.get('started', '?')} to {res.get('finished', '?')}, budget {res.get('budget_min')} min.", "",
             "## Machine", "",
             f"- CPU: {m.get('cpu', '?')}, {m.get('cores')} cores; flags {m.get('flags', '?')}"
             + (f" (no {m['no_flags']})" if m.get("no_flags") else ""),
             f"- RAM: {_gib(m.get('ram'))}; kernel {m.get('kernel')}",
             f"- Read bandwidth: {bw.get('read_gbs', '?')} GB/s ({bw.get('threads')} threads, numpy sums over "
             f"{(bw.get('bytes_per_thread') or 0) / GIB:.0f} GiB each)",
             f"- Free disk at the start: {(res.get('disk_free') or 0) / 1e9:.1f} GB; the run needs "
             f"{(res.get('disk_need') or 0) / 1e9:.1f} GB at its largest (checked before starting)",
             "- Shared machine: other workers were compiling and running tests at the same time, so times are "
             "upper bounds. Processes by CPU share over their lifetime (ps %CPU, RSS KiB, name) at the start: "
             + "; ".join(res.get("busy", [])[:5]) + ". At the end: " + "; ".join(res.get("busy_end", [])[:5]) + ".",
             "- Load average (1, 5, 15 min) before and after each step is in the table.",
             *[f"- {note}" for note in res.get("notes", [])], ""]
    for what in res.get("reruns", []):
        lines += [f"Steps marked ({what}) ran again after the first run, with that fix to the code, on a checkpoint "
                  "generated the same way; the first run's figures stay in the table for comparison.", ""]
    return lines


def steps_table(res: dict) -> list[str]:
    lines = ["## Steps", "", "| Step | Wall | Throughput | Peak RSS | Peak anon RSS | Disk written | Work folder peak "
             "| Load before / after | rc |", "| --- | ---: | --- | ---: | ---: | ---: | ---: | --- | ---: |"]
    for s in res.get("steps", []):
        lines.append(f"| {s['name']} | {s['wall_s']:.1f} s | {s['throughput']} | {_gib(s['peak_rss'])} | "
                     f"{_gib(s['peak_anon'])} | {s['outputs'] / 1e9:.2f} GB | {s['disk_peak'] / 1e9:.1f} GB | "
                     f"{s['load_before']} / {s['load_after']} | {s['rc']} |")
    lines += ["", "Commands, in order:", "", "```"] + [s["command"] for s in res.get("steps", [])] + ["```", ""]
    return lines


def goals(res: dict) -> list[str]:
    lines = ["## Goals", ""]
    for s in res.get("steps", []):
        if s["name"].startswith(("convert", "quantize ")) and "--list" not in s["name"]:
            ok = "holds" if s["peak_rss"] <= GOAL_RSS else "MISSED"
            why = "; anonymous memory within it, the rest is the input's mapped pages" \
                if s["peak_rss"] > GOAL_RSS >= s["peak_anon"] else ""
            lines.append(f"- {s['name']}: peak RSS {_gib(s['peak_rss'])} (anon {_gib(s['peak_anon'])}): "
                         f"goal ≤ 1.5 GiB {ok}{why}")
    return lines + [*prediction_goals(res), ""]


def prediction_goals(res: dict) -> list[str]:
    """How many memory predictions land within 10% of llama.cpp's allocation."""
    pred, rows = res.get("predicted_parts", {}), []
    for model, allocs in res.get("alloc", {}).items():
        for a in allocs or []:
            p = pred.get(model, {}).get(f"{a['n_ctx']}/{a['flash_attn']}")
            if p:
                repack = a.get("repack_mib", p["repacked"] / MIB)
                total = (a["model_mib"] + repack + a["kv_mib"] + a["compute_mib"] + a["output_mib"] + 128) * MIB
                rows.append((abs(p["total"] - total) / total, abs(p["list_total"] - total) / total))
    if not rows:
        return []
    return [f"- Memory predictions within 10% of llama.cpp's allocation: {sum(a <= 0.1 for a, _ in rows)} of "
            f"{len(rows)} with the repacked copy (largest error {100 * max(a for a, _ in rows):.1f} %), "
            f"{sum(b <= 0.1 for _, b in rows)} of {len(rows)} as `--list` prints them today; against measured RSS "
            "see the next section."]


def memory_section(res: dict) -> list[str]:
    pred, alloc = res.get("predicted_parts", {}), res.get("alloc", {})
    if not pred:
        return ["## Memory: prediction against measurement", "", "Not measured (see Not done).", ""]
    lines = ["## Memory: prediction against measurement", "",
             "- **--list**: what `r7b quantize --list` predicts (r7b/memory.py): weights + KV cache + compute "
             "buffer (for the attention path) + 128 MiB runtime.",
             "- **+ repack**: the same plus the copy llama.cpp's CPU backend makes of the weights it repacks on "
             "this CPU (`repacked_bytes`; Q4_K with AVX2), which --list does not count yet.",
             "- **llama.cpp**: the buffers it logs for the context (mapped model, repacked model, KV, compute, "
             "output) + 128 MiB, with the runtime's settings (512-token batches, small sliding-window cache).",
             "- **generate RSS**: peak RSS (anonymous RSS) of `r7b generate` with a short prompt at that context.",
             "",
             "| Model | Context | Flash attn | KV predicted / llama.cpp | Compute predicted / llama.cpp | --list "
             "| + repack | llama.cpp | + repack vs llama.cpp | generate RSS (anon) | --list vs RSS | + repack vs RSS |",
             "| --- | ---: | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    rss = {(s["extra"].get("model"), s["extra"].get("n_ctx")): s for s in res.get("steps", [])
           if s["name"].startswith("generate")}
    for model, rows in alloc.items():
        for row in rows or []:
            p = pred.get(model, {}).get(f"{row['n_ctx']}/{row['flash_attn']}")
            if not p:
                continue
            repack = row.get("repack_mib", p["repacked"] / MIB)
            total = (row["model_mib"] + repack + row["kv_mib"] + row["compute_mib"] + row["output_mib"] + 128) * MIB
            g = rss.get((model, row["n_ctx"])) if row["flash_attn"] == res.get("flash_attn", "off") else None
            measured = f"{_gib(g['peak_rss'])} ({_gib(g['peak_anon'])})" if g else "-"
            lines.append(f"| {model} | {row['n_ctx']} | {row['flash_attn']} | {_gib(p['kv'])} / "
                         f"{_gib(row['kv_mib'] * MIB)} | {_gib(p['compute'])} / "
                         f"{_gib((row['compute_mib'] + row['output_mib']) * MIB)} | {_gib(p['list_total'])} | "
                         f"{_gib(p['total'])} | {_gib(total)} | {_err(p['total'], total)} | {measured} | "
                         f"{_err(p['list_total'], g['peak_rss']) if g else '-'} | "
                         f"{_err(p['total'], g['peak_rss']) if g else '-'} |")
    lines += ["", "The runtime's attention path on this CPU is flash attention "
              f"**{res.get('flash_attn', '?')}** (\"auto\"); rows with the other path are llama.cpp's allocation "
              "only. A generate with a short prompt touches only the part of the compute buffer its batch uses, "
              "while the prediction and llama.cpp's figure are for a full 512-token batch at full depth: without "
              "flash attention that is 2.1 GiB at 32K and 8.3 GiB at 128K, which a short prompt never touches.", ""]
    fb = res.get("full_batch")
    p = pred.get("Q4_K_M", {}).get(f"{fb['n_ctx']}/{fb['flash_attn']}") if fb else None
    if fb and p:
        after = fb["rss_after"]
        lines += [f"The worst case itself, measured: Q4_K_M with a {fb['n_ctx']}-token context whose cache was filled "
                  f"to {fb['depth']} cells (replicated, see Speed) and then a real 512-token batch "
                  f"({fb['prefill_s']} s): RSS after the batch {_gib(after['VmRSS'])} (anon {_gib(after['RssAnon'])}, "
                  f"file {_gib(after['RssFile'])}); predicted with the repacked copy {_gib(p['total'])} "
                  f"({_err(p['total'], after['VmRSS'])}), --list {_gib(p['list_total'])} "
                  f"({_err(p['list_total'], after['VmRSS'])}).", ""]
    return lines


def speed_section(res: dict) -> list[str]:
    sp = res.get("speed", {})
    if not sp:
        return ["## Speed", "", "Not measured (see Not done).", ""]
    bw = (res.get("bandwidth") or {}).get("read_gbs")
    sizes = res.get("actual_size", {})
    lines = ["## Speed at depth", "",
             "Prefill of a 512-token batch and decode (16 tokens, one at a time) with the runtime's threads and "
             f"attention path (flash attention {res.get('flash_attn')}). Depth 0 is a real prefill. Deeper depths "
             "were reached without prefilling them: the 512 cells of the real prefill were taken with "
             "`llama_state_seq_get_data`, replicated to positions 0..depth-1 in the global layers' cache and to "
             "the last 4,096 of those positions in the sliding-window cache (what it keeps after a real fill), and "
             "loaded with `llama_state_seq_set_data`. llama.cpp's graph depends only on the cells present, so the "
             "work per token is that of a filled cache; the values (random weights) mean nothing either way.", "",
             "| Model | Depth | Prefill tok/s | Decode tok/s | Decode x weights | of read bandwidth |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for model, rows in sp.items():
        for row in rows:
            eff = row["decode_tps"] * sizes.get(model, 0) / 1e9
            share = f"{100 * eff / bw:.0f} %" if bw else "-"
            lines.append(f"| {model} | {row['depth']} | {row['prefill_tps']:.2f} | {row['decode_tps']:.2f} | "
                         f"{eff:.1f} GB/s | {share} |")
    return lines + [""]


def serve_section(res: dict) -> list[str]:
    s = next((s for s in res.get("steps", []) if s["name"] == "serve"), None)
    if not s:
        return ["## Serving", "", "Not measured (see Not done).", ""]
    e = s["extra"]
    return ["## Serving", "", f"`{s['command']}`, Q4_K_M, one token asked for (`max_tokens: 1`): the wall time "
            "of the request is the time to first token.", "",
            f"- ready (model loaded, /health answers): {e.get('ready_s')} s",
            f"- first turn, {e.get('prompt_tokens_first')} prompt tokens with 4 documents: {e.get('ttft_first_s')} s",
            f"- follow-up turn, {e.get('prompt_tokens_follow')} prompt tokens: {e.get('ttft_follow_s')} s",
            f"- server peak RSS {_gib(s['peak_rss'])}, anon {_gib(s['peak_anon'])}", ""]


def eval_section(res: dict) -> list[str]:
    s = next((s for s in res.get("steps", []) if s["name"] == "eval"), None)
    if not s:
        return ["## Eval", "", "Not measured (see Not done).", ""]
    e = s["extra"]
    per_token = e["ref_bytes"] / e["scored"] if e.get("scored") else 0
    lines = ["## Eval", "", f"`r7b eval` of Q4_K_M against F16: {e['chunks']} chunks of {e['ctx']} tokens, "
             f"{e['scored']} tokens scored, {s['wall_s']:.0f} s ({s['throughput']}).",
             f"Reference file: {e['ref_bytes'] / MIB:.1f} MiB, {per_token / 1024:.1f} KiB per scored token.", ""]
    for path, n in (e.get("quality_tokens") or {}).items():
        half = n // 2
        scored = (half // QUALITY_CTX) * (QUALITY_CTX // 2 - 1)
        lines.append(f"- docs/quality.md's text, first half of `{Path(path).name}`: {half} tokens with the real "
                     f"vocabulary, {scored} scored at ctx {QUALITY_CTX}: reference file about "
                     f"{scored * per_token / 1e9:.2f} GB")
    return lines + [""]


def skipped(res: dict) -> list[str]:
    rows = res.get("skipped", [])
    return ["## Not done", ""] + ([f"- {r['name']}: {r['why']}" for r in rows] or ["- Nothing: every step ran."]) + [""]


def render(res: dict) -> str:
    parts = (header, steps_table, goals, memory_section, speed_section, serve_section, eval_section, skipped)
    return "\n".join(line for part in parts for line in part(res))


def write(res: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path, force=True) as tmp:
        Path(tmp).write_text(render(res), encoding="utf-8")

"""Run r7b-edge's benchmarks and write docs/benchmarks.md with its plots (`make bench`).

Speed against bare llama.cpp on the stand-in and on a synthetic half-billion-parameter Cohere2
(Q8_0, Q4_K_M, Q4_0, built here with `r7b convert` and `r7b quantize`), decode against the
machine's memory bandwidth, scaling with context depth and prompt length, KV-cache memory
with the small and the full sliding-window cache, time to first token in a long chat with and
without prefix reuse, and the memory and throughput of conversion at two model sizes. Beside
llama.cpp's own tools (`make peers`): flash attention × KV cache type × depth with llama-bench and
`r7b bench`, the attention-score buffer, quantize/imatrix/eval against llama-quantize,
llama-imatrix and llama-perplexity (scripts/peer_bench.py), and `r7b serve` against llama-server
under concurrent clients (scripts/serve_bench.py).

    .venv/bin/python scripts/bench_report.py           # about 45-60 minutes on 2 cores (depth 16K dominates)
    .venv/bin/python scripts/bench_report.py --quick   # every step, small sizes, ~5 minutes on a quiet machine
    .venv/bin/python scripts/bench_report.py --render  # rewrite the report from the last run's data
"""

from __future__ import annotations

import argparse
import os
import pickle
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

import peer_bench  # noqa: E402
import serve_bench  # noqa: E402
import synthetic_model  # noqa: E402

from r7b.quality import bench  # noqa: E402
from r7b.cohere2 import COMMAND_R7B  # noqa: E402
from r7b.fsutil import atomic_output  # noqa: E402
from r7b.memory import GIB, MIB, format_bytes, kv_cache_bytes, pad  # noqa: E402
from r7b.quality.report import log, machine, md_table  # noqa: E402

QUANTS = ("Q8_0", "Q4_K_M", "Q4_0")
KV_CONTEXTS = (4096, 32768, 131072)


@dataclass(frozen=True)
class Plan:
    """How much to run: the full report, or --quick to try every step."""

    layers: tuple[int, int]  # synthetic model sizes: the benchmarked one, and a smaller one for conversion
    prompt: int
    gen: int
    repeat: int
    stand_in_repeat: int  # the stand-in runs in milliseconds: more repeats cost nothing
    pp_lengths: tuple[int, ...]
    depths: tuple[int, ...]
    depth_gen: int
    kv_measured: tuple[int, ...]
    turns: int
    turn_tokens: int
    reply_tokens: int
    bandwidth_bytes: int


FULL = Plan(layers=(16, 8), prompt=512, gen=128, repeat=7, stand_in_repeat=30, pp_lengths=(128, 512, 2048),
            depths=(0, 2048, 8192), depth_gen=32, kv_measured=(4096, 32768), turns=8, turn_tokens=200,
            reply_tokens=16, bandwidth_bytes=1 << 30)
QUICK = Plan(layers=(4, 2), prompt=128, gen=32, repeat=2, stand_in_repeat=3, pp_lengths=(64, 256), depths=(0, 512),
             depth_gen=8, kv_measured=(4096,), turns=3, turn_tokens=60, reply_tokens=4, bandwidth_bytes=1 << 28)


class BusyMeter:
    """CPU time other processes took while a section ran, in cores (the VM is shared)."""

    def __enter__(self) -> "BusyMeter":
        self._busy0, self._ours0, self._t0 = bench.cpu_busy_seconds(), _our_cpu_seconds(), time.monotonic()
        return self

    def __exit__(self, *exc: Any) -> None:
        wall = time.monotonic() - self._t0
        others = (bench.cpu_busy_seconds() - self._busy0) - (_our_cpu_seconds() - self._ours0)
        self.cores = max(0.0, others / wall) if wall > 0 else 0.0
        self.wall_s = wall


def f16_path(work: Path, plan: Plan) -> Path:
    """The benchmarked synthetic model's F16 file, which build_models keeps."""
    return work / f"synth-{plan.layers[0]}l-F16.gguf"


def _our_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


# -- building and converting the synthetic model -----------------------------------------------------

@dataclass
class ProcStats:
    wall_s: float
    peak_rss: int
    peak_anon: int


def measure_process(cmd: Sequence[str]) -> ProcStats:
    """Run a command; its peak RSS and peak anonymous RSS, read from /proc every 10 ms.

    wait4's ru_maxrss would not do: Linux carries the parent's high-water mark into the child
    through exec. The exec'd program's VmHWM is its own and only grows, so the last reading
    before exit is its peak (to within the sampling interval).
    """
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = {"VmHWM": 0, "RssAnon": 0}
    while proc.poll() is None:
        for key, value in _proc_status(proc.pid, peak).items():
            peak[key] = max(peak[key], value)
        time.sleep(0.01)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {err.strip().splitlines()[-1:]}")
    return ProcStats(wall, peak["VmHWM"], peak["RssAnon"])


def _proc_status(pid: int, keys: Any) -> dict[str, int]:
    """Selected kB fields of /proc/PID/status, in bytes; empty once the process is gone."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                if key in keys:
                    out[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return out


def r7b_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "r7b.cli", *args]


def build_models(work: Path, plan: Plan) -> tuple[dict[str, Path], list[dict[str, Any]]]:
    """Synthetic checkpoints at two sizes, converted and quantized while measured.

    Keeps the big model's quantized files; everything else is deleted once measured.
    """
    models: dict[str, Path] = {}
    rows = []
    for layers in plan.layers:
        snap = work / f"synth-{layers}l"
        cfg = synthetic_model.config(layers=layers)
        synthetic_model.write_snapshot(snap, cfg)
        src_bytes = (snap / "model.safetensors").stat().st_size
        f16 = work / f"synth-{layers}l-F16.gguf"
        stats = measure_process(r7b_cmd("convert", str(snap), "-o", str(f16), "--outtype", "f16", "-q", "--force"))
        rows.append(_conv_row(layers, cfg, "convert → F16", src_bytes, stats))
        for q in QUANTS if layers == plan.layers[0] else ("Q8_0", "Q4_K_M"):
            out = work / f"synth-{layers}l-{q}.gguf"
            stats = measure_process(r7b_cmd("quantize", str(f16), str(out), "--type", q, "-q", "--force"))
            rows.append(_conv_row(layers, cfg, f"quantize → {q}", f16.stat().st_size, stats))
            if layers == plan.layers[0]:
                models[q] = out
            else:
                out.unlink()
        if layers != plan.layers[0]:
            f16.unlink()  # the benchmarked model's F16 stays, for the comparisons with llama.cpp's tools
        shutil.rmtree(snap)
        log(f"built and measured the {layers}-layer model")
    return models, rows


def _conv_row(layers: int, cfg: dict, step: str, read_bytes: int, stats: ProcStats) -> dict[str, Any]:
    return {"layers": layers, "params": synthetic_model.n_params(cfg), "step": step, "read_bytes": read_bytes,
            "wall_s": stats.wall_s, "mb_s": read_bytes / stats.wall_s / 1e6, "peak_rss": stats.peak_rss,
            "peak_anon": stats.peak_anon}


# -- measurements -------------------------------------------------------------------------------------

def speed(models: dict[str, Path], plan: Plan) -> list[bench.BenchResult]:
    out = []
    for name, path in models.items():
        repeat = plan.stand_in_repeat if name == "stand-in" else plan.repeat
        out.append(bench.compare(path, prompt_tokens=plan.prompt, gen_tokens=plan.gen, repeat=repeat))
        log(f"r7b vs raw: {name} done")
    return out


def scaling(path: Path, plan: Plan, threads: int) -> dict[str, list[tuple[int, float]]]:
    """Prefill speed by prompt length and decode speed by depth, through the project's engine."""
    top = max(max(plan.depths), max(plan.pp_lengths))
    tokens = bench.random_prompt(path, top)
    settings = bench.BenchSettings(n_ctx=pad(top + plan.depth_gen), n_threads=threads)
    with bench.llama_log():
        loop = bench.R7bLoop(path, settings)
        try:
            loop.run(tokens[:16], 4, time.perf_counter)  # warm-up
            pp = [(n, _median(lambda: bench.run_once(loop, tokens[:n], 1, time.perf_counter)["pp_tps"], 2))
                  for n in plan.pp_lengths]
            tg = [(d, bench.run_once(loop, tokens[:max(d, 1)], plan.depth_gen, time.perf_counter)["tg_tps"])
                  for d in plan.depths]
        finally:
            loop.close()
    read = {d: bench.model_info(path, d + plan.depth_gen // 2).bytes_per_token for d in plan.depths}
    return {"pp": pp, "tg": tg, "bytes_per_token": read}


def _median(fn: Callable[[], float], n: int) -> float:
    import statistics

    return statistics.median(fn() for _ in range(n))


def kv_memory(path: Path, plan: Plan) -> dict[str, Any]:
    """KV bytes by context length: computed for the synthetic model and Command R7B, measured where it fits."""
    shape = bench.model_shape(path)
    computed = {}
    for label, s in (("synthetic", shape), ("Command R7B", COMMAND_R7B)):
        for full in (False, True):
            computed[(label, full)] = [kv_cache_bytes(s.n_layers, s.n_kv_heads, s.head_dim, n, s.sliding_window,
                                                      swa_full=full) for n in KV_CONTEXTS]
    measured = {}
    from r7b.runtime.engine import Engine, EngineConfig

    for n in plan.kv_measured:
        for full in (False, True):
            with bench.llama_log() as lines:
                Engine(path, EngineConfig(n_ctx=n, n_threads=1, swa_full=full)).close()
            measured[(n, full)] = bench.kv_bytes_from_log(lines)
    return {"shape": shape, "computed": computed, "measured": measured}


def multi_turn(path: Path, plan: Plan, threads: int) -> list[dict[str, float]]:
    """TTFT of each turn of one conversation, with prefix reuse and with the cache cleared before each turn.

    Two models take the turns in alternation, so drift hits both. The no-reuse side replays the
    reuse side's conversation (same messages, same replies), so both evaluate the same prompts.
    """
    from r7b.runtime.model import ChatSession, Model

    n_ctx = pad(plan.turns * (plan.turn_tokens + plan.reply_tokens + 64) + 512)
    with bench.llama_log():
        reuse, fresh = (Model.load(path, n_ctx=n_ctx, n_threads=threads, check_memory=False) for _ in range(2))
    session = ChatSession(reuse, max_tokens=plan.reply_tokens, temperature=0.0)
    rows = []
    try:
        for model in (reuse, fresh):  # first decode of a context pays one-off set-up costs
            model.chat([{"role": "user", "content": "Hello."}], max_tokens=2, temperature=0.0)
            model.engine.reset()
        for text in user_messages(reuse, plan.turns, plan.turn_tokens):
            a = _timed_turn(reuse, lambda: session.send(text, stream=True))
            history = session.messages[:-1]
            fresh.engine.reset()
            b = _timed_turn(fresh, lambda: _replay(fresh, history, plan.reply_tokens))
            rows.append({"turn": len(rows) + 1, "prompt_tokens": a["prompt_tokens"], "reuse_eval": a["evaluated"],
                         "reuse_ttft": a["ttft"], "fresh_eval": b["evaluated"], "fresh_ttft": b["ttft"]})
    finally:
        reuse.close()
        fresh.close()
    return rows


def _replay(model: Any, history: list[dict], max_tokens: int) -> Any:
    """Generate the next assistant turn of `history` (which ends with the user's message)."""
    from r7b.runtime.model import ChatSession

    session = ChatSession(model, max_tokens=max_tokens, temperature=0.0)
    session.messages = list(history)
    return session.send(None, stream=True)


def _timed_turn(model: Any, start: Callable[[], Any]) -> dict[str, float]:
    from r7b.runtime.model import Done

    with bench.token_clock(model.engine, time.perf_counter) as marks:
        t0 = time.perf_counter()
        result = next(e.result for e in start() if isinstance(e, Done))
    return {"ttft": marks[-1] - t0, "prompt_tokens": result.usage.prompt_tokens,
            "evaluated": result.usage.prompt_tokens - result.usage.cached_tokens}


def user_messages(model: Any, turns: int, tokens: int) -> list[str]:
    """Consecutive passages of held-out English, each about `tokens` tokens long."""
    words = (ROOT / "tests" / "fixtures" / "held-out" / "en.txt").read_text(encoding="utf-8").split()
    out, start = [], 0
    for _ in range(turns):
        end = start + tokens // 2
        while end < len(words) and len(model.engine.tokenize(" ".join(words[start:end]), special=False)) < tokens:
            end += 8
        out.append(" ".join(words[start:end]))
        start = end
    return out


# -- plots ----------------------------------------------------------------------------------------------

def plot_all(out: Path, data: dict[str, Any]) -> list[str]:
    """Write the PNGs beside the report; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    for name, draw in (("bench-ratio.png", _plot_ratio), ("bench-scaling.png", _plot_scaling),
                       ("bench-kv.png", _plot_kv), ("bench-ttft.png", _plot_ttft)):
        if draw.__name__.removeprefix("_plot_") not in data and not (name == "bench-ratio.png" and data.get("speed")):
            continue
        fig = draw(plt, data)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        names.append(name)
    return names


def _plot_ratio(plt: Any, data: dict[str, Any]) -> Any:
    results = data["speed"]
    series = {"prefill": [r.ratio["pp_tps"] for r in results], "decode": [r.ratio["tg_tps"] for r in results],
              "decode via chat": [r.ratio.get("chat_tg_tps", 0) for r in results]}
    fig, ax = plt.subplots(figsize=(7, 3.2))
    width = 0.27
    for i, (name, vals) in enumerate(series.items()):
        ax.bar([x + (i - 1) * width for x in range(len(results))], vals, width, label=name)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.axhline(0.97, color="grey", lw=0.8, ls="--")
    ax.set_xticks(range(len(results)), [_model_label(r) for r in results])
    values = [v for vals in series.values() for v in vals if v]
    ax.set_ylim(min(0.85, min(values) - 0.03), max(1.08, max(values) + 0.03))
    ax.set_ylabel("r7b / raw llama.cpp (median)")
    ax.legend(fontsize=8, loc="lower right")
    return fig


def _plot_scaling(plt: Any, data: dict[str, Any]) -> Any:
    sc = data["scaling"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(8, 3.2))
    a.plot(*zip(*sc["pp"]), marker="o")
    a.set_xscale("log", base=2)
    a.set_xticks([n for n, _ in sc["pp"]], [str(n) for n, _ in sc["pp"]])
    a.set_xlabel("prompt tokens")
    a.set_ylabel("prefill tokens/s")
    b.plot(*zip(*sc["tg"]), marker="o", color="C1")
    b.set_xlabel("tokens already in context")
    b.set_ylabel("decode tokens/s")
    for ax in (a, b):
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    return fig


def _plot_kv(plt: Any, data: dict[str, Any]) -> Any:
    kv = data["kv"]
    fig, ax = plt.subplots(figsize=(6, 3.4))
    colors = {"synthetic": "C0", "Command R7B": "C3"}
    for (label, full), values in kv["computed"].items():
        ax.plot(KV_CONTEXTS, [v / GIB for v in values], marker="o", ls="--" if full else "-", color=colors[label],
                label=f"{label}, {'full' if full else 'small'} SWA cache")
    measured = list(kv["measured"].items())
    ax.plot([n for (n, _), _ in measured], [v / GIB for _, v in measured], marker="x", color="black", ls="none",
            ms=9, label="allocated by llama.cpp (synthetic)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(KV_CONTEXTS, [f"{n // 1024}K" for n in KV_CONTEXTS])
    ax.set_xlabel("context tokens")
    ax.set_ylabel("KV cache, GiB (f16)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return fig


def _plot_ttft(plt: Any, data: dict[str, Any]) -> Any:
    rows = data["ttft"]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    turns = [r["turn"] for r in rows]
    ax.plot(turns, [r["fresh_ttft"] * 1e3 for r in rows], marker="o", label="cache cleared each turn")
    ax.plot(turns, [r["reuse_ttft"] * 1e3 for r in rows], marker="o", label="prefix reuse (ChatSession)")
    ax.set_xlabel("turn")
    ax.set_ylabel("time to first token, ms")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


# -- the report ------------------------------------------------------------------------------------------

def _model_label(r: bench.BenchResult) -> str:
    return "stand-in F16" if "tiny" in Path(r.model.path).name else "synthetic " + r.model.desc.split()[-1]


def _mib(n: float) -> str:
    return f"{n / MIB:.1f}"


def md_summary(data: dict[str, Any]) -> list[str]:
    """The headline figures against what the project aims for."""
    results = data["speed"]
    synth = [r for r in results if "tiny" not in Path(r.model.path).name]
    stand_in = [r for r in results if "tiny" in Path(r.model.path).name]
    limit = max(b["read_gbs"] for b in data["bandwidth"])

    def ratio_text(rs: list[bench.BenchResult]) -> str:
        return "; ".join(f"{_model_label(r).removeprefix('synthetic ')}: pp {r.ratio['pp_tps']:.3f}, "
                         f"tg {r.ratio['tg_tps']:.3f}" + (f", chat {r.ratio['chat_tg_tps']:.3f}" if r.chat else "")
                         for r in rs)

    rows = [("r7b/raw ≥ 0.97 on the synthetic model", ratio_text(synth)),
            ("r7b/raw ≥ 0.90 on the stand-in", ratio_text(stand_in)),
            (f"decode vs read bandwidth ({limit:.1f} GB/s)",
             ", ".join(f"{_model_label(r).removeprefix('synthetic ')} "
                       f"{bench.utilisation(r.decode_gbs['r7b'], limit):.0%}" for r in synth)
             + f" at tg{data['plan'].gen}" + _depth0_text(data, limit))]
    if "kv" in data:
        c = data["kv"]["computed"]
        rows.append(("KV cache at 32K, small vs full SWA cache",
                     f"Command R7B {format_bytes(c[('Command R7B', False)][1])} vs {format_bytes(c[('Command R7B', True)][1])}; "
                     f"synthetic {format_bytes(c[('synthetic', False)][1])} vs {format_bytes(c[('synthetic', True)][1])}"))
    if data.get("ttft"):
        last = data["ttft"][-1]
        rows.append((f"TTFT of turn {last['turn']} ({last['prompt_tokens']} prompt tokens)",
                     f"{last['reuse_ttft'] * 1e3:.0f} ms with prefix reuse, {last['fresh_ttft'] * 1e3:.0f} ms "
                     f"re-evaluating ({last['fresh_ttft'] / last['reuse_ttft']:.1f}×)"))
    if data.get("convert"):
        rows.append(("conversion peak RSS vs model size", _convert_text(data["convert"])))
    rows += _peer_summary(data)
    return ["## Summary", "", *md_table(("goal", "measured"), rows, "ll")]


def _peer_summary(data: dict[str, Any]) -> list[tuple[str, str]]:
    """Summary rows of the comparisons with llama.cpp's tools, where they ran."""
    rows = []
    if "peers" in data:
        deep = [r for r in data["peers"]["depth_rows"] if r["test"] == "tg" and r["depth"]]
        rows.append(("r7b default decode ≥ 0.95 × llama-bench's fastest setting, at depth",
                     ", ".join(f"d{r['depth']}: {r['vs_fastest']:.3f} ({r['fastest_setting']} fastest)" for r in deep)))
        checks = data["peers"].get("peers") or {}
        if checks:
            rows.append(("quantize, imatrix, eval match llama.cpp's tools",
                         ", ".join(f"{k} {'pass' if v['ok'] else 'FAIL'}" for k, v in checks.items())))
    if "serve" in data:
        g = serve_bench.goals(data["serve"])
        rows.append(("r7b serve at 4 clients ≥ 1.3 × serial and ≥ llama-server",
                     f"{_cell(g['vs_serial'])} × serial, {_cell(g['vs_llama_server'])} × llama-server"))
    return rows


def _depth0_text(data: dict[str, Any], limit: float) -> str:
    if "scaling" not in data:
        return ""
    sc = data["scaling"]
    depth, tps = sc["tg"][0]
    return (f"; Q4_K_M at depth {depth}: "
            f"{bench.utilisation(bench.decode_gbs(sc['bytes_per_token'][depth], tps), limit):.0%}")


def _convert_text(rows: list[dict[str, Any]]) -> str:
    parts = []
    for step in ("convert → F16", "quantize → Q4_K_M"):
        sizes = sorted((r for r in rows if r["step"] == step), key=lambda r: r["layers"])
        parts.append(f"{step.split()[0]}: " + ", ".join(
            f"{r['layers']} layers {_mib(r['peak_rss'])} MiB (anon {_mib(r['peak_anon'])})" for r in sizes))
    return "; ".join(parts)


def md_machine(data: dict[str, Any]) -> list[str]:
    m = data["machine"]
    rows = [(k, v) for k, v in m.items()]
    return ["## Machine", "", *md_table(("", ""), rows, "ll")]


def md_speed(data: dict[str, Any]) -> list[str]:
    results, plan = data["speed"], data["plan"]
    fs = bench.fmt_spread
    rows, rows2 = [], []
    for r in results:
        label = _model_label(r)
        size = f"{format_bytes(r.model.size_bytes)}, {r.model.n_params / 1e6:.0f} M"
        for test, key in ((f"pp{plan.prompt}", "pp_tps"), (f"tg{plan.gen}", "tg_tps")):
            rows.append((label, size, test, fs(r.r7b[key]), fs(r.raw[key]), f"{r.ratio[key]:.3f}"))
        if r.chat:
            c = r.chat
            rows.append((label, size, f"tg via Model.chat ({c['tokens'].median:.0f} tokens)", fs(c["tg_tps"]),
                         fs(r.raw["tg_tps"]), f"{r.ratio['chat_tg_tps']:.3f}"))
        rows2.append((label, fs(r.r7b["ttft_s"], 1e3, 1), fs(r.raw["ttft_s"], 1e3, 1), f"{r.ratio['ttft_s']:.3f}",
                      fs(r.r7b["peak_rss_bytes"], 1 / MIB, 1), fs(r.raw["peak_rss_bytes"], 1 / MIB, 1),
                      f"{r.r7b['kv_bytes'].median / MIB:.2f} / {r.raw['kv_bytes'].median / MIB:.2f}"))
    return ["## Speed: r7b against bare llama.cpp", "",
            f"Tokens per second, median (min–max) of {plan.repeat} runs per side ({plan.stand_in_repeat} for the "
            f"stand-in); pp{plan.prompt} = prefill of {plan.prompt} tokens, tg{plan.gen} = {plan.gen} tokens "
            "generated right after it; r7b/raw is the median over rounds of each r7b run against the raw run "
            "beside it (below 1: r7b slower). The chat row "
            "times `Model.chat(stream=True)` on a prompt cut to the same length, up to the end of its turn. "
            f"Background load from other jobs during this section: {data['busy']['speed']:.2f} cores; rounds run "
            "again because other processes were busy: "
            + ", ".join(f"{_model_label(r)} {r.settings['redone']}" for r in results) + ". One row: "
            f"`r7b bench MODEL.gguf --prompt-tokens {plan.prompt} --gen-tokens {plan.gen} --repeat {plan.repeat}`.",
            "",
            *md_table(("model", "size, params", "test", "r7b t/s", "raw t/s", "r7b/raw"), rows, "lllrrr"),
            "Time to first token (prefill + first sample; ratio below 1: r7b faster); peak RSS of a process "
            "holding one side only, during a run of the same prompt and 8 generated tokens (VmHWM, reset before "
            f"each of {min(plan.repeat, bench.MEM_REPEAT)} runs); the KV cache llama.cpp allocated (small "
            f"sliding-window cache, f16, n_ctx {pad(plan.prompt + plan.gen)}):", "",
            *md_table(("model", "TTFT ms r7b", "TTFT ms raw", "r7b/raw", "peak RSS MiB r7b", "peak RSS MiB raw",
                     "KV MiB r7b / raw"), rows2),
            "![r7b/raw ratios](bench-ratio.png)", ""]


def md_bandwidth(data: dict[str, Any]) -> list[str]:
    bw = data["bandwidth"]
    limit = max(b["read_gbs"] for b in bw)
    rows = [(f"{b['threads']} thread{'s' if b['threads'] > 1 else ''}", f"{b['read_gbs']:.1f}", f"{b['copy_gbs']:.1f}")
            for b in bw]
    dec = []
    for r in data["speed"]:
        if "tiny" in Path(r.model.path).name:
            continue
        g = r.decode_gbs
        dec.append((_model_label(r), _mib(r.model.bytes_per_token), f"{r.r7b['tg_tps'].median:.2f}",
                    f"{g['r7b']:.1f}", f"{bench.utilisation(g['r7b'], limit):.0%}",
                    f"{bench.utilisation(g['raw'], limit):.0%}"))
    return ["## Decode against the memory bandwidth", "",
            f"Streaming bandwidth of the machine (numpy over {format_bytes(bw[0]['bytes'])}, best of 5; read = OR-reduction "
            "of uint64, copy = bytes read + written):", "",
            *md_table(("", "read GB/s", "copy GB/s"), rows),
            "Bytes one decode step reads ≈ every weight matrix once (the tied token embedding is the output "
            "projection, so it is read in full; its row lookup is not counted again) + the f16 K and V rows "
            f"attention reads at the mean depth of tg{data['plan'].gen} (sliding layers: at most the window). "
            f"Achieved = bytes/token × tokens/s; utilisation is against the best read figure ({limit:.1f} GB/s).",
            "", *md_table(("model", "MiB/token", "tg t/s (r7b)", "GB/s (r7b)", "of read bandwidth (r7b)",
                         "(raw)"), dec),
            "The stand-in (10 MiB) fits in the CPU caches, so it is left out: its decode is not bound by RAM.", ""]


def md_scaling(data: dict[str, Any]) -> list[str]:
    sc, plan = data["scaling"], data["plan"]
    return ["## Scaling with prompt length and context depth", "",
            f"Synthetic Q4_K_M through the project's engine. Prefill: median of 2 runs from an empty cache. Decode: "
            f"{plan.depth_gen} tokens generated after a prompt of the given depth; MiB/token counts the weights "
            "and the K/V rows attention reads at that depth, GB/s is that times tokens/s (a fall in GB/s means "
            f"attention compute, not memory, sets the pace). Background load: {data['busy']['scaling']:.2f} cores.",
            "", *md_table(("prompt tokens", "prefill t/s"), [(n, f"{v:.1f}") for n, v in sc["pp"]]),
            *md_table(("depth (tokens in context)", "decode t/s", "MiB/token", "GB/s"), _depth_rows(sc)),
            "![scaling](bench-scaling.png)", ""]


def _depth_rows(sc: dict[str, Any]) -> list[tuple[Any, ...]]:
    rows = []
    for depth, tps in sc["tg"]:
        read = sc["bytes_per_token"][depth]
        rows.append((depth, f"{tps:.2f}", _mib(read), f"{bench.decode_gbs(read, tps):.1f}"))
    return rows


def md_kv(data: dict[str, Any]) -> list[str]:
    kv = data["kv"]
    shape = kv["shape"]
    rows = []
    for (label, full), values in kv["computed"].items():
        rows.append((label, "full (swa_full=True)" if full else "small", *(format_bytes(v) for v in values)))
    meas = []
    for (n, full), value in kv["measured"].items():
        s = shape
        calc = kv_cache_bytes(s.n_layers, s.n_kv_heads, s.head_dim, n, s.sliding_window, swa_full=full)
        meas.append((f"{n // 1024}K", "full" if full else "small", format_bytes(value), format_bytes(calc)))
    small32 = kv["computed"][("Command R7B", False)][1]
    full32 = kv["computed"][("Command R7B", True)][1]
    synth = kv["computed"][("synthetic", False)][1], kv["computed"][("synthetic", True)][1]
    return ["## KV-cache memory", "",
            f"f16 K and V for one sequence. Synthetic: {shape.n_layers} layers, {shape.n_kv_heads} KV heads × "
            f"{shape.head_dim}, window {shape.sliding_window}; Command R7B: 32 layers, 8 × 128, window 4096. Every "
            "4th layer is global; with the small cache the 3 sliding layers in 4 keep window + 512 cells.", "",
            *md_table(("model", "SWA cache", *(f"{n // 1024}K" for n in KV_CONTEXTS)), rows, "llrrr"),
            "Measured: what llama.cpp allocated for the synthetic model (its log), against the computed size:", "",
            *md_table(("context", "SWA cache", "llama.cpp", "computed"), meas, "llrr"),
            f"At 32K the small cache saves {format_bytes(full32 - small32)} for Command R7B ({1 - small32 / full32:.0%}) and "
            f"{format_bytes(synth[1] - synth[0])} for the synthetic model ({1 - synth[0] / synth[1]:.0%}).", "",
            "![KV cache](bench-kv.png)", ""]


def md_ttft(data: dict[str, Any]) -> list[str]:
    rows = [(r["turn"], r["prompt_tokens"], r["reuse_eval"], f"{r['reuse_ttft'] * 1e3:.0f}", r["fresh_eval"],
             f"{r['fresh_ttft'] * 1e3:.0f}", f"{r['fresh_ttft'] / r['reuse_ttft']:.1f}×") for r in data["ttft"]]
    plan = data["plan"]
    return ["## Multi-turn chat: time to first token", "",
            f"One conversation of {plan.turns} user turns of about {plan.turn_tokens} tokens (held-out English), "
            f"{plan.reply_tokens}-token replies, synthetic Q4_K_M. `ChatSession` keeps the conversation's KV cache "
            "and evaluates only the new tokens; the other side clears the cache before each turn and replays the "
            f"same messages. Background load: {data['busy']['ttft']:.2f} cores.", "",
            *md_table(("turn", "prompt tokens", "evaluated (reuse)", "TTFT ms (reuse)", "evaluated (cleared)",
                     "TTFT ms (cleared)", "speed-up"), rows),
            "![TTFT](bench-ttft.png)", ""]


def md_convert(data: dict[str, Any]) -> list[str]:
    rows = [(r["layers"], f"{r['params'] / 1e9:.3f} B", r["step"], format_bytes(r["read_bytes"]), f"{r['wall_s']:.1f}",
             f"{r['mb_s']:.0f}", _mib(r["peak_rss"]), _mib(r["peak_anon"])) for r in data["convert"]]
    return ["## Conversion", "",
            "`r7b convert` (bf16 safetensors → F16 GGUF) and `r7b quantize` (F16 → type) as subprocesses, on the "
            "synthetic checkpoint at two sizes. Throughput is input bytes per second. Peak RSS (VmHWM) includes "
            "memory-mapped file pages, which the kernel can drop at any time; peak anonymous RSS is the memory the "
            "process itself allocated. Both are read from /proc every 10 ms. Background load: "
            f"{data['busy']['convert']:.2f} cores.", "",
            *md_table(("layers", "params", "step", "input", "wall s", "MB/s", "peak RSS MiB", "peak anon MiB"),
                    rows, "rrllrrrr")]



# -- beside llama.cpp's own tools -------------------------------------------------------------------------

# Published llama-bench figures for flash attention on GPUs (this VM has none); tokens/s, fa 0 -> fa 1.
GPU_FA_FIGURES = (
    ("Metal, Apple M3 Pro (18 GPU cores)", "Llama 3 8B Q4_K_M",
     "pp512 308.84 → 324.32 (+5.0%); tg128 24.88 → 25.75 (+3.5%)", "https://github.com/ggml-org/llama.cpp/pull/5021"),
    ("Metal, Apple M1 Ultra (64 GPU cores)", "Llama 3 8B Q4_K_M", "pp +8–9%, tg +6% (summary in the same comment)",
     "https://github.com/ggml-org/llama.cpp/pull/5021"),
    ("CUDA, RTX 4090", "Qwen2.5-Coder 3B Q4_0", "pp512 18155 → 22104 (+22%)",
     "https://github.com/ggml-org/llama.cpp/pull/12183"),
)


def _fa_label(fa: str, kv: str) -> str:
    return f"fa {fa}, {kv}"


def _cell(v: float | None, digits: int = 2) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


MATRIX_TITLE = "Flash attention and KV cache type by depth"
PEER_CHECKS_TITLE = "r7b beside llama.cpp's tools: quantize, imatrix, eval"
SERVE_TITLE = "Serving: r7b serve against llama-server"
RERUN_SECTIONS = {"peers": f'The sections from "{MATRIX_TITLE}" to "{PEER_CHECKS_TITLE}" were',
                  "serve": f'The section "{SERVE_TITLE}" was'}


def md_matrix(data: dict[str, Any]) -> list[str]:
    """llama-bench and r7b bench over flash attention × KV type × depth."""
    peers = data["peers"]
    rows_in, plan = peers["matrix"], peers["plan"]
    rows = []
    for depth in plan.depths:
        for fa, kv in (("auto", "f16"), *peer_bench.COMBOS):
            cells = [f"d{depth}", "r7b default (auto, f16)" if fa == "auto" else _fa_label(fa, kv)]
            for test in ("pp", "tg"):
                lb = peer_bench.tps(rows_in, "llama-bench", fa, kv, test, depth) if fa != "auto" else None
                ours = [r for r in rows_in if (r["tool"], r["fa"], r["kv"], r["test"], r["depth"]) ==
                        ("r7b", fa, kv, test, depth)]
                r = ours[0] if ours else None
                cells += [_cell(lb), _cell(r and r["tps"]), _cell(r and r["ratio_raw"], 3)]
            used = next((r["fa_used"] for r in rows_in if r["tool"] == "r7b" and r["fa"] == fa and r["kv"] == kv
                         and r["depth"] == depth), "?")
            cells.append(used)
            rows.append(cells)
    pp, tg = f"pp{plan.prompt}", f"tg{plan.gen}"
    return [f"## {MATRIX_TITLE}", "",
            f"Synthetic Q4_K_M, {data['threads']} threads, batch 512. llama-bench: `-p {plan.prompt} -n {plan.gen} "
            f"-d {','.join(map(str, plan.depths))} -fa 0|1 -ctk/-ctv f16|q8_0 -b 512 -ub 512 -r {plan.repeat}` "
            "(mean t/s); a q8_0 V cache needs flash attention, so fa off is run with f16 only. r7b: "
            f"`r7b bench MODEL --depth D --prompt-tokens {plan.prompt} --gen-tokens {plan.gen} --repeat {plan.repeat} "
            "--flash-attn F --kv-type K --no-memory --no-chat` (median t/s; r7b/raw against its bare llama.cpp loop "
            "on the same settings). Both evaluate the depth once and restore it before each repetition; both time "
            f"{tg} @ dD from the depth itself (r7b bench prefills its prompt for {pp}, then goes back to the depth "
            "to decode, as llama-bench's separate tests do). Each llama-bench setting runs right before r7b bench at "
            "that setting (r7b's default first), so the figures compared are minutes apart. llama-bench sizes the "
            f"context of {tg} @ dD to D + {plan.gen} tokens; r7b bench's holds the prompt too, rounded up to 256. "
            f"Background load: {data['busy']['peers']:.2f} cores of other processes (load average before / after: "
            f"{peers['load_before']} / {peers['load_after']}).", "",
            *md_table(("depth", "setting", f"{pp} llama-bench", f"{pp} r7b", "r7b/raw", f"{tg} llama-bench",
                       f"{tg} r7b", "r7b/raw", "flash attention run"), rows, "llrrrrrrl")]


def md_defaults(data: dict[str, Any]) -> list[str]:
    """r7b's default beside the settings llama-server and llama-cpp-python pick, at each depth."""
    peers = data["peers"]
    rows = [(f"{r['test']} @ d{r['depth']}", _cell(r["r7b"]), _cell(r["llama_server"]), _cell(r["llama_cpp_python"]),
             f"{_cell(r['fastest'])} ({r['fastest_setting']})", f"{r['vs_server']:.3f}", f"{r['vs_lcp']:.3f}",
             f"{r['vs_fastest']:.3f}") for r in peers["depth_rows"]]
    return ["## Defaults by depth", "",
            "r7b's default (`--flash-attn auto`, f16 KV: on the CPU auto is off, except that a quantized V cache "
            "turns it on) measured through `r7b bench`; llama-server's default (`-fa auto`, which llama.cpp resolves "
            "to on wherever the backend has the kernel, the CPU included: common/arg.cpp, src/llama-context.cpp; f16 "
            "KV) and llama-cpp-python's default (`Llama(flash_attn=False)`, llama_cpp/llama.py; f16 KV) measured "
            "through llama-bench with those settings. The goal: r7b's decode at 4K and 16K within 5% of the "
            "fastest setting llama-bench finds.", "",
            *md_table(("test", "r7b default t/s", "llama-server default t/s", "llama-cpp-python default t/s",
                       "fastest (llama-bench)", "r7b / llama-server", "r7b / llama-cpp-python", "r7b / fastest"),
                      rows, "lrrrlrrr")]


def md_buffers(data: dict[str, Any]) -> list[str]:
    """The attention-score buffer: measured on the synthetic model, computed for Command R7B."""
    b = data["peers"]["buffers"]
    meas = [(f"{r['n_ctx'] // 1024}K", r["fa"], format_bytes(r["measured"]),
             format_bytes(r["estimated"]) if r["estimated"] is not None else "–",
             format_bytes(r["scores"]) if r["scores"] else "–") for r in b["synthetic"]]
    r7b = [(f"{r['n_ctx'] // 1024}K", format_bytes(r["scores"]),
            format_bytes(r["estimated_off"]) if r["estimated_off"] is not None else "–",
            format_bytes(r["estimated_on"]) if r["estimated_on"] is not None else "–") for r in b["r7b"]]
    return ["## The attention-score buffer", "",
            "Without flash attention llama.cpp materializes each micro-batch's attention scores: heads × n_ubatch × "
            "KV cells × 4 bytes for a global layer (f32), reserved up front for the whole context. With flash "
            "attention the scores are computed in tiles and never stored, so the compute buffer does not grow "
            "with the context. Measured: the compute buffers llama.cpp reports when it creates the context "
            f"(synthetic model, {b['n_heads']} heads, n_ubatch 512, f16 KV), beside r7b.memory's estimate and "
            "the scores alone:", "",
            *md_table(("context", "flash attention", "compute buffer (llama.cpp)", "r7b.memory estimate",
                       "scores alone"), meas, "llrrr"),
            f"Command R7B ({b['r7b_heads']} heads), computed (n_ubatch 512):", "",
            *md_table(("context", "scores alone, fa off", "compute buffer, fa off", "compute buffer, fa on"),
                      r7b, "lrrr"),
            "That is what turning flash attention off costs in memory; a quantized (q8_0) V cache needs flash "
            "attention, so it keeps the small buffer and halves the KV cache, at the decode speed shown above.", ""]


def md_gpu_fa() -> list[str]:
    rows = [(dev, model, figs, f"<{url}>") for dev, model, figs, url in GPU_FA_FIGURES]
    return ["## Flash attention on Metal and CUDA (published figures)", "",
            "These cannot be measured on this VM. `--flash-attn auto` leaves the choice to llama.cpp where layers "
            "are offloaded (`--gpu-layers`), and llama.cpp turns flash attention on for Metal and CUDA, where "
            "llama-bench runs published in llama.cpp's pull requests show it winning:", "",
            *md_table(("backend", "model", "fa 0 → fa 1, t/s", "source"), rows, "llll")]


def md_peer_checks(data: dict[str, Any]) -> list[str]:
    checks = data["peers"].get("peers")
    if not checks:
        return []
    names = {"quantize": "`r7b quantize` vs llama-quantize (tensors byte-identical)",
             "imatrix": "`r7b imatrix` vs llama-imatrix (values within 1e-4 relative)",
             "eval": "`r7b eval` vs `llama-perplexity --kl-divergence` (mean KLD within 1%)"}
    rows = [(names[k], "pass" if v["ok"] else "FAIL", v["line"]) for k, v in checks.items()]
    return [f"## {PEER_CHECKS_TITLE}", "",
            "The comparisons of tests/test_peers.py (which `make test` runs on the stand-in), here on the synthetic "
            f"{data['plan'].layers[0]}-layer F16 and its quantizations; same text (held-out English), context, "
            "chunks, KV type and flash-attention mode on both sides.", "",
            *md_table(("comparison", "result", "measured"), rows, "lll")]


def md_serve(data: dict[str, Any]) -> list[str]:
    sv = data["serve"]
    plan = sv["plan"]
    g = serve_bench.goals(sv)
    goal = (f"At 4 clients: r7b / serial r7b = {_cell(g['vs_serial'])} (goal ≥ 1.3), r7b / llama-server = "
            f"{_cell(g['vs_llama_server'])} (goal ≥ 1.0)." if g["vs_serial"] or g["vs_llama_server"] else
            "4 clients were not run.")
    missing = "" if sv["parallel_flag"] else (" This r7b serve has no --parallel, so only one client was run.")
    return [f"## {SERVE_TITLE}", "",
            f"Synthetic Q4_K_M, {sv['threads']} threads, {plan['n_ctx']} tokens of context per slot, batch 512, KV "
            f"{sv['kv_type']}, flash attention {sv['flash_attn']} (run as {sv['flash_attn_used']} on both). For N "
            f"clients each server has N slots (`r7b serve --parallel N --n-ctx {plan['n_ctx']}`; `llama-server -np N "
            f"-c N×{plan['n_ctx']}`); r7b serial is `--parallel 1`. Each client streams one /v1/chat/completions "
            f"request (a different ~{plan['prompt_words']}-word user prompt, temperature 0, max_tokens "
            f"{plan['max_tokens']}, `ignore_eos`, so every answer runs to the limit and each server does the same "
            "work), all started together; tok/s is every client's completion tokens over the time "
            "to the last token; latency is a client's time to its last token. For each N the three servers are up "
            f"together and take turns, {plan['repeat']} recorded rounds each after one unrecorded round, in a "
            "rotating order; the rows show the median-throughput round, r7b/that the median of per-round ratios. "
            f"Background load: {data['busy']['serve']:.2f} cores.{missing}", "",
            *serve_bench.table(sv), goal, ""]


def _reruns_text(data: dict[str, Any]) -> str:
    reruns = data.get("reruns") or {}
    return "".join(f" {RERUN_SECTIONS[k]} measured again alone (`scripts/bench_report.py --rerun {k}`, {when}), "
                   "on the same model files." for k, when in reruns.items())


def write_report(out: Path, data: dict[str, Any]) -> Path:
    plan = data["plan"]
    head = ["# Benchmarks", "",
            f"Figures from one run of `{data['command']}` on a shared 2-core VM that other jobs also use; each "
            "section gives the background load (CPU time of other processes, in cores) it saw. With two "
            "llama.cpp threads on two cores, any other busy process stalls one of them, and the VM's speed "
            "drifts by ±15 % from second to second, so single figures carry noise of a few percent (the ranges "
            "show it). Rerun with `make bench`.", "",
            "Method, as in llama-bench: pp = prefill tokens/s, tg = decode tokens/s. Each figure is measured "
            "through r7b (`Engine.prefill` → `Engine.generate` → `TextStream`, and `Model.chat` streaming) and "
            "through a minimal loop written straight on llama.cpp's C API (`quality/bench_raw.py`), taking turns "
            "in one process (rounds r7b, raw, chat, then chat, raw, r7b, ...), on the same loaded weights (each "
            "side has its own context), the same seeded random prompt (vocabulary ids without control tokens) and "
            f"the same context settings (f16 KV, small sliding-window cache, batch 512, {data['threads']} threads, "
            "flash attention as the engine resolves its default: off on the CPU). "
            "Sharing the weights matters: two loaded copies of one model measured 1–5 % apart in decode speed on "
            "this VM (separate processes up to 14 %), more than the effect measured. Each round starts once other "
            "processes have left the CPUs alone for 0.5 s and is run again if they took more than 0.2 cores during "
            "it; ratios are medians of per-round ratios, which cancels the VM's drift. Peak RSS comes from a "
            "separate process per side. "
            "Generation is greedy and ignores end-of-generation tokens. r7b/raw = 1.0 means the Python layer "
            f"costs nothing. Total time of this run: {data['total_s'] / 60:.1f} minutes"
            f"{' (--quick: reduced sizes)' if plan == QUICK else ''}.{_reruns_text(data)}", ""]
    body = md_summary(data) + md_machine(data) + md_speed(data) + md_bandwidth(data)
    for key, section in (("scaling", md_scaling), ("kv", md_kv), ("ttft", md_ttft), ("convert", md_convert)):
        if key in data:
            body += section(data)
    if "peers" in data:
        body += ["", *md_matrix(data), *md_defaults(data), *md_buffers(data), *md_gpu_fa(), *md_peer_checks(data)]
    if "serve" in data:
        body += md_serve(data)
    path = out / "benchmarks.md"
    path.write_text("\n".join(head + body).rstrip() + "\n", encoding="utf-8")
    return path


# -- main ----------------------------------------------------------------------------------------------

def run(plan: Plan, work: Path, command: str, keep: Callable[[dict[str, Any]], None] = lambda data: None
        ) -> dict[str, Any]:
    """Every section in turn; `keep(data)` after each, so a failure late in the run loses nothing before it."""
    from r7b.convert.convert import convert
    from r7b.llama import default_threads

    t0 = time.monotonic()
    threads = default_threads()
    data: dict[str, Any] = {"plan": plan, "machine": machine(ROOT), "threads": threads, "command": command, "busy": {}}
    data["bandwidth"] = [bench.memory_bandwidth(n, plan.bandwidth_bytes) for n in sorted({1, threads})]
    log("memory bandwidth measured")
    with BusyMeter() as busy:
        models, data["convert"] = build_models(work, plan)
    data["busy"]["convert"] = busy.cores
    stand_in = convert(str(ROOT / "tests" / "fixtures" / "tiny-r7b"), work / "tiny-r7b-F16.gguf", force=True,
                       progress=False)
    with BusyMeter() as busy:
        data["speed"] = speed({"stand-in": stand_in, **models}, plan)
    data["busy"]["speed"] = busy.cores
    for key, fn in (("scaling", lambda: scaling(models["Q4_K_M"], plan, threads)),
                    ("kv", lambda: kv_memory(models["Q4_K_M"], plan)),
                    ("ttft", lambda: multi_turn(models["Q4_K_M"], plan, threads))):
        with BusyMeter() as busy:
            data[key] = fn()
        data["busy"][key] = busy.cores
        keep(data)
        log(f"{key} done")
    for key in PEER_SECTIONS:
        run_peer_section(data, key, models["Q4_K_M"], work)
        keep(data)
    data["total_s"] = time.monotonic() - t0
    return data


PEER_SECTIONS = ("peers", "serve")


def run_peer_section(data: dict[str, Any], key: str, q4: Path, work: Path) -> None:
    """One of the sections beside llama.cpp's tools, into `data` with its background load and wall time."""
    quick = data["plan"] == QUICK
    with BusyMeter() as busy:
        if key == "peers":
            data[key] = peer_bench.run_all(q4, f16_path(work, data["plan"]),
                                           peer_bench.QUICK if quick else peer_bench.FULL, data["threads"],
                                           work / "peers")
        else:
            data[key] = serve_bench.serve_bench(q4, serve_bench.QUICK if quick else serve_bench.FULL,
                                                data["threads"], work / "serve")
    data["busy"][key] = busy.cores
    data.setdefault("section_s", {})[key] = busy.wall_s
    log(f"{key} done")


def rerun_section(data: dict[str, Any], key: str, work: Path) -> None:
    """Measure one section again on the last run's model files; the report says when and on which commit."""
    q4 = work / f"synth-{data['plan'].layers[0]}l-Q4_K_M.gguf"
    if not q4.exists():
        raise SystemExit(f"{q4} is missing: run the whole benchmark first")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    run_peer_section(data, key, q4, work)
    data.setdefault("reruns", {})[key] = f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {commit}"


def _save(path: Path, data: dict[str, Any]) -> None:
    """Replace the measurements whole: an interrupted write leaves the last ones as they were."""
    with atomic_output(path, force=True) as tmp:
        tmp.write_bytes(pickle.dumps(data))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="every step at small sizes (writes to build/ by default)")
    ap.add_argument("--out", type=Path, help="folder for benchmarks.md and its plots (default docs/)")
    ap.add_argument("--work", type=Path, default=ROOT / "build" / "bench", help="folder for the model files")
    ap.add_argument("--render", action="store_true",
                    help="only rewrite the report from the last run's measurements (WORK/report-data.pickle)")
    ap.add_argument("--rerun", choices=PEER_SECTIONS,
                    help="measure this section again and rewrite the report with it (the others as last run)")
    args = ap.parse_args()
    plan = QUICK if args.quick else FULL
    out = args.out or (ROOT / "build" / "bench-quick" if args.quick else ROOT / "docs")
    out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    saved = args.work / ("report-data-quick.pickle" if args.quick else "report-data.pickle")
    if args.render or args.rerun:
        data = pickle.loads(saved.read_bytes())
        if args.rerun:
            rerun_section(data, args.rerun, args.work)
            _save(saved, data)
    else:
        partial = saved.with_suffix(".partial.pickle")
        data = run(plan, args.work, "make bench" if not args.quick else "scripts/bench_report.py --quick",
                   keep=lambda sections: partial.write_bytes(pickle.dumps(sections)))
        _save(saved, data)
        partial.unlink(missing_ok=True)
    plot_all(out, data)
    log(f"wrote {write_report(out, data)}")


if __name__ == "__main__":
    main()

"""r7b beside llama.cpp's own tools on one model file (project issue 15).

* Attention and KV cache: llama-bench over flash attention off/on × KV cache f16/q8_0 (a q8_0 V
  cache needs flash attention) × context depth, and `r7b bench` at the same depths with its default
  settings and with each setting; the depth table sets r7b's default beside the settings
  llama-server and llama-cpp-python choose by default.
* The attention-score buffer: the compute buffer llama.cpp reserves with flash attention off and on,
  measured on the model and computed for Command R7B.
* quantize, imatrix and eval against llama-quantize, llama-imatrix and llama-perplexity
  --kl-divergence, with the comparisons of tests/test_peers.py (which runs them on the stand-in).

    python scripts/peer_bench.py MODEL-Q4_K_M.gguf [--f16 MODEL-F16.gguf] [--quick] [--json]

The tools come from `make peers` (tests/peers.py finds them).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from peers import peer_binary  # noqa: E402

from r7b.quality import bench  # noqa: E402

# What each program does when not told: llama-server's -fa defaults to auto, which llama.cpp turns on
# wherever the backend has the kernel (the CPU has it: common/arg.cpp, src/llama-context.cpp);
# llama-cpp-python's Llama(flash_attn=False) turns it off (llama_cpp/llama.py); both keep an f16 cache.
LLAMA_SERVER_DEFAULT = ("on", "f16")
LLAMA_CPP_PYTHON_DEFAULT = ("off", "f16")
COMBOS = (("off", "f16"), ("on", "f16"), ("on", "q8_0"))  # (flash attention, K and V cache type)
GOAL_OF_FASTEST = 0.95  # r7b's default decode within 5% of the fastest setting llama-bench finds


@dataclass(frozen=True)
class MatrixPlan:
    depths: tuple[int, ...]
    prompt: int
    gen: int
    repeat: int
    buffer_contexts: tuple[int, ...]  # contexts whose compute buffers are measured and computed


FULL = MatrixPlan(depths=(0, 4096, 16384), prompt=512, gen=32, repeat=3, buffer_contexts=(4096, 32768))
QUICK = MatrixPlan(depths=(0, 256), prompt=64, gen=8, repeat=1, buffer_contexts=(1024, 4096))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- llama-bench ------------------------------------------------------------------------------------

def llama_bench_args(model: Path, fa: str, kv: str, plan: MatrixPlan, threads: int) -> list[str]:
    """llama-bench with r7b bench's context settings: batch = ubatch = 512, the given threads."""
    return [str(peer_binary("llama-bench")), "-m", str(model), "-p", str(plan.prompt), "-n", str(plan.gen),
            "-d", ",".join(map(str, plan.depths)), "-fa", "1" if fa == "on" else "0", "-ctk", kv, "-ctv", kv,
            "-t", str(threads), "-b", str(bench.N_BATCH), "-ub", str(bench.N_BATCH), "-r", str(plan.repeat),
            "-o", "json"]


def parse_llama_bench(out: str, fa: str, kv: str) -> list[dict[str, Any]]:
    """One row per test from llama-bench's JSON: pp or tg, depth, tokens/s (mean and samples)."""
    rows = []
    for t in json.loads(out):
        test = "pp" if t["n_prompt"] else "tg"
        rows.append({"tool": "llama-bench", "fa": fa, "kv": kv, "test": test, "depth": t["n_depth"],
                     "tokens": t["n_prompt"] or t["n_gen"], "tps": t["avg_ts"], "samples": t["samples_ts"]})
    return rows


def run_llama_bench(model: Path, plan: MatrixPlan, threads: int, fa: str, kv: str) -> list[dict[str, Any]]:
    proc = subprocess.run(llama_bench_args(model, fa, kv, plan, threads), capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"llama-bench -fa {fa} -ctk/-ctv {kv} failed:\n{proc.stderr[-2000:]}")
    log(f"llama-bench fa {fa}, kv {kv} done")
    return parse_llama_bench(proc.stdout, fa, kv)


def run_matrix(model: Path, plan: MatrixPlan, threads: int) -> list[dict[str, Any]]:
    """Each llama-bench setting, then r7b bench at that setting (r7b's default beside the first): figures
    compared are measured minutes apart, not the length of the matrix (this machine drifts by 10 %)."""
    rows: list[dict[str, Any]] = []
    resolved: dict[int, str] = {}
    for fa, kv in COMBOS:
        rows += run_llama_bench(model, plan, threads, fa, kv)
        for setting in ([("auto", "f16")] if (fa, kv) == COMBOS[0] else []) + [(fa, kv)]:
            rows += run_r7b(model, plan, threads, *setting, resolved, rows)
    return rows


# -- r7b bench ---------------------------------------------------------------------------------------

def run_r7b(model: Path, plan: MatrixPlan, threads: int, fa: str, kv: str, resolved: dict[int, str],
            done: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """r7b bench (and its raw llama.cpp loop) at each depth with one setting; an explicit setting equal
    to what the default ("auto", recorded in `resolved` by depth) resolved to is copied from `done`."""
    rows: list[dict[str, Any]] = []
    for depth in plan.depths:
        if fa != "auto" and kv == "f16" and resolved.get(depth) == fa:
            rows += [{**r, "fa": fa, "same_as_default": True} for r in done
                     if r["tool"] == "r7b" and r["fa"] == "auto" and r["kv"] == kv and r["depth"] == depth]
            continue
        result = bench.compare(model, prompt_tokens=plan.prompt, gen_tokens=plan.gen, repeat=plan.repeat,
                               threads=threads, chat=False, depth=depth, flash_attn=fa, kv_type=kv,
                               memory=False)
        used = result.settings["flash_attn_used"]
        if fa == "auto":
            resolved[depth] = used["r7b"]
        rows += _r7b_rows(result, fa, kv, depth, plan)
    log(f"r7b bench fa {fa}, kv {kv} done")
    return rows


def _r7b_rows(result: bench.BenchResult, fa: str, kv: str, depth: int, plan: MatrixPlan) -> list[dict[str, Any]]:
    used = result.settings["flash_attn_used"]
    out = []
    for test, key, n in (("pp", "pp_tps", plan.prompt), ("tg", "tg_tps", plan.gen)):
        out.append({"tool": "r7b", "fa": fa, "fa_used": used["r7b"], "kv": kv, "test": test, "depth": depth,
                    "tokens": n, "tps": result.r7b[key].median, "raw_tps": result.raw[key].median,
                    "ratio_raw": result.ratio[key], "compute_bytes": result.r7b["compute_bytes"].median,
                    "kv_bytes": result.r7b["kv_bytes"].median})
    return out


# -- the attention-score buffer -----------------------------------------------------------------------

def compute_buffers(model: Path, contexts: Sequence[int], threads: int) -> list[dict[str, Any]]:
    """llama.cpp's compute buffer for contexts of each size, flash attention off and on (f16 KV)."""
    from r7b.runtime.engine import Engine, EngineConfig

    rows = []
    for n_ctx in contexts:
        for fa in ("off", "on"):
            with bench.llama_log() as lines:
                Engine(model, EngineConfig(n_ctx=n_ctx, n_threads=threads, flash_attn=fa)).close()
            rows.append({"n_ctx": n_ctx, "fa": fa, "measured": bench.compute_bytes_from_log(lines)})
    return rows


def score_bytes(n_heads: int, n_ctx: int, n_ubatch: int = bench.N_BATCH) -> int:
    """One global layer's attention scores without flash attention: heads × ubatch × cells, f32."""
    from r7b.memory import pad

    return 4 * n_heads * n_ubatch * pad(n_ctx)


def estimated_buffer(shape: Any, n_ctx: int, fa: str) -> int | None:
    """r7b.memory's estimate of the compute buffer, where it knows about flash attention (else None)."""
    import inspect

    from r7b.memory import compute_buffer_bytes

    if "flash_attn" not in inspect.signature(compute_buffer_bytes).parameters:
        return None
    return compute_buffer_bytes(shape, bench.N_BATCH, n_ctx=n_ctx, flash_attn=fa)


def buffer_table(model: Path, contexts: Sequence[int], threads: int) -> dict[str, Any]:
    from r7b.cohere2 import COMMAND_R7B

    shape = bench.model_shape(model)
    measured = compute_buffers(model, contexts, threads)
    for row in measured:
        row["estimated"] = estimated_buffer(shape, row["n_ctx"], row["fa"])
        row["scores"] = score_bytes(shape.n_heads, row["n_ctx"]) if row["fa"] == "off" else 0
    r7b = [{"n_ctx": n, "scores": score_bytes(COMMAND_R7B.n_heads, n),
            "estimated_off": estimated_buffer(COMMAND_R7B, n, "off"),
            "estimated_on": estimated_buffer(COMMAND_R7B, n, "on")} for n in (4096, 32768)]
    return {"synthetic": measured, "n_heads": shape.n_heads, "r7b": r7b, "r7b_heads": COMMAND_R7B.n_heads}


# -- quantize, imatrix, eval (tests/test_peers.py's comparisons) ----------------------------------------

def peer_checks(f16: Path, work: Path, threads: int, qtypes: Sequence[str] = ("Q8_0", "Q4_K_M")) -> dict[str, Any]:
    """The checks test_peers.py makes on the stand-in, on this model; each result a line and a pass flag.

    llama-imatrix is given r7b imatrix's flash-attention mode: the two attention paths differ by up to
    6e-4 relative in the collected values, more than the 1e-4 the comparison allows.
    """
    import test_peers as tp

    work.mkdir(parents=True, exist_ok=True)
    text = ROOT / "tests" / "fixtures" / "held-out" / "en.txt"
    out: dict[str, Any] = {}
    imx: dict[str, Path] = {}
    out["imatrix"] = _check(lambda: _compare_imatrix(tp, imx.update(_imatrices(tp, f16, text, work, threads)) or imx))
    made = {}
    out["quantize"] = _check(lambda: _compare_quantize(tp, f16, imx, work, threads, qtypes, made))
    out["eval"] = _check(lambda: _compare_eval(tp, f16, made, qtypes, text, work, threads))
    return out


def _check(fn: Callable[[], str]) -> dict[str, Any]:
    """{'ok', 'line'}: a failed comparison (an assertion, or pytest.fail inside the shared helpers) is a line."""
    try:
        return {"ok": True, "line": fn()}
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # pytest.fail raises an OutcomeException, which is not an Exception
        return {"ok": False, "line": f"{type(exc).__name__}: {str(exc)[:1500]}"}


def _imatrices(tp: Any, f16: Path, text: Path, work: Path, threads: int) -> dict[str, Path]:
    from r7b.convert.imatrix import imatrix

    ours = Path(imatrix(f16, text, work / "imatrix-r7b.gguf", ctx=tp.CTX, chunks=tp.CHUNKS, threads=threads,
                        force=True, progress=False)).resolve()  # a scratch folder: an earlier run's file goes
    theirs = (work / "imatrix-llama.gguf").resolve()
    tp.run_tool([peer_binary("llama-imatrix"), "-m", f16, "-f", text, "-c", tp.CTX, "--chunks", tp.CHUNKS,
                 "-t", threads, "-fa", bench.resolved_flash_attn(), "-o", theirs], work)
    return {"r7b": ours, "llama": theirs}


def _compare_imatrix(tp: Any, imx: dict[str, Path]) -> str:
    from r7b.convert.imatrix_file import read_imatrix

    ours, theirs = read_imatrix(imx["r7b"]), read_imatrix(imx["llama"])
    common = sorted(set(ours.sums) & set(theirs.sums))
    means_a, means_b = ours.means(), theirs.means()
    worst = 0.0
    for name in common:
        assert (ours.counts[name] == theirs.counts[name]).all(), f"{name}: counts differ"
        worst = max(worst, tp._rel(ours.sums[name], theirs.sums[name]), tp._rel(means_a[name], means_b[name]))
    assert worst <= tp.IMATRIX_RTOL, f"max relative difference {worst:.3g} > {tp.IMATRIX_RTOL:g}"
    only = sorted(set(ours.sums) - set(theirs.sums))
    return (f"{len(common)} common weights, counts equal, max relative difference {worst:.2g} (limit "
            f"{tp.IMATRIX_RTOL:g}); only r7b: {', '.join(only) or '-'}; ctx {tp.CTX}, {tp.CHUNKS} chunks")


def _compare_quantize(tp: Any, f16: Path, imx: dict[str, Path], work: Path, threads: int,
                      qtypes: Sequence[str], made: dict) -> str:
    """Both quantizers, with no imatrix and with each tool's imatrix (so each file is read by the other tool)."""
    from r7b.convert.quantize import quantize
    from r7b.gguf_reader import read_gguf

    cases, bad = [], []
    for qtype in qtypes:
        for src in (None, "r7b", "llama"):
            ours, theirs = work / f"r7b-{qtype}-{src or 'none'}.gguf", work / f"llama-{qtype}-{src or 'none'}.gguf"
            quantize(f16, ours, qtype, imatrix=imx[src] if src else None, threads=threads, force=True,
                     progress=False)
            tp.run_tool([peer_binary("llama-quantize"), *(["--imatrix", imx[src]] if src else []), f16, theirs,
                         qtype, threads], work)
            made.setdefault(qtype, ours)
            tensors, meta = tp._differences(ours, theirs)
            bad += [f"{qtype}/{src}: {d}" for d in tensors + meta][:5]
            cases.append(f"{qtype}/{src or 'no'} imatrix")
    assert not bad, "; ".join(bad)
    n = len(read_gguf(made[qtypes[0]]).tensors)
    return (f"{len(cases)} cases ({', '.join(cases)}): all {n} tensors byte-identical, metadata identical; "
            "each tool read the other's imatrix file")


def _compare_eval(tp: Any, f16: Path, made: dict, qtypes: Sequence[str], text: Path, work: Path,
                  threads: int) -> str:
    from r7b.quality.eval import evaluate

    perplexity = peer_binary("llama-perplexity")
    common = ["-c", tp.CTX, "--chunks", tp.CHUNKS, "-ctk", tp.KV_TYPE, "-ctv", tp.KV_TYPE, "-fa", "off", "-t", threads]
    base = work / "kld-base.bin"
    tp.run_tool([perplexity, "-m", f16, "-f", text, *common, "--kl-divergence-base", base], work)
    models = [made[q] for q in qtypes]
    results = evaluate(f16, models, text.read_text(encoding="utf-8"), ctx=tp.CTX, chunks=tp.CHUNKS,
                       threads=threads, kv_type=tp.KV_TYPE)
    parts, bad = [], []
    for qtype, model, ours in zip(qtypes, models, results):
        log_text, _ = tp.run_perplexity_stats([perplexity, "-m", model, *common, "--kl-divergence-base", base,
                                               "--kl-divergence"], work)
        kld = tp._figure(log_text, r"Mean\s+KLD:\s+(-?[0-9.]+)")
        rel = abs(ours.kld_mean - kld) / kld if kld else float("inf")
        if abs(ours.kld_mean - kld) > tp.KLD_RTOL * kld + tp.KLD_PRINT_ULP / 2:
            bad.append(f"{qtype}: r7b {ours.kld_mean:.7f}, llama {kld:.6f}")
        parts.append(f"{qtype} mean KLD r7b {ours.kld_mean:.7f} / llama-perplexity {kld:.6f} ({rel:.2%})")
    assert not bad, "; ".join(bad)
    return f"{'; '.join(parts)}; ctx {tp.CTX}, {tp.CHUNKS} chunks, KV {tp.KV_TYPE} on both, -fa off (limit 1% plus half the 1e-6 to which llama-perplexity prints it)"


# -- the depth table ----------------------------------------------------------------------------------

def tps(rows: Sequence[dict[str, Any]], tool: str, fa: str, kv: str, test: str, depth: int) -> float | None:
    found = [r["tps"] for r in rows if (r["tool"], r["fa"], r["kv"], r["test"], r["depth"]) == (tool, fa, kv, test,
                                                                                                  depth)]
    return statistics.median(found) if found else None


def fastest(rows: Sequence[dict[str, Any]], test: str, depth: int) -> tuple[float, str, str]:
    """llama-bench's best (tokens/s, fa, kv) at this depth."""
    best = max((r for r in rows if r["tool"] == "llama-bench" and r["test"] == test and r["depth"] == depth),
               key=lambda r: r["tps"])
    return best["tps"], best["fa"], best["kv"]


def depth_rows(rows: Sequence[dict[str, Any]], depths: Sequence[int]) -> list[dict[str, Any]]:
    """Per depth and test: r7b's default, the settings of llama-server's and llama-cpp-python's defaults
    (measured by llama-bench), the fastest llama-bench setting, and r7b's default against each."""
    out = []
    for depth in depths:
        for test in ("pp", "tg"):
            ours = tps(rows, "r7b", "auto", "f16", test, depth)
            server = tps(rows, "llama-bench", *LLAMA_SERVER_DEFAULT, test, depth)
            lcp = tps(rows, "llama-bench", *LLAMA_CPP_PYTHON_DEFAULT, test, depth)
            best, fa, kv = fastest(rows, test, depth)
            out.append({"depth": depth, "test": test, "r7b": ours, "llama_server": server, "llama_cpp_python": lcp,
                        "fastest": best, "fastest_setting": f"fa {fa}, {kv}",
                        "vs_server": ours / server, "vs_lcp": ours / lcp, "vs_fastest": ours / best})
    return out


# -- command line ---------------------------------------------------------------------------------------

def run_all(model: Path, f16: Path | None, plan: MatrixPlan, threads: int, work: Path) -> dict[str, Any]:
    data: dict[str, Any] = {"model": str(model), "plan": plan, "threads": threads,
                            "load_before": _loadavg()}
    t0 = time.monotonic()
    rows = run_matrix(model, plan, threads)
    data["matrix"] = rows
    data["depth_rows"] = depth_rows(rows, plan.depths)
    data["matrix_s"] = time.monotonic() - t0
    data["buffers"] = buffer_table(model, plan.buffer_contexts, threads)
    log("compute buffers measured")
    if f16 is not None:
        data["peers"] = peer_checks(f16, work, threads)
        log("quantize/imatrix/eval checks done")
    data["load_after"] = _loadavg()
    return data


def _loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return "?"


def main() -> int:
    from r7b.llama import default_threads

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path, help="the GGUF to benchmark (the synthetic Q4_K_M in make bench)")
    ap.add_argument("--f16", type=Path, help="its F16 source: also compare quantize, imatrix and eval")
    ap.add_argument("--quick", action="store_true", help="small depths and one repeat")
    ap.add_argument("--threads", type=int, default=default_threads())
    ap.add_argument("--work", type=Path, default=ROOT / "build" / "peer-bench")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    data = run_all(args.model, args.f16, QUICK if args.quick else FULL, args.threads, args.work)
    if args.json:
        print(json.dumps({k: v for k, v in data.items() if k != "plan"}, indent=2, default=str))
        return 0
    for row in data["depth_rows"]:
        print(f"{row['test']} @ d{row['depth']}: r7b {row['r7b']:.2f}, llama-server default {row['llama_server']:.2f}, "
              f"llama-cpp-python default {row['llama_cpp_python']:.2f}, fastest {row['fastest']:.2f} "
              f"({row['fastest_setting']}): r7b/fastest {row['vs_fastest']:.3f}")
    for name, check in data.get("peers", {}).items():
        print(f"{name}: {'ok' if check['ok'] else 'FAILED'}: {check['line']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`make rehearsal`: every step a user runs, on a random-weights model of Command R7B's full size.

Builds the checkpoint (scripts/rehearsal_checkpoint.py), then runs `r7b convert`, `imatrix`,
`quantize`, `quantize --list`, `eval`, `generate` and `serve` as a user would, each in its own
process, measured by scripts/rehearsal_measure.py, plus the probes of scripts/rehearsal_probe.py
(llama.cpp's allocations, speed at depth, read bandwidth). Intermediates are deleted as soon as
no later step needs them; free disk is checked first. Results go to WORKDIR/results.json after
every step and to docs/rehearsal.md at the end (also when steps were skipped or failed).

    python scripts/rehearsal.py [--small] [--budget-min 70] [--report-only]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import rehearsal_checkpoint as ckpt  # noqa: E402
import rehearsal_measure as measure  # noqa: E402
import rehearsal_report as report  # noqa: E402
import rehearsal_serve as serve  # noqa: E402

from r7b.errors import R7BError  # noqa: E402
from r7b.fsutil import check_free_space  # noqa: E402

BIN = Path(sys.executable).parent
TEXT = ROOT / "tests" / "fixtures" / "held-out" / "en.txt"
QUALITY_TEXTS = [ROOT / "tests" / "fixtures" / "held-out" / f for f in ("en.txt", "es.txt")]
QUANTS = (("Q8_0", False), ("Q4_K_M", True), ("Q4_K_R7B", True))  # (type, with the imatrix)
MARGIN = 2 * 10**9


class Rehearsal:
    """The run's state: folders, options, results so far and the clock."""

    def __init__(self, args: argparse.Namespace):
        self.small = args.small
        self.work = Path(args.workdir).expanduser()
        self.doc = Path(args.doc)
        self.deadline = time.monotonic() + 60 * args.budget_min
        self.ctx_eval = args.eval_ctx
        self.chunks = args.chunks
        self.prefill = args.prefill
        self.depths = [int(d) for d in args.depths.split(",")]
        self.results_path = self.work / "results.json"
        self.log = self.work / "rehearsal.log"
        self.steps: list[measure.Step] = []
        self.results: dict = {"steps": [], "skipped": [], "small": self.small, "budget_min": args.budget_min}

    def path(self, name: str) -> Path:
        return self.work / name

    def minutes_left(self) -> float:
        return (self.deadline - time.monotonic()) / 60

    def save(self) -> None:
        self.results["steps"] = [s.as_dict() for s in self.steps]
        tmp = self.results_path.with_suffix(".part")
        tmp.write_text(json.dumps(self.results, indent=1))
        os.replace(tmp, self.results_path)

    def record(self, step: measure.Step, outputs: list[Path] = ()) -> measure.Step:
        step.outputs = sum(p.stat().st_size for p in outputs if p.exists())
        self.steps.append(step)
        self.save()
        print(f"[rehearsal] {step.name}: {step.wall_s:.1f} s, rc {step.rc}, peak RSS {step.peak_rss / 2**30:.2f} GiB, "
              f"anon {step.peak_anon / 2**30:.2f} GiB {step.throughput}", flush=True)
        return step

    def skip(self, name: str, why: str) -> None:
        self.results["skipped"].append({"name": name, "why": why})
        self.save()
        print(f"[rehearsal] skipped {name}: {why}", flush=True)

    def run(self, name: str, argv: list[str], outputs: list[Path] = (), timeout: float | None = None
            ) -> measure.Step:
        step = measure.run_step(name, [str(a) for a in argv], self.work, log=self.log, timeout=timeout)
        return self.record(step, outputs)

    def probe(self, name: str, args: list[str], timeout: float | None = None) -> tuple[measure.Step, object]:
        out = self.path(f"{name}.json")
        argv = [sys.executable, ROOT / "scripts" / "rehearsal_probe.py", *args]
        step = measure.run_step(name, [str(a) for a in argv], self.work, log=out.with_suffix(".log"),
                                timeout=timeout)
        lines = out.with_suffix(".log").read_text().strip().splitlines()
        try:
            value = json.loads(lines[-1])
        except (IndexError, json.JSONDecodeError):
            value = None
        step.extra["result"] = value
        return self.record(step), value


def r7b(*args) -> list:
    return [BIN / "r7b", *args]


# -- the steps ------------------------------------------------------------------------------------

def preflight(r: Rehearsal) -> None:
    """Machine, what else runs, bandwidth, and refuse early when the disk cannot hold the run."""
    from r7b.convert.quantize import QUANT_TYPES, planned_model_bytes
    from r7b.cohere2 import Cohere2Dims

    shape = Cohere2Dims.from_hf_config(ckpt.config(r.small))
    f16 = planned_model_bytes(shape, None)
    quants = sum(planned_model_bytes(shape, QUANT_TYPES[q]) for q, _ in QUANTS)
    need = max(ckpt.checkpoint_bytes(r.small) + f16, f16 + quants) + MARGIN
    r.work.mkdir(parents=True, exist_ok=True)
    check_free_space(r.work / "probe", need, "the rehearsal's largest moment (checkpoint + F16, or F16 + the "
                     "quantized models)")
    r.results.update(machine=measure.machine(), busy=measure.busy_processes(), disk_free=measure.free_disk(r.work),
                     disk_need=need, started=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    _, bw = r.probe("bandwidth", ["bandwidth"])
    r.results["bandwidth"] = bw


def build(r: Rehearsal, quants=QUANTS, imatrix: Path | None = None, suffix: str = "") -> None:
    """Checkpoint -> F16 -> imatrix -> quantized models; the checkpoint goes as soon as F16 exists.

    With `imatrix` (an earlier run's) that step is not repeated; `suffix` names the steps of such
    a repeat, which `--requantize` runs after a fix to quantize."""
    folder, f16 = r.path("checkpoint"), r.path("r7b-F16.gguf")
    gb = ckpt.checkpoint_bytes(r.small) / 1e9
    step = r.run("checkpoint" + suffix, [sys.executable, ROOT / "scripts" / "rehearsal_checkpoint.py", folder,
                                         *(["--small"] if r.small else [])])
    step.throughput = f"{gb / step.wall_s:.2f} GB/s written"
    step.outputs = measure.folder_bytes(folder)
    step = r.run("convert" + suffix, r7b("convert", folder, "-o", f16, "--force", "-q"), [f16])
    step.throughput = f"{gb / step.wall_s:.2f} GB/s of bf16 read"
    shutil.rmtree(folder, ignore_errors=True)
    imx = imatrix or r.path("imatrix.gguf")
    if imatrix is None:
        step = r.run("imatrix", r7b("imatrix", f16, "--text", TEXT, "-o", imx, "--ctx", r.ctx_eval, "--chunks",
                                    r.chunks, "--force", "-q"), [imx])
        step.throughput = f"{r.ctx_eval * r.chunks / step.wall_s:.2f} tokens/s"
    for qtype, with_imatrix in quants:
        out = r.path(f"r7b-{qtype}.gguf")
        extra = ["--imatrix", imx] if with_imatrix else []
        step = r.run(f"quantize {qtype}{suffix}", r7b("quantize", f16, out, "--type", qtype, *extra, "--force", "-q"),
                     [out])
        step.throughput = f"{f16.stat().st_size / 1e9 / step.wall_s:.2f} GB/s of F16"
        r.save()


def requantize(r: Rehearsal, imatrix: Path, what: str) -> None:
    """Convert and quantize again after a fix, beside the first run's figures."""
    check_free_space(r.work / "probe", ckpt.checkpoint_bytes(r.small) * 2 + MARGIN, "a checkpoint and its F16")
    r.results.setdefault("reruns", []).append(what)
    build(r, QUANTS[:1], imatrix=imatrix, suffix=f" ({what})")
    for f in r.work.glob("*.gguf"):
        f.unlink()


def predictions(r: Rehearsal) -> None:
    """`r7b quantize --list` on the F16, as a user picks a type, and the same figures exactly."""
    from r7b.convert.quantize import estimate_types

    f16 = r.path("r7b-F16.gguf")
    step = r.run("quantize --list", r7b("quantize", "--list", f16))
    step.extra["table"] = _last_output(r.log)
    _, rows = estimate_types(f16)
    r.results["predicted"] = {row.name: {"file": row.file_bytes, "ram": row.ram_bytes} for row in rows
                              if row.name in dict(QUANTS)}
    r.results["actual_size"] = {q: r.path(f"r7b-{q}.gguf").stat().st_size for q, _ in QUANTS}
    parts(r)
    r.save()


def contexts(r: Rehearsal) -> tuple[int, ...]:
    return (4096, 8192) if r.small else (4096, 32768, 131072)


def predicted_parts(r: Rehearsal, sizes: dict[str, int] | None = None) -> dict:
    """The prediction's parts for each model, context and attention path ("4096/off": {...}).

    `sizes` are the planned file sizes `--list` uses (default: the actual files). The CPU backend's
    repacked copy is counted from the quantized file's tensor types on this CPU."""
    from r7b.convert.quantize import model_dims, read_model
    from r7b.memory import estimate_ram, repacked_bytes

    out: dict = {}
    for qtype in ("Q4_K_M", "Q8_0"):
        model = read_model(r.path(f"r7b-{qtype}.gguf"), allow_quantized=True)
        shape, repacked = model_dims(model), repacked_bytes(model.tensors)
        size = (sizes or {}).get(qtype) or r.path(f"r7b-{qtype}.gguf").stat().st_size
        for n_ctx in contexts(r):
            for flash in ("off", "on"):
                e = estimate_ram(size, shape, n_ctx, flash_attn=flash, repacked=repacked)
                out.setdefault(qtype, {})[f"{n_ctx}/{flash}"] = {
                    "weights": e.weights, "kv": e.kv_cache, "compute": e.compute, "repacked": e.repacked,
                    "list_total": e.total - e.repacked, "total": e.total}
    return out


def fullbatch(r: Rehearsal) -> None:
    """Resident memory of Q4_K_M after a 512-token batch at the end of a 32K context (the planner's worst case)."""
    from r7b.llama import resolve_flash_attn

    n_ctx = contexts(r)[1]
    step, row = r.probe(f"full batch Q4_K_M ctx {n_ctx}", ["fullbatch", r.path("r7b-Q4_K_M.gguf"), n_ctx,
                                                           resolve_flash_attn("auto", "f16")])
    step.extra.update(model="Q4_K_M", n_ctx=n_ctx)
    if row:
        step.throughput = f"512 tokens at depth {row['depth']}: {512 / row['prefill_s']:.2f} tokens/s"
        r.results["full_batch"] = row


def parts(r: Rehearsal) -> None:
    """Recompute the prediction's parts from the quantized models in WORKDIR."""
    r.results["predicted_parts"] = predicted_parts(r, {q: v["file"] for q, v in r.results["predicted"].items()})


def _last_output(log: Path) -> str:
    text = log.read_text()
    return text[text.rfind("\n$ ") + 1:].split("\n", 1)[-1].strip()


def quality(r: Rehearsal) -> None:
    """`r7b eval` of Q4_K_M against F16 on a few chunks; then the F16 goes."""
    f16, q4, ref = r.path("r7b-F16.gguf"), r.path("r7b-Q4_K_M.gguf"), r.path("reference.bin")
    step = r.run("eval", r7b("eval", "--reference", f16, q4, "--text", TEXT, "--ctx", r.ctx_eval, "--chunks",
                             r.chunks, "--save-reference", ref, "--force", "--json", "-q"), [ref])
    scored = r.chunks * (r.ctx_eval // 2 - 1)
    step.throughput = f"{step.wall_s / r.chunks:.1f} s per chunk (F16 and Q4_K_M)"
    step.extra.update(ref_bytes=step.outputs, scored=scored, chunks=r.chunks, ctx=r.ctx_eval,
                      eval_json=_last_output(r.log)[-4000:])
    _, counts = r.probe("tokens", ["tokens", f16, *QUALITY_TEXTS])
    step.extra["quality_tokens"] = counts
    r.save()
    ref.unlink(missing_ok=True)
    f16.unlink(missing_ok=True)
    r.save()


def memory(r: Rehearsal) -> None:
    """What llama.cpp allocates at 4K, 32K and 128K, and resident memory while `r7b generate` runs."""
    ctxs = contexts(r)
    for qtype in ("Q4_K_M", "Q8_0"):
        model = r.path(f"r7b-{qtype}.gguf")
        _, rows = r.probe(f"alloc {qtype}", ["alloc", model, ",".join(map(str, ctxs)), "off,on"])
        r.results.setdefault("alloc", {})[qtype] = rows
        for n_ctx in ctxs[:2]:
            if r.minutes_left() < 3:
                r.skip(f"generate {qtype} {n_ctx}", f"{r.minutes_left():.1f} min left of the budget")
                continue
            step = r.run(f"generate {qtype} ctx {n_ctx}", r7b("generate", model, "--ctx", n_ctx, "--prompt",
                                                             "Say hello.", "--max-tokens", 4, "--seed", 0))
            step.extra.update(model=qtype, n_ctx=n_ctx)
    r.save()


def speed(r: Rehearsal) -> None:
    """Prefill and decode at depth, for Q8_0 and Q4_K_M, with the runtime's attention path."""
    from r7b.llama import resolve_flash_attn

    flash = resolve_flash_attn("auto", "f16")
    r.results["flash_attn"] = flash
    for qtype in ("Q4_K_M", "Q8_0"):
        need = len(r.depths) * r.prefill / r.results.get("prefill_tps", 3.0) / 60 * 1.5
        if r.minutes_left() < need:
            r.skip(f"speed {qtype}", f"needs about {need:.0f} min at the measured prefill rate, "
                                     f"{r.minutes_left():.0f} min left")
            continue
        step, rows = r.probe(f"speed {qtype}", ["speed", r.path(f"r7b-{qtype}.gguf"),
                                                 ",".join(map(str, r.depths)), r.prefill, 16, flash])
        step.extra["model"] = qtype
        if rows:
            r.results.setdefault("speed", {})[qtype] = rows
            r.results["prefill_tps"] = rows[0]["prefill_tps"]
        r.save()


def serving(r: Rehearsal) -> None:
    """`r7b serve`: time to first token for a long prompt with documents, then a follow-up turn."""
    model = r.path("r7b-Q4_K_M.gguf")
    need = 2.3 * serve.PROMPT_TOKENS / r.results.get("prefill_tps", 3.0) / 60 + 1
    if r.minutes_left() < need:
        r.skip("serve", f"a {serve.PROMPT_TOKENS}-token prompt needs about {need:.0f} min at the measured prefill "
                        f"rate, {r.minutes_left():.0f} min left")
        return
    step = serve.measure_serve([str(a) for a in r7b("serve", model, "--ctx", 4096, "--port", serve.PORT)],
                               r.work, r.log, TEXT)
    r.record(step)


def cleanup(r: Rehearsal, keep: bool) -> None:
    if not keep:
        for f in r.work.glob("*.gguf"):
            f.unlink()


SKIP_NAMES = {"serving": "serve", "memory": "generate"}  # how a stage names what it skipped
STAGES = {f.__name__: f for f in (build, predictions, quality, memory, speed, serving)}
EXTRA_STAGES = {"parts": parts, "fullbatch": fullbatch}  # for --stages only


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="2-layer, hidden-256 model with the real vocabulary")
    p.add_argument("--workdir", help="where the models go (default ~/.cache/r7b-edge/rehearsal/run[-small])")
    p.add_argument("--doc", help="the report (default docs/rehearsal.md; with --small, WORKDIR/rehearsal.md)")
    p.add_argument("--budget-min", type=float, default=70, help="skip steps that would not end in time")
    p.add_argument("--eval-ctx", type=int, default=256, help="tokens per imatrix and eval chunk")
    p.add_argument("--chunks", type=int, default=2, help="imatrix and eval chunks")
    p.add_argument("--prefill", type=int, default=512, help="prefill tokens per speed measurement")
    p.add_argument("--depths", default="0,4096,16384", help="KV depths for the speed measurement")
    p.add_argument("--keep", action="store_true", help="keep the quantized models at the end")
    p.add_argument("--report-only", action="store_true", help="rewrite the report from WORKDIR/results.json")
    p.add_argument("--note", action="append", default=[], help="with --report-only: add a line to the Machine "
                   "section (what else ran, say)")
    p.add_argument("--requantize", metavar="WHAT", help="convert and quantize to Q8_0 again, adding the "
                   "steps, named after WHAT (a fix), to WORKDIR/results.json")
    p.add_argument("--imatrix", metavar="FILE", help="with --requantize: the first run's importance matrix")
    p.add_argument("--stages", metavar="S,S", help=f"run only these stages ({', '.join([*STAGES, *EXTRA_STAGES])}) on the models "
                   "already in WORKDIR, adding to WORKDIR/results.json")
    args = p.parse_args(argv)
    cache = Path(os.environ.get("R7B_CACHE") or Path.home() / ".cache" / "r7b-edge")
    args.workdir = args.workdir or cache / "rehearsal" / ("run-small" if args.small else "run")
    args.doc = args.doc or (Path(args.workdir) / "rehearsal.md" if args.small else ROOT / "docs" / "rehearsal.md")
    r = Rehearsal(args)
    if args.report_only or args.requantize or args.stages:
        r.results = json.loads(r.results_path.read_text())
        r.steps = [measure.Step(**d) for d in r.results["steps"]]
        r.results.setdefault("notes", []).extend(n for n in args.note if n not in r.results["notes"])
        if args.requantize:
            requantize(r, Path(args.imatrix), args.requantize)
        for name in (args.stages or "").split(",") if args.stages else []:
            r.results["skipped"] = [s for s in r.results["skipped"]
                                    if not s["name"].startswith((name, SKIP_NAMES.get(name, name)))]
            {**STAGES, **EXTRA_STAGES}[name](r)
        r.save()
        report.write(r.results, r.doc)
        cleanup(r, args.keep)
        return 0
    try:
        preflight(r)
    except R7BError as exc:
        print(f"rehearsal: error: {exc}", file=sys.stderr)
        return 1
    try:
        for stage in STAGES.values():
            try:
                stage(r)
            except Exception as exc:  # a failed stage is reported, and later stages still run
                r.skip(stage.__name__, f"failed: {type(exc).__name__}: {exc}")
    finally:
        r.results["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        r.results["busy_end"] = measure.busy_processes()
        r.save()
        report.write(r.results, r.doc)
        cleanup(r, args.keep)
    print(r.doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())

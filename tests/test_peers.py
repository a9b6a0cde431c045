"""r7b against llama.cpp's own tools on the stand-in: quantize, imatrix and eval (project issue 15).

The peers are the binaries `make peers` builds from the same llama-cpp-python source the project
runs on (tests/peers.py finds them). On the same inputs:

* `r7b quantize` and `llama-quantize` (Q8_0, Q4_K_M; no imatrix, r7b's imatrix, llama-imatrix's)
  write the same tensors byte for byte, in the same order, with the same metadata;
* `r7b imatrix` and `llama-imatrix` (same text, ctx and chunks) agree on every weight they both
  collect to 1e-4 relative (sums and means; counts exactly), and each tool's file is accepted by
  the other's quantizer. r7b also collects `token_embd.weight`: the stand-in ties its output
  projection to the token embedding, and llama-imatrix collects only `blk.*` weights (plus
  `output.weight` with --process-output, which a tied model does not have);
* `r7b eval` and `llama-perplexity --kl-divergence` (same files, text, ctx, chunks, f32 KV cache,
  flash attention off) agree on the mean KL divergence to 1% relative and on both perplexities.

Each comparison leaves one line in a "llama.cpp peers" section of the pytest terminal summary
(and in the test's record_property, for --junitxml).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from peers import PeersNotBuilt, peer_binary

THREADS = 2
CTX = 128
CHUNKS = 4
QTYPES = ("Q8_0", "Q4_K_M")
KV_TYPE = "f32"  # r7b eval's default; llama-perplexity gets -ctk/-ctv f32
IMATRIX_RTOL = 1e-4
KLD_RTOL = 0.01
KLD_PRINT_ULP = 1e-6  # llama-perplexity prints "Mean    KLD: %10.6f"; half of that unit is added
PPL_RTOL = 1e-4
LOG_ATTEMPTS = 12  # llama-perplexity runs per model until its statistics get printed (see below)
# Metadata keys allowed to differ between r7b quantize and llama-quantize outputs. None: both are
# handed the same absolute imatrix path, so even quantize.imatrix.file matches.
METADATA_MAY_DIFFER: frozenset[str] = frozenset()
# Importance-matrix entries only r7b collects (tied output projection = token embedding).
IMATRIX_ONLY_R7B = {"token_embd.weight"}
IMATRIX_ONLY_LLAMA: set[str] = set()

SUMMARY_PLUGIN = "r7b-peers-summary"


# -- the terminal summary -------------------------------------------------------------------------

class _PeerSummary:
    """A pytest plugin registered at run time: prints the recorded lines after the run."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if self.lines:
            terminalreporter.section("llama.cpp peers")
            for line in self.lines:
                terminalreporter.write_line(line)


_QUANT_CASES: list[str] = []


@pytest.fixture(scope="module")
def summary(request):
    pm = request.config.pluginmanager
    plugin = pm.get_plugin(SUMMARY_PLUGIN)
    if plugin is None:
        plugin = _PeerSummary()
        pm.register(plugin, SUMMARY_PLUGIN)

    def record(check: str, line: str) -> None:
        plugin.lines.append(f"{check}: {line}")
        print(f"\n{check}: {line}")

    return record


@pytest.fixture(scope="module", autouse=True)
def _quantize_summary(summary):
    yield
    if _QUANT_CASES:
        summary("quantize vs llama-quantize",
                f"{len(_QUANT_CASES)} cases tensor-for-tensor byte-identical, metadata identical "
                f"({'; '.join(_QUANT_CASES)})")


# -- fixtures --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tool():
    """name -> path of llama.cpp's tool; the module is skipped when `make peers` has not run."""

    def get(name: str) -> Path:
        try:
            return peer_binary(name)
        except PeersNotBuilt as exc:
            pytest.skip(str(exc))

    get("llama-quantize")  # skip early, before any fixture work
    return get


def run_tool(args: list, cwd: Path) -> str:
    """Run a llama.cpp tool; its stdout+stderr, or a failure showing their tail."""
    proc = subprocess.run([str(a) for a in args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, errors="replace", timeout=120)
    if proc.returncode != 0:
        pytest.fail(f"{Path(str(args[0])).name} exited {proc.returncode}:\n{proc.stdout[-3000:]}")
    return proc.stdout


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("peers")


@pytest.fixture(scope="module")
def f16(stand_in_gguf) -> Path:
    return Path(stand_in_gguf("f16")).resolve()


@pytest.fixture(scope="module")
def text_file() -> Path:
    return (Path(__file__).parent / "fixtures" / "held-out" / "en.txt").resolve()


@pytest.fixture(scope="module")
def imatrices(tool, f16, text_file, work) -> dict[str, Path]:
    """The same text, ctx and chunks through both imatrix collectors: {'r7b': path, 'llama': path}."""
    from r7b.convert.imatrix import imatrix

    ours = imatrix(f16, text_file, work / "imatrix-r7b.gguf", ctx=CTX, chunks=CHUNKS, threads=THREADS,
                   progress=False)
    theirs = work / "imatrix-llama.gguf"
    # r7b runs attention without flash attention on the CPU (its default); llama-imatrix is told the same
    run_tool([tool("llama-imatrix"), "-m", f16, "-f", text_file, "-c", CTX, "--chunks", CHUNKS,
              "-t", THREADS, "-fa", "off", "-o", theirs], work)
    return {"r7b": Path(ours).resolve(), "llama": theirs.resolve()}


@pytest.fixture(scope="module")
def quantized(tool, f16, imatrices, work):
    """(who, qtype, imatrix source or None) -> quantized file, made once."""
    from r7b.convert.quantize import quantize

    made: dict[tuple, Path] = {}

    def get(who: str, qtype: str, imx: str | None) -> Path:
        key = (who, qtype, imx)
        if key not in made:
            out = work / f"{who}-{qtype}-{imx or 'noimx'}.gguf"
            imx_path = imatrices[imx] if imx else None
            if who == "r7b":
                quantize(f16, out, qtype, imatrix=imx_path, threads=THREADS, progress=False)
            else:
                args = [tool("llama-quantize")]
                if imx_path is not None:
                    args += ["--imatrix", imx_path]
                run_tool([*args, f16, out, qtype, THREADS], work)
            made[key] = out
        return made[key]

    return get


# -- quantize ---------------------------------------------------------------------------------------

def _tensor_data(g, t) -> bytes:
    with open(g.path, "rb") as fh:
        fh.seek(g.data_offset + t.offset)
        return fh.read(t.nbytes)


def _differences(ours: Path, theirs: Path) -> tuple[list[str], list[str]]:
    """(tensor differences, metadata differences outside METADATA_MAY_DIFFER)."""
    from r7b.gguf_reader import read_gguf

    a, b = read_gguf(ours), read_gguf(theirs)
    tensors = []
    names_a, names_b = [t.name for t in a.tensors], [t.name for t in b.tensors]
    if names_a != names_b:
        tensors.append(f"tensor lists differ: only r7b {sorted(set(names_a) - set(names_b))}, "
                       f"only llama {sorted(set(names_b) - set(names_a))}, or the order")
    for ta in a.tensors:
        tb = b.by_name.get(ta.name)
        if tb is None:
            continue
        if (ta.type, ta.shape) != (tb.type, tb.shape):
            tensors.append(f"{ta.name}: r7b {ta.type.name}{list(ta.shape)}, llama {tb.type.name}{list(tb.shape)}")
        elif _tensor_data(a, ta) != _tensor_data(b, tb):
            tensors.append(f"{ta.name} ({ta.type.name}): bytes differ")
    meta = []
    for key in sorted((set(a.metadata) | set(b.metadata)) - METADATA_MAY_DIFFER):
        va, vb = a.metadata.get(key, "<absent>"), b.metadata.get(key, "<absent>")
        if va != vb or a.value_types.get(key) != b.value_types.get(key):
            meta.append(f"{key}: r7b {va!r}, llama {vb!r}")
    if a.alignment != b.alignment:
        meta.append(f"alignment: r7b {a.alignment}, llama {b.alignment}")
    return tensors, meta


@pytest.mark.parametrize("imx", [None, "r7b", "llama"], ids=["no-imatrix", "r7b-imatrix", "llama-imatrix"])
@pytest.mark.parametrize("qtype", QTYPES)
def test_quantize_matches_llama_quantize(quantized, qtype, imx, record_property):
    ours, theirs = quantized("r7b", qtype, imx), quantized("llama", qtype, imx)
    tensors, meta = _differences(ours, theirs)
    assert not tensors, f"{qtype} imatrix={imx}: r7b quantize and llama-quantize tensors differ:\n" + "\n".join(tensors)
    assert not meta, f"{qtype} imatrix={imx}: metadata differs beyond {sorted(METADATA_MAY_DIFFER)}:\n" + "\n".join(meta)
    from r7b.gguf_reader import read_gguf

    n = len(read_gguf(ours).tensors)
    record_property("peers", f"{qtype} imatrix={imx or 'none'}: {n} tensors byte-identical")
    _QUANT_CASES.append(f"{qtype}/{imx or 'none'}: {n} tensors, {ours.stat().st_size} bytes")


def test_imatrix_changes_q4_k_m(quantized):
    """The imatrix runs above are not vacuous: Q4_K_M with an imatrix differs from Q4_K_M without."""
    tensors, _ = _differences(quantized("r7b", "Q4_K_M", "llama"), quantized("r7b", "Q4_K_M", None))
    assert any("bytes differ" in d for d in tensors), "an imatrix changed no Q4_K_M tensor"


# -- imatrix ----------------------------------------------------------------------------------------

def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), np.finfo(np.float32).tiny)))


def test_imatrix_matches_llama_imatrix(imatrices, summary, record_property):
    from r7b.convert.imatrix_file import read_imatrix

    ours, theirs = read_imatrix(imatrices["r7b"]), read_imatrix(imatrices["llama"])
    only_r7b, only_llama = set(ours.sums) - set(theirs.sums), set(theirs.sums) - set(ours.sums)
    assert (only_r7b, only_llama) == (IMATRIX_ONLY_R7B, IMATRIX_ONLY_LLAMA), (
        f"entries only r7b collects: {sorted(only_r7b)}; only llama-imatrix: {sorted(only_llama)}")
    assert (ours.chunk_count, ours.chunk_size) == (theirs.chunk_count, theirs.chunk_size) == (CHUNKS, CTX)
    assert ours.datasets == theirs.datasets
    common = sorted(set(ours.sums) & set(theirs.sums))
    assert len(common) >= 7 * 4  # 7 matrices in each of the stand-in's layers
    means_a, means_b = ours.means(), theirs.means()
    worst_sum = worst_mean = 0.0
    bad = []
    for name in common:
        if not np.array_equal(ours.counts[name], theirs.counts[name]):
            bad.append(f"{name}: counts r7b {ours.counts[name].tolist()}, llama {theirs.counts[name].tolist()}")
            continue
        if ours.sums[name].shape != theirs.sums[name].shape:
            bad.append(f"{name}: shape r7b {ours.sums[name].shape}, llama {theirs.sums[name].shape}")
            continue
        rs, rm = _rel(ours.sums[name], theirs.sums[name]), _rel(means_a[name], means_b[name])
        worst_sum, worst_mean = max(worst_sum, rs), max(worst_mean, rm)
        if max(rs, rm) > IMATRIX_RTOL:
            bad.append(f"{name}: sums differ by {rs:.3g}, means by {rm:.3g} (relative)")
    assert not bad, "r7b imatrix and llama-imatrix differ:\n" + "\n".join(bad)
    line = (f"{len(common)} common weights, counts equal, max relative difference sums {worst_sum:.2g} / "
            f"means {worst_mean:.2g} (limit {IMATRIX_RTOL:g}); only r7b: {', '.join(sorted(only_r7b)) or '-'}; "
            f"ctx {CTX}, {CHUNKS} chunks")
    record_property("peers", line)
    summary("imatrix vs llama-imatrix", line)


def test_imatrix_files_accepted_both_ways(quantized, imatrices, summary):
    """r7b quantize reads llama-imatrix's file and llama-quantize reads r7b's (the quantize tests
    check the outputs match; here, that llama-quantize really loaded r7b's entries)."""
    from r7b.convert.imatrix_file import read_imatrix
    from r7b.gguf_reader import read_gguf

    for who, src in (("r7b", "llama"), ("llama", "r7b")):
        out = read_gguf(quantized(who, "Q4_K_M", src))
        assert out.get_field("quantize.imatrix.file") == str(imatrices[src])
        assert out.get_field("quantize.imatrix.entries_count") == len(read_imatrix(imatrices[src]).sums)
    summary("imatrix files", "r7b quantize --imatrix <llama-imatrix file> and llama-quantize --imatrix "
                             "<r7b imatrix file> both load every entry (Q8_0, Q4_K_M)")


# -- eval ---------------------------------------------------------------------------------------------

def run_perplexity_stats(args: list, cwd: Path) -> tuple[str, int]:
    """llama-perplexity --kl-divergence's output, with its final statistics, and the runs it took.

    llama.cpp's logger is an asynchronous thread that the tools never stop at exit (common/log.cpp
    leaks it on purpose, "this design may cause logs to be lost if not flushed before the program
    exits"): on a busy machine the process often exits with 0 before the statistics reach stdout.
    The run is repeated until they do; the figures do not depend on the run.
    """
    for attempt in range(1, LOG_ATTEMPTS + 1):
        log = run_tool(args, cwd)
        if "====== KL divergence statistics" in log and "Same top p:" in log.split("KL divergence statistics")[1]:
            return log, attempt
    pytest.fail(f"llama-perplexity exited {LOG_ATTEMPTS} times before its logger printed the statistics:\n"
                f"{log[-2000:]}")


def _figure(log: str, pattern: str) -> float:
    m = re.search(pattern, log)
    assert m, f"no {pattern!r} in llama-perplexity's output:\n{log[-3000:]}"
    return float(m.group(1))


def test_eval_matches_llama_perplexity(tool, quantized, f16, text_file, work, summary, record_property):
    from r7b.quality.eval import evaluate

    models = [quantized("r7b", q, None) for q in QTYPES]
    perplexity = tool("llama-perplexity")
    common = ["-c", CTX, "--chunks", CHUNKS, "-ctk", KV_TYPE, "-ctv", KV_TYPE, "-fa", "off", "-t", THREADS]
    base = work / "kld-base.bin"
    run_tool([perplexity, "-m", f16, "-f", text_file, *common, "--kl-divergence-base", base], work)
    results = evaluate(f16, models, text_file.read_text(encoding="utf-8"), ctx=CTX, chunks=CHUNKS,
                       threads=THREADS, kv_type=KV_TYPE)
    bad, parts, attempts = [], [], 0
    for qtype, model, ours in zip(QTYPES, models, results):
        log, runs = run_perplexity_stats([perplexity, "-m", model, *common, "--kl-divergence-base", base,
                                          "--kl-divergence"], work)
        attempts += runs
        kld = _figure(log, r"Mean\s+KLD:\s+(-?[0-9.]+)")
        ppl_q = _figure(log, r"Mean PPL\(Q\)\s*:\s*([0-9.]+)")
        ppl_base = _figure(log, r"Mean PPL\(base\)\s*:\s*([0-9.]+)")
        kld_rel = abs(ours.kld_mean - kld) / kld
        if abs(ours.kld_mean - kld) > KLD_RTOL * kld + KLD_PRINT_ULP / 2:
            bad.append(f"{qtype}: mean KLD r7b {ours.kld_mean:.7f}, llama-perplexity {kld:.6f} ({kld_rel:.2%})")
        for what, a, b in (("PPL(Q)", ours.ppl, ppl_q), ("PPL(base)", ours.reference_ppl, ppl_base)):
            if abs(a - b) > PPL_RTOL * b:
                bad.append(f"{qtype}: {what} r7b {a:.6f}, llama-perplexity {b:.6f}")
        parts.append(f"{qtype} KLD r7b {ours.kld_mean:.7f} / llama {kld:.6f} ({kld_rel:.2%}), "
                     f"PPL r7b {ours.ppl:.4f} / llama {ppl_q:.4f}")
        ref = (ours.reference_ppl, ppl_base)
    assert not bad, "r7b eval and llama-perplexity --kl-divergence differ:\n" + "\n".join(bad)
    line = (f"{'; '.join(parts)}; F16 PPL r7b {ref[0]:.4f} / llama {ref[1]:.4f}; "
            f"ctx {CTX}, {CHUNKS} chunks, KV {KV_TYPE}, -fa off; {attempts} llama-perplexity runs for "
            f"{len(QTYPES)} results (its async logger can lose the statistics at exit)")
    record_property("peers", line)
    summary("eval vs llama-perplexity", line)

"""The 16-bit reference store: its figures against float64 arithmetic on llama.cpp's full logits.

The bound. Let p be the reference's exact distribution, q the model's, r = log p - log q, and p~
what the store gives back: for each kept token, log p plus an error |d| <= h = s/2 (s the row's
code step), renormalized; 0 for the tokens left out (those more than 32 nats below the top), whose
weight is t. Then, for any constant c,

    KL(p~||q) - KL(p||q) = sum (p~ - p)(r - c) + KL(p~||p),

a kept token has |p~/p - 1| <= e = e^(2h) / (1 - t) - 1 (about s + t), and KL(p~||p) <= chi^2(p~||p)
<= e^2 + t, so per token

    |KLD_store - KLD_exact| <= e * sum_kept p|r| + sum_left_out p|r| + e^2 + t      (c = 0).

s <= 32 / 65534 = 4.9e-4 and t <= n_vocab * e^-32 (3.3e-9 at 256,000 tokens): about
5e-4 * E_p|r| + 3e-7. PPL, Δp and same-top use exact values the row also keeps.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from r7b.errors import R7BError
from r7b.quality.eval import EvalSettings, evaluate, score_model
from r7b.quality.kld import ReferenceRows, score_rows
from r7b.quality.reference import CODE_MAX, LOGP_RANGE, MAX_STEP, ReferenceLogProbs, decode_rows, encode_rows
from r7b.quality.scorer import Scorer
from test_quality import CTX, FIRST, THREADS, chunked_tokens, kld_bound, np_log_softmax, raw_logits

N_CHUNKS = 6
R7B = Path(sys.executable).with_name("r7b")


@pytest.fixture(scope="module")
def f16(stand_in_gguf) -> Path:
    return stand_in_gguf("f16")


@pytest.fixture(scope="module")
def q4_0(f16, tmp_path_factory) -> Path:
    from r7b.convert.quantize import quantize

    return quantize(f16, tmp_path_factory.mktemp("q") / "Q4_0.gguf", "Q4_0", threads=THREADS, progress=False)


@pytest.fixture(scope="module")
def text(held_out_text) -> str:
    return held_out_text["en"][:4000]  # about 1000 tokens: 7 chunks of 128


@pytest.fixture(scope="module")
def exact(f16, q4_0, text) -> dict[str, np.ndarray]:
    """Float64 figures per scored token, from llama-cpp-python's high-level API; no store code."""
    tokens, chunks = chunked_tokens(f16, text)
    ref, model = raw_logits(f16, chunks[:N_CHUNKS]), raw_logits(q4_0, chunks[:N_CHUNKS])
    out: dict[str, list] = {k: [] for k in ("kld", "bound", "nll_ref", "same_top", "p_log")}
    for i, (r, m) in enumerate(zip(ref, model)):
        p_log, q_log = np_log_softmax(r[FIRST:CTX - 1]), np_log_softmax(m[FIRST:CTX - 1])
        target = tokens[i * CTX + FIRST + 1:(i + 1) * CTX]
        p = np.exp(p_log)
        out["kld"].append(np.sum(p * (p_log - q_log), axis=1))
        out["bound"].append(kld_bound(p_log, q_log))
        out["nll_ref"].append(-p_log[np.arange(len(target)), target])
        out["same_top"].append(r[FIRST:CTX - 1].argmax(axis=1) == m[FIRST:CTX - 1].argmax(axis=1))
        out["p_log"].append(p_log)
    return {k: np.concatenate(v) for k, v in out.items()}


@pytest.fixture(scope="module")
def saved(f16, q4_0, text, tmp_path_factory) -> tuple[Path, object]:
    path = tmp_path_factory.mktemp("ref") / "ref.logprobs"
    (result,) = evaluate(f16, [q4_0], text, ctx=CTX, chunks=N_CHUNKS, threads=THREADS, save_reference=path)
    return path, result


def store_scores(store: ReferenceLogProbs, model: Path):
    with Scorer(model, ctx=store.ctx, threads=THREADS) as llm:
        return score_model(llm, store, store.n_chunks, EvalSettings())


# -- accuracy ---------------------------------------------------------------------------------------

def test_codes_are_within_half_a_step_of_the_float64_log_probs(saved, exact):
    store = ReferenceLogProbs.open(saved[0])
    rows = np.asarray(store.rows)
    codes = rows["codes"].astype(np.float64)
    step = rows["step"].astype(np.float64)[:, None]
    value = rows["floor"].astype(np.float64)[:, None] + step * (codes - 1)
    kept = codes > 0
    err = np.abs(value - exact["p_log"])
    assert np.all(err[kept] <= step.repeat(store.n_vocab, 1)[kept] * (0.5 + 1e-6))
    top = exact["p_log"].max(axis=1, keepdims=True)
    assert np.all(exact["p_log"][~kept] < (top - LOGP_RANGE).repeat(store.n_vocab, 1)[~kept] + 1e-3)
    assert np.all(step <= MAX_STEP * (1 + 1e-6))


def test_store_kld_equals_float64_within_the_bound(saved, q4_0, exact):
    store = ReferenceLogProbs.open(saved[0])
    got = store_scores(store, q4_0)
    err = np.abs(got.kld - exact["kld"])
    assert np.all(err <= exact["bound"]), (err / exact["bound"]).max()
    assert abs(got.kld.mean() - exact["kld"].mean()) <= exact["bound"].mean()
    assert exact["bound"].mean() < 0.05 * exact["kld"].mean()  # the bound is not vacuous here
    print(f"\nQ4_0, {len(err)} tokens: mean KLD {exact['kld'].mean():.6e}, |error of the mean| "
          f"{abs(got.kld.mean() - exact['kld'].mean()):.2e}, max per-token error {err.max():.2e} "
          f"(max relative {(err / exact['kld']).max():.2e}), mean bound {exact['bound'].mean():.2e}, "
          f"max error / bound {(err / exact['bound']).max():.3f}")


def test_a_wrong_scale_breaks_the_bound(saved, q4_0, text, f16):
    """The check above has teeth: steps off by one part in 1e4 put tokens outside it."""
    store = ReferenceLogProbs.open(saved[0])
    _, chunks = chunked_tokens(f16, text)
    p_log = np_log_softmax(raw_logits(f16, chunks[:1])[0][FIRST:CTX - 1])
    logits = raw_logits(q4_0, chunks[:1])[0][FIRST:CTX - 1]
    q_log = np_log_softmax(logits)
    want, bound = np.sum(np.exp(p_log) * (p_log - q_log), axis=1), kld_bound(p_log, q_log)
    rows = np.array(store.rows[:store.n_scored])

    def error(step_factor: float) -> np.ndarray:
        bad = rows.copy()
        bad["step"] *= np.float32(step_factor)
        return np.abs(score_rows(logits, decode_rows(bad), store.targets(0)).kld - want)

    assert np.all(error(1.0) <= bound)
    assert np.any(error(1.0001) > bound)


def test_ppl_and_same_top_are_exact(saved, q4_0, exact):
    store = ReferenceLogProbs.open(saved[0])
    got = store_scores(store, q4_0)
    np.testing.assert_allclose(got.nll_ref, exact["nll_ref"], rtol=1e-12)
    np.testing.assert_array_equal(got.same_top, exact["same_top"])
    result = saved[1]
    assert result.reference_ppl == pytest.approx(np.exp(exact["nll_ref"].mean()), rel=1e-9)
    assert result.top1_agreement == exact["same_top"].mean()
    assert result.kld_mean == pytest.approx(got.kld.mean(), rel=1e-12)


def test_a_model_against_itself_scores_next_to_zero():
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 4, (16, 3000)).astype(np.float32)
    targets = rng.integers(0, 3000, 16)
    s = score_rows(logits, decode_rows(encode_rows(logits, targets)), targets)
    assert np.all(np.abs(s.kld) <= 2 * MAX_STEP**2) and s.same_top.all()  # KL(p~||p) <= e^2 + t
    exact = ReferenceRows.from_logits(logits, targets)
    np.testing.assert_array_equal(s.nll_ref, -exact.target_logp)


def test_rows_keep_a_flat_row_and_leave_out_only_the_far_tail():
    logits = np.zeros((2, 50), np.float32)
    logits[1, 0], logits[1, 1] = 30, -3  # token 1: 33 nats below the top
    rows = encode_rows(logits, np.array([0, 2]))
    assert len(set(rows["codes"][0])) == 1 and rows["step"][0] < 1e-9  # one value, kept
    assert rows["codes"][1, 1] == 0 and rows["codes"][1, 0] == CODE_MAX and np.all(rows["codes"][1, 2:] > 0)
    ref = decode_rows(rows)
    np.testing.assert_allclose(ref.p[0], 1 / 50, rtol=1e-12)
    assert ref.p[1, 1] == 0 and ref.p[1].sum() == pytest.approx(1, rel=1e-12)


# -- size and format --------------------------------------------------------------------------------

@pytest.mark.parametrize("n_vocab, row_bytes", [(8000, 16020), (256000, 512020)])
def test_a_scored_token_takes_two_bytes_a_vocabulary_entry(n_vocab, row_bytes):
    head = ReferenceLogProbs.file_bytes(512, 1, n_vocab) - 255 * row_bytes
    assert head == 8192  # the header page and one chunk's token ids, page-aligned
    assert ReferenceLogProbs.file_bytes(512, 76, n_vocab) == 4096 + 155648 + 76 * 255 * row_bytes


def test_saved_file_has_the_stated_size(saved):
    store = ReferenceLogProbs.open(saved[0])
    assert saved[0].stat().st_size == ReferenceLogProbs.file_bytes(CTX, N_CHUNKS, store.n_vocab)


def test_progress_states_the_size_before_the_reference_pass(f16, text, tmp_path):
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    proc = subprocess.run([str(R7B), "eval", "--reference", str(f16), str(f16), "--text", str(path), "--ctx",
                           str(CTX), "--chunks", "2", "--threads", str(THREADS), "--json"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    size = ReferenceLogProbs.file_bytes(CTX, 2, 8000)
    line = next(x for x in proc.stderr.splitlines() if x.startswith("reference log-probs:"))
    assert f"{2 * (CTX - 1 - FIRST)} scored tokens x 16020 bytes" in line and f"({size} bytes)" in line
    assert proc.stderr.index(line) < proc.stderr.index("reference tiny-r7b")


def _write_old_format(path: Path) -> None:
    import json
    import struct

    blob = json.dumps({"format": 1, "ctx": 8, "n_chunks": 2, "n_vocab": 10, "vocab_sha256": "0",
                       "reference": "x"}).encode()
    path.write_bytes(b"R7BLOGP1" + struct.pack("<I", len(blob)) + blob + b"\0" * 8192)


def test_an_old_format_file_is_refused_with_a_recompute_hint(f16, tmp_path):
    old = tmp_path / "old.logprobs"
    _write_old_format(old)
    with pytest.raises(R7BError, match="older format.*recompute"):
        ReferenceLogProbs.open(old)
    proc = subprocess.run([str(R7B), "eval", str(f16), "--load-reference", str(old), "-q"], capture_output=True,
                          text=True, timeout=60)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert "older format" in lines[0] and "--save-reference" in lines[0] and str(old) in lines[0]


# -- disk space -------------------------------------------------------------------------------------

def test_a_temporary_reference_is_refused_when_the_temp_folder_is_short(f16, text, tmp_path, monkeypatch):
    import shutil
    import tempfile

    from r7b import fsutil

    real = shutil.disk_usage
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(fsutil.shutil, "disk_usage",
                        lambda p: real(p)._replace(free=100_000) if Path(p) == tmp_path else real(p))
    need = ReferenceLogProbs.file_bytes(CTX, 2, 8000)
    with pytest.raises(R7BError) as info:
        evaluate(f16, [f16], text, ctx=CTX, chunks=2, threads=THREADS)
    msg = str(info.value)
    assert "no space left for the reference log-probs" in msg and str(tmp_path) in msg and "TMPDIR" in msg
    assert fsutil.format_size(need) in msg and "97.7 KiB free" in msg and "\n" not in msg
    assert os.listdir(tmp_path) == []

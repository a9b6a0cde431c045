"""KL divergence and friends: the per-token scores of a model against a reference, and their summary.

The figures and their uncertainties are defined as llama-perplexity --kl-divergence defines them;
everything after the logits (or the reference's 16-bit codes) is float64, and the KL sum runs over
every token the reference kept (see reference.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Sequence

import numpy as np

PERCENTILES = {"kld_median": 0.5, "kld_p90": 0.9, "kld_p99": 0.99, "kld_p999": 0.999}


def standard_error(values: np.ndarray) -> float:
    """Standard error of the mean, sqrt(var / (n - 1)), the uncertainty llama-perplexity prints."""
    n = len(values)
    if n < 2:
        return 0.0
    return float(np.sqrt(np.var(values, dtype=np.float64) / (n - 1)))


def percentile(sorted_values: np.ndarray, fraction: float) -> float:
    """Linear interpolation between the nearest ranks (llama-perplexity's rule, numpy's default)."""
    n = len(sorted_values)
    if fraction <= 0:
        return float(sorted_values[0])
    if fraction >= 1:
        return float(sorted_values[-1])
    pos = fraction * (n - 1)
    i = int(pos)
    frac = pos - i
    return float((1 - frac) * sorted_values[i] + frac * sorted_values[min(i + 1, n - 1)])


def log_normalizer(logits: np.ndarray) -> np.ndarray:
    """log(sum(exp(row))) per row, in float64: log p = logit - this, with no rounding of p."""
    x = logits.astype(np.float64)
    top = x.max(axis=1, keepdims=True)
    return (top + np.log(np.exp(x - top).sum(axis=1, keepdims=True)))[:, 0]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-probabilities in float64, so that float32 logits lose nothing on the way."""
    return logits.astype(np.float64) - log_normalizer(logits)[:, None]


@dataclass(frozen=True)
class TokenScores:
    """Per scored position: NLL of the true token (model, reference), KL(ref || model), Δp, same top."""

    nll: np.ndarray
    nll_ref: np.ndarray
    kld: np.ndarray
    dp: np.ndarray
    same_top: np.ndarray

    @classmethod
    def concat(cls, parts: Sequence[TokenScores]) -> TokenScores:
        return cls(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(cls)))


@dataclass(frozen=True)
class ReferenceRows:
    """The reference at some scored positions, as scoring needs it: its distribution (log p and p,
    where p may be 0 for tokens a compact store left out), and, exactly, the true token's log p
    and the most likely token, so that PPL and same-top carry no storage error."""

    logp: np.ndarray
    p: np.ndarray
    target_logp: np.ndarray
    top: np.ndarray

    @classmethod
    def from_logits(cls, logits: np.ndarray, targets: np.ndarray) -> ReferenceRows:
        """The exact float64 rows, straight from logits."""
        lp = log_softmax(logits)
        return cls(lp, np.exp(lp), lp[np.arange(len(targets)), targets], logits.argmax(axis=1))


def score_rows(logits: np.ndarray, ref: ReferenceRows, targets: np.ndarray) -> TokenScores:
    """Compare a model's logits with the reference's, one row per scored position."""
    lp = log_softmax(logits)
    kld = (ref.p * (ref.logp - lp)).sum(axis=1)
    nll, nll_ref = -lp[np.arange(len(targets)), targets], -ref.target_logp
    dp = np.exp(-nll) - np.exp(-nll_ref)
    return TokenScores(nll, nll_ref, kld, dp, logits.argmax(axis=1) == ref.top)


def summarize(s: TokenScores) -> dict[str, float | int]:
    """The headline figures, each as llama-perplexity's KL-divergence summary defines it."""
    n = len(s.nll)
    ppl, ref_ppl = math.exp(s.nll.mean()), math.exp(s.nll_ref.mean())
    se, se_ref = standard_error(s.nll), standard_error(s.nll_ref)
    cov = float(np.mean(s.nll * s.nll_ref) - s.nll.mean() * s.nll_ref.mean()) / (n - 1)
    ratio = math.exp(s.nll.mean() - s.nll_ref.mean())
    kld = np.sort(s.kld)
    top1 = float(s.same_top.mean())
    msq = float(np.mean(s.dp ** 2))
    rms = math.sqrt(msq)
    return {
        "tokens_scored": n,
        "ppl": ppl, "ppl_stderr": ppl * se,
        "ppl_ratio": ratio, "ppl_ratio_stderr": ratio * math.sqrt(max(0.0, se**2 + se_ref**2 - 2 * cov)),
        "kld_mean": float(kld.mean()), "kld_stderr": standard_error(kld),
        **{key: percentile(kld, f) for key, f in PERCENTILES.items()},
        "kld_max": float(kld[-1]),
        "top1_agreement": top1, "top1_stderr": math.sqrt(top1 * (1 - top1) / (n - 1)),
        "rms_dp": rms, "rms_dp_stderr": 0.5 / rms * standard_error(s.dp ** 2) if rms > 0 else 0.0,
        "reference_ppl": ref_ppl, "reference_ppl_stderr": ref_ppl * se_ref,
    }

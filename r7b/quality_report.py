"""Present `r7b eval` results: a Markdown table and a plot of KL divergence against bits per weight."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

from r7b.quality import FileInfo, ModelQuality

COLUMNS = ("Model", "Type", "Size", "BPW", "PPL", "PPL ratio", "Mean KLD", "Median KLD", "KLD p99",
           "KLD p99.9", "Max KLD", "Same top", "RMS Δp")


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _pm(value: float, err: float, digits: int, scale: float = 1.0, unit: str = "") -> str:
    """value ± err with at least `digits` decimals, and more where the error needs them to show."""
    value, err = value * scale, err * scale
    if err > 0:
        digits = min(10, max(digits, 1 - math.floor(math.log10(err))))
    return f"{value:.{digits}f} ± {err:.{digits}f}{unit}"


def _row(r: ModelQuality) -> list[str]:
    return [
        f"`{Path(r.model).name}`", r.type, _size(r.file_bytes), f"{r.bits_per_weight:.2f}",
        _pm(r.ppl, r.ppl_stderr, 4), _pm(r.ppl_ratio, r.ppl_ratio_stderr, 4),
        _pm(r.kld_mean, r.kld_stderr, 6), f"{r.kld_median:.6f}", f"{r.kld_p99:.6f}", f"{r.kld_p999:.6f}",
        f"{r.kld_max:.6f}", _pm(r.top1_agreement, r.top1_stderr, 2, 100, " %"),
        _pm(r.rms_dp, r.rms_dp_stderr, 3, 100, " %"),
    ]


def _reference_row(r: ModelQuality, ref: FileInfo | None) -> list[str]:
    kind, size, bpw = (ref.type, _size(ref.file_bytes), f"{ref.bits_per_weight:.2f}") if ref else ("", "", "")
    return [f"`{r.reference}` (reference)", kind, size, bpw, _pm(r.reference_ppl, r.reference_ppl_stderr, 4),
            "1", *[""] * (len(COLUMNS) - 6)]


def markdown_table(results: Sequence[ModelQuality], reference: FileInfo | None = None) -> str:
    """One row per model under a reference row; ± is one standard error, as llama-perplexity prints."""
    if not results:
        return ""
    rows = [_reference_row(results[0], reference), *(_row(r) for r in results)]
    align = ["---", "---"] + ["---:"] * (len(COLUMNS) - 2)
    lines = ["| " + " | ".join(cells) + " |" for cells in (COLUMNS, align, *rows)]
    return "\n".join(lines)


def plot_kld(results: Sequence[ModelQuality], path: str | os.PathLike, *, title: str | None = None) -> None:
    """Mean KLD (log scale, ± one standard error) against bits per weight, one labelled point per model.

    Models quantized with an importance matrix are open squares labelled on the left, so that a
    type with and without one, which share a size, keep apart.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    shown = [r for r in results if r.kld_mean > 0]
    fig = Figure(figsize=(7.5, 4.8), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for imx, style, side in ((False, dict(fmt="o"), 1), (True, dict(fmt="s", mfc="none"), -1)):
        group = [r for r in shown if r.type.endswith("+imatrix") == imx]
        if not group:
            continue
        ax.errorbar([r.bits_per_weight for r in group], [r.kld_mean for r in group],
                    yerr=[r.kld_stderr for r in group], capsize=3, color="C0",
                    label="with importance matrix" if imx else "without", **style)
        for r in group:
            ax.annotate(r.type, (r.bits_per_weight, r.kld_mean), textcoords="offset points", xytext=(7 * side, 0),
                        fontsize=8, va="center", ha="left" if side > 0 else "right")
    if any(r.type.endswith("+imatrix") for r in shown):
        ax.legend(fontsize=8)
    ax.set_yscale("log")
    ax.margins(x=0.25, y=0.1)
    ax.set_xlabel("bits per weight")
    ax.set_ylabel("mean KL divergence (nats)")
    ref = results[0].reference if results else "the reference"
    ax.set_title(title or f"KL divergence from {ref}, {results[0].tokens_scored if results else 0} tokens")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png")

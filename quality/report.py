"""Reports: the machine a figure was measured on, Markdown tables, and `r7b eval`'s table and plot.

The report scripts (`make quality`, `make bench`, `make rehearsal`) and `r7b eval` share these, so
every document describes its machine and formats its tables the same way.
"""

from __future__ import annotations

import math
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any, Sequence

from r7b.memory import format_bytes

from .results import FileInfo, ModelQuality

def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def machine(repo: Path | None = None) -> dict[str, str]:
    """What the figures were measured on."""
    import llama_cpp

    cpu = platform.processor() or "unknown"
    mem = "unknown"
    try:
        info = Path("/proc/cpuinfo").read_text()
        cpu = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), cpu)
        kb = next(int(ln.split()[1]) for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal"))
        mem = f"{kb / 1024**2:.1f} GiB"
    except (OSError, StopIteration):
        pass
    commit = "unknown"
    if repo is not None:
        try:
            commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            pass
    return {"cpu": cpu, "cores": str(os.cpu_count()), "ram": mem, "os": platform.platform(),
            "python": platform.python_version(), "llama-cpp-python": llama_cpp.__version__,
            "llama.cpp": llama_cpp.llama_print_system_info().decode().strip().rstrip("|").strip(),
            "commit": commit, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def machine_line(m: dict[str, str] | None = None) -> str:
    m = m or machine()
    return f"{m['cpu']}, {m['cores']} cores, {m['ram']} RAM, Python {m['python']}, llama-cpp-python {m['llama-cpp-python']}"


def md_table(head: Sequence[str], rows: Sequence[Sequence[Any]], align: str = "") -> list[str]:
    """Markdown table lines (and a blank line); `align` holds 'l' or 'r' per column (default: l, then r)."""
    align = align or "l" + "r" * (len(head) - 1)
    sep = ["---:" if a == "r" else "---" for a in align]
    return ["| " + " | ".join(head) + " |", "| " + " | ".join(sep) + " |",
            *("| " + " | ".join(str(c) for c in row) + " |" for row in rows), ""]


COLUMNS = ("Model", "Type", "Size", "BPW", "PPL", "PPL ratio", "Mean KLD", "Median KLD", "KLD p99",
           "KLD p99.9", "Max KLD", "Same top", "RMS Δp")


def _pm(value: float, err: float, digits: int, scale: float = 1.0, unit: str = "") -> str:
    """value ± err with at least `digits` decimals, and more where the error needs them to show."""
    value, err = value * scale, err * scale
    if err > 0:
        digits = min(10, max(digits, 1 - math.floor(math.log10(err))))
    return f"{value:.{digits}f} ± {err:.{digits}f}{unit}"


def _row(r: ModelQuality) -> list[str]:
    return [
        f"`{Path(r.model).name}`", r.type, format_bytes(r.file_bytes), f"{r.bits_per_weight:.2f}",
        _pm(r.ppl, r.ppl_stderr, 4), _pm(r.ppl_ratio, r.ppl_ratio_stderr, 4),
        _pm(r.kld_mean, r.kld_stderr, 6), f"{r.kld_median:.6f}", f"{r.kld_p99:.6f}", f"{r.kld_p999:.6f}",
        f"{r.kld_max:.6f}", _pm(r.top1_agreement, r.top1_stderr, 2, 100, " %"),
        _pm(r.rms_dp, r.rms_dp_stderr, 3, 100, " %"),
    ]


def _reference_row(r: ModelQuality, ref: FileInfo | None) -> list[str]:
    kind, size, bpw = (ref.type, format_bytes(ref.file_bytes), f"{ref.bits_per_weight:.2f}") if ref else ("", "", "")
    return [f"`{r.reference}` (reference)", kind, size, bpw, _pm(r.reference_ppl, r.reference_ppl_stderr, 4),
            "1", *[""] * (len(COLUMNS) - 6)]


def markdown_table(results: Sequence[ModelQuality], reference: FileInfo | None = None) -> str:
    """One row per model under a reference row; ± is one standard error, as llama-perplexity prints."""
    if not results:
        return ""
    rows = [_reference_row(results[0], reference), *(_row(r) for r in results)]
    return "\n".join(md_table(COLUMNS, rows, "ll" + "r" * (len(COLUMNS) - 2))[:-1])


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

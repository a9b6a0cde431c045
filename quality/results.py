"""What `r7b eval` reports, apart from how it is computed: the file facts and the per-model figures."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from r7b.errors import R7BError
from r7b.gguf_validate import validate_gguf


@dataclass(frozen=True)
class FileInfo:
    """A GGUF as the table shows it: its type, size and bits per weight."""

    model: str
    type: str
    file_bytes: int
    bits_per_weight: float


def file_info(path: str | os.PathLike) -> FileInfo:
    """Read a GGUF's header (any architecture); a file that is not a valid GGUF is an R7BError."""
    p = Path(path)
    if not p.is_file():
        raise R7BError(f"no such model file: {p}")
    summary = validate_gguf(p, arch=None)
    n_params = sum(math.prod(t.shape) for t in summary.tensors)
    data_bytes = sum(t.nbytes for t in summary.tensors)
    bpw = 8 * data_bytes / n_params if n_params else 0.0
    return FileInfo(str(path), type_label(summary.metadata), summary.file_size, bpw)


def type_label(metadata: dict[str, Any]) -> str:
    """'Q4_K_M', 'F16', the project's recipe name, '+imatrix' when one was used."""
    import gguf

    name = metadata.get("r7b.quantize.recipe")
    if name is None:
        try:
            name = gguf.LlamaFileType(int(metadata["general.file_type"])).name
        except (KeyError, ValueError, TypeError):
            name = "unknown"
        name = name.removeprefix("MOSTLY_").removeprefix("ALL_")
    return f"{name}+imatrix" if "quantize.imatrix.file" in metadata else str(name)


@dataclass(frozen=True)
class ModelQuality:
    """One model against the reference on the same tokens; the field names are the JSON keys."""

    model: str
    type: str
    file_bytes: int
    bits_per_weight: float
    tokens_scored: int
    ppl: float
    ppl_stderr: float
    ppl_ratio: float
    ppl_ratio_stderr: float
    kld_mean: float
    kld_stderr: float
    kld_median: float
    kld_p90: float
    kld_p99: float
    kld_p999: float
    kld_max: float
    top1_agreement: float
    top1_stderr: float
    rms_dp: float
    rms_dp_stderr: float
    reference: str
    reference_ppl: float
    reference_ppl_stderr: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

"""Download, convert and quantize in one step (`r7b pull`).

The F16 conversion is an intermediate: it lives in a temporary folder beside the output (same
disk, so nothing is copied across file systems) unless --keep-f16 asks to keep it. An importance
matrix made from --imatrix-text is kept as NAME-imatrix.gguf, since it can be reused for other
types and the quantized file's metadata names it.
"""

from __future__ import annotations

import argparse
import fnmatch
import tempfile
from pathlib import Path

from r7b.cohere2 import COMMAND_R7B, Cohere2Dims
from r7b.errors import R7BError
from r7b.fsutil import check_free_space, check_output_path, format_size, same_file_system

from .checkpoint import read_dims
from .convert import convert
from .hub import CHECKPOINT_FILES
from .imatrix import imatrix
from .quantize import R7B_METADATA_BYTES, QuantType, planned_model_bytes, quant_type, quantize


def pull(hub_id: str, quant: str = "Q4_K_M", *, output_dir: str | Path | None = None,
         imatrix_text: str | Path | None = None, keep_f16: bool = False, revision: str | None = None,
         threads: int | None = None, force: bool = False, progress: bool = True) -> Path:
    """Fetch `hub_id` and write DIR/NAME-QUANT.gguf; returns its path."""
    qt = quant_type(quant)
    out_dir = _output_dir(output_dir)
    name = hub_id.rstrip("/").split("/")[-1]
    final = check_output_path(out_dir / f"{name}-{qt.name}.gguf", force=force)
    f16 = check_output_path(out_dir / f"{name}-F16.gguf", force=force) if keep_f16 else None
    imx = check_output_path(out_dir / f"{name}-imatrix.gguf", force=force) if imatrix_text else None
    if imatrix_text and not Path(imatrix_text).is_file():
        raise R7BError(f"calibration text not found: {imatrix_text}")
    check_disk(hub_id, qt, out_dir, revision=revision)
    with tempfile.TemporaryDirectory(prefix=".r7b-pull-", dir=out_dir) as work:
        f16 = convert(hub_id, f16 or Path(work) / f"{name}-F16.gguf", outtype="f16", force=force,
                      progress=progress, revision=revision)
        if imx is not None:
            imatrix(f16, imatrix_text, imx, threads=threads, force=force, progress=progress)
        return quantize(f16, final, qt.name, imatrix=imx, threads=threads, force=force, progress=progress)


def check_disk(hub_id: str, qt: QuantType, out_dir: Path, *, revision: str | None = None) -> None:
    """Refuse up front when the download (into the hub cache), the F16 intermediate and the
    quantized file cannot all fit; sizes that cannot be known yet (offline, say) are left to
    `convert` and `quantize`, which check again before they write."""
    dims = _hub_dims(hub_id, revision)
    if dims is None:
        return
    meta = R7B_METADATA_BYTES * dims.vocab // COMMAND_R7B.vocab + 64 * 1024
    f16, quantized = planned_model_bytes(dims, None, meta), planned_model_bytes(dims, qt, meta)
    parts = [f"F16 intermediate {format_size(f16)}", f"{qt.name} file {format_size(quantized)}"]
    download = _download_bytes(hub_id, revision)
    from huggingface_hub import constants

    cache = Path(constants.HF_HUB_CACHE)
    if download and not same_file_system(cache, out_dir):
        check_free_space(cache, download, f"downloading {hub_id}")
        download = 0
    if download:
        parts.insert(0, f"download {format_size(download)}")
    check_free_space(out_dir, f16 + quantized + download, f"pulling {hub_id} ({' + '.join(parts)})")


def _hub_dims(hub_id: str, revision: str | None) -> Cohere2Dims | None:
    """The model's sizes from its config.json (a small download, or the cache); None if not to be had."""
    try:
        from huggingface_hub import hf_hub_download

        return read_dims(Path(hf_hub_download(hub_id, "config.json", revision=revision)).parent)
    except Exception:  # noqa: BLE001 -- offline, unknown id, ...: convert reports it properly
        return None


def _download_bytes(hub_id: str, revision: str | None) -> int:
    """Bytes still to download: 0 when the snapshot is cached or the hub cannot say."""
    try:
        from huggingface_hub import HfApi, snapshot_download

        try:
            snapshot_download(hub_id, revision=revision, allow_patterns=CHECKPOINT_FILES, local_files_only=True)
            return 0
        except Exception:  # noqa: BLE001 -- not (completely) cached
            pass
        info = HfApi().model_info(hub_id, revision=revision, files_metadata=True)
        return sum(f.size or 0 for f in info.siblings or ()
                   if any(fnmatch.fnmatch(f.rfilename, p) for p in CHECKPOINT_FILES))
    except Exception:  # noqa: BLE001 -- offline: unknown
        return 0


def _output_dir(path: str | Path | None) -> Path:
    out = Path(path) if path else Path(".")
    if out.exists() and not out.is_dir():
        raise R7BError(f"output path is not a folder: {out}")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise R7BError(f"cannot create output folder {out}: {exc.strerror}") from None
    return out


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("pull", help="download, convert and quantize a hub checkpoint in one step",
                              description=__doc__.splitlines()[0])
    p.add_argument("hub_id", metavar="HUB_ID", help="e.g. CohereLabs/c4ai-command-r7b-12-2024")
    p.add_argument("--quant", default="Q4_K_M", metavar="T", help="quantization type (default Q4_K_M)")
    p.add_argument("-o", "--output-dir", metavar="DIR", help="where to write (default: here)")
    p.add_argument("--imatrix-text", metavar="FILE", help="calibration text for an importance matrix")
    p.add_argument("--keep-f16", action="store_true", help="keep the F16 conversion as NAME-F16.gguf")
    p.add_argument("--revision", help="hub revision (branch, tag or commit)")
    p.add_argument("--threads", type=int, help="CPU threads")
    p.add_argument("--force", action="store_true", help="overwrite existing output files")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    out = pull(args.hub_id, args.quant, output_dir=args.output_dir, imatrix_text=args.imatrix_text,
               keep_f16=args.keep_f16, revision=args.revision, threads=args.threads, force=args.force,
               progress=not args.quiet)
    print(out)
    return 0

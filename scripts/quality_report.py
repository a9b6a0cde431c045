"""Measure what each quantization of the stand-in costs and write docs/quality.md (`make quality`).

Converts the stand-in to F16 (the reference), collects an importance matrix on one half of the
English held-out text, quantizes to each type (Q4_K_M, IQ4_XS and the project's recipe with and
without the importance matrix), and runs `r7b eval` on the other half and on Spanish text
that the calibration never saw. Writes the tables to docs/quality.md and the KL divergence plot
to docs/quality.png.

    .venv/bin/python scripts/quality_report.py            # about 5 minutes on 2 cores
    .venv/bin/python scripts/quality_report.py --quick    # small run into build/quality-quick/
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAND_IN = Path(os.environ.get("R7B_STAND_IN", ROOT / "tests" / "fixtures" / "tiny-r7b"))
HELD_OUT = ROOT / "tests" / "fixtures" / "held-out"

from r7b.convert.convert import convert  # noqa: E402
from r7b.convert.imatrix import imatrix  # noqa: E402
from r7b.convert.quantize import RECIPE, quantize  # noqa: E402
from r7b.memory import format_bytes  # noqa: E402
from r7b.quality.eval import evaluate  # noqa: E402
from r7b.quality.reference import ReferenceLogProbs, row_dtype  # noqa: E402
from r7b.quality.results import FileInfo, ModelQuality, file_info  # noqa: E402
from r7b.quality.report import log, machine_line, markdown_table, plot_kld  # noqa: E402


@dataclass(frozen=True)
class Variant:
    qtype: str
    with_imatrix: bool = False

    @property
    def filename(self) -> str:
        return f"tiny-r7b-{self.qtype}{'-imatrix' if self.with_imatrix else ''}.gguf"


VARIANTS = (
    Variant("Q8_0"), Variant("Q6_K"), Variant("Q5_K_M"), Variant("Q4_K_M"), Variant("Q4_K_M", True),
    Variant(RECIPE.name), Variant(RECIPE.name, True), Variant("IQ4_XS"), Variant("IQ4_XS", True), Variant("Q4_0"),
)


def halves(text: str) -> tuple[str, str]:
    """Split at the paragraph break nearest the middle, so the two halves share no sentence."""
    mid = len(text) // 2
    before, after = text.rfind("\n\n", 0, mid), text.find("\n\n", mid)
    cut = before if after < 0 or (before >= 0 and mid - before <= after - mid) else after
    if cut < 0:
        raise SystemExit("the held-out text has no paragraph break to split at")
    return text[:cut], text[cut + 2:]


def build_models(work: Path, calibration: Path, threads: int | None) -> tuple[Path, list[Path]]:
    """The F16 reference, an importance matrix from `calibration`, and every variant; all redone."""
    log(f"converting {STAND_IN} to F16")
    ref = convert(str(STAND_IN), work / "tiny-r7b-F16.gguf", outtype="f16", force=True, progress=False)
    log("collecting the importance matrix")
    imx = imatrix(ref, calibration, work / "tiny-r7b.imatrix", ctx=512, threads=threads, force=True, progress=False)
    models = []
    for v in VARIANTS:
        log(f"quantizing {v.filename}")
        models.append(quantize(ref, work / v.filename, v.qtype, imatrix=imx if v.with_imatrix else None,
                               threads=threads, force=True, progress=False))
    return ref, models


def run_eval(ref: Path, models: list[Path], text: str, name: str, args: argparse.Namespace) -> list[ModelQuality]:
    log(f"evaluating on {name}")
    return evaluate(ref, models, text, ctx=args.ctx, chunks=args.chunks, threads=args.threads, progress=True)


def embedding_share(path: Path) -> float:
    """Fraction of the parameters in the tied token embedding."""
    from r7b.gguf_validate import validate_gguf

    tensors = validate_gguf(path).tensors
    total = sum(math.prod(t.shape) for t in tensors)
    return sum(math.prod(t.shape) for t in tensors if t.name == "token_embd.weight") / total


def reference_store(ctx: int, chunks: int) -> str:
    """What the reference file costs, for the stand-in and for Command R7B."""
    def size(n_vocab: int) -> str:
        return format_bytes(ReferenceLogProbs.file_bytes(ctx, chunks, n_vocab))

    per_token = {v: row_dtype(v).itemsize for v in (8000, 256000)}
    return f"""The reference's log-probabilities are stored as llama-perplexity stores its `--kl-divergence-base` file:
16-bit codes, 2 bytes per vocabulary entry and scored token ({per_token[8000]:,} bytes a token for the
stand-in's 8,000 tokens, {per_token[256000]:,} for Command R7B's 256,000), plus the true token's float64
log-probability and the top token, so PPL, Δp and same-top are exact. `r7b eval` states the file's size before
the reference pass and refuses when its disk (the temporary folder's, without `--save-reference`) lacks it: for
these {chunks} chunks of {ctx} tokens it is {size(8000)} for the stand-in and {size(256000)} for Command R7B. Each
token's KL divergence is within about 5e-4 × E_p|log p/q| + 3e-7 of a float64 computation from the full logits
(derived in tests/test_reference_store.py)."""


def report(ref: FileInfo, en: list[ModelQuality], es: list[ModelQuality], args: argparse.Namespace,
           minutes: float) -> str:
    chunks = en[0].tokens_scored // (args.ctx - 1 - args.ctx // 2)
    es_chunks = es[0].tokens_scored // (args.ctx - 1 - args.ctx // 2)
    return f"""# Quality: what each quantization costs

Generated by `make quality` ([scripts/quality_report.py](../scripts/quality_report.py)); do not edit by hand.
Measured {time.strftime('%Y-%m-%d', time.gmtime())} on {machine_line()}, in {minutes:.1f} minutes.

Every figure comes from `r7b eval`, which computes what `llama-perplexity --kl-divergence` reports: the text is
tokenized once, cut into chunks of {args.ctx} tokens, each chunk is evaluated from an empty cache with BOS
first, and the predictions for the second half of each chunk are scored against the F16 reference on the same
tokens. ± is one standard error.

- **PPL ratio**: the model's perplexity over the reference's. Near 1 it hides losses: errors in both directions
  cancel, which is why it can dip below 1.
- **KLD**: KL divergence of the model's next-token distribution from the reference's, in nats, per token;
  mean, median and tail. The tail (p99, p99.9, max) shows the rare tokens where a quantization goes wrong.
- **Same top**: how often the model's most likely next token is the reference's; **RMS Δp**: root mean
  square change in the probability of the actual next token.
- **+imatrix**: quantized with an importance matrix collected by `r7b imatrix` on the second half of
  `tests/fixtures/held-out/en.txt`; the English figures come from the first half, so calibration and
  evaluation share no text. Q4_K_R7B is the project's recipe (see `r7b quantize --help`).

{reference_store(args.ctx, chunks)}

## The stand-in, English

First half of `tests/fixtures/held-out/en.txt`: {chunks} chunks, {en[0].tokens_scored} tokens scored.

{markdown_table(en, ref)}

![Mean KL divergence against bits per weight](quality.png)

## The stand-in, Spanish

First half of `tests/fixtures/held-out/es.txt`, which no importance matrix saw: {es_chunks} chunks,
{es[0].tokens_scored} tokens scored.

{markdown_table(es, ref)}

## What carries over to Command R7B

{embedding_share(Path(ref.model)):.0%} of the stand-in's parameters are its tied token embedding, which every
type keeps at Q6_K or better; that is why its bits per weight sit well above each type's nominal figure
(8.5 for Q8_0, 4.5 for Q4_0). In Command R7B the embedding is 13% of the parameters. The order of the
types and the gaps between them are what to take from these tables; the real model's absolute
divergences differ. README.md ("Measuring quality") shows how to run the same suite on Command R7B.
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="ctx 128 and 8 chunks, into build/quality-quick/")
    ap.add_argument("--ctx", type=int, default=512, help="tokens per chunk (default 512)")
    ap.add_argument("--chunks", type=int, help="chunks per text (default: all of each half)")
    ap.add_argument("--threads", type=int, default=1,
                    help="llama.cpp threads (default 1: on a shared machine, more threads than free cores is slower)")
    ap.add_argument("--out", type=Path, help="folder for quality.md and quality.png (default docs/)")
    ap.add_argument("--work", type=Path, default=ROOT / "build" / "quality", help="folder for the model files")
    args = ap.parse_args()
    if args.quick:
        args.ctx, args.chunks = 128, args.chunks or 8
    out = args.out or (ROOT / "build" / "quality-quick" if args.quick else ROOT / "docs")
    for folder in (out, args.work):
        folder.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    en_eval, en_calib = halves((HELD_OUT / "en.txt").read_text(encoding="utf-8"))
    es_eval, _ = halves((HELD_OUT / "es.txt").read_text(encoding="utf-8"))
    calibration = args.work / "calibration.txt"
    calibration.write_text(en_calib, encoding="utf-8")
    ref, models = build_models(args.work, calibration, args.threads)
    en = run_eval(ref, models, en_eval, "English", args)
    es = run_eval(ref, models, es_eval, "Spanish", args)
    plot_kld(en, out / "quality.png", title=f"Stand-in, English: KL divergence from F16 ({en[0].tokens_scored} tokens)")
    text = report(file_info(ref), en, es, args, (time.monotonic() - t0) / 60)
    (out / "quality.md").write_text(text, encoding="utf-8")
    print(markdown_table(en, file_info(ref)))
    log(f"wrote {out / 'quality.md'} and {out / 'quality.png'}")


if __name__ == "__main__":
    sys.exit(main())

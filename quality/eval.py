"""`r7b eval`: what a quantization costs, in the figures llama-perplexity --kl-divergence reports.

Chunking follows llama-perplexity. The text is tokenized once, with BOS, and cut into consecutive
chunks of `ctx` tokens (a short tail is dropped); the text must hold at least two chunks. Each
chunk is evaluated from an empty cache with its first token replaced by BOS, and the predictions
made at positions ctx/2 .. ctx-2 (of the tokens at ctx/2+1 .. ctx-1) are scored, so every scored
token has at least ctx/2 tokens of context.

The reference runs once. Its log-probabilities at the scored positions go to a memory-mapped
file, with the token ids and ctx they belong to; each model then runs chunk by chunk against that
file, so memory stays at one chunk's rows whatever the vocabulary. The file can be kept
(`--save-reference`) and reused (`--load-reference`). Before the reference pass the command states
the file's size and refuses, in one line, when its file system (the temporary folder's without
`--save-reference`) lacks the room.

A row holds 16-bit log-probabilities, as llama-perplexity's base file does (2 bytes a token, about
500 KiB a position for Command R7B; see `reference.py`), plus the true token's float64
log-probability and the reference's top token. PPL, PPL ratio, Δp and same-top are therefore
exact; the KL divergence is computed from the 16-bit row renormalized over the tokens it keeps
(all within 32 nats of the top). Each token's KL divergence is then within
(s + t) * E_p|log p/q| + t * max|log p/q| over the tokens left out + (s + t)^2 + t of the float64
value from the full logits, where s <= 4.9e-4 is the row's code step and t <= n_vocab * e^-32 the
weight left out: about 5e-4 * E_p|log p/q| + 3e-7 (derived in tests/test_reference_store.py).

llama-perplexity's KL sum leaves out terms with p_ref < e^-16; here it leaves out those below
e^-32 times the top probability, and everything after the codes is float64. The definitions of
the figures are otherwise its own.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from tqdm import tqdm

from r7b.errors import R7BError
from r7b.fsutil import atomic_output, check_output_path, existing_folder, format_size
from r7b.runtime.options import add_rpc_options, rpc_kwargs

from .kld import TokenScores, score_rows, summarize
from .reference import ReferenceLogProbs, decode_rows, encode_rows, vocab_difference, vocab_digest
from .report import markdown_table, plot_kld
from .results import FileInfo, ModelQuality, file_info
from .scorer import KV_TYPES, Scorer

DEFAULT_CTX = 512
MIN_CTX = 8
BLOCK_ELEMENTS = 1 << 22  # float64 elements per scoring block: 32 MiB per temporary array


def read_text(path: str | os.PathLike) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise R7BError(f"cannot read text {path}: {exc}") from None


@dataclass(frozen=True)
class EvalSettings:
    ctx: int | None = None
    chunks: int | None = None
    threads: int | None = None
    kv_type: str = "f32"
    progress: bool = False
    rpc: tuple[str, ...] = ()  # RPC workers sharing the layers (see r7b.rpc)
    tensor_split: tuple[float, ...] | None = None

    def check(self) -> None:
        if self.ctx is not None and self.ctx < MIN_CTX:
            raise R7BError(f"--ctx must be at least {MIN_CTX}")
        if self.chunks is not None and self.chunks < 1:
            raise R7BError("--chunks must be at least 1")
        if self.threads is not None and self.threads < 1:
            raise R7BError("--threads must be at least 1")
        if self.kv_type not in KV_TYPES:
            raise R7BError(f"unknown KV cache type {self.kv_type!r}; choose from {', '.join(KV_TYPES)}")


def _row_blocks(n_rows: int, n_vocab: int) -> Iterator[slice]:
    step = max(1, BLOCK_ELEMENTS // n_vocab)
    for i in range(0, n_rows, step):
        yield slice(i, min(i + step, n_rows))


def _chunk_bar(n: int, desc: str, settings: EvalSettings) -> tqdm:
    return tqdm(range(n), desc=desc, unit="chunk", disable=not settings.progress, file=sys.stderr)


def compute_reference(llm: Scorer, store: ReferenceLogProbs, settings: EvalSettings) -> None:
    """Fill `store` with the reference's 16-bit rows, one chunk at a time."""
    for c in _chunk_bar(store.n_chunks, f"reference {llm.path.name}", settings):
        targets = store.targets(c)
        for pos, logits in llm.scored_logits(store.chunk_input(c, llm.bos), store.first):
            r0, t0 = store.row(c, pos), pos - store.first
            for b in _row_blocks(len(logits), store.n_vocab):
                store.rows[r0 + b.start:r0 + b.stop] = encode_rows(logits[b], targets[t0 + b.start:t0 + b.stop])
    store.flush()


def score_model(llm: Scorer, store: ReferenceLogProbs, n_chunks: int, settings: EvalSettings) -> TokenScores:
    """Run the model over the first `n_chunks` chunks and compare each scored row with the reference."""
    parts = []
    for c in _chunk_bar(n_chunks, llm.path.name, settings):
        targets = store.targets(c)
        for pos, logits in llm.scored_logits(store.chunk_input(c, llm.bos), store.first):
            r0, t0 = store.row(c, pos), pos - store.first
            for b in _row_blocks(len(logits), store.n_vocab):
                ref = decode_rows(store.rows[r0 + b.start:r0 + b.stop])
                parts.append(score_rows(logits[b], ref, targets[t0 + b.start:t0 + b.stop]))
    return TokenScores.concat(parts)


def _tokens_for(text: str, llm: Scorer, ctx: int, chunks: int | None) -> np.ndarray:
    tokens = llm.tokenize(text)
    if len(tokens) < 2 * ctx:
        raise R7BError(f"the text has {len(tokens)} tokens; --ctx {ctx} needs at least {2 * ctx} "
                       f"(two chunks, as llama-perplexity requires): give more text or a smaller --ctx")
    n_chunks = len(tokens) // ctx if chunks is None else min(chunks, len(tokens) // ctx)
    return tokens[:n_chunks * ctx]


def _check_vocab(path: Path, *, ref_texts: Sequence[bytes] | None = None, digest: str | None = None) -> None:
    """Refuse a model whose token list differs from the reference's (given as texts or as a digest)."""
    with Scorer(path) as llm:
        texts = llm.token_texts()
    diff = vocab_difference(ref_texts, texts) if ref_texts is not None else None
    if diff is None and digest is not None and vocab_digest(texts) != digest:
        diff = "its token list differs from the one the saved reference used"
    if diff:
        raise R7BError(f"{path} does not share the reference's vocabulary ({diff}); "
                       "KL divergence needs the same tokens")


def _prepare(reference: Path, models: Sequence[Path], text: str, s: EvalSettings) -> tuple[np.ndarray, list[bytes]]:
    """Everything cheap that can fail, before the reference pass: vocabularies and the token count."""
    with Scorer(reference) as ref:
        ref_texts = ref.token_texts()
        tokens = _tokens_for(text, ref, s.ctx or DEFAULT_CTX, s.chunks)
    for path in models:
        _check_vocab(path, ref_texts=ref_texts)
    return tokens, ref_texts


def _check_saved(store: ReferenceLogProbs, reference: Path | None, models: Sequence[Path], text: str | None,
                 s: EvalSettings) -> int:
    """Check saved log-probs against this run; return the number of chunks to use."""
    if s.ctx is not None and s.ctx != store.ctx:
        raise R7BError(f"{store.path} was computed with --ctx {store.ctx}, not {s.ctx}")
    if s.chunks is not None and s.chunks > store.n_chunks:
        raise R7BError(f"{store.path} holds {store.n_chunks} chunks; --chunks {s.chunks} asks for more")
    paths = [reference, *models] if reference is not None else list(models)
    for path in paths:
        _check_vocab(path, digest=store.header["vocab_sha256"])
    if text is not None:
        with Scorer(paths[0]) as llm:
            tokens = llm.tokenize(text)[:len(store.tokens)]
        if not np.array_equal(tokens, store.tokens):
            raise R7BError(f"{store.path} was computed on a different text")
    return s.chunks or store.n_chunks


SAVE_HINT = " (fewer --chunks, or another folder)"
TEMP_HINT = " (fewer --chunks, --save-reference on a bigger disk, or TMPDIR set to one)"


def _announce(store: ReferenceLogProbs, s: EvalSettings) -> None:
    """Say what the reference file takes, before the long pass that fills it."""
    if s.progress:
        size = ReferenceLogProbs.file_bytes(store.ctx, store.n_chunks, store.n_vocab)
        print(f"reference log-probs: {store.n_rows} scored tokens x {store.rows.itemsize} bytes = "
              f"{format_size(size)} ({size} bytes) in {existing_folder(store.path)}", file=sys.stderr)


def _compute_store(path: Path, reference: Path, tokens: np.ndarray, ref_texts: list[bytes],
                   s: EvalSettings, hint: str = SAVE_HINT) -> ReferenceLogProbs:
    ctx = s.ctx or DEFAULT_CTX
    store = ReferenceLogProbs.create(path, tokens, ctx=ctx, n_vocab=len(ref_texts),
                                     vocab_sha256=vocab_digest(ref_texts), reference=reference.name, hint=hint)
    _announce(store, s)
    with Scorer(reference, ctx=ctx, threads=s.threads, kv_type=s.kv_type, configure=_placement(reference, s)) as llm:
        compute_reference(llm, store, s)
    return store


@contextlib.contextmanager
def _reference_store(reference: Path | None, text: str | None, models: Sequence[Path], s: EvalSettings,
                     save: Path | None, load: Path | None, force: bool) -> Iterator[tuple[ReferenceLogProbs, int]]:
    """The reference's log-probabilities and the chunk count to score: loaded, saved, or temporary."""
    if load is not None:
        store = ReferenceLogProbs.open(load)
        yield store, _check_saved(store, reference, models, text, s)
        return
    tokens, ref_texts = _prepare(reference, models, text, s)
    if save is not None:
        with atomic_output(save, force=force) as tmp:
            _compute_store(tmp, reference, tokens, ref_texts, s).flush()
        store = ReferenceLogProbs.open(save)
        yield store, store.n_chunks
        return
    fd, tmp = tempfile.mkstemp(prefix="r7b-eval-", suffix=".logprobs")
    os.close(fd)
    try:
        store = _compute_store(Path(tmp), reference, tokens, ref_texts, s, hint=TEMP_HINT)
        yield store, store.n_chunks
    finally:
        Path(tmp).unlink(missing_ok=True)


def evaluate(reference: str | os.PathLike | None, models: Sequence[str | os.PathLike], text: str | None = None,
             *, ctx: int | None = None, chunks: int | None = None, threads: int | None = None,
             kv_type: str = "f32", save_reference: str | os.PathLike | None = None,
             load_reference: str | os.PathLike | None = None, force: bool = False,
             progress: bool = False, rpc: Sequence[str] | None = None,
             tensor_split: Sequence[float] | None = None) -> list[ModelQuality]:
    """Score each model against the reference on the same tokens (rules in the module docstring).

    `reference` may be None when `load_reference` names a file saved by an earlier run; `text`
    may be None then too (the saved token ids are used). `ctx` defaults to 512.
    """
    s = EvalSettings(ctx, chunks, threads, kv_type, progress, tuple(rpc or ()),
                     tuple(tensor_split) if tensor_split else None)
    s.check()
    if reference is None and load_reference is None:
        raise R7BError("a reference model (or saved reference log-probs) is needed")
    if text is None and load_reference is None:
        raise R7BError("a text to evaluate on is needed")
    if not models:
        raise R7BError("no models to evaluate")
    infos = [file_info(m) for m in models]
    ref_path = Path(reference) if reference is not None else None
    if ref_path is not None:
        file_info(ref_path)
    save, load = (Path(p) if p is not None else None for p in (save_reference, load_reference))
    with _reference_store(ref_path, text, [Path(m) for m in models], s, save, load, force) as (store, n_chunks):
        return [_quality(info, store, n_chunks, s) for info in infos]


def _placement(path: Path, s: EvalSettings):
    """With RPC workers: the `llama_model_params` setter that shares `path`'s layers with them."""
    if not s.rpc:
        return None
    from r7b import rpc
    from r7b.gguf_reader import read_gguf

    n_layers = int(read_gguf(path).metadata["cohere2.block_count"])
    return rpc.plan(s.rpc, n_layers, s.tensor_split).configure


def _quality(info: FileInfo, store: ReferenceLogProbs, n_chunks: int, s: EvalSettings) -> ModelQuality:
    with Scorer(Path(info.model), ctx=store.ctx, threads=s.threads, kv_type=s.kv_type,
                configure=_placement(Path(info.model), s)) as llm:
        scores = score_model(llm, store, n_chunks, s)
    return ModelQuality(**asdict(info), **summarize(scores), reference=store.header["reference"])


# -- the command --------------------------------------------------------------------------------

def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="quality drop of quantized models: PPL, KL divergence, top-1 agreement",
                              description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", metavar="MODEL.gguf", help="models to compare with the reference")
    p.add_argument("--reference", metavar="REF.gguf", help="the unquantized model (F16/BF16/F32)")
    p.add_argument("--text", metavar="FILE", help="UTF-8 text to evaluate on")
    p.add_argument("--ctx", type=int, help=f"tokens per chunk (default {DEFAULT_CTX})")
    p.add_argument("--chunks", type=int, help="evaluate at most this many chunks (default: all)")
    p.add_argument("--threads", type=int, help="CPU threads (default: one per core, at most 8)")
    p.add_argument("--kv-type", choices=list(KV_TYPES), default="f32",
                   help="KV cache type (default f32, so the cache adds no error of its own)")
    p.add_argument("--json", action="store_true", help="print a JSON list, one object per model")
    p.add_argument("--plot", metavar="OUT.png", help="plot mean KL divergence against bits per weight")
    p.add_argument("--save-reference", metavar="FILE",
                   help="keep the reference's log-probs for later runs (2 bytes per vocabulary entry and scored token)")
    p.add_argument("--load-reference", metavar="FILE", help="reuse log-probs saved by --save-reference")
    p.add_argument("--force", action="store_true", help="overwrite existing --plot / --save-reference files")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_rpc_options(p)
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    for out in (args.plot, args.save_reference):
        if out is not None:
            check_output_path(out, force=args.force)
    if args.reference is None and args.load_reference is None:
        raise R7BError("--reference REF.gguf is required (or --load-reference FILE)")
    if args.text is None and args.load_reference is None:
        raise R7BError("--text FILE is required (or --load-reference FILE)")
    text = read_text(args.text) if args.text else None
    results = evaluate(args.reference, args.models, text, ctx=args.ctx, chunks=args.chunks,
                       threads=args.threads, kv_type=args.kv_type, save_reference=args.save_reference,
                       load_reference=args.load_reference, force=args.force, progress=not args.quiet,
                       **rpc_kwargs(args))
    if args.json:
        print(json.dumps([r.to_json() for r in results], indent=2))
    else:
        ref = file_info(args.reference) if args.reference else None
        print(markdown_table(results, ref))
    if args.plot:
        with atomic_output(args.plot, force=args.force) as tmp:
            plot_kld(results, tmp)
    return 0

"""Convert a Hugging Face Command R7B checkpoint to GGUF (`r7b convert`).

Tensors stream from the safetensors files into the GGUF file in blocks of rows, read, cast and
written one block at a time, so peak memory is a few blocks whatever the model's size (the
256,000-row embedding of the real model never sits in RAM whole). Norm weights stay F32 as llama.cpp expects; matrices take the
requested type. The project's three chat templates are embedded so any GGUF runtime renders the
prompt correctly.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from string import ascii_letters, digits

import gguf
import numpy as np
from tqdm import tqdm

from r7b.cohere2 import ARCH, PRE_TOKENIZER, Cohere2Dims, gguf_name
from r7b.errors import R7BError
from r7b.fsutil import atomic_output, check_free_space, check_output_path

from .checkpoint import TensorRef, bf16_to_f32, f32_to_bf16, read_blocks, read_dims, tensor_refs
from .hub import is_hub_id, resolve_checkpoint
from .vocab import checkpoint_templates, read_vocab

OUTTYPES = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "bf16": gguf.LlamaFileType.MOSTLY_BF16,
}
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class PlannedTensor:
    """One output tensor: its source, GGUF name and storage type."""

    ref: TensorRef
    name: str
    qtype: gguf.GGMLQuantizationType


def plan_tensors(dims: Cohere2Dims, refs: dict[str, TensorRef], outtype: str) -> list[PlannedTensor]:
    """Check names and shapes against the architecture before writing a byte."""
    if not dims.tied_embeddings or "lm_head.weight" in refs:
        raise R7BError("untied output embeddings (lm_head.weight) are not supported: llama.cpp's cohere2 ties them")
    expected = dims.hf_weights()
    unexpected = [n for n in refs if n not in expected and not n.endswith(IGNORED_SUFFIXES)]
    if unexpected:
        raise R7BError(f"unexpected tensor {unexpected[0]} ({len(unexpected)} in all): not a Cohere2 checkpoint?")
    plan = []
    for name, shape in expected.items():
        ref = refs.get(name)
        if ref is None:
            raise R7BError(f"missing tensor {name}")
        if ref.shape != shape:
            raise R7BError(f"tensor {name} has shape {list(ref.shape)}, expected {list(shape)} from config.json")
        qtype = gguf.GGMLQuantizationType.F32 if len(shape) == 1 else _matrix_type(outtype)
        plan.append(PlannedTensor(ref, gguf_name(name), qtype))
    return plan


def _matrix_type(outtype: str) -> gguf.GGMLQuantizationType:
    return {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
            "bf16": gguf.GGMLQuantizationType.BF16}[outtype]


def convert_tensor(data: np.ndarray, source_dtype: str, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """Cast one tensor; refuse values that overflow F16 rather than writing infinities."""
    if qtype == gguf.GGMLQuantizationType.BF16:
        return np.asarray(data) if source_dtype == "BF16" else f32_to_bf16(np.asarray(data, dtype=np.float32))
    values = bf16_to_f32(np.asarray(data)) if source_dtype == "BF16" else np.asarray(data, dtype=np.float32)
    if qtype == gguf.GGMLQuantizationType.F32:
        return values
    out = values.astype(np.float16)
    if not np.isfinite(out).all() and np.isfinite(values).all():
        raise R7BError("a weight overflows F16; convert with --outtype bf16 or f32")
    return out


def add_metadata(writer: gguf.GGUFWriter, dims: Cohere2Dims, outtype: str, name: str, source: str) -> None:
    writer.add_name(name)
    if is_hub_id(source):
        writer.add_source_repo_url(f"https://huggingface.co/{source}")
    writer.add_file_type(int(OUTTYPES[outtype]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(dims.vocab)
    writer.add_context_length(dims.context_length)
    writer.add_embedding_length(dims.hidden)
    writer.add_feed_forward_length(dims.ffn)
    writer.add_block_count(dims.n_layers)
    writer.add_head_count(dims.n_heads)
    writer.add_head_count_kv(dims.n_kv_heads)
    writer.add_key_length(dims.head_dim)
    writer.add_value_length(dims.head_dim)
    writer.add_rope_freq_base(dims.rope_theta)
    writer.add_rope_dimension_count(dims.rope_dim)
    writer.add_rope_scaling_type(gguf.RopeScalingType.NONE)
    writer.add_layer_norm_eps(dims.layer_norm_eps)
    writer.add_logit_scale(dims.logit_scale)
    writer.add_sliding_window(dims.sliding_window)


def add_tokenizer(writer: gguf.GGUFWriter, folder: Path, dims: Cohere2Dims) -> None:
    vocab = read_vocab(folder, dims.vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(PRE_TOKENIZER)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    for setter, value in ((writer.add_bos_token_id, vocab.bos_id), (writer.add_eos_token_id, vocab.eos_id),
                          (writer.add_pad_token_id, vocab.pad_id), (writer.add_unk_token_id, vocab.unk_id)):
        if value is not None:
            setter(value)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    add_chat_templates(writer, chat_templates(folder))


def add_chat_templates(writer: gguf.GGUFWriter, templates: list[dict[str, str]]) -> None:
    """Write the templates under llama.cpp's keys, the names listed in the order given.

    gguf-py's `add_chat_template` lists the names from a set, whose order changes with the
    interpreter's hash seed: the same checkpoint would give different bytes from run to run.
    """
    named: dict[str, str] = {}
    default = None
    for choice in templates:
        name = "".join(c if c in ascii_letters + digits else "_" for c in choice["name"])
        if name == "default":
            default = choice["template"]
        elif name:
            named.setdefault(name, choice["template"])
    for name, template in named.items():
        writer.add_string(gguf.Keys.Tokenizer.CHAT_TEMPLATE_N.format(name=name), template)
    if named:
        writer.add_array(gguf.Keys.Tokenizer.CHAT_TEMPLATES, list(named))
    if default is not None:
        writer.add_string(gguf.Keys.Tokenizer.CHAT_TEMPLATE, default)


def chat_templates(folder: Path) -> list[dict[str, str]]:
    """The project's own templates; the checkpoint's only if the project's cannot be loaded."""
    try:
        from r7b.templates import TEMPLATE_NAMES, template_source
    except ImportError:
        return checkpoint_templates(folder)
    return [{"name": n, "template": template_source(n)} for n in TEMPLATE_NAMES]


def default_output(source: str, outtype: str) -> Path:
    return Path(f"{Path(source.rstrip('/')).name}-{outtype.upper()}.gguf")


def convert(source: str, output: str | Path | None = None, *, outtype: str = "f16", force: bool = False,
            progress: bool = True, revision: str | None = None) -> Path:
    """Convert `source` (folder or hub id) to a GGUF file at `output`; returns the path written."""
    if outtype not in OUTTYPES:
        raise R7BError(f"unknown --outtype {outtype!r}; choose from {', '.join(OUTTYPES)}")
    out = Path(output) if output else default_output(source, outtype)
    check_output_path(out, force=force)
    folder = resolve_checkpoint(source, revision=revision)
    dims = read_dims(folder)
    plan = plan_tensors(dims, tensor_refs(folder), outtype)
    check_free_space(out, estimate_bytes(plan, folder), f"the {outtype.upper()} GGUF")
    with atomic_output(out, force=force) as tmp:
        writer = gguf.GGUFWriter(tmp, ARCH)
        add_metadata(writer, dims, outtype, Path(source.rstrip("/")).name, source)
        add_tokenizer(writer, folder, dims)
        for item in plan:
            writer.add_tensor_info(item.name, item.ref.shape, _np_dtype(item.qtype), _out_bytes(item),
                                   raw_dtype=item.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        total = sum(p.ref.nbytes for p in plan)
        with tqdm(total=total, unit="B", unit_scale=True, desc="convert", disable=not progress) as bar:
            for item in plan:
                writer.write_tensor_data(TensorStream(item, bar))
        writer.close()
    return out


class TensorStream:
    """One tensor for `GGUFWriter.write_tensor_data`, which needs only `nbytes` and `tofile`:
    the cast data is produced and written block by block instead of as one array."""

    def __init__(self, item: PlannedTensor, bar: tqdm | None = None):
        self.item, self.bar = item, bar
        self.nbytes = _out_bytes(item)

    def tofile(self, fh) -> None:
        ref = self.item.ref
        for block in read_blocks(ref):
            convert_tensor(block, ref.dtype, self.item.qtype).tofile(fh)
            if self.bar is not None:
                self.bar.update(block.nbytes)


def _out_bytes(item: PlannedTensor) -> int:
    return int(np.prod(item.ref.shape)) * (4 if item.qtype == gguf.GGMLQuantizationType.F32 else 2)


def estimate_bytes(plan: list[PlannedTensor], folder: Path) -> int:
    """About how big the GGUF will be: the tensors (aligned) and their descriptions, plus metadata,
    for which the tokenizer files' size stands in (the vocabulary and merges are most of it)."""
    align = gguf.GGUF_DEFAULT_ALIGNMENT
    tensors = sum(-(-_out_bytes(item) // align) * align + len(item.name) + 48 for item in plan)
    tokenizer = sum(f.stat().st_size for f in folder.glob("tokenizer*") if f.is_file())
    templates = sum(len(t["template"].encode()) for t in chat_templates(folder))
    return tensors + tokenizer + templates + 64 * 1024


def _np_dtype(qtype: gguf.GGMLQuantizationType):
    return {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16,
            gguf.GGMLQuantizationType.BF16: np.uint16}[qtype]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("convert", help="convert a Hugging Face checkpoint (folder or hub id) to GGUF",
                              description=__doc__.splitlines()[0])
    p.add_argument("source", metavar="SRC", help="checkpoint folder or hub id, e.g. CohereLabs/c4ai-command-r7b-12-2024")
    p.add_argument("-o", "--output", metavar="OUT.gguf", help="output file (default: NAME-OUTTYPE.gguf here)")
    p.add_argument("--outtype", choices=sorted(OUTTYPES), default="f16", help="type of the matrices (default f16)")
    p.add_argument("--revision", help="hub revision (branch, tag or commit)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    out = convert(args.source, args.output, outtype=args.outtype, force=args.force,
                  progress=not args.quiet, revision=args.revision)
    print(out)
    return 0

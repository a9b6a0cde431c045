"""The converter: GGUF logits match transformers, wrong conversions are caught, bad input is refused."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from r7b.convert.convert import convert

R7B = [sys.executable, "-m", "r7b.cli"]
# Measured on the stand-in over 3 prompts (348 positions, f32 KV cache): F32 max |Δlogit| 5.0e-5,
# F16 1.9e-3, BF16 2.1e-2 (argmax agreement 100%, 100%, 99.8%). The checkpoint is bf16, so all three
# hold the same weights; F16/BF16 differ by llama.cpp rounding activations to the weight type in matmuls.
TOLERANCE = {"f32": 5e-4, "f16": 1e-2, "bf16": 0.1}
MIN_ARGMAX_AGREEMENT = {"f32": 1.0, "f16": 0.995, "bf16": 0.99}


@pytest.fixture(scope="module")
def prompts(hf_tokenizer, held_out_text) -> dict[str, list[int]]:
    """Token ids (BOS first); 'long' spans several sliding windows so window and global layers both matter."""
    texts = {
        "english": "It is a truth universally acknowledged, that a single man in possession of a good fortune",
        "spanish": "Y dijo Dios: Sea la luz: y fué la luz. Y vió Dios que la luz era buena",
        "long": held_out_text["en"][:1500],
    }
    ids = {k: [5] + hf_tokenizer.encode(v, add_special_tokens=False).ids for k, v in texts.items()}
    assert len(ids["long"]) > 4 * 64, "the long prompt must exceed the stand-in's 64-token window several times"
    return ids


def reference_logits(hf_model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0].float().numpy()


def gguf_logits(path: Path, ids: list[int]) -> np.ndarray:
    """All-position logits from llama.cpp with an f32 KV cache, through llama-cpp-python."""
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=1024, n_batch=1024, n_ubatch=1024, logits_all=True, type_k=0, type_v=0,
                          n_threads=2, verbose=False)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()


def compare(path: Path, hf_model, prompts) -> tuple[float, float]:
    """(max |Δlogit|, argmax agreement) over every position of every prompt."""
    worst, agree, total = 0.0, 0, 0
    for ids in prompts.values():
        ref, got = reference_logits(hf_model, ids), gguf_logits(path, ids)
        worst = max(worst, float(np.abs(got - ref).max()))
        agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
        total += len(ids)
    return worst, agree / total


def parity_holds(worst: float, agreement: float, outtype: str) -> bool:
    return worst < TOLERANCE[outtype] and agreement >= MIN_ARGMAX_AGREEMENT[outtype]


@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16"])
def test_logits_match_transformers(outtype, stand_in_gguf, hf_model, prompts):
    worst, agreement = compare(stand_in_gguf(outtype), hf_model, prompts)
    print(f"{outtype}: max |Δlogit| = {worst:.3g}, argmax agreement = {agreement:.4f}")
    assert parity_holds(worst, agreement, outtype)


def _copy_snapshot(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def _edit_tensors(folder: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def _swap_kv(t):
    k, v = "model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.v_proj.weight"
    t[k], t[v] = t[v].clone(), t[k].clone()


def _neox_permute(t):
    """Reorder Q/K rows from interleaved to half-split rotary pairs: the classic wrong RoPE layout."""
    for i in range(4):
        for proj, heads in (("q_proj", 4), ("k_proj", 2)):
            name = f"model.layers.{i}.self_attn.{proj}.weight"
            w = t[name]
            hd = w.shape[0] // heads
            t[name] = w.reshape(heads, hd // 2, 2, -1).transpose(1, 2).reshape(w.shape).contiguous()


WRONG_CONVERSIONS = {
    "logit_scale_dropped": lambda d: _edit_config(d, logit_scale=1.0),
    "sliding_window_wrong": lambda d: _edit_config(d, sliding_window=4096),
    "k_v_swapped": lambda d: _edit_tensors(d, _swap_kv),
    "rope_neox_layout": lambda d: _edit_tensors(d, _neox_permute),
}


@pytest.mark.parametrize("defect", sorted(WRONG_CONVERSIONS))
def test_wrong_conversion_is_detected(defect, stand_in, hf_model, prompts, tmp_path):
    """Negative controls: the parity check must fail on a deliberately wrong conversion."""
    broken = _copy_snapshot(stand_in, tmp_path / "broken")
    WRONG_CONVERSIONS[defect](broken)
    path = convert(str(broken), tmp_path / "broken.gguf", outtype="f32", progress=False)
    worst, agreement = compare(path, hf_model, prompts)
    print(f"{defect}: max |Δlogit| = {worst:.3g}, argmax agreement = {agreement:.4f}")
    assert not parity_holds(worst, agreement, "f32")
    assert worst > 10 * TOLERANCE["f32"], "caught, but with too little margin"


TOKENIZER_TEXTS = [
    "Hello world! It is a truth universally acknowledged.",
    "En el principio creó Dios los cielos y la tierra; ¿dónde está el niño? ¡Ñandú!",
    "Numbers 1234567890 and 3.14159, dates 2024-06-30, money $1,000.00",
    "Whitespace:   three spaces,\ttab,\n\nnew lines,    \n  trailing   ",
    "Emoji 😀🎉👩‍👩‍👧 and symbols ∑∫√ → ← «guillemets» “quotes”",
    "Кириллица, Ελληνικά, 日本語のテキスト, العربية, עברית, हिन्दी",
    "<BOS_TOKEN><|START_OF_TURN_TOKEN|><|USER_TOKEN|>Hi<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>",
    "<|START_THINKING|>plan<|END_THINKING|><|START_ACTION|>[{\"tool_name\": \"x\"}]<|END_ACTION|>",
    "code:\n    def f(x):\n        return x**2  # comment\n",
    "",
    " leading space and double  space",
]


def test_tokenizer_parity(stand_in_gguf, hf_tokenizer):
    """llama.cpp's tokenizer on the GGUF gives the ids `tokenizers` gives on tokenizer.json.

    Text is NFC already: tokenizer.json normalizes to NFC and llama.cpp does not, so the runtime
    normalizes to NFC before tokenizing (tested in test_runtime).
    """
    import llama_cpp

    llm = llama_cpp.Llama(str(stand_in_gguf("f16")), vocab_only=True, verbose=False)
    for text in TOKENIZER_TEXTS:
        expected = hf_tokenizer.encode(text, add_special_tokens=False).ids
        got = llm.tokenize(text.encode(), add_bos=False, special=True)
        assert got == expected, text
    bos_ids = llm.tokenize(b"Hello", add_bos=True, special=False)
    assert bos_ids == hf_tokenizer.encode("Hello").ids  # the HF post-processor also adds BOS


def test_metadata(stand_in_gguf, stand_in):
    from gguf import GGUFReader

    reader = GGUFReader(stand_in_gguf("f16"))
    fields = {name: f.contents() for name, f in reader.fields.items() if not name.startswith("tokenizer.ggml.t")}
    cfg = json.loads((stand_in / "config.json").read_text())
    assert fields["general.architecture"] == "cohere2"
    assert fields["general.file_type"] == 1
    assert fields["cohere2.attention.sliding_window"] == cfg["sliding_window"]
    assert fields["cohere2.logit_scale"] == pytest.approx(cfg["logit_scale"])
    assert fields["cohere2.block_count"] == cfg["num_hidden_layers"]
    assert fields["cohere2.attention.head_count_kv"] == cfg["num_key_value_heads"]
    assert fields["tokenizer.ggml.pre"] == "command-r"
    assert fields["tokenizer.ggml.bos_token_id"] == 5
    assert fields["tokenizer.ggml.eos_token_id"] == cfg["vocab_size"] - 33 + 1
    for key in ("tokenizer.chat_template", "tokenizer.chat_template.tool_use", "tokenizer.chat_template.rag"):
        assert key in fields
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_norm.weight"] == "F32" and types["blk.0.attn_q.weight"] == "F16"


def test_sharded_checkpoint_converts_identically(stand_in, stand_in_gguf, tmp_path):
    """The stand-in re-saved by transformers in shards (new-style config keys) gives the same tensors."""
    import torch
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(stand_in), dtype=torch.bfloat16)
    shards = tmp_path / "sharded"
    model.save_pretrained(shards, max_shard_size="4MB")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(stand_in / name, shards / name)
    assert (shards / "model.safetensors.index.json").exists()
    assert "layer_types" in json.loads((shards / "config.json").read_text())
    out = convert(str(shards), tmp_path / "sharded.gguf", outtype="f16", progress=False)
    a, b = GGUFReader(stand_in_gguf("f16")), GGUFReader(out)
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    for ta, tb in zip(a.tensors, b.tensors):
        assert np.array_equal(np.asarray(ta.data), np.asarray(tb.data)), ta.name


@pytest.mark.parametrize("outtype", ["f16", "bf16"])
def test_block_size_does_not_change_the_output(stand_in, stand_in_gguf, tmp_path, monkeypatch, outtype):
    """Tensors are streamed in blocks of rows; blocks of one row or several give the same file."""
    from r7b.convert import checkpoint

    monkeypatch.setattr(checkpoint, "BLOCK_BYTES", 1000)  # one row of the embedding per block, or a few rows
    out = convert(str(stand_in), tmp_path / "blocks.gguf", outtype=outtype, progress=False)
    assert out.read_bytes() == Path(stand_in_gguf(outtype)).read_bytes()


@pytest.mark.parametrize("seed", ["1", "2", "3"])
def test_same_bytes_whatever_the_hash_seed(seed, stand_in, stand_in_gguf, tmp_path):
    """A conversion is reproducible: nothing in the file depends on the interpreter's hash order."""
    out = tmp_path / "seeded.gguf"
    proc = run_cli("convert", stand_in, "-o", out, "-q", "--outtype", "bf16", env={**os.environ, "PYTHONHASHSEED": seed})
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == Path(stand_in_gguf("bf16")).read_bytes()


def test_template_names_keep_their_order(tmp_path):
    import gguf

    from r7b.convert.convert import add_chat_templates

    names = [f"t{i}" for i in range(24)] + ["bad name!", "t3"]
    path = tmp_path / "names.gguf"
    writer = gguf.GGUFWriter(path, "cohere2")
    add_chat_templates(writer, [{"name": n, "template": n} for n in names] + [{"name": "default", "template": "d"}])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    fields = {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items()}
    assert fields["tokenizer.chat_templates"] == [f"t{i}" for i in range(24)] + ["bad_name_"]
    assert fields["tokenizer.chat_template.t3"] == "t3"  # the first of two with one name
    assert fields["tokenizer.chat_template.bad_name_"] == "bad name!"
    assert fields["tokenizer.chat_template"] == "d"


def test_read_blocks_are_whole_rows(stand_in):
    from r7b.convert.checkpoint import read_blocks, read_tensor, tensor_refs

    ref = tensor_refs(stand_in)["model.embed_tokens.weight"]
    blocks = list(read_blocks(ref, block_bytes=3000))
    assert len(blocks) > 1 and all(b.size % ref.shape[-1] == 0 for b in blocks)
    assert np.array_equal(np.concatenate(blocks).reshape(ref.shape), read_tensor(ref))


def run_cli(*args, env=None):
    return subprocess.run(R7B + list(map(str, args)), capture_output=True, text=True, env=env, timeout=120)


def assert_one_line_error(proc, *needles):
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


BAD_CHECKPOINTS = {
    "not_cohere2": (lambda d: _edit_config(d, model_type="llama"), "not a Command R7B"),
    "missing_tokenizer": (lambda d: (d / "tokenizer.json").unlink(), "tokenizer.json"),
    "wrong_shape": (lambda d: _edit_config(d, intermediate_size=512), "has shape"),
    "missing_weights": (lambda d: (d / "model.safetensors").unlink(), "model.safetensors"),
    "bad_config_json": (lambda d: (d / "config.json").write_text("{nope"), "invalid JSON"),
    "truncated_weights": (lambda d: (d / "model.safetensors").write_bytes(
        (d / "model.safetensors").read_bytes()[:5000]), "model.safetensors"),
}


@pytest.mark.parametrize("case", sorted(BAD_CHECKPOINTS))
def test_bad_checkpoint_refused(case, stand_in, tmp_path):
    folder = _copy_snapshot(stand_in, tmp_path / "ckpt")
    damage, message = BAD_CHECKPOINTS[case]
    damage(folder)
    out = tmp_path / "out.gguf"
    proc = run_cli("convert", folder, "-o", out, "-q")
    assert_one_line_error(proc, message)
    assert not out.exists()
    assert not list(tmp_path.glob(".out.gguf.*")), "a temporary file was left behind"


def test_no_silent_overwrite(stand_in, tmp_path):
    out = tmp_path / "model.gguf"
    out.write_bytes(b"precious")
    assert_one_line_error(run_cli("convert", stand_in, "-o", out, "-q"), "exists", "--force")
    assert out.read_bytes() == b"precious"
    proc = run_cli("convert", stand_in, "-o", out, "-q", "--force")
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:4] == b"GGUF"


def _hub_cache(home: Path, repo: str, snapshot: Path) -> None:
    """Lay out `snapshot` as huggingface_hub's cache holds a downloaded repo."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    base = home / "hub" / ("models--" + repo.replace("/", "--"))
    shutil.copytree(snapshot, base / "snapshots" / revision)
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(revision)


def test_hub_id_from_local_cache_offline(stand_in, tmp_path, stand_in_gguf):
    import os

    home = tmp_path / "hf"
    _hub_cache(home, "CohereLabs/tiny-r7b", stand_in)
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "hub.gguf"
    proc = run_cli("convert", "CohereLabs/tiny-r7b", "-o", out, "-q", env=env)
    assert proc.returncode == 0, proc.stderr
    from gguf import GGUFReader

    fields = GGUFReader(out).fields
    assert fields["general.source.repo_url"].contents() == "https://huggingface.co/CohereLabs/tiny-r7b"
    missing = run_cli("convert", "CohereLabs/not-downloaded", "-o", tmp_path / "x.gguf", env=env)
    assert_one_line_error(missing, "not in the local cache")

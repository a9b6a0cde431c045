"""Quantization: every type loads and generates, sizes and types are as planned, an importance matrix
and the Q4_K_R7B recipe measurably lower the KL divergence from F16, and bad input is refused.

Run as a script (`python tests/test_quantize.py`) to print the quality table for every type.
"""

from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from r7b.convert.imatrix import imatrix
from r7b.convert.imatrix_file import Imatrix, write_imatrix
from r7b.convert.quantize import QUANT_TYPES, plan_types, quantize, read_model

R7B = [str(Path(sys.executable).with_name("r7b"))]
SIZE_ORDER = ["Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q4_K_M", "Q4_K_S", "Q4_0", "IQ4_XS"]
CALIBRATION_CHARS = 40_000  # from the start of each held-out file; KLD is measured on the end
MEASURE_CHARS = 40_000
CHUNK = 256
PER_TEXT = 36  # chunks per language for the quality table: about 18K tokens in all


# -- KL divergence against F16 -----------------------------------------------------------------

def held_out_slices(texts: dict[str, str]) -> tuple[str, dict[str, str]]:
    """Calibration text from the start of each held-out file; measurement text from the end of each."""
    assert all(len(t) > CALIBRATION_CHARS + MEASURE_CHARS for t in texts.values())
    calib = "\n\n".join(t[:CALIBRATION_CHARS] for t in texts.values())
    return calib, {lang: t[-MEASURE_CHARS:] for lang, t in texts.items()}


def token_chunks(path: Path, texts: dict[str, str], per_text: int) -> list[list[int]]:
    """Up to `per_text` chunks of CHUNK tokens from each text, each starting with BOS."""
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=CHUNK, n_threads=2, verbose=False, vocab_only=True)
    chunks = []
    for text in texts.values():
        tokens = llm.tokenize(text.encode(), add_bos=False)
        n = min(per_text, len(tokens) // (CHUNK - 1))
        chunks += [[llm.token_bos()] + tokens[i * (CHUNK - 1):(i + 1) * (CHUNK - 1)] for i in range(n)]
    llm.close()
    return chunks


def _log_softmax(llm, chunk: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(chunk)
    x = np.array(llm.scores[:len(chunk)], dtype=np.float64)
    x -= x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def kld(reference: Path, quantized: Path, chunks: list[list[int]]) -> tuple[float, float]:
    """(mean KL(reference || quantized) per token, top-1 agreement), both models fed the same chunks."""
    import llama_cpp

    opts = dict(n_ctx=CHUNK, n_batch=CHUNK, n_ubatch=CHUNK, logits_all=True, n_threads=2, verbose=False)
    ref, quant = llama_cpp.Llama(str(reference), **opts), llama_cpp.Llama(str(quantized), **opts)
    total, agree, n = 0.0, 0, 0
    for chunk in chunks:
        p, q = _log_softmax(ref, chunk), _log_softmax(quant, chunk)
        total += float((np.exp(p) * (p - q)).sum())
        agree += int((p.argmax(1) == q.argmax(1)).sum())
        n += len(chunk)
    ref.close()
    quant.close()
    return total / n, agree / n


# -- fixtures -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def f16(stand_in_gguf) -> Path:
    return stand_in_gguf("f16")


@pytest.fixture(scope="module")
def texts(held_out_text, tmp_path_factory) -> tuple[Path, str]:
    calib, measure = held_out_slices(held_out_text)
    path = tmp_path_factory.mktemp("text") / "calibration.txt"
    path.write_text(calib, encoding="utf-8")
    return path, measure


@pytest.fixture(scope="module")
def imx(f16, texts, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("imatrix") / "imatrix.gguf"
    return imatrix(f16, texts[0], out, threads=2, progress=False)


@pytest.fixture(scope="module")
def quantized(f16, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("quantized")
    return {name: quantize(f16, folder / f"{name}.gguf", name, threads=2, progress=False) for name in QUANT_TYPES}


@functools.lru_cache(maxsize=None)
def reader(path: Path) -> gguf.GGUFReader:
    return gguf.GGUFReader(path)


def tensor_types(path: Path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in reader(path).tensors}


def field(path: Path, key: str):
    f = reader(path).get_field(key)
    return None if f is None else f.contents()


def run(*args) -> subprocess.CompletedProcess:
    return subprocess.run(R7B + [str(a) for a in args], capture_output=True, text=True, timeout=120)


# -- every type ----------------------------------------------------------------------------------

def test_every_type_loads_and_generates(quantized):
    import llama_cpp

    for name, path in quantized.items():
        llm = llama_cpp.Llama(str(path), n_ctx=128, n_threads=2, verbose=False)
        out = llm.create_completion("It is a truth universally acknowledged", max_tokens=4, temperature=0)
        llm.close()
        assert out["usage"]["completion_tokens"] > 0, name


def test_sizes_are_ordered_and_file_type_matches(quantized):
    sizes = [quantized[name].stat().st_size for name in SIZE_ORDER]
    assert sizes == sorted(sizes, reverse=True), dict(zip(SIZE_ORDER, sizes))
    for name, path in quantized.items():
        assert field(path, "general.file_type") == int(QUANT_TYPES[name].ftype), name
        assert field(path, "r7b.quantize.recipe") == ("Q4_K_R7B" if name == "Q4_K_R7B" else None)


def test_planned_types_match_llama_cpp(quantized, f16):
    """The --list estimates rest on predicting llama.cpp's per-tensor choices; check them all."""
    model = read_model(f16)
    for name, path in quantized.items():
        plan = plan_types(model.tensors, QUANT_TYPES[name], n_layers=4, n_gqa=2)
        assert {k: v.name for k, v in plan.items()} == tensor_types(path), name


def test_tied_embedding_keeps_six_bits(quantized):
    for name, path in quantized.items():
        assert tensor_types(path)["token_embd.weight"] in ("Q6_K", "Q8_0"), name


def test_recipe_layout(quantized):
    types = tensor_types(quantized["Q4_K_R7B"])
    assert all(types[f"blk.0.ffn_{m}.weight"] == "Q5_K" for m in ("gate", "up", "down"))
    assert [types[f"blk.{i}.ffn_down.weight"] for i in range(4)] == ["Q5_K", "Q5_K", "Q4_K", "Q4_K"]
    assert {types[f"blk.{i}.attn_v.weight"] for i in range(4)} == {"Q5_K"}
    assert quantized["Q4_K_R7B"].stat().st_size <= quantized["Q4_K_M"].stat().st_size


def test_overrides_and_token_embedding_type(f16, tmp_path):
    out = quantize(f16, tmp_path / "o.gguf", "Q4_K_M", overrides={r"blk\.0\.ffn_down": "Q8_0", "attn_q": "q5_k"},
                   token_embedding_type="q8_0", threads=2, progress=False)
    types = tensor_types(out)
    assert types["blk.0.ffn_down.weight"] == "Q8_0"
    assert {types[f"blk.{i}.attn_q.weight"] for i in range(4)} == {"Q5_K"}
    assert types["token_embd.weight"] == "Q8_0"
    assert types["blk.1.ffn_down.weight"] == "Q4_K"


def test_slabs_give_the_same_bytes(f16, imx, tmp_path, monkeypatch):
    """llama.cpp converts big tensors in slabs of rows (bounded memory for the 256,000-row embedding);
    slabs of a few rows must give the bytes one slab does."""
    from r7b.convert import quantize as q

    whole = quantize(f16, tmp_path / "whole.gguf", "Q4_K_M", imatrix=imx, threads=2, progress=False)
    monkeypatch.setattr(q, "SLAB_BYTES", 64 * 1024)  # a few rows of each matrix at a time
    slabs = quantize(f16, tmp_path / "slabs.gguf", "Q4_K_M", imatrix=imx, threads=2, progress=False)
    a, b = gguf.GGUFReader(whole), gguf.GGUFReader(slabs)
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    for x, y in zip(a.tensors, b.tensors):
        assert x.tensor_type == y.tensor_type and np.array_equal(x.data, y.data), x.name


# -- importance matrix and quality ----------------------------------------------------------------

def test_imatrix_metadata(f16, imx, tmp_path):
    out = quantize(f16, tmp_path / "i.gguf", "IQ4_XS", imatrix=imx, threads=2, progress=False)
    assert field(out, "quantize.imatrix.file") == str(imx)
    assert field(out, "quantize.imatrix.dataset").endswith("calibration.txt")
    assert field(out, "quantize.imatrix.entries_count") == 29  # 4 layers x 7 matrices + the tied output
    assert field(out, "quantize.imatrix.chunks_count") > 10


def test_imatrix_and_recipe_lower_kld(f16, imx, texts, quantized, tmp_path):
    """Calibrated on the start of the held-out files, measured on their end."""
    chunks = token_chunks(f16, texts[1], per_text=8)
    q4km = quantize(f16, tmp_path / "q4km.gguf", "Q4_K_M", imatrix=imx, threads=2, progress=False)
    recipe = quantize(f16, tmp_path / "r7b.gguf", "Q4_K_R7B", imatrix=imx, threads=2, progress=False)
    plain, _ = kld(f16, quantized["Q4_K_M"], chunks)
    with_imatrix, _ = kld(f16, q4km, chunks)
    with_recipe, agreement = kld(f16, recipe, chunks)
    assert with_imatrix < 0.9 * plain, (plain, with_imatrix)
    assert with_recipe < 0.85 * with_imatrix, (with_imatrix, with_recipe)
    assert recipe.stat().st_size <= q4km.stat().st_size
    assert agreement > 0.95


# -- the command line -----------------------------------------------------------------------------

def test_cli_output_is_clean(f16, tmp_path):
    out = tmp_path / "q.gguf"
    proc = run("quantize", f16, out, "--type", "q8_0", "--threads", 2, "-q")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out) and proc.stderr == ""
    proc = run("quantize", f16, out, "--type", "q8_0", "--threads", 2)
    assert proc.returncode == 1 and "--force" in proc.stderr


def test_list_shows_every_type():
    proc = run("quantize", "--list")
    assert proc.returncode == 0, proc.stderr
    assert "Command R7B" in proc.stdout and "RAM @128K" in proc.stdout
    assert all(name in proc.stdout for name in QUANT_TYPES)


def _wrong_arch(path: Path) -> Path:
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tensor("token_embd.weight", np.zeros((8, 32), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _foreign_imatrix(path: Path) -> Path:
    imx = Imatrix(sums={"blk.0.attn_q.weight": np.ones((1, 512))}, counts={"blk.0.attn_q.weight": np.ones(1)})
    write_imatrix(imx, path)
    return path


BAD_INPUTS = ["not_gguf", "quantized", "unknown_type", "missing_imatrix", "foreign_imatrix", "wrong_arch",
              "bad_override"]


def _bad_input(case: str, f16: Path, quantized: dict[str, Path], tmp: Path) -> tuple[Path, list]:
    """(input file, extra arguments) for one kind of bad input."""
    if case == "not_gguf":
        (tmp / "x.gguf").write_text("not a model")
        return tmp / "x.gguf", []
    if case == "wrong_arch":
        return _wrong_arch(tmp / "llama.gguf"), []
    if case == "quantized":
        return quantized["Q4_K_M"], []
    return f16, {"unknown_type": ["--type", "Q3_X"], "missing_imatrix": ["--imatrix", tmp / "none.gguf"],
                 "foreign_imatrix": ["--imatrix", _foreign_imatrix(tmp / "other.gguf")],
                 "bad_override": ["--override", "no_such_tensor=Q8_0"]}[case]


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_and_no_file(case, f16, quantized, tmp_path):
    src, extra = _bad_input(case, f16, quantized, tmp_path)
    out = tmp_path / "out" / "o.gguf"
    out.parent.mkdir()
    proc = run("quantize", src, out, "--type", "Q4_K_M", *extra, "-q")
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("r7b quantize: error:"), proc.stderr
    assert list(out.parent.iterdir()) == []


# -- the quality table -----------------------------------------------------------------------------

def quality_table(stand_in: Path, folder: Path) -> str:
    """Every type with and without an imatrix: size, bits per weight, mean KLD vs F16, top-1."""
    from r7b.convert.convert import convert

    held = {lang: (stand_in.parent / "held-out" / f"{lang}.txt").read_text(encoding="utf-8") for lang in ("en", "es")}
    calib, measure = held_out_slices(held)
    (folder / "calibration.txt").write_text(calib, encoding="utf-8")
    src = convert(str(stand_in), folder / "F16.gguf", outtype="f16", progress=False, force=True)
    imx = imatrix(src, folder / "calibration.txt", folder / "imatrix.gguf", threads=2, progress=False, force=True)
    chunks = token_chunks(src, measure, per_text=PER_TEXT)
    n_params = sum(int(t.n_elements) for t in gguf.GGUFReader(src).tensors)
    rows = [f"{len(chunks) * CHUNK} held-out tokens; imatrix from {CALIBRATION_CHARS:,} chars per file", "",
            f"{'type':<10} {'imatrix':<8} {'bytes':>9} {'bpw':>6} {'mean KLD':>10} {'top-1':>7}"]
    for name in QUANT_TYPES:
        for use in (False, True):
            out = quantize(src, folder / f"{name}-{int(use)}.gguf", name, imatrix=imx if use else None, threads=2,
                           progress=False, force=True)
            tensor_bytes = sum(int(t.n_bytes) for t in gguf.GGUFReader(out).tensors)
            k, top1 = kld(src, out, chunks)
            rows.append(f"{name:<10} {'yes' if use else 'no':<8} {out.stat().st_size:>9} "
                        f"{8 * tensor_bytes / n_params:>6.2f} {k:>10.6f} {top1:>7.4f}")
    return "\n".join(rows)


if __name__ == "__main__":
    import tempfile

    root = Path(__file__).resolve().parent
    with tempfile.TemporaryDirectory() as tmp:
        print(quality_table(root / "fixtures" / "tiny-r7b", Path(tmp)))


def test_mapped_input_pages_are_given_back(tmp_path):
    """The trimmer drops a read-only shared mapping's pages from the resident set; reads still see the file."""
    import mmap
    import time

    from r7b.convert.quantize import MappedPagesTrim

    path = tmp_path / "input.bin"
    data = np.random.default_rng(0).integers(0, 255, 64 << 20, dtype=np.uint8)
    path.write_bytes(data.tobytes())

    def resident(start: int) -> int:
        lines = Path("/proc/self/smaps").read_text().splitlines()
        at = next(i for i, line in enumerate(lines) if line.startswith(f"{start:x}-"))
        return next(int(line.split()[1]) for line in lines[at:] if line.startswith("Rss:")) * 1024

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mapped:
        view = np.frombuffer(mapped, dtype=np.uint8)
        start = view.ctypes.data
        assert int(view[::4096].sum()) >= 0 and resident(start) > 60 << 20  # every page touched
        with MappedPagesTrim(path, every=0.05) as trim:
            deadline = time.monotonic() + 10
            while resident(start) > 1 << 20 and time.monotonic() < deadline:
                time.sleep(0.05)
        assert resident(start) <= 1 << 20 and trim.trimmed >= 64 << 20
        assert np.array_equal(view, data)  # pages come back from the page cache, unchanged
        del view

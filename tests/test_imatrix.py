"""Importance matrix: collected values have llama.cpp's layout and meaning, and files round-trip."""

from __future__ import annotations

import ctypes
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from r7b.convert.imatrix import GGMLTensor, collect_imatrix, imatrix
from r7b.convert.imatrix_file import Imatrix, load_imatrix, read_imatrix, write_imatrix

R7B = [str(Path(sys.executable).with_name("r7b"))]
MATRICES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


@pytest.fixture(scope="module")
def collected(stand_in_gguf, held_out_text, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("imatrix")
    text = folder / "calibration.txt"
    text.write_text(held_out_text["en"][:20_000], encoding="utf-8")
    return imatrix(stand_in_gguf("f16"), text, folder / "imatrix.gguf", ctx=256, threads=2, progress=False)


def test_tensor_layout_matches_ggml():
    import llama_cpp
    from llama_cpp._ctypes_extensions import load_shared_library

    lib = load_shared_library("ggml-base", Path(llama_cpp.__file__).parent / "lib")
    lib.ggml_tensor_overhead.restype = ctypes.c_size_t
    assert ctypes.sizeof(GGMLTensor) + 32 == lib.ggml_tensor_overhead()
    assert GGMLTensor.name.offset == 256 and GGMLTensor.data.offset == 248  # 64-bit ggml.h


def test_file_has_llama_cpp_layout(collected, stand_in_gguf):
    reader = gguf.GGUFReader(collected)
    assert reader.get_field("general.type").contents() == "imatrix"
    assert reader.get_field("imatrix.datasets").contents()[0].endswith("calibration.txt")
    assert reader.get_field("imatrix.chunk_size").contents() == 256
    chunks = reader.get_field("imatrix.chunk_count").contents()
    assert chunks >= 10
    model = {t.name: t for t in gguf.GGUFReader(stand_in_gguf("f16")).tensors}
    tensors = {t.name: t for t in reader.tensors}
    weights = [f"blk.{i}.{m}.weight" for i in range(4) for m in MATRICES] + ["token_embd.weight"]
    assert set(tensors) == {f"{w}.{s}" for w in weights for s in ("in_sum2", "counts")}
    for w in weights:
        sums, counts = tensors[f"{w}.in_sum2"], tensors[f"{w}.counts"]
        assert sums.tensor_type == counts.tensor_type == gguf.GGMLQuantizationType.F32
        assert list(sums.shape) == [model[w].shape[0], 1] and list(counts.shape) == [1, 1]
        assert (np.asarray(sums.data) > 0).all()
        assert float(np.asarray(counts.data).item()) == chunks * 256  # every token of every chunk is one row


def test_values_are_mean_squared_inputs(collected):
    """attn_q/k/v and ffn_gate/up all read the same normed input in Cohere's parallel block."""
    means = load_imatrix(collected)
    for i in range(4):
        shared = [means[f"blk.{i}.{m}.weight"] for m in ("attn_q", "attn_k", "attn_v", "ffn_gate", "ffn_up")]
        for other in shared[1:]:
            np.testing.assert_allclose(other, shared[0], rtol=1e-5)
    assert means["blk.0.ffn_down.weight"].shape == (768,)


def test_round_trips_through_both_formats(collected, tmp_path):
    original = read_imatrix(collected)
    for name in ("copy.gguf", "copy.dat"):
        write_imatrix(original, tmp_path / name)
        again = read_imatrix(tmp_path / name)
        a, b = original.means(), again.means()
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_allclose(a[key], b[key], rtol=1e-6)
        assert again.chunk_count == original.chunk_count and again.datasets == original.datasets


def test_means_follow_llama_quantize(tmp_path):
    """Sums over counts; a matrix that saw no rows gets ones, as llama-quantize does."""
    imx = Imatrix(sums={"a.weight": np.array([[2.0, 4.0]]), "b.weight": np.array([[2.0, 4.0]])},
                  counts={"a.weight": np.array([2.0]), "b.weight": np.zeros(1)})
    write_imatrix(imx, tmp_path / "m.gguf")
    means = load_imatrix(tmp_path / "m.gguf")
    assert means["a.weight"].tolist() == [1.0, 2.0] and means["b.weight"].tolist() == [1.0, 1.0]


def test_too_little_text_is_an_error(stand_in_gguf):
    from r7b.errors import R7BError

    with pytest.raises(R7BError, match="one chunk needs 512"):
        collect_imatrix(stand_in_gguf("f16"), "far too short", threads=2, progress=False)


def test_cli_errors_are_one_line(stand_in_gguf, tmp_path):
    out = tmp_path / "i.gguf"
    for args in (["--text", tmp_path / "missing.txt"], ["--text", __file__, "--ctx", "4"]):
        proc = subprocess.run(R7B + ["imatrix", str(stand_in_gguf("f16")), "-o", str(out), *map(str, args)],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert not out.exists()

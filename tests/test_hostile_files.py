"""Every command that opens a GGUF checks it before llama.cpp does: a hostile file gets one line."""

from __future__ import annotations

import struct
import subprocess
import sys

import pytest

R7B = [sys.executable, "-m", "r7b.cli"]


@pytest.fixture(scope="module")
def hostile(stand_in_gguf, tmp_path_factory):
    """The stand-in's header claiming 2**62 tensors: a reader that trusts it loops or allocates forever."""
    blob = bytearray(stand_in_gguf("f16").read_bytes())
    blob[8:16] = struct.pack("<Q", 2**62)
    path = tmp_path_factory.mktemp("hostile") / "hostile.gguf"
    path.write_bytes(bytes(blob))
    return path


def _commands(bad, good, text, out):
    return {
        "info": ["info", bad],
        "generate": ["generate", bad, "--prompt", "hi"],
        "serve": ["serve", bad, "--port", "1"],
        "quantize": ["quantize", bad, out, "--type", "Q8_0"],
        "imatrix": ["imatrix", bad, "--text", text, "-o", out],
        "eval": ["eval", "--reference", good, bad, "--text", text],
        "eval-reference": ["eval", "--reference", bad, good, "--text", text],
        "bench": ["bench", bad],
    }


@pytest.mark.parametrize("command", ["info", "generate", "serve", "quantize", "imatrix", "eval", "eval-reference",
                                     "bench"])
def test_command_refuses_hostile_file(command, hostile, stand_in_gguf, held_out_text, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(held_out_text["en"][:4000])
    out = tmp_path / "out.gguf"
    args = _commands(str(hostile), str(stand_in_gguf("f16")), str(text), str(out))[command]
    run = subprocess.run(R7B + args, capture_output=True, text=True, timeout=120)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 1, run.stderr
    assert len(lines) == 1 and "tensor" in lines[0] and str(hostile) in lines[0], run.stderr
    assert not out.exists()

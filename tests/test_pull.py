"""`r7b pull` end to end from a local hub cache, offline."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import pytest

R7B = [str(Path(sys.executable).with_name("r7b"))]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def hf_home(stand_in, tmp_path_factory) -> Path:
    """A Hugging Face cache holding the stand-in as `test-org/tiny-r7b`, laid out as huggingface_hub does."""
    home = tmp_path_factory.mktemp("hf_home")
    repo = home / "hub" / "models--test-org--tiny-r7b"
    shutil.copytree(stand_in, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return home


def pull(hf_home: Path, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(R7B + ["pull", *map(str, args)], capture_output=True, text=True, env=env, timeout=120)


def test_pull_from_local_cache(hf_home, tmp_path):
    proc = pull(hf_home, "test-org/tiny-r7b", "--quant", "Q8_0", "-o", tmp_path / "models", "--threads", 2, "-q")
    assert proc.returncode == 0, proc.stderr
    out = Path(proc.stdout.strip())
    assert out == tmp_path / "models" / "tiny-r7b-Q8_0.gguf"
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # the F16 intermediate is gone
    reader = gguf.GGUFReader(out)
    assert reader.get_field("general.file_type").contents() == gguf.LlamaFileType.MOSTLY_Q8_0
    assert reader.get_field("general.name").contents() == "tiny-r7b"


def test_pull_keeps_f16_and_imatrix_on_request(hf_home, held_out_text, tmp_path):
    text = tmp_path / "calibration.txt"
    text.write_text(held_out_text["es"][:12_000], encoding="utf-8")
    proc = pull(hf_home, "test-org/tiny-r7b", "--quant", "Q4_K_R7B", "-o", tmp_path, "--keep-f16",
                "--imatrix-text", text, "--threads", 2, "-q")
    assert proc.returncode == 0, proc.stderr
    names = {p.name for p in tmp_path.iterdir()}
    assert {"tiny-r7b-Q4_K_R7B.gguf", "tiny-r7b-F16.gguf", "tiny-r7b-imatrix.gguf"} <= names
    reader = gguf.GGUFReader(tmp_path / "tiny-r7b-Q4_K_R7B.gguf")
    assert reader.get_field("quantize.imatrix.file").contents() == str(tmp_path / "tiny-r7b-imatrix.gguf")


def test_uncached_id_offline_is_one_line(hf_home, tmp_path):
    proc = pull(hf_home, "test-org/not-there", "--quant", "Q8_0", "-o", tmp_path)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "not in the local cache" in lines[0], proc.stderr
    assert list(tmp_path.iterdir()) == []

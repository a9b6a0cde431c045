"""Disk space is checked before big writes: on a 4 MiB tmpfs, `convert`, `quantize`, `imatrix`,
`pull` and `eval --save-reference` refuse up front with one line naming the need and what is
free, and leave nothing behind; a disk that fills anyway during a write leaves no file either."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from r7b.errors import R7BError
from r7b.fsutil import check_free_space, format_size

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="mounts a tmpfs (Linux)")

R7B = [str(Path(sys.executable).with_name("r7b"))]
COMMIT = "0123456789abcdef0123456789abcdef01234567"
SIZE = 4 * 1024**2


@contextlib.contextmanager
def _tmpfs(path: Path, size: str = "4m"):
    path.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        path.rmdir()
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {proc.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)


@pytest.fixture
def small(tmp_path):
    with _tmpfs(tmp_path / "small") as folder:
        yield folder


@pytest.fixture(scope="module")
def f16(stand_in_gguf):
    return stand_in_gguf("f16")


def _run(*args, env=None, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run(R7B + [str(a) for a in args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def _refused_up_front(proc: subprocess.CompletedProcess, folder: Path, *needles: str) -> str:
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    line = lines[0]
    assert "no space left for" in line and "needs about" in line and "free" in line and str(folder) in line, line
    for needle in needles:
        assert needle in line, line
    assert list(folder.iterdir()) == [], "something was left behind"
    return line


def test_convert_refuses_up_front(stand_in, small):
    line = _refused_up_front(_run("convert", stand_in, "-o", small / "m.gguf", "-q"), small, "the F16 GGUF")
    assert "10." in line  # about 10.5 MiB for the stand-in


def test_quantize_refuses_up_front(f16, small):
    _refused_up_front(_run("quantize", f16, small / "q.gguf", "--type", "Q8_0", "-q"), small, "the Q8_0 GGUF")


def test_imatrix_refuses_before_evaluating(f16, small, held_out_text, tmp_path):
    text = tmp_path / "calibration.txt"
    text.write_text(held_out_text["en"][:4000], encoding="utf-8")
    filler = small / "filler"
    with open(filler, "wb") as f:  # leave 8 KiB: the stand-in's matrix needs more
        f.write(b"\0" * (shutil.disk_usage(small).free - 8 * 1024))
    start = time.monotonic()
    proc = _run("imatrix", f16, "--text", text, "-o", small / "imx.gguf", "-q")
    filler.unlink()
    _refused_up_front(proc, small, "the importance matrix")
    assert time.monotonic() - start < 30


@pytest.fixture(scope="module")
def hf_home(stand_in, tmp_path_factory) -> Path:
    """A Hugging Face cache holding the stand-in as `test-org/tiny-r7b` (as test_pull.py makes it)."""
    home = tmp_path_factory.mktemp("hf_home")
    repo = home / "hub" / "models--test-org--tiny-r7b"
    shutil.copytree(stand_in, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return home


def test_pull_refuses_before_converting(hf_home, small):
    proc = _run("pull", "test-org/tiny-r7b", "--quant", "Q8_0", "-o", small, "-q",
                env={"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"})
    _refused_up_front(proc, small, "pulling test-org/tiny-r7b", "F16 intermediate", "Q8_0 file")


def test_eval_reference_refuses_up_front(f16, small, held_out_text, tmp_path):
    text = tmp_path / "eval.txt"
    text.write_text(held_out_text["en"], encoding="utf-8")
    proc = _run("eval", "--reference", f16, f16, "--text", text, "--chunks", "2", "--save-reference",
                small / "ref.logprobs", "-q")
    _refused_up_front(proc, small, "the reference log-probs", "7.8 MiB", "fewer --chunks")


def test_reference_store_uses_the_same_check(small):
    from r7b.quality.reference import ReferenceLogProbs

    with pytest.raises(R7BError, match=r"no space left for the reference log-probs: it needs about 7\.8 MiB"):
        ReferenceLogProbs.create(small / "ref", np.zeros(512, np.int32), ctx=512, n_vocab=16000,
                                 vocab_sha256="0", reference="x")  # 255 rows of 32,020 bytes
    assert not (small / "ref").exists()


def test_eval_refuses_when_the_temporary_folder_is_short(f16, small, held_out_text, tmp_path):
    text = tmp_path / "eval.txt"
    text.write_text(held_out_text["en"], encoding="utf-8")
    proc = _run("eval", "--reference", f16, f16, "--text", text, "--ctx", "512", "--chunks", "3", "-q",
                env={"TMPDIR": str(small)})
    _refused_up_front(proc, small, "the reference log-probs", "11.7 MiB", "TMPDIR")


def test_a_fill_during_the_reference_leaves_no_file(small, monkeypatch):
    from r7b.quality import reference

    monkeypatch.setattr(reference, "check_free_space", lambda *a, **k: None)
    with pytest.raises(R7BError, match="no space left on device for the reference log-probs"):
        reference.ReferenceLogProbs.create(small / "ref", np.zeros(1024, np.int32), ctx=512, n_vocab=8000,
                                           vocab_sha256="0", reference="x")
    assert list(small.iterdir()) == []


def test_check_free_space_message(small):
    free = shutil.disk_usage(small).free
    check_free_space(small / "a" / "b.gguf", free, "a file")  # a missing folder: its existing parent counts
    with pytest.raises(R7BError) as info:
        check_free_space(small / "b.gguf", free + 1, "a file", hint=" (try elsewhere)")
    assert str(info.value) == (f"no space left for a file: it needs about {format_size(free + 1)} in {small}, "
                               f"which has {format_size(free)} free (try elsewhere)")


# -- a disk that fills during the write anyway ----------------------------------------------


def test_a_fill_during_convert_leaves_no_file(stand_in, small, monkeypatch):
    from r7b.convert import convert as convert_module

    monkeypatch.setattr(convert_module, "check_free_space", lambda *a, **k: None)  # as if another writer raced
    with pytest.raises(R7BError, match="no space left on device while writing"):
        convert_module.convert(str(stand_in), small / "m.gguf", progress=False)
    assert list(small.iterdir()) == []


def test_a_fill_during_quantize_leaves_no_file(f16, small, monkeypatch):
    from r7b.convert import quantize as quantize_module

    monkeypatch.setattr(quantize_module, "check_free_space", lambda *a, **k: None)
    with pytest.raises(R7BError) as info:
        quantize_module.quantize(f16, small / "q.gguf", "Q8_0", progress=False)
    assert "\n" not in str(info.value)
    assert list(small.iterdir()) == []

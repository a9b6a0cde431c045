"""Interrupted or failing writes never leave a valid-looking file at the output path."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

R7B = [sys.executable, "-m", "r7b.cli"]
KILLS_PER_COMMAND = 6


def _looks_valid_gguf(path: Path) -> bool:
    from r7b.gguf_validate import validate_gguf
    from r7b.errors import R7BError

    try:
        validate_gguf(path, arch=None, check_tensor_data=False)
        return True
    except R7BError:
        return False


def _kill_after(cmd: list[str], delay: float) -> int:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(delay)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    return proc.wait()


def _commands(stand_in: Path, f16: Path, tmp: Path, text: Path) -> dict[str, tuple[list[str], Path]]:
    return {
        "convert": (R7B + ["convert", str(stand_in), "-o", str(tmp / "c.gguf"), "-q", "--outtype", "f32"],
                    tmp / "c.gguf"),
        "quantize": (R7B + ["quantize", str(f16), str(tmp / "q.gguf"), "--type", "Q4_K_M"], tmp / "q.gguf"),
        "imatrix": (R7B + ["imatrix", str(f16), "--text", str(text), "-o", str(tmp / "i.gguf"), "--ctx", "128",
                           "--chunks", "8"], tmp / "i.gguf"),
    }


@pytest.mark.parametrize("command", ["convert", "quantize", "imatrix"])
def test_sigkill_leaves_nothing_valid_and_rerun_succeeds(command, stand_in, stand_in_gguf, held_out_text, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text(held_out_text["en"][:20000])
    cmd, out = _commands(stand_in, stand_in_gguf("f16"), tmp_path, text)[command]
    start = time.monotonic()
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    full = time.monotonic() - start
    complete = out.read_bytes()
    out.unlink()
    rng = random.Random(f"kill-{command}")
    for _ in range(KILLS_PER_COMMAND):
        code = _kill_after(cmd, rng.uniform(0.0, full))
        if code == 0:  # finished before the kill: the file must be complete
            assert _looks_valid_gguf(out)
            out.unlink()
        else:  # killed: no file, or (killed after the rename, while exiting) the complete one
            assert code == -signal.SIGKILL
            if out.exists() and _looks_valid_gguf(out):
                assert out.read_bytes() == complete, "a killed run left a partial output that looks valid"
                out.unlink()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert _looks_valid_gguf(out)


@contextlib.contextmanager
def _tmpfs(path: Path, *options: str):
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(path)],
                      capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)


def _assert_clear_error(proc, needle: str, out: Path) -> None:
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr and needle in lines[0], proc.stderr
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")], "temporary file left behind"


@pytest.mark.skipif(sys.platform != "linux", reason="tmpfs")
def test_disk_full_gives_clear_error(stand_in, tmp_path):
    with _tmpfs(tmp_path / "small", "size=2M") as small:
        out = small / "model.gguf"
        proc = subprocess.run(R7B + ["convert", str(stand_in), "-o", str(out), "-q"], capture_output=True, text=True)
        _assert_clear_error(proc, "no space left", out)


@pytest.mark.skipif(sys.platform != "linux", reason="tmpfs")
def test_read_only_output_gives_clear_error(stand_in, tmp_path):
    with _tmpfs(tmp_path / "ro", "ro,size=1M") as ro:
        out = ro / "model.gguf"
        proc = subprocess.run(R7B + ["convert", str(stand_in), "-o", str(out), "-q"], capture_output=True, text=True)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert "not writable" in proc.stderr or "read-only" in proc.stderr.lower(), proc.stderr
        assert not out.exists()


def test_outputs_get_the_usual_permissions(tmp_path):
    """Written through a temporary file, an output still gets 0666 less the umask, like any new file."""
    from r7b.fsutil import atomic_output

    umask = os.umask(0o022)
    try:
        with atomic_output(tmp_path / "out.bin") as tmp:
            tmp.write_bytes(b"data")
    finally:
        os.umask(umask)
    assert (tmp_path / "out.bin").stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]

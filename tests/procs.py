"""Child processes of the tests and scripts (servers, workers): stopping them without leaving one behind."""

from __future__ import annotations

import subprocess


def stop_process(proc: subprocess.Popen, grace_s: float) -> int:
    """SIGTERM, so that the child can shut down cleanly; SIGKILL if it has not exited within `grace_s`.
    Returns its exit status."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode

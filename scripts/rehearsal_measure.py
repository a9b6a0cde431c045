"""Measuring one rehearsal step: wall time, peak RSS and anonymous RSS of its process tree, disk.

The kernel's VmHWM is the peak resident set of one process; a step that starts helpers (the
server's engine child, say) is sampled as a tree every 0.2 s as well, and the larger figure is
kept. Memory-mapped weights are file-backed pages: they count in RSS but the kernel can drop
them, so RssAnon (what only swap could take back) is reported beside it.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

SAMPLE_S = 0.2


@dataclass
class Step:
    """One measured step; sizes in bytes, times in seconds."""

    name: str
    command: str
    wall_s: float = 0.0
    peak_rss: int = 0
    peak_anon: int = 0
    disk_peak: int = 0  # largest size of the work folder while the step ran
    outputs: int = 0  # bytes of the files the step wrote and kept
    load_before: str = ""
    load_after: str = ""
    rc: int | None = None
    throughput: str = ""
    note: str = ""
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon"):
                out[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError):
        pass
    return out


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids += [int(x) for x in (task / "children").read_text().split()]
        except (OSError, ValueError):
            pass
    return kids


def process_tree(pid: int) -> list[int]:
    todo, seen = [pid], []
    while todo:
        p = todo.pop()
        seen.append(p)
        todo += _children(p)
    return seen


def folder_bytes(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_blocks * 512
            except OSError:
                pass
    return total


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


class Sampler:
    """Peak memory of a process tree and peak size of a folder, sampled on demand."""

    def __init__(self, pid: int, workdir: Path):
        self.pid, self.workdir = pid, workdir
        self.rss = self.anon = self.disk = 0
        self._last_disk = 0.0

    def sample(self) -> None:
        rss = anon = 0
        for p in process_tree(self.pid):
            s = _status(p)
            rss += s.get("VmRSS", 0)
            anon += s.get("RssAnon", 0)
            if p == self.pid:
                self.rss = max(self.rss, s.get("VmHWM", 0))
        self.rss, self.anon = max(self.rss, rss), max(self.anon, anon)
        if time.monotonic() - self._last_disk > 1.0:
            self.disk = max(self.disk, folder_bytes(self.workdir))
            self._last_disk = time.monotonic()


def run_step(name: str, argv: list[str], workdir: Path, *, log: Path, timeout: float | None = None,
             env: dict | None = None) -> Step:
    """Run `argv` to completion, sampling it; its output goes to `log`."""
    step = Step(name, " ".join(argv), load_before=loadavg())
    start = time.monotonic()
    with open(log, "ab") as fh:
        fh.write(f"\n$ {step.command}\n".encode())
        fh.flush()
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=env)
        sampler = Sampler(proc.pid, workdir)
        while proc.poll() is None:
            sampler.sample()
            if timeout and time.monotonic() - start > timeout:
                proc.kill()
                step.note = f"killed after {timeout:.0f} s"
            time.sleep(SAMPLE_S)
    return finish(step, sampler, proc.returncode, start)


def watch(name: str, command: str, proc: subprocess.Popen, workdir: Path) -> tuple[Step, Sampler, float]:
    """A Step and Sampler for a process the caller drives (a server); close it with `finish`."""
    return Step(name, command, load_before=loadavg()), Sampler(proc.pid, workdir), time.monotonic()


def finish(step: Step, sampler: Sampler, rc: int | None, start: float) -> Step:
    """Close a Step with the sampler's peaks, its wall time and exit status."""
    step.wall_s = round(time.monotonic() - start, 2)
    step.peak_rss, step.peak_anon, step.disk_peak = sampler.rss, sampler.anon, sampler.disk
    step.rc, step.load_after = rc, loadavg()
    return step


def machine() -> dict:
    """CPU, cores, flags that matter to llama.cpp, RAM, kernel."""
    info = {"kernel": platform.release(), "cores": os.cpu_count()}
    cpuinfo = Path("/proc/cpuinfo").read_text()
    for line in cpuinfo.splitlines():
        if line.startswith("model name"):
            info["cpu"] = line.split(":", 1)[1].strip()
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            info["flags"] = " ".join(f for f in ("avx", "avx2", "fma", "f16c", "avx512f", "avx_vnni") if f in flags)
            info["no_flags"] = " ".join(f for f in ("avx2", "avx512f") if f not in flags)
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal"):
            info["ram"] = int(line.split()[1]) * 1024
    return info


def busy_processes(limit: int = 6) -> list[str]:
    """The processes using the most CPU right now, other workers' compilers and tests among them."""
    run = subprocess.run(["ps", "-eo", "pcpu,rss,comm", "--sort=-pcpu"], capture_output=True, text=True)
    return [" ".join(line.split()) for line in run.stdout.splitlines()[1:limit + 1]]


def free_disk(path: Path) -> int:
    return shutil.disk_usage(path).free

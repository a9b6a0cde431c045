"""The rehearsal's `r7b serve` step: time to first token for a long grounded prompt, then a follow-up.

One token is asked for (`max_tokens: 1`), so a request's wall time is prefill plus one decode
step: the time to first token a streaming client would see. The follow-up repeats the first turn
with the answer and one more question, so the server can reuse the cached prefix.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import rehearsal_measure as measure  # noqa: E402
from procs import stop_process  # noqa: E402

PORT = 8765
PROMPT_TOKENS = 2000
CHARS_PER_TOKEN = 4.25  # en.txt with Command-R's vocabulary
TEMPLATE_TOKENS = 1650  # the grounded-generation preamble and turn tokens around the documents


def documents(text: Path, tokens: int = PROMPT_TOKENS) -> list[dict]:
    """Four documents from `text`, about `tokens` tokens in all with the question and the template
    (whose grounding preamble is most of a 2,000-token prompt)."""
    body = text.read_text(encoding="utf-8")
    size = int((tokens - TEMPLATE_TOKENS) * CHARS_PER_TOKEN / 4)
    return [{"title": f"Excerpt {i + 1}", "snippet": body[i * size:(i + 1) * size]} for i in range(4)]


def _post(body: dict, timeout: float = 3600) -> tuple[float, dict]:
    req = urllib.request.Request(f"http://127.0.0.1:{PORT}/v1/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    t0 = time.monotonic()
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        data = json.loads(resp.read())
    return time.monotonic() - t0, data


def _wait_ready(proc: subprocess.Popen, sampler: measure.Sampler, limit: float = 600) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        sampler.sample()
        if proc.poll() is not None:
            raise RuntimeError(f"r7b serve exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{PORT}/health", timeout=2) as resp:
                if resp.status == 200:
                    return time.monotonic() - t0
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("r7b serve did not answer /health in time")


def _in_background(fn, sampler: measure.Sampler):
    """Run `fn` in a thread while sampling memory here."""
    import threading

    out: dict = {}
    thread = threading.Thread(target=lambda: out.update(value=fn()), daemon=True)
    thread.start()
    while thread.is_alive():
        sampler.sample()
        thread.join(measure.SAMPLE_S)
    if "value" not in out:
        raise RuntimeError("the request failed (see the rehearsal log)")
    return out["value"]


def measure_serve(argv: list[str], workdir: Path, log: Path, text: Path) -> measure.Step:
    """Start the server, time two turns, stop it; the Step holds both times and the prompt sizes."""
    docs = documents(text)
    first = [{"role": "user", "content": "Summarize what these excerpts say about the characters."}]
    with open(log, "ab") as fh:
        fh.write(f"\n$ {' '.join(argv)}\n".encode())
        fh.flush()
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT)
    step, sampler, start = measure.watch("serve", " ".join(argv), proc, workdir)
    try:
        step.extra["ready_s"] = round(_wait_ready(proc, sampler), 1)
        with urllib.request.urlopen(f"http://127.0.0.1:{PORT}/v1/models", timeout=10) as resp:
            name = json.loads(resp.read())["data"][0]["id"]
        body = {"model": name, "messages": first, "documents": docs, "max_tokens": 1, "temperature": 0}
        t1, data1 = _in_background(lambda: _post(body), sampler)
        answer = data1["choices"][0]["message"].get("content") or "They are introduced."
        follow = first + [{"role": "assistant", "content": answer},
                          {"role": "user", "content": "Which excerpt is the longest?"}]
        t2, data2 = _in_background(lambda: _post({**body, "messages": follow}), sampler)
        step.extra.update(ttft_first_s=round(t1, 2), ttft_follow_s=round(t2, 2),
                          prompt_tokens_first=data1["usage"]["prompt_tokens"],
                          prompt_tokens_follow=data2["usage"]["prompt_tokens"])
        step.throughput = (f"first turn {data1['usage']['prompt_tokens']} tokens: {t1:.1f} s to first token; "
                           f"follow-up {data2['usage']['prompt_tokens']} tokens: {t2:.1f} s")
    finally:
        stop_process(proc, 30)
    return measure.finish(step, sampler, proc.returncode, start)

"""One model over several machines (llama.cpp's RPC backend), on loopback with `r7b worker`s started here.

F16 weights: the workers and the local CPU then run the same kernels on the same layouts, so a split
run must give exactly the local logits (quantized weights would differ by the local CPU's repacked
layouts, see the rpc-notes).
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from procs import stop_process
from r7b import rpc
from r7b.errors import R7BError

pytestmark = pytest.mark.skipif(not rpc.supported(), reason="llama-cpp-python built without the RPC backend")

PROMPT = [{"role": "user", "content": "Tell me about the sea."}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _r7b(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "r7b.cli", *args], capture_output=True, text=True, timeout=timeout)


class Worker:
    def __init__(self, log_dir: Path, port: int | None = None):
        self.port = port or _free_port()
        self.endpoint = f"127.0.0.1:{self.port}"
        self.out, self.err = log_dir / f"worker-{self.port}.out", log_dir / f"worker-{self.port}.err"
        self.start()

    def start(self) -> None:
        with open(self.out, "ab") as out, open(self.err, "ab") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "r7b.cli", "worker", "--port", str(self.port),
                                          "--threads", "1"], stdout=out, stderr=err)
        deadline = time.monotonic() + 30
        while True:
            try:
                rpc.probe(self.endpoint, timeout=2)
                return
            except R7BError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"r7b worker did not start: {self.err.read_text()}")
                time.sleep(0.1)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> int:
        """Ctrl-C, as a user would press it."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(10)


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("workers")
    pair = [Worker(log_dir), Worker(log_dir)]
    yield pair
    for w in pair:
        assert w.stop() == 0, w.err.read_text()
        assert w.err.read_text().strip().endswith("r7b worker: stopped")


@pytest.fixture(scope="module")
def model_path(stand_in_gguf) -> Path:
    return stand_in_gguf("f16")


def _run(model_path: Path, **kwargs) -> tuple[list[float], str, object]:
    from r7b.llama import LlamaLog
    from r7b.runtime.model import Model
    from r7b.runtime.request import ChatRequest

    with LlamaLog() as log:
        log.keep_all = True
        model = Model.load(model_path, n_ctx=512, n_threads=1, **kwargs)
    with model:
        placement = model.engine.placement
        if placement is not None:  # llama.cpp put each block where the memory check counted it
            said = [line.split("device ")[1].split(",")[0] for line in log.text().splitlines()
                    if "assigned to device" in line][:placement.n_layers]
            assert said == ["CPU" if d == 0 else f"RPC{d - 1}"
                            for d in map(placement.layer_device, range(placement.n_layers))]
            assert "tensor token_embd.weight (3 MiB f16) buffer type overridden to CPU" in log.text()
        model.engine.prefill(model.prepare(ChatRequest(messages=PROMPT)).tokens)
        logits = list(model.engine.logits()[:model.engine.n_vocab])
        text = model.chat(PROMPT, max_tokens=24, temperature=0).text
    return logits, text, placement


def test_split_matches_local(model_path, workers):
    local_logits, local_text, _ = _run(model_path)
    endpoints = [w.endpoint for w in workers]
    logits, text, placement = _run(model_path, rpc=endpoints, tensor_split=[1, 2, 2])
    assert placement.layers() == [[0, 4], [1, 2], [3]]  # the output layer (4) stays here
    assert logits == local_logits  # exactly: same kernels, same F16 layouts
    assert text == local_text and text
    _, text, placement = _run(model_path, rpc=endpoints)  # default: by free memory as the workers report it
    assert text == local_text and len(placement.free) == 3


def test_eval_figures_equal(model_path, workers, held_out_text, tmp_path):
    text = tmp_path / "en.txt"
    text.write_text(held_out_text["en"], encoding="utf-8")
    args = ["eval", "--reference", str(model_path), str(model_path), "--text", str(text), "--ctx", "128",
            "--chunks", "3", "--json", "-q", "--threads", "1"]
    local = _r7b(*args)
    split = _r7b(*args, "--rpc", ",".join(w.endpoint for w in workers), "--tensor-split", "1,1,1")
    assert local.returncode == 0 and split.returncode == 0, split.stderr
    a, b = json.loads(local.stdout)[0], json.loads(split.stdout)[0]
    # Tolerance 1e-9 relative: F16 gives the same logits bit for bit, so the figures should be equal.
    for key in ("ppl", "reference_ppl", "kld_mean", "top1_agreement"):
        assert b[key] == pytest.approx(a[key], rel=1e-9, abs=1e-12), key


def test_generate_over_rpc_matches_local(model_path, workers):
    """`r7b generate --rpc` runs the model in its supervised child process and answers as a local run does."""
    args = ["generate", str(model_path), "--prompt", "Hello", "--temperature", "0", "--max-tokens", "24",
            "--n-ctx", "512", "--threads", "1"]
    local = _r7b(*args)
    split = _r7b(*args, "--rpc", ",".join(w.endpoint for w in workers))
    assert local.returncode == 0 and split.returncode == 0, split.stderr
    assert split.stdout == local.stdout and local.stdout.strip()


def test_unreachable_worker_is_one_line(model_path):
    dead = f"127.0.0.1:{_free_port()}"
    out = _r7b("generate", str(model_path), "--prompt", "Hello", "--rpc", dead, timeout=60)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [f"r7b generate: error: RPC worker {dead} is unreachable: "
                                               "Connection refused (is `r7b worker` running there?)"]
    out = _r7b("generate", str(model_path), "--prompt", "Hello", "--rpc", "no-port-here")
    assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1 and "HOST:PORT" in out.stderr


def test_worker_refuses_public_address_without_flag():
    out = _r7b("worker", "--host", "0.0.0.0", "--port", str(_free_port()), timeout=30)
    assert out.returncode == 1
    assert len(out.stderr.strip().splitlines()) == 1 and "--allow-remote" in out.stderr


def test_split_that_does_not_fit_is_refused_naming_the_device(model_path):
    from r7b.gguf_validate import validate_gguf
    from r7b.memory import check_fits, split_shares

    summary = validate_gguf(model_path)
    placement = rpc.Placement(["10.0.0.2:50052"], [0], [0.5, 0.5], [1 << 40, 1 << 20], 4)
    shares = split_shares(summary, placement, n_ctx=512)
    assert sum(s.weights for s in shares) == sum(t.nbytes for t in summary.tensors)  # output kept here
    with pytest.raises(R7BError, match=r"worker 10\.0\.0\.2:50052 would hold 2 layers .* only 1\.0 MiB free"):
        check_fits(summary, n_ctx=512, placement=placement)
    roomy = rpc.Placement(["10.0.0.2:50052"], [0], [0.5, 0.5], [1 << 40, 1 << 40], 4)
    assert check_fits(summary, n_ctx=512, placement=roomy).weights == shares[0].weights


def test_serve_survives_a_worker_that_drops(model_path, tmp_path):
    import requests

    worker = Worker(tmp_path)
    port = _free_port()
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        server = subprocess.Popen([sys.executable, "-m", "r7b.cli", "serve", str(model_path), "--port", str(port),
                                   "--threads", "1", "--n-ctx", "512", "--rpc", worker.endpoint,
                                   "--tensor-split", "1,1"], stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    body = {"messages": PROMPT, "max_tokens": 8, "temperature": 0}

    def ask() -> requests.Response:
        return requests.post(url + "/v1/chat/completions", json=body, timeout=60)

    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, log.read_text()
            try:
                if requests.get(url + "/health", timeout=1).ok:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        first = ask()
        assert first.status_code == 200, first.text
        # The worker dies in the middle of a streamed answer: the stream ends with an error event.
        with requests.post(url + "/v1/chat/completions", json={**body, "max_tokens": 400, "stream": True},
                           stream=True, timeout=60) as streamed:
            lines = streamed.iter_lines()
            assert next(line for line in lines if line.startswith(b"data: {"))
            worker.kill()
            rest = b"\n".join(lines).decode()
        assert '"error"' in rest and worker.endpoint in rest, rest[-500:]
        lost = ask()  # while the worker is down: one line saying so
        assert lost.status_code >= 400
        assert f"RPC worker {worker.endpoint} is unreachable" in lost.json()["error"]["message"]
        assert server.poll() is None  # the server itself is still up
        worker.start()
        back = ask()
        assert back.status_code == 200, back.text
        assert back.json()["choices"][0]["message"]["content"] == first.json()["choices"][0]["message"]["content"]
    finally:
        stop_process(server, 15)
        worker.stop()

"""Decode speed of a model split over `r7b worker`s (llama.cpp RPC) against a local run, and the network
traffic per generated token.

Everything runs on this machine over loopback: the workers are started here (`r7b worker --port P`),
and each is reached once directly (for speed) and once through a counting TCP proxy in this process
(for bytes and request/response turns; the proxy adds latency, so its runs are not timed). Each
measurement loads the model in a fresh process, because a worker serves one client at a time and
llama.cpp keeps its connection for the life of the process.

    python scripts/rpc_bench.py MODEL.gguf [--gen-tokens 64] [--prompt-tokens 64] [--threads 1] [--json]

Reported per configuration: decode tok/s (median of --repeat runs), bytes sent to / received from the
workers per generated token, request/response turns per token (each one a network round trip), and
what loading cost (the weights cross the network once). Loopback has no bandwidth or latency to
speak of, so the speeds here are the compute side only; docs/deploy.md turns the bytes and turns into
what a real link allows.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing as mp
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEXT = ("The sea is wide and deep, and the ships that cross it carry goods and people from one shore to "
        "the other. Sailors have long told stories of storms and calm days, of stars that guide them home. ") * 400


# -- workers and the counting proxy ------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_worker(threads: int) -> tuple[subprocess.Popen, str]:
    sys.path.insert(0, str(ROOT))
    from r7b import rpc
    from r7b.errors import R7BError

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "r7b.cli", "worker", "--port", str(port), "--threads", str(threads)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            rpc.probe(endpoint, timeout=2)
            return proc, endpoint
        except R7BError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"worker on {endpoint} did not start")
            time.sleep(0.1)


class CountingProxy:
    """Forwards 127.0.0.1:port to a worker, counting bytes each way and request/response turns."""

    def __init__(self, target: str):
        host, _, port = target.rpartition(":")
        self.target = (host, int(port))
        self.server = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"127.0.0.1:{self.server.getsockname()[1]}"
        self.lock = threading.Lock()
        self.sent = self.received = self.turns = 0
        self._last = "down"
        threading.Thread(target=self._accept, daemon=True).start()

    def snapshot(self) -> dict[str, int]:
        with self.lock:
            return {"sent": self.sent, "received": self.received, "turns": self.turns}

    def _accept(self) -> None:
        while True:
            client, _ = self.server.accept()
            upstream = socket.create_connection(self.target)
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._pump, args=(client, upstream, "up"), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, "down"), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, way: str) -> None:
        try:
            while data := src.recv(1 << 20):
                with self.lock:
                    if way == "up":
                        self.sent += len(data)
                        if self._last == "down":
                            self.turns += 1  # a new request after a response: one more round trip
                    else:
                        self.received += len(data)
                    self._last = way
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


# -- one measurement (in a fresh process) ------------------------------------------------------------

def measure(model: str, rpc: list[str], split: list[float] | None, prompt_tokens: int, gen_tokens: int,
            threads: int, repeat: int, marks: bool) -> dict:
    """Load, prefill and decode; with `marks`, pause between phases so the parent can read its counters."""
    sys.path.insert(0, str(ROOT))
    from r7b.runtime.engine import Sampling
    from r7b.runtime.model import Model

    t0 = time.perf_counter()
    m = Model.load(model, n_ctx=max(512, prompt_tokens + gen_tokens + 16), n_threads=threads,
                   rpc=rpc or None, tensor_split=split, check_memory=False)
    out: dict = {"load_s": time.perf_counter() - t0,
                 "placement": m.engine.placement.describe() if m.engine.placement else "this machine: all layers"}
    tokens = m.engine.tokenize(TEXT, special=False, add_bos=True)[:prompt_tokens]
    greedy = Sampling(temperature=0.0)
    speeds, prefills = [], []
    for _ in range(repeat):
        if marks:
            _mark("before_prefill")
        t0 = time.perf_counter()
        m.engine.prefill(tokens)
        t1 = time.perf_counter()
        if marks:
            _mark("before_decode")
        t2 = time.perf_counter()
        n = sum(1 for _ in m.engine.generate(greedy, gen_tokens, ignore_eog=True))
        t3 = time.perf_counter()
        if marks:
            _mark("after_decode")
        m.engine.reset()
        prefills.append(len(tokens) / (t1 - t0))
        speeds.append(n / (t3 - t2))  # n decode steps (each sampled token is evaluated)
        out["generated"] = n
    m.close()
    out.update(prefill_tps=statistics.median(prefills), decode_tps=statistics.median(speeds),
               decode_tps_all=speeds)
    return out


_marks: "mp.Queue | None" = None
_go: "mp.Queue | None" = None


def _init(marks: "mp.Queue", go: "mp.Queue") -> None:
    global _marks, _go
    _marks, _go = marks, go


def _mark(name: str) -> None:
    _marks.put(name)
    _go.get()  # wait until the parent has read its counters


def run(model: str, rpc: list[str], split: list[float] | None, args: argparse.Namespace,
        proxies: list[CountingProxy] | None = None) -> dict:
    ctx = mp.get_context("spawn")
    marks, go = ctx.Queue(), ctx.Queue()
    with cf.ProcessPoolExecutor(1, mp_context=ctx, initializer=_init, initargs=(marks, go)) as pool:
        future = pool.submit(measure, model, rpc, split, args.prompt_tokens, args.gen_tokens, args.threads,
                             1 if proxies else args.repeat, proxies is not None)
        counts: dict[str, dict[str, int]] = {"start": _total(proxies)} if proxies else {}
        while proxies is not None and len(counts) < 4:
            name = marks.get(timeout=600)
            counts[name] = _total(proxies)
            go.put(None)
        result = future.result()
    if proxies is not None:
        n = args.gen_tokens  # decode steps: every generated token is evaluated (EOG ignored)
        start, pre, dec, end = (counts["start"], counts["before_prefill"], counts["before_decode"],
                                counts["after_decode"])
        result["traffic"] = {
            "load_sent": pre["sent"] - start["sent"], "load_received": pre["received"] - start["received"],
            "prefill_sent": dec["sent"] - pre["sent"], "prefill_received": dec["received"] - pre["received"],
            "per_token_sent": (end["sent"] - dec["sent"]) / n,
            "per_token_received": (end["received"] - dec["received"]) / n,
            "per_token_turns": (end["turns"] - dec["turns"]) / n,
        }
    return result


def _total(proxies: list[CountingProxy]) -> dict[str, int]:
    snaps = [p.snapshot() for p in proxies]
    return {k: sum(s[k] for s in snaps) for k in ("sent", "received", "turns")}


# -- the command -------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="threads of the main process and of each worker")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--configs", default="local,one,two,remote",
                    help="which runs: local, one (this machine + 1 worker, 1:1), two (+ 2 workers, 1:1:1), "
                         "remote (2 workers only, 0:1:1), all (every block on 1 worker, 0:1)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("GGML_NO_BACKTRACE", "1")
    workers = [start_worker(args.threads) for _ in range(2)]
    endpoints = [e for _, e in workers]
    try:
        proxies = [CountingProxy(e) for e in endpoints]
        configs = {"local": ("local", [], None),
                   "one": ("this machine + 1 worker (1:1)", endpoints[:1], [1, 1]),
                   "two": ("this machine + 2 workers (1:1:1)", endpoints, [1, 1, 1]),
                   "remote": ("2 workers only (0:1:1)", endpoints, [0, 1, 1]),
                   "all": ("every block on 1 worker (0:1)", endpoints[:1], [0, 1])}
        configs = [configs[c.strip()] for c in args.configs.split(",")]
        rows = []
        for name, rpc, split in configs:
            row = {"config": name, **run(args.model, rpc, split, args)}
            if rpc:
                via = [proxies[endpoints.index(e)] for e in rpc]
                row["traffic"] = run(args.model, [p.endpoint for p in via], split, args, via)["traffic"]
            rows.append(row)
            print(f"{name}: {row['decode_tps']:.2f} tok/s", file=sys.stderr, flush=True)
    finally:
        for proc, _ in workers:
            proc.terminate()
            proc.wait(10)
    if args.json:
        print(json.dumps({"model": args.model, "threads": args.threads, "prompt_tokens": args.prompt_tokens,
                          "gen_tokens": args.gen_tokens, "rows": rows}, indent=2))
        return 0
    print(f"{Path(args.model).name}: {args.prompt_tokens}-token prompt, {args.gen_tokens} tokens, "
          f"{args.threads} thread(s) per process, loopback, median of {args.repeat}")
    print("| configuration | layers | prefill tok/s | decode tok/s | sent B/token | received B/token | "
          "round trips/token | load: sent MiB |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        t = r.get("traffic")
        cells = ([f"{t['per_token_sent']:.0f}", f"{t['per_token_received']:.0f}", f"{t['per_token_turns']:.1f}",
                  f"{t['load_sent'] / 2**20:.1f}"] if t else ["–"] * 4)
        print(f"| {r['config']} | {r['placement']} | {r['prefill_tps']:.1f} | {r['decode_tps']:.2f} | "
              + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Concurrent streaming clients against `r7b serve` and llama-server with the same slots and settings.

For each number of clients N, a server with N slots is started on 127.0.0.1 (r7b serve --parallel N;
llama-server -np N -c N*C), beside r7b serve --parallel 1 (serial), which stays up for all N. N
clients then send one streaming /v1/chat/completions request each, at the same moment, each with a
different user prompt of about --prompt-words words (held-out English), temperature 0, --max-tokens
tokens, with `ignore_eos` (both servers take it): every answer runs to the limit, so each server does
the same work however the model would have ended its turns. Recorded: aggregate tokens/s (completion
tokens of all clients over the time from the first request to the last token), and per client the
time to the first token and to the last one (median and max).

The servers take turns, round by round, in an order that rotates, so that the machine's drift (a
VM's neighbours move these figures by 10 % from one minute to the next) hits them alike; the
r7b/that ratios are medians of the ratios of rounds run side by side.

    python scripts/serve_bench.py MODEL.gguf [--clients 1,2,4,8] [--quick] [--json]

llama-server comes from `make peers` (tests/peers.py finds it). Both servers get the same
threads, context per slot, batch size, KV cache type and flash-attention mode (r7b's "auto"
resolved as r7b resolves it, so both run the same attention path).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from procs import stop_process  # noqa: E402

from r7b.quality import bench  # noqa: E402

N_BATCH = 512
START_TIMEOUT_S = 300
REQUEST_TIMEOUT_S = 600


@dataclass(frozen=True)
class ServePlan:
    clients: tuple[int, ...]
    prompt_words: int
    max_tokens: int
    n_ctx: int  # per slot
    repeat: int  # rounds per server and client count; the figures are from the round with the median throughput


FULL = ServePlan(clients=(1, 2, 4, 8), prompt_words=150, max_tokens=64, n_ctx=1024, repeat=5)
QUICK = ServePlan(clients=(1, 2), prompt_words=40, max_tokens=8, n_ctx=512, repeat=1)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- servers --------------------------------------------------------------------------------------------

def r7b_supports_parallel() -> bool:
    """Whether this r7b serve has --parallel (older ones serve one request at a time)."""
    out = subprocess.run([sys.executable, "-m", "r7b.cli", "serve", "--help"], capture_output=True, text=True)
    return "--parallel" in out.stdout


def r7b_command(model: Path, port: int, slots: int, plan: ServePlan, threads: int, flash_attn: str, kv_type: str,
                parallel_flag: bool) -> list[str]:
    cmd = [sys.executable, "-m", "r7b.cli", "serve", str(model), "--host", "127.0.0.1", "--port", str(port),
           "--n-ctx", str(plan.n_ctx), "--threads", str(threads), "--flash-attn", flash_attn, "--kv-type", kv_type]
    if parallel_flag:
        cmd += ["--parallel", str(slots)]
    elif slots != 1:
        raise SystemExit("r7b serve has no --parallel here: only one slot can be benchmarked")
    return cmd


def llama_server_command(model: Path, port: int, slots: int, plan: ServePlan, threads: int, flash_attn: str,
                         kv_type: str) -> list[str]:
    """llama-server with `slots` slots of plan.n_ctx tokens each: -np N with -c N*C (the KV cache is split
    evenly between the slots, since -np given explicitly leaves --kv-unified off in this version)."""
    from peers import peer_binary

    return [str(peer_binary("llama-server")), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
            "-np", str(slots), "-c", str(slots * plan.n_ctx), "-t", str(threads), "-fa", flash_attn,
            "-ctk", kv_type, "-ctv", kv_type, "-b", str(N_BATCH), "-ub", str(N_BATCH)]


class Server:
    """A server process on loopback, ready once GET /v1/models answers 200."""

    def __init__(self, cmd: Sequence[str], port: int, log_path: Path):
        self.port = port
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen(list(cmd), stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise SystemExit(f"{Path(cmd[0]).name} {' '.join(cmd[1:4])} did not start; see {log_path}")
            time.sleep(0.2)

    def _ready(self) -> bool:
        """Whether /v1/models answers; keeps the model's name, which requests must give."""
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
            conn.request("GET", "/v1/models")
            resp = conn.getresponse()
            if resp.status != 200:
                return False
            self.model = json.loads(resp.read())["data"][0]["id"]
            return True
        except (OSError, ValueError, KeyError, IndexError):
            return False

    def close(self) -> None:
        stop_process(self.proc, 20)
        self.log.close()

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# -- clients --------------------------------------------------------------------------------------------

def prompts(n: int, words: int) -> list[str]:
    """n different passages of held-out English, `words` words each."""
    text = (ROOT / "tests" / "fixtures" / "held-out" / "en.txt").read_text(encoding="utf-8").split()
    return [" ".join(text[i * words:(i + 1) * words]) for i in range(n)]


def stream_chat(port: int, model: str, prompt: str, max_tokens: int, t0: float) -> dict[str, float]:
    """One streaming request; seconds from t0 to the first and last content chunk, and the tokens."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}], "stream": True,
                       "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                       "stream_options": {"include_usage": True}})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT_S)
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
    first = last = end = None
    chunks, usage = 0, None
    for raw in resp:
        line = raw.decode("utf-8", "replace").strip()
        if not line.startswith("data:") or line == "data: [DONE]":
            continue
        event = json.loads(line[5:])
        usage = event.get("usage") or usage
        for choice in event.get("choices") or []:
            end = time.perf_counter() - t0
            delta = choice.get("delta") or {}
            if any(value for key, value in delta.items() if key != "role"):  # text, plan or tool call
                last = end
                first = first if first is not None else last
                chunks += 1
    conn.close()
    tokens = (usage or {}).get("completion_tokens", chunks)
    # an answer whose text a server held back to the end (control tokens only) arrives with its last chunk
    end = end if end is not None else time.perf_counter() - t0
    return {"ttft_s": first if first is not None else end, "last_s": last if last is not None else end,
            "tokens": tokens}


def one_round(server: Server, texts: Sequence[str], max_tokens: int) -> dict[str, Any]:
    """All clients at once (released together by a barrier); aggregate and per-client figures."""
    results: list[dict[str, float] | Exception] = [RuntimeError("no answer")] * len(texts)
    barrier = threading.Barrier(len(texts) + 1)
    t0_box: list[float] = []

    def client(i: int) -> None:
        barrier.wait()
        try:
            results[i] = stream_chat(server.port, server.model, texts[i], max_tokens, t0_box[0])
        except Exception as exc:  # reported below, with the client's number
            results[i] = exc

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(texts))]
    for t in threads:
        t.start()
    t0_box.append(time.perf_counter())
    barrier.wait()
    for t in threads:
        t.join()
    failed = [f"client {i}: {r}" for i, r in enumerate(results) if isinstance(r, Exception)]
    if failed:
        raise SystemExit("; ".join(failed))
    return summarize_round(results)


def summarize_round(results: Sequence[dict[str, float]]) -> dict[str, Any]:
    wall = max(r["last_s"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    lat, ttft = [r["last_s"] for r in results], [r["ttft_s"] for r in results]
    return {"clients": len(results), "tokens": tokens, "wall_s": wall, "tps": tokens / wall if wall else 0.0,
            "latency_median_s": statistics.median(lat), "latency_max_s": max(lat),
            "ttft_median_s": statistics.median(ttft), "ttft_max_s": max(ttft)}


def take_turns(servers: dict[str, Server], clients: int, plan: ServePlan) -> dict[str, list[dict[str, Any]]]:
    """plan.repeat rounds of `clients` clients per server, after one unrecorded round each (the first
    round after a start ran at half speed on every server); round k runs every server once, starting
    with the k-th."""
    texts = prompts(clients, plan.prompt_words)
    for server in servers.values():
        one_round(server, texts, plan.max_tokens)
    names = list(servers)
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for k in range(plan.repeat):
        for name in names[k % len(names):] + names[:k % len(names)]:
            rounds[name].append(one_round(servers[name], texts, plan.max_tokens))
    return rounds


def median_round(rounds: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return sorted(rounds, key=lambda r: r["tps"])[len(rounds) // 2]


def paired_ratio(ours: Sequence[dict[str, Any]], theirs: Sequence[dict[str, Any]]) -> float:
    """Median over rounds of ours/theirs throughput, each round against the one run beside it."""
    return statistics.median(a["tps"] / b["tps"] for a, b in zip(ours, theirs))


# -- the comparison -------------------------------------------------------------------------------------

def serve_bench(model: Path, plan: ServePlan, threads: int, work: Path, flash_attn: str = "auto",
                kv_type: str = "f16") -> dict[str, Any]:
    """Rows for r7b (N slots), r7b serial (1 slot) and llama-server (N slots) at each client count, and
    r7b's paired throughput ratios to the other two."""
    work.mkdir(parents=True, exist_ok=True)
    fa = bench.resolved_flash_attn(flash_attn, kv_type)
    parallel_flag = r7b_supports_parallel()
    rows: list[dict[str, Any]] = []
    counts = plan.clients if parallel_flag else (1,)

    def start(name: str, cmd_for: Any) -> Server:
        port = free_port()
        return Server(cmd_for(port), port, work / f"{name}.log")

    with start("r7b-serial", lambda p: r7b_command(model, p, 1, plan, threads, flash_attn, kv_type,
                                                   parallel_flag)) as serial:
        for n in counts:
            with start(f"r7b-{n}", lambda p: r7b_command(model, p, n, plan, threads, flash_attn, kv_type,
                                                         parallel_flag)) as ours, \
                 start(f"llama-server-{n}", lambda p: llama_server_command(model, p, n, plan, threads, fa,
                                                                           kv_type)) as peer:
                rounds = take_turns({"r7b": ours, "r7b serial": serial, "llama-server": peer}, n, plan)
            for name, slots in (("r7b", n), ("r7b serial", 1), ("llama-server", n)):
                ratio = paired_ratio(rounds["r7b"], rounds[name]) if name != "r7b" else None
                rows.append({"server": name, "slots": slots, **median_round(rounds[name]), "ratio": ratio,
                             "rounds_tps": [r["tps"] for r in rounds[name]]})
            log(f"{n} clients done")
    return {"plan": asdict(plan), "threads": threads, "flash_attn": flash_attn, "flash_attn_used": fa,
            "kv_type": kv_type, "parallel_flag": parallel_flag, "rows": rows}


def row_for(data: dict[str, Any], server: str, clients: int) -> dict[str, Any] | None:
    return next((r for r in data["rows"] if r["server"] == server and r["clients"] == clients), None)


def goals(data: dict[str, Any], clients: int = 4) -> dict[str, float | None]:
    """At `clients` clients: r7b's throughput over serial r7b (goal >= 1.3) and over llama-server (>= 1.0),
    paired by round."""
    ours, serial, peer = (row_for(data, s, clients) for s in ("r7b", "r7b serial", "llama-server"))
    return {"clients": clients, "vs_serial": ratio_of(ours, serial), "vs_llama_server": ratio_of(ours, peer)}


def ratio_of(ours: dict[str, Any] | None, theirs: dict[str, Any] | None) -> float | None:
    """The paired ratio kept in `theirs` row (median-round throughputs for rows without one)."""
    if not ours or not theirs:
        return None
    return theirs.get("ratio") or (ours["tps"] / theirs["tps"] if theirs["tps"] else None)


def table(data: dict[str, Any]) -> list[str]:
    """Markdown rows: one per server and client count."""
    head = ["| clients | server | slots | tokens | tok/s (all clients) | TTFT median / max s | "
            "latency median / max s | r7b/that |", "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    lines = []
    for n in sorted({r["clients"] for r in data["rows"]}):
        ours = row_for(data, "r7b", n)
        for server in ("r7b", "r7b serial", "llama-server"):
            r = row_for(data, server, n)
            if r is None:
                continue
            value = ratio_of(ours, r) if server != "r7b" else None
            ratio = f"{value:.2f}" if value else ""
            lines.append(f"| {n} | {server} | {r['slots']} | {r['tokens']} | {r['tps']:.1f} | "
                         f"{r['ttft_median_s']:.2f} / {r['ttft_max_s']:.2f} | "
                         f"{r['latency_median_s']:.2f} / {r['latency_max_s']:.2f} | {ratio} |")
    return head + lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--quick", action="store_true", help="1 and 2 clients, short prompts and answers")
    ap.add_argument("--clients", help="client counts, e.g. 1,2,4,8")
    ap.add_argument("--threads", type=int, default=min(os.cpu_count() or 1, 8))
    ap.add_argument("--flash-attn", default="auto", choices=("auto", "on", "off"))
    ap.add_argument("--kv-type", default="f16")
    ap.add_argument("--work", type=Path, default=ROOT / "build" / "serve-bench")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    plan = QUICK if args.quick else FULL
    if args.clients:
        plan = ServePlan(tuple(int(x) for x in args.clients.split(",")), plan.prompt_words, plan.max_tokens,
                         plan.n_ctx, plan.repeat)
    data = serve_bench(args.model, plan, args.threads, args.work, args.flash_attn, args.kv_type)
    print(json.dumps(data, indent=2) if args.json else "\n".join(table(data)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`r7b bench`: prefill and decode speed, time to first token and memory, against bare llama.cpp.

Each figure is measured twice in the same run: through the project's real per-token path
(`Engine.prefill`, `Engine.generate`, `TextStream`; optionally `Model.chat` streaming) and
through `bench_raw.RawLoop`, a minimal loop on llama.cpp's C API. For speed both sides run in one
process on the same loaded weights, each with its own context, and take turns (r7b, raw, raw,
r7b, ...) so that machine drift hits both alike; rounds that other processes disturbed (a shared
machine) are run again. Peak RSS comes from one process per side.
Figures are medians with their range over the repeats; the r7b/raw ratio (the median of the
per-round ratios) is what the Python layer costs (1.0 = nothing).

Test names follow llama-bench: pp512 is prefill of 512 tokens, tg128 is generating 128 tokens
(here right after that prompt, so at depth 512); with --depth N (llama-bench's -d), N tokens are
evaluated once per side, kept, and every run starts from them ("pp512 @ d4096"): the prompt is
prefilled after them, and then, as llama-bench's "tg128 @ d4096", the cache goes back to the N
tokens and decoding restarts from there with the first token. Both sides get the
same KV cache type and the same flash-attention mode: the one the engine resolved its setting to
(read from llama.cpp's log), so "auto" means the same thing on both. Prompts are seeded random ids from the
vocabulary without control tokens, starting with BOS; generation ignores end-of-generation
tokens, so every run produces exactly the tokens asked for.
"""

from __future__ import annotations

import argparse
import functools
import math
import json
import multiprocessing as mp
import os
import re
import statistics
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from r7b.errors import R7BError

from r7b.cohere2 import KV_TYPES, Cohere2Dims, kv_type_id, n_global_layers
from r7b.gguf_reader import read_gguf
from r7b.gguf_validate import validate_gguf
from r7b.llama import FLASH_ATTN, LlamaLog, LlamaModel, default_threads
from r7b.memory import MIB, pad, tensor_bytes
from r7b.quality.results import type_label
from r7b.runtime.options import add_rpc_options, rpc_kwargs

Clock = Callable[[], float]
TIMED = ("pp_tps", "tg_tps", "ttft_s")
METRICS = (*TIMED, "peak_rss_bytes", "kv_bytes", "compute_bytes")
N_BATCH = 512
WARMUP = (16, 4)  # prompt and generated tokens of the unrecorded first run
MEM_REPEAT = 3  # runs per side for peak RSS (it hardly varies)
MEM_GEN = 8  # the prompt's batch touches every buffer; decoding allocates nothing more
QUIET_SHARE, QUIET_SLACK_S = 0.2, 0.03  # a run counts if others used <= 0.2 cores (+ /proc/stat's 10 ms ticks)
SEED = 1234


# -- arithmetic ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Timing:
    """Clock readings of one run: start, prompt evaluated, first token out, last token decoded."""

    n_prompt: int
    n_gen: int
    t_start: float
    t_prefilled: float
    t_first: float
    t_gen: float  # decoding timed from here: t_prefilled, or at a depth the moment it restarts from there
    t_end: float

    @property
    def pp_tps(self) -> float:
        return self.n_prompt / (self.t_prefilled - self.t_start)

    @property
    def tg_tps(self) -> float:
        """Sampling and decoding, token by token, after the prompt (at a depth: after the depth)."""
        return self.n_gen / (self.t_end - self.t_gen)

    @property
    def ttft_s(self) -> float:
        return self.t_first - self.t_start

    def rates(self) -> dict[str, float]:
        return {"pp_tps": self.pp_tps, "tg_tps": self.tg_tps, "ttft_s": self.ttft_s}


@dataclass(frozen=True)
class Spread:
    """Median and range of one figure over the repeats."""

    median: float
    min: float
    max: float

    @classmethod
    def of(cls, samples: Sequence[float]) -> "Spread":
        if not samples:
            raise ValueError("no samples")
        return cls(statistics.median(samples), min(samples), max(samples))


def summarize(runs: Sequence[Mapping[str, float]]) -> dict[str, Spread]:
    """Per-figure spread over runs that all report the same keys."""
    return {key: Spread.of([run[key] for run in runs]) for key in runs[0]}


def ratios(ours: Mapping[str, Spread], base: Mapping[str, Spread]) -> dict[str, float]:
    """ours/base of the medians, for every figure both have."""
    return {k: ours[k].median / base[k].median for k in ours if k in base and base[k].median}


def paired_ratios(ours: Sequence[Mapping[str, float]], base: Sequence[Mapping[str, float]],
                  keys: Sequence[str]) -> dict[str, float]:
    """Median over rounds of ours/base, each run against the one it ran next to.

    On a machine whose speed drifts (a VM's neighbours), this cancels what both runs of a round
    shared, which a ratio of two medians does not.
    """
    return {k: statistics.median(a[k] / b[k] for a, b in zip(ours, base)) for k in keys}


def run_once(loop: Any, tokens: Sequence[int], n_gen: int, clock: Clock) -> dict[str, float]:
    """One measured run of a loop whose `run` returns the five clock readings."""
    return Timing(len(tokens), n_gen, *loop.run(tokens, n_gen, clock)).rates()


# -- bytes a decode step reads -------------------------------------------------------------------

def weight_bytes_per_token(tensor_sizes: Mapping[str, int]) -> int:
    """Weight bytes one decode step streams from RAM.

    Every matrix is read once per token. The token embedding is only gathered (one row) unless
    it is also the output projection, as in Cohere2's tied embeddings; then it is read in full.
    Norm vectors are counted too; they are a rounding error.
    """
    sizes = dict(tensor_sizes)
    if "output.weight" in sizes:
        sizes.pop("token_embd.weight", None)
    return sum(sizes.values())


def kv_bytes_read(shape: Cohere2Dims, depth: int, kv_type: str = "f16") -> int:
    """K and V bytes attention reads for one new token at `depth`: sliding layers see at most the window."""
    n_global = n_global_layers(shape.n_layers, shape.swa_pattern) if shape.sliding_window else shape.n_layers
    window = min(depth, shape.sliding_window) if shape.sliding_window else depth
    row = tensor_bytes((shape.n_kv_heads * shape.head_dim,), kv_type)
    return 2 * row * (n_global * depth + (shape.n_layers - n_global) * window)


def decode_gbs(bytes_per_token: float, tokens_per_s: float) -> float:
    """Achieved memory traffic of decoding, GB/s (10^9 bytes)."""
    return bytes_per_token * tokens_per_s / 1e9


def utilisation(achieved_gbs: float, limit_gbs: float) -> float:
    return achieved_gbs / limit_gbs


def best_time(fn: Callable[[], Any], repeat: int, clock: Clock = time.perf_counter) -> float:
    """Shortest of `repeat` timed calls: the run least disturbed by anything else."""
    best = float("inf")
    for _ in range(repeat):
        t0 = clock()
        fn()
        best = min(best, clock() - t0)
    return best


def memory_bandwidth(threads: int, size: int = 1 << 30, repeat: int = 5) -> dict[str, float]:
    """The machine's streaming read and copy bandwidth in GB/s, best of `repeat`, over `threads` threads.

    Read is a bitwise-OR reduction over uint64 (the least work per byte numpy offers); copy counts
    bytes read plus bytes written, as STREAM does. Both arrays are touched first, so no page faults
    are timed.
    """
    import numpy as np
    from concurrent.futures import ThreadPoolExecutor

    src = np.ones(size // 8, dtype=np.uint64)
    dst = np.zeros_like(src)
    pairs = list(zip(np.array_split(src, threads), np.array_split(dst, threads)))
    with ThreadPoolExecutor(threads) as pool:
        read = best_time(lambda: list(pool.map(lambda p: np.bitwise_or.reduce(p[0]), pairs)), repeat)
        copy = best_time(lambda: list(pool.map(lambda p: np.copyto(p[1], p[0]), pairs)), repeat)
    return {"threads": threads, "bytes": size, "read_gbs": size / read / 1e9, "copy_gbs": 2 * size / copy / 1e9}


def model_shape(path: str | Path) -> Cohere2Dims:
    """The sizes of a cohere2 GGUF, from its header."""
    return Cohere2Dims.from_gguf_metadata(read_gguf(path).metadata, name=Path(path).name)


@dataclass(frozen=True)
class ModelInfo:
    path: str
    desc: str
    size_bytes: int
    n_params: int
    bytes_per_token: int  # weights plus the KV cache read at the mean generation depth


def model_info(path: str | Path, depth: int, kv_type: str = "f16") -> ModelInfo:
    """Sizes from the GGUF header: what one decode step reads at `depth`."""
    gf = read_gguf(path)
    sizes = {t.name: t.nbytes for t in gf.tensors}
    shape = Cohere2Dims.from_gguf_metadata(gf.metadata, name=Path(path).name)
    return ModelInfo(str(path), f"{shape.n_layers}L {shape.hidden}h {type_label(gf.metadata)}", sum(sizes.values()),
                     sum(math.prod(t.shape) for t in gf.tensors),
                     weight_bytes_per_token(sizes) + kv_bytes_read(shape, depth, kv_type))


# -- process-level measurements -------------------------------------------------------------------

def reset_peak_rss() -> bool:
    """Restart the kernel's high-water mark of this process's RSS (Linux); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """VmHWM of this process (since the last reset), else ru_maxrss."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cpu_busy_seconds() -> float:
    """CPU time all processes have used since boot, from /proc/stat (0.0 where there is none)."""
    try:
        with open("/proc/stat") as fh:
            fields = [int(x) for x in fh.readline().split()[1:9]]
    except (OSError, ValueError):
        return 0.0
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait


def is_quiet(run: Mapping[str, float]) -> bool:
    """Whether other processes left this run alone: on a shared machine, a busy neighbour stalls one of
    llama.cpp's threads and every other thread waits for it at the next barrier."""
    return run["others_s"] <= QUIET_SHARE * run["wall_s"] + QUIET_SLACK_S


def wait_for_quiet(timeout_s: float = 10.0, window_s: float = 0.5) -> bool:
    """Wait (while this process and its idle workers use no CPU) until other processes leave the machine
    alone for one window; False if they never did within the timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        busy, t0 = cpu_busy_seconds(), time.monotonic()
        time.sleep(window_s)
        if cpu_busy_seconds() - busy <= QUIET_SHARE * (time.monotonic() - t0) + QUIET_SLACK_S:
            return True
    return False


@contextmanager
def llama_log() -> Iterator[list[str]]:
    """Collect llama.cpp's log lines instead of printing them."""
    with LlamaLog() as log:
        log.keep_all = True
        yield log.lines


def kv_bytes_from_log(lines: Sequence[str]) -> int:
    """The KV cache llama.cpp allocated, summed over its caches (sliding and global)."""
    found = re.findall(r"llama_kv_cache: size =\s*([\d.]+) MiB", "".join(lines))
    if not found:
        raise R7BError("llama.cpp did not report its KV cache size")
    return round(sum(float(x) for x in found) * MIB)


def compute_bytes_from_log(lines: Sequence[str]) -> int:
    """llama.cpp's compute (scratch) buffers for the last context it reported, summed over backends."""
    found = re.findall(r"(\S+) compute buffer size =\s*([\d.]+) MiB", "".join(lines))
    if not found:
        raise R7BError("llama.cpp did not report its compute buffer size")
    return round(sum(float(x) for _, x in found) * MIB)


def flash_attn_from_log(lines: Sequence[str]) -> str:
    """"on" or "off": what llama.cpp ran with, for the last context in the log (it resolves "auto" itself)."""
    text = "".join(lines)
    asked = re.findall(r"flash_attn\s+= (\w+)", text)
    if not asked:
        raise R7BError("llama.cpp did not report its flash-attention setting")
    if asked[-1] != "auto":
        return "on" if asked[-1] == "enabled" else "off"
    resolved = re.findall(r"Flash Attention (enabled|not supported)", text.rsplit("flash_attn", 1)[-1])
    return "on" if resolved[:1] == ["enabled"] else "off"


def resolved_flash_attn(flash_attn: str = "auto", kv_type: str = "f16") -> str:
    """"on" or "off": what the engine runs for this setting on the CPU, so that llama.cpp's tools can be
    told the same (their "auto" turns flash attention on wherever the backend has it)."""
    try:
        from r7b.llama import resolve_flash_attn
    except ImportError:  # a runtime whose "auto" is llama.cpp's own
        return "on" if flash_attn == "auto" else flash_attn
    mode = resolve_flash_attn(flash_attn, kv_type)
    return "on" if mode == "auto" else mode


def random_prompt(path: str | Path, n: int, seed: int = SEED) -> list[int]:
    """BOS, then seeded random ids from the vocabulary, excluding control, unused and unknown tokens."""
    import llama_cpp
    import numpy as np

    skip = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_UNUSED | llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN
    with LlamaModel(path, vocab_only=True) as model:
        ok = [t for t in range(model.n_vocab) if not model.token_attr(t) & skip]
        bos = model.bos
    rng = np.random.default_rng(seed)
    return [bos] + [int(t) for t in rng.choice(ok, size=n - 1)]


# -- the two sides -------------------------------------------------------------------------------

@dataclass(frozen=True)
class BenchSettings:
    """Context settings both sides share."""

    n_ctx: int
    n_threads: int
    n_batch: int = N_BATCH
    swa_full: bool = False
    rpc: tuple[str, ...] = ()  # RPC workers sharing the layers (r7b.rpc); both sides use the same split
    tensor_split: tuple[float, ...] | None = None
    kv_type: str = "f16"
    flash_attn: str = "auto"  # the engine's setting; the raw side gets what the engine resolved it to


class R7bLoop:
    """The project's per-token path: Engine.prefill, Engine.generate and TextStream."""

    def __init__(self, path: str | Path, settings: BenchSettings):
        from r7b.runtime.engine import Engine, EngineConfig, Sampling, TextStream

        self.engine = Engine(path, EngineConfig(n_ctx=settings.n_ctx, n_batch=settings.n_batch,
                                                n_threads=settings.n_threads, kv_type=settings.kv_type,
                                                flash_attn=settings.flash_attn, swa_full=settings.swa_full,
                                                rpc=settings.rpc, tensor_split=settings.tensor_split))
        self.greedy = Sampling(temperature=0.0)
        self.text_stream = TextStream
        self.depth: list[int] = []
        self.depth_state: Any = None

    def set_depth(self, tokens: Sequence[int], state: Any = None) -> Any:
        """Evaluate `tokens` once (or take `state`, another context's evaluation of them); every later run
        restores them and prefills after them (llama-bench's -d). Returns the state."""
        from .bench_raw import seq_state

        self.engine.reset()
        self.depth, self.depth_state = list(tokens), None
        if tokens and state is None:
            self.engine.prefill(tokens)
            state = seq_state(self.engine._ctx)
        self.depth_state = state if tokens else None
        return self.depth_state

    def _restore(self) -> None:
        from .bench_raw import restore_seq_state

        self.engine.reset()
        if self.depth_state:
            restore_seq_state(self.engine._ctx, self.depth_state)
            self.engine.cached = list(self.depth)  # the engine's prefix reuse then evaluates only what follows

    def run(self, tokens: Sequence[int], n_gen: int, clock: Clock) -> tuple[float, float, float, float, float]:
        """As `RawLoop.run`: at a depth, decoding restarts from the depth with the first token."""
        engine = self.engine
        self._restore()
        t_start = clock()
        engine.prefill([*self.depth, *tokens])
        t_prefilled = t_gen = clock()
        text = self.text_stream(engine)
        steps = engine.generate(self.greedy, n_gen, ignore_eog=True)
        first = next(steps)
        text.push(first)
        t_first = clock()
        if self.depth:
            steps.close()
            self._restore()
            t_gen = clock()
            engine.prefill([*self.depth, first])
            steps = engine.generate(self.greedy, n_gen - 1, ignore_eog=True)
        for tok in steps:
            text.push(tok)
        text.flush()
        return t_start, t_prefilled, t_first, t_gen, clock()

    def close(self) -> None:
        self.engine.close()


class ChatLoop:
    """`Model.chat(stream=True)` on the same engine: rendering, parsing and stop scanning included.

    The prompt is the benchmark's tokens as text, cut so that the rendered chat prompt has no
    more tokens than the raw prompt (same depth for decoding). Chat stops at the end of the turn,
    so the number of tokens varies and is reported.
    """

    def __init__(self, engine: Any):
        from r7b.runtime.model import Model

        self.model = Model(engine)
        self._content: dict[tuple[int, ...], str] = {}

    def _n_prompt(self, content: str) -> int:
        return len(self.model.tokenize_prompt(self.model.render([{"role": "user", "content": content}])))

    def content(self, tokens: Sequence[int]) -> str:
        """User text whose chat prompt is as long as `tokens`, or a little shorter."""
        key = tuple(tokens)
        if key not in self._content:
            detok = self.model.engine.detokenize
            keep = len(tokens) - self._n_prompt("")
            while keep > 0:
                over = self._n_prompt(detok(tokens[1:1 + keep])) - len(tokens)
                if over <= 0:
                    break
                keep -= over
            self._content[key] = detok(tokens[1:1 + max(keep, 0)])
        return self._content[key]

    def run(self, tokens: Sequence[int], n_gen: int, clock: Clock) -> dict[str, float]:
        from r7b.runtime.model import Done

        content = self.content(tokens)
        self.model.engine.reset()
        with token_clock(self.model.engine, clock) as marks:
            t_start = clock()
            result = None
            for event in self.model.chat([{"role": "user", "content": content}], stream=True,
                                         max_tokens=n_gen, temperature=0.0):
                if isinstance(event, Done):
                    result = event.result
            t_end = clock()
        usage = result.usage
        timing = Timing(usage.prompt_tokens, usage.completion_tokens, t_start, marks[0], marks[-1], marks[0], t_end)
        return {**timing.rates(), "tokens": float(usage.completion_tokens), "prompt_tokens": float(usage.prompt_tokens)}


@contextmanager
def token_clock(engine: Any, clock: Clock) -> Iterator[list[float]]:
    """Read the clock when generation starts (prompt evaluated) and at its first token.

    Wraps the engine's `generate` for the duration, so that callers above it (Model.chat,
    ChatSession) are timed without changes; costs one generator frame per token.
    """
    marks: list[float] = []
    inner = engine.generate

    def timed(*args: Any, **kwargs: Any) -> Iterator[int]:
        marks.append(clock())
        for i, tok in enumerate(inner(*args, **kwargs)):
            if i == 0:
                marks.append(clock())
            yield tok

    engine.generate = timed
    try:
        yield marks
    finally:
        del engine.generate


Call = Callable[[Sequence[int], int, Clock], dict]


def _open(role: str, path: str, settings: BenchSettings, chat: bool) -> tuple[dict[str, Call], list[Any], dict]:
    """What a worker runs: measurement calls by name, objects to close, and facts for the parent.

    Role "speed" loads the model once, for the engine, and builds the raw loop's context on those
    same weights: two copies of one model in different memory can differ in speed by several
    percent, more than the effect measured. Roles "r7b" and "raw" load one side alone, so the
    process's peak RSS is that side's.
    """
    from .bench_raw import RawLoop

    ctx = dict(n_ctx=settings.n_ctx, n_batch=settings.n_batch, n_threads=settings.n_threads,
               swa_full=settings.swa_full, kv_type=kv_type_id(settings.kv_type))
    calls: dict[str, Call] = {}
    info: dict[str, Any] = {"no_chat": None}
    side = "raw" if role == "raw" else "r7b"
    with llama_log() as lines:
        if role == "raw":  # a raw-only process is handed the mode the engine resolved to
            ctx["flash_attn"] = FLASH_ATTN[settings.flash_attn]
        if role == "raw" and settings.rpc:  # the same split as the engine's, through the thin layer
            from r7b import rpc

            shared = LlamaModel(path, placement=rpc.plan(settings.rpc, model_shape(path).n_layers,
                                                         settings.tensor_split))
            loop = RawLoop(shared.ptr, owns_model=True, **ctx)
        else:
            loop = RawLoop.load(path, **ctx) if role == "raw" else R7bLoop(path, settings)
        info.update(_context_facts(lines, side))
        if role == "speed":
            lines.clear()
            ctx["flash_attn"] = FLASH_ATTN[info["flash_attn"]["r7b"]]
            raw = RawLoop(loop.engine.model.ptr, **ctx)  # the engine's weights, a context of its own
            info["raw"] = _context_facts(lines, "raw")
            info["flash_attn"]["raw"] = info["raw"]["flash_attn"]["raw"]
    closers = [loop]
    loops = [loop]
    calls[side] = functools.partial(run_once, loop)
    if role == "speed":
        closers.insert(0, raw)
        loops.append(raw)
        calls["raw"] = functools.partial(run_once, raw)
        if chat:
            try:
                calls["chat"] = ChatLoop(loop.engine).run
            except ImportError as exc:
                info["no_chat"] = f"Model.chat unavailable ({exc})"
    calls["depth"] = lambda tokens, n_gen, clock: _set_depth(loops, tokens)
    return calls, closers, info


def _context_facts(lines: Sequence[str], side: str) -> dict[str, Any]:
    """What llama.cpp said when it made a context: KV and compute bytes, flash attention used."""
    return {"kv_bytes": kv_bytes_from_log(lines), "compute_bytes": compute_bytes_from_log(lines),
            "flash_attn": {side: flash_attn_from_log(lines)}}


def _set_depth(loops: Sequence[Any], tokens: Sequence[int]) -> dict[str, float]:
    """The first loop evaluates the depth; the others (same model and cache settings) copy its cells."""
    state = None
    for loop in loops:
        state = loop.set_depth(tokens, state)
    return {}


def _serve(conn: Any, role: str, path: str, settings: BenchSettings, chat: bool) -> None:
    """Benchmark process: load once, then answer run requests until told to stop."""
    clock = time.perf_counter
    try:
        with llama_log() as lines:
            calls, closers, info = _open(role, path, settings, chat)
            conn.send(("ready", info))
            while (msg := conn.recv()) is not None:
                op, prompt, n_gen = msg
                reset_peak_rss()
                busy, own, t0 = cpu_busy_seconds(), time.process_time(), clock()
                out = calls[op](prompt, n_gen, clock)
                wall, others = clock() - t0, (cpu_busy_seconds() - busy) - (time.process_time() - own)
                conn.send(("ok", {**out, "peak_rss_bytes": float(peak_rss_bytes()), "wall_s": wall,
                                  "others_s": max(0.0, others)}))
                lines.clear()
            for obj in closers:
                obj.close()
    except Exception as exc:  # reported to the parent as one line
        conn.send(("error", f"{type(exc).__name__}: {exc}"))


class BenchProcess:
    """A benchmark process (see `_open` for the roles)."""

    def __init__(self, role: str, path: str | Path, settings: BenchSettings, chat: bool = False):
        ctx = mp.get_context("spawn")
        self.role = role
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, role, str(path), settings, chat), daemon=True)
        self.proc.start()
        child.close()
        self.info = self._reply()

    def _reply(self) -> dict[str, Any]:
        try:
            status, payload = self.conn.recv()
        except EOFError:
            raise R7BError(f"the {self.role} benchmark process died (exit code {self.proc.exitcode})") from None
        if status == "error":
            raise R7BError(f"{self.role}: {payload}")
        return payload

    def run(self, op: str, prompt: Sequence[int], n_gen: int) -> dict[str, float]:
        self.conn.send((op, prompt, n_gen))
        return self._reply()

    def close(self) -> None:
        if self.proc.is_alive():
            try:
                self.conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        self.proc.join(timeout=30)
        if self.proc.is_alive():
            self.proc.kill()

    def __enter__(self) -> "BenchProcess":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# -- the comparison ------------------------------------------------------------------------------

@dataclass
class BenchResult:
    model: ModelInfo
    settings: dict[str, Any]
    r7b: dict[str, Spread]
    raw: dict[str, Spread]
    ratio: dict[str, float]  # r7b/raw; chat_tg_tps is Model.chat's decode speed over raw's
    chat: dict[str, Spread] | None = None
    chat_note: str | None = None
    bandwidth: dict[str, float] | None = None

    @property
    def decode_gbs(self) -> dict[str, float]:
        return {side: decode_gbs(self.model.bytes_per_token, figs["tg_tps"].median)
                for side, figs in (("r7b", self.r7b), ("raw", self.raw))}

    def to_json(self) -> dict[str, Any]:
        spreads = lambda figs: {k: asdict(v) for k, v in figs.items()} if figs else None  # noqa: E731
        return {"model": asdict(self.model), "settings": self.settings, "r7b": spreads(self.r7b),
                "raw": spreads(self.raw), "ratio": self.ratio, "decode_gbs": self.decode_gbs,
                "chat": spreads(self.chat), "chat_note": self.chat_note, "bandwidth": self.bandwidth}


def compare(path: str | Path, *, prompt_tokens: int = 512, gen_tokens: int = 128, repeat: int = 5,
            threads: int | None = None, chat: bool = True, swa_full: bool = False,
            seed: int = SEED, rpc: Sequence[str] | None = None,
            tensor_split: Sequence[float] | None = None, depth: int = 0, flash_attn: str = "auto",
            kv_type: str = "f16", memory: bool = True) -> BenchResult:
    """Speed of r7b and raw in turns on the same prompt, weights and context settings; then each one's memory.

    `memory=False` skips the separate processes that measure peak RSS (at a large depth each one
    evaluates the depth again); the KV and compute bytes still come from the speed process.
    """
    _check_args(path, prompt_tokens, gen_tokens, repeat, depth, flash_attn, kv_type)
    settings = BenchSettings(n_ctx=pad(depth + prompt_tokens + gen_tokens), n_threads=threads or default_threads(),
                             swa_full=swa_full, rpc=tuple(rpc or ()), tensor_split=tuple(tensor_split) if tensor_split
                             else None, kv_type=kv_type, flash_attn=flash_attn)
    everything = random_prompt(path, depth + prompt_tokens, seed)
    before, tokens = everything[:depth], everything[depth:]
    runs: dict[str, list[dict[str, float]]] = {"r7b": [], "raw": [], "chat": []}
    with BenchProcess("speed", path, settings, chat and not depth) as worker:
        with_chat = chat and not depth and not worker.info["no_chat"]
        sides = [side for side in runs if side != "chat" or with_chat]
        for side in sides:
            worker.run(side, tokens[:WARMUP[0]], WARMUP[1])
        if depth:
            worker.run("depth", before, 0)
        redone = _take_turns(worker, sides, tokens, gen_tokens, repeat, runs)
    used = worker.info["flash_attn"]
    raw_settings = replace(settings, flash_attn=used["r7b"])
    figures = {}
    for side, s in (("r7b", settings), ("raw", raw_settings)):
        peaks, facts = measure_memory(path, side, s, before, tokens, min(repeat, MEM_REPEAT)) if memory else (
            [], worker.info if side == "r7b" else worker.info["raw"])
        figures[side] = _figures(runs[side], peaks, facts["kv_bytes"], facts["compute_bytes"])
    ratio = {**paired_ratios(runs["r7b"], runs["raw"], TIMED), **ratios(
        {k: v for k, v in figures["r7b"].items() if k not in TIMED}, figures["raw"])}
    if runs["chat"]:
        ratio["chat_tg_tps"] = paired_ratios(runs["chat"], runs["raw"], ["tg_tps"])["tg_tps"]
    info = model_info(path, (depth or prompt_tokens) + gen_tokens // 2, kv_type)  # decoding's mean depth
    shown = {k: v for k, v in asdict(settings).items() if v or k not in ("rpc", "tensor_split")}  # only when used
    note = worker.info["no_chat"] or ("Model.chat is not timed at a depth" if chat and depth else None)
    return BenchResult(info, {**shown, "prompt_tokens": prompt_tokens, "gen_tokens": gen_tokens, "depth": depth,
                              "repeat": repeat, "flash_attn_used": used, "seed": seed, "redone": redone},
                       figures["r7b"], figures["raw"], ratio, _chat_figures(runs["chat"]), note)


def _check_args(path: str | Path, prompt_tokens: int, gen_tokens: int, repeat: int, depth: int, flash_attn: str,
                kv_type: str) -> None:
    if prompt_tokens < 2 or gen_tokens < 1 or repeat < 1 or depth < 0:
        raise R7BError("need --prompt-tokens >= 2, --gen-tokens >= 1, --repeat >= 1 and --depth >= 0")
    if flash_attn not in FLASH_ATTN:
        raise R7BError(f"--flash-attn must be one of {', '.join(FLASH_ATTN)}")
    kv_type_id(kv_type)
    if flash_attn == "off" and kv_type not in ("f16", "f32", "bf16"):
        raise R7BError(f"a {kv_type} KV cache needs flash attention (llama.cpp refuses a quantized V cache "
                       "without it); use --flash-attn on or auto")
    if not Path(path).is_file():
        raise R7BError(f"no such model file: {path}")
    validate_gguf(path, arch=None)  # before llama.cpp parses it


def _take_turns(worker: BenchProcess, sides: list[str], tokens: Sequence[int], n_gen: int, repeat: int,
                runs: dict[str, list[dict[str, float]]]) -> int:
    """`repeat` rounds of one run per side, in alternating order (ABBA: no side always goes first), each
    started when the machine is quiet; a round that other processes disturbed is run again, at most
    `repeat` times in all (then disturbed rounds count). Returns how many rounds were run again."""
    redone = 0
    while len(runs[sides[0]]) < repeat:
        order = sides if (len(runs[sides[0]]) + redone) % 2 == 0 else sides[::-1]
        wait_for_quiet()
        worker.run(order[0], tokens[:WARMUP[0]], WARMUP[1])  # wake the threads and caches after the wait
        round_ = {side: worker.run(side, tokens, n_gen) for side in order}
        if redone < repeat and not all(is_quiet(r) for r in round_.values()):
            redone += 1
            continue
        for side, run in round_.items():
            runs[side].append(run)
    return redone


def measure_memory(path: str | Path, side: str, settings: BenchSettings, depth: Sequence[int], tokens: Sequence[int],
                   repeat: int) -> tuple[list[float], dict[str, Any]]:
    """Peak RSS of runs (the prompt after the depth, then a few tokens) in a process holding only `side`,
    and what llama.cpp said about its context (KV and compute bytes)."""
    with BenchProcess(side, path, settings) as worker:
        worker.run(side, tokens[:WARMUP[0]], WARMUP[1])
        if depth:
            worker.run("depth", depth, 0)
        peaks = [worker.run(side, tokens, MEM_GEN)["peak_rss_bytes"] for _ in range(repeat)]
    return peaks, worker.info


def _figures(runs: list[dict[str, float]], peaks: list[float], kv_bytes: int,
             compute_bytes: int) -> dict[str, Spread]:
    figs = summarize([{k: run[k] for k in TIMED} for run in runs])
    figs.update(kv_bytes=Spread.of([float(kv_bytes)]), compute_bytes=Spread.of([float(compute_bytes)]))
    if peaks:
        figs["peak_rss_bytes"] = Spread.of(peaks)
    return figs


def _chat_figures(runs: list[dict[str, float]]) -> dict[str, Spread] | None:
    keys = ("pp_tps", "tg_tps", "ttft_s", "tokens", "prompt_tokens")
    return summarize([{k: run[k] for k in keys} for run in runs]) if runs else None


# -- output ----------------------------------------------------------------------------------------

def fmt_spread(s: Spread, scale: float = 1.0, digits: int = 2) -> str:
    """'123.45 (120.00–125.10)': median and range, like llama-bench's 'avg ± sd' column."""
    return f"{s.median * scale:.{digits}f} ({s.min * scale:.{digits}f}–{s.max * scale:.{digits}f})"


def _rows(result: BenchResult) -> Iterator[tuple[str, str, float, int]]:
    """(label, metric, scale, digits) of the table rows."""
    s = result.settings
    at = f" @ d{s['depth']}" if s.get("depth") else ""
    yield f"pp{s['prompt_tokens']}{at} t/s", "pp_tps", 1.0, 2
    yield f"tg{s['gen_tokens']}{at} t/s", "tg_tps", 1.0, 2
    yield "TTFT ms", "ttft_s", 1e3, 1
    yield "peak RSS MiB", "peak_rss_bytes", 1 / MIB, 1
    yield "KV cache MiB", "kv_bytes", 1 / MIB, 2
    yield "compute buffer MiB", "compute_bytes", 1 / MIB, 2


def settings_text(s: Mapping[str, Any]) -> str:
    """'KV f16, flash attention auto (on)': the settings as asked and what llama.cpp ran with."""
    used = s.get("flash_attn_used") or {}
    ran = "/".join(sorted(set(used.values()))) or "?"
    return f"KV {s.get('kv_type', 'f16')}, flash attention {s.get('flash_attn', 'auto')} ({ran})"


def format_table(result: BenchResult) -> str:
    """A markdown table: one row per figure, r7b and raw side by side, and their ratio."""
    m, s = result.model, result.settings
    head = (f"{Path(m.path).name}: {m.desc}, {m.size_bytes / MIB:.1f} MiB, {m.n_params / 1e6:.1f} M params; "
            f"{s['n_threads']} threads, n_ctx {s['n_ctx']}, {settings_text(s)}, "
            f"{'full' if s['swa_full'] else 'small'} SWA cache, {s['repeat']} repeats (median (min–max))"
            + (f"; {s['redone']} rounds run again because other processes were busy" if s.get("redone") else "")
            + (f"; layers shared with RPC workers {','.join(s['rpc'])}" if s.get("rpc") else ""))
    lines = [head, "", "| test | r7b | raw llama.cpp | r7b/raw |", "| --- | ---: | ---: | ---: |"]
    for label, key, scale, digits in _rows(result):
        if key not in result.r7b or key not in result.raw:
            continue
        lines.append(f"| {label} | {fmt_spread(result.r7b[key], scale, digits)} | "
                     f"{fmt_spread(result.raw[key], scale, digits)} | {result.ratio[key]:.3f} |")
    if result.chat:
        c = result.chat
        lines.append(f"| tg via Model.chat t/s ({c['prompt_tokens'].median:.0f}-token prompt, "
                     f"{c['tokens'].median:.0f} tokens) | {fmt_spread(c['tg_tps'])} | "
                     f"{fmt_spread(result.raw['tg_tps'])} | {result.ratio['chat_tg_tps']:.3f} |")
    gbs = result.decode_gbs
    lines += ["", f"decode reads ≈ {m.bytes_per_token / MIB:.1f} MiB/token: r7b {gbs['r7b']:.2f} GB/s, "
                  f"raw {gbs['raw']:.2f} GB/s"]
    if result.bandwidth:
        bw = result.bandwidth
        lines.append(f"machine: read {bw['read_gbs']:.1f} GB/s, copy {bw['copy_gbs']:.1f} GB/s "
                     f"({bw['threads']} threads); decode uses {utilisation(gbs['r7b'], bw['read_gbs']):.0%} "
                     f"(r7b), {utilisation(gbs['raw'], bw['read_gbs']):.0%} (raw) of the read bandwidth")
    if result.chat_note:
        lines.append(result.chat_note)
    return "\n".join(lines)


# -- CLI ------------------------------------------------------------------------------------------

def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="prefill/decode speed and memory, side by side with bare llama.cpp",
                              description=__doc__.splitlines()[0])
    p.add_argument("model", metavar="MODEL.gguf")
    p.add_argument("--threads", type=int, help="threads (default: one per core, at most 8)")
    p.add_argument("--prompt-tokens", type=int, default=512, help="prompt length (default 512)")
    p.add_argument("--gen-tokens", type=int, default=128, help="tokens to generate (default 128)")
    p.add_argument("--repeat", type=int, default=5, help="measured runs per side (default 5)")
    p.add_argument("--no-chat", action="store_true", help="skip the Model.chat streaming figure")
    p.add_argument("--bandwidth", action="store_true",
                   help="also measure the machine's memory bandwidth and how much of it decoding uses")
    p.add_argument("--depth", type=int, default=0, metavar="N",
                   help="tokens already in the context when the prompt is evaluated and decoding starts, as "
                        "llama-bench's -d (default 0)")
    p.add_argument("--flash-attn", choices=list(FLASH_ATTN), default="auto",
                   help="flash attention: on, off, or auto (the engine's default)")
    p.add_argument("--kv-type", default="f16", choices=list(KV_TYPES), metavar="TYPE",
                   help=f"KV cache type: {', '.join(KV_TYPES)} (default f16; a quantized V cache needs flash "
                        "attention)")
    p.add_argument("--no-memory", action="store_true",
                   help="skip the peak-RSS processes (each evaluates the depth again)")
    p.add_argument("--seed", type=int, default=SEED, help="seed of the random prompt")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    add_rpc_options(p)
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    if args.threads is not None and args.threads < 1:
        raise R7BError("--threads must be at least 1")
    result = compare(args.model, prompt_tokens=args.prompt_tokens, gen_tokens=args.gen_tokens,
                     repeat=args.repeat, threads=args.threads, chat=not args.no_chat, seed=args.seed,
                     depth=args.depth, flash_attn=args.flash_attn, kv_type=args.kv_type,
                     memory=not args.no_memory, **rpc_kwargs(args))
    if args.bandwidth:
        result.bandwidth = memory_bandwidth(result.settings["n_threads"])
    print(json.dumps(result.to_json(), indent=2) if args.json else format_table(result))
    return 0

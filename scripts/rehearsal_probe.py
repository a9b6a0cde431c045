"""The rehearsal's in-process llama.cpp probes, each run in a child process and printing one JSON line.

- `alloc MODEL`: the buffers llama.cpp logs when it creates a context (KV, compute, output) at
  each context size and attention path, with the runtime's batch and cache settings.
- `speed MODEL`: prefill of N tokens and decode at given depths. Depth is reached without
  prefilling it: a real prefill of N tokens fills the cache, its sequence state is taken with
  `llama_state_seq_get_data`, the cells are replicated at new positions (K and V rows copied
  from the real ones, see `replicate_state`) and loaded back with `llama_state_seq_set_data`.
  The graph llama.cpp builds depends only on which cells are present, so speed at depth is that
  of a filled cache; the values are meaningless, as a random-weights model's KV is anyway.
- `fullbatch MODEL N_CTX FLASH`: resident memory after a 512-token batch at the end of a full context.
- `bandwidth`: memory read bandwidth, one numpy sum per core over 1 GiB each.
- `tokens VOCAB TEXT...`: how many tokens each text is with the model's vocabulary.
"""

from __future__ import annotations

import ctypes
import json
import re
import struct
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def _llama():
    import llama_cpp

    return llama_cpp


class _Log:
    """llama.cpp's log lines, kept for parsing."""

    def __init__(self):
        from r7b.llama import LlamaLog

        lines = self.lines = []

        class Capture(LlamaLog):
            def _on_log(self, level, text, user):
                lines.append((text or b"").decode("utf-8", "replace"))

        self.capture = Capture


def _load(path: str):
    ll, log = _llama(), _Log()
    params = ll.llama_model_default_params()
    with log.capture():
        model = ll.llama_model_load_from_file(path.encode(), params)
    if not model:
        raise SystemExit(f"could not load {path}")
    return model, log


def _context(model, n_ctx: int, flash: str, log: _Log):
    from r7b.llama import FLASH_ATTN, default_threads

    ll = _llama()
    p = ll.llama_context_default_params()
    p.n_ctx, p.n_batch, p.n_ubatch, p.swa_full = n_ctx, 512, 512, False
    p.n_threads = p.n_threads_batch = default_threads()
    p.flash_attn_type = FLASH_ATTN[flash]
    log.lines.clear()
    with log.capture():
        ctx = ll.llama_init_from_model(model, p)
    if not ctx:
        raise SystemExit(f"could not create a context of {n_ctx}")
    return ctx


def _mib_sum(pattern: str, text: str) -> float:
    return sum(float(x) for x in re.findall(pattern + r"\s*=\s*([\d.]+) MiB", text))


def _rss() -> dict:
    out = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out


def alloc(path: str, contexts: list[int], flashes: list[str]) -> list[dict]:
    ll = _llama()
    model, log = _load(path)
    loaded = "".join(log.lines)
    model_mib = _mib_sum(r"CPU_Mapped model buffer size", loaded) or _mib_sum(r"CPU model buffer size", loaded)
    repack_mib = _mib_sum(r"CPU_REPACK model buffer size", loaded)
    rows = []
    for flash in flashes:
        for n_ctx in contexts:
            ctx = _context(model, n_ctx, flash, log)
            text = "".join(log.lines)
            cells = dict(re.findall(r"(non-SWA|SWA) KV cache, size = (\d+) cells", text))
            rows.append({"flash_attn": flash, "n_ctx": n_ctx, "model_mib": model_mib, "repack_mib": repack_mib,
                         "kv_mib": _mib_sum(r"KV buffer size", text),
                         "compute_mib": _mib_sum(r"CPU compute buffer size", text),
                         "output_mib": _mib_sum(r"CPU\s+output buffer size", text),
                         "cells": cells, "rss": _rss()})
            ll.llama_free(ctx)
    ll.llama_model_free(model)
    return rows


# -- the sequence state: parse, replicate, write ---------------------------------------------------

def _take(buf: memoryview, pos: int, fmt: str) -> tuple[tuple, int]:
    size = struct.calcsize(fmt)
    return struct.unpack_from(fmt, buf, pos), pos + size


def parse_cache(buf: memoryview, pos: int) -> tuple[dict, int]:
    """One llama_kv_cache's state_write output (one stream, one sequence, no cell extension)."""
    (n_stream,), pos = _take(buf, pos, "<I")
    assert n_stream == 1, n_stream
    (count,), pos = _take(buf, pos, "<I")
    cache = {"count": count, "pos": [], "k": [], "v": [], "v_trans": 0}
    if count == 0:
        return cache, pos
    for _ in range(count):
        (p, n_seq, _seq), pos = _take(buf, pos, "<iIi")
        assert n_seq == 1
        cache["pos"].append(p)
    (v_trans, n_layer), pos = _take(buf, pos, "<II")
    cache["v_trans"] = v_trans
    for _ in range(n_layer):
        (ktype, row), pos = _take(buf, pos, "<iQ")
        cache["k"].append((ktype, row, np.frombuffer(buf, np.uint8, count * row, pos).reshape(count, row)))
        pos += count * row
    for _ in range(n_layer):
        if v_trans:
            (vtype, el, n_embd), pos = _take(buf, pos, "<iII")
            data = np.frombuffer(buf, np.uint8, n_embd * count * el, pos).reshape(n_embd, count, el)
            cache["v"].append((vtype, el, n_embd, data))
            pos += n_embd * count * el
        else:
            (vtype, row), pos = _take(buf, pos, "<iQ")
            cache["v"].append((vtype, row, np.frombuffer(buf, np.uint8, count * row, pos).reshape(count, row)))
            pos += count * row
    return cache, pos


def write_cache(cache: dict, positions: list[int]) -> bytes:
    """`cache` with len(positions) cells at `positions`, cell i a copy of real cell i mod count."""
    n = len(positions)
    idx = np.arange(n) % cache["count"]
    parts = [struct.pack("<II", 1, n)]
    if n == 0:
        return b"".join(parts)
    meta = np.zeros((n, 3), dtype="<i4")
    meta[:, 0], meta[:, 1], meta[:, 2] = positions, 1, 0
    parts += [meta.tobytes(), struct.pack("<II", cache["v_trans"], len(cache["k"]))]
    for ktype, row, data in cache["k"]:
        parts += [struct.pack("<iQ", ktype, row), data[idx].tobytes()]
    for entry in cache["v"]:
        if cache["v_trans"]:
            vtype, el, n_embd, data = entry
            parts += [struct.pack("<iII", vtype, el, n_embd), np.ascontiguousarray(data[:, idx, :]).tobytes()]
        else:
            vtype, row, data = entry
            parts += [struct.pack("<iQ", vtype, row), data[idx].tobytes()]
    return b"".join(parts)


def replicate_state(state: bytes, depth: int, window: int) -> bytes:
    """A state holding `depth` cells: the global cache positions 0..depth-1, the sliding-window
    cache the last `window` of them (what it keeps after a real prefill to that depth)."""
    buf = memoryview(state)
    base, pos = parse_cache(buf, 8)  # after llama.cpp's magic number and the sequence id
    swa, pos = parse_cache(buf, pos)
    assert pos == len(state), (pos, len(state))
    kept = min(depth, window)
    return (state[:8] + write_cache(base, list(range(depth)))
            + write_cache(swa, list(range(depth - kept, depth))))


def _get_state(ctx) -> bytes:
    ll = _llama()
    size = ll.llama_state_seq_get_size(ctx, 0)
    arr = (ctypes.c_uint8 * size)()
    n = ll.llama_state_seq_get_data(ctx, arr, size, 0)
    return bytes(arr[:n])


def _set_state(ctx, data: bytes) -> None:
    ll = _llama()
    arr = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
    if ll.llama_state_seq_set_data(ctx, arr, len(data), 0) != len(data):
        raise SystemExit("llama_state_seq_set_data refused the replicated state")


def _decode(ctx, tokens: list[int], start: int) -> float:
    from r7b.llama import Batch

    ll = _llama()
    t0 = time.perf_counter()
    for i in range(0, len(tokens), 512):
        chunk = tokens[i:i + 512]
        last = start + i + len(chunk) - 1
        with Batch(len(chunk)) as batch:
            if ll.llama_decode(ctx, batch.fill(chunk, start + i, outputs=lambda p: p == last)) != 0:
                raise SystemExit(f"llama_decode failed at position {start + i}")
    return time.perf_counter() - t0


def _decode_steps(ctx, n: int, start: int, token: int) -> float:
    return sum(_decode(ctx, [token], start + i) for i in range(n))


def speed(path: str, depths: list[int], n_prefill: int, n_decode: int, flash: str) -> list[dict]:
    ll = _llama()
    model, log = _load(path)
    n_vocab = ll.llama_vocab_n_tokens(ll.llama_model_get_vocab(model))
    window = ll.llama_model_n_swa(model)
    tokens = [int(t) for t in np.random.default_rng(0).integers(1000, min(n_vocab, 250000), n_prefill)]
    ctx = _context(model, max(depths) + n_prefill + n_decode + 256, flash, log)
    mem = ll.llama_get_memory(ctx)
    _decode(ctx, tokens[:8], 0)  # warm-up: the first pass pages the weights in
    ll.llama_memory_seq_rm(mem, 0, -1, -1)
    rows, state = [], None
    for depth in sorted(depths):
        row = {"depth": depth}
        if depth:
            t0 = time.perf_counter()
            deep = replicate_state(state, depth, window)
            _set_state(ctx, deep)
            row["state_mib"], row["state_s"] = round(len(deep) / 2**20, 1), round(time.perf_counter() - t0, 2)
            row["cells_from"] = ll.llama_memory_seq_pos_min(mem, 0)
            row["cells_to"] = ll.llama_memory_seq_pos_max(mem, 0)
        wall = _decode(ctx, tokens, depth)
        row["prefill_s"], row["prefill_tps"] = round(wall, 2), round(n_prefill / wall, 3)
        if not depth:
            state = _get_state(ctx)
        ll.llama_memory_seq_rm(mem, 0, depth, -1)
        wall = _decode_steps(ctx, n_decode, depth, tokens[0])
        row["decode_s"], row["decode_tps"] = round(wall, 2), round(n_decode / wall, 3)
        ll.llama_memory_seq_rm(mem, 0, -1, -1)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    ll.llama_free(ctx)
    ll.llama_model_free(model)
    return rows


def full_batch(path: str, n_ctx: int, flash: str) -> dict:
    """Resident memory after the worst case the planner counts: a 512-token batch at the end of a full
    context. The cache is filled by replicating 8 real cells (see `replicate_state`); the Python-side
    copies are freed before the batch, and RSS is read after it (VmRSS, not the high-water mark)."""
    import gc

    ll = _llama()
    model, log = _load(path)
    window = ll.llama_model_n_swa(model)
    ctx = _context(model, n_ctx, flash, log)
    tokens = [int(t) for t in np.random.default_rng(0).integers(1000, 250000, 512)]
    _decode(ctx, tokens[:8], 0)
    depth = n_ctx - 512
    _set_state(ctx, replicate_state(_get_state(ctx), depth, window))
    gc.collect()
    before = _rss()
    wall = _decode(ctx, tokens, depth)
    return {"n_ctx": n_ctx, "depth": depth, "flash_attn": flash, "prefill_s": round(wall, 1), "rss_before": before,
            "rss_after": _rss()}


def bandwidth(gib: float = 1.0) -> dict:
    import os

    n = int(gib * 2**30) // 8
    threads = os.cpu_count() or 1
    arrays = [np.ones(n, dtype=np.float64) for _ in range(threads)]
    best = 0.0
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(3):
            t0 = time.perf_counter()
            list(pool.map(np.sum, arrays))
            best = max(best, threads * n * 8 / (time.perf_counter() - t0))
    return {"read_gbs": round(best / 1e9, 2), "threads": threads, "bytes_per_thread": n * 8}


def tokens(vocab: str, texts: list[str]) -> dict:

    ll = _llama()
    params = ll.llama_model_default_params()
    params.vocab_only = True
    model = ll.llama_model_load_from_file(vocab.encode(), params)
    v = ll.llama_model_get_vocab(model)
    out = {}
    for path in texts:
        data = open(path, encoding="utf-8").read().encode()
        cap = len(data) + 8
        buf = (ll.llama_token * cap)()
        out[path] = ll.llama_tokenize(v, data, len(data), buf, cap, True, False)
    ll.llama_model_free(model)
    return out


def main(argv: list[str]) -> None:
    cmd, rest = argv[0], argv[1:]
    if cmd == "alloc":
        result = alloc(rest[0], [int(x) for x in rest[1].split(",")], rest[2].split(","))
    elif cmd == "speed":
        result = speed(rest[0], [int(x) for x in rest[1].split(",")], int(rest[2]), int(rest[3]), rest[4])
    elif cmd == "fullbatch":
        result = full_batch(rest[0], int(rest[1]), rest[2])
    elif cmd == "bandwidth":
        result = bandwidth()
    elif cmd == "tokens":
        result = tokens(rest[0], rest[1:])
    else:
        raise SystemExit(f"unknown probe {cmd}")
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])

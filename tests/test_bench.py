"""`r7b bench`: the arithmetic behind its figures (with a fake clock), and one real quick run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from r7b.quality import bench
from r7b.quality.bench import BenchResult, ModelInfo, Spread, Timing
from r7b.cohere2 import Cohere2Dims
from r7b.memory import MIB


class FakeClock:
    """Time that moves only when the code under test says so."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeLoop:
    """Prefill costs 5 ms a token, the first sample 20 ms, every decode step 25 ms."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock

    def run(self, tokens, n_gen, clock):
        t_start = clock()
        self.clock.advance(0.005 * len(tokens))
        t_prefilled = clock()
        self.clock.advance(0.020)
        t_first = clock()
        self.clock.advance(0.025 * n_gen - 0.020)
        return t_start, t_prefilled, t_first, t_prefilled, clock()


def test_rates_from_clock_readings():
    clock = FakeClock()
    rates = bench.run_once(FakeLoop(clock), list(range(100)), 40, clock)
    assert rates["pp_tps"] == pytest.approx(200.0)  # 100 tokens in 0.5 s
    assert rates["tg_tps"] == pytest.approx(40.0)  # 40 tokens in 1.0 s
    assert rates["ttft_s"] == pytest.approx(0.52)


def test_timing_properties():
    t = Timing(n_prompt=512, n_gen=128, t_start=0.0, t_prefilled=2.0, t_first=2.1, t_gen=2.0, t_end=6.0)
    assert (t.pp_tps, t.tg_tps, t.ttft_s) == (256.0, 32.0, pytest.approx(2.1))
    # at a depth, decoding is timed from its restart at the depth, not from the prompt's end
    t = Timing(n_prompt=512, n_gen=128, t_start=0.0, t_prefilled=2.0, t_first=2.1, t_gen=2.5, t_end=6.5)
    assert (t.pp_tps, t.tg_tps, t.ttft_s) == (256.0, 32.0, pytest.approx(2.1))


def test_spread_is_median_and_range():
    assert Spread.of([3.0, 1.0, 2.0]) == Spread(2.0, 1.0, 3.0)
    assert Spread.of([4.0, 1.0, 2.0, 10.0]) == Spread(3.0, 1.0, 10.0)  # even count: mean of the middle two
    assert Spread.of([5.0]) == Spread(5.0, 5.0, 5.0)
    with pytest.raises(ValueError):
        Spread.of([])


def test_summarize_and_ratios():
    ours = bench.summarize([{"tg_tps": 30.0, "kv_bytes": 8.0}, {"tg_tps": 32.0, "kv_bytes": 8.0},
                            {"tg_tps": 31.0, "kv_bytes": 8.0}])
    base = bench.summarize([{"tg_tps": 32.0, "kv_bytes": 8.0}, {"tg_tps": 33.0, "kv_bytes": 8.0}])
    assert ours["tg_tps"] == Spread(31.0, 30.0, 32.0)
    assert bench.ratios(ours, base) == {"tg_tps": pytest.approx(31.0 / 32.5), "kv_bytes": 1.0}


def test_paired_ratios_compare_each_run_with_its_neighbour():
    # the machine's speed drifts from round to round; ours is 0.8, 0.9 and 1.0 of the run beside it
    ours = [{"tg_tps": 80.0}, {"tg_tps": 45.0}, {"tg_tps": 60.0}]
    base = [{"tg_tps": 100.0}, {"tg_tps": 50.0}, {"tg_tps": 60.0}]
    assert bench.paired_ratios(ours, base, ["tg_tps"]) == {"tg_tps": pytest.approx(0.9)}
    assert bench.ratios(bench.summarize(ours), bench.summarize(base)) == {"tg_tps": 1.0}  # medians miss it


def test_quiet_runs():
    assert bench.is_quiet({"others_s": 0.05, "wall_s": 1.0})
    assert not bench.is_quiet({"others_s": 0.5, "wall_s": 1.0})
    assert bench.is_quiet({"others_s": 0.02, "wall_s": 0.05})  # within /proc/stat's tick


def test_best_time_takes_the_fastest_call():
    clock = FakeClock()
    durations = iter([0.3, 0.1, 0.2])
    assert bench.best_time(lambda: clock.advance(next(durations)), 3, clock) == pytest.approx(0.1)


def test_bytes_per_token_counts_a_tied_embedding_once_in_full():
    tied = {"token_embd.weight": 1000, "blk.0.attn_q.weight": 200, "blk.0.attn_norm.weight": 4}
    assert bench.weight_bytes_per_token(tied) == 1204
    untied = {**tied, "output.weight": 1000}  # then the embedding is only gathered, one row a token
    assert bench.weight_bytes_per_token(untied) == 1204


def test_kv_read_per_token_respects_the_window():
    shape = Cohere2Dims(n_layers=8, n_heads=4, n_kv_heads=2, head_dim=64, hidden=256, ffn=768, vocab=100,
                       sliding_window=100, context_length=4096)
    row = 2 * 64 * 2  # f16 bytes of one K (or V) row
    assert bench.kv_bytes_read(shape, 50) == 2 * row * 50 * 8
    assert bench.kv_bytes_read(shape, 1000) == 2 * row * (2 * 1000 + 6 * 100)  # 2 global, 6 sliding layers


def test_bandwidth_utilisation():
    achieved = bench.decode_gbs(500e6, 30.0)
    assert achieved == pytest.approx(15.0)
    assert bench.utilisation(achieved, 20.0) == pytest.approx(0.75)


def test_kv_bytes_from_llama_log():
    lines = ["llama_kv_cache: size =    2.00 MiB (  4096 cells,   1 layers,  1/1 seqs), K (f16):    1.00 MiB\n",
             "llama_kv_cache:        CPU KV buffer size =     1.12 MiB\n",
             "llama_kv_cache: size =    1.12 MiB (   768 cells,   3 layers,  1/1 seqs), K (f16):    0.56 MiB\n"]
    assert bench.kv_bytes_from_log(lines) == round(3.12 * MIB)


def _result() -> BenchResult:
    def figs(scale: float) -> dict[str, Spread]:
        return {"pp_tps": Spread(100.0 * scale, 90.0, 110.0), "tg_tps": Spread(20.0 * scale, 19.0, 21.0),
                "ttft_s": Spread(0.5, 0.4, 0.6), "peak_rss_bytes": Spread(200 * MIB, 199 * MIB, 201 * MIB),
                "kv_bytes": Spread(16 * MIB, 16 * MIB, 16 * MIB), "compute_bytes": Spread(70 * MIB, 70 * MIB, 70 * MIB)}

    info = ModelInfo("build/m.gguf", "16L 1536h Q8_0", 480 * MIB, 452_000_000, 500_000_000)
    settings = {"n_ctx": 768, "n_threads": 2, "n_batch": 512, "swa_full": False, "prompt_tokens": 512,
                "gen_tokens": 128, "repeat": 5, "kv_type": "f16", "seed": 1, "redone": 0}
    ours, base = figs(0.99), figs(1.0)
    return BenchResult(info, settings, ours, base, bench.ratios(ours, base))


def test_table_reads_like_llama_bench():
    text = bench.format_table(_result())
    assert "| pp512 t/s | 99.00 (90.00–110.00) | 100.00 (90.00–110.00) | 0.990 |" in text
    assert "| tg128 t/s | 19.80 (19.00–21.00) | 20.00 (19.00–21.00) | 0.990 |" in text
    assert "| TTFT ms | 500.0 (400.0–600.0) |" in text
    assert "| KV cache MiB | 16.00 (16.00–16.00) |" in text
    assert "r7b 9.90 GB/s, raw 10.00 GB/s" in text  # 500 MB/token at 19.8 and 20 t/s


def test_json_has_every_figure():
    out = json.loads(json.dumps(_result().to_json()))
    for side in ("r7b", "raw"):
        assert set(out[side]) == set(bench.METRICS)
    assert out["ratio"]["tg_tps"] == pytest.approx(0.99)
    assert out["decode_gbs"]["raw"] == pytest.approx(10.0)


def test_generate_can_ignore_end_of_generation(stand_in_gguf):
    from r7b.runtime.engine import Engine, EngineConfig, Sampling
    from r7b.runtime.model import Model

    with bench.llama_log():
        model = Model(Engine(stand_in_gguf("f16"), EngineConfig(n_ctx=512, n_threads=2)))
    engine, greedy = model.engine, Sampling(temperature=0.0)
    prompt = model.tokenize_prompt(model.render([{"role": "user", "content": "Hello there."}]))
    try:
        engine.prefill(prompt)
        stopped = list(engine.generate(greedy, 120))
        if not engine.is_eog(stopped[-1]):
            pytest.skip("the stand-in did not end its turn on this prompt")
        engine.prefill(prompt)
        full = list(engine.generate(greedy, 120, ignore_eog=True))
    finally:
        model.close()
    assert len(stopped) < 120 and len(full) == 120
    assert full[:len(stopped)] == stopped


def test_bench_runs_on_the_stand_in(stand_in_gguf):
    proc = subprocess.run([sys.executable, "-m", "r7b.cli", "bench", str(stand_in_gguf("f16")), "--prompt-tokens", "32",
                           "--gen-tokens", "8", "--repeat", "1", "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    for side in ("r7b", "raw"):
        assert set(out[side]) == set(bench.METRICS)
        for figure in out[side].values():
            assert figure["min"] > 0 and figure["min"] <= figure["median"] <= figure["max"]
    assert all(v > 0 for v in out["ratio"].values())
    assert out["settings"]["prompt_tokens"] == 32 and out["settings"]["gen_tokens"] == 8
    assert out["model"]["n_params"] > 0 and out["model"]["bytes_per_token"] > 0
    assert out["chat"]["tg_tps"]["median"] > 0 and out["chat"]["tokens"]["median"] >= 1


def test_bench_refuses_a_missing_file(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "r7b.cli", "bench", str(tmp_path / "none.gguf")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("r7b bench: error: no such model file")


# -- depth, flash attention and KV type; the comparisons with llama.cpp's tools ---------------------------

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def _script(name: str):
    """A module from scripts/ (not a package)."""
    import importlib

    if str(SCRIPTS) not in sys.path:
        sys.path.insert(0, str(SCRIPTS))
    return importlib.import_module(name)


def test_flash_attention_read_from_llama_log():
    asked = "llama_context: flash_attn            = {}\n"
    assert bench.flash_attn_from_log([asked.format("disabled")]) == "off"
    assert bench.flash_attn_from_log([asked.format("enabled")]) == "on"
    assert bench.flash_attn_from_log([asked.format("auto"), "llama_context: Flash Attention enabled\n"]) == "on"
    assert bench.flash_attn_from_log([asked.format("auto"),
                                      "llama_context: Flash Attention not supported, set to disabled\n"]) == "off"
    # two contexts in one log: the last one counts
    two = [asked.format("auto"), "Flash Attention enabled\n", asked.format("disabled")]
    assert bench.flash_attn_from_log(two) == "off"


def test_compute_buffer_from_llama_log():
    lines = ["llama_context:        CPU compute buffer size =    70.50 MiB\n",
             "llama_context:  CPU_Mapped compute buffer size =     1.50 MiB\n"]
    assert bench.compute_bytes_from_log(lines) == 72 * MIB


def _bench_json(model, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "r7b.cli", "bench", str(model), "--prompt-tokens", "16",
                           "--gen-tokens", "4", "--repeat", "1", "--no-memory", "--json", *args],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_depth_and_attention_settings_reach_both_sides(stand_in_gguf):
    model = stand_in_gguf("f16")
    off = _bench_json(model, "--depth", "48", "--flash-attn", "off")
    assert off["settings"]["depth"] == 48 and off["settings"]["n_ctx"] >= 48 + 16 + 4
    assert off["settings"]["flash_attn_used"] == {"r7b": "off", "raw": "off"}
    assert off["chat"] is None and "depth" in off["chat_note"]
    q8 = _bench_json(model, "--depth", "48", "--flash-attn", "on", "--kv-type", "q8_0")
    assert q8["settings"]["flash_attn_used"] == {"r7b": "on", "raw": "on"}
    assert q8["settings"]["kv_type"] == "q8_0"
    for side in ("r7b", "raw"):  # the raw loop's cache is q8_0 too: about half the f16 bytes
        assert q8[side]["kv_bytes"]["median"] < 0.6 * off[side]["kv_bytes"]["median"]
    assert q8["r7b"]["kv_bytes"] == q8["raw"]["kv_bytes"]
    default = _bench_json(model)
    used = default["settings"]["flash_attn_used"]
    assert used["r7b"] == used["raw"] == bench.resolved_flash_attn("auto", "f16")


def test_bench_refuses_a_quantized_v_cache_without_flash_attention(stand_in_gguf):
    proc = subprocess.run([sys.executable, "-m", "r7b.cli", "bench", str(stand_in_gguf("f16")), "--kv-type", "q8_0",
                           "--flash-attn", "off"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "needs flash attention" in proc.stderr


def test_table_labels_depth_and_settings():
    result = _result()
    result.settings.update(depth=4096, flash_attn="auto", flash_attn_used={"r7b": "off", "raw": "off"})
    text = bench.format_table(result)
    assert "| pp512 @ d4096 t/s |" in text and "| tg128 @ d4096 t/s |" in text
    assert "KV f16, flash attention auto (off)" in text


def test_llama_bench_json_and_the_depth_table():
    pb = _script("peer_bench")
    out = json.dumps([{"n_prompt": 512, "n_gen": 0, "n_depth": 4096, "avg_ts": 100.0, "samples_ts": [99.0, 101.0]},
                      {"n_prompt": 0, "n_gen": 32, "n_depth": 4096, "avg_ts": 20.0, "samples_ts": [20.0]}])
    rows = pb.parse_llama_bench(out, "on", "f16") + pb.parse_llama_bench(out.replace("20.0", "25.0"), "off", "f16")
    assert [(r["test"], r["depth"], r["tps"]) for r in rows[:2]] == [("pp", 4096, 100.0), ("tg", 4096, 20.0)]
    rows += [{"tool": "r7b", "fa": "auto", "kv": "f16", "test": t, "depth": 4096, "tps": v}
             for t, v in (("pp", 90.0), ("tg", 24.0))]
    tg = [r for r in pb.depth_rows(rows, [4096]) if r["test"] == "tg"][0]
    assert (tg["llama_server"], tg["llama_cpp_python"], tg["fastest"]) == (20.0, 25.0, 25.0)
    assert tg["fastest_setting"] == "fa off, f16"
    assert tg["vs_fastest"] == pytest.approx(0.96) and tg["vs_server"] == pytest.approx(1.2)


def test_llama_bench_gets_the_same_settings(monkeypatch):
    pb = _script("peer_bench")
    monkeypatch.setattr(pb, "peer_binary", lambda name: Path("/peers") / name)
    args = pb.llama_bench_args(Path("m.gguf"), "on", "q8_0", pb.FULL, 2)
    joined = " ".join(args)
    assert "-d 0,4096,16384" in joined and "-fa 1" in joined and "-ctk q8_0 -ctv q8_0" in joined
    assert "-p 512 -n 32" in joined and "-t 2" in joined and "-b 512 -ub 512" in joined and "-o json" in joined


def test_servers_get_the_same_slots_and_settings(monkeypatch):
    sb = _script("serve_bench")
    import peers

    monkeypatch.setattr(peers, "peer_binary", lambda name: Path("/peers") / name)
    plan = sb.ServePlan(clients=(4,), prompt_words=10, max_tokens=8, n_ctx=1024, repeat=1)
    ours = " ".join(sb.r7b_command(Path("m.gguf"), 9000, 4, plan, 2, "off", "f16", True))
    theirs = " ".join(sb.llama_server_command(Path("m.gguf"), 9001, 4, plan, 2, "off", "f16"))
    assert "--parallel 4" in ours and "--n-ctx 1024" in ours and "--threads 2" in ours
    assert "--flash-attn off --kv-type f16" in ours
    assert "-np 4 -c 4096" in theirs and "-t 2" in theirs and "-fa off" in theirs and "-ctk f16 -ctv f16" in theirs
    assert "--parallel" not in " ".join(sb.r7b_command(Path("m.gguf"), 9000, 1, plan, 2, "off", "f16", False))


def test_serve_round_figures():
    sb = _script("serve_bench")
    r = sb.summarize_round([{"ttft_s": 0.5, "last_s": 2.0, "tokens": 64}, {"ttft_s": 1.0, "last_s": 4.0, "tokens": 64}])
    assert r["tps"] == pytest.approx(32.0) and r["latency_max_s"] == 4.0 and r["ttft_median_s"] == 0.75
    data = {"rows": [{"server": "r7b", "clients": 4, "tps": 130.0},
                     {"server": "r7b serial", "clients": 4, "tps": 100.0},
                     {"server": "llama-server", "clients": 4, "tps": 125.0}]}
    g = sb.goals(data)
    assert g["vs_serial"] == pytest.approx(1.3) and g["vs_llama_server"] == pytest.approx(1.04)
    # rounds run side by side: the ratio is the median of per-round ratios, not of the medians
    ours = [{"tps": t} for t in (100.0, 80.0, 120.0)]
    theirs = [{"tps": t} for t in (100.0, 100.0, 100.0)]
    assert sb.paired_ratio(ours, theirs) == pytest.approx(1.0)
    assert sb.paired_ratio([{"tps": 90.0}, {"tps": 110.0}, {"tps": 70.0}],
                           [{"tps": 100.0}, {"tps": 100.0}, {"tps": 50.0}]) == pytest.approx(1.1)
    assert sb.median_round(ours) == {"tps": 100.0}


def test_servers_take_turns_in_rotating_order(monkeypatch):
    sb = _script("serve_bench")
    order = []
    monkeypatch.setattr(sb, "one_round", lambda server, texts, max_tokens: order.append(server) or {"tps": 1.0})
    plan = sb.ServePlan(clients=(2,), prompt_words=8, max_tokens=4, n_ctx=256, repeat=3)
    rounds = sb.take_turns({"a": "A", "b": "B", "c": "C"}, 2, plan)
    assert order == ["A", "B", "C"] + ["A", "B", "C", "B", "C", "A", "C", "A", "B"]  # warm-up rounds, then rotating
    assert [len(r) for r in rounds.values()] == [3, 3, 3]


def test_depth_is_kept_between_runs_and_shared_by_both_loops(stand_in_gguf):
    import llama_cpp

    from r7b.quality.bench_raw import RawLoop

    path = stand_in_gguf("f16")
    settings = bench.BenchSettings(n_ctx=256, n_threads=2, flash_attn="off")
    tokens = bench.random_prompt(path, 100)
    with bench.llama_log():
        ours = bench.R7bLoop(path, settings)
        raw = RawLoop(ours.engine.model.ptr, n_ctx=256, n_batch=512, n_threads=2, flash_attn=0)
    try:
        state = ours.set_depth(tokens[:64])
        assert raw.set_depth(tokens[:64], state) is state
        for _ in range(2):  # the second run starts from the depth again, not from the first run's end
            for loop in (ours, raw):
                marks = loop.run(tokens[64:80], 4, bench.time.perf_counter)
                assert list(marks) == sorted(marks) and marks[3] > marks[2]  # decoding restarted after the first token
            # decoding ran from the depth (llama-bench's tg @ dN), the prompt's cells gone
            assert ours.engine.cached[:64] == tokens[:64] and len(ours.engine.cached) == 64 + 4
            assert llama_cpp.llama_memory_seq_pos_max(raw.mem, 0) == 64 + 4 - 1
        assert ours.engine.logits()[0] == pytest.approx(_raw_logits(raw)[0], rel=1e-3, abs=1e-3)
    finally:
        raw.close()
        ours.close()


def _raw_logits(raw):
    import llama_cpp

    return llama_cpp.llama_get_logits_ith(raw.ctx, -1)

"""Memory arithmetic: KV cache sizes agree with what llama.cpp allocates, R7B figures are as documented."""

from __future__ import annotations

import re

import pytest

from r7b.cohere2 import COMMAND_R7B
from r7b.memory import (GIB, MIB, bits_per_weight, compute_buffer_bytes, estimate_ram, flash_attn_path,
                        kv_cache_bytes, kv_cells, tensor_bytes)


def llama_cpp_log(path, n_ctx: int, n_ubatch: int, swa_full: bool, flash_attn: str = "off") -> str:
    """What llama.cpp logs while it loads `path` and creates a context."""
    import llama_cpp

    from r7b.llama import FLASH_ATTN, LlamaLog

    lines: list[str] = []

    class Capture(LlamaLog):
        def _on_log(self, level, text, user):
            lines.append((text or b"").decode())

    with Capture():
        model = llama_cpp.llama_model_load_from_file(str(path).encode(), llama_cpp.llama_model_default_params())
        params = llama_cpp.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch, params.swa_full = n_ctx, n_ubatch, n_ubatch, swa_full
        params.n_threads = params.n_threads_batch = 1
        params.flash_attn_type = FLASH_ATTN[flash_attn]
        ctx = llama_cpp.llama_init_from_model(model, params)
        llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)
    return "".join(lines)


def llama_cpp_cells(path, n_ctx: int, n_ubatch: int, swa_full: bool) -> tuple[int, int]:
    """(global, sliding) cells llama.cpp reports when it builds the cache."""
    found = dict(re.findall(r"(non-SWA|SWA) KV cache, size = (\d+) cells", llama_cpp_log(path, n_ctx, n_ubatch,
                                                                                           swa_full)))
    return int(found["non-SWA"]), int(found["SWA"])


def llama_cpp_compute(path, n_ctx: int, n_ubatch: int, flash_attn: str) -> int:
    """Bytes of the compute and output buffers llama.cpp reserves."""
    text = llama_cpp_log(path, n_ctx, n_ubatch, False, flash_attn)
    mib = sum(float(x) for x in re.findall(r"CPU (?:compute|output) buffer size =\s+([\d.]+) MiB", text))
    return int(mib * MIB)


@pytest.mark.parametrize("n_ctx, n_ubatch, swa_full", [(4096, 512, False), (1000, 512, False), (300, 64, False),
                                                       (2048, 256, True)])
def test_cells_match_llama_cpp(stand_in_gguf, n_ctx, n_ubatch, swa_full):
    expected = kv_cells(n_ctx, 64, swa_full=swa_full, n_ubatch=n_ubatch)
    assert llama_cpp_cells(stand_in_gguf("f16"), n_ctx, n_ubatch, swa_full) == expected


def test_command_r7b_kv_cache():
    small = kv_cache_bytes(32, 8, 128, 131072, 4096)
    full = kv_cache_bytes(32, 8, 128, 131072, 4096, swa_full=True)
    assert full == 16 * GIB
    assert small == 8 * 131072 * 4096 + 24 * 4608 * 4096  # 8 global layers, 24 sliding ones of 4096 + 512 cells
    assert kv_cache_bytes(32, 8, 128, 131072, 4096, kv_type="q8_0") == small * 34 // 64


@pytest.mark.parametrize("n_ctx, n_ubatch", [(8192, 512), (2048, 512), (1000, 256)])
@pytest.mark.parametrize("flash_attn", ["off", "on"])
def test_compute_buffer_matches_llama_cpp(stand_in_gguf, n_ctx, n_ubatch, flash_attn):
    from r7b.convert.quantize import model_dims, read_model

    path = stand_in_gguf("f16")
    shape = model_dims(read_model(path))
    expected = compute_buffer_bytes(shape, n_ubatch, n_ctx=n_ctx, flash_attn=flash_attn)
    assert llama_cpp_compute(path, n_ctx, n_ubatch, flash_attn) == pytest.approx(expected, rel=0.10)


# CPU compute buffer size llama.cpp 0.3.36 logged for the full-size rehearsal model (docs/rehearsal.md),
# 512-token batches, small sliding-window cache; plus its 0.98 MiB output buffer.
R7B_COMPUTE_MIB = {("off", 4096): 516.0020, ("off", 32768): 2161.0137, ("off", 131072): 8497.0137,
                   ("on", 4096): 524.0020, ("on", 32768): 516.0020, ("on", 131072): 516.0020}


@pytest.mark.parametrize("flash_attn, n_ctx", list(R7B_COMPUTE_MIB))
def test_command_r7b_compute_buffer(flash_attn, n_ctx):
    logged = (R7B_COMPUTE_MIB[flash_attn, n_ctx] + 256000 * 4 / MIB) * MIB
    assert compute_buffer_bytes(COMMAND_R7B, n_ctx=n_ctx, flash_attn=flash_attn) == pytest.approx(logged, rel=0.02)


def test_attention_path_follows_the_runtime():
    assert flash_attn_path("auto") == "off" and flash_attn_path("auto", "q8_0") == "on"
    assert flash_attn_path("on") == "on" and flash_attn_path("off", "q8_0") == "off"
    # past 32K the scores it would keep cost more than the cache: auto turns flash attention on
    assert flash_attn_path("auto", n_ctx=32768) == "off" and flash_attn_path("auto", n_ctx=32769) == "on"
    assert flash_attn_path("off", n_ctx=131072) == "off"
    off = estimate_ram(0, COMMAND_R7B, 131072, flash_attn="off")
    assert estimate_ram(0, COMMAND_R7B, 131072) == estimate_ram(0, COMMAND_R7B, 131072, flash_attn="on")
    assert off.compute - estimate_ram(0, COMMAND_R7B, 131072, flash_attn="on").compute > 7 * GIB
    assert estimate_ram(0, COMMAND_R7B, 32768) == estimate_ram(0, COMMAND_R7B, 32768, flash_attn="off")


def test_shape_and_sizes():
    assert round(COMMAND_R7B.n_params / 1e9, 2) == 8.03
    assert bits_per_weight("Q4_K") == 4.5 and bits_per_weight("q8_0") == 8.5 and bits_per_weight("IQ4_XS") == 4.25
    assert tensor_bytes((4096, 14336), "Q6_K") == 14336 * 16 * 210
    ram = estimate_ram(4 * GIB, COMMAND_R7B, 4096)
    assert ram.total == ram.weights + ram.kv_cache + ram.compute + ram.overhead and ram.kv_cache == GIB // 2


def test_shape_from_metadata(stand_in_gguf):
    from r7b.convert.quantize import model_dims, read_model

    shape = model_dims(read_model(stand_in_gguf("f16")))
    expected = dict(n_layers=4, n_heads=4, n_kv_heads=2, head_dim=64, hidden=256, ffn=768, vocab=8000,
                    sliding_window=64, context_length=8192)
    assert {k: getattr(shape, k) for k in expected} == expected


# -- refusing what does not fit ------------------------------------------------------------------


@pytest.fixture(scope="module")
def long_context_gguf(stand_in_gguf, edited_gguf):
    """The stand-in claiming a 2**30-token context: its one global layer would need 512 GiB of f16 KV."""
    import gguf

    return edited_gguf(stand_in_gguf("f16"), {"cohere2.context_length": (2**30, gguf.GGUFValueType.UINT32)},
                       "long-context.gguf")


def test_load_refuses_what_does_not_fit(long_context_gguf):
    from r7b.errors import R7BError
    from r7b.runtime.model import Model

    with pytest.raises(R7BError) as info:
        Model.load(long_context_gguf, n_ctx=2**30)
    message = str(info.value)
    # by hand: 1 global layer x 2**30 cells x (K + V) x 2 KV heads x 64 dims x 2 bytes = 512 GiB
    assert "f16 KV cache 512.00 GiB for 1073741824 tokens" in message and "\n" not in message
    # past 32K tokens "auto" keeps flash attention on, so no attention scores are added
    assert re.search(r"needs about 512\.\d\d GiB .* compute \(flash attention on\) .* but only [\d.]+ GiB "
                     "is available", message), message
    with pytest.raises(R7BError) as info:  # off, one batch's scores add 4 x 512 x 2**30 x 5 bytes
        Model.load(long_context_gguf, n_ctx=2**30, flash_attn="off")
    assert re.search(r"needs about 1075\d\.\d\d GiB .* compute \(flash attention off\) .* but only [\d.]+ GiB "
                     "is available", str(info.value)), str(info.value)
    import gguf

    weights = sum(int(t.n_bytes) for t in gguf.GGUFReader(long_context_gguf).tensors)
    assert f"weights {weights / 2**20:.1f} MiB" in message
    with Model.load(long_context_gguf, n_ctx=1024, n_threads=1) as model:  # a context that fits loads
        assert model.engine.n_ctx == 1024


def test_cli_refusal_is_one_line(long_context_gguf):
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "r7b.cli", "generate", str(long_context_gguf), "--ctx", str(2**30),
                          "--prompt", "hi"], capture_output=True, text=True, timeout=120)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 1 and len(lines) == 1 and "needs about" in lines[0], run.stderr


@pytest.mark.parametrize("version, limit, usage, stat, expected", [
    ("v2", "1073741824", "536870912", "anon 1\ninactive_file 134217728\n", 1024**3 - 512 * 1024**2 + 128 * 1024**2),
    ("v2", "max", "536870912", "inactive_file 0\n", None),
    ("v1", "2147483648", "1073741824", "cache 5\ninactive_file 0\ntotal_inactive_file 9\n", 1024**3),
    ("v1", "9223372036854771712", "1073741824", "inactive_file 0\n", None),
    ("v2", "1000", "5000", "inactive_file 0\n", 0),
])
def test_cgroup_room(tmp_path, version, limit, usage, stat, expected):
    from r7b.memory import cgroup_room

    proc = tmp_path / "cgroup"
    if version == "v2":
        proc.write_text("0::/app.slice/r7b\n")
        folder, files = tmp_path / "app.slice" / "r7b", ("memory.max", "memory.current")
    else:
        proc.write_text("5:cpu,cpuacct:/x\n4:memory:/docker/abc\n0::/\n")
        folder, files = tmp_path / "memory" / "docker" / "abc", ("memory.limit_in_bytes", "memory.usage_in_bytes")
    folder.mkdir(parents=True)
    (folder / files[0]).write_text(limit + "\n")
    (folder / files[1]).write_text(usage + "\n")
    (folder / "memory.stat").write_text(stat)
    assert cgroup_room(proc, tmp_path) == expected
    assert cgroup_room(tmp_path / "missing", tmp_path) is None


def test_repacked_copy_by_cpu_feature():
    """llama.cpp's CPU backend copies Q4_K matrices (not the embedding) with AVX2; Q8_0 only on ARM."""
    from r7b.gguf_reader import TensorRecord
    from r7b.memory import RamEstimate, repacked_bytes

    GT = __import__("gguf").GGMLQuantizationType
    tensors = [TensorRecord("token_embd.weight", (4096, 256000), GT.Q4_K, 0, 100),
               TensorRecord("blk.0.attn_q.weight", (4096, 4096), GT.Q4_K, 0, 10),
               TensorRecord("blk.0.ffn_down.weight", (14336, 4096), GT.Q6_K, 0, 20),
               TensorRecord("blk.0.attn_k.weight", (4096, 1024), GT.Q8_0, 0, 30),
               TensorRecord("blk.0.attn_norm.weight", (4096,), GT.F32, 0, 40)]
    assert repacked_bytes(tensors, {"avx", "avx2"}) == 10
    assert repacked_bytes(tensors, {"avx", "f16c"}) == 0
    assert repacked_bytes(tensors, {"asimd", "asimddp", "i8mm"}) == 60
    ram = RamEstimate(100, 10, 10, 1, repacked=50)
    assert ram.total == 171 and ram.working_set == 121

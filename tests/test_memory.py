"""Memory arithmetic: KV cache sizes agree with what llama.cpp allocates, R7B figures are as documented."""

from __future__ import annotations

import re

import pytest

from r7b.runtime.memory import (COMMAND_R7B, GIB, ModelShape, bits_per_weight, estimate_ram, kv_cache_bytes,
                                kv_cells, tensor_bytes)


def llama_cpp_cells(path, n_ctx: int, n_ubatch: int, swa_full: bool) -> tuple[int, int]:
    """(global, sliding) cells llama.cpp reports when it builds the cache."""
    import llama_cpp

    from r7b.convert.quantize import LlamaLog

    lines: list[str] = []

    class Capture(LlamaLog):
        def _on_log(self, level, text, user):
            lines.append((text or b"").decode())

    with Capture():
        model = llama_cpp.llama_model_load_from_file(str(path).encode(), llama_cpp.llama_model_default_params())
        params = llama_cpp.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch, params.swa_full = n_ctx, 512, n_ubatch, swa_full
        params.n_threads = params.n_threads_batch = 1
        ctx = llama_cpp.llama_init_from_model(model, params)
        llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)
    found = dict(re.findall(r"(non-SWA|SWA) KV cache, size = (\d+) cells", "".join(lines)))
    return int(found["non-SWA"]), int(found["SWA"])


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


def test_shape_and_sizes():
    assert round(COMMAND_R7B.n_params / 1e9, 2) == 8.03
    assert bits_per_weight("Q4_K") == 4.5 and bits_per_weight("q8_0") == 8.5 and bits_per_weight("IQ4_XS") == 4.25
    assert tensor_bytes((4096, 14336), "Q6_K") == 14336 * 16 * 210
    ram = estimate_ram(4 * GIB, COMMAND_R7B, 4096)
    assert ram.total == ram.weights + ram.kv_cache + ram.compute + ram.overhead and ram.kv_cache == GIB // 2


def test_shape_from_metadata(stand_in_gguf):
    from r7b.convert.quantize import read_model

    shape = read_model(stand_in_gguf("f16")).shape
    assert shape == ModelShape(n_layers=4, n_heads=4, n_kv_heads=2, head_dim=64, hidden=256, ffn=768, vocab=8000,
                               sliding_window=64, context_length=8192, name=shape.name)

"""Disk and RAM arithmetic for Command R7B GGUFs: weights, KV cache, compute buffers.

The numbers follow what llama.cpp allocates, so that `r7b quantize --list` and the runtime's
fit check agree with reality: contexts are padded to 256 cells, and with the small
sliding-window cache (`swa_full=False`) the sliding layers keep only `sliding_window + n_ubatch`
cells (padded to 256) however long the context is. Only the global layers (every
`swa_pattern`-th) grow with the context, which is why R7B needs about 4.4 GiB of f16 KV cache at
128K tokens instead of 16 GiB.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from r7b.cohere2 import Cohere2Dims, n_global_layers
from r7b.errors import R7BError

KV_PAD = 256  # llama.cpp pads context and cache sizes to this many cells
MIB = 1024**2
GIB = 1024**3
RUNTIME_OVERHEAD = 128 * MIB  # interpreter, libraries, tokenizer tables, scratch


def ggml_type(name: str | int | GGMLQuantizationType) -> GGMLQuantizationType:
    """A ggml type from its name ('q8_0', 'Q6_K', 'f16') or number."""
    if isinstance(name, str):
        try:
            return GGMLQuantizationType[name.upper()]
        except KeyError:
            raise ValueError(f"unknown ggml type {name!r}") from None
    return GGMLQuantizationType(name)


def bits_per_weight(qtype: str | int | GGMLQuantizationType) -> float:
    """Storage bits per weight of a ggml type, scales included (Q4_K: 4.5, Q8_0: 8.5)."""
    block, size = GGML_QUANT_SIZES[ggml_type(qtype)]
    return 8 * size / block


def tensor_bytes(shape: tuple[int, ...], qtype: str | int | GGMLQuantizationType) -> int:
    """Bytes of one tensor; `shape` is in ggml order (row length first)."""
    block, size = GGML_QUANT_SIZES[ggml_type(qtype)]
    rows = 1
    for dim in shape[1:]:
        rows *= int(dim)
    return rows * (-(-int(shape[0]) // block)) * size


def pad(n: int, multiple: int = KV_PAD) -> int:
    return -(-n // multiple) * multiple


def kv_cells(n_ctx: int, sliding_window: int, *, swa_full: bool = False, n_ubatch: int = 512) -> tuple[int, int]:
    """(global, sliding) cache cells per sequence, as llama.cpp sizes them."""
    cells = pad(n_ctx)
    if not sliding_window or swa_full:
        return cells, cells
    return cells, min(cells, pad(sliding_window + n_ubatch))


def kv_cache_bytes(n_layers: int, n_kv_heads: int, head_dim: int, n_ctx: int, sliding_window: int, *,
                   swa_full: bool = False, kv_type: str = "f16", swa_pattern: int = 4, n_ubatch: int = 512) -> int:
    """K and V cache bytes for one sequence of `n_ctx` tokens."""
    n_global = n_global_layers(n_layers, swa_pattern) if sliding_window else n_layers
    global_cells, swa_cells = kv_cells(n_ctx, sliding_window, swa_full=swa_full, n_ubatch=n_ubatch)
    per_cell = 2 * tensor_bytes((n_kv_heads * head_dim,), kv_type)  # one K row and one V row
    return per_cell * (n_global * global_cells + (n_layers - n_global) * swa_cells)


def compute_buffer_bytes(shape: Cohere2Dims, n_ubatch: int = 512) -> int:
    """Scratch for one micro-batch: logits for every token dominate, then the FFN activations."""
    return 4 * n_ubatch * (shape.vocab + 2 * shape.ffn + 4 * shape.hidden)


@dataclass(frozen=True)
class RamEstimate:
    weights: int
    kv_cache: int
    compute: int
    overhead: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.compute + self.overhead


def estimate_ram(weight_bytes: int, shape: Cohere2Dims, n_ctx: int, *, kv_type: str = "f16",
                 swa_full: bool = False, n_ubatch: int = 512, overhead: int = RUNTIME_OVERHEAD) -> RamEstimate:
    """Resident memory to run a model on CPU: the mmapped weights are all touched, so they count in full."""
    kv = kv_cache_bytes(shape.n_layers, shape.n_kv_heads, shape.head_dim, n_ctx, shape.sliding_window,
                        swa_full=swa_full, kv_type=kv_type, swa_pattern=shape.swa_pattern, n_ubatch=n_ubatch)
    return RamEstimate(weight_bytes, kv, compute_buffer_bytes(shape, n_ubatch), overhead)


def format_bytes(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / MIB:.1f} MiB"


def available_memory() -> int:
    """Bytes this process can still use: free RAM, or less where a cgroup (a container) caps it."""
    import psutil

    available = psutil.virtual_memory().available
    room = cgroup_room()
    return available if room is None else min(available, room)


# (hierarchy folder under /sys/fs/cgroup, limit file, usage file) for cgroup v2 and v1
_CGROUPS = {"": ("", "memory.max", "memory.current"),
            "memory": ("memory", "memory.limit_in_bytes", "memory.usage_in_bytes")}


def cgroup_room(proc: Path = Path("/proc/self/cgroup"), sys_root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes left under this process's cgroup memory limit (None: no limit), page cache counted as free."""
    try:
        lines = proc.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, where = line.split(":", 2)
        kind = "" if controllers == "" else "memory" if "memory" in controllers.split(",") else None
        if kind is None:
            continue
        hierarchy, limit_file, usage_file = _CGROUPS[kind]
        folder = sys_root / hierarchy / where.lstrip("/")
        try:
            limit = (folder / limit_file).read_text().strip()
            used = int((folder / usage_file).read_text()) - _inactive_file(folder / "memory.stat")
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2**60:  # "max" or a huge number: no limit
            return max(int(limit) - used, 0)
    return None


def _inactive_file(stat: Path) -> int:
    for line in stat.read_text().splitlines():
        key, _, value = line.partition(" ")
        if key in ("inactive_file", "total_inactive_file"):
            return int(value)
    return 0


def check_fits(summary, *, n_ctx: int, kv_type: str = "f16", swa_full: bool = False) -> RamEstimate:
    """Refuse, before llama.cpp allocates, a model whose weights plus KV cache exceed available memory."""
    shape = Cohere2Dims.from_gguf_metadata(summary.metadata)
    weights = sum(t.nbytes for t in summary.tensors)
    need = estimate_ram(weights, shape, n_ctx, kv_type=kv_type, swa_full=swa_full)
    available = available_memory()
    if need.total > available:
        raise R7BError(f"{summary.path} needs about {format_bytes(need.total)} (weights {format_bytes(need.weights)}"
                       f" + {kv_type} KV cache {format_bytes(need.kv_cache)} for {n_ctx} tokens + compute and runtime "
                       f"{format_bytes(need.compute + need.overhead)}) but only {format_bytes(available)} is "
                       "available: use a shorter context, a quantized KV cache or a smaller quantization")
    return need

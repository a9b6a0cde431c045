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


def check_fits(summary, *, n_ctx: int, kv_type: str = "f16", swa_full: bool = False,
               placement=None) -> RamEstimate:
    """Refuse, before llama.cpp allocates, a model whose weights plus KV cache exceed available memory.

    With `placement` (a model split over RPC workers, see r7b.rpc) each device's share is checked
    against that device's free memory instead, and this machine's share is returned.
    """
    if placement is not None:
        local = check_split_fits(summary, placement, n_ctx=n_ctx, kv_type=kv_type, swa_full=swa_full)[0]
        return RamEstimate(local.weights, local.kv_cache, local.compute - RUNTIME_OVERHEAD, RUNTIME_OVERHEAD)
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


@dataclass(frozen=True)
class DeviceShare:
    """What one device of a split model holds: its blocks' weights and KV cache, and its scratch."""

    name: str
    layers: int
    weights: int
    kv_cache: int
    compute: int
    free: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.compute


def split_shares(summary, placement, *, n_ctx: int, kv_type: str = "f16", swa_full: bool = False,
                 n_ubatch: int = 512) -> list[DeviceShare]:
    """Each device's share of a model split by `placement` (an `r7b.rpc.Placement`), as llama.cpp places it.

    The input embeddings stay on this machine; the output layer (the embeddings again, for tied
    weights) stays here too or goes to a worker (`placement.layer_device`); each block brings its
    weights and its layer's KV cache.
    Every device needs scratch for its activations, and the one holding the output also the logits.
    """
    shape = Cohere2Dims.from_gguf_metadata(summary.metadata)
    n = shape.n_layers
    per_layer = [0] * n
    embd = out = 0
    for t in summary.tensors:
        if 0 <= t.layer < n:
            per_layer[t.layer] += t.nbytes
        elif t.name == "token_embd.weight":
            embd = t.nbytes
        else:
            out += t.nbytes
    if not any(t.name == "output.weight" for t in summary.tensors) and placement.layer_device(n) != 0:
        out += embd  # tied: llama.cpp copies the embeddings to the output layer's device (here: the same mapping)
    global_cells, swa_cells = kv_cells(n_ctx, shape.sliding_window, swa_full=swa_full, n_ubatch=n_ubatch)
    per_cell = 2 * tensor_bytes((shape.n_kv_heads * shape.head_dim,), kv_type)
    p = shape.swa_pattern

    def kv(il: int) -> int:
        is_global = not shape.sliding_window or p <= 0 or il % p == p - 1
        return per_cell * (global_cells if is_global else swa_cells)

    act = 4 * n_ubatch * (2 * shape.ffn + 4 * shape.hidden)
    shares = []
    for i, (name, layers) in enumerate(zip(placement.names, placement.layers())):
        blocks = [il for il in layers if il < n]
        weights = sum(per_layer[il] for il in blocks) + (out if n in layers else 0) + (embd if i == 0 else 0)
        compute = (act if blocks or i == 0 else 0) + (4 * n_ubatch * shape.vocab if n in layers else 0)
        shares.append(DeviceShare(name, len(blocks), weights, sum(kv(il) for il in blocks),
                                  compute + (RUNTIME_OVERHEAD if i == 0 else 0), placement.free[i]))
    return shares


def check_split_fits(summary, placement, *, n_ctx: int, kv_type: str = "f16", swa_full: bool = False
                     ) -> list[DeviceShare]:
    """Refuse a split in which some device's share exceeds its free memory, naming the device."""
    shares = split_shares(summary, placement, n_ctx=n_ctx, kv_type=kv_type, swa_full=swa_full)
    for s in shares:
        if s.total > s.free:
            raise R7BError(f"{summary.path}: {s.name} would hold {s.layers} layers needing about "
                           f"{format_bytes(s.total)} (weights {format_bytes(s.weights)} + {kv_type} KV cache "
                           f"{format_bytes(s.kv_cache)} for {n_ctx} tokens + compute {format_bytes(s.compute)}) but "
                           f"has only {format_bytes(s.free)} free: change --tensor-split, add a worker, or use a "
                           "shorter context or a smaller quantization")
    return shares

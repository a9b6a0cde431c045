"""Disk and RAM arithmetic for Command R7B GGUFs: weights, KV cache, compute buffers.

The numbers follow what llama.cpp allocates, so that `r7b quantize --list` and the runtime's
fit check agree with reality: contexts are padded to 256 cells, and with the small
sliding-window cache (`swa_full=False`) the sliding layers keep only `sliding_window + n_ubatch`
cells (padded to 256) however long the context is. Only the global layers (every
`swa_pattern`-th) grow with the context, which is why R7B needs about 4.4 GiB of f16 KV cache at
128K tokens instead of 16 GiB.

The compute buffer depends on the attention path. Without flash attention a micro-batch's
attention scores are materialized: n_ubatch x cells x heads floats for a global layer, 8.0 GiB at
128K for R7B, far above the logits' 0.5 GiB; with flash attention the logits dominate at every
context. `estimate_ram` counts the path in use.

On CPUs with the right instructions llama.cpp's CPU backend repacks some weight types into an
interleaved copy in anonymous memory (ggml-cpu/repack.cpp: Q4_K, Q4_0, IQ4_NL with AVX2; more on
ARM with dotprod or i8mm). The mapped file pages of those tensors were read to make the copy, so
both count in the resident set: 3.1 GiB of R7B's Q4_K_M is held twice. The file pages are clean
and the kernel drops them under pressure, so the fit check leaves the copy out (`working_set`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from r7b.cohere2 import Cohere2Dims, n_global_layers
from r7b.errors import R7BError

GT = GGMLQuantizationType

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


FLASH_ATTN_VALUES = ("on", "off", "auto")
FULL_PRECISION_KV = ("f16", "f32", "bf16")
ACTIVATION_ROWS = 5  # hidden-sized f32 rows per token alive beside the attention scores


SCORES_MAX_CTX = 32768  # "auto" turns flash attention on past this context on the CPU


def flash_attn_path(flash_attn: str = "auto", kv_type: str = "f16", n_ctx: int | None = None) -> str:
    """"on" or "off" on the CPU (r7b.llama.resolve_flash_attn uses it). "auto" is off: from a few
    thousand tokens of depth it decodes much faster (1.8x at 4K, docs/benchmarks.md), which is where
    prompts with documents, tool results and long chats live; an empty context decodes about 5%
    slower. Except that a quantized V cache needs flash attention, and past SCORES_MAX_CTX tokens,
    where the attention scores it would keep (2 GiB at 32K for R7B, 8 GiB at 128K) cost more memory
    than the KV cache itself."""
    if flash_attn not in FLASH_ATTN_VALUES:
        raise R7BError(f"flash_attn must be one of {', '.join(FLASH_ATTN_VALUES)}, not {flash_attn!r}")
    if flash_attn != "auto":
        return flash_attn
    if kv_type not in FULL_PRECISION_KV or (n_ctx is not None and n_ctx > SCORES_MAX_CTX):
        return "on"
    return "off"


def compute_buffer_bytes(shape: Cohere2Dims, n_ubatch: int = 512, *, n_ctx: int | None = None,
                         flash_attn: str = "auto", kv_type: str = "f16", swa_full: bool = False) -> int:
    """The compute and output buffers llama.cpp reserves for one micro-batch: the larger of the
    output phase (every token's logits) and, without flash attention, the attention phase (a global
    layer's scores and mask for the whole cache). Without `n_ctx` only the output phase counts."""
    output = 4 * n_ubatch * (shape.vocab + 2 * shape.hidden)
    attention = 0
    if n_ctx is not None and flash_attn_path(flash_attn, kv_type, n_ctx) == "off":
        global_cells, swa_cells = kv_cells(n_ctx, shape.sliding_window, swa_full=swa_full, n_ubatch=n_ubatch)
        attention = 4 * n_ubatch * (global_cells * (shape.n_heads + 1) + swa_cells + ACTIVATION_ROWS * shape.hidden)
    return max(output, attention) + 4 * shape.vocab


# weight types the CPU backend repacks, by the CPU feature (a /proc/cpuinfo flag) that enables it
REPACKED_TYPES = {
    "avx2": {GT.Q4_0, GT.Q4_K, GT.IQ4_NL, GT.MXFP4},
    "avx512f": {GT.Q2_K},
    "asimddp": {GT.Q4_0, GT.Q4_K, GT.IQ4_NL, GT.Q8_0},
    "i8mm": {GT.Q4_0, GT.Q4_K, GT.Q5_K, GT.Q6_K, GT.IQ4_NL, GT.Q8_0},
}
NOT_REPACKED = ("token_embd.weight",)  # read by row lookups, which the repacked layout cannot serve


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """This CPU's feature flags (x86 `flags`, ARM `Features`); empty where unknown."""
    try:
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("flags", "Features"):
                return set(value.split())
    except OSError:
        pass
    return set()


def repacked_bytes(tensors, flags: set[str] | None = None) -> int:
    """Bytes of the weights llama.cpp's CPU backend will copy into its repacked layout on this CPU."""
    flags = cpu_flags() if flags is None else flags
    types = set().union(*(REPACKED_TYPES[f] for f in REPACKED_TYPES if f in flags))
    return sum(t.nbytes for t in tensors if len(t.shape) == 2 and t.name not in NOT_REPACKED
               and GGMLQuantizationType(t.type) in types and t.shape[1] % 8 == 0)


@dataclass(frozen=True)
class RamEstimate:
    weights: int
    kv_cache: int
    compute: int
    overhead: int
    repacked: int = 0  # weights the CPU backend copies; their file pages stay resident but reclaimable

    @property
    def total(self) -> int:
        """The resident set at its peak, the repacked copy included."""
        return self.weights + self.kv_cache + self.compute + self.overhead + self.repacked

    @property
    def working_set(self) -> int:
        """What must stay in memory: without the file pages the repacked copy replaced."""
        return self.total - self.repacked


def estimate_ram(weight_bytes: int, shape: Cohere2Dims, n_ctx: int, *, kv_type: str = "f16",
                 swa_full: bool = False, n_ubatch: int = 512, overhead: int = RUNTIME_OVERHEAD,
                 flash_attn: str = "auto", repacked: int = 0) -> RamEstimate:
    """Memory to run a model on CPU: the mmapped weights are all touched, so they count in full;
    `repacked` (see `repacked_bytes`) is the CPU backend's extra copy."""
    n_ubatch = min(n_ubatch, n_ctx)
    kv = kv_cache_bytes(shape.n_layers, shape.n_kv_heads, shape.head_dim, n_ctx, shape.sliding_window,
                        swa_full=swa_full, kv_type=kv_type, swa_pattern=shape.swa_pattern, n_ubatch=n_ubatch)
    compute = compute_buffer_bytes(shape, n_ubatch, n_ctx=n_ctx, flash_attn=flash_attn, kv_type=kv_type,
                                   swa_full=swa_full)
    return RamEstimate(weight_bytes, kv, compute, overhead, repacked)


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
               placement=None, flash_attn: str = "auto") -> RamEstimate:
    """Refuse, before llama.cpp allocates, a model whose weights plus KV cache exceed available memory.

    With `placement` (a model split over RPC workers, see r7b.rpc) each device's share is checked
    against that device's free memory instead, and this machine's share is returned.
    """
    if placement is not None:
        local = check_split_fits(summary, placement, n_ctx=n_ctx, kv_type=kv_type, swa_full=swa_full,
                                 flash_attn=flash_attn)[0]
        return RamEstimate(local.weights, local.kv_cache, local.compute - RUNTIME_OVERHEAD, RUNTIME_OVERHEAD)
    shape = Cohere2Dims.from_gguf_metadata(summary.metadata)
    weights = sum(t.nbytes for t in summary.tensors)
    need = estimate_ram(weights, shape, n_ctx, kv_type=kv_type, swa_full=swa_full, flash_attn=flash_attn,
                        repacked=repacked_bytes(summary.tensors))
    available = available_memory()
    if need.working_set > available:
        path = flash_attn_path(flash_attn, kv_type, n_ctx)
        raise R7BError(f"{summary.path} needs about {format_bytes(need.working_set)} (weights {format_bytes(need.weights)}"
                       f" + {kv_type} KV cache {format_bytes(need.kv_cache)} for {n_ctx} tokens + compute (flash "
                       f"attention {path}) and runtime {format_bytes(need.compute + need.overhead)}) but only "
                       f"{format_bytes(available)} is available: use a shorter context, a quantized KV cache"
                       f"{', flash attention' if path == 'off' else ''} or a smaller quantization")
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
                 n_ubatch: int = 512, flash_attn: str = "auto") -> list[DeviceShare]:
    """Each device's share of a model split by `placement` (an `r7b.rpc.Placement`), as llama.cpp places it.

    The input embeddings stay on this machine; the output layer (the embeddings again, for tied
    weights) stays here too or goes to a worker (`placement.layer_device`); each block brings its
    weights and its layer's KV cache.
    Every device needs scratch for its activations (without flash attention, its layers' attention
    scores), and the one holding the output also the logits.
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
    scores = flash_attn_path(flash_attn, kv_type, n_ctx) == "off"

    def scratch(blocks: list[int]) -> int:
        if not scores or not blocks:
            return act
        cells = max(kv(il) for il in blocks) // per_cell
        return max(act, 4 * n_ubatch * (cells * (shape.n_heads + 1) + ACTIVATION_ROWS * shape.hidden))

    shares = []
    for i, (name, layers) in enumerate(zip(placement.names, placement.layers())):
        blocks = [il for il in layers if il < n]
        weights = sum(per_layer[il] for il in blocks) + (out if n in layers else 0) + (embd if i == 0 else 0)
        compute = (scratch(blocks) if blocks or i == 0 else 0) + (4 * n_ubatch * shape.vocab if n in layers else 0)
        shares.append(DeviceShare(name, len(blocks), weights, sum(kv(il) for il in blocks),
                                  compute + (RUNTIME_OVERHEAD if i == 0 else 0), placement.free[i]))
    return shares


def check_split_fits(summary, placement, *, n_ctx: int, kv_type: str = "f16", swa_full: bool = False,
                     flash_attn: str = "auto") -> list[DeviceShare]:
    """Refuse a split in which some device's share exceeds its free memory, naming the device."""
    shares = split_shares(summary, placement, n_ctx=n_ctx, kv_type=kv_type, swa_full=swa_full,
                          flash_attn=flash_attn)
    for s in shares:
        if s.total > s.free:
            raise R7BError(f"{summary.path}: {s.name} would hold {s.layers} layers needing about "
                           f"{format_bytes(s.total)} (weights {format_bytes(s.weights)} + {kv_type} KV cache "
                           f"{format_bytes(s.kv_cache)} for {n_ctx} tokens + compute {format_bytes(s.compute)}) but "
                           f"has only {format_bytes(s.free)} free: change --tensor-split, add a worker, or use a "
                           "shorter context or a smaller quantization")
    return shares

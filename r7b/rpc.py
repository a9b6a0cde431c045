"""llama.cpp's RPC backend through ctypes: serve this machine's CPU, or put a model's layers on other machines.

A worker (`r7b worker`) runs `ggml_backend_rpc_start_server` on its CPU device. The machine that
loads the model adds each worker with `ggml_backend_rpc_add_server`, gets one device per worker,
and gives llama.cpp those devices (`llama_model_params.devices`) with `n_gpu_layers` and
`tensor_split` saying how many layers stay on the local CPU and how the rest are shared. Weights
travel from the loading machine at load time; workers need no GGUF.

Facts this module is built on (see the project's rpc-notes): the functions are looked up in
`libggml.so.0`, the very file libllama links against, because a second copy of libggml
(`libggml.so`) has its own device registry; a worker that cannot be reached makes llama.cpp
abort the process, so every endpoint is probed first with the protocol's HELLO over a plain
socket; a worker serves one client at a time and the protocol has no authentication.
"""

from __future__ import annotations

import ctypes
import socket
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from r7b.errors import R7BError

DEFAULT_PORT = 50052
PROTO_MAJOR = 7  # RPC_PROTO_MAJOR_VERSION of the llama.cpp this package was built with
_HELLO = 14  # RPC_CMD_HELLO
_CAPS = 24  # RPC_CONN_CAPS_SIZE
_DEV_CPU = 0  # GGML_BACKEND_DEVICE_TYPE_CPU

_lib: dict[str, Any] = {}
_probed: set[str] = set()  # endpoints this process already talks to (a worker serves one client at a time)
_devices: dict[str, int] = {}


# -- the library ---------------------------------------------------------------------------------

def _soname(stem: str) -> str:
    """The file name the dynamic linker gives libllama for `stem` (libggml.so.0 on Linux)."""
    if sys.platform == "darwin":
        return f"lib{stem}.0.dylib"
    if sys.platform == "win32":
        return f"{stem}.dll"
    return f"lib{stem}.so.0"


def _load(stem: str) -> ctypes.CDLL:
    if stem not in _lib:
        import llama_cpp  # loads libllama, and with it the libggml every call below must reach

        folder = Path(llama_cpp.__file__).parent / "lib"
        path = folder / _soname(stem)
        try:
            _lib[stem] = ctypes.CDLL(str(path) if path.exists() else _soname(stem), mode=ctypes.RTLD_GLOBAL)
        except OSError as exc:
            raise R7BError(f"cannot load {_soname(stem)}: {exc}") from None
    return _lib[stem]


def supported() -> bool:
    import llama_cpp

    return bool(llama_cpp.llama_supports_rpc())


def _require() -> None:
    if not supported():
        raise R7BError("this llama-cpp-python was built without the RPC backend: reinstall it with "
                       "CMAKE_ARGS=\"-DGGML_RPC=on\" (scripts/llama_wheel.sh does)")


def _fn(stem: str, name: str, restype: Any, *argtypes: Any) -> Any:
    f = getattr(_load(stem), name)
    f.restype, f.argtypes = restype, list(argtypes)
    return f


def _rpc_proc(name: str, restype: Any, *argtypes: Any) -> Any:
    """A function of the RPC backend, found through the registry as llama.cpp's rpc-server finds it."""
    reg = _fn("ggml", "ggml_backend_reg_by_name", ctypes.c_void_p, ctypes.c_char_p)(b"RPC")
    if not reg:
        raise R7BError("llama.cpp's RPC backend is not registered in this build")
    addr = _fn("ggml-base", "ggml_backend_reg_get_proc_address", ctypes.c_void_p, ctypes.c_void_p,
               ctypes.c_char_p)(reg, name.encode())
    if not addr:
        raise R7BError(f"llama.cpp's RPC backend has no {name}")
    return ctypes.CFUNCTYPE(restype, *argtypes)(addr)


def device_memory(dev: int) -> tuple[int, int]:
    """(free, total) bytes of a device; for an RPC device, as its worker reports them."""
    free, total = ctypes.c_size_t(), ctypes.c_size_t()
    _fn("ggml-base", "ggml_backend_dev_memory", None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t),
        ctypes.POINTER(ctypes.c_size_t))(dev, ctypes.byref(free), ctypes.byref(total))
    return free.value, total.value


def device_name(dev: int) -> str:
    return _fn("ggml-base", "ggml_backend_dev_name", ctypes.c_char_p, ctypes.c_void_p)(dev).decode()


def cpu_device() -> int:
    import llama_cpp

    llama_cpp.llama_backend_init()
    dev = _fn("ggml", "ggml_backend_dev_by_type", ctypes.c_void_p, ctypes.c_int)(_DEV_CPU)
    if not dev:
        raise R7BError("llama.cpp has no CPU device")
    return dev


# -- endpoints -----------------------------------------------------------------------------------

def parse_endpoints(value: str | Sequence[str] | None) -> list[str]:
    """'host:port,host:port' (or a list) -> ['host:port', ...]; one R7BError line on a bad entry."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    out = []
    for item in (str(i).strip() for i in items):
        if not item:
            continue
        host, sep, port = item.rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise R7BError(f"bad RPC worker address {item!r}: expected HOST:PORT, e.g. 192.168.1.20:{DEFAULT_PORT}")
        out.append(f"{host}:{int(port)}")
    if len(set(out)) != len(out):
        raise R7BError(f"an RPC worker is listed twice in {','.join(out)}")
    if len(out) > 16:
        raise R7BError("at most 16 RPC workers")
    return out


def parse_split(value: str | Sequence[float] | None) -> list[float] | None:
    """'3,1,1' -> [3.0, 1.0, 1.0]: proportions for this machine, then each worker in --rpc order."""
    if value is None or value == "":
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    try:
        out = [float(x) for x in items]
    except ValueError:
        raise R7BError(f"bad tensor split {value!r}: expected numbers like 2,1,1") from None
    if any(x < 0 or x != x for x in out) or sum(out) <= 0:
        raise R7BError(f"bad tensor split {value!r}: proportions must be non-negative and not all zero")
    return out


def probe(endpoint: str, timeout: float = 5.0) -> tuple[int, int, int]:
    """Connect and exchange the protocol's HELLO; the worker's (major, minor, patch), or one R7BError line.

    llama.cpp itself aborts the whole process when a worker is missing, so nothing reaches it
    before this has passed. A worker busy with another client accepts the connection but does not
    answer until that client leaves: that is reported as such after `timeout` seconds.
    """
    host, _, port = endpoint.rpartition(":")
    try:
        sock = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout)
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise R7BError(f"RPC worker {endpoint} is unreachable: {reason} (is `r7b worker` running there?)") from None
    with sock:
        try:
            sock.sendall(struct.pack("<BQ", _HELLO, _CAPS) + bytes(_CAPS))
            head = _recv(sock, 8)
            size = struct.unpack("<Q", head)[0]
            body = _recv(sock, size) if 4 <= size <= 1024 else b""
        except socket.timeout:
            raise R7BError(f"RPC worker {endpoint} accepted the connection but did not answer within {timeout:g} s "
                           "(a worker serves one client at a time: is another machine using it?)") from None
        except OSError as exc:
            raise R7BError(f"RPC worker {endpoint} closed the connection during the handshake ({exc}); is it an "
                           "`r7b worker` of the same llama.cpp build?") from None
    if len(body) < 3:
        raise R7BError(f"{endpoint} does not speak llama.cpp's RPC protocol")
    major, minor, patch = body[0], body[1], body[2]
    if major != PROTO_MAJOR:
        raise R7BError(f"RPC worker {endpoint} speaks protocol {major}.{minor}.{patch}, this machine {PROTO_MAJOR}.x: "
                       "run the same r7b-edge / llama-cpp-python version on every machine")
    return major, minor, patch


def _recv(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionResetError("connection closed")
        data += chunk
    return data


def add_worker(endpoint: str, timeout: float = 5.0, *, probed: bool = False) -> int:
    """The device of the worker at `endpoint` (probed first unless `probed`; connected once per process)."""
    _require()
    if endpoint in _devices:
        return _devices[endpoint]
    if endpoint not in _probed and not probed:
        probe(endpoint, timeout)
    cpu_device()  # the backend is initialised and the registry filled
    add = _rpc_proc("ggml_backend_rpc_add_server", ctypes.c_void_p, ctypes.c_char_p)
    _probed.add(endpoint)  # from here on this process holds the worker's one connection
    reg = add(endpoint.encode())
    if not reg:
        raise R7BError(f"RPC worker {endpoint} offers no device")
    count = _fn("ggml-base", "ggml_backend_reg_dev_count", ctypes.c_size_t, ctypes.c_void_p)(reg)
    if count < 1:
        raise R7BError(f"RPC worker {endpoint} offers no device")
    dev = _fn("ggml-base", "ggml_backend_reg_dev_get", ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)(reg, 0)
    _devices[endpoint] = dev
    return dev


# -- placement -----------------------------------------------------------------------------------

class _BuftOverride(ctypes.Structure):
    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


@dataclass
class Placement:
    """Where a model's layers go: the local CPU first, then each worker, as llama.cpp will place them.

    The blocks are counted out first (`blocks`: this machine's come first, then each worker's in
    order); `n_gpu_layers` and `llama_split` then make llama.cpp's own rule (the first
    `n_layers + 1 - n_gpu_layers` units on the CPU, the others shared by cumulative `tensor_split`,
    the output layer counting as one unit) place exactly those, so the memory check counts what
    each device will hold.

    llama.cpp would put the output layer on the last device; `output_local` keeps its tensors on
    this CPU (a tensor buffer-type override) so that per token the network carries one hidden-state
    vector back (16 KiB for R7B in f32) instead of the logits (1000 KiB for a 256k vocabulary).
    """

    endpoints: list[str]
    devices: list[int]
    shares: list[float]  # this machine, then each worker; sums to 1
    free: list[int]  # free bytes: this machine, then each worker (as reported over RPC)
    n_layers: int
    output_local: bool = True  # keep the output layer here: a hidden-state vector crosses the network, not the logits
    _keep: list[Any] = field(default_factory=list, repr=False)

    @property
    def names(self) -> list[str]:
        return ["this machine (CPU)"] + [f"worker {e}" for e in self.endpoints]

    @property
    def blocks(self) -> list[int]:
        """Blocks per device (this machine first): `shares` of n_layers, rounded by largest remainder."""
        raw = [s * self.n_layers for s in self.shares]
        out = [int(x) for x in raw]
        by_remainder = sorted(range(len(raw)), key=lambda i: (out[i] - raw[i], i))
        for i in by_remainder[:self.n_layers - sum(out)]:
            out[i] += 1
        return out

    @property
    def n_gpu_layers(self) -> int:
        """llama.cpp's count of offloaded units: the remote blocks plus the output layer."""
        local = self.blocks[0]
        return 0 if local >= self.n_layers else self.n_layers - local + 1

    def llama_split(self) -> list[float]:
        """`tensor_split` for llama.cpp that gives each worker exactly its blocks.

        llama.cpp sends unit j of the n_gpu_layers offloaded ones to the first device whose
        cumulative split exceeds j / n_gpu_layers; with the block counts as proportions and the
        output unit added to the last device, device i gets blocks B(i-1) .. B(i)-1 exactly.
        """
        remote = [float(b) for b in self.blocks[1:]]
        remote[-1] += 1.0
        return remote

    def layer_device(self, il: int) -> int:
        """0 for the local CPU, i for the i-th worker; il == n_layers is the output layer."""
        if il >= self.n_layers:
            return 0 if self.output_local or self.n_gpu_layers == 0 else len(self.devices)
        acc = 0
        for i, b in enumerate(self.blocks):
            acc += b
            if il < acc:
                return i
        return len(self.devices)

    def layers(self) -> list[list[int]]:
        """Block indices per device (the output layer, index n_layers, included)."""
        out: list[list[int]] = [[] for _ in self.shares]
        for il in range(self.n_layers + 1):
            out[self.layer_device(il)].append(il)
        return out

    def describe(self) -> str:
        return "; ".join(f"{name}: {len([i for i in ls if i < self.n_layers])} layers"
                         + (" + output" if self.n_layers in ls else "")
                         for name, ls in zip(self.names, self.layers()))

    def configure(self, params: Any) -> None:
        """Set `llama_model_params` so llama.cpp places the layers as planned."""
        import llama_cpp

        devs = (ctypes.c_void_p * (len(self.devices) + 1))(*self.devices, None)
        split = (ctypes.c_float * llama_cpp.llama_max_devices())(*self.llama_split())
        self._keep = [devs, split]
        if self.output_local and self.n_gpu_layers > 0:
            cpu_buft = _fn("ggml-base", "ggml_backend_dev_buffer_type", ctypes.c_void_p, ctypes.c_void_p)(cpu_device())
            pattern = ctypes.c_char_p(b"^(output|token_embd)")  # tied weights: token_embd is the output
            overrides = (_BuftOverride * 2)(_BuftOverride(pattern.value, cpu_buft), _BuftOverride(None, None))
            self._keep += [pattern, overrides]
            params.tensor_buft_overrides = ctypes.cast(overrides, ctypes.c_void_p)
        params.devices = ctypes.cast(devs, ctypes.c_void_p)
        params.n_gpu_layers = self.n_gpu_layers
        params.tensor_split = split


def plan(endpoints: Sequence[str], n_layers: int, tensor_split: Sequence[float] | None = None,
         local_free: int | None = None) -> Placement:
    """Connect to the workers and share the layers: by `tensor_split` (this machine first), else by free memory."""
    endpoints = parse_endpoints(endpoints)
    if not endpoints:
        raise R7BError("no RPC workers given")
    for e in endpoints:  # every worker is checked before any connection that could abort the process
        if e not in _probed:
            probe(e)
    devices = [add_worker(e, probed=True) for e in endpoints]
    if local_free is None:
        from r7b.memory import available_memory

        local_free = available_memory()
    free = [int(local_free)] + [device_memory(d)[0] for d in devices]
    if tensor_split is not None:
        split = parse_split(tensor_split)
        if len(split) != len(endpoints) + 1:
            raise R7BError(f"--tensor-split needs {len(endpoints) + 1} proportions (this machine, then each of the "
                           f"{len(endpoints)} workers), got {len(split)}")
    else:
        split = [float(f) for f in free]
        if sum(split) <= 0:
            split = [1.0] * len(free)
    total = sum(split)
    return Placement(endpoints, devices, [s / total for s in split], free, n_layers)


# -- the worker side -----------------------------------------------------------------------------

def start_server(endpoint: str, *, n_threads: int, cache_dir: str | None = None) -> None:
    """Serve this machine's CPU device on `endpoint`; blocks for as long as the server runs."""
    _require()
    dev = cpu_device()
    start = _rpc_proc("ggml_backend_rpc_start_server", None, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t,
                      ctypes.c_size_t, ctypes.POINTER(ctypes.c_void_p))
    devs = (ctypes.c_void_p * 1)(dev)
    start(endpoint.encode(), cache_dir.encode() if cache_dir else None, n_threads, 1, devs)

"""A model split over RPC workers, run in a supervised child process so a lost worker costs one answer.

When an RPC worker goes away, llama.cpp aborts the process that holds the connection (SIGABRT),
on decode as on free. `r7b serve --rpc` must outlive that, so the model runs in a 'spawn' child
process: the parent sends each request there and passes on the events it streams back. If the
child dies, the request being answered fails with one R7BError naming the worker that dropped,
and the next request starts a fresh child, which probes the workers first and answers "cannot"
(one line) while one of them is still unreachable.

`RemoteModel` offers what the server's scheduler uses of a `Model`: `path`, `engine.n_ctx`,
`engine.metadata(key)`, `prepare(request)`, `generate(prompt, sampling)`, `chat(...)` and `close()`.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
from pathlib import Path
from typing import Any, Iterator

from r7b import rpc
from r7b.errors import R7BError

from .model import Model
from .request import RequestError
from .turn import TurnAPI

METADATA_KEYS = ("general.name", "general.architecture", "general.file_type")


class WorkerLost(R7BError):
    """The engine process died, or cannot start, because an RPC worker is unreachable."""

    code = "rpc_worker_unavailable"
    param = None


# -- the child ---------------------------------------------------------------------------------------

def _error(exc: BaseException) -> tuple:
    return (type(exc).__name__, str(exc), getattr(exc, "param", None), getattr(exc, "code", None),
            isinstance(exc, RequestError), isinstance(exc, R7BError))


def _child(conn: Any, path: str, kwargs: dict) -> None:
    os.environ["GGML_NO_BACKTRACE"] = "1"  # no gdb attached to print a backtrace when llama.cpp aborts
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    try:
        model = Model.load(path, **kwargs)
    except BaseException as exc:
        conn.send(("error", _error(exc)))
        return
    engine = model.engine
    conn.send(("ready", {"n_ctx": engine.n_ctx, "metadata": {k: engine.metadata(k) for k in METADATA_KEYS},
                         "placement": engine.placement.describe() if engine.placement is not None else ""}))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            break
        op = msg[0]
        if op == "close":
            break
        try:
            if op == "prepare":
                conn.send(("ok", model.prepare(msg[1])))
            elif op == "generate":
                _stream(conn, model.generate(msg[1], msg[2]))
        except Exception as exc:
            conn.send(("error", _error(exc)))
    model.close()
    conn.send(("closed", None))


def _stream(conn: Any, events: Iterator[object]) -> None:
    try:
        for event in events:
            conn.send(("event", event))
            if conn.poll() and conn.recv()[0] == "stop":
                break
    finally:
        events.close()
    conn.send(("end", None))


# -- the parent --------------------------------------------------------------------------------------

class RemoteEngine:
    """The few engine facts the server reads, fetched from the child when it starts."""

    def __init__(self, info: dict):
        self.n_ctx = info["n_ctx"]
        self._metadata = info["metadata"]
        self.placement = info["placement"]

    def metadata(self, key: str) -> str | None:
        return self._metadata.get(key)


class RemoteModel(TurnAPI):
    """A `Model` loaded in a supervised child process (see the module docstring). One call at a time."""

    def __init__(self, path: str | os.PathLike, kwargs: dict):
        self.path = Path(path)
        self._kwargs = {k: v for k, v in kwargs.items() if k != "isolate"}
        self._endpoints: list[str] = list(self._kwargs.get("rpc") or [])
        self._lock = threading.RLock()
        self._proc: Any = None
        self._conn: Any = None
        self.engine: RemoteEngine | None = None
        self.restarts = 0
        self._start()

    @classmethod
    def start(cls, path: str | os.PathLike, **kwargs: Any) -> "RemoteModel":
        return cls(path, kwargs)

    # -- the child's life ----------------------------------------------------------------------------

    def _start(self) -> None:
        for endpoint in self._endpoints:  # no child holds the workers now, so they answer at once
            rpc.probe(endpoint, timeout=3.0)
        ctx = mp.get_context("spawn")
        conn, child_conn = ctx.Pipe()
        proc = ctx.Process(target=_child, args=(child_conn, str(self.path), self._kwargs), daemon=True,
                           name="r7b-rpc-engine")
        proc.start()
        child_conn.close()
        self._proc, self._conn = proc, conn
        try:
            status, payload = self._conn.recv()
        except (EOFError, OSError):
            self._proc.join(5)
            code = self._proc.exitcode
            self._reap()
            raise R7BError(f"the engine process for {self.path.name} died while loading ({_how(code)})") from None
        if status == "error":
            self._reap()
            raise _rebuild(payload)
        self.engine = RemoteEngine(payload)

    def _alive(self) -> bool:
        return self._proc is not None and self._proc.is_alive()

    def _ensure(self) -> None:
        if not self._alive():
            self._reap()
            self.restarts += 1
            try:
                self._start()
            except WorkerLost:
                raise
            except R7BError as exc:
                raise WorkerLost(f"cannot answer: {exc}") from None

    def _recv(self) -> tuple[str, Any]:
        try:
            return self._conn.recv()
        except (EOFError, OSError):
            raise self._lost() from None

    def _lost(self) -> WorkerLost:
        """The child died: say how, and which worker no longer answers."""
        self._proc.join(5)
        code = self._proc.exitcode
        how = _how(code)
        self._reap()
        gone = []
        for endpoint in self._endpoints:
            try:
                rpc.probe(endpoint, timeout=1.0)
            except R7BError:
                gone.append(endpoint)
        who = (f"RPC worker {', '.join(gone)} dropped" if gone
               else f"an RPC worker ({', '.join(self._endpoints)}) failed")
        return WorkerLost(f"{who}: the engine process stopped ({how}); the next request reconnects")

    def _reap(self) -> None:
        if self._conn is not None:
            self._conn.close()
        if self._proc is not None:
            self._proc.join(0.5)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(2)
        self._proc = self._conn = None

    def close(self) -> None:
        with self._lock:
            if self._alive():
                try:
                    self._conn.send(("close", None))
                    if self._conn.poll(10):
                        self._conn.recv()
                except (EOFError, OSError):
                    pass
            self._reap()

    def __enter__(self) -> "RemoteModel":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- what the scheduler calls --------------------------------------------------------------------

    def prepare(self, request: Any) -> Any:
        with self._lock:
            self._ensure()
            self._conn.send(("prepare", request))
            status, payload = self._recv()
        if status == "error":
            raise _rebuild(payload)
        return payload

    def generate(self, prompt: Any, sampling: dict[str, Any]) -> Iterator[object]:
        with self._lock:
            self._ensure()
            self._conn.send(("generate", prompt, sampling))
            done = False
            try:
                while True:
                    status, payload = self._recv()
                    if status == "event":
                        yield payload
                        continue
                    done = True
                    if status == "error":
                        raise _rebuild(payload)
                    return
            finally:
                if not done and self._alive():  # the caller stopped early: stop the child, drop what is in flight
                    try:
                        self._conn.send(("stop", None))
                        while self._conn.recv()[0] == "event":
                            pass
                    except (EOFError, OSError):
                        pass



def _how(code: int | None) -> str:
    try:
        return f"signal {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
    except ValueError:
        return f"signal {-code}"


def _rebuild(payload: tuple) -> Exception:
    name, message, param, code, is_request, is_r7b = payload
    if is_request:
        return RequestError(message, param=param, code=code)
    if is_r7b:
        return R7BError(message)
    return RuntimeError(f"{name}: {message}")


def load_model(path: str | os.PathLike, *, isolate: bool = False, **kwargs: Any) -> "Model | RemoteModel":
    """`Model.load(path, **kwargs)`, or with `isolate` and RPC workers, the same model in a supervised child."""
    if isolate and kwargs.get("rpc"):
        return RemoteModel.start(path, **kwargs)
    return Model.load(path, **kwargs)

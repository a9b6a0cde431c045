"""Render untrusted chat templates (those read from model files) in a separate, locked-down process.

The sandbox (sandbox.py) checks its time and memory limits between template lines, so one builtin
call (`'x'|center(1500000000)`) can run past both. Here the render runs in a worker process that
holds hard OS limits, and the parent enforces the time limit with a clock of its own:

- memory: RLIMIT_AS (address space) = the worker's size after start-up + UNTRUSTED_MEMORY + 64 MiB,
  so a huge allocation fails at once with MemoryError (RLIMIT_DATA too, where RLIMIT_AS is refused);
- time: the parent waits `seconds` + KILL_GRACE for the answer, then kills the worker; RLIMIT_CPU
  backs this up should the parent itself stall (the worker is recycled before it nears it);
- files and network: once started the worker closes every descriptor but its two pipes (and
  /proc/self/statm, for the sandbox's own memory check), then sets RLIMIT_NOFILE to that count, so
  it cannot open a file or a socket; RLIMIT_FSIZE 0 (no file may grow), RLIMIT_CORE 0, and
  RLIMIT_NPROC 0 (no new process, where the user is not root); on Linux it also enters a new,
  empty network namespace when the kernel allows it.
- answers are JSON (never pickle) and at most MAX_REPLY_BYTES (8 MiB), so a hostile worker cannot
  make the parent run code or hold much memory.

One worker serves a loaded model (`Model` owns one when it renders a file's templates) and is
reused, so a render costs a round trip of about a millisecond. A template that breaks a limit
gets a one-line TemplateError and its worker is replaced; the next request gets a fresh one.
The sandbox's in-process checks still run inside the worker as a second layer.

Platforms: the resource limits are POSIX (Linux enforces all of them; macOS does not enforce
RLIMIT_AS/RLIMIT_DATA, so there memory is bounded only by the sandbox's line checks); Windows
has no `resource` module: the worker still runs apart and is killed at its time limit, but its
memory, files and network are not limited by the OS. See SECURITY.md.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
from typing import Any

from .sandbox import UNTRUSTED_MEMORY, UNTRUSTED_SECONDS, TemplateError, TemplateLimitError, plain_copy, render

KILL_GRACE = 0.5  # seconds the parent waits past a render's limit before it kills the worker
START_SECONDS = 30.0  # for the worker to start and lock itself down
MAX_REPLY_BYTES = 8 * 1024**2  # a rendered prompt larger than this (as JSON) is refused: 2M tokens or more
MEMORY_HEADROOM = 64 * 1024**2  # address space above UNTRUSTED_MEMORY, for the interpreter's own needs
CPU_SECONDS = 30  # RLIMIT_CPU of a worker (bounds an orphan's spin); it is replaced once it has used half
_HEADER = struct.Struct(">Q")


# -- the parent's side ---------------------------------------------------------------------


class TemplateWorker:
    """A long-lived process that renders untrusted templates; restarted whenever one breaks a limit.

    `origin` (the model file) prefixes every error. Thread-safe: renders take turns.
    """

    def __init__(self, origin: str | os.PathLike | None = None):
        self.origin = str(origin) if origin is not None else None
        self.restarts = 0  # workers replaced after a template broke a limit or the worker died
        self.limits: dict[str, Any] = {}  # what the current worker managed to lock down
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self._closed = False

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def render(self, source: str, label: str, variables: dict[str, Any], *,
               seconds: float = UNTRUSTED_SECONDS) -> str:
        """Render `source` with plain-JSON `variables` in the worker; any failure is a TemplateError."""
        with self._lock:
            try:
                return self._render(source, label, variables, seconds)
            except TemplateError as exc:
                if self.origin and not str(exc).startswith(self.origin):
                    raise type(exc)(f"{self.origin}: {exc}") from None
                raise

    def probe(self) -> dict[str, Any]:
        """What the worker is allowed to do: each check is 'refused: ...' or 'allowed' (for tests)."""
        with self._lock:
            return self._call({"op": "probe"}, "probe", START_SECONDS)

    def close(self) -> None:
        """Stop the worker for good (idempotent); a later render is refused."""
        with self._lock:
            self._closed = True
            self._stop()

    def __del__(self) -> None:  # a worker nobody closed (a load that failed later, say) ends with its owner
        proc = getattr(self, "_proc", None)
        if proc is not None:
            try:
                _kill(proc)
            except Exception:  # noqa: BLE001 -- at interpreter exit anything may be gone
                pass

    def __enter__(self) -> "TemplateWorker":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # internals

    def _render(self, source: str, label: str, variables: dict[str, Any], seconds: float) -> str:
        try:
            request = json.dumps({"op": "render", "source": source, "label": label, "variables": variables,
                                  "seconds": seconds}).encode()  # ASCII: lone surrogates travel as escapes
        except (TypeError, ValueError) as exc:
            raise TemplateError(f"template variables cannot be sent to the template worker: {exc}") from None
        reply = self._call_raw(request, label, seconds)
        if "error" in reply:
            if reply.get("limit"):
                self._stop(restarted=True)  # the worker exits by itself; make sure of it
                raise TemplateLimitError(str(reply["error"])[:2000])
            raise TemplateError(str(reply["error"])[:2000])
        text = reply.get("text")
        if not isinstance(text, str):
            self._stop(restarted=True)
            raise TemplateError(f"{label} failed: the template worker sent a malformed answer")
        cpu = reply.get("cpu")
        if not isinstance(cpu, (int, float)) or cpu > CPU_SECONDS / 2:
            self._stop()  # replaced long before RLIMIT_CPU could stop an innocent render
        return text

    def _call(self, message: dict[str, Any], label: str, seconds: float) -> dict[str, Any]:
        return self._call_raw(json.dumps(message).encode(), label, seconds)

    def _call_raw(self, request: bytes, label: str, seconds: float) -> dict[str, Any]:
        for attempt in (0, 1):
            proc = self._ensure()
            try:
                _write_message(proc, request)
            except OSError:  # the worker died between requests (killed from outside): start another
                self._stop(restarted=True)
                if attempt:
                    raise TemplateError(f"{label} failed: the template worker does not accept requests") from None
                continue
            return self._answer(proc, label, seconds)
        raise AssertionError("unreachable")

    def _answer(self, proc: subprocess.Popen, label: str, seconds: float) -> dict[str, Any]:
        deadline = time.monotonic() + seconds + KILL_GRACE
        try:
            blob = _read_message(proc, deadline)
        except _Timeout:
            self._stop(restarted=True)
            raise TemplateLimitError(f"{label} ran for more than {seconds:g} s and was stopped") from None
        except _TooLarge:
            self._stop(restarted=True)
            raise TemplateLimitError(f"{label} produced more than {MAX_REPLY_BYTES >> 20} MiB and was stopped") \
                from None
        except EOFError:
            status = self._stop(restarted=True)
            raise TemplateLimitError(f"{label} stopped the template worker ({_describe(status)})") from None
        try:
            reply = json.loads(blob)
        except (ValueError, RecursionError):
            reply = None
        if not isinstance(reply, dict):
            self._stop(restarted=True)
            raise TemplateError(f"{label} failed: the template worker sent a malformed answer")
        return reply

    def _ensure(self) -> subprocess.Popen:
        if self._proc is not None and self._proc.poll() is None:
            return self._proc
        if self._closed:
            raise TemplateError("the template worker was closed (the model was closed?)")
        self._proc = None
        proc = _spawn()
        try:
            ready = json.loads(_read_message(proc, time.monotonic() + START_SECONDS))
        except (_Timeout, _TooLarge, EOFError, ValueError):
            _kill(proc)
            raise TemplateError("the template worker process could not start") from None
        self._proc, self.limits = proc, ready.get("limits", {}) if isinstance(ready, dict) else {}
        return proc

    def _stop(self, restarted: bool = False) -> int | None:
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        if restarted:
            self.restarts += 1
        return _kill(proc)


def _spawn() -> subprocess.Popen:
    """The worker: this interpreter, isolated (-I) but with this process's import path."""
    path = [os.path.abspath(p) for p in sys.path if p]
    code = (f"import sys; sys.path[:] = {path!r}; "
            "from r7b.runtime.template_worker import serve; serve()")
    # What the interpreter itself may need to start, and no more (no tokens or keys from this process).
    env = {k: v for k, v in os.environ.items()
           if k in ("PATH", "SYSTEMROOT", "LANG", "LC_ALL", "TZ", "LD_LIBRARY_PATH", "DYLD_LIBRARY_PATH",
                    "DYLD_FALLBACK_LIBRARY_PATH")}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    kwargs: dict[str, Any] = {}
    if os.name == "posix":
        kwargs["start_new_session"] = True  # a Ctrl-C in the terminal is the parent's business
    return subprocess.Popen([sys.executable, "-I", "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, close_fds=True, cwd=os.path.abspath(os.sep), env=env,
                            bufsize=0, **kwargs)


def _kill(proc: subprocess.Popen) -> int | None:
    for stream in (proc.stdin, proc.stdout):
        try:
            stream.close()  # type: ignore[union-attr]
        except OSError:
            pass
    if proc.poll() is None:
        proc.kill()
    try:
        return proc.wait(timeout=10)
    except subprocess.TimeoutExpired:  # pragma: no cover - a kill is not refused
        return None


def _describe(status: int | None) -> str:
    if status is not None and status < 0:
        try:
            return f"killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"killed by signal {-status}"
    return f"exit status {status}"


class _Timeout(Exception):
    pass


class _TooLarge(Exception):
    pass


def _write_message(proc: subprocess.Popen, blob: bytes) -> None:
    fd = proc.stdin.fileno()  # type: ignore[union-attr]
    data = memoryview(_HEADER.pack(len(blob)) + blob)
    while data:
        data = data[os.write(fd, data):]


def _read_message(proc: subprocess.Popen, deadline: float) -> bytes:
    """One framed message from the worker, or _Timeout at `deadline`, _TooLarge, EOFError."""
    fd = proc.stdout.fileno()  # type: ignore[union-attr]
    header = _read_exactly(fd, _HEADER.size, deadline)
    (size,) = _HEADER.unpack(header)
    if size > MAX_REPLY_BYTES:
        raise _TooLarge()
    return _read_exactly(fd, size, deadline)


if os.name == "posix":
    import select

    def _read_exactly(fd: int, n: int, deadline: float) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise _Timeout()
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(fd, min(n - len(buf), 1 << 20))
            if not chunk:
                raise EOFError()
            buf += chunk
        return buf  # type: ignore[return-value] -- json.loads takes a bytearray; no copy
else:  # Windows: select() does not take pipes; a helper thread reads while this one waits

    def _read_exactly(fd: int, n: int, deadline: float) -> bytes:
        box: list[Any] = []

        def read() -> None:
            buf = bytearray()
            try:
                while len(buf) < n:
                    chunk = os.read(fd, min(n - len(buf), 1 << 20))
                    if not chunk:
                        box.append(EOFError())
                        return
                    buf += chunk
                box.append(bytes(buf))
            except OSError:
                box.append(EOFError())

        thread = threading.Thread(target=read, daemon=True)
        thread.start()
        thread.join(max(0.0, deadline - time.monotonic()))
        if not box:
            raise _Timeout()  # the caller kills the worker, which ends the read
        if isinstance(box[0], Exception):
            raise box[0]
        return box[0]


_shared: TemplateWorker | None = None
_shared_lock = threading.Lock()


def shared_worker() -> TemplateWorker:
    """This process's worker for `render_template_source` (a Model uses its own)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = TemplateWorker()
            atexit.register(_shared.close)
        return _shared


# -- the worker's side ---------------------------------------------------------------------


def serve() -> None:
    """The worker's loop: read a request, render it, answer; exit at end of input or after a limit."""
    from . import sandbox

    out = os.dup(1)  # answers go through a descriptor of our own; fd 1 becomes /dev/null below
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 1)
    os.close(null)
    sys.stdout = sys.stderr
    _warm_up(sandbox)
    limits = _lock_down(sandbox, keep=(0, 1, 2, out))
    _send(out, {"ready": True, "limits": limits})
    while True:
        try:
            request = _receive(0)
        except EOFError:
            return
        reply, leave = _handle(sandbox, request)
        try:
            blob = json.dumps(reply).encode()  # ASCII, so any str (lone surrogates too) survives
        except MemoryError:
            blob = b""
        if not blob or len(blob) > MAX_REPLY_BYTES:
            label = str(request.get("label", "chat template")) if isinstance(request, dict) else "chat template"
            blob, leave = json.dumps({"error": f"{label} produced more than {MAX_REPLY_BYTES >> 20} MiB and was "
                                               "stopped", "limit": True}).encode(), True
        _send_blob(out, blob)
        if leave:
            os._exit(0)


def _handle(sandbox: Any, request: Any) -> tuple[dict[str, Any], bool]:
    """(answer, whether this worker must now exit)."""
    if not isinstance(request, dict):
        return {"error": "malformed request"}, True
    if request.get("op") == "probe":
        return _probe(), False
    label = str(request.get("label", "chat template"))
    try:
        text = sandbox.render(request["source"], label, request["variables"], seconds=float(request["seconds"]))
        if len(text) > MAX_REPLY_BYTES:  # each character takes at least a byte once encoded
            return {"error": f"{label} produced more than {MAX_REPLY_BYTES >> 20} MiB and was stopped",
                    "limit": True}, True
        return {"text": text, "cpu": time.process_time()}, False
    except TemplateLimitError as exc:
        return {"error": str(exc), "limit": True}, True
    except TemplateError as exc:
        return {"error": str(exc)}, False
    except MemoryError:
        return {"error": f"{label} used more than {UNTRUSTED_MEMORY >> 20} MiB of memory and was stopped",
                "limit": True}, True
    except BaseException as exc:  # noqa: BLE001 -- the worker answers whatever happens
        return {"error": f"{label} failed: {type(exc).__name__}", "limit": True}, True


def _warm_up(sandbox: Any) -> None:
    """Import and touch everything a template may need, before files can no longer be opened."""
    import datetime  # noqa: F401
    import random  # noqa: F401
    import socket  # noqa: F401 -- for `probe` only
    import tempfile  # noqa: F401 -- for `probe` only
    import textwrap  # noqa: F401
    import urllib.parse  # noqa: F401

    sample = ("{{ messages|tojson }}{{ 'a b'|wordwrap(2) }}{{ 'x'|urlencode }}{{ 'x'|truncate(5) }}"
              "{{ [1, 2]|batch(1)|list }}{{ [1, 2]|slice(1)|list }}{{ [1]|random }}{{ 'x'|center(3) }}"
              "{{ '%s'|format(1) }}{{ 'a'|indent(2) }}{{ [1]|sum }}{{ 'x'|title|capitalize|trim }}"
              "{{ {'a': 1}|dictsort }}{{ 'x'|replace('x', 'y') }}{{ 3|filesizeformat }}{{ 'x'|wordcount }}"
              "{{ 1.5|round|int }}{{ 'x'|striptags|escape|forceescape }}{{ 'x'|urlize }}"
              "{{ strftime_now('%Y-%m-%d %H:%M %Z') }}{{ [3, 1]|sort|unique|list|max }}{{ [1]|map('string')|join }}")
    sandbox.render(sample, "warm-up", {"messages": [{"role": "user", "content": "hi"}]}, seconds=UNTRUSTED_SECONDS)
    for failing in ("{{ raise_exception('x') }}", "{% if %}", "{{ x.y.z }}", "{{ ''.__class__ }}", "{{ 1 // 0 }}",
                    "{% for a in range(10**9) %}{% endfor %}", "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}"):
        try:  # Jinja imports its traceback rewriting (jinja2.debug) on the first error
            sandbox.render(failing, "warm-up", {}, seconds=0.2)
        except TemplateError:
            pass
    sandbox.hold_statm()


def _lock_down(sandbox: Any, keep: tuple[int, ...]) -> dict[str, Any]:
    """Apply the OS limits this platform offers; returns what was set or why not (for `probe`)."""
    done: dict[str, Any] = {}
    held = sandbox._HELD_STATM
    keep = tuple(sorted({*keep, *(() if held is None else (held,))}))
    done["network"] = _leave_network()
    _close_other_fds(keep)
    try:
        import resource
    except ImportError:  # Windows
        done["resource"] = "unavailable"
        return done

    def limit(name: str, value: int) -> None:
        which = getattr(resource, name, None)
        if which is None:
            done[name] = "unavailable"
            return
        try:
            _soft, hard = resource.getrlimit(which)
            value = value if hard == resource.RLIM_INFINITY else min(value, hard)
            resource.setrlimit(which, (value, value))
            done[name] = value
        except (ValueError, OSError) as exc:
            done[name] = f"refused: {exc}"

    size = _virtual_size()
    if size is not None:
        limit("RLIMIT_AS", size + UNTRUSTED_MEMORY + MEMORY_HEADROOM)
    if sys.platform != "linux" or size is None:  # Linux: RLIMIT_AS covers it (RLIMIT_DATA would double-count)
        limit("RLIMIT_DATA", (size or 0) + UNTRUSTED_MEMORY + MEMORY_HEADROOM)
    limit("RLIMIT_CPU", int(time.process_time()) + CPU_SECONDS)
    limit("RLIMIT_CORE", 0)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past RLIMIT_FSIZE fails instead of killing
    limit("RLIMIT_FSIZE", 0)
    limit("RLIMIT_NPROC", 0)
    limit("RLIMIT_NOFILE", max(keep) + 1)
    return done


def _virtual_size() -> int | None:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _leave_network() -> str:
    """Linux: move into a new network namespace (no interfaces but a down loopback), if permitted."""
    if sys.platform != "linux":
        return "unavailable"
    import ctypes

    clone_newnet, clone_newuser = 0x40000000, 0x10000000
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        for flags in (clone_newnet, clone_newuser | clone_newnet):
            if libc.unshare(flags) == 0:
                return "new namespace"
        return f"refused: {os.strerror(ctypes.get_errno())}"
    except (OSError, AttributeError) as exc:
        return f"refused: {exc}"


def _close_other_fds(keep: tuple[int, ...]) -> None:
    low = 0
    for fd in keep:
        if fd > low:  # never an empty range: CPython 3.11's closerange(0, 0) closes every descriptor
            os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, 65536)


def _probe() -> dict[str, Any]:
    import socket
    import tempfile

    checks: dict[str, Any] = {}

    def attempt(name: str, action: Any) -> None:
        try:
            action()
            checks[name] = "allowed"
        except Exception as exc:  # noqa: BLE001
            checks[name] = f"refused: {type(exc).__name__}: {exc}"

    attempt("open_file", lambda: os.close(os.open(os.devnull, os.O_RDONLY)))
    attempt("create_file", lambda: tempfile.TemporaryFile())
    attempt("socket", lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM).close())
    attempt("allocate_1GiB", lambda: bytearray(1024**3))
    return {"checks": checks, "pid": os.getpid()}


def _send(fd: int, message: dict[str, Any]) -> None:
    _send_blob(fd, json.dumps(message).encode())


def _send_blob(fd: int, blob: bytes) -> None:
    data = memoryview(_HEADER.pack(len(blob)) + blob)
    while data:
        data = data[os.write(fd, data):]


def _receive(fd: int) -> Any:
    (size,) = _HEADER.unpack(_read_all(fd, _HEADER.size))
    return json.loads(_read_all(fd, size))


def _read_all(fd: int, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = os.read(fd, min(n - len(buf), 1 << 20))
        if not chunk:
            raise EOFError()
        buf += chunk
    return bytes(buf)


def render_template_source(source: str, *, seconds: float | None = UNTRUSTED_SECONDS, **variables: Any) -> str:
    """Render any template string (for example one read from a GGUF file) in the sandbox.

    Variables are first copied into plain JSON values, so the template cannot call methods of
    whatever objects the caller had. Code execution and data access are blocked, sizes are
    capped, and the render is stopped after `seconds`. With a limit, the render runs in this
    process's shared template worker (template_worker.py), a separate process under OS limits;
    `seconds=None` renders here, with no time or memory limit (for trusted templates only).
    """
    if not isinstance(source, str):
        raise TemplateError("a chat template must be a string")
    variables = plain_copy(variables, "template variables")
    if seconds is None:
        return render(source, "chat template", variables)
    return shared_worker().render(source, "chat template", variables, seconds=seconds)

"""The Jinja sandbox every chat template renders in, ours and those read from model files alike.

It is configured like transformers' chat-template environment, minus the globals no chat template
needs, and fails loudly: a blocked attribute raises instead of printing as "". Templates from
files are untrusted code, so they also render under a time limit.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from typing import Any, Iterator

import jinja2
from jinja2.exceptions import SecurityError
from jinja2.ext import loopcontrols
from jinja2.filters import do_attr
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

from r7b.errors import R7BError

MAX_REPEAT_ITEMS = 1_000_000  # `"x" * n` and `[x] * n` in a template
MAX_POWER_EXPONENT = 1024  # `a ** n`
# Limits for templates read from files: ours render in milliseconds and a few MiB.
UNTRUSTED_SECONDS = 2.0
UNTRUSTED_MEMORY = 256 * 1024**2
_MIN_JINJA = (3, 1, 6)  # earlier versions have known sandbox escapes


class TemplateError(R7BError):
    """A prompt could not be rendered: bad input, a template that failed, or one that was unsafe."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()) or "the chat template failed")


class TemplateLimitError(TemplateError):
    """A template that ran past its time or memory limit (a process rendering it should be replaced)."""


# -- the sandbox ---------------------------------------------------------------------------


def _is_private(name: Any) -> bool:
    return isinstance(name, str) and name.startswith("_")


def _refuse_private(obj: Any, name: Any) -> None:
    """Underscore names reach Python internals; only a mapping's own data keys may use them."""
    if _is_private(name) and not (isinstance(obj, Mapping) and name in obj):
        raise SecurityError(f"a chat template may not access {name!r}")


class _Sandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox, made to fail loudly instead of yielding empty strings.

    Stock Jinja turns a blocked attribute into an undefined value that prints as "", so a probing
    template renders quietly. Here any private name or unsafe attribute raises at once.
    """

    intercepted_binops = frozenset({"*", "**"})

    def getattr(self, obj: Any, attribute: str) -> Any:
        _refuse_private(obj, attribute)
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        _refuse_private(obj, argument)
        return super().getitem(obj, argument)

    def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
        raise SecurityError(f"a chat template may not access {attribute!r} of a {type(obj).__name__}")

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        """Bound the two operators that turn a short template into gigabytes or hours."""
        if operator == "*":
            sized, count = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(sized, (str, bytes, bytearray, list, tuple)) and isinstance(count, int):
                if len(sized) * count > MAX_REPEAT_ITEMS:
                    raise SecurityError(f"a chat template may not build sequences over {MAX_REPEAT_ITEMS} items")
        elif operator == "**" and isinstance(right, int) and right > MAX_POWER_EXPONENT:
            raise SecurityError(f"a chat template may not raise to powers over {MAX_POWER_EXPONENT}")
        return super().call_binop(context, operator, left, right)


class _TemplateNamespace(Namespace):
    """`namespace()` for templates, refusing underscore names (they would shadow internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 -- Jinja's signature: `self` may be a key
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace.check_name(name)
        Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace.check_name(name)
        Namespace.__setitem__(self, name, value)

    @staticmethod
    def check_name(name: Any) -> None:
        if _is_private(name):
            raise SecurityError(f"a chat template may not store {name!r} in a namespace")


class _TemplateDict:
    """`dict()` for templates, without exposing the `dict` type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, keys: Any, value: Any = None) -> dict:
        return dict.fromkeys(keys, value)


def _raise_exception(message: Any) -> None:
    raise jinja2.TemplateError(str(message))


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    """transformers' `tojson`: plain `json.dumps`, non-ASCII kept, no HTML escaping."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@jinja2.pass_environment
def _attr(environment: jinja2.Environment, obj: Any, name: Any) -> Any:
    """`|attr` looks names up outside the sandbox's getattr, so it gets the same guard."""
    _refuse_private(obj, name)
    return do_attr(environment, obj, name)


@lru_cache(maxsize=1)
def _environment() -> _Sandbox:
    if _jinja_version() < _MIN_JINJA:
        raise TemplateError(f"jinja2 {jinja2.__version__} has known sandbox escapes; install jinja2>=3.1.6")
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    for name in ("cycler", "joiner", "lipsum"):
        env.globals.pop(name, None)
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now,
                       namespace=_TemplateNamespace, dict=_TemplateDict())
    env.filters.update(tojson=_tojson, attr=_attr)
    return env


def _jinja_version() -> tuple[int, ...]:
    return tuple(int(part) for part in jinja2.__version__.split(".")[:3] if part.isdigit())


@lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    return _environment().from_string(source)


class _OverLimit(Exception):
    """Raised inside template code that ran past its time or memory limit."""


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


_HELD_STATM: int | None = None  # set by the template worker, which may open no files once locked down


def hold_statm() -> None:
    """Keep /proc/self/statm open for good, so that memory checks need no new file descriptor."""
    global _HELD_STATM
    if _HELD_STATM is None:
        try:
            _HELD_STATM = os.open("/proc/self/statm", os.O_RDONLY)
        except OSError:
            pass


class _ResidentSize:
    """The process's resident size in bytes, read cheaply enough to check at every template line.

    Linux: /proc/self/statm through a file kept open. Elsewhere: the peak size from getrusage
    (KiB on Linux, bytes on macOS), which only says something once it passes the old peak.
    """

    def __init__(self) -> None:
        self._own = _HELD_STATM is None
        try:
            self._fd: int | None = os.open("/proc/self/statm", os.O_RDONLY) if self._own else _HELD_STATM
        except OSError:
            self._fd = None

    def __call__(self) -> int:
        if self._fd is not None:
            return int(os.pread(self._fd, 64, 0).split()[1]) * _PAGE
        try:
            import resource
        except ImportError:  # Windows: the memory limit goes unchecked, the time limit still holds
            return 0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024

    def close(self) -> None:
        if self._fd is not None and self._own:
            os.close(self._fd)


@contextlib.contextmanager
def _limits(seconds: float | None) -> Iterator[None]:
    """Stop template code that runs past `seconds` or grows the process by UNTRUSTED_MEMORY.

    Jinja compiles a template into Python functions whose file name is "<template>". A trace
    function on those frames (and only those) reads the clock and the resident size at every
    line they run, so a loop written to spin for hours or to double a string until the machine
    swaps raises instead. Size limits (MAX_REPEAT_ITEMS, Jinja's range cap) keep single builtin
    calls short.
    """
    if seconds is None:
        yield
        return
    resident = _ResidentSize()
    deadline, memory_cap = time.monotonic() + seconds, resident() + UNTRUSTED_MEMORY

    def on_line(frame: Any, event: str, arg: Any) -> Any:
        if time.monotonic() > deadline:
            raise _OverLimit(f"ran for more than {seconds:g} s")
        if resident() > memory_cap:
            raise _OverLimit(f"used more than {UNTRUSTED_MEMORY >> 20} MiB of memory")
        return on_line

    def on_call(frame: Any, event: str, arg: Any) -> Any:
        return on_line(frame, event, arg) if frame.f_code.co_filename == "<template>" else None

    previous = sys.gettrace()
    sys.settrace(on_call)
    try:
        yield
    finally:
        sys.settrace(previous)
        resident.close()


def render(source: str, label: str, variables: dict[str, Any], *, seconds: float | None = None) -> str:
    """Render `source`; any failure, whatever its kind, becomes a TemplateError naming `label`."""
    try:
        template = _compile(source)
        with _limits(seconds):
            return template.render(**variables)
    except TemplateError:
        raise
    except _OverLimit as exc:
        raise TemplateLimitError(f"{label} {exc} and was stopped") from None
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"{label} has a syntax error on line {exc.lineno}: {exc.message}") from None
    except SecurityError as exc:
        raise TemplateError(f"{label} tried an unsafe operation: {exc}") from None
    except jinja2.TemplateError as exc:
        raise TemplateError(f"{label} failed: {exc.message or type(exc).__name__}") from None
    except RecursionError:
        raise TemplateError(f"{label} failed: recursion too deep") from None
    except MemoryError:
        if seconds is not None:  # under limits (the template worker's address-space cap, say)
            raise TemplateLimitError(f"{label} used more than {UNTRUSTED_MEMORY >> 20} MiB of memory "
                                     "and was stopped") from None
        raise TemplateError(f"{label} failed: it ran out of memory") from None
    except Exception as exc:  # a template can raise anything Python can (TypeError, ...)
        raise TemplateError(f"{label} failed: {type(exc).__name__}: {exc}") from None


# -- input data ----------------------------------------------------------------------------


def plain_copy(value: Any, where: str) -> Any:
    """A copy built only from JSON types, so nothing a template sees has callable methods."""
    try:
        return _copy_plain(value, where)
    except RecursionError:
        raise TemplateError(f"{where} are nested too deeply (or refer to themselves)") from None


def _copy_plain(value: Any, where: str) -> Any:
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):  # subclasses (enums, ...) may carry methods
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_copy_plain(k, where): _copy_plain(v, where) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_copy_plain(v, where) for v in value)
    if isinstance(value, list):
        return [_copy_plain(v, where) for v in value]
    raise TemplateError(f"{where} hold a {type(value).__name__}; only JSON values can be rendered")


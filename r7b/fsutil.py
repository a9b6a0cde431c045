"""Atomic output files: a reader never sees a half-written model at the output path."""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
from pathlib import Path
from typing import Iterator

from .errors import R7BError


def check_output_path(path: str | os.PathLike, *, force: bool = False) -> Path:
    """Refuse to overwrite silently and fail early on an unwritable folder."""
    out = Path(path)
    if out.is_dir():
        raise R7BError(f"output path is a directory: {out}")
    if out.exists() and not force:
        raise R7BError(f"output file exists: {out} (use --force to overwrite)")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise R7BError(f"output folder does not exist: {parent}")
    if not os.access(parent, os.W_OK):
        raise R7BError(f"output folder is not writable: {parent}")
    return out


def _new_temp(out: Path) -> Path:
    """An empty hidden file beside `out`, with the permissions the umask gives (mkstemp's are 0600)."""
    while True:
        tmp = out.parent / f".{out.name}.{secrets.token_hex(4)}.part"
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return tmp
        except FileExistsError:
            continue


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it into place only if the block succeeds."""
    out = check_output_path(path, force=force)
    tmp_path = _new_temp(out)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        if out.exists() and not force:
            raise R7BError(f"output file appeared while writing: {out} (use --force to overwrite)")
        os.replace(tmp_path, out)
    except OSError as exc:
        disk_full = exc.errno == errno.ENOSPC or shutil.disk_usage(tmp_path.parent).free == 0
        tmp_path.unlink(missing_ok=True)
        if disk_full:
            raise R7BError(f"no space left on device while writing {out}") from None
        if exc.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
            raise R7BError(f"cannot write {out}: {exc.strerror}") from None
        raise
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise

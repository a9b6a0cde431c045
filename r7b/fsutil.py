"""Atomic output files: a reader never sees a half-written model at the output path.

Commands that write big files also check free space first (`check_free_space`), so a disk that
cannot hold the result is refused up front, in one line, instead of after minutes of work.
"""

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


def format_size(n: int) -> str:
    """Bytes for people: 512 B, 3.0 KiB, 10.4 MiB, 15.03 GiB."""
    if n >= 1024**3:
        return f"{n / 1024**3:.2f} GiB"
    if n >= 1024**2:
        return f"{n / 1024**2:.1f} MiB"
    return f"{n / 1024:.1f} KiB" if n >= 1024 else f"{n} B"


def existing_folder(path: str | os.PathLike) -> Path:
    """The folder a file at `path` would be written in, or its nearest existing ancestor."""
    folder = Path(path)
    folder = folder if folder.is_dir() else (folder.parent if str(folder.parent) else Path("."))
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def free_space(path: str | os.PathLike) -> int:
    """Free bytes (for this user) on the file system that a file at `path` would be written to."""
    return shutil.disk_usage(existing_folder(path)).free


def same_file_system(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    return os.stat(existing_folder(a)).st_dev == os.stat(existing_folder(b)).st_dev


def check_free_space(path: str | os.PathLike, need_bytes: int, what: str, *, hint: str = "") -> None:
    """Refuse, in one line naming the need and what is free, when `need_bytes` will not fit at `path`.

    `need_bytes` is an estimate of everything the command will write there; a disk that fills
    anyway (another writer, a low estimate) still leaves no partial file (see `atomic_output`).
    """
    folder = existing_folder(path)
    free = shutil.disk_usage(folder).free
    if need_bytes > free:
        raise R7BError(f"no space left for {what}: it needs about {format_size(need_bytes)} in {folder}, "
                       f"which has {format_size(free)} free{hint}")


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

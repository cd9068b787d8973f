"""Crash-safe file writes and plain-name checks for everything the package writes or reads back.

A file the package writes (checkpoints, window shards, the OBS export, a run's tables and plots)
either appears complete under its name or not at all, and the previous file of that name survives
any failure of the new write:

- the bytes go to a temporary file *in the destination folder* (a temporary folder elsewhere may
  be another file system, where the final move is a copy over the destination and a crash in
  the middle of it destroys the old file);
- the temporary file is flushed and ``fsync``-ed, renamed over the destination (atomic within one
  file system), and the folder is ``fsync``-ed so the rename itself survives a power loss;
- on any error the temporary file is removed; a full disk raises :class:`DiskFullError`, which
  names the file, the file system and the space left instead of a bare ``OSError`` (or a C++
  ``basic_ios::clear: iostream error`` from ``torch.save`` to a path).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import uuid
from collections.abc import Iterator
from typing import IO, Any

import torch

__all__ = [
    "DiskFullError",
    "atomic_save",
    "atomic_write",
    "atomic_write_text",
    "is_temporary",
    "plain_file_name",
]

#: Temporary files of an atomic write are ``.<name>.<TEMP_MARK><random>``: hidden, and recognisable
#: as left-overs of an interrupted write (see :func:`is_temporary`).
TEMP_MARK = "partial-"
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class DiskFullError(OSError):
    """A write failed for want of space; the message names the file, its file system and the space left."""


def _mount_point(path: str) -> str:
    path = os.path.realpath(path)
    while not os.path.ismount(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def _disk_full(path: str, err: OSError) -> DiskFullError:
    folder = os.path.dirname(os.path.abspath(path)) or "."
    try:
        free = f"{shutil.disk_usage(folder).free / 2**20:.1f} MiB free"
    except OSError:
        free = "free space unknown"
    reason = "file size limit reached" if err.errno == errno.EFBIG else "no space left on device"
    full = DiskFullError(err.errno, f"{reason} writing {path} (file system {_mount_point(folder)}, {free}); "
                                    "the previous file of that name, if any, is unchanged")
    full.filename = path
    return full


def _no_space_cause(err: BaseException) -> OSError | None:
    """The out-of-space ``OSError`` behind ``err``, if any: ``torch.save`` reports a failed write
    as a ``RuntimeError`` of its zip writer, raised while the ``OSError`` is being handled."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError) and err.errno in _NO_SPACE:
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def is_temporary(name: str) -> bool:
    """Whether ``name`` is the temporary file of an atomic write (a left-over, if no write is running)."""
    return name.startswith(".") and f".{TEMP_MARK}" in name


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path`` for writing; on a clean exit it replaces ``path``
    (fsync, rename, fsync of the folder), on any error it is removed and ``path`` is untouched."""
    if mode not in ("w", "wb"):
        raise ValueError(f"mode={mode!r} is invalid: expected 'w' or 'wb'.")
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{TEMP_MARK}{uuid.uuid4().hex[:12]}")
    try:
        with open(tmp, mode, **({"newline": ""} if mode == "w" else {})) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        cause = _no_space_cause(err)
        if cause is not None:
            raise _disk_full(path, cause) from err
        raise
    _fsync_folder(folder)


def _fsync_folder(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not every platform opens folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` through :func:`atomic_write`."""
    with atomic_write(path) as fh:
        torch.save(obj, fh)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path, "w") as fh:
        fh.write(text)


def plain_file_name(name: Any, what: str) -> str:
    """``name`` if it is a plain file name (no folder part, not ``.``/``..``, no NUL), else
    ``ValueError``: names read from a file must not lead out of the folder they are looked up in."""
    if (
        not isinstance(name, str)
        or name in ("", ".", "..")
        or "\0" in name
        or os.path.basename(name) != name
        or (os.altsep is not None and os.altsep in name)
        or os.path.isabs(name)
    ):
        raise ValueError(f"{what}: {name!r} is not a plain file name (expected a name without any folder part).")
    return name

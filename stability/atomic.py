"""The one way a run writes a file: a temporary beside it, fsync, rename over it.

A reader never sees a half-written file, and a crash mid-write leaves the previous version
intact. The temporary is ``.<name>.tmp-<pid>-<random>`` in the same directory (a rename
is atomic only within one filesystem); a process killed mid-write leaves it behind, and
``remove_stale_temporaries`` clears them when the run starts or resumes.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

TMP_MARK = ".tmp-"


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes | str | Callable[[BinaryIO], None]) -> None:
    """Write ``data`` (bytes, text as UTF-8, or a function given the open file) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}{TMP_MARK}{os.getpid()}-")
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        Path(tmp).unlink(missing_ok=True)


def atomic_link(src: Path, dst: Path) -> None:
    """Make ``dst`` a second name of the file ``src`` (a hard link, so no bytes are copied
    and a later rename over ``src`` leaves ``dst`` as it was); copy where the filesystem
    has no hard links. Atomic either way."""
    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(f".{dst.name}{TMP_MARK}{os.getpid()}-link")
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(src, tmp)
        except OSError:
            atomic_write(dst, lambda f: shutil.copyfileobj(open(src, "rb"), f))
            return
        os.replace(tmp, dst)
        fsync_dir(dst.parent)
    finally:
        tmp.unlink(missing_ok=True)


def remove_stale_temporaries(*directories: Path) -> list[Path]:
    """Delete the temporaries (files, or directories of a sharded checkpoint) a killed
    writer left in ``directories``; returns them."""
    removed = []
    for directory in directories:
        if not Path(directory).is_dir():
            continue
        for path in Path(directory).iterdir():
            if path.name.startswith(".") and TMP_MARK in path.name:
                remove_path(path)
                removed.append(path)
    return removed


def remove_path(path: Path, strict: bool = False) -> None:
    """Delete a file or a directory (a sharded checkpoint is one). Not ``strict``, what is
    already gone or cannot be deleted is left as it is: clearing out temporaries and old
    checkpoints must never stop a run. ``strict`` raises the OSError (--overwrite must not
    leave half a run behind)."""
    path = Path(path)
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=not strict)
    else:
        path.unlink(missing_ok=not strict)

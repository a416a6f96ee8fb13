"""Atomic file writes: a crash or an error mid-write never leaves a half-written file."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def fsync_directory(folder: Path) -> None:
    """Make a rename in `folder` durable: without it a power cut can bring the old file back."""
    flag = getattr(os, "O_DIRECTORY", None)
    if flag is None:  # e.g. Windows: a folder cannot be opened, so there is nothing to flush
        return
    fd = os.open(folder, os.O_RDONLY | flag)
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno != errno.EINVAL:  # EINVAL: this file system cannot sync a folder at all
            raise
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Write to a temp file in the same folder, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    """atomic_write_bytes of `text` as UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_with(path: Path, writer: Callable[[Path], None]) -> None:
    """Let `writer` fill a temp path (e.g. DataFrame.to_csv), then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        writer(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


@contextmanager
def atomic_directory(path: Path, *, mode: int = 0o755) -> Iterator[Path]:
    """Fill a temp folder beside `path`; only on success does it replace `path` whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    os.chmod(staging, mode)
    try:
        yield staging
        if path.exists():
            backup = path.with_name(f".{path.name}.old")
            shutil.rmtree(backup, ignore_errors=True)
            os.replace(path, backup)
            os.replace(staging, path)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_directory(path.parent)

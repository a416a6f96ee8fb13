"""Atomic writes: they land whole, a failure keeps the old file, and the rename itself is flushed."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from privacy.storage import atomic_directory, atomic_write_bytes, atomic_write_text, atomic_write_with


def _write_bytes(path: Path, data: bytes) -> None:
    atomic_write_bytes(path, data)


def _write_with(path: Path, data: bytes) -> None:
    atomic_write_with(path, lambda tmp: tmp.write_bytes(data))


def _write_directory(path: Path, data: bytes) -> None:
    with atomic_directory(path) as staging:
        (staging / "part").write_bytes(data)


WRITERS: list[Callable[[Path, bytes], None]] = [_write_bytes, _write_with, _write_directory]


def _read(path: Path) -> bytes:
    return (path / "part").read_bytes() if path.is_dir() else path.read_bytes()


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("write", WRITERS)
def test_writes_land_and_replace_leaving_no_temp_files(tmp_path: Path, write: Callable) -> None:
    target = tmp_path / "sub" / "out"
    write(target, b"first")
    write(target, b"second")
    assert _read(target) == b"second"
    assert _names(target.parent) == ["out"]


def test_bytes_get_the_asked_mode_and_text_is_utf8(tmp_path: Path) -> None:
    atomic_write_bytes(tmp_path / "key", b"k", mode=0o600)
    assert stat.S_IMODE((tmp_path / "key").stat().st_mode) == 0o600
    atomic_write_text(tmp_path / "note", "épsilon")
    assert (tmp_path / "note").read_bytes() == "épsilon".encode()


def test_a_failing_writer_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "ledger.json"
    target.write_bytes(b"old")

    def half_then_fail(tmp: Path) -> None:
        tmp.write_bytes(b"ha")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write_with(target, half_then_fail)
    assert target.read_bytes() == b"old"
    assert _names(tmp_path) == ["ledger.json"]


def test_a_failing_byte_write_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "ledger.json"
    target.write_bytes(b"old")

    def no_rename(src: str, dst: str) -> None:
        raise OSError("rename failed")

    monkeypatch.setattr(os, "replace", no_rename)
    with pytest.raises(OSError, match="rename failed"):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert _names(tmp_path) == ["ledger.json"]


def test_a_failing_directory_fill_keeps_the_old_folder(tmp_path: Path) -> None:
    target = tmp_path / "model"
    _write_directory(target, b"old")
    with pytest.raises(RuntimeError), atomic_directory(target) as staging:
        (staging / "part").write_bytes(b"ha")
        raise RuntimeError("training crashed")
    assert _read(target) == b"old"
    assert _names(tmp_path) == ["model"]


def _record_syncs(monkeypatch: pytest.MonkeyPatch, events: list[str], folder: Path) -> None:
    """Log each os.replace and each fsync of `folder` itself, in order, then do them."""
    real_replace, real_fsync = os.replace, os.fsync
    inode = folder.stat().st_ino

    def replace(src: str | Path, dst: str | Path) -> None:
        events.append("replace")
        real_replace(src, dst)

    def fsync(fd: int) -> None:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode) and info.st_ino == inode:
            events.append("fsync-folder")
        real_fsync(fd)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.parametrize("write", WRITERS)
def test_the_folder_is_flushed_after_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, write: Callable
) -> None:
    write(tmp_path / "out", b"old")  # replacing an existing one: a folder takes two renames
    events: list[str] = []
    _record_syncs(monkeypatch, events, tmp_path)
    write(tmp_path / "out", b"new")
    assert "replace" in events
    assert events[-1] == "fsync-folder"  # after the last rename, so the rename is durable
    assert _read(tmp_path / "out") == b"new"


@pytest.mark.parametrize("write", WRITERS)
def test_no_folder_flush_where_folders_cannot_be_opened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, write: Callable
) -> None:
    events: list[str] = []
    _record_syncs(monkeypatch, events, tmp_path)
    monkeypatch.delattr(os, "O_DIRECTORY")
    write(tmp_path / "out", b"new")
    assert _read(tmp_path / "out") == b"new"
    assert "fsync-folder" not in events


def _failing_folder_fsync(monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(code, os.strerror(code))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def test_a_file_system_that_cannot_sync_folders_is_tolerated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _failing_folder_fsync(monkeypatch, errno.EINVAL)
    atomic_write_bytes(tmp_path / "out", b"new")
    assert (tmp_path / "out").read_bytes() == b"new"


def test_a_real_folder_sync_error_is_raised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _failing_folder_fsync(monkeypatch, errno.EIO)
    with pytest.raises(OSError, match=os.strerror(errno.EIO)):
        atomic_write_bytes(tmp_path / "out", b"new")

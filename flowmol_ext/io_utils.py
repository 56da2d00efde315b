"""Atomic file writes: write to a temporary name in the same folder, fsync, then rename.

The file gets the mode a plain ``open(path, "w")`` would give it (0666 minus the process umask),
not the 0600 of :func:`tempfile.mkstemp`.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch


def current_umask() -> int:
    """The process umask, read without changing it where /proc allows (else set and restored)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_writable_dir(path: Path, key: str = "output directory") -> None:
    """Fail early (``ValueError`` naming ``key`` and the folder) when files cannot be created in
    ``path``, e.g. a read-only folder; call before long work, not after it. Creates nothing: a
    missing folder is checked at its nearest existing parent."""
    path = Path(path)
    probe_dir = path
    while not probe_dir.exists() and probe_dir != probe_dir.parent:
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise ValueError(f"{key}: {probe_dir} is not a folder, so {path} cannot be created")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write_test.", dir=probe_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ValueError(f"{key}: cannot write to {probe_dir} ({err.strerror or err}); choose a writable folder") \
            from None


def atomic_write(path: Path, writer: Callable[[Path], Any]) -> None:
    """Call ``writer(tmp_path)`` and rename the result onto ``path``; nothing half-written is left.

    The temporary file is fsynced before the rename and given mode ``0o666 & ~umask``. Any error
    (``writer``'s, a full disk's on fsync) removes the temporary file and propagates.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp_path = Path(tmp)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        os.close(fd)
        fd = -1
        writer(tmp_path)
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        tmp_path.unlink(missing_ok=True)
        raise


def _write_text(p: Path, text: str) -> None:
    with open(p, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def _write_bytes(p: Path, data: bytes) -> None:
    with open(p, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically; write errors (full disk) raise ``OSError``."""
    atomic_write(path, lambda p: _write_text(p, text))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically; write errors (full disk) raise ``OSError``."""
    atomic_write(path, lambda p: _write_bytes(p, data))


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path`` atomically (torch raises on write errors)."""
    atomic_write(path, lambda p: torch.save(obj, p))


RUN_LOCK_FILE = ".fdc-mol.run.lock"


@contextlib.contextmanager
def exclusive_dir_lock(directory: Path, lock_name: str, busy: Callable[[str], str]) -> Iterator[Path]:
    """Hold an exclusive ``fcntl.flock`` on ``<directory>/<lock_name>`` (created with the folder if missing).

    The lock file records the holder (pid, host, start time, command); a second holder fails at once with
    ``ValueError(busy(holder))``. The lock dies with its process, so a killed run leaves no stale lock."""
    import fcntl
    import socket
    import sys
    import time

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lock_path = directory / lock_name
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "unknown process"
            raise ValueError(busy(holder)) from None
        info = (f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                f"{' '.join(sys.argv)[:300]}")
        os.ftruncate(fd, 0)
        os.pwrite(fd, info.encode(), 0)
        yield lock_path
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def run_dir_lock(run_dir: Path, key: str = "run_dir") -> Iterator[Path]:
    """Exclusive lock on ``<run_dir>/.fdc-mol.run.lock`` for the whole run (:func:`exclusive_dir_lock`): a second
    run into the same directory (it would write the same files at the same time) fails at once naming the
    directory and the holder."""
    with exclusive_dir_lock(run_dir, RUN_LOCK_FILE, lambda holder: (
            f"{key} {run_dir} is in use by another run ({holder}); wait for it to finish or choose another {key}")
    ) as lock_path:
        yield lock_path

"""The destination folder: checked before anything is written, and locked while a run writes it."""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path

from ..errors import InputError, OutputExistsError


def check_destination(src: Path, dst: Path, overwrite: bool) -> None:
    s, d = src.resolve(), dst.resolve()
    if d == s or s in d.parents or d in s.parents:
        raise InputError(f"{dst}: the destination overlaps the source {src}; choose a folder outside it")
    if d.exists():
        if not d.is_dir():
            raise OutputExistsError(f"{dst}: exists and is not a folder; choose another destination")
        if any(d.iterdir()) and not overwrite:
            raise OutputExistsError(f"{dst}: exists and is not empty; pass --overwrite to replace it")


@contextmanager
def destination_lock(dst: Path):
    """An flock on ``.DST.nvfp4ckpt-lock``: the kernel drops it when the holder exits, even on SIGKILL,
    so a lock file left by a dead run is simply taken over (the PID in it is only for the message)."""
    lock = dst.parent / f".{dst.name}.nvfp4ckpt-lock"
    while True:
        fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise OutputExistsError(
                f"{dst}: another nvfp4ckpt run is writing it (pid {holder}, lock file {lock}); wait for it to finish"
            ) from None
        except OSError:
            pass  # no flock on this file system (some network mounts): go on unlocked, as before locks existed
        # The previous holder unlinks the file before releasing it; if we locked that old inode, retry.
        try:
            if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        try:
            os.unlink(lock)
        except FileNotFoundError:
            pass
        os.close(fd)

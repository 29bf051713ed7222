"""The destination folder: checked before anything is written, and locked while a run writes it."""

from __future__ import annotations

import fcntl
import os
import stat
from contextlib import contextmanager
from pathlib import Path

from ..errors import InputError, OutputExistsError, UnsafePathError
from .safe_paths import destination_path

# No-follow: a symlink planted at the lock path (say, to a source file) is refused, never truncated through.
# Non-blocking: a FIFO there cannot hang the open.
_LOCK_FLAGS = os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def _open_lock(lock: Path) -> int:
    """The lock file's descriptor: created, or a plain file left by a dead run; anything else is refused
    (a symlink, a FIFO, or a hard link to another file, which truncating would destroy)."""
    try:
        fd = os.open(lock, _LOCK_FLAGS, 0o644)
    except OSError as exc:
        if os.path.islink(lock):
            raise UnsafePathError(f"{lock}: the lock file is a symbolic link nvfp4ckpt did not make; remove it and rerun") from None
        raise exc
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        what = "not a plain file" if not stat.S_ISREG(st.st_mode) else f"a hard link ({st.st_nlink} names)"
        raise UnsafePathError(f"{lock}: the lock file is {what}, which nvfp4ckpt did not make; remove it and rerun")
    return fd


def check_destination(src: Path, dst: Path, overwrite: bool) -> Path:
    """DST made absolute (``destination_path``: ``.`` works, a symlink is refused) once checked: not
    overlapping the source, a folder, empty unless ``overwrite``."""
    dst = destination_path(dst)
    s, d = src.resolve(), dst.resolve()
    if d == s or s in d.parents or d in s.parents:
        raise InputError(f"{dst}: the destination overlaps the source {src}; choose a folder outside it")
    if d.exists():
        if not d.is_dir():
            raise OutputExistsError(f"{dst}: exists and is not a folder; choose another destination")
        if any(d.iterdir()) and not overwrite:
            raise OutputExistsError(f"{dst}: exists and is not empty; pass overwrite=True to replace it")
    return dst


@contextmanager
def destination_lock(dst: Path):
    """An flock on ``.DST.nvfp4ckpt-lock``: the kernel drops it when the holder exits, even on SIGKILL,
    so a lock file left by a dead run is simply taken over (the PID in it is only for the message)."""
    lock = dst.parent / f".{dst.name}.nvfp4ckpt-lock"
    while True:
        fd = _open_lock(lock)
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


# Names only nvfp4ckpt's output has: a source holding them would have them copied into the output, where they
# would pose as this run's rank folders (or be refused as already existing).
OUTPUT_ONLY_NAMES = ("ranks",)


def refuse_output_names(src: Path) -> None:
    for name in OUTPUT_ONLY_NAMES:
        if os.path.lexists(src / name):
            raise InputError(
                f"{src / name}: the source has a {name!r} entry, which is where nvfp4ckpt writes rank-sharded output; "
                "convert the checkpoint it came from, or move it out of the source folder"
            )

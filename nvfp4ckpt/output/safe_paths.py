"""Creating paths next to DST without ever following a symlink planted there.

Every file the tool creates is opened with ``O_CREAT | O_EXCL | O_NOFOLLOW`` (a planted symlink or file is
refused, never written through), folders are made with ``mkdir`` (which never follows its last component),
and a path that already exists is accepted only when ``lstat`` says it is a real folder / a plain file."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from ..errors import InputError, UnsafePathError
from ..io.sink import create_file, write_new  # noqa: F401  (re-exported: the one way to create a file)


def destination_path(dst: str | Path) -> Path:
    """DST as an absolute path with ``.``/``..`` folded (so ``.`` has a name and a parent), refused when it is
    a symlink: the partial folder and the final rename act on the link, not on the folder it points to."""
    path = Path(os.path.abspath(Path(dst).expanduser()))
    if not path.name:
        raise InputError(f"{dst}: cannot write to the file system root; pass a folder below it")
    if path.is_symlink():
        raise UnsafePathError(
            f"{dst}: is a symbolic link (to {os.readlink(path)}); pass the folder it points to, or another folder"
        )
    return path


def refuse_link(path: Path, what: str) -> None:
    """Raise when ``path`` exists as anything but a real folder (``what`` names it in the message)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a folder"
        raise UnsafePathError(f"{path}: the {what} is {kind} that nvfp4ckpt did not make; remove it and rerun")


def make_folder(path: Path, what: str = "output folder") -> None:
    """``mkdir -p`` for a folder the tool owns: an existing one must be a real folder, never a symlink."""
    refuse_link(path, what)
    try:
        os.mkdir(path, 0o755)
    except FileExistsError:
        refuse_link(path, what)  # created meanwhile: still checked


def make_folders(root: Path, path: Path, what: str = "output folder") -> None:
    """Every folder from ``root`` (exclusive, already made) down to ``path``, each checked by ``make_folder``."""
    rel = path.relative_to(root)
    for part in [*reversed(rel.parents[:-1]), rel] if rel.parts else []:
        make_folder(root / part, what)


def aside_folder(dst: Path) -> Path:
    """A fresh private folder next to DST to move an old DST into before the rename (``mkdtemp`` makes it
    with exclusive creation, so nothing planted can be its name)."""
    return Path(tempfile.mkdtemp(prefix=f".{dst.name}.nvfp4ckpt-old-", dir=dst.parent))

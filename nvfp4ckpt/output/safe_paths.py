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


def check_output_file(path: str | Path, option: str, protected: dict[str, Path]) -> Path:
    """An output file an option names (``--json-out``), checked before any work is done: its folder exists and is
    writable, it is not a symbolic link or anything but a plain file, and it lies outside every ``protected``
    folder (name -> folder: the checkpoint verified, its source). Writing into a checkpoint would replace one of
    its files (config.json, a shard) or add one the manifest does not list, so every later verify would fail.
    Returns the path made absolute."""
    p = Path(os.path.abspath(Path(path).expanduser()))
    shown = f"{option} {str(path)!r}"
    if not p.name:
        raise InputError(f"{shown}: is a folder; pass a file name")
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise InputError(f"{shown}: cannot use it ({exc.strerror}); pass another file") from None
    if st is not None and stat.S_ISLNK(st.st_mode):
        raise UnsafePathError(
            f"{shown}: is a symbolic link (to {os.readlink(p)!r}); nvfp4ckpt never writes through a link it did not "
            "make; remove it or pass another file"
        )
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise InputError(f"{shown}: exists and is not a plain file; pass a file name")
    parent = p.parent
    if not parent.is_dir():
        raise InputError(f"{shown}: the folder {str(parent)!r} does not exist; create it first or pass another file")
    real = parent.resolve() / p.name
    for what, root in protected.items():
        try:
            r = Path(root).expanduser().resolve()
        except OSError:
            continue
        if real == r or r in real.parents:
            raise InputError(
                f"{shown}: is inside {what} {str(root)!r}; writing there would change the checkpoint (replace one of "
                "its files or add one its manifest does not list); write the report outside it"
            )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{shown}: cannot write to the folder {str(parent)!r} (permission denied); pass another file")
    return p


def write_output_file(path: Path, data: bytes) -> None:
    """Write a file checked by ``check_output_file``: a new private temporary file next to it (exclusive, so
    nothing planted is written through), fsynced, then renamed over ``path``. The rename replaces whatever name
    is there (a link planted meanwhile is replaced, never followed; a hard link's other names keep their bytes)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".nvfp4ckpt-tmp", dir=path.parent)
    try:
        try:
            os.fchmod(fd, 0o644)  # a report, readable as any file the tool writes (mkstemp makes it 0600)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise

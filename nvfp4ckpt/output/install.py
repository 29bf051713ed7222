"""Finishing a folder: JSON and copied files written durably, then the atomic rename into place."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from .safe_paths import aside_folder, create_file, make_folders, refuse_link, write_new


def install(tmp: Path, dst: Path) -> None:
    """Move the finished temporary folder into place (replacing an old DST only now)."""
    old = None
    if os.path.lexists(dst):
        refuse_link(dst, "destination")  # became a symlink during the run: never rename over or through it
        old = aside_folder(dst)  # a fresh private folder: no planted name to rename onto
        os.replace(dst, old / dst.name)
    os.replace(tmp, dst)
    fsync_dir(dst.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json(path: Path, data: dict) -> dict:
    raw = (json.dumps(data, indent=2) + "\n").encode("utf-8")
    write_new(path, raw)
    return {"name": path.name, "size": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}


def other_files(src: Path, skip_top_level: set[str]) -> list[Path]:
    """The files ``copy_other_files`` copies, relative to ``src``."""
    out = []
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        if rel.name.endswith(".safetensors") or rel.parts[0] in skip_top_level:
            continue
        out.append(rel)
    return out


def copy_other_files(src: Path, dst: Path, skip_top_level: set[str]) -> list[dict]:
    """Tokenizer, generation config, code, ...: every file that is not a weight shard."""
    out = []
    for rel in other_files(src, skip_top_level):
        path = src / rel
        target = dst / rel
        make_folders(dst, target.parent)
        digest = hashlib.sha256()
        with open(path, "rb") as fi, os.fdopen(create_file(target), "wb") as fo:
            while block := fi.read(16 * 1024 * 1024):
                digest.update(block)
                fo.write(block)
        shutil.copystat(path, target)
        out.append({"name": rel.as_posix(), "size": target.stat().st_size, "sha256": digest.hexdigest()})
    return out


def write_files(dst: Path, files: dict[str, bytes]) -> list[dict]:
    """Files given as bytes (name relative to ``dst`` -> bytes), written as new files; their manifest entries."""
    out = []
    for name, data in sorted(files.items()):
        target = dst / name
        make_folders(dst, target.parent)
        write_new(target, data)
        out.append({"name": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    return out

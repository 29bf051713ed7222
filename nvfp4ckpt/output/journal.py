"""The partial folder next to DST and its journal of finished shards: what ``--resume`` continues from, and the
check that the source did not change under a run."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from .. import __version__
from ..errors import ResumeMismatchError, SourceChangedError, UnsafePathError
from ..io import ShardPlan, count, sha256_file
from ..io.sink import create_file, write_all
from ..progress import Progress, ProgressFn
from .install import fsync_dir
from .safe_paths import make_folder, refuse_link

if TYPE_CHECKING:
    from .writer import CheckpointJob

JOURNAL_NAME = ".nvfp4ckpt-journal.jsonl"
JOURNAL_VERSION = 1


def partial_folder(dst: Path) -> Path:
    """Where a run writes before the final rename: next to DST (same file system, so the rename is atomic),
    named after DST only, so the next run finds it (the lock keeps two runs out of it)."""
    return dst.parent / f".{dst.name}.nvfp4ckpt-partial"


def source_stats(root: Path) -> dict[str, list[int]]:
    """(size, mtime_ns, inode) of every file a job may read, by path relative to ``root``.

    Cheap (no hashing), and what changes when a file is rewritten, appended to or replaced; an edit that
    keeps size and restores the mtime goes unnoticed."""
    out: dict[str, list[int]] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue
        try:
            st = path.stat()
        except FileNotFoundError:
            continue  # a dangling symlink is not read
        if path.is_file():
            out[rel.as_posix()] = [st.st_size, st.st_mtime_ns, st.st_ino]
    return out


def job_fingerprint(job: "CheckpointJob", shard_plans: dict[str, list[ShardPlan]]) -> str:
    """Everything but the source files that decides the output bytes: tool version, options (through the
    plan, headers and config), and the shard plan itself."""
    desc = {
        "journal": JOURNAL_VERSION,
        "tool": __version__,
        "max_shard_bytes": job.max_shard_bytes,
        "metadata": job.metadata,
        "part_metadata": job.part_metadata,
        "config": job.config,
        "manifest_fields": job.manifest_fields,
        "skip_files": sorted(job.skip_files),
        "computed": sorted(job.computed.items()),
        "shards": {
            part: [[p.filename, [[t.name, t.dtype, list(t.shape)] for t in p.tensors]] for p in plans]
            for part, plans in sorted(shard_plans.items())
        },
    }
    return hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()


class _Journal:
    """``JOURNAL_NAME`` in the partial folder: a header line (fingerprint, source stats), then one line per
    shard, appended and fsynced only after the shard itself is fsynced. Removed before the install."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.Lock()
        self.count = 0

    def start(self, header: dict, entries: list[dict]) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        if os.path.lexists(tmp):
            os.unlink(tmp)  # a run killed mid-start; unlink never follows a symlink
        fd = create_file(tmp)
        try:
            write_all(fd, "".join(json.dumps(x, sort_keys=True) + "\n" for x in [header, *entries]).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        fsync_dir(self.path.parent)
        self.count = len(entries)

    def add(self, name: str, size: int, sha256: str) -> None:
        line = json.dumps({"name": name, "size": size, "sha256": sha256}, sort_keys=True) + "\n"
        with self.lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
            try:
                write_all(fd, line.encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            self.count += 1

    def read(self) -> tuple[dict, list[dict]] | None:
        """(header, shard entries), or None when there is no readable journal. A torn last line (killed
        mid-append) is ignored."""
        try:
            lines = self.path.read_bytes().decode("utf-8", errors="replace").splitlines()
            header = json.loads(lines[0])
        except (OSError, IndexError, ValueError):
            return None
        entries = []
        for line in lines[1:]:
            try:
                entry = json.loads(line)
                entries.append({"name": str(entry["name"]), "size": int(entry["size"]), "sha256": str(entry["sha256"])})
            except (ValueError, KeyError, TypeError):
                break
        return header, entries


def open_partial(
    tmp: Path, fingerprint: str, sources: dict[str, list[int]], source_root: Path, resume: bool, report: ProgressFn,
    options: dict | None = None,
) -> dict[str, dict]:
    """Set up the partial folder; returns the finished shards to reuse (name -> entry), empty unless resuming.
    ``options``: the run's options as the user gave them (``--tp``: 2, ...), kept in the journal so a refused
    ``--resume`` can say which one changed, from what to what."""
    journal = _Journal(tmp / JOURNAL_NAME)
    header = {"journal": JOURNAL_VERSION, "fingerprint": fingerprint, "sources": sources, "tool": __version__,
              "options": options or {}}  # fmt: skip
    refuse_link(tmp, "partial folder")  # a planted symlink (say, to the source) is never written through
    if tmp.exists() and resume:
        _refuse_links_inside(tmp)
    if tmp.exists() and not resume:
        old = journal.read()
        finished = len(old[1]) if old else 0
        report(Progress("notice", message=(
            f"{tmp}: removing the partial folder of an interrupted run ({count(finished, 'finished shard')}); "
            "pass resume=True to continue it instead"
        )))  # fmt: skip
        shutil.rmtree(tmp)
    if not tmp.exists():
        if resume:
            report(Progress("notice", message=f"{tmp}: no interrupted run to resume; writing everything"))
        make_folder(tmp, "partial folder")
        journal.start(header, [])
        return {}
    old = journal.read()
    if old is None:
        raise ResumeMismatchError(f"{tmp}: no readable journal of an interrupted run; rerun without resume=True to start over")
    old_header, entries = old
    if old_header.get("fingerprint") != fingerprint or old_header.get("sources") != sources:
        old_sources = old_header.get("sources") if isinstance(old_header.get("sources"), dict) else {}
        changed = sorted(set(old_sources) ^ set(sources) | {n for n in sources if old_sources.get(n) != sources[n]})
        what = f"{source_root / changed[0]} changed" if changed else _what_changed(old_header, header)
        raise ResumeMismatchError(
            f"{tmp}: source or options changed since the interrupted run ({what}); rerun without resume=True"
        )
    reused: dict[str, dict] = {}
    for entry in entries:
        path = tmp / entry["name"]
        # Re-hash rather than trust size alone: reading a shard back is still cheaper than rewriting it.
        if path.is_file() and path.stat().st_size == entry["size"] and sha256_file(path) == entry["sha256"]:  # no links inside (checked)
            reused[entry["name"]] = entry
    # Everything else (a shard cut off mid-write, the last attempt's index or manifest) is written again.
    for path in sorted(tmp.rglob("*"), reverse=True):
        rel = path.relative_to(tmp).as_posix()
        if path.is_file() and rel not in reused and path != journal.path:
            path.unlink()
    journal.start(header, list(reused.values()))
    return reused


def _what_changed(old: dict, new: dict) -> str:
    """Which option (or the nvfp4ckpt version) differs from the interrupted run's, from what to what."""
    before = old.get("options") if isinstance(old.get("options"), dict) else None
    after = new["options"]
    if before is not None:
        diffs = [
            f"{name} was {_shown(before.get(name))}, now {_shown(after.get(name))}"
            for name in sorted(set(before) | set(after))
            if before.get(name) != after.get(name)
        ]
        if diffs:
            return "; ".join(diffs)
    if old.get("tool") != new["tool"]:
        return f"the interrupted run was nvfp4ckpt {old.get('tool') or 'of an older version'}, this is {new['tool']}"
    if before is None:
        return "options or nvfp4ckpt version changed (the interrupted run's journal does not record which)"
    return "the output plan changed with the same options (the source's config.json or headers)"


def _shown(value: object) -> str:
    return "unset" if value is None else json.dumps(value)


def _refuse_links_inside(tmp: Path) -> None:
    """A partial folder to resume holds only folders and plain files nvfp4ckpt wrote: a symlink or FIFO
    planted inside would be written through (or block), so it is refused."""
    for root, dirs, files in os.walk(tmp):  # never follows symlinks; a symlink to a folder is in ``dirs``
        for name in dirs + files:
            mode = os.lstat(os.path.join(root, name)).st_mode
            if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                raise UnsafePathError(
                    f"{os.path.join(root, name)}: a symbolic link or special file inside the partial folder, which "
                    "nvfp4ckpt did not make; rerun without resume=True to start over"
                )


def check_sources_unchanged(root: Path, before: dict[str, list[int]]) -> None:
    """Raise ``SourceChangedError`` naming the first source file whose size, mtime or inode moved."""
    now = source_stats(root)
    changed = sorted(set(before) ^ set(now) | {n for n in now if before.get(n) != now[n]})
    if changed:
        raise SourceChangedError(
            f"{root / changed[0]}: changed while it was being converted (size, mtime or inode); "
            "rerun once the source is no longer being written"
        )

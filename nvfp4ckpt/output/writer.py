"""Writing a whole checkpoint folder safely: streaming shards, index, config, copied files,
manifest, all inside a temporary folder next to DST that is renamed into place at the end.

Used by both ``convert`` (source -> kernel layout) and ``revert`` (kernel layout -> source).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import CorruptFileError, DiskFullError, InputError, InterruptedRun, Nvfp4CkptError, OutputExistsError
from ..io import (
    INDEX_NAME,
    Array,
    AsyncSink,
    BufferPool,
    CheckpointFiles,
    PlannedTensor,
    ShardPlan,
    ShardWriter,
    buffers_from,
    count,
    format_size,
    parse_size,
    plan_shards,
)
from ..progress import Progress, ProgressFn
from .destination import destination_lock
from .safe_paths import destination_path, make_folders
from .install import copy_other_files, fsync_dir, install, other_files, write_files, write_json
from .journal import JOURNAL_NAME, _Journal, check_sources_unchanged, job_fingerprint, open_partial, partial_folder, source_stats


MANIFEST_NAME = "nvfp4ckpt_manifest.json"  # every written file's name, size and sha256 (verify checks it)
DEFAULT_MAX_SHARD_SIZE = "50GB"  # transformers' save_pretrained default


def max_shard_bytes(max_shard_size: str | int) -> int:
    """``--max-shard-size`` (e.g. "5GB", or bytes) as bytes, or an InputError naming the option."""
    try:
        return parse_size(max_shard_size)
    except ValueError as exc:
        raise InputError(f"--max-shard-size: {exc}") from None


@dataclass
class CheckpointJob:
    """Everything needed to write one output folder.

    ``planned`` lists every tensor in write order. A tensor whose key is in ``computed`` (key -> group)
    comes from ``compute(group)``, which returns all tensors of that group at once, keyed by
    ``PlannedTensor.key`` (one MoE layer, for every rank) as numpy arrays or CPU torch tensors whose bytes
    are the tensor's (the dtype comes from ``planned``); every other tensor is copied byte for byte
    from ``source``. Tensors of different parts (sub-folders) may interleave: each part gets its own
    shards and index, written concurrently, so a layer is dropped once all its ranks have it.
    """

    source: CheckpointFiles
    planned: list[PlannedTensor]
    computed: dict[str, str]
    compute: Callable[[str], dict[str, Array]]
    metadata: dict[str, str]
    config: dict
    max_shard_bytes: int
    manifest_fields: dict | None = None  # None: write no manifest
    part_metadata: dict[str, dict[str, str]] = field(default_factory=dict)  # extra header metadata per part
    skip_files: set[str] = field(default_factory=set)  # top-level names not to copy from the source folder
    options: dict = field(default_factory=dict)  # the run's options as given (``--tp``: 2): named when --resume refuses
    # Files written from bytes (name relative to the folder -> bytes): ``files`` are listed in the manifest,
    # ``unlisted_files`` are not (the model card, which verify --update-card edits; see output/card.py).
    files: dict[str, bytes] = field(default_factory=dict)
    unlisted_files: dict[str, bytes] = field(default_factory=dict)


@dataclass
class WriteResult:
    files: list[dict]  # name, size, sha256 of every file written (the manifest's list)
    reused: list[str] = field(default_factory=list)  # shards taken over from an interrupted run (--resume)


def write_checkpoint(
    job: CheckpointJob,
    dst: Path,
    progress: ProgressFn | None = None,
    workers: int = 1,
    overwrite: bool = False,
    resume: bool = False,
) -> WriteResult:
    """Write the folder; returns the file list (name, size, sha256) and the shards reused. DST must have been checked.

    Three things overlap: ``workers`` threads read and transform the next MoE layers (in plan order,
    at most ``workers`` ahead, so memory stays bounded), the main thread hands bytes over in plan
    order, and sink threads hash, write and fsync. The bytes never depend on ``workers``.

    Output goes to ``partial_folder(dst)`` with a journal of finished shards; a run that dies (crash,
    SIGKILL, disk full) leaves it, and ``resume=True`` continues it, reusing the shards the journal lists
    after re-hashing them. Without ``resume`` a leftover partial folder is removed (and reported).
    """
    report = progress or (lambda p: None)
    parts: dict[str, list[PlannedTensor]] = {}
    for t in job.planned:
        parts.setdefault(t.part, []).append(t)
    shard_plans = {part: plan_shards(tensors, job.max_shard_bytes) for part, tensors in parts.items()}
    groups = list(dict.fromkeys(job.computed[t.key] for t in job.planned if t.key in job.computed))
    total_bytes = sum(t.nbytes for t in job.planned)
    sources = source_stats(job.source.root)
    fingerprint = job_fingerprint(job, shard_plans)
    _refuse_name_clashes(job, shard_plans)
    report(Progress("plan", 0, len(groups), 0, total_bytes))
    dst = destination_path(dst)
    check_free_space(job, dst, shard_plans)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with destination_lock(dst):
        # Under the lock, so two runs into one DST cannot both pass the emptiness check.
        if dst.exists() and any(dst.iterdir()) and not overwrite:
            raise OutputExistsError(f"{dst}: exists and is not empty; pass overwrite=True to replace it")
        tmp = partial_folder(dst)
        reused = open_partial(tmp, fingerprint, sources, job.source.root, resume, report, job.options)
        return _write_locked(job, dst, tmp, shard_plans, reused, sources, groups, total_bytes, report, workers)


def _write_locked(job, dst, tmp, shard_plans, reused, sources, all_groups, total_bytes, report, workers) -> WriteResult:
    journal = _Journal(tmp / JOURNAL_NAME)
    journal.count = len(reused)
    # Only the shards not reused are written: plan, groups and compute shrink to their tensors.
    todo_plans = {part: [p for p in plans if _shard_name(part, p) not in reused] for part, plans in shard_plans.items()}
    todo_keys = {t.key for plans in todo_plans.values() for p in plans for t in p.tensors}
    todo = [t for t in job.planned if t.key in todo_keys]
    if reused:
        job = dataclasses.replace(job, compute=lambda g, compute=job.compute: {k: v for k, v in compute(g).items() if k in todo_keys})
    groups = list(dict.fromkeys(job.computed[t.key] for t in todo if t.key in job.computed))
    skipped_groups = len(all_groups) - len(groups)
    files: list[dict] = []
    sink = AsyncSink(threaded=True)
    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="nvfp4ckpt-layer")
    reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nvfp4ckpt-read")
    try:
        cache = _GroupPipeline(job, groups, pool, max(1, workers), sink.buffers)
        carried = _CarriedPrefetch(job.source, [t for t in todo if t.key not in job.computed], reader, sink.buffers)
        cursors = {
            part: _PartCursor(
                tmp, tmp / part if part else tmp, plans, {**job.metadata, **job.part_metadata.get(part, {})}, sink,
                lambda f, prefix=(f"{part}/" if part else ""): journal.add(prefix + f.path.name, f.path.stat().st_size, f.sha256),
            )  # fmt: skip
            for part, plans in todo_plans.items()
        }
        done = total_bytes - sum(t.nbytes for t in todo)
        for t in todo:
            writer = cursors[t.part].writer_for(t)
            group = job.computed.get(t.key)
            if group is None:
                writer.write_blocks(t.name, carried.blocks(t.name))
            else:
                writer.write(t.name, cache.take(group, t.key))
                if cache.finished_group:
                    report(Progress("layer", skipped_groups + cache.groups_done, len(all_groups), done, total_bytes))
            cursors[t.part].advance()
            done += t.nbytes
            report(Progress("bytes", skipped_groups + cache.groups_done, len(all_groups), done, total_bytes))
        sink.drain()
        for part, plans in shard_plans.items():
            folder = tmp / part if part else tmp
            prefix = f"{part}/" if part else ""
            written = iter(cursors[part].writers)
            for plan in plans:
                old = reused.get(prefix + plan.filename)
                if old is not None:
                    files.append({"name": old["name"], "size": old["size"], "sha256": old["sha256"]})
                    continue
                writer = next(written)
                files.append({"name": prefix + plan.filename, "size": (folder / plan.filename).stat().st_size, "sha256": writer.sha256})
            if len(plans) > 1:
                index = {
                    "metadata": {"total_size": sum(p.nbytes for p in plans)},
                    "weight_map": {t.name: p.filename for p in plans for t in p.tensors},
                }
                entry = write_json(folder / INDEX_NAME, index)
                files.append({**entry, "name": prefix + entry["name"]})
        files.append(write_json(tmp / "config.json", job.config))
        files.extend(copy_other_files(job.source.root, tmp, _copied_skip(job)))
        files.extend(write_files(tmp, job.files))
        write_files(tmp, job.unlisted_files)
        files.sort(key=lambda f: f["name"])
        # Everything has been read: a source rewritten meanwhile may have given a mix of old and new bytes.
        check_sources_unchanged(job.source.root, sources)
        if job.manifest_fields is not None:
            write_json(tmp / MANIFEST_NAME, {**job.manifest_fields, "files": files})
        journal.path.unlink()
        for folder in {tmp / part for part in shard_plans} | {tmp}:
            fsync_dir(folder)
        install(tmp, dst)
    except BaseException as exc:
        sink.abort()
        reader.shutdown(wait=True, cancel_futures=True)
        pool.shutdown(wait=True, cancel_futures=True)
        # An input problem (bad or changed source) makes the partial folder worthless; anything else (disk
        # full, Ctrl-C, a crash) keeps it, so --resume can pick up the finished shards.
        if isinstance(exc, Nvfp4CkptError):
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, CorruptFileError):
            # A source rewritten while being read looks truncated or corrupt: say that it changed, if it did.
            check_sources_unchanged(job.source.root, sources)
        if isinstance(exc, KeyboardInterrupt) and not isinstance(exc, InterruptedRun) and tmp.is_dir():
            size = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file() and not p.is_symlink())
            raise InterruptedRun(str(tmp), size, journal.count) from exc
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(
                f"{exc.filename or tmp}: no space left on device; free space on {dst.parent} (the output needs "
                f"{format_size(total_bytes)}) and rerun with resume=True to keep the {count(journal.count, 'finished shard')}"
            ) from exc
        raise
    pool.shutdown(wait=True)
    reader.shutdown(wait=True)
    report(Progress("done", len(all_groups), len(all_groups), total_bytes, total_bytes))
    return WriteResult(files, sorted(reused))


NO_SPACE_CHECK_ENV = "NVFP4CKPT_NO_SPACE_CHECK"


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still use on the file system holding ``path`` (its nearest existing
    folder): ``statvfs``'s ``f_bavail``."""
    while not path.exists() and path != path.parent:
        path = path.parent
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _tree_size(folder: Path) -> int:
    if folder.is_symlink() or not folder.is_dir():
        return 0
    return sum(p.lstat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def check_free_space(job: CheckpointJob, dst: Path, shard_plans: dict[str, list[ShardPlan]]) -> None:
    """Refuse, before anything is written, a destination whose file system cannot hold the output: filling it
    first would fail late and leave a partial folder that cannot be finished there. The output needs its tensor
    bytes, headers (estimated from the names) and the copied files; a partial folder of an earlier run counts as
    free (its finished shards are reused with ``--resume``, otherwise it is removed). ``NVFP4CKPT_NO_SPACE_CHECK=1``
    skips it, for file systems whose free space statvfs does not tell (compression, deduplication)."""
    if os.environ.get(NO_SPACE_CHECK_ENV, "") not in ("", "0"):
        return
    tensors = sum(t.nbytes for t in job.planned)
    shards = sum(len(p) for p in shard_plans.values())
    # each tensor's header entry and index line (name, dtype, shape, offsets), a manifest/journal line per shard
    headers = sum(2 * len(t.name) + 160 for t in job.planned) + 512 * shards + 64 * 1024
    root = job.source.root
    copied = sum((root / rel).stat().st_size for rel in other_files(root, _copied_skip(job)))
    written = sum(len(b) for b in (*job.files.values(), *job.unlisted_files.values()))
    need = tensors + headers + copied + written + len(json.dumps(job.config, indent=2))
    try:
        free = free_bytes(dst.parent) + _tree_size(partial_folder(dst))
    except OSError:
        return  # no statvfs here: the writer still reports a full disk when it happens
    if need > free:
        raise DiskFullError(
            f"{str(dst.parent)!r}: not enough free space for the output: it needs about {format_size(need)} and "
            f"the file system has {format_size(free)} free ({format_size(need - free)} missing); free space there "
            "or choose a destination on another file system"
        )


def _copied_skip(job: CheckpointJob) -> set[str]:
    return job.skip_files | {"config.json", INDEX_NAME, MANIFEST_NAME}


def _refuse_name_clashes(job: CheckpointJob, shard_plans: dict[str, list[ShardPlan]]) -> None:
    """A source entry that would be copied under a name the output writes itself (a folder ``model.safetensors/``
    next to an index, when the output is one shard) is refused before anything is written: the run would
    otherwise fail at the end, inside the partial folder, and every rerun the same way."""
    written = {"config.json", MANIFEST_NAME} if job.manifest_fields is not None else {"config.json"}
    written.update(name.split("/", 1)[0] for name in (*job.files, *job.unlisted_files))
    for part, plans in shard_plans.items():
        top = part.split("/", 1)[0] if part else None
        if top:
            written.add(top)
            continue
        written.update(p.filename for p in plans)
        if len(plans) > 1:
            written.add(INDEX_NAME)
    root = job.source.root
    for rel in other_files(root, _copied_skip(job)):
        if rel.parts[0] in written:
            raise InputError(
                f"{str(root / rel.parts[0])!r}: the source holds a {'folder' if len(rel.parts) > 1 else 'file'} named "
                f"like the output's {rel.parts[0]!r}, which nvfp4ckpt writes itself; move it out of the source folder "
                "and rerun"
            )


def _shard_name(part: str, plan: ShardPlan) -> str:
    return f"{part}/{plan.filename}" if part else plan.filename


class _CarriedPrefetch:
    """Reads the carried-over tensors' bytes ahead, in write order, on a reader thread (at most ``depth``
    blocks of ``block`` bytes in flight), so the main thread never waits on the source disk. Blocks of
    1 MiB or more are read into buffers of the sink's pool (``buffers``; power-of-two size classes), which
    come back once written and hashed, so the same few buffers serve the whole run (no page faults)."""

    def __init__(self, source: CheckpointFiles, tensors: list[PlannedTensor], pool: ThreadPoolExecutor,
                 buffers: BufferPool | None = None, depth: int = 4, block: int = 16 * 1024 * 1024) -> None:  # fmt: skip
        self.source = source
        self.buffers = buffers
        self.block = block
        self.pool = pool
        self.depth = depth
        self.chunks = iter([(t.name, off, min(block, t.nbytes - off)) for t in tensors for off in range(0, max(t.nbytes, 1), block)])
        self.pending: list[tuple[str, Future]] = []
        self._fill()

    def _read(self, name: str, offset: int, size: int) -> np.ndarray:
        if self.buffers is not None and size >= 1 << 20:
            buf = self.buffers.take(min(1 << (size - 1).bit_length(), max(self.block, size)))[:size]
        else:
            buf = np.empty(size, dtype=np.uint8)  # not zero-filled
        if size:
            self.source.pread_into(self.source.info(name), memoryview(buf), offset)
        return buf

    def _fill(self) -> None:
        while len(self.pending) < self.depth:
            nxt = next(self.chunks, None)
            if nxt is None:
                return
            self.pending.append((nxt[0], self.pool.submit(self._read, *nxt)))

    def blocks(self, name: str):
        """The blocks of tensor ``name`` (the next one in write order)."""
        info = self.source.info(name)
        got = 0
        while got < info.nbytes or (info.nbytes == 0 and got == 0):
            owner, future = self.pending.pop(0)
            if owner != name:
                raise RuntimeError(f"carried tensors out of order: expected {owner!r}, writing {name!r}")
            buf = future.result()
            self._fill()
            got += buf.size
            yield buf
            if info.nbytes == 0:
                return


class _PartCursor:
    """Walks one part's shard plans: opens the next shard when the previous one is full."""

    def __init__(self, root: Path, folder: Path, plans: list, metadata: dict[str, str], sink: AsyncSink, on_durable=None) -> None:
        make_folders(root, folder)  # a rank's sub-folder (ranks/rank-000): made here, never a planted symlink
        self.folder = folder
        self.plans = plans
        self.metadata = metadata
        self.sink = sink
        self.on_durable = on_durable  # called per shard once it is fsynced (journal entry)
        self.writers: list[ShardWriter] = []
        self.index = -1
        self.left = 0

    def writer_for(self, t: PlannedTensor) -> ShardWriter:
        if self.left == 0:
            self.index += 1
            plan = self.plans[self.index]
            self.writers.append(ShardWriter(self.folder / plan.filename, plan, self.metadata, self.sink))
            self.left = len(plan.tensors)
        return self.writers[-1]

    def advance(self) -> None:
        self.left -= 1
        if self.left == 0:
            self.writers[-1].close(self.on_durable)


class _GroupPipeline:
    """Computes groups (MoE layers) ahead on a thread pool, in the order they will be written, and
    hands out each group's tensors once; a group is dropped as soon as all its tensors are taken."""

    def __init__(
        self, job: CheckpointJob, order: list[str], pool: ThreadPoolExecutor, ahead: int, buffers: BufferPool | None = None
    ) -> None:
        self.job = job
        self.buffers = buffers  # where compute() takes its output buffers (io.out_buffer)
        self.order = order
        self.pool = pool
        self.ahead = ahead
        self.futures: dict[str, Future] = {}
        self.next_submit = 0
        self.current: str | None = None
        self.tensors: dict[str, Array] = {}
        self.groups_done = 0
        self.finished_group = False
        self._fill()  # start on the first layers now, while the tensors before them are copied

    def _fill(self) -> None:
        while self.next_submit < len(self.order) and len(self.futures) < self.ahead:
            group = self.order[self.next_submit]
            self.futures[group] = self.pool.submit(self._compute, group)
            self.next_submit += 1

    def _compute(self, group: str) -> dict[str, Array]:
        with buffers_from(self.buffers):
            return self.job.compute(group)

    def take(self, group: str, name: str) -> Array:
        if self.current != group:
            self.tensors = {}  # drop the previous layer before waiting for the next
            self._fill()
            future = self.futures.pop(group, None)
            self.tensors = future.result() if future is not None else self._compute(group)
            self.current = group
            self._fill()
        tensor = self.tensors.pop(name)
        self.finished_group = not self.tensors
        if self.finished_group:
            self.groups_done += 1
        return tensor



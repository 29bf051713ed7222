"""Writing a whole checkpoint folder safely: streaming shards, index, config, copied files,
manifest, all inside a temporary folder next to DST that is renamed into place at the end.

Used by both ``convert`` (source -> kernel layout) and ``revert`` (kernel layout -> source).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .descriptor import MANIFEST_NAME
from .errors import InputError, OutputExistsError
from .io import INDEX_NAME, AsyncSink, BufferPool, CheckpointFiles, PlannedTensor, ShardWriter, buffers_from, plan_shards


@dataclass
class Progress:
    """What a writer reports as it goes (the CLI draws bars from it)."""

    stage: str  # "plan" | "layer" | "bytes" | "done"
    layers_done: int = 0
    layers_total: int = 0
    bytes_done: int = 0
    bytes_total: int = 0


ProgressFn = Callable[[Progress], None]


@dataclass
class CheckpointJob:
    """Everything needed to write one output folder.

    ``planned`` lists every tensor in write order. A tensor whose key is in ``computed`` (key -> group)
    comes from ``compute(group)``, which returns all tensors of that group at once, keyed by
    ``PlannedTensor.key`` (one MoE layer, for every rank); every other tensor is copied byte for byte
    from ``source``. Tensors of different parts (sub-folders) may interleave: each part gets its own
    shards and index, written concurrently, so a layer is dropped once all its ranks have it.
    """

    source: CheckpointFiles
    planned: list[PlannedTensor]
    computed: dict[str, str]
    compute: Callable[[str], dict[str, torch.Tensor]]
    metadata: dict[str, str]
    config: dict
    max_shard_bytes: int
    manifest_fields: dict | None = None  # None: write no manifest
    part_metadata: dict[str, dict[str, str]] = field(default_factory=dict)  # extra header metadata per part
    skip_files: set[str] = field(default_factory=set)  # top-level names not to copy from the source folder


def check_destination(src: Path, dst: Path, overwrite: bool) -> None:
    s, d = src.resolve(), dst.resolve()
    if d == s or s in d.parents or d in s.parents:
        raise InputError(f"{dst}: the destination overlaps the source {src}; choose a folder outside it")
    if d.exists():
        if not d.is_dir():
            raise OutputExistsError(f"{dst}: exists and is not a folder; choose another destination")
        if any(d.iterdir()) and not overwrite:
            raise OutputExistsError(f"{dst}: exists and is not empty; pass --overwrite to replace it")


def write_checkpoint(
    job: CheckpointJob, dst: Path, progress: ProgressFn | None = None, workers: int = 1, overwrite: bool = False
) -> list[dict]:
    """Write the folder; returns the file list (name, size, sha256). DST must have been checked.

    Three things overlap: ``workers`` threads read and transform the next MoE layers (in plan order,
    at most ``workers`` ahead, so memory stays bounded), the main thread hands bytes over in plan
    order, and sink threads hash, write and fsync. The bytes never depend on ``workers``.
    """
    report = progress or (lambda p: None)
    parts: dict[str, list[PlannedTensor]] = {}
    for t in job.planned:
        parts.setdefault(t.part, []).append(t)
    shard_plans = {part: plan_shards(tensors, job.max_shard_bytes) for part, tensors in parts.items()}
    groups = list(dict.fromkeys(job.computed[t.key] for t in job.planned if t.key in job.computed))
    total_bytes = sum(t.nbytes for t in job.planned)
    report(Progress("plan", 0, len(groups), 0, total_bytes))
    dst.parent.mkdir(parents=True, exist_ok=True)
    with _destination_lock(dst):
        # Under the lock, so two runs into one DST cannot both pass the emptiness check.
        if dst.exists() and any(dst.iterdir()) and not overwrite:
            raise OutputExistsError(f"{dst}: exists and is not empty; pass --overwrite to replace it")
        return _write_locked(job, dst, shard_plans, groups, total_bytes, report, workers)


@contextmanager
def _destination_lock(dst: Path):
    lock = dst.parent / f".{dst.name}.nvfp4ckpt-lock"
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        raise OutputExistsError(
            f"{dst}: another nvfp4ckpt run is writing it (lock file {lock}); wait for it, or delete the lock "
            "if no such run is alive"
        ) from None
    try:
        os.write(fd, f"{os.getpid()}\n".encode())
        os.close(fd)
        yield
    finally:
        try:
            os.unlink(lock)
        except FileNotFoundError:
            pass


def _write_locked(job, dst, shard_plans, groups, total_bytes, report, workers) -> list[dict]:
    tmp = dst.parent / f".{dst.name}.nvfp4ckpt-partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    files: list[dict] = []
    sink = AsyncSink(threaded=True)
    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="nvfp4ckpt-layer")
    reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nvfp4ckpt-read")
    try:
        cache = _GroupPipeline(job, groups, pool, max(1, workers), sink.buffers)
        carried = _CarriedPrefetch(job.source, [t for t in job.planned if t.key not in job.computed], reader, sink.buffers)
        cursors = {
            part: _PartCursor(tmp / part if part else tmp, plans, {**job.metadata, **job.part_metadata.get(part, {})}, sink)
            for part, plans in shard_plans.items()
        }
        done = 0
        for t in job.planned:
            writer = cursors[t.part].writer_for(t)
            group = job.computed.get(t.key)
            if group is None:
                writer.write_blocks(t.name, carried.blocks(t.name))
            else:
                writer.write(t.name, cache.take(group, t.key))
                if cache.finished_group:
                    report(Progress("layer", cache.groups_done, len(groups), done, total_bytes))
            cursors[t.part].advance()
            done += t.nbytes
            report(Progress("bytes", cache.groups_done, len(groups), done, total_bytes))
        sink.drain()
        for part, plans in shard_plans.items():
            folder = tmp / part if part else tmp
            prefix = f"{part}/" if part else ""
            for plan, writer in zip(plans, cursors[part].writers):
                files.append({"name": prefix + plan.filename, "size": (folder / plan.filename).stat().st_size, "sha256": writer.sha256})
            if len(plans) > 1:
                index = {
                    "metadata": {"total_size": sum(p.nbytes for p in plans)},
                    "weight_map": {t.name: p.filename for p in plans for t in p.tensors},
                }
                entry = write_json(folder / INDEX_NAME, index)
                files.append({**entry, "name": prefix + entry["name"]})
        files.append(write_json(tmp / "config.json", job.config))
        files.extend(copy_other_files(job.source.root, tmp, job.skip_files | {"config.json", INDEX_NAME, MANIFEST_NAME}))
        files.sort(key=lambda f: f["name"])
        if job.manifest_fields is not None:
            write_json(tmp / MANIFEST_NAME, {**job.manifest_fields, "files": files})
        for folder in {tmp / part for part in shard_plans}:
            fsync_dir(folder)
        install(tmp, dst)
    except BaseException:
        sink.abort()
        reader.shutdown(wait=True, cancel_futures=True)
        pool.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    pool.shutdown(wait=True)
    reader.shutdown(wait=True)
    report(Progress("done", len(groups), len(groups), total_bytes, total_bytes))
    return files


class _CarriedPrefetch:
    """Reads the carried-over tensors' bytes ahead, in write order, on a reader thread (at most ``depth``
    blocks of ``block`` bytes in flight), so the main thread never waits on the source disk. Blocks of
    1 MiB or more are read into buffers of the sink's pool (``buffers``; power-of-two size classes), which
    come back once written and hashed, so the same few buffers serve the whole run (no page faults)."""

    def __init__(self, source: CheckpointFiles, tensors: list[PlannedTensor], pool: ThreadPoolExecutor,
                 buffers: BufferPool | None = None, depth: int = 4, block: int = 64 * 1024 * 1024) -> None:  # fmt: skip
        self.source = source
        self.buffers = buffers
        self.block = block
        self.pool = pool
        self.depth = depth
        self.chunks = iter([(t.name, off, min(block, t.nbytes - off)) for t in tensors for off in range(0, max(t.nbytes, 1), block)])
        self.pending: list[tuple[str, Future]] = []
        self._fill()

    def _read(self, name: str, offset: int, size: int) -> torch.Tensor:
        if self.buffers is not None and size >= 1 << 20:
            buf = self.buffers.take(min(1 << (size - 1).bit_length(), max(self.block, size)))[:size]
        else:
            buf = torch.empty(size, dtype=torch.uint8)  # not zero-filled
        if size:
            self.source.pread_into(self.source.info(name), memoryview(buf.numpy()), offset)
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
            got += buf.numel()
            yield buf
            if info.nbytes == 0:
                return


class _PartCursor:
    """Walks one part's shard plans: opens the next shard when the previous one is full."""

    def __init__(self, folder: Path, plans: list, metadata: dict[str, str], sink: AsyncSink) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.plans = plans
        self.metadata = metadata
        self.sink = sink
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
            self.writers[-1].close()


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
        self.tensors: dict[str, torch.Tensor] = {}
        self.groups_done = 0
        self.finished_group = False
        self._fill()  # start on the first layers now, while the tensors before them are copied

    def _fill(self) -> None:
        while self.next_submit < len(self.order) and len(self.futures) < self.ahead:
            group = self.order[self.next_submit]
            self.futures[group] = self.pool.submit(self._compute, group)
            self.next_submit += 1

    def _compute(self, group: str) -> dict[str, torch.Tensor]:
        with buffers_from(self.buffers):
            return self.job.compute(group)

    def take(self, group: str, name: str) -> torch.Tensor:
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


def install(tmp: Path, dst: Path) -> None:
    """Move the finished temporary folder into place (replacing an old DST only now)."""
    old = None
    if dst.exists():
        old = dst.parent / f".{dst.name}.nvfp4ckpt-old-{os.getpid()}"
        os.replace(dst, old)
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
    path.write_bytes(raw)
    return {"name": path.name, "size": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}


def copy_other_files(src: Path, dst: Path, skip_top_level: set[str]) -> list[dict]:
    """Tokenizer, generation config, code, ...: every file that is not a weight shard."""
    out = []
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        if rel.name.endswith(".safetensors") or rel.parts[0] in skip_top_level:
            continue
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        with open(path, "rb") as fi, open(target, "wb") as fo:
            while block := fi.read(16 * 1024 * 1024):
                digest.update(block)
                fo.write(block)
        shutil.copystat(path, target)
        out.append({"name": rel.as_posix(), "size": target.stat().st_size, "sha256": digest.hexdigest()})
    return out

"""Writing a whole checkpoint folder safely: streaming shards, index, config, copied files,
manifest, all inside a temporary folder next to DST that is renamed into place at the end.

Used by both ``convert`` (source -> kernel layout) and ``revert`` (kernel layout -> source).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .descriptor import MANIFEST_NAME
from .errors import InputError, OutputExistsError
from .io import INDEX_NAME, AsyncSink, CheckpointFiles, PlannedTensor, ShardWriter, plan_shards


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

    ``planned`` lists every tensor in write order. A tensor named in ``computed`` (name -> group)
    comes from ``compute(group)``, which returns all tensors of that group at once (one MoE layer);
    every other tensor is copied byte for byte from ``source``.
    """

    source: CheckpointFiles
    planned: list[PlannedTensor]
    computed: dict[str, str]
    compute: Callable[[str], dict[str, torch.Tensor]]
    metadata: dict[str, str]
    config: dict
    max_shard_bytes: int
    manifest_fields: dict | None = None  # None: write no manifest
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
    job: CheckpointJob, dst: Path, progress: ProgressFn | None = None, workers: int = 1
) -> list[dict]:
    """Write the folder; returns the file list (name, size, sha256). DST must have been checked.

    Three things overlap: ``workers`` threads read and transform the next MoE layers (in plan order,
    at most ``workers`` ahead, so memory stays bounded), the main thread hands bytes over in plan
    order, and one sink thread hashes, writes and fsyncs. The bytes never depend on ``workers``.
    """
    report = progress or (lambda p: None)
    shards = plan_shards(job.planned, job.max_shard_bytes)
    groups = list(dict.fromkeys(job.computed[t.name] for s in shards for t in s.tensors if t.name in job.computed))
    total_bytes = sum(s.nbytes for s in shards)
    report(Progress("plan", 0, len(groups), 0, total_bytes))
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.nvfp4ckpt-partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    files: list[dict] = []
    sink = AsyncSink(threaded=True)
    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="nvfp4ckpt-layer")
    try:
        cache = _GroupPipeline(job, groups, pool, max(1, workers))
        done = 0
        writers = []
        for shard in shards:
            writer = ShardWriter(tmp / shard.filename, shard, job.metadata, sink)
            writers.append(writer)
            for t in shard.tensors:
                group = job.computed.get(t.name)
                if group is None:
                    writer.copy_from(job.source, job.source.info(t.name))
                else:
                    writer.write(t.name, cache.take(group, t.name))
                    if cache.finished_group:
                        report(Progress("layer", cache.groups_done, len(groups), done, total_bytes))
                done += t.nbytes
                report(Progress("bytes", cache.groups_done, len(groups), done, total_bytes))
            writer.close()
        sink.drain()
        for shard, writer in zip(shards, writers):
            files.append({"name": shard.filename, "size": (tmp / shard.filename).stat().st_size, "sha256": writer.sha256})
        if len(shards) > 1:
            index = {"metadata": {"total_size": total_bytes}, "weight_map": {t.name: s.filename for s in shards for t in s.tensors}}
            files.append(write_json(tmp / INDEX_NAME, index))
        files.append(write_json(tmp / "config.json", job.config))
        files.extend(copy_other_files(job.source.root, tmp, job.skip_files | {"config.json", INDEX_NAME, MANIFEST_NAME}))
        files.sort(key=lambda f: f["name"])
        if job.manifest_fields is not None:
            write_json(tmp / MANIFEST_NAME, {**job.manifest_fields, "files": files})
        fsync_dir(tmp)
        install(tmp, dst)
    except BaseException:
        sink.abort()
        pool.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    pool.shutdown(wait=True)
    report(Progress("done", len(groups), len(groups), total_bytes, total_bytes))
    return files


class _GroupPipeline:
    """Computes groups (MoE layers) ahead on a thread pool, in the order they will be written, and
    hands out each group's tensors once; a group is dropped as soon as all its tensors are taken."""

    def __init__(self, job: CheckpointJob, order: list[str], pool: ThreadPoolExecutor, ahead: int) -> None:
        self.job = job
        self.order = order
        self.pool = pool
        self.ahead = ahead
        self.futures: dict[str, Future] = {}
        self.next_submit = 0
        self.current: str | None = None
        self.tensors: dict[str, torch.Tensor] = {}
        self.groups_done = 0
        self.finished_group = False

    def _fill(self) -> None:
        while self.next_submit < len(self.order) and len(self.futures) < self.ahead:
            group = self.order[self.next_submit]
            self.futures[group] = self.pool.submit(self.job.compute, group)
            self.next_submit += 1

    def take(self, group: str, name: str) -> torch.Tensor:
        if self.current != group:
            self.tensors = {}  # drop the previous layer before waiting for the next
            self._fill()
            future = self.futures.pop(group, None)
            self.tensors = future.result() if future is not None else self.job.compute(group)
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
        if rel.name.endswith(".safetensors") or (len(rel.parts) == 1 and rel.name in skip_top_level):
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

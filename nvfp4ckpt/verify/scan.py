"""One read of every file for ``verify``: each converted file is hashed (sha256, for the manifest) while its tensors
are handed to the layout comparison and the numerics, and the source is read once, beside it.

Files are read on ``workers`` threads (hashlib and ``preadv`` release the GIL, so several files hash at once); a
MoE layer's canonical tensors are collected as they are read and, once complete, compared (and run, for sampled
numerics) on a second pool of two threads, then dropped. At most ``LAYERS_WAITING`` complete layers wait (a reader
that completes another one blocks), so peak memory is a few layers plus one read block per thread, whatever the
number of layers. Carried-over tensors are compared block by block
against the same byte range of the source tensor.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from .._lazy import torch

from ..io import CheckpointFiles, TensorInfo, byte_view, torch_dtype
from ..io.reader import pread_exact
from ..layouts.trtllm_gen.converted import ConvertedCheckpoint
from ..layouts.trtllm_gen.descriptor import LayerInfo
from ..progress import TickFn
from ..source.checkpoint import SourceCheckpoint

BLOCK = 16 * 1024 * 1024  # read and hash block; also the carried-tensor comparison unit

LayerFn = Callable[[LayerInfo, dict], None]  # (layer, its canonical tensors by short name) -> None; runs on the pool


LAYERS_WAITING = 2  # complete layers queued for or in ``on_layer``; with the readers' partial layers, the memory bound


def default_workers() -> int:
    """Reader threads: 2 (two files hashed at once). Each reader can hold one partly read MoE layer, so peak
    memory is about (readers + LAYERS_WAITING) layers' canonical tensors: more readers hash faster on a
    checkpoint of many files but hold more (a DeepSeek-V3 layer is 6.3 GB)."""
    return 2


@dataclass
class ScanResult:
    digests: dict[str, str] = field(default_factory=dict)  # path relative to the checkpoint root -> sha256
    carried_problems: list[str] = field(default_factory=list)
    bytes_read: int = 0
    seconds: float = 0.0


@dataclass
class _Collector:
    """A layer's canonical tensors as they arrive from the reader threads."""

    layer: LayerInfo
    wanted: set[str]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


def scan_checkpoint(
    ckpt: ConvertedCheckpoint,
    *,
    names: list[str],
    hash_files: bool = True,
    src: SourceCheckpoint | None = None,
    on_layer: LayerFn | None = None,
    layers: list[LayerInfo] = (),
    workers: int | None = None,
    tick: TickFn | None = None,
) -> ScanResult:
    """Read every file in ``names`` (relative to the root) once: sha256 of each (unless not ``hash_files``:
    ``--no-hash`` still reads the files for the layout and numerics); with ``src``, carried-over
    tensors compared with the source's; the canonical tensors of ``layers`` (unsharded layers only) given whole to
    ``on_layer`` on a worker pool. Exceptions of ``on_layer`` propagate."""
    start = time.perf_counter()
    workers = workers or default_workers()
    result = ScanResult()
    lock = threading.Lock()
    owner: dict[str, tuple[_Collector, str]] = {}
    for layer in layers:
        canonical = layer.tensor_names(ckpt.source_format)
        col = _Collector(layer, {n[len(layer.prefix) + 1 :] for n in canonical})
        for full in canonical:
            owner[full] = (col, full[len(layer.prefix) + 1 :])
    by_path: dict[Path, tuple[CheckpointFiles, list[TensorInfo]]] = {}  # each safetensors file: its tensors by offset
    for files in [ckpt.files, *ckpt.rank_files.values()]:
        per_file: dict[Path, list[TensorInfo]] = {}
        for info in files.tensors.values():
            per_file.setdefault(info.file, []).append(info)
        for fname in files.files:
            infos = sorted(per_file.get(files.root / fname, []), key=lambda i: i.begin)
            by_path[(files.root / fname).resolve()] = (files, infos)
    carried = {n for n in src.files.tensors if n not in src.expert_tensor_names} if src is not None else set()
    total = sum((ckpt.root / n).stat().st_size for n in names)
    done = [0]
    room = threading.Semaphore(LAYERS_WAITING)
    futures: list[Future] = []
    layer_pool = ThreadPoolExecutor(max_workers=LAYERS_WAITING, thread_name_prefix="verify-layer")

    def progress(n: int) -> None:
        with lock:
            done[0] += n
            result.bytes_read += n
        if tick is not None:
            tick("read and hash", done[0], total)

    def finished(col: _Collector) -> None:
        def run() -> None:
            try:
                on_layer(col.layer, col.tensors)
            finally:
                col.tensors = {}
                room.release()

        room.acquire()
        futures.append(layer_pool.submit(run))

    def scan_file(name: str) -> tuple[str, str]:
        path = ckpt.root / name
        files, infos = by_path.get(path.resolve(), (None, []))
        digest = hashlib.sha256() if hash_files else _NoHash()
        buf = bytearray(BLOCK)
        other = bytearray(BLOCK) if carried else None
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            pos = 0
            for info in infos:
                pos = _hash_range(fd, pos, info.begin, buf, digest, progress)  # header (and any gap)
                hit = owner.get(info.name) if files is ckpt.files else None
                if hit is not None and on_layer is not None:
                    col, short = hit
                    tensor = torch.empty(info.shape, dtype=torch_dtype(info.dtype))
                    view = byte_view(tensor)
                    pread_exact(fd, view, info.begin, f"{info.file}: tensor {info.name!r}")
                    digest.update(view)
                    progress(info.nbytes)
                    with lock:
                        col.tensors[short] = tensor
                        complete = set(col.tensors) >= col.wanted
                    if complete:
                        finished(col)
                elif info.name in carried and files is ckpt.files:
                    problem = _hash_and_compare(fd, info, src.files, buf, other, digest, progress)
                    if problem:
                        with lock:
                            result.carried_problems.append(problem)
                else:
                    _hash_range(fd, info.begin, info.end, buf, digest, progress)
                pos = info.end
            _hash_range(fd, pos, size, buf, digest, progress)
        finally:
            os.close(fd)
        return name, digest.hexdigest()

    try:
        # Largest files first: the last thread to finish is then the one with the least left.
        order = sorted(names, key=lambda n: -(ckpt.root / n).stat().st_size)
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="verify-read") as pool:
            for name, hexdigest in pool.map(scan_file, order):
                if hash_files:
                    result.digests[name] = hexdigest
        for f in futures:
            f.result()
    finally:
        layer_pool.shutdown(wait=True)
    result.seconds = time.perf_counter() - start
    return result


class _NoHash:
    def update(self, data) -> None:
        pass

    def hexdigest(self) -> str:
        return ""


def _hash_range(fd: int, begin: int, end: int, buf: bytearray, digest, progress: Callable[[int], None]) -> int:
    view = memoryview(buf)
    pos = begin
    while pos < end:
        n = os.preadv(fd, [view[: min(len(buf), end - pos)]], pos)
        if n <= 0:
            break  # truncated: the digest then differs from the manifest's
        digest.update(view[:n])
        progress(n)
        pos += n
    return end


def _hash_and_compare(
    fd: int, info: TensorInfo, src: CheckpointFiles, buf: bytearray, other: bytearray, digest, progress
) -> str | None:
    """Hash a carried-over tensor's bytes and compare them, block by block, with the source tensor's."""
    want = src.info(info.name)
    problem = None
    if want.dtype != info.dtype or want.shape != info.shape:
        problem = f"{info.name}: carried-over tensor differs from the source"
    view, oview = memoryview(buf), memoryview(other)
    off = 0
    while off < info.nbytes:
        n = min(len(buf), info.nbytes - off)
        pread_exact(fd, view[:n], info.begin + off, f"{info.file}: tensor {info.name!r}")
        digest.update(view[:n])
        progress(n)
        if problem is None:
            src.pread_into(want, oview[:n], off)
            if not np.array_equal(np.frombuffer(buf, np.uint8, n), np.frombuffer(other, np.uint8, n)):
                problem = f"{info.name}: carried-over tensor differs from the source"
        off += n
    return problem

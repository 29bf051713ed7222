"""Streaming shard files to disk: ``ShardWriter`` (header first, then tensor bytes in plan order) and
``AsyncSink`` (write, hash and fsync on their own threads)."""

from __future__ import annotations

import ctypes
import hashlib
import os
import threading
from pathlib import Path
from typing import Callable

import numpy as np

from .._lazy import torch_tensor_type
from ..errors import UnsafePathError
from .buffers import BufferPool, byte_view
from .header import Array
from .plan import ShardPlan, encode_header


class ShardWriter:
    """Writes one planned shard: header first, then tensor bytes strictly in plan order.

    With a ``sink`` (an :class:`AsyncSink`) hashing and writing happen on the sink's thread, so the
    caller can read and transform the next tensors meanwhile; without one they happen inline.
    """

    def __init__(self, path: Path, plan: ShardPlan, metadata: dict[str, str], sink: "AsyncSink | None" = None) -> None:
        self.path = path
        self.plan = plan
        self._next = 0
        self._sink = sink or AsyncSink(threaded=False)
        self._file = self._sink.open(path)
        self._sink.put(self._file, encode_header(plan.tensors, metadata))

    @property
    def sha256(self) -> str:
        return self._file.sha256

    def write(self, name: str, data: Array | bytes) -> None:
        """Queue one tensor's bytes: a numpy array or torch tensor (any dtype: only its bytes count,
        the header says the dtype) or ``bytes``."""
        expected = self.plan.tensors[self._next]
        if expected.name != name:
            raise RuntimeError(f"shard writer expected {expected.name!r}, got {name!r}")
        tensor_type = torch_tensor_type()
        if isinstance(data, np.ndarray) or (tensor_type is not None and isinstance(data, tensor_type)):
            if isinstance(data, np.ndarray):
                t = np.ascontiguousarray(data)
            else:
                t = data.contiguous()
                if t.device.type != "cpu":
                    t = t.cpu()
            mv = byte_view(t)
            # A buffer of the sink's pool goes back to it once both sink threads are done with these bytes.
            keep = (self._sink.buffers.lease(t) if self._sink.buffers is not None else None) or t
        else:
            mv = memoryview(data)
            keep = data
        if mv.nbytes != expected.nbytes:
            raise RuntimeError(f"{name}: {mv.nbytes} bytes produced, {expected.nbytes} planned")
        self._sink.put(self._file, mv, keep)
        self._next += 1

    def write_blocks(self, name: str, blocks) -> None:
        """Write one tensor given as consecutive uint8 blocks (already read, e.g. by a prefetching thread)."""
        expected = self.plan.tensors[self._next]
        if expected.name != name:
            raise RuntimeError(f"shard writer expected {expected.name!r}, got {name!r}")
        total = 0
        for block in blocks:  # flat uint8 numpy arrays
            if block.size:
                keep = (self._sink.buffers.lease(block) if self._sink.buffers is not None else None) or block
                self._sink.put(self._file, memoryview(block), keep)
            total += block.size
        if total != expected.nbytes:
            raise RuntimeError(f"{name}: {total} bytes produced, {expected.nbytes} planned")
        self._next += 1

    def close(self, on_durable: "Callable[[_SinkFile], None] | None" = None) -> None:
        """Queue the end of the file (flush + fsync happen on the sink). ``on_durable(file)`` runs once the
        file is hashed, written and fsynced (on the sink's fsync thread): the resume journal hooks in here."""
        if self._next != len(self.plan.tensors):
            missing = self.plan.tensors[self._next].name
            raise RuntimeError(f"shard {self.path.name} closed before {missing!r} was written")
        self._sink.finish(self._file, on_durable)

    def abort(self) -> None:
        self._sink.abort()


class _SinkFile:
    written = 0  # bytes written so far, and how many of them were handed to write-back (AsyncSink._wrote)
    flushed = 0

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = create_file(path)
        self.hash = hashlib.sha256()
        self.sha256 = ""
        self.hashed = threading.Event()  # set once sha256 is final


class AsyncSink:
    """Writes byte blocks in order on one thread and hashes them on another (both release the GIL),
    then fsyncs each finished file on a third, so disk flushes overlap the rest of the work; every
    ``_WRITEBACK_BYTES`` written, the third thread also starts the disk write of that range, so the disk
    works while the rest is computed and the final fsync has little left.
    ``drain()`` waits for all of it and re-raises the first error. ``buffers`` is the pool that layer
    computations take their output buffers from (see :func:`out_buffer`)."""

    _STOP = object()

    def __init__(self, threaded: bool = True, depth: int = 8) -> None:
        import queue

        self.threaded = threaded
        self.buffers: BufferPool | None = BufferPool() if threaded else None
        self._error: BaseException | None = None
        self._queues: list[queue.Queue] = []
        self._threads: list[threading.Thread] = []
        self._fsync_pool = None
        if threaded:
            from concurrent.futures import ThreadPoolExecutor

            self._fsync_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nvfp4ckpt-fsync")
            self._fsyncs: list = []
            for target in (self._write_loop, self._hash_loop):
                q: queue.Queue = queue.Queue(maxsize=depth)
                t = threading.Thread(target=target, args=(q,), daemon=True, name=f"nvfp4ckpt-{target.__name__}")
                self._queues.append(q)
                self._threads.append(t)
                t.start()

    def open(self, path: Path) -> _SinkFile:
        self._raise()
        return _SinkFile(path)

    def put(self, f: _SinkFile, data, keep=None) -> None:
        self._raise()
        if not self.threaded:
            f.hash.update(data)
            write_all(f.fd, data)
            return
        for q in self._queues:
            q.put(("data", f, data, keep))

    def finish(self, f: _SinkFile, on_durable: "Callable[[_SinkFile], None] | None" = None) -> None:
        self._raise()
        if not self.threaded:
            os.fsync(f.fd)
            os.close(f.fd)
            f.sha256 = f.hash.hexdigest()
            f.hashed.set()
            if on_durable is not None:
                on_durable(f)
            return
        for q in self._queues:
            q.put(("finish", f, on_durable, None))

    def _write_loop(self, q) -> None:
        while (item := q.get()) is not self._STOP:
            op, f, data, _keep = item
            if self._error is not None:
                continue
            try:
                if op == "data":
                    write_all(f.fd, data)
                    self._wrote(f, data)
                else:
                    self._fsyncs.append(self._fsync_pool.submit(_fsync_close, f.fd, f, data))
            except BaseException as exc:  # reported to the producer by _raise()/drain()
                if isinstance(exc, OSError) and exc.filename is None:
                    exc.filename = str(f.path)  # os.write does not say which file was full
                self._error = exc

    def _wrote(self, f: _SinkFile, data) -> None:
        f.written += memoryview(data).nbytes
        if f.written - f.flushed >= _WRITEBACK_BYTES:
            # On the fsync thread, which may block on a full disk queue; in order, so before this file's fsync.
            self._fsync_pool.submit(_start_writeback, f.fd, f.flushed, f.written - f.flushed)
            f.flushed = f.written

    def _hash_loop(self, q) -> None:
        while (item := q.get()) is not self._STOP:
            op, f, data, _keep = item
            if op == "data":
                f.hash.update(data)
            else:
                f.sha256 = f.hash.hexdigest()
                f.hashed.set()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def drain(self) -> None:
        """Wait until everything queued is hashed, written and fsynced; re-raise a write error."""
        self._stop_threads()
        if self._fsync_pool is not None:
            for fut in self._fsyncs:
                fut.result()
            self._fsync_pool.shutdown(wait=True)
        self._raise()

    def abort(self) -> None:
        if self.threaded:
            self._error = self._error or RuntimeError("aborted")
        self._stop_threads()
        if self._fsync_pool is not None:
            self._fsync_pool.shutdown(wait=True)

    def _stop_threads(self) -> None:
        for q, t in zip(self._queues, self._threads):
            if t.is_alive():
                q.put(self._STOP)
                t.join()


_WRITEBACK_BYTES = 32 * 1024 * 1024
_SYNC_FILE_RANGE_WRITE = 2
try:  # Linux: start write-back of a range without waiting for it (not in the os module)
    _sync_file_range = ctypes.CDLL(None, use_errno=True).sync_file_range
    _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    _sync_file_range.restype = ctypes.c_int
except (OSError, AttributeError):
    _sync_file_range = None


def _start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Start (not wait for) the disk write of a range just written, so the disk works while the next bytes
    are produced rather than all at the final fsync. Best effort: fsync still makes the file durable."""
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)


_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def create_file(path: Path) -> int:
    """A new file's descriptor (write-only). Exclusive and no-follow: a file or symlink planted at ``path``
    (e.g. pointing into the source) is refused with ``UnsafePathError``, never truncated or written through."""
    try:
        return os.open(path, _NEW_FILE, 0o644)
    except FileExistsError:
        raise UnsafePathError(f"{path}: already exists (nvfp4ckpt only creates new files here); remove it and rerun") from None
    except OSError:
        if os.path.islink(path):
            raise UnsafePathError(f"{path}: is a symbolic link nvfp4ckpt did not make; remove it and rerun") from None
        raise


def write_new(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file (see ``create_file``)."""
    fd = create_file(path)
    try:
        write_all(fd, data)
    finally:
        os.close(fd)


def write_all(fd: int, data) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _fsync_close(fd: int, f: _SinkFile | None = None, on_durable=None) -> None:
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    if on_durable is not None and f is not None:
        f.hashed.wait()  # the hash thread finishes the digest independently of the writer
        on_durable(f)


def sha256_file(path: Path) -> str:
    """sha256 of a whole file, read in 16 MB blocks (manifest checks, resume)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(16 * 1024 * 1024):
            digest.update(block)
    return digest.hexdigest()



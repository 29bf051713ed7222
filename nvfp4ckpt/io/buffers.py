"""Output and scratch buffers: pooled, reused across MoE layers, viewed as bytes without a copy."""

from __future__ import annotations

import math
import mmap
import threading
from contextlib import contextmanager

import numpy as np

from .._lazy import torch, torch_tensor_type


from .header import Array


def byte_view(data: Array) -> memoryview:
    """The bytes of a contiguous numpy array or CPU torch tensor, without a copy (torch stays unimported
    for numpy input)."""
    tensor_type = torch_tensor_type()
    if tensor_type is not None and isinstance(data, tensor_type):
        if not data.is_contiguous() or data.device.type != "cpu":
            raise ValueError("byte_view needs a contiguous CPU tensor")
        data = data.reshape(-1).view(torch.uint8).numpy()
    if not data.flags.c_contiguous:
        raise ValueError("byte_view needs a contiguous array")
    return memoryview(data.reshape(-1).view(np.uint8))


def _data_ptr(data: Array) -> int:
    """Address of the first byte of the memory block a numpy array or torch tensor lives in."""
    tensor_type = torch_tensor_type()
    if tensor_type is not None and isinstance(data, tensor_type):
        return data.untyped_storage().data_ptr()
    return data.__array_interface__["data"][0]


class BufferPool:
    """Output buffers reused across MoE layers: a layer's output tensors are written into buffers that
    earlier layers used (already faulted in, so no first-touch page faults and no zeroing), and a buffer
    returns to the pool once the sink has written and hashed it. Buffers are made only when none of the
    size is free, and at most ``keep_free`` free ones per size are kept, so the pool never holds more than
    the buffers in flight plus a few; it is dropped with the run."""

    keep_free = 2  # free buffers kept per size: more go back to the system (bounds the pool after a burst)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: dict[int, list[np.ndarray]] = {}
        self._out: dict[int, np.ndarray] = {}

    def take(self, nbytes: int) -> np.ndarray:
        """A flat uint8 buffer of ``nbytes``, uninitialised."""
        with self._lock:
            free = self._free.get(nbytes)
            buf = free.pop() if free else None
        if buf is None:
            buf = _anonymous_buffer(nbytes)
        if nbytes:
            with self._lock:
                self._out[_data_ptr(buf)] = buf
        return buf

    def lease(self, t: Array) -> "_Lease | None":
        """For an array (or tensor) over a buffer of this pool: an object that keeps it alive and gives the
        buffer back when it is itself dropped (pass it as the sink's ``keep``: the queue items hold it
        until both sink threads are done with the bytes). None for any other array."""
        ptr = _data_ptr(t)
        with self._lock:
            if ptr not in self._out:
                return None
        return _Lease(t, self, ptr)

    def _give(self, ptr: int) -> None:
        with self._lock:
            buf = self._out.pop(ptr, None)
            free = self._free.setdefault(buf.size, []) if buf is not None else None
            if free is not None and len(free) < self.keep_free:
                free.append(buf)  # else dropped (unmapped): in steady state a few per size are reused


class _Lease:
    __slots__ = ("tensor", "pool", "ptr")

    def __init__(self, tensor: Array, pool: BufferPool, ptr: int) -> None:
        self.tensor, self.pool, self.ptr = tensor, pool, ptr

    def __del__(self) -> None:
        self.pool._give(self.ptr)


def _anonymous_buffer(nbytes: int) -> np.ndarray:
    if nbytes == 0:
        return np.empty(0, dtype=np.uint8)
    # Private, not mmap's default MAP_SHARED: a shared anonymous map is shmem, faulted in 4 KiB pages that
    # transparent huge pages never back (perf showed shmem faults and page clearing as a tenth of convert's time).
    mm = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            mm.madvise(mmap.MADV_HUGEPAGE)  # fewer page faults the first time it is filled
        except OSError:
            pass
    return np.frombuffer(mm, dtype=np.uint8)  # writable: the map is


_local = threading.local()


@contextmanager
def buffers_from(pool: BufferPool | None):
    """Inside the block, :func:`out_buffer` on this thread takes its buffers from ``pool``."""
    prev = getattr(_local, "pool", None)
    _local.pool = pool
    try:
        yield
    finally:
        _local.pool = prev


def out_buffer(shape: tuple[int, ...]) -> np.ndarray:
    """An uninitialised contiguous uint8 array for an output tensor's bytes: from the writer's buffer pool
    when the calling thread computes for a writer (see :func:`buffers_from`), else a fresh one. One buffer
    per output tensor: the pool takes it back once that tensor is written."""
    pool = getattr(_local, "pool", None)
    if pool is None:
        return np.empty(shape, dtype=np.uint8)
    return pool.take(math.prod(shape)).reshape(shape)


@contextmanager
def scratch_buffer(nbytes: int):
    """A flat uint8 buffer for the duration of the block (source bytes of a layer): from the calling thread's
    pool (see :func:`buffers_from`), which gets it back at the end of the block, else a fresh one."""
    pool = getattr(_local, "pool", None)
    if pool is None or nbytes == 0:
        yield np.empty(nbytes, dtype=np.uint8)
        return
    buf = pool.take(nbytes)
    try:
        yield buf
    finally:
        pool._give(_data_ptr(buf))



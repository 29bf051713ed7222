"""Safetensors files read and written as raw bytes.

Reading parses and validates every header up front (so a corrupt or truncated file fails before
any output is written) and then reads tensor bytes by offset, never whole files. Writing is
streaming: the shard plan (names, dtypes, shapes) is known before any data is produced, so each
shard's header is written first and tensor bytes are appended as they are computed. Carried-over
tensors are copied byte-for-byte, whatever their dtype.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import math
import mmap
import os
import struct
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Union

import numpy as np

from ._lazy import torch, torch_tensor_type

from .errors import CorruptFileError, MissingTensorError

if TYPE_CHECKING:
    import torch as _torch

# A tensor's bytes in memory: a numpy array on the CPU fast path (torch is never imported there), a torch
# tensor elsewhere. Readers and writers below take either; only the bytes count, dtypes come from headers.
Array = Union[np.ndarray, "_torch.Tensor"]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_MAX_HEADER = 100 * 1024 * 1024

_TORCH_DTYPE_NAMES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "I32": "int32", "I64": "int64",
    "F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}  # fmt: skip


_NUMPY_DTYPES = {
    "BOOL": np.bool_, "U8": np.uint8, "I8": np.int8, "I16": np.int16, "U16": np.uint16, "I32": np.int32,
    "U32": np.uint32, "I64": np.int64, "U64": np.uint64, "F16": np.float16, "F32": np.float32, "F64": np.float64,
}  # fmt: skip


def as_float32(x: Array) -> Array:
    """``x`` as float32, staying a numpy array or a torch tensor (no copy when it already is float32)."""
    return x.astype(np.float32, copy=False) if isinstance(x, np.ndarray) else x.float()


def torch_dtype(name: str) -> "torch.dtype":
    """The torch dtype of a safetensors dtype string (imports torch)."""
    return getattr(torch, _TORCH_DTYPE_NAMES[name])


def dtype_name(dtype: "torch.dtype") -> str:
    """The safetensors dtype string of a torch dtype."""
    return next(k for k, v in _TORCH_DTYPE_NAMES.items() if getattr(torch, v) == dtype)


DTYPE_SIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes live."""

    name: str
    dtype: str  # safetensors dtype string, e.g. "U8", "F8_E4M3"
    shape: tuple[int, ...]
    file: Path
    begin: int  # absolute byte offset in file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header: returns tensors by name and the metadata."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise CorruptFileError(f"{path}: file is truncated (no safetensors header); re-download or re-export it")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > _MAX_HEADER or 8 + header_len > size:
                raise CorruptFileError(
                    f"{path}: header length {header_len} does not fit the file ({size} bytes); the file is corrupt or truncated"
                )
            header_bytes = f.read(header_len)
    except OSError as exc:
        raise CorruptFileError(f"{path}: cannot read: {exc.strerror}") from exc
    try:
        header = json.loads(header_bytes.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as exc:
        raise CorruptFileError(f"{path}: safetensors header is not valid JSON ({exc}); the file is corrupt") from exc
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            dtype = entry["dtype"]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptFileError(f"{path}: tensor {name!r} has a malformed header entry; the file is corrupt") from exc
        if dtype not in DTYPE_SIZE:
            raise CorruptFileError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
        numel = 1
        for d in shape:
            if d < 0:
                raise CorruptFileError(f"{path}: tensor {name!r} has a negative dimension")
            numel *= d
        if end - begin != numel * DTYPE_SIZE[dtype] or begin < 0:
            raise CorruptFileError(
                f"{path}: tensor {name!r} byte range [{begin}, {end}) does not match {dtype}{list(shape)}; the file is corrupt"
            )
        if data_start + end > size:
            raise CorruptFileError(
                f"{path}: tensor {name!r} ends at byte {data_start + end} but the file has {size}; the file is truncated, re-download it"
            )
        tensors[name] = TensorInfo(name, dtype, shape, path, data_start + begin, data_start + end)
    return tensors, {str(k): str(v) for k, v in metadata.items()}


class CheckpointFiles:
    """All safetensors tensors of a checkpoint folder (single file or sharded with an index)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._fds: dict[Path, int] = {}
        self._fd_lock = threading.Lock()
        self.tensors: dict[str, TensorInfo] = {}
        self.file_metadata: dict[str, dict[str, str]] = {}
        self.files = self._list_files()
        for fname in self.files:
            infos, meta = read_header(root / fname)
            self.file_metadata[fname] = meta
            for name, info in infos.items():
                if name in self.tensors:
                    raise CorruptFileError(f"{root / fname}: tensor {name!r} also appears in {self.tensors[name].file.name}")
                self.tensors[name] = info
        self._check_index()

    def _list_files(self) -> list[str]:
        index_path = self.root / INDEX_NAME
        if index_path.exists():
            self.index = _read_json(index_path)
            weight_map = self.index.get("weight_map") if isinstance(self.index, dict) else None
            if not isinstance(weight_map, dict):
                raise CorruptFileError(f"{index_path}: no 'weight_map' object; the index is corrupt")
            bad = [v for v in weight_map.values() if not isinstance(v, str) or not v or v.startswith("/") or ".." in Path(v).parts]
            if bad:
                raise CorruptFileError(f"{index_path}: weight_map has invalid shard name {bad[0]!r}; the index is corrupt")
            files = sorted(set(weight_map.values()))
            for fname in files:
                if not (self.root / fname).is_file():
                    raise CorruptFileError(f"{index_path}: shard {fname!r} listed in the index is missing; re-download the checkpoint")
            return files
        self.index = None
        files = sorted(p.name for p in self.root.glob("*.safetensors"))
        return files

    def _check_index(self) -> None:
        if self.index is None:
            return
        weight_map: dict[str, str] = self.index["weight_map"]
        for name, fname in weight_map.items():
            info = self.tensors.get(name)
            if info is None or info.file.name != fname:
                raise CorruptFileError(
                    f"{self.root / INDEX_NAME}: tensor {name!r} is mapped to {fname} but is not stored there; the index is stale or corrupt"
                )

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise MissingTensorError(f"{self.root}: tensor {name!r} is missing from the checkpoint") from None

    def _fd(self, path: Path) -> int:
        # One read-only descriptor per shard, shared by threads: os.preadv takes an offset, so no seek races.
        fd = self._fds.get(path)
        if fd is None:
            with self._fd_lock:
                fd = self._fds.get(path)
                if fd is None:
                    fd = os.open(path, os.O_RDONLY)
                    self._fds[path] = fd
        return fd

    def close(self) -> None:
        with self._fd_lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass

    def pread_into(self, info: TensorInfo, buf: memoryview, offset: int = 0) -> None:
        """Read ``len(buf)`` bytes of a tensor starting ``offset`` bytes into it."""
        fd = self._fd(info.file)
        pos = info.begin + offset
        view = buf.cast("B") if buf.format != "B" else buf
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], pos + done)
            if n <= 0:
                raise CorruptFileError(f"{info.file}: tensor {info.name!r} is truncated; re-download the checkpoint")
            done += n

    def read_into(self, name: str, out: Array) -> None:
        """Read a tensor's bytes into ``out``, a contiguous preallocated numpy array or CPU torch tensor
        (no extra copy; a numpy slice like ``a[i, j:j + 1]`` is a view, ``a[i, j]`` would be a copy)."""
        info = self.info(name)
        buf = byte_view(out)
        if buf.nbytes != info.nbytes:
            raise ValueError(f"{name}: destination has {buf.nbytes} bytes, tensor has {info.nbytes}")
        self.pread_into(info, buf)

    def read(self, name: str) -> torch.Tensor:
        """Read one tensor (any dtype torch knows)."""
        info = self.info(name)
        out = torch.empty(info.shape, dtype=torch_dtype(info.dtype))
        self.read_into(name, out)
        return out

    def read_to(self, name: str, device: str | torch.device) -> torch.Tensor:
        """Read a tensor straight onto ``device``. For CUDA, bytes go through two pinned staging buffers
        so reading the file overlaps the host-to-device copies (no pageable multi-GB host tensor)."""
        dev = torch.device(device)
        if dev.type != "cuda":
            return self.read(name).to(dev)
        info = self.info(name)
        out = torch.empty(info.shape, dtype=torch_dtype(info.dtype), device=dev)
        flat = out.reshape(-1).view(torch.uint8)
        stages = _staging_buffers(dev)
        off = k = 0
        while off < info.nbytes:
            n = min(_STAGE_BYTES, info.nbytes - off)
            buf, done = stages[k % len(stages)]
            done.synchronize()  # the copy that last used this buffer has finished
            self.pread_into(info, memoryview(buf.numpy())[:n], off)
            flat[off : off + n].copy_(buf[:n], non_blocking=True)
            done.record()
            off += n
            k += 1
        for _, done in stages:
            done.synchronize()
        return out

    def read_numpy(self, name: str) -> np.ndarray:
        """Read one tensor as a numpy array, without torch: integer and float dtypes numpy has, and BF16
        widened to float32 (exact: a bfloat16 is the top half of a float32)."""
        info = self.info(name)
        if info.dtype == "BF16":
            bits = np.empty(info.shape, dtype=np.uint16)
            self.read_into(name, bits)
            return (bits.astype(np.uint32) << 16).view(np.float32)
        if info.dtype not in _NUMPY_DTYPES:
            raise ValueError(f"{info.file}: tensor {name!r} has dtype {info.dtype}, which numpy cannot hold; use read()")
        out = np.empty(info.shape, dtype=_NUMPY_DTYPES[info.dtype])
        self.read_into(name, out)
        return out

    def read_bytes(self, name: str) -> bytes:
        info = self.info(name)
        data = bytearray(info.nbytes)
        self.pread_into(info, memoryview(data))
        return bytes(data)


_STAGE_BYTES = 64 * 1024 * 1024
_STAGES: dict = {}  # torch.device -> two (pinned buffer, event) pairs


def _staging_buffers(dev: torch.device) -> list:
    if dev not in _STAGES:
        with torch.cuda.device(dev):
            _STAGES[dev] = [
                (torch.empty(_STAGE_BYTES, dtype=torch.uint8, pin_memory=True), torch.cuda.Event()) for _ in range(2)
            ]
            for _, ev in _STAGES[dev]:
                ev.record()
    return _STAGES[dev]


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CorruptFileError(f"{path}: not valid JSON ({exc}); fix or re-download the file") from exc
    if not isinstance(data, dict):
        raise CorruptFileError(f"{path}: expected a JSON object")
    return data


read_json = _read_json


# ----------------------------------------------------------------------------------------------
# Writing


@dataclass
class PlannedTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    part: str = ""  # sub-folder of the output ("" = top level; "ranks/rank-001" for rank-sharded output)

    @property
    def key(self) -> str:
        """Unique across parts: the same tensor name may exist in every rank's part."""
        return f"{self.part}/{self.name}" if self.part else self.name

    @property
    def nbytes(self) -> int:
        numel = 1
        for d in self.shape:
            numel *= d
        return numel * DTYPE_SIZE[self.dtype]


@dataclass
class ShardPlan:
    filename: str
    tensors: list[PlannedTensor] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def plan_shards(tensors: Iterable[PlannedTensor], max_shard_bytes: int) -> list[ShardPlan]:
    """Greedy, order-preserving split into shards of at most ``max_shard_bytes`` (a tensor larger
    than the limit gets a shard of its own), named like transformers does."""
    shards: list[ShardPlan] = []
    current = ShardPlan("")
    for t in tensors:
        if current.tensors and current.nbytes + t.nbytes > max_shard_bytes:
            shards.append(current)
            current = ShardPlan("")
        current.tensors.append(t)
    if current.tensors or not shards:
        shards.append(current)
    if len(shards) == 1:
        shards[0].filename = SINGLE_NAME
    else:
        for i, s in enumerate(shards):
            s.filename = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    return shards


def encode_header(tensors: list[PlannedTensor], metadata: dict[str, str]) -> bytes:
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(sorted(metadata.items()))
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(raw)) + raw


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
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
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
            _write_all(f.fd, data)
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
                    _write_all(f.fd, data)
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


def _write_all(fd: int, data) -> None:
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


def parse_size(text: str | int) -> int:
    """'5GB' -> bytes (decimal units like transformers; 'GiB' binary)."""
    if isinstance(text, int):
        return text
    s = text.strip().upper()
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    for unit, mult in units.items():
        if s.endswith(unit):
            num = s[: -len(unit)].strip()
            try:
                value = float(num)
            except ValueError:
                break
            if value <= 0:
                break
            return int(value * mult)
    if s.isdigit() and int(s) > 0:
        return int(s)
    raise ValueError(f"cannot parse size {text!r}; use a form like 5GB, 500MB or 2GiB")

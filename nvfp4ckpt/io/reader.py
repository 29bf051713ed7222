"""Reading a checkpoint folder's safetensors files as raw bytes by offset (never whole files), and its JSON files."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np

from .._lazy import torch

from ..errors import CorruptFileError, MissingTensorError


from .buffers import byte_view
from .json_input import load_json, open_regular
from .header import _NUMPY_DTYPES, INDEX_NAME, Array, TensorInfo, read_header, torch_dtype

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
            self.index = read_json(index_path)
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
        unlisted = sorted(n for n in self.tensors if n not in weight_map)
        if unlisted:  # a loader driven by the index never sees it: converting it anyway would change the model
            info = self.tensors[unlisted[0]]
            more = f" (and {len(unlisted) - 1} more)" if len(unlisted) > 1 else ""
            raise CorruptFileError(
                f"{info.file}: tensor {unlisted[0]!r}{more} is stored there but missing from the weight_map of "
                f"{self.root / INDEX_NAME}; the index is stale or corrupt, re-download the checkpoint"
            )
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
                    fd = open_regular(path, "safetensors file")  # checked again: no FIFO blocks a read
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
        pread_exact(self._fd(info.file), buf, info.begin + offset, f"{info.file}: tensor {info.name!r}")

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


def pread_exact(fd: int, buf: memoryview, offset: int, what: str) -> None:
    """Fill ``buf`` from ``offset`` of ``fd`` (pread loops until done); a file that ends first is truncated."""
    view = buf.cast("B") if buf.format != "B" else buf
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise CorruptFileError(f"{what} is truncated; re-download the checkpoint")
        done += n


def _staging_buffers(dev: torch.device) -> list:
    if dev not in _STAGES:
        with torch.cuda.device(dev):
            _STAGES[dev] = [
                (torch.empty(_STAGE_BYTES, dtype=torch.uint8, pin_memory=True), torch.cuda.Event()) for _ in range(2)
            ]
            for _, ev in _STAGES[dev]:
                ev.record()
    return _STAGES[dev]


def read_json(path: Path) -> dict:
    """A JSON object from ``path`` (a regular file, bounded in size and nesting), or a one-line
    CorruptFileError naming the file (see ``json_input.load_json``)."""
    return load_json(path)

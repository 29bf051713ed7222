"""Safetensors headers: dtypes, ``TensorInfo`` and ``read_header``, which parses and validates a file's header
up front (so a corrupt or truncated file fails before any output is written)."""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Union

import numpy as np

from .._lazy import torch

from ..errors import BadFieldError, CorruptFileError
from .json_input import Fields, open_regular, parse_json

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


_MAX_DIM = 1 << 48  # no real tensor has a dimension this large; keeps numel and offsets exact and bounded


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header: returns tensors by name and the metadata.

    Every field is type-checked (``json_input.Fields``): a shape of ``[Infinity]``, an offset of ``1e400``, a
    list where an object belongs or ``__metadata__`` that is not strings to strings is a one-line
    ``CorruptFileError``, never a traceback. A FIFO or other special file is refused without blocking."""
    fd = open_regular(path, "safetensors file")
    try:
        size = os.fstat(fd).st_size
        raw_len = os.pread(fd, 8, 0)
        if len(raw_len) < 8:
            raise CorruptFileError(f"{path}: file is truncated (no safetensors header); re-download or re-export it")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > _MAX_HEADER or 8 + header_len > size:
            raise CorruptFileError(
                f"{path}: header length {header_len} does not fit the file ({size} bytes); the file is corrupt or truncated"
            )
        header_bytes = os.pread(fd, header_len, 8)
    except OSError as exc:
        raise CorruptFileError(f"{path}: cannot read: {exc.strerror}") from exc
    finally:
        os.close(fd)
    where = f"{path}: safetensors header"
    try:
        header = Fields(parse_json(header_bytes, where, strict_numbers=True, check_depth=False), str(path), "header")
        metadata = header.str_map("__metadata__", {})
    except BadFieldError as exc:
        raise CorruptFileError(f"{exc}; the file is corrupt") from None
    data_start = 8 + header_len
    tensors: dict[str, TensorInfo] = {}
    for name, value in header.data.items():
        if name == "__metadata__":
            continue
        try:
            entry = Fields(value, str(path), f"tensor {name!r}")
            dtype = entry.str("dtype")
            shape = tuple(entry.int_list("shape"))
            begin, end = entry.int_list("data_offsets", length=2)
        except BadFieldError as exc:
            raise CorruptFileError(f"{exc}; the file is corrupt") from None
        if dtype not in DTYPE_SIZE:
            raise CorruptFileError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
        numel = 1
        for d in shape:
            if d > _MAX_DIM:
                raise CorruptFileError(f"{path}: tensor {name!r} has a dimension of {d}; the file is corrupt")
            numel *= d
        if end - begin != numel * DTYPE_SIZE[dtype] or begin < 0:
            raise CorruptFileError(
                f"{path}: tensor {name!r} byte range [{begin}, {end}) does not match {dtype}{list(shape)}; the file is corrupt"
            )
        if data_start + end > size:
            raise CorruptFileError(
                f"{path}: tensor {name!r} ends at byte {data_start + end} but the file has {size}; the file is truncated, re-download it"
            )
        if _BAD_NAME.search(name) or not name:
            raise CorruptFileError(
                f"{path}: tensor name {name!r} is empty or holds a control character (NUL, newline, ...); the file is "
                "corrupt, re-export it"
            )
        tensors[name] = TensorInfo(name, dtype, shape, path, data_start + begin, data_start + end)
    _refuse_overlaps(path, tensors, data_start)
    return tensors, metadata


_BAD_NAME = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # C0/C1 control characters: no real tensor name has one


def _refuse_overlaps(path: Path, tensors: dict[str, TensorInfo], start: int) -> None:
    """No two tensors may share a byte (the safetensors library refuses such a file): two names over the same
    bytes would be converted as two tensors, and a write to one would change the other."""
    spans = sorted((t.begin, t.end, t.name) for t in tensors.values() if t.end > t.begin)
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise CorruptFileError(
                f"{path}: tensors {n0!r} and {n1!r} overlap (data_offsets [{b0 - start}, {e0 - start}] and "
                f"[{b1 - start}, {e1 - start}]); the file is corrupt, re-export it"
            )

"""Planning output shards from names, dtypes and shapes alone (before any data exists), and encoding their headers."""

from __future__ import annotations

import math

import json
import struct
from dataclasses import dataclass, field
from typing import Iterable




from .header import DTYPE_SIZE, SINGLE_NAME


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
    size = 0  # current's bytes, kept as a running total (re-summing per tensor was quadratic: 104 s for 40k)
    for t in tensors:
        n = t.nbytes
        if current.tensors and size + n > max_shard_bytes:
            shards.append(current)
            current, size = ShardPlan(""), 0
        current.tensors.append(t)
        size += n
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




def format_size(n: float) -> str:
    """Bytes for people, in decimal units like ``parse_size`` reads: '512 B', '1.50 MB'."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def count(n: int, noun: str, plural: str | None = None) -> str:
    """``1 file``, ``2 files``; ``count(1, "MoE layer")``. ``plural`` for nouns that do not take an ``s``."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def format_duration(seconds: float) -> str:
    """Seconds for people: '42 s', '7 min 05 s', '1 h 02 min'."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


MAX_SIZE = 1 << 60  # 1 EiB: a size option beyond it is a typo (or "inf")


def parse_size(text: str | int) -> int:
    """'5GB' -> bytes (decimal units like transformers; 'GiB' binary)."""
    if isinstance(text, int):
        if not 1 <= text <= MAX_SIZE:
            raise ValueError(f"size {text} is not between 1 byte and 1 EiB")
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
            if not (value > 0 and math.isfinite(value)) or not 1 <= value * mult <= MAX_SIZE:
                break  # inf, nan, 0, 1e-9GB (under a byte) or more than anyone has
            return int(value * mult)
    if s.isdigit() and 1 <= int(s) <= MAX_SIZE:
        return int(s)
    raise ValueError(f"cannot parse size {text!r}; use a form like 5GB, 500MB or 2GiB")

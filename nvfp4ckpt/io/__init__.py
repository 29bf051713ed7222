"""Safetensors files read and written as raw bytes (no checkpoint semantics here).

- ``header``: dtypes, ``TensorInfo``, header parsing and validation.
- ``reader``: ``CheckpointFiles`` (a folder's tensors read by offset, never whole files) and ``read_json``.
- ``plan``: output shard planning from names, dtypes and shapes alone; header encoding; ``parse_size``.
- ``buffers``: pooled output and scratch buffers, byte views without a copy.
- ``sink``: ``ShardWriter`` and ``AsyncSink``: streaming writes, hashing and fsync on their own threads.

Writing a checkpoint *folder* (destination, lock, resume, install) is ``nvfp4ckpt.output``.
"""

from __future__ import annotations

from .buffers import BufferPool, buffers_from, byte_view, out_buffer, scratch_buffer
from .header import DTYPE_SIZE, INDEX_NAME, SINGLE_NAME, Array, TensorInfo, as_float32, dtype_name, read_header, torch_dtype
from .plan import PlannedTensor, ShardPlan, count, encode_header, format_duration, format_size, parse_size, plan_shards
from .reader import CheckpointFiles, read_json
from .sink import AsyncSink, ShardWriter, sha256_file

__all__ = [
    "DTYPE_SIZE", "INDEX_NAME", "SINGLE_NAME", "Array", "AsyncSink", "BufferPool", "CheckpointFiles", "PlannedTensor",
    "ShardPlan", "ShardWriter", "TensorInfo", "as_float32", "buffers_from", "byte_view", "dtype_name", "count", "encode_header", "format_duration", "format_size",
    "out_buffer", "parse_size", "plan_shards", "read_header", "read_json", "scratch_buffer", "sha256_file", "torch_dtype",
]  # fmt: skip

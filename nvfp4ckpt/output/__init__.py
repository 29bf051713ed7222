"""Writing a checkpoint folder: destination check, lock, journal/resume and the final install."""

from __future__ import annotations

from .destination import check_destination
from .journal import JOURNAL_NAME, partial_folder
from .writer import DEFAULT_MAX_SHARD_SIZE, MANIFEST_NAME, CheckpointJob, WriteResult, max_shard_bytes, write_checkpoint

__all__ = ["DEFAULT_MAX_SHARD_SIZE", "JOURNAL_NAME", "MANIFEST_NAME", "CheckpointJob", "WriteResult", "check_destination", "max_shard_bytes", "partial_folder", "write_checkpoint"]

"""Writing a checkpoint folder: destination check, lock, journal/resume and the final install."""

from __future__ import annotations

from .destination import check_destination
from .journal import JOURNAL_NAME, partial_folder
from .writer import CheckpointJob, WriteResult, write_checkpoint

__all__ = ["JOURNAL_NAME", "CheckpointJob", "WriteResult", "check_destination", "partial_folder", "write_checkpoint"]

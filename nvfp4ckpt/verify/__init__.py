"""Checking a converted checkpoint: structure, layout (bytes against the source) and numerics."""

from __future__ import annotations

from .checks import CHECKS, Check, VerifyReport, verify_checkpoint
from .report import CheckResult

__all__ = ["CHECKS", "Check", "CheckResult", "VerifyReport", "verify_checkpoint"]

"""Checking a converted checkpoint: structure, layout (bytes against the source) and numerics."""

from __future__ import annotations

from .checks import CHECKS, CheckResult, VerifyReport, verify_checkpoint

__all__ = ["CHECKS", "CheckResult", "VerifyReport", "verify_checkpoint"]

"""Checking a converted checkpoint: structure, layout (bytes against the source) and numerics."""

from __future__ import annotations

from .checks import CHECKS, Check, CheckResult, VerifyReport, verify_checkpoint

__all__ = ["CHECKS", "Check", "CheckResult", "VerifyReport", "verify_checkpoint"]

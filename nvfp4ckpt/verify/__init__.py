"""Checking a converted checkpoint: ``structure``, ``layout`` (bytes against the source) and ``numerics`` (one module
each), run by ``checks.verify_checkpoint``; ``report.CheckResult`` is the result type of every check, GSM8K's too."""

from __future__ import annotations

from .checks import CHECKS, Check, VerifyReport, verify_checkpoint
from .report import CheckResult

__all__ = ["CHECKS", "Check", "CheckResult", "VerifyReport", "verify_checkpoint"]

"""The result type every check reports with: ``verify``'s structure, layout and numerics, and GSM8K's
accuracy and agreement (``eval.gsm8k``), so the CLI prints and exits on one shape."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CheckResult:
    name: str
    status: str  # "pass" | "fail" | "skip"
    summary: str
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0


def all_passed(checks: list[CheckResult]) -> bool:
    """A report passes when no check failed (skipped ones do not count against it)."""
    return all(c.status != "fail" for c in checks)

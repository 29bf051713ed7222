"""Prove a converted checkpoint is kernel-ready: structure, exact layout, and fused-MoE numerics.

Checks (each can be selected or skipped):
- ``structure`` (no GPU, no source): descriptor supported and the same in every header; every MoE layer has
  all canonical tensors with the right dtypes and shapes; manifest complete, sizes and sha256 match;
  scalars finite, positive and equal to the formulas applied to the stored scales.
- ``layout`` (needs ``source``): every MoE layer un-shuffled equals the source bytes, every carried-over
  tensor is byte-identical; reports the first mismatching tensor, expert and row.
- ``numerics``: each MoE layer run with the chosen backend on seeded random activations and router logits,
  against the float32 torch reference computed from the source weights (or, without a source, from the
  un-shuffled converted weights). Thresholds per backend are in ``runtime.backends`` and docs/verify.md.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path

from .._lazy import torch

from ..source.checkpoint import open_checkpoint
from ..layouts.trtllm_gen.converted import ConvertedCheckpoint, open_converted
from ..layouts.trtllm_gen.descriptor import LayerInfo
from ..progress import TickFn
from .report import CheckResult, all_passed
from ..errors import CorruptFileError, InputError
from ..runtime.backends import check_choice, for_layer, resolve_backend
from ..runtime.device import parse_device

MAX_TOKENS = 1 << 16  # enough for any threshold; more only allocates [tokens, hidden] activations per layer


from .descriptor import add_descriptor_check
from .layout import check_layout
from .numerics import LayerNumerics, check_layer_numerics
from .structure import check_structure


class Check(str, Enum):
    """What ``verify`` can check; the first three are this module's, ``gsm8k`` is ``eval.gsm8k``'s."""

    STRUCTURE = "structure"
    LAYOUT = "layout"
    NUMERICS = "numerics"
    GSM8K = "gsm8k"


CHECKS = (Check.STRUCTURE.value, Check.LAYOUT.value, Check.NUMERICS.value)


@dataclass
class VerifyReport:
    path: str
    source: str | None
    checks: list[CheckResult] = field(default_factory=list)
    numerics: list[LayerNumerics] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return all_passed(self.checks)

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}




def verify_checkpoint(
    path: str | Path,
    *,
    source: str | Path | None = None,
    checks: tuple[str, ...] = CHECKS,
    backend: str = "auto",
    act: str = "nvfp4",
    layers: list[str] | None = None,
    tokens: int = 64,
    seed: int = 0,
    hash_files: bool = True,
    device: str | None = None,
    progress: TickFn | None = None,
) -> VerifyReport:
    start = time.perf_counter()
    unknown = [c for c in checks if c not in CHECKS]
    if unknown:
        raise InputError(f"unknown check(s) {unknown}; choose from {', '.join(CHECKS)}")
    check_choice(backend, act)
    if not 1 <= tokens <= MAX_TOKENS:
        raise InputError(f"--tokens {tokens}: choose from 1 to {MAX_TOKENS} random tokens per layer")
    report = VerifyReport(path=str(path), source=str(source) if source else None)
    try:
        ckpt = open_converted(path)  # not a converted checkpoint at all: an input error (exit 2)
    except CorruptFileError as exc:  # converted but damaged: the structure check fails (exit 1)
        return structure_error_report(path, exc)
    src = open_checkpoint(source) if source is not None else None
    selected = _select_layers(ckpt, layers)
    tick = progress or (lambda stage, done, total: None)

    if "structure" in checks:
        t0 = time.perf_counter()
        report.checks.append(check_structure(ckpt, hash_files))
        add_descriptor_check(report.checks[-1], ckpt, src)  # what the descriptor claims (verify/descriptor.py)
        report.checks[-1].seconds = time.perf_counter() - t0
    if "layout" in checks:
        if src is None:
            report.checks.append(CheckResult("layout", "skip", "no --source given"))
        else:
            t0 = time.perf_counter()
            report.checks.append(check_layout(ckpt, src, tick))
            report.checks[-1].seconds = time.perf_counter() - t0
    if "numerics" in checks:
        dev = parse_device(device)
        chosen = resolve_backend(backend, act, dev)
        results = []
        t0 = time.perf_counter()
        for n, layer in enumerate(selected):
            tick("numerics", n, len(selected))
            layer_backend = for_layer(backend, chosen, layer.gated)
            results.append(check_layer_numerics(ckpt, src, layer, layer_backend, act, tokens, seed, dev))
        tick("numerics", len(selected), len(selected))
        report.numerics = results
        bad = [r for r in results if not r.passed]
        report.checks.append(
            CheckResult(
                "numerics",
                "fail" if bad else "pass",
                f"{len(results) - len(bad)}/{len(results)} MoE layers within thresholds ({chosen}, act {act})",
                [f"{r.prefix}: rel-L2 {r.rel_l2:.3g}, cosine {r.cosine:.6f}, close {r.frac_close:.4f}" for r in bad],
                seconds=time.perf_counter() - t0,
            )
        )
    report.seconds = time.perf_counter() - start
    return report


def _select_layers(ckpt: ConvertedCheckpoint, layers: list[str] | None) -> list[LayerInfo]:
    if not layers:
        return list(ckpt.layers)
    return [ckpt.layer(x) for x in layers]


def structure_error_report(path: str | Path, exc: CorruptFileError) -> VerifyReport:
    """A converted checkpoint whose files cannot even be read fails the structure check."""
    report = VerifyReport(path=str(path), source=None)
    report.checks.append(CheckResult("structure", "fail", "files unreadable", [str(exc)]))
    return report


__all__ = ["CHECKS", "VerifyReport", "verify_checkpoint"]

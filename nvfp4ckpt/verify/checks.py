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


from .._args import Args
from ..source.checkpoint import open_checkpoint
from ..layouts.trtllm_gen.converted import ConvertedCheckpoint, open_converted
from ..layouts.trtllm_gen.descriptor import LayerInfo
from ..progress import TickFn
from .report import CheckResult, all_passed
from ..errors import CorruptFileError, InputError
from ..runtime.backends import BACKENDS, check_choice, for_layer, resolve_backend
from ..runtime.device import parse_device

MAX_TOKENS = 1 << 16  # enough for any threshold; more only allocates [tokens, hidden] activations per layer


from ..source.stacked import read_layer_source
from .descriptor import add_descriptor_check
from .layout import check_layout, compare_layer, fast_compare_layer, unshuffled
from .numerics import FULL, LayerNumerics, NumericsSample, check_layer_numerics
from .scan import scan_checkpoint
from .structure import check_structure, manifest_names, tensors_damaged


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
    numerics_sample: dict | None = None  # {"full", "layers", "experts": {prefix: [first, end) or None}}
    read_bytes: int = 0  # the single pass: bytes of the converted checkpoint read and hashed
    read_seconds: float = 0.0  # the single pass's wall time (hash, layout, fed numerics together)

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
    numerics_full: bool | None = None,
    numerics_sample: NumericsSample | None = None,
    workers: int | None = None,
) -> VerifyReport:
    """``numerics_full``: numerics on every selected layer and expert (None: on a GPU only; on the CPU the seeded
    sample ``numerics_sample``, default ``NumericsSample()``). ``workers``: reader threads of the single pass
    (default 2; see ``scan.default_workers``)."""
    start = time.perf_counter()
    _check_args(path, source, checks, backend, act, layers, tokens, seed, hash_files, device, progress, numerics_full, workers)
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
    report.path, report.source = str(ckpt.root), str(src.root) if src is not None else None  # absolute, Hub ids resolved
    selected = _select_layers(ckpt, layers)
    if tensors_damaged(ckpt):  # a damaged checkpoint fails the structure check (exit 1); nothing else can read it
        report.checks.append(check_structure(ckpt, hash_files and "structure" in checks))
        add_descriptor_check(report.checks[-1], ckpt, src)
        report.checks.extend(CheckResult(c, "skip", "the structure check failed") for c in checks if c != "structure")
        report.seconds = time.perf_counter() - start
        return report
    tick = progress or (lambda stage, done, total: None)
    do_layout = "layout" in checks and src is not None
    do_numerics = "numerics" in checks
    dev = chosen = None
    plan: dict[str, range | None] = {}  # numerics: layer prefix -> sampled experts (None: all)
    with_itself: list[str] = []  # layers whose numerics would compare the checkpoint with itself (not run)
    if do_numerics:
        dev = parse_device(device)  # one-line InputError for a device that is not usable here
        chosen = resolve_backend(backend, act, dev)
        full = numerics_full if numerics_full is not None else dev.type == "cuda"
        sample = FULL if full else (numerics_sample or NumericsSample())
        plan = {l.prefix: sample.pick_experts(l, seed) for l in sample.pick_layers(selected, seed, bool(layers))}
        if src is None:
            # Without a source the reference is the converted weights un-shuffled: the torch backend runs that very
            # computation, so it would report rel-L2 0 whatever the bytes say (a kernel backend still checks that
            # the kernel reads the stored layout as the un-shuffle does).
            with_itself = [l.prefix for l in selected if l.prefix in plan and for_layer(backend, chosen, l.gated) == "torch"]
            plan = {p: r for p, r in plan.items() if p not in with_itself}
        report.numerics_sample = {
            "full": full,
            "layers": list(plan),
            "experts": {p: (None if r is None else [r.start, r.stop]) for p, r in plan.items()},
        }
    _refuse_empty_selection(checks, src is not None, do_numerics and not plan)

    # One pass over the files: hash, compare the layout, feed the numerics (see scan.py).
    hashing = "structure" in checks and hash_files
    names = manifest_names(ckpt.root) if hashing else []
    if not hashing and do_layout:  # --no-hash: the pass still reads the tensors, without hashing them
        names = [(f.root / n).relative_to(ckpt.root).as_posix() for f in [ckpt.files, *ckpt.rank_files.values()] for n in f.files]
    scanned = None
    compared: dict[str, str | None] = {}
    results: dict[str, LayerNumerics] = {}
    if names or do_layout:
        src_layers = {l.prefix: l for l in src.layers} if src is not None else {}
        # a source of the other format: check_layout says so once; comparing its layers here would look up
        # scalar names the converted checkpoint does not have
        same_format = src is not None and src.format.name == ckpt.source_format
        in_pass = [
            l for l in ckpt.layers
            if not l.ranks and ((do_layout and l.prefix in src_layers) or l.prefix in plan)
        ]  # fmt: skip

        def on_layer(layer: LayerInfo, t: dict) -> None:
            stacked = None  # the source layer as read for the comparison, handed on to the numerics
            if do_layout and layer.prefix in src_layers and same_format:
                src_layer = src_layers[layer.prefix]
                keep = (plan[layer.prefix] or range(layer.num_experts)) if layer.prefix in plan else None
                fast = fast_compare_layer(src, layer, src_layer, t, keep)
                if fast is not None and fast[0]:
                    compared[layer.prefix], stacked = None, fast[1]
                else:  # not the fast path's shape, or a difference to locate
                    stacked = read_layer_source(src, src_layer)
                    compared[layer.prefix] = compare_layer(src, layer, src_layer, lambda l: unshuffled(l, t), stacked)
            if layer.prefix in plan:
                layer_backend = for_layer(backend, chosen, layer.gated)
                results[layer.prefix] = check_layer_numerics(
                    ckpt, src, layer, layer_backend, act, tokens, seed, dev, plan[layer.prefix], tensors=t, source=stacked
                )  # fmt: skip

        scanned = scan_checkpoint(
            ckpt, names=names, hash_files=hashing, src=src if do_layout else None, on_layer=on_layer, layers=in_pass,
            workers=workers, tick=tick,
        )  # fmt: skip
        report.read_bytes, report.read_seconds = scanned.bytes_read, scanned.seconds

    if "structure" in checks:
        t0 = time.perf_counter()
        report.checks.append(check_structure(ckpt, hash_files, scanned.digests if scanned else None))
        add_descriptor_check(report.checks[-1], ckpt, src)  # what the descriptor claims (verify/descriptor.py)
        report.checks[-1].seconds = time.perf_counter() - t0
    if "layout" in checks:
        if src is None:
            report.checks.append(CheckResult("layout", "skip", "no --source given"))
        else:
            t0 = time.perf_counter()
            report.checks.append(check_layout(ckpt, src, tick, compared, scanned.carried_problems if scanned else None))
            report.checks[-1].seconds = time.perf_counter() - t0
    if do_numerics and not plan:
        report.checks.append(CheckResult("numerics", "skip", _ITSELF))
    elif do_numerics:
        t0 = time.perf_counter()
        fed = sum(r.seconds for r in results.values())  # run inside the pass, on its threads
        todo = [l for l in selected if l.prefix in plan]
        for n, layer in enumerate(todo):
            tick("numerics", n, len(todo))
            if layer.prefix not in results:  # not fed by the pass (rank-sharded, or no pass: --no-hash without source)
                layer_backend = for_layer(backend, chosen, layer.gated)
                results[layer.prefix] = check_layer_numerics(
                    ckpt, src, layer, layer_backend, act, tokens, seed, dev, plan[layer.prefix]
                )  # fmt: skip
        tick("numerics", len(todo), len(todo))
        report.numerics = [results[l.prefix] for l in todo]
        bad = [r for r in report.numerics if not r.passed]
        sampled = ""
        if not report.numerics_sample["full"]:
            sizes = sorted({r.stop - r.start for r in plan.values() if r is not None})
            per_layer = f", experts {'/'.join(map(str, sizes))} of each" if sizes else ""
            sampled = f" (a seeded sample: {len(todo)} of {len(ckpt.layers)} MoE layers{per_layer}; --numerics-full for all)"
        if src is None:  # what the comparison proves without the source's bytes
            sampled += "; reference: the converted weights themselves (the kernel reads this layout as the un-shuffle does; whether the weights are the source's needs --source)"
        if with_itself:
            sampled += f"; {len(with_itself)} layer(s) on the torch backend not compared ({_ITSELF})"
        report.checks.append(
            CheckResult(
                "numerics",
                "fail" if bad else "pass",
                f"{len(report.numerics) - len(bad)}/{len(report.numerics)} MoE layers within thresholds ({chosen}, act {act}){sampled}",
                [_numerics_problem(r) for r in bad],
                seconds=time.perf_counter() - t0 + fed,
            )
        )
    report.seconds = time.perf_counter() - start
    return report


def _check_args(path, source, checks, backend, act, layers, tokens, seed, hash_files, device, progress, numerics_full, workers) -> None:
    """The library call checked as the CLI checks its options (``nvfp4ckpt._args``)."""
    a = Args("verify_checkpoint")
    a.path("path", path)
    a.path("source", source, "--source", optional=True)
    a.strings("checks", checks, "--check")
    a.str("backend", backend, "--backend")
    a.str("act", act, "--act")
    a.strings("layers", layers, "--layers", optional=True)
    a.int("tokens", tokens, "--tokens", lo=1, hi=MAX_TOKENS)
    a.int("seed", seed, "--seed", lo=0, hi=2**63 - 1)
    a.bool("hash_files", hash_files, "--no-hash")
    a.str("device", device, "--device", optional=True)
    a.callable("progress", progress)
    a.bool("numerics_full", numerics_full, "--numerics-full", optional=True)
    a.int("workers", workers, None, lo=1, hi=1024, optional=True)


def _numerics_problem(r: LayerNumerics) -> str:
    th = BACKENDS[r.backend].thresholds[r.act]
    token = "" if th.max_token_rel_l2 is None else f", worst token {r.worst_token} {r.token_rel_l2:.3g} (limit {th.max_token_rel_l2:g})"
    return (
        f"{r.prefix}: rel-L2 {r.rel_l2:.3g} (limit {th.max_rel_l2:g}){token}, cosine {r.cosine:.6f}, "
        f"close {r.frac_close:.4f}"
    )


_ITSELF = (
    "not run: without --source the torch backend's reference is the checkpoint itself (rel-L2 0 whatever the bytes); "
    "give --source SRC, or run the Triton backend on a GPU"
)


def _refuse_empty_selection(checks: tuple[str, ...], has_source: bool, numerics_void: bool) -> None:
    """A selection that checks nothing is a usage error, not a PASS."""
    if "structure" in checks or ("layout" in checks and has_source) or ("numerics" in checks and not numerics_void):
        return
    if not checks:
        raise InputError("no check selected (--check and --skip leave none); choose from " + ", ".join(CHECKS))
    why = []
    if "layout" in checks:
        why.append("--check layout compares with the source: give --source SRC")
    if "numerics" in checks:
        why.append(
            "--check numerics without --source would compare the checkpoint with itself on the torch backend (rel-L2 0 "
            "whatever the bytes): give --source SRC, or run the Triton backend on a GPU"
        )
    raise InputError("nothing to check: " + "; ".join(why))


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

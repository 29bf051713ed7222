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

import json
import time
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path

from .._lazy import torch

from ..source.checkpoint import SourceCheckpoint, open_checkpoint
from ..source.formats import FORMATS
from ..layouts.trtllm_gen.scalars import kernel_scalars
from ..source.stacked import read_layer_source
from ..layouts.trtllm_gen.converted import ConvertedCheckpoint, open_converted
from ..layouts.trtllm_gen.descriptor import METADATA_KEY, LayerInfo, canonical_specs
from ..output import MANIFEST_NAME
from ..progress import TickFn
from .report import CheckResult, all_passed
from ..errors import CorruptFileError, InputError
from ..io import sha256_file
from ..runtime.backends import BACKENDS, check_choice, for_layer, resolve_backend, sync
from ..runtime.layer import MoELayer, load_moe_layer, source_moe_layer, stacked_source_weights



class Check(str, Enum):
    """What ``verify`` can check; the first three are this module's, ``gsm8k`` is ``eval.gsm8k``'s."""

    STRUCTURE = "structure"
    LAYOUT = "layout"
    NUMERICS = "numerics"
    GSM8K = "gsm8k"


CHECKS = (Check.STRUCTURE.value, Check.LAYOUT.value, Check.NUMERICS.value)


@dataclass
class LayerNumerics:
    prefix: str
    backend: str
    act: str
    tokens: int
    rel_l2: float
    cosine: float
    max_abs: float
    frac_close: float
    passed: bool
    seconds: float
    reference: str  # "source" | "converted"
    read_seconds: float = 0.0  # loading tensors from files (converted and reference) onto the device
    compute_seconds: float = 0.0  # the backend's MoE plus the float32 reference


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
        report.checks[-1].seconds = time.perf_counter() - t0
    if "layout" in checks:
        if src is None:
            report.checks.append(CheckResult("layout", "skip", "no --source given"))
        else:
            t0 = time.perf_counter()
            report.checks.append(check_layout(ckpt, src, tick))
            report.checks[-1].seconds = time.perf_counter() - t0
    if "numerics" in checks:
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
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


# ----------------------------------------------------------------------------------------------
# structure


def check_structure(ckpt: ConvertedCheckpoint, hash_files: bool = True) -> CheckResult:
    problems: list[str] = []
    desc = ckpt.descriptor
    all_files = [(ckpt.files, f) for f in ckpt.files.files] + [(rf, f) for rf in ckpt.rank_files.values() for f in rf.files]
    for files, fname in all_files:
        meta = files.file_metadata[fname]
        try:
            header_desc = json.loads(meta.get(METADATA_KEY, "null"))
        except ValueError:
            header_desc = None
        if header_desc != desc:
            problems.append(f"{fname}: header metadata '{METADATA_KEY}' differs from config.json's descriptor")
    for layer in ckpt.layers:
        for rank in layer.ranks or (None,):
            experts = rank.num_experts if rank else layer.num_experts
            inter = rank.intermediate_padded if rank else layer.intermediate_padded
            where = f"{rank.part}: " if rank else ""
            files = ckpt.files_for(rank)
            for name, dtype, shape in canonical_specs(
                layer.prefix, experts, layer.hidden_padded, inter, ckpt.source_format, layer.scalar_dtype, layer.gated
            ):
                info = files.tensors.get(name)
                if info is None:
                    problems.append(f"{where}{name}: missing")
                elif info.dtype != dtype or info.shape != shape:
                    problems.append(f"{where}{name}: {info.dtype}{list(info.shape)}, expected {dtype}{list(shape)}")
        if not problems:
            problems.extend(_scalar_problems(ckpt, layer))
    problems.extend(_manifest_problems(ckpt.root, hash_files))
    n_layers = len(ckpt.layers)
    what = f"{n_layers} MoE layers, {len(ckpt.files.files)} shards" + ("" if hash_files else " (sha256 skipped)")
    return CheckResult("structure", "fail" if problems else "pass", what, problems)


def _scalar_problems(ckpt: ConvertedCheckpoint, layer: LayerInfo) -> list[str]:
    """Scalars are checked over all experts of the layer (a1/a2 are maxima over every rank's experts);
    each rank must hold the same values for its experts."""
    t: dict[str, torch.Tensor] = {}
    problems = []
    for rank in layer.ranks or (None,):
        local = {k: v for k, v in ckpt.read_layer(layer, rank=rank).items() if v.dtype not in (torch.uint8, torch.float8_e4m3fn)}
        e0, e1 = (rank.expert_start, rank.expert_end) if rank else (0, layer.num_experts)
        for name, value in local.items():
            if name == "w13_input_scale_quant":
                if name in t and not torch.equal(t[name], value):
                    problems.append(f"{rank.part}: {layer.prefix}.{name} differs between ranks")
                t[name] = value
                continue
            full = t.setdefault(name, torch.full((layer.num_experts, *value.shape[1:]), float("nan"), dtype=value.dtype))
            prev = full[e0:e1]
            if torch.isfinite(prev).all() and not torch.equal(prev, value):
                problems.append(f"{rank.part}: {layer.prefix}.{name} differs from another rank's copy")
            full[e0:e1] = value
    for name, value in t.items():
        v = value.float()
        if not torch.isfinite(v).all() or (v <= 0).any():
            problems.append(f"{layer.prefix}.{name}: non-finite or non-positive values")
    if problems:
        return problems
    # columns (gate, up, down), or (up, down) for non-gated layers
    ws2 = torch.cat([t["w13_weight_scale_2"], t["w2_weight_scale_2"].unsqueeze(1)], 1)
    inp = torch.cat([t["w13_input_scale"], t["w2_input_scale"].unsqueeze(1)], 1)
    expect = kernel_scalars(ws2, inp)
    for name in ("g1_alphas", "g1_scale_c", "g2_alphas", "w13_input_scale_quant"):
        if not torch.equal(t[name], expect[name]):
            problems.append(f"{layer.prefix}.{name}: does not match the formula applied to the stored input/weight scales")
    fmt = FORMATS[ckpt.source_format]
    modelopt_names = ("w13_weight_scale_2", "w2_weight_scale_2", "w13_input_scale", "w2_input_scale")
    for raw, mult in zip(fmt.raw_scalar_names, modelopt_names):  # formats that keep their stored scales raw
        if not torch.equal(fmt.to_dequant_multiplier(t[raw]), t[mult]):
            problems.append(f"{layer.prefix}.{mult}: is not {raw} in the ModelOpt convention (1/x for compressed-tensors)")
    return problems


def _manifest_problems(root: Path, hash_files: bool) -> list[str]:
    path = root / MANIFEST_NAME
    if not path.is_file():
        return [f"{MANIFEST_NAME}: missing"]
    try:
        manifest = json.loads(path.read_text())
        entries = {f["name"]: f for f in manifest["files"]}
    except (ValueError, KeyError, TypeError):
        return [f"{MANIFEST_NAME}: not valid JSON with a 'files' list"]
    problems = []
    on_disk = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")}
    on_disk.discard(MANIFEST_NAME)
    for extra in sorted(on_disk - set(entries)):
        problems.append(f"{extra}: not listed in the manifest")
    for name, entry in sorted(entries.items()):
        f = root / name
        if not f.is_file():
            problems.append(f"{name}: listed in the manifest but missing")
            continue
        if f.stat().st_size != entry.get("size"):
            problems.append(f"{name}: size {f.stat().st_size} != manifest {entry.get('size')}")
            continue
        if hash_files and sha256_file(f) != entry.get("sha256"):
            problems.append(f"{name}: sha256 does not match the manifest")
    return problems


# ----------------------------------------------------------------------------------------------
# layout


def check_layout(ckpt: ConvertedCheckpoint, src: SourceCheckpoint, tick: TickFn) -> CheckResult:
    problems: list[str] = []
    src_layers = {l.prefix: l for l in src.layers}
    if set(src_layers) != {l.prefix for l in ckpt.layers}:
        problems.append(
            f"MoE layers differ: source has {sorted(src_layers)}, converted has {sorted(l.prefix for l in ckpt.layers)}"
        )
        return CheckResult("layout", "fail", "MoE layers do not match the source", problems)
    for n, layer in enumerate(ckpt.layers):
        tick("layout", n, len(ckpt.layers))
        problem = _compare_layer(ckpt, src, layer, src_layers[layer.prefix])
        if problem:
            problems.append(problem)
    tick("layout", len(ckpt.layers), len(ckpt.layers))
    expert_names = src.expert_tensor_names
    carried = [n for n in src.files.tensors if n not in expert_names]
    for name in carried:
        if name not in ckpt.files.tensors:
            problems.append(f"{name}: missing from the converted checkpoint")
            continue
        a, b = src.files.info(name), ckpt.files.info(name)
        if a.dtype != b.dtype or a.shape != b.shape or src.files.read_bytes(name) != ckpt.files.read_bytes(name):
            problems.append(f"{name}: carried-over tensor differs from the source")
    owned = {n for l in ckpt.layers for n in l.tensor_names(ckpt.source_format)}
    for name in ckpt.files.tensors:
        if name not in owned and name not in src.files.tensors:
            problems.append(f"{name}: not in the source and not a canonical MoE tensor")
    summary = f"{len(ckpt.layers)} MoE layers un-shuffled and {len(carried)} carried-over tensors compared byte for byte"
    return CheckResult("layout", "fail" if problems else "pass", summary, problems)


def _first_mismatch(got: torch.Tensor, want: torch.Tensor) -> tuple[int, int] | None:
    """(expert, row) of the first differing byte of two [E, rows, cols] uint8 tensors."""
    diff = (got.view(torch.uint8) != want.view(torch.uint8)).flatten(2).any(-1)
    if not diff.any():
        return None
    e, r = diff.nonzero()[0].tolist()
    return e, r


def _compare_layer(ckpt: ConvertedCheckpoint, src: SourceCheckpoint, layer: LayerInfo, src_layer) -> str | None:
    if (layer.num_experts, layer.hidden_size, layer.intermediate_size) != (
        src_layer.num_experts, src_layer.hidden_size, src_layer.intermediate_size,
    ):  # fmt: skip
        return f"{layer.prefix}: sizes differ from the source"
    t = ckpt.reassemble_layer(layer)
    s = read_layer_source(src, src_layer)
    if not bool(t["padding_zero"]):
        return f"{layer.prefix}: padding bytes are not zero"
    i = layer.intermediate_size
    if t["w31"].shape != s["w31"].shape:
        return f"{layer.prefix}: w13 holds {t['w31'].shape[1] // i} of I rows, the source {s['w31'].shape[1] // i} (gated vs non-gated)"
    w13_roles = ("up", "gate") if layer.gated else ("up",)
    pairs = [
        (name, f"{src_layer.proj_names[role]} {what}", t[key][:, k * i : (k + 1) * i], s[key][:, k * i : (k + 1) * i])
        for name, key, what in (("w13_weight", "w31", "weight"), ("w13_weight_scale", "s31", "weight_scale"))
        for k, role in enumerate(w13_roles)
    ] + [
        ("w2_weight", f"{src_layer.proj_names['down']} weight", t["down"], s["down"]),
        ("w2_weight_scale", f"{src_layer.proj_names['down']} weight_scale", t["down_scale"], s["down_scale"]),
    ]
    for name, what, got, want in pairs:
        hit = _first_mismatch(got, want)
        if hit is not None:
            e, r = hit
            return f"{layer.prefix}.{name}: expert {e}, source row {r} of {what} differs after un-shuffling"
    raw = s["raw_scalars"]
    to_mult = src.format.to_dequant_multiplier
    expect = kernel_scalars(to_mult(raw[:, :, 0]), to_mult(raw[:, :, 1]))
    for name, value in expect.items():
        if not torch.equal(t[name], value):
            return f"{layer.prefix}.{name}: differs from the value computed from the source scales"
    return None


# ----------------------------------------------------------------------------------------------
# numerics


def check_layer_numerics(
    ckpt: ConvertedCheckpoint,
    src: SourceCheckpoint | None,
    layer: LayerInfo,
    backend: str,
    act: str,
    tokens: int,
    seed: int,
    device: torch.device,
) -> LayerNumerics:
    start = time.perf_counter()
    ranks = [r.rank for r in layer.ranks] or [None]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    hidden = (torch.randn(tokens, layer.hidden_size, generator=gen) * 2.0).to(torch.bfloat16).to(device)
    logits = torch.randn(tokens, layer.num_experts, generator=gen).to(torch.bfloat16).to(device)
    out = None
    read_s = compute_s = 0.0
    for rank in ranks:  # rank-sharded: the layer's output is the sum of every rank's partial output
        t0 = time.perf_counter()
        moe = load_moe_layer(ckpt, layer.prefix, device, rank=rank)
        sync(device)
        t1 = time.perf_counter()
        part = moe(hidden, logits, backend=backend, act=act).float()
        sync(device)
        read_s, compute_s = read_s + t1 - t0, compute_s + time.perf_counter() - t1
        out = part if out is None else out + part
        del moe
    t0 = time.perf_counter()
    moe = load_moe_layer(ckpt, layer.prefix, device, rank=ranks[0])
    ref_layer = _reference_layer(ckpt, moe, src, layer, device) if src is not None or layer.ranks else moe
    sync(device)
    t1 = time.perf_counter()
    ids, weights = ref_layer.route(logits)
    ref_in, weights = ref_layer.weights_on_input(hidden, weights)
    ref = ref_layer.forward_torch(ref_in, ids, weights, act).float()
    sync(device)
    read_s, compute_s = read_s + t1 - t0, compute_s + time.perf_counter() - t1
    diff = out - ref
    rel_l2 = float(diff.norm() / ref.norm().clamp(min=1e-30))
    cos = float(torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0))
    close = float(torch.isclose(out, ref, atol=0.1, rtol=0.85).float().mean())
    th = BACKENDS[backend].thresholds[act]
    passed = bool(torch.isfinite(out).all()) and rel_l2 <= th.max_rel_l2 and cos >= th.min_cosine and close >= th.min_frac_close
    return LayerNumerics(
        prefix=layer.prefix,
        backend=backend,
        act=act,
        tokens=tokens,
        rel_l2=rel_l2,
        cosine=cos,
        max_abs=float(diff.abs().max()),
        frac_close=close,
        passed=passed,
        seconds=time.perf_counter() - start,
        reference="source" if src is not None else "converted",
        read_seconds=read_s,
        compute_seconds=compute_s,
    )


def _reference_layer(
    ckpt: ConvertedCheckpoint, moe: MoELayer, src: SourceCheckpoint | None, layer: LayerInfo, device: torch.device
) -> MoELayer:
    """The same routing configuration, with the whole layer's weights read from the source checkpoint
    (or, without one, reassembled from the converted checkpoint's ranks)."""
    if src is not None:
        src_layer = next(l for l in src.layers if l.prefix == layer.prefix)
        return source_moe_layer(src, src_layer, device, routing=moe.routing)
    s = ckpt.reassemble_layer(layer)
    ws2 = torch.cat([s["w13_weight_scale_2"], s["w2_weight_scale_2"].unsqueeze(1)], 1)
    inp = torch.cat([s["w13_input_scale"], s["w2_input_scale"].unsqueeze(1)], 1)
    ref = MoELayer(
        layer.prefix, layer.num_experts, layer.hidden_size, layer.intermediate_size, moe.routing, {}, moe.routing_bias,
        gated=layer.gated,
    )  # fmt: skip
    ref._source = stacked_source_weights(s, ws2, inp, device)
    return ref


def structure_error_report(path: str | Path, exc: CorruptFileError) -> VerifyReport:
    """A converted checkpoint whose files cannot even be read fails the structure check."""
    report = VerifyReport(path=str(path), source=None)
    report.checks.append(CheckResult("structure", "fail", "files unreadable", [str(exc)]))
    return report


__all__ = ["CHECKS", "VerifyReport", "verify_checkpoint"]

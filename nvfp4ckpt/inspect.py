"""What is this checkpoint? A summary that needs headers and a few scalars, never the weights."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .errors import AlreadyConvertedError
from .io import read_json
from .layouts.trtllm_gen import transform as layout
from .layouts.trtllm_gen.converted import open_converted
from .layouts.trtllm_gen.descriptor import descriptor_from_config
from .source.checkpoint import SourceCheckpoint, open_checkpoint, resolve_source


@dataclass
class LayerSummary:
    prefix: str
    num_experts: int
    hidden_size: int
    intermediate_size: int
    bytes: int
    hidden_stored: int | None = None  # converted: the padded sizes the tensors hold
    intermediate_stored: int | None = None
    ranks: int = 0  # converted with --tp/--ep: rank folders holding this layer's experts


@dataclass
class InspectReport:
    path: str
    state: str  # "source" | "converted"
    format: str
    architecture: str
    routing: dict
    num_tensors: int
    total_bytes: int
    num_files: int
    moe_layers: list[LayerSummary] = field(default_factory=list)
    expert_bytes: int = 0
    excluded_expert_modules: int = 0
    issues: list[str] = field(default_factory=list)
    descriptor: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def inspect_checkpoint(src: str | Path, revision: str | None = None) -> InspectReport:
    root = resolve_source(src, revision)
    config_path = root / "config.json"
    if config_path.is_file():
        descriptor = descriptor_from_config(read_json(config_path))
        if descriptor is not None:
            return _inspect_converted(root, descriptor)
    try:
        ckpt = open_checkpoint(root)
    except AlreadyConvertedError:  # pragma: no cover - handled above
        raise
    return _inspect_source(ckpt)


def _inspect_source(ckpt: SourceCheckpoint) -> InspectReport:
    files = ckpt.files
    layers = []
    expert_bytes = 0
    for layer in ckpt.layers:
        nbytes = sum(files.info(n).nbytes for n in layer.source_names())
        expert_bytes += nbytes
        layers.append(LayerSummary(layer.prefix, layer.num_experts, layer.hidden_size, layer.intermediate_size, nbytes))
    report = InspectReport(
        path=str(ckpt.root),
        state="source",
        format=ckpt.format.name,
        architecture=ckpt.arch.name,
        routing=ckpt.routing.to_dict(),
        num_tensors=len(files.tensors),
        total_bytes=sum(t.nbytes for t in files.tensors.values()),
        num_files=len(files.files),
        moe_layers=layers,
        expert_bytes=expert_bytes,
        excluded_expert_modules=len(ckpt.excluded_expert_modules),
    )
    report.issues = _source_issues(ckpt)
    return report


def _source_issues(ckpt: SourceCheckpoint) -> list[str]:
    """Things a user should know before serving; none of them stops conversion unless stated."""
    issues: list[str] = []
    to_mult = ckpt.format.to_dequant_multiplier
    differ_ws2 = differ_input = differ_down = 0
    for layer in ckpt.layers:
        dims = layout.MoEDims(layer.num_experts, layer.hidden_size, layer.intermediate_size, layer.gated)
        if dims.needs_padding:
            what = "per gate/up half" if layer.gated else "non-gated: I to a multiple of 128"
            issues.append(
                f"{layer.prefix}: H={dims.hidden_size}, I={dims.intermediate_size} need zero padding to "
                f"H={dims.hidden_padded}, I={dims.intermediate_padded} ({what}); convert pads and records it"
            )
        if layer.fused:
            continue  # one global scale per fused tensor: nothing can differ between experts
        w13_roles = ("gate", "up") if layer.gated else ("up",)

        def scales(role: str, kind: str) -> np.ndarray:  # one float32 multiplier per expert
            return np.stack([to_mult(ckpt.files.read_numpy(getattr(e[role], kind))).reshape(()) for e in layer.experts])

        if layer.gated:
            differ_ws2 += int((scales("gate", "weight_global") != scales("up", "weight_global")).sum())
        ins = np.concatenate([scales(r, "input_global") for r in w13_roles])
        differ_input += int(not (ins == ins[0]).all())
        downs = scales("down", "input_global")
        differ_down += int(not (downs == downs[0]).all())
    if differ_ws2:
        issues.append(
            f"gate and up weight global scales differ in {differ_ws2} experts: kept exact (the kernel scales the halves "
            "separately through g1_alphas and g1_scale_c)"
        )
    if differ_input:
        issues.append(
            f"{differ_input} MoE layers have per-expert gate/up input scales: the kernel quantizes hidden states once "
            "with the layer maximum a1 (as SGLang and vLLM do)"
        )
    if differ_down:
        issues.append(
            f"{differ_down} MoE layers have per-expert down_proj input scales: the kernel re-quantizes the "
            "intermediate with the layer maximum a2 (g1_scale_c and g2_alphas carry it)"
        )
    if ckpt.excluded_expert_modules:
        issues.append(
            f"{len(ckpt.excluded_expert_modules)} expert modules are excluded from quantization and are carried over unchanged"
        )
    return issues


def _inspect_converted(root: Path, descriptor: dict) -> InspectReport:
    ckpt = open_converted(root)  # every descriptor field type-checked: a damaged one is one line, not a KeyError
    files = ckpt.files
    all_files = [files, *ckpt.rank_files.values()]  # --tp/--ep output keeps the experts in ranks/rank-NNN/
    layers = []
    expert_bytes = 0
    for info in ckpt.layers:
        nbytes = sum(t.nbytes for f in all_files for n, t in f.tensors.items() if n.startswith(info.prefix + "."))
        expert_bytes += nbytes
        layers.append(
            LayerSummary(
                info.prefix, info.num_experts, info.hidden_size, info.intermediate_size, nbytes,
                hidden_stored=info.hidden_padded, intermediate_stored=info.intermediate_padded, ranks=len(info.ranks),
            )  # fmt: skip
        )
    issues = [
        "already converted (quant_method nvfp4_trtllm): serve it with the nvfp4ckpt plugin for SGLang or vLLM "
        "(README, Serving); do not convert it again"
    ]
    parallel = descriptor.get("parallel") or {}
    if ckpt.rank_files:
        issues.append(
            f"rank-sharded for MoE tp={parallel.get('tp')} ep={parallel.get('ep')}: {len(ckpt.rank_files)} rank folders "
            "(ranks/rank-NNN/, rank = ep_rank * tp + tp_rank) hold the experts; other tensors are whole at the top level"
        )
    padded = [l for l in layers if (l.hidden_stored, l.intermediate_stored) != (l.hidden_size, l.intermediate_size)]
    if padded:
        l = padded[0]
        issues.append(
            f"{len(padded)} MoE layers are stored zero-padded (e.g. {l.prefix}: H={l.hidden_size}, I={l.intermediate_size} "
            f"stored as H={l.hidden_stored}, I={l.intermediate_stored}); padded values contribute exactly 0"
        )
    return InspectReport(
        num_tensors=sum(len(f.tensors) for f in all_files),
        total_bytes=sum(t.nbytes for f in all_files for t in f.tensors.values()),
        num_files=sum(len(f.files) for f in all_files),
        path=str(root),
        state="converted",
        format=f"{descriptor.get('layout')} v{descriptor.get('layout_version')} (from {descriptor.get('source_format')})",
        architecture=str(descriptor.get("architecture")),
        routing=descriptor.get("routing") or {},
        moe_layers=layers,
        expert_bytes=expert_bytes,
        descriptor=descriptor,
        issues=issues,
    )

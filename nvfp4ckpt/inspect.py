"""What is this checkpoint? A summary that needs headers and a few scalars, never the weights."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .errors import InputError, UnsupportedArchitectureError
from .io import CheckpointFiles, count, read_json
from .layouts.trtllm_gen import transform as layout
from .layouts.trtllm_gen.converted import open_converted
from .layouts.trtllm_gen.descriptor import descriptor_from_config
from .source import architectures
from .source.checkpoint import SourceCheckpoint, find_moe_layers, open_checkpoint, resolve_source
from .source.formats import detect_format


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
    model_type: str | None = None  # config.json's (its text_config's for a multimodal model)
    family_known: bool = True  # False: no registered family has this model_type; convert refuses it

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
    except UnsupportedArchitectureError as exc:
        return _inspect_unknown(root, str(exc))
    return _inspect_source(ckpt)


def _model_type(config: dict) -> str | None:
    text = config.get("text_config")
    found = config.get("model_type")
    if isinstance(text, dict) and isinstance(text.get("model_type"), str) and found not in _known_types():
        found = text["model_type"]
    return found if isinstance(found, str) else None


def _known_types() -> set[str]:
    return {t for a in architectures.registered() for t in a.model_types}


def _inspect_unknown(root: Path, reason: str) -> InspectReport:
    """A model_type no family covers: what can be told without one (the quantization format, the tensors, the expert
    layers if their names follow a registered family's), the family marked unknown, and why convert refuses it."""
    config = read_json(root / "config.json")
    fmt = detect_format(root, config)  # not NVFP4 at all: that one-line error stands
    files = CheckpointFiles(root)
    if not files.tensors:
        raise InputError(f"{root}: no *.safetensors files; only safetensors checkpoints are supported")
    layers, like = [], None
    for arch in architectures.registered():  # the expert tensors read with the first family whose naming fits
        try:
            found, _ = find_moe_layers(files, fmt, arch)
        except InputError:
            continue
        if found:
            layers, like = found, arch
            break
    summaries = [
        LayerSummary(l.prefix, l.num_experts, l.hidden_size, l.intermediate_size, sum(files.info(n).nbytes for n in l.source_names()))
        for l in layers
    ]
    model_type = _model_type(config)
    issues = [f"unsupported family: {reason.partition(': ')[2] or reason}"]
    if like is not None:
        issues.append(f"the MoE layers above were read with {like.name}'s tensor names; sizes and routing are not checked")
    return InspectReport(
        path=str(root),
        state="source",
        format=fmt.name,
        architecture="unknown",
        routing={},
        num_tensors=len(files.tensors),
        total_bytes=sum(t.nbytes for t in files.tensors.values()),
        num_files=len(files.files),
        moe_layers=summaries,
        expert_bytes=sum(l.bytes for l in summaries),
        issues=issues,
        model_type=model_type,
        family_known=False,
    )


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
        model_type=_model_type(ckpt.config),
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
            f"gate and up weight global scales differ in {count(differ_ws2, 'expert')}: kept exact (the kernel scales the halves "
            "separately through g1_alphas and g1_scale_c)"
        )
    if differ_input:
        issues.append(
            f"{count(differ_input, 'MoE layer')} {'has' if differ_input == 1 else 'have'} per-expert gate/up input scales: the kernel quantizes hidden states once "
            "with the layer maximum a1 (as SGLang and vLLM do)"
        )
    if differ_down:
        issues.append(
            f"{count(differ_down, 'MoE layer')} {'has' if differ_down == 1 else 'have'} per-expert down_proj input scales: the kernel re-quantizes the "
            "intermediate with the layer maximum a2 (g1_scale_c and g2_alphas carry it)"
        )
    if ckpt.excluded_expert_modules:
        issues.append(
            f"{count(len(ckpt.excluded_expert_modules), 'expert module')} {'is' if len(ckpt.excluded_expert_modules) == 1 else 'are'} excluded from quantization and are carried over unchanged"
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
            f"rank-sharded for MoE tp={parallel.get('tp')} ep={parallel.get('ep')}: {count(len(ckpt.rank_files), 'rank folder')} "
            "(ranks/rank-NNN/, rank = ep_rank * tp + tp_rank) hold the experts; other tensors are whole at the top level"
        )
    padded = [l for l in layers if (l.hidden_stored, l.intermediate_stored) != (l.hidden_size, l.intermediate_size)]
    if padded:
        l = padded[0]
        issues.append(
            f"{count(len(padded), 'MoE layer')} {'is' if len(padded) == 1 else 'are'} stored zero-padded (e.g. {l.prefix}: H={l.hidden_size}, I={l.intermediate_size} "
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

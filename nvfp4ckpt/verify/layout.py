"""The ``layout`` check (needs the source): every MoE layer un-shuffled equals the source bytes; carried-over tensors
are byte-identical."""

from __future__ import annotations


from typing import Callable

from .._lazy import torch

from ..source.checkpoint import SourceCheckpoint
from ..layouts.trtllm_gen.scalars import kernel_scalars
from ..source.stacked import read_layer_source
from ..layouts.trtllm_gen.converted import ConvertedCheckpoint
from ..layouts.trtllm_gen.descriptor import LayerInfo
from ..layouts.trtllm_gen.ranks import from_kernel
from ..progress import TickFn
from .report import CheckResult



def check_layout(
    ckpt: ConvertedCheckpoint,
    src: SourceCheckpoint,
    tick: TickFn,
    compared: dict[str, str | None] | None = None,
    carried_problems: list[str] | None = None,
) -> CheckResult:
    """``compared``: layers the single-pass scan already compared (prefix -> problem or None); the others are
    read here. ``carried_problems``: the scan compared the carried-over tensors' bytes (only names, dtypes and
    shapes are checked here then)."""
    problems: list[str] = []
    compared = compared or {}
    src_layers = {l.prefix: l for l in src.layers}
    if set(src_layers) != {l.prefix for l in ckpt.layers}:
        problems.append(
            f"MoE layers differ: source has {sorted(src_layers)}, converted has {sorted(l.prefix for l in ckpt.layers)}"
        )
        return CheckResult("layout", "fail", "MoE layers do not match the source", problems)
    for n, layer in enumerate(ckpt.layers):
        tick("layout", n, len(ckpt.layers))
        if layer.prefix in compared:
            problem = compared[layer.prefix]
        else:
            problem = compare_layer(src, layer, src_layers[layer.prefix], ckpt.reassemble_layer)
        if problem:
            problems.append(problem)
    tick("layout", len(ckpt.layers), len(ckpt.layers))
    expert_names = src.expert_tensor_names
    carried = [n for n in src.files.tensors if n not in expert_names]
    for name in carried:
        if name not in ckpt.files.tensors:
            problems.append(f"{name}: missing from the converted checkpoint")
            continue
        if carried_problems is not None:
            continue
        a, b = src.files.info(name), ckpt.files.info(name)
        if a.dtype != b.dtype or a.shape != b.shape or src.files.read_bytes(name) != ckpt.files.read_bytes(name):
            problems.append(f"{name}: carried-over tensor differs from the source")
    problems.extend(carried_problems or [])
    owned = {n for l in ckpt.layers for n in l.tensor_names(ckpt.source_format)}
    for name in ckpt.files.tensors:
        if name not in owned and name not in src.files.tensors:
            problems.append(f"{name}: not in the source and not a canonical MoE tensor")
    summary = f"{len(ckpt.layers)} MoE layers un-shuffled and {len(carried)} carried-over tensors compared byte for byte"
    return CheckResult("layout", "fail" if problems else "pass", summary, problems)


def unshuffled(layer: LayerInfo, t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An unsharded layer's canonical tensors (as read) in source layout: ``reassemble_layer``'s result
    without reading the files again."""
    w31, s31, down, down_s, zero = from_kernel(t, layer.hidden_size, layer.intermediate_size, layer.gated)
    big = ("w13_weight", "w13_weight_scale", "w2_weight", "w2_weight_scale")
    scalars = {k: v for k, v in t.items() if k not in big}
    return {"w31": w31, "s31": s31, "down": down, "down_scale": down_s, "padding_zero": torch.tensor(zero), **scalars}


def _first_mismatch(got: torch.Tensor, want: torch.Tensor) -> tuple[int, int] | None:
    """(expert, row) of the first differing byte of two [E, rows, cols] uint8 tensors."""
    diff = (got.view(torch.uint8) != want.view(torch.uint8)).flatten(2).any(-1)
    if not diff.any():
        return None
    e, r = diff.nonzero()[0].tolist()
    return e, r


def compare_layer(
    src: SourceCheckpoint,
    layer: LayerInfo,
    src_layer,
    reassembled: Callable[[LayerInfo], dict[str, torch.Tensor]],
    source: dict[str, torch.Tensor] | None = None,
) -> str | None:
    """The first difference between a converted layer (``reassembled(layer)``: source layout) and the source
    layer (``source``, or read here), or None."""
    if (layer.num_experts, layer.hidden_size, layer.intermediate_size) != (
        src_layer.num_experts, src_layer.hidden_size, src_layer.intermediate_size,
    ):  # fmt: skip
        return f"{layer.prefix}: sizes differ from the source"
    t = reassembled(layer)
    s = source if source is not None else read_layer_source(src, src_layer)
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



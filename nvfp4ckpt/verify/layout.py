"""The ``layout`` check (needs the source): every MoE layer un-shuffled equals the source bytes; carried-over tensors
are byte-identical."""

from __future__ import annotations


from typing import Callable

import numpy as np

from .._lazy import torch

from ..source.checkpoint import SourceCheckpoint
from ..layouts.trtllm_gen import transform as layout
from ..layouts.trtllm_gen.fast_path import has_fast_path
from ..layouts.trtllm_gen.scalars import kernel_scalars, layer_scalars
from ..source.stacked import read_layer_source
from ..layouts.trtllm_gen.converted import ConvertedCheckpoint
from ..layouts.trtllm_gen.descriptor import LayerInfo
from ..layouts.trtllm_gen.ranks import from_kernel
from ..io import count
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
    if src.format.name != ckpt.source_format:  # every tensor name would differ: say why once, not 150 times
        return CheckResult(
            "layout", "fail", "not compared: --source is not the checkpoint this was converted from",
            [f"{src.root}: a {src.format.name} checkpoint, but {ckpt.root} was converted from {ckpt.source_format}; "
             "pass the source it was converted from"],
        )  # fmt: skip
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
    compared_what = f"{count(len(ckpt.layers), 'MoE layer')} un-shuffled and {count(len(carried), 'carried-over tensor')} compared byte for byte"
    summary = f"{count(len(problems), 'difference')} found ({compared_what})" if problems else compared_what
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




def fast_compare_layer(
    src: SourceCheckpoint, layer: LayerInfo, src_layer, t: dict[str, torch.Tensor], keep: range | None = None
) -> tuple[bool, dict[str, torch.Tensor] | None] | None:
    """Compare an unsharded, unpadded, gated layer with its source the way ``convert``'s CPU fast path writes it:
    each source expert is read once into a small scratch buffer, permuted into the kernel layout and compared with
    the converted expert's bytes (no whole-layer un-shuffle). Returns None when the fast path does not apply, else
    (equal, the stacked source tensors of the experts in ``keep`` for the numerics, with ``raw_scalars_all``).
    Not equal: call ``compare_layer`` for the exact location (it reads the source layer again; a failure only)."""
    if layer.ranks or layer.padded or not layer.gated or not has_fast_path(src_layer):
        return None
    e, h, i = layer.num_experts, layer.hidden_size, layer.intermediate_size
    kernel = {k: t[k].view(torch.uint8).numpy() for k in ("w13_weight", "w13_weight_scale", "w2_weight", "w2_weight_scale")}
    if kernel["w13_weight"].shape != (e, 2 * i, h // 2) or kernel["w2_weight"].shape != (e, h, i // 2):
        return None
    files = src.files
    w_bytes, s_bytes = i * h // 2, i * h // 16
    scratch = np.empty(3 * (w_bytes + s_bytes), dtype=np.uint8)  # one expert's six source tensors
    up, gate, down, up_s, gate_s, down_s = np.split(scratch, np.cumsum([w_bytes] * 3 + [s_bytes] * 2))
    up, gate, down = up.reshape(i, h // 2), gate.reshape(i, h // 2), down.reshape(h, i // 2)
    up_s, gate_s, down_s = up_s.reshape(i, h // 16), gate_s.reshape(i, h // 16), down_s.reshape(h, i // 16)
    w13, s13 = np.empty((2 * i, h // 2), np.uint8), np.empty((2 * i, h // 16), np.uint8)
    w2, s2 = np.empty((h, i // 2), np.uint8), np.empty((h, i // 16), np.uint8)
    raw = np.empty((e, 3, 2), dtype=np.float32)
    block = None
    if keep is not None:
        k = len(keep)
        block = {
            "w31": torch.empty((k, 2 * i, h // 2), dtype=torch.uint8), "s31": torch.empty((k, 2 * i, h // 16), dtype=torch.uint8),
            "down": torch.empty((k, h, i // 2), dtype=torch.uint8), "down_scale": torch.empty((k, h, i // 16), dtype=torch.uint8),
        }  # fmt: skip
    equal = True
    for x, names in enumerate(src_layer.experts):
        for name, dst in ((names["up"].weight, up), (names["gate"].weight, gate), (names["down"].weight, down),
                          (names["up"].weight_scale, up_s), (names["gate"].weight_scale, gate_s),
                          (names["down"].weight_scale, down_s)):  # fmt: skip
            files.read_into(name, dst)
        for r, role in enumerate(("gate", "up", "down")):
            files.read_into(names[role].weight_global, raw[x, r, 0:1])
            files.read_into(names[role].input_global, raw[x, r, 1:2])
        if equal:
            for half, (rows, scales) in enumerate(((up, up_s), (gate, gate_s))):
                layout.w13_rows_into(w13, half, rows)
                layout.w13_scales_into(s13, half, scales)
            layout.w2_rows_into(w2, down)
            layout.w2_scales_into(s2, down_s)
            equal = (
                np.array_equal(w13, kernel["w13_weight"][x]) and np.array_equal(s13, kernel["w13_weight_scale"][x])
                and np.array_equal(w2, kernel["w2_weight"][x]) and np.array_equal(s2, kernel["w2_weight_scale"][x])
            )  # fmt: skip
        if block is not None and x in keep:
            j = x - keep.start
            for dst, rows in ((block["w31"][j, :i], up), (block["w31"][j, i:], gate), (block["s31"][j, :i], up_s),
                              (block["s31"][j, i:], gate_s), (block["down"][j], down), (block["down_scale"][j], down_s)):  # fmt: skip
                dst.copy_(torch.from_numpy(rows))
    if equal:
        for name, value in layer_scalars(src, src_layer, raw).items():
            got = t[name].contiguous().view(torch.uint8).numpy().tobytes()
            if np.ascontiguousarray(value).tobytes() != got:
                equal = False
    if block is not None:
        block["raw_scalars"] = torch.from_numpy(raw[keep.start : keep.stop].copy())
        block["raw_scalars_all"] = torch.from_numpy(raw)
    return equal, block

"""A source MoE layer read whole into stacked tensors: the common input of every output layout's transform and of
the float32 reference (``w31`` rows ``[up ; gate]``, ``down``, their block scales, and the raw global scales)."""

from __future__ import annotations

from .._lazy import torch
from ..io import torch_dtype
from .checkpoint import SourceCheckpoint, SourceMoELayer


def read_layer_source(ckpt: SourceCheckpoint, layer: SourceMoELayer) -> dict[str, torch.Tensor]:
    """Stacked source tensors of a layer: w31/s31 ``[up ; gate]`` (non-gated: ``[up]``), down/down_scale,
    raw scalars ``[E, roles, 2]`` (roles gate, up, down; non-gated up, down)."""
    e, h, i = layer.num_experts, layer.hidden_size, layer.intermediate_size
    files = ckpt.files
    w13_roles = ("up", "gate") if layer.gated else ("up",)  # row blocks of w31, in order
    n = len(w13_roles)
    w31 = torch.empty((e, n * i, h // 2), dtype=torch.uint8)
    s31 = torch.empty((e, n * i, h // 16), dtype=torch.uint8)
    down = torch.empty((e, h, i // 2), dtype=torch.uint8)
    down_s = torch.empty((e, h, i // 16), dtype=torch.uint8)
    scalar_dtype = torch_dtype(layer.scalar_dtype)
    # raw[e, role, 0] = weight global, raw[e, role, 1] = input global
    raw = torch.empty((e, len(layer.roles), 2), dtype=scalar_dtype)
    if layer.fused:
        return _read_fused_layer(ckpt, layer, raw)
    for x, names in enumerate(layer.experts):
        for k, role in enumerate(w13_roles):
            files.read_into(names[role].weight, w31[x, k * i : (k + 1) * i])
            files.read_into(names[role].weight_scale, s31[x, k * i : (k + 1) * i])
        files.read_into(names["down"].weight, down[x])
        files.read_into(names["down"].weight_scale, down_s[x])
        for r, role in enumerate(layer.roles):
            files.read_into(names[role].weight_global, raw[x, r, 0])
            files.read_into(names[role].input_global, raw[x, r, 1])
    return {"w31": w31, "s31": s31, "down": down, "down_scale": down_s, "raw_scalars": raw}


def _read_fused_layer(ckpt: SourceCheckpoint, layer: SourceMoELayer, raw: torch.Tensor) -> dict[str, torch.Tensor]:
    """A fused (input-major) layer: gate_up ``[E, H/2, 2I]`` -> rows ``[up ; gate]``; down ``[E, I/2, H]`` -> ``[E, H, I/2]``.
    Transposing a byte matrix keeps each byte (two E2M1 codes along H, or I) whole, so this is exact."""
    files, i, f = ckpt.files, layer.intermediate_size, layer.fused
    gate_up = files.read(f["gate_up"].weight).transpose(1, 2)  # [E, 2I, H/2]: gate rows, then up rows
    gate_up_s = files.read(f["gate_up"].weight_scale).view(torch.uint8).transpose(1, 2)
    w31 = torch.cat([gate_up[:, i:], gate_up[:, :i]], 1)
    s31 = torch.cat([gate_up_s[:, i:], gate_up_s[:, :i]], 1)
    down = files.read(f["down"].weight).transpose(1, 2).contiguous()
    down_s = files.read(f["down"].weight_scale).view(torch.uint8).transpose(1, 2).contiguous()
    for r, role in enumerate(("gate_up", "gate_up", "down")):  # one global scale per fused tensor, for every expert
        raw[:, r, 0] = files.read(f[role].weight_global).reshape(())
        raw[:, r, 1] = files.read(f[role].input_global).reshape(())
    return {"w31": w31, "s31": s31, "down": down, "down_scale": down_s, "raw_scalars": raw}

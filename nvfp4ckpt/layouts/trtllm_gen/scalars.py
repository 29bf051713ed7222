"""The per-expert kernel scalars (g1_alphas, g1_scale_c, g2_alphas, w13_input_scale_quant) from a layer's global
scales, and the layer's whole set of scalar tensors."""

from __future__ import annotations

import numpy as np

from ...errors import InputError
from ...io import Array, as_float32
from ...source.checkpoint import SourceCheckpoint, SourceMoELayer


def kernel_scalars(ws2: Array, input_scale: Array) -> dict[str, Array]:
    """Per-expert scalars from ModelOpt-convention scales ``[E, 3]`` (columns gate, up, down), or
    ``[E, 2]`` (up, down) for non-gated experts: torch tensors in, torch tensors out; numpy arrays in,
    numpy arrays out (the CPU fast path). Either way every operation is one IEEE float32 operation
    (correctly rounded), so both give the same bits.

    Operation order follows SGLang's ModelOpt path so the float32 bits match it.
    """
    with np.errstate(all="ignore"):  # broken scales give inf/nan here; callers check and name them, no warning
        return _kernel_scalars(as_float32(ws2), as_float32(input_scale))


def _kernel_scalars(ws2: Array, input_scale: Array) -> dict[str, Array]:
    n = ws2.shape[1] - 1  # w13 columns
    a1 = input_scale[:, :n].max()
    a2 = input_scale[:, n].max()
    w2_input_scale_quant = 1.0 / a2  # float32: a Python float does not widen a float32 operand (numpy >= 2, torch)
    out = {
        "w13_weight_scale_2": ws2[:, :n],
        "w2_weight_scale_2": ws2[:, n],
        "w13_input_scale": input_scale[:, :n],
        "w2_input_scale": input_scale[:, n],
        "g1_alphas": a1 * ws2[:, 0],
        "g1_scale_c": w2_input_scale_quant * (a1 * ws2[:, n - 1]),
        "g2_alphas": a2 * ws2[:, n],
        "w13_input_scale_quant": (1.0 / a1).reshape(1),
    }
    return {name: _contiguous(value) for name, value in out.items()}


def _contiguous(x: Array) -> Array:
    return np.ascontiguousarray(x) if isinstance(x, (np.ndarray, np.generic)) else x.contiguous()


def _check_raw(ckpt: SourceCheckpoint, layer: SourceMoELayer, raw: Array) -> None:
    """Every stored global scale finite and positive, or an InputError naming the first bad source tensor."""
    v = np.asarray(raw if isinstance(raw, np.ndarray) else raw.float().cpu(), dtype=np.float32)
    bad = np.argwhere(~(np.isfinite(v) & (v > 0)))
    if not bad.size:
        return
    e, r, kind = (int(x) for x in bad[0])
    field = "weight_global" if kind == 0 else "input_global"
    if layer.fused:
        role = "gate_up" if r < len(layer.roles) - 1 else "down"
        name = getattr(layer.fused[role], field)
    else:
        name = getattr(layer.experts[e][layer.roles[r]], field)
    raise InputError(
        f"{ckpt.root}: {name} (in {layer.prefix}) is {v[e, r, kind]}, not a finite positive global scale; "
        "the checkpoint's global scales are broken (non-finite or non-positive values)"
    )


def layer_scalars(ckpt: SourceCheckpoint, layer: SourceMoELayer, raw: Array) -> dict[str, Array]:
    """The layer's scalar tensors from its raw global scales ``[E, roles, 2]`` (numpy or torch, as given)."""
    _check_raw(ckpt, layer, raw)
    to_mult = ckpt.format.to_dequant_multiplier
    with np.errstate(all="ignore"):  # 1/x of a tiny scale may overflow: caught below, named, never a warning
        scalars = kernel_scalars(to_mult(raw[:, :, 0]), to_mult(raw[:, :, 1]))
    for name, value in scalars.items():
        v = np.asarray(value)  # float32 on the CPU either way: no copy
        if not np.isfinite(v).all() or (v <= 0).any():
            raise InputError(
                f"{ckpt.root}: {layer.prefix}.{name} has non-finite or non-positive values; "
                "the checkpoint's global scales are broken"
            )
    if ckpt.format.raw_scalar_names:  # kept as stored: w13 weight, w2 weight, w13 input, w2 input
        n = raw.shape[1] - 1
        raw_cols = (raw[:, :n, 0], raw[:, n, 0], raw[:, :n, 1], raw[:, n, 1])
        for name, value in zip(ckpt.format.raw_scalar_names, raw_cols):
            scalars[name] = _contiguous(value)
    return scalars

"""NVFP4 arithmetic in pure torch: E2M1 codes, e4m3 block scales, global scales.

Conventions (ModelOpt): ``W = e2m1(code) * float(weight_scale) * weight_scale_2``; element 2j of a
row sits in the low nibble of byte j, element 2j+1 in the high nibble; one float8_e4m3fn block
scale per 16 consecutive inputs. Used to generate examples and references, never by the layout
transform itself (which only moves bytes).
"""

from __future__ import annotations

from dataclasses import dataclass

from ._lazy import torch

E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_MAX = 6.0
E4M3_MAX = 448.0
GROUP_SIZE = 16

# Midpoints between consecutive E2M1 magnitudes; bucketize gives the nearest code.
_E2M1_BOUNDARIES = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def e2m1_table(device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
    """The 16 E2M1 code values (bit 3 is the sign)."""
    mags = torch.tensor(E2M1_VALUES, dtype=dtype or torch.float32, device=device)
    return torch.cat([mags, -mags])


def unpack_e2m1(packed: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """uint8 ``[..., K/2]`` -> values ``[..., K]`` (low nibble first)."""
    table = e2m1_table(packed.device, dtype)
    low = (packed & 0x0F).long()
    high = (packed >> 4).long()
    return torch.stack([table[low], table[high]], dim=-1).flatten(-2)


def encode_e2m1(values: torch.Tensor) -> torch.Tensor:
    """Round values (already divided by their scales) to the nearest E2M1 code, packed uint8 ``[..., K/2]``."""
    boundaries = torch.tensor(_E2M1_BOUNDARIES, dtype=torch.float32, device=values.device)
    mag = values.abs().float().clamp(max=E2M1_MAX)
    code = torch.bucketize(mag, boundaries).to(torch.uint8)
    code = code | ((values < 0).to(torch.uint8) << 3)
    pairs = code.reshape(*code.shape[:-1], code.shape[-1] // 2, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def dequantize(
    packed: torch.Tensor, block_scale: torch.Tensor, global_scale: torch.Tensor | float
) -> torch.Tensor:
    """fp32 ``[..., N, K]`` from packed codes, linear e4m3 block scales and the ModelOpt weight_scale_2."""
    vals = unpack_e2m1(packed)
    scales = block_scale.float().repeat_interleave(GROUP_SIZE, dim=-1)
    return vals * scales * torch.as_tensor(global_scale, dtype=torch.float32)


@dataclass
class QuantizedLinear:
    """One NVFP4 linear in ModelOpt convention."""

    weight: torch.Tensor  # uint8 [N, K/2]
    weight_scale: torch.Tensor  # float8_e4m3fn [N, K/16], linear layout
    weight_scale_2: torch.Tensor  # fp32 scalar, dequant multiplier
    input_scale: torch.Tensor  # fp32 scalar, dequant multiplier of the activations


def quantize_linear(weight: torch.Tensor, input_amax: float) -> QuantizedLinear:
    """Quantize a float ``[N, K]`` weight to NVFP4 (ModelOpt recipe: amax/(6*448) global scale)."""
    w = weight.float()
    n, k = w.shape
    if k % GROUP_SIZE:
        raise ValueError(f"input size {k} is not a multiple of {GROUP_SIZE}")
    ws2 = (w.abs().max().clamp(min=1e-12) / (E2M1_MAX * E4M3_MAX)).float()
    blocks = w.reshape(n, k // GROUP_SIZE, GROUP_SIZE)
    block_amax = blocks.abs().amax(dim=-1)
    scale = (block_amax / E2M1_MAX / ws2).clamp(max=E4M3_MAX).to(torch.float8_e4m3fn)
    denom = (scale.float() * ws2).unsqueeze(-1)
    scaled = torch.where(denom > 0, blocks / denom.clamp(min=1e-30), torch.zeros_like(blocks))
    packed = encode_e2m1(scaled.reshape(n, k))
    input_scale = torch.tensor(input_amax / (E2M1_MAX * E4M3_MAX), dtype=torch.float32)
    return QuantizedLinear(packed, scale, ws2.reshape(()), input_scale)


def quantize_activations(x: torch.Tensor, global_scale: torch.Tensor | float) -> torch.Tensor:
    """Quant-dequant of activations to NVFP4 (fp32 out), as the kernel sees them.

    ``global_scale`` is the kernel's quantization multiplier (1/input_scale). Block scales are
    e4m3 of ``amax_block/6 * global_scale``; values are rounded to E2M1.
    """
    gs = torch.as_tensor(global_scale, dtype=torch.float32, device=x.device)
    xf = x.float()
    *lead, k = xf.shape
    blocks = xf.reshape(*lead, k // GROUP_SIZE, GROUP_SIZE)
    # a tensor divisor: PyTorch's CUDA division by a Python number multiplies by its rounded reciprocal, which moves
    # amax/6 by an ulp and a block scale across an e4m3 rounding boundary (5.6e-2 rel-L2 on a Qwen3-sized layer)
    six = torch.full((), E2M1_MAX, dtype=torch.float32, device=x.device)
    sf = (blocks.abs().amax(dim=-1) / six * gs).clamp(max=E4M3_MAX).to(torch.float8_e4m3fn).float()
    denom = (sf / gs).unsqueeze(-1)
    scaled = torch.where(denom > 0, blocks / denom.clamp(min=1e-30), torch.zeros_like(blocks))
    codes = encode_e2m1(scaled.reshape(*lead, k))
    return unpack_e2m1(codes).reshape(*lead, k // GROUP_SIZE, GROUP_SIZE).mul(denom).reshape(*lead, k)

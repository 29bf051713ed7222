"""The TRT-LLM-gen fused-MoE weight layout, as pure torch byte permutations.

Everything here moves bytes and never does arithmetic on values, so the transform is exact
and reversible (see docs/layout.md and the shared layout reference, sections 3 and 7).

For every expert of a layer (H = hidden size, I = intermediate size):
- w13 = [up ; gate] rows (uint8 [2I, H/2]), gathered with ``w13_row_permutation(2I)``, which is
  FlashInfer's ``reorder_rows_for_gated_act_gemm`` followed by ``shuffle_matrix_a(.., 128)``.
- w2 = down rows (uint8 [H, I/2]) gathered with ``shuffle_row_permutation(H)``.
- Block scales get the identical row gathers and then the 128x4 swizzle of
  ``block_scale_interleave``; they keep their logical shape, only the byte order changes.

All functions are vectorized over a leading expert dimension: one gather per tensor per layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

EPILOGUE_TILE_M = 128
SHUFFLE_BLOCK_ROWS = 32  # get_shuffle_block_size(128)
SF_TILE_ROWS = 128
SF_TILE_COLS = 4
GROUP_SIZE = 16  # NVFP4: one e4m3 block scale per 16 weights

LAYOUT_NAME = "trtllm_fp4_moe"
LAYOUT_VERSION = 1


class LayoutShapeError(ValueError):
    """A size the kernel cannot take without padding."""


@dataclass(frozen=True)
class MoEDims:
    """Logical sizes of one MoE layer."""

    num_experts: int
    hidden_size: int  # H
    intermediate_size: int  # I (per expert, unpadded)

    def check_kernel_compatible(self) -> None:
        """Raise LayoutShapeError unless the layout needs no padding (I % 64, H % 128)."""
        problems = []
        if self.intermediate_size % 64:
            problems.append(f"intermediate size I={self.intermediate_size} is not a multiple of 64")
        if self.hidden_size % 128:
            problems.append(f"hidden size H={self.hidden_size} is not a multiple of 128")
        if problems:
            raise LayoutShapeError(
                "; ".join(problems)
                + ": the TRT-LLM-gen layout would need zero padding, which this version does not write yet"
            )


@lru_cache(maxsize=64)
def shuffle_row_permutation(rows: int) -> torch.Tensor:
    """Row gather of ``shuffle_matrix_a(x, epilogue_tile_m=128)``: ``out[j] = x[perm[j]]``.

    Within each block of 32 rows, output row j takes source row (j%8)*4 + (j%32)//8.
    """
    if rows % SHUFFLE_BLOCK_ROWS:
        raise LayoutShapeError(f"{rows} rows is not a multiple of {SHUFFLE_BLOCK_ROWS}")
    j = torch.arange(rows, dtype=torch.int64)
    return (j // 32) * 32 + (j % 8) * 4 + (j % 32) // 8


@lru_cache(maxsize=64)
def w13_row_permutation(rows: int) -> torch.Tensor:
    """Row gather from ``[up ; gate]`` (``rows`` = 2I) to kernel order.

    Equals FlashInfer's ``_maybe_get_cached_w3_w1_permute_indices``: the gated-activation
    interleave (up0, gate0, up1, gate1, ...) composed with the 32-row epilogue shuffle.
    """
    shuffle = shuffle_row_permutation(rows)
    half = rows // 2
    interleave_src = torch.where(shuffle % 2 == 0, shuffle // 2, half + shuffle // 2)
    return interleave_src


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), dtype=perm.dtype)
    return inv


def swizzle_scales_128x4(scales_u8: torch.Tensor) -> torch.Tensor:
    """128x4 block-scale interleave of ``[..., M, K]`` uint8 (M % 128 == 0, K % 4 == 0).

    Byte (r, c) moves to ``((r//128)*(K/4) + c//4)*512 + (r%32)*16 + ((r%128)//32)*4 + c%4``;
    the result is reshaped back to ``[..., M, K]``.
    """
    *lead, m, k = scales_u8.shape
    _check_scale_tile(m, k)
    tiled = scales_u8.reshape(*lead, m // 128, 4, 32, k // 4, 4)
    n = len(lead)
    order = list(range(n)) + [n + 0, n + 3, n + 2, n + 1, n + 4]
    return tiled.permute(order).contiguous().reshape(*lead, m, k)


def unswizzle_scales_128x4(swizzled_u8: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`swizzle_scales_128x4`."""
    *lead, m, k = swizzled_u8.shape
    _check_scale_tile(m, k)
    tiled = swizzled_u8.reshape(*lead, m // 128, k // 4, 32, 4, 4)
    n = len(lead)
    order = list(range(n)) + [n + 0, n + 3, n + 2, n + 1, n + 4]
    return tiled.permute(order).contiguous().reshape(*lead, m, k)


def _check_scale_tile(m: int, k: int) -> None:
    if m % SF_TILE_ROWS or k % SF_TILE_COLS:
        raise LayoutShapeError(
            f"block-scale matrix [{m}, {k}] does not tile into 128x4 without padding"
        )


def _as_u8(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.uint8 else t.view(torch.uint8)


def w13_to_kernel(
    gate: torch.Tensor, up: torch.Tensor, gate_scale: torch.Tensor, up_scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ``[up ; gate]`` and apply the kernel row order and scale swizzle.

    gate/up: uint8 ``[E, I, H/2]``; gate_scale/up_scale: e4m3 or uint8 ``[E, I, H/16]``.
    Returns (uint8 ``[E, 2I, H/2]``, float8_e4m3fn ``[E, 2I, H/16]``).
    """
    w31 = torch.cat([_as_u8(up), _as_u8(gate)], dim=-2)
    s31 = torch.cat([_as_u8(up_scale), _as_u8(gate_scale)], dim=-2)
    return w31_to_kernel(w31, s31)


def w31_to_kernel(w31: torch.Tensor, s31: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel order for an already stacked ``[up ; gate]`` (uint8 ``[E, 2I, H/2]``, scales ``[E, 2I, H/16]``)."""
    perm = w13_row_permutation(w31.shape[-2]).to(w31.device)
    weight = _as_u8(w31).index_select(-2, perm)
    scale = swizzle_scales_128x4(_as_u8(s31).index_select(-2, perm))
    return weight, scale.view(torch.float8_e4m3fn)


def w2_to_kernel(down: torch.Tensor, down_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel row order and scale swizzle for down_proj: uint8 ``[E, H, I/2]``, scales ``[E, H, I/16]``."""
    perm = shuffle_row_permutation(down.shape[-2]).to(down.device)
    weight = _as_u8(down).index_select(-2, perm)
    scale = swizzle_scales_128x4(_as_u8(down_scale).index_select(-2, perm))
    return weight, scale.view(torch.float8_e4m3fn)


def w13_from_kernel(
    weight: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`w13_to_kernel`: returns (gate, up, gate_scale, up_scale), uint8 / e4m3."""
    rows = weight.shape[-2]
    inv = inverse_permutation(w13_row_permutation(rows)).to(weight.device)
    w31 = _as_u8(weight).index_select(-2, inv)
    s31 = unswizzle_scales_128x4(_as_u8(scale)).index_select(-2, inv)
    half = rows // 2
    e4m3 = torch.float8_e4m3fn
    return (
        w31[..., half:, :].contiguous(),
        w31[..., :half, :].contiguous(),
        s31[..., half:, :].contiguous().view(e4m3),
        s31[..., :half, :].contiguous().view(e4m3),
    )


def w2_from_kernel(weight: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`w2_to_kernel`: returns (down, down_scale)."""
    inv = inverse_permutation(shuffle_row_permutation(weight.shape[-2])).to(weight.device)
    down = _as_u8(weight).index_select(-2, inv)
    down_scale = unswizzle_scales_128x4(_as_u8(scale)).index_select(-2, inv)
    return down, down_scale.view(torch.float8_e4m3fn)

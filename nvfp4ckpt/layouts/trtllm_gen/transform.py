"""The TRT-LLM-gen fused-MoE weight layout, as pure torch byte permutations.

Everything here moves bytes and never does arithmetic on values, so the transform is exact
and reversible (see docs/layout.md and the shared layout reference, sections 3 and 7).

For every expert of a layer (H = hidden size, I = intermediate size):
- w13 = [up ; gate] rows (uint8 [2I, H/2]), gathered with ``w13_row_permutation(2I)``, which is
  FlashInfer's ``reorder_rows_for_gated_act_gemm`` followed by ``shuffle_matrix_a(.., 128)``.
- Non-gated experts (relu2, Nemotron-H): w13 = up rows only (uint8 [I, H/2]) with the shuffle alone
  (FlashInfer's ``is_gated_act_gemm=False``: no interleave), I padded to a multiple of 128.
- w2 = down rows (uint8 [H, I/2]) gathered with ``shuffle_row_permutation(H)``.
- Block scales get the identical row gathers and then the 128x4 swizzle of
  ``block_scale_interleave``; they keep their logical shape, only the byte order changes.

All functions are vectorized over a leading expert dimension: one gather per tensor per layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from ..._lazy import torch

EPILOGUE_TILE_M = 128
SHUFFLE_BLOCK_ROWS = 32  # get_shuffle_block_size(128)
SF_TILE_ROWS = 128
SF_TILE_COLS = 4

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
    gated: bool = True  # SwiGLU ([up ; gate]) or a non-gated activation (relu2: up only)

    @property
    def hidden_padded(self) -> int:
        return -(-self.hidden_size // 128) * 128

    @property
    def intermediate_padded(self) -> int:
        return pad_intermediate(self.intermediate_size, self.gated)

    @property
    def needs_padding(self) -> bool:
        return (self.hidden_padded, self.intermediate_padded) != (self.hidden_size, self.intermediate_size)


def intermediate_alignment(gated: bool) -> int:
    """I must be a multiple of this: w13 scales have 2I (gated) or I rows, tiled by 128 (vLLM's
    ``min_alignment``: 64 gated, 128 non-gated)."""
    return 64 if gated else 128


def pad_intermediate(inter: int, gated: bool = True) -> int:
    align = intermediate_alignment(gated)
    return -(-inter // align) * align


def w13_halves(gated: bool) -> int:
    """Row blocks of I in w13: [up ; gate] or [up]."""
    return 2 if gated else 1


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


def pad_w31(
    w31: torch.Tensor, s31: torch.Tensor, h_pad: int, i_pad: int, gated: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad ``[up ; gate]`` per half (or ``[up]``) to ``i_pad`` rows and the inputs to ``h_pad`` (as
    vLLM pads: ``[up | 0 | gate | 0]``). Zero codes with zero block scales contribute exactly nothing."""
    halves = w13_halves(gated)
    e, rows, _ = w31.shape
    i = rows // halves
    w = torch.zeros((e, halves * i_pad, h_pad // 2), dtype=torch.uint8, device=w31.device)
    s = torch.zeros((e, halves * i_pad, h_pad // 16), dtype=torch.uint8, device=w31.device)
    for half in range(halves):
        w[:, half * i_pad : half * i_pad + i, : w31.shape[-1]] = _as_u8(w31)[:, half * i : (half + 1) * i]
        s[:, half * i_pad : half * i_pad + i, : s31.shape[-1]] = _as_u8(s31)[:, half * i : (half + 1) * i]
    return w, s


def unpad_w31(
    w: torch.Tensor, s: torch.Tensor, hidden: int, inter: int, gated: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pad_w31` (the padding is dropped)."""
    halves = w13_halves(gated)
    i_pad = w.shape[-2] // halves
    rows = torch.cat([h * i_pad + torch.arange(inter) for h in range(halves)]).to(w.device)
    return (
        _as_u8(w).index_select(-2, rows)[..., : hidden // 2].contiguous(),
        _as_u8(s).index_select(-2, rows)[..., : hidden // 16].contiguous(),
    )


def pad_down(down: torch.Tensor, down_scale: torch.Tensor, h_pad: int, i_pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad down_proj to ``h_pad`` output rows and ``i_pad`` inputs."""
    e, h, _ = down.shape
    w = torch.zeros((e, h_pad, i_pad // 2), dtype=torch.uint8, device=down.device)
    s = torch.zeros((e, h_pad, i_pad // 16), dtype=torch.uint8, device=down.device)
    w[:, :h, : down.shape[-1]] = _as_u8(down)
    s[:, :h, : down_scale.shape[-1]] = _as_u8(down_scale)
    return w, s


def unpad_down(w: torch.Tensor, s: torch.Tensor, hidden: int, inter: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _as_u8(w)[:, :hidden, : inter // 2].contiguous(), _as_u8(s)[:, :hidden, : inter // 16].contiguous()


def swizzle_scales_128x4(scales_u8: torch.Tensor) -> torch.Tensor:
    """128x4 block-scale interleave of ``[..., M, K]`` uint8 (M % 128 == 0, K % 4 == 0).

    Byte (r, c) moves to ``((r//128)*(K/4) + c//4)*512 + (r%32)*16 + ((r%128)//32)*4 + c%4``;
    the result is reshaped back to ``[..., M, K]``. The 4 bytes of a column group stay together, so
    the permutation runs on int32 words (4x fewer elements to move).
    """
    *lead, m, k = scales_u8.shape
    _check_scale_tile(m, k)
    words = _as_u8(scales_u8).contiguous().view(torch.int32)  # [..., M, K/4]
    tiled = words.reshape(*lead, m // 128, 4, 32, k // 4)
    n = len(lead)
    order = list(range(n)) + [n + 0, n + 3, n + 2, n + 1]
    return tiled.permute(order).contiguous().view(torch.uint8).reshape(*lead, m, k)


def unswizzle_scales_128x4(swizzled_u8: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`swizzle_scales_128x4`."""
    *lead, m, k = swizzled_u8.shape
    _check_scale_tile(m, k)
    words = _as_u8(swizzled_u8).contiguous().view(torch.int32)
    tiled = words.reshape(*lead, m // 128, k // 4, 32, 4)
    n = len(lead)
    order = list(range(n)) + [n + 0, n + 3, n + 2, n + 1]
    return tiled.permute(order).contiguous().view(torch.uint8).reshape(*lead, m, k)


def _words(u8: torch.Tensor) -> torch.Tensor:
    """View rows of bytes as the widest integer words that divide the row length (fewer elements to move)."""
    cols = u8.shape[-1]
    for dtype, size in ((torch.int64, 8), (torch.int32, 4), (torch.int16, 2)):
        if cols % size == 0:
            return u8.view(dtype)
    return u8


def _permute_row_blocks(t: torch.Tensor, block_shape: tuple[int, ...], order: tuple[int, ...]) -> torch.Tensor:
    """Split dim -2 into ``block_shape`` and permute those sub-dimensions (rows move whole, as words)."""
    u8 = _as_u8(t).contiguous()
    words = _words(u8)
    *lead, rows, cols = words.shape
    n = len(lead)
    view = words.reshape(*lead, *block_shape, cols)
    full = list(range(n)) + [n + o for o in order] + [n + len(block_shape)]
    return view.permute(full).contiguous().reshape(*lead, rows, cols).view(torch.uint8).reshape(u8.shape)


def w13_rows_to_kernel(w31: torch.Tensor) -> torch.Tensor:
    """Rows of ``[up ; gate]`` in kernel order; the same as ``w31[..., w13_row_permutation(2I), :]``.

    Kernel row j = 32b + 16a + 8h + r holds ``W31[h*I + 16b + 2r + a]``: a permutation of the
    sub-dimensions (h, b, r, a) -> (b, a, h, r), done as one strided copy.
    """
    rows = w31.shape[-2]
    if rows % 32:
        raise LayoutShapeError(f"{rows} rows is not a multiple of 32")
    return _permute_row_blocks(w31, (2, rows // 32, 8, 2), (1, 3, 0, 2))


def w13_rows_from_kernel(w13: torch.Tensor) -> torch.Tensor:
    rows = w13.shape[-2]
    return _permute_row_blocks(w13, (rows // 32, 2, 2, 8), (2, 0, 3, 1))


def shuffle_rows(x: torch.Tensor) -> torch.Tensor:
    """``shuffle_matrix_a(x, 128)`` rows: within each 32-row block, (q, p) -> (p, q) for row 4q + p."""
    rows = x.shape[-2]
    if rows % 32:
        raise LayoutShapeError(f"{rows} rows is not a multiple of 32")
    return _permute_row_blocks(x, (rows // 32, 8, 4), (0, 2, 1))


def unshuffle_rows(y: torch.Tensor) -> torch.Tensor:
    rows = y.shape[-2]
    return _permute_row_blocks(y, (rows // 32, 4, 8), (0, 2, 1))


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


def w31_to_kernel(w31: torch.Tensor, s31: torch.Tensor, gated: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel order for an already stacked ``[up ; gate]`` (uint8 ``[E, 2I, H/2]``, scales ``[E, 2I, H/16]``);
    non-gated: ``[up]`` (``[E, I, ...]``), shuffled without the gated interleave."""
    rows_to_kernel = w13_rows_to_kernel if gated else shuffle_rows
    weight = rows_to_kernel(w31)
    scale = swizzle_scales_128x4(rows_to_kernel(s31))
    return weight, scale.view(torch.float8_e4m3fn)


def w31_from_kernel(weight: torch.Tensor, scale: torch.Tensor, gated: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`w31_to_kernel`: (``[up ; gate]`` or ``[up]`` rows, their scales), both uint8."""
    rows_from_kernel = w13_rows_from_kernel if gated else unshuffle_rows
    return rows_from_kernel(weight), rows_from_kernel(unswizzle_scales_128x4(scale))


def w2_to_kernel(down: torch.Tensor, down_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel row order and scale swizzle for down_proj: uint8 ``[E, H, I/2]``, scales ``[E, H, I/16]``."""
    weight = shuffle_rows(down)
    scale = swizzle_scales_128x4(shuffle_rows(down_scale))
    return weight, scale.view(torch.float8_e4m3fn)


def w13_from_kernel(
    weight: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`w13_to_kernel`: returns (gate, up, gate_scale, up_scale), uint8 / e4m3."""
    rows = weight.shape[-2]
    w31 = w13_rows_from_kernel(weight)
    s31 = w13_rows_from_kernel(unswizzle_scales_128x4(scale))
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
    down = unshuffle_rows(weight)
    down_scale = unshuffle_rows(unswizzle_scales_128x4(scale))
    return down, down_scale.view(torch.float8_e4m3fn)


# ----------------------------------------------------------------------------------------------
# One expert at a time, into a preallocated output (numpy views; the CPU fast path of ``convert``).
# The same bytes as the vectorized functions above (tests/test_pipeline.py and tests/test_layout.py check them);
# numpy copies are single-threaded and release the GIL, so layer threads run them side by side.


def w13_rows_into(out: np.ndarray, half: int, rows: np.ndarray) -> None:
    """One half (0 = up, 1 = gate) of one expert's ``[up ; gate]`` weight rows into kernel order
    (``layout.w13_rows_to_kernel``: kernel row 32b + 16a + 8h + r holds half h's row 16b + 2r + a)."""
    n, c = rows.shape
    out.reshape(n // 16, 2, 2, 8, c)[:, :, half] = rows.reshape(n // 16, 8, 2, c).transpose(0, 2, 1, 3)


def w13_scales_into(out: np.ndarray, half: int, rows: np.ndarray) -> None:
    """One half of one expert's block scales: the w13 row order, then the 128x4 swizzle
    (``layout.swizzle_scales_128x4``), as one copy of int32 words (4 scale bytes of a row stay together)."""
    n, k = rows.shape
    # kernel row R = 32b + 16a + 8h + r with b = 4*B1 + B0 lands at word ((B1*(k/4) + w)*32 + R%32)*4 + B0
    o = out.reshape(-1).view(np.int32).reshape(n // 64, k // 4, 2, 2, 8, 4)  # (B1, w, a, h, r, B0)
    o[:, :, :, half] = rows.reshape(-1).view(np.int32).reshape(n // 64, 4, 8, 2, k // 4).transpose(0, 4, 3, 2, 1)


def w2_rows_into(out: np.ndarray, rows: np.ndarray) -> None:
    """One expert's down_proj rows in ``layout.shuffle_rows`` order (row 32b + 8p + q holds row 32b + 4q + p)."""
    n, c = rows.shape
    out.reshape(n // 32, 4, 8, c)[:] = rows.reshape(n // 32, 8, 4, c).transpose(0, 2, 1, 3)


def w2_scales_into(out: np.ndarray, rows: np.ndarray) -> None:
    """One expert's down_proj block scales: shuffled rows, then the 128x4 swizzle, as one copy of int32 words."""
    n, k = rows.shape
    o = out.reshape(-1).view(np.int32).reshape(n // 128, k // 4, 4, 8, 4)  # (B1, w, p, q, B0)
    o[:] = rows.reshape(-1).view(np.int32).reshape(n // 128, 4, 8, 4, k // 4).transpose(0, 4, 3, 2, 1)

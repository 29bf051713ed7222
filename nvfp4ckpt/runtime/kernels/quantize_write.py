"""Quantize unquantized expert weights to NVFP4 exactly as a producer does AND write them in the kernel layout, in
one pass on the GPU: each bf16/fp16/fp32 weight is read once, its E2M1 codes and e4m3 block scales are written
straight into the live tensors (rows to their kernel rows, scales to their 128x4-swizzled bytes).

The arithmetic is ``nvfp4ckpt.producer_quant``'s, step for step (docs/producer-quant.md), with the global scale of
each matrix given (computed beforehand by a reduction, as the update's planning needs it anyway):

* ModelOpt (``CT=False``, ``g`` = weight_scale_2): ``s = block_amax / (g * 6)``, 0 -> 1, clamped to [2^-9, 448],
  rounded to e4m3; codes of ``w / (s * g)``.
* compressed-tensors (``CT=True``, ``g`` = weight_global_scale): ``s = e4m3(min(g * dtype(block_amax / 6), 448))``,
  0 -> 0.125; codes of ``w / (s / g)``.
* E2M1 codes: nearest value, ties to the even code, sign bit when the scaled value is < 0.

Every division is IEEE (``div_rn``), every rounding written out in integer ops (``device_math``), so the
interpreter (tests, on the CPU) and the GPU give the bytes of the torch reference.

Table rows are ``FIELDS`` int64 values: source address, source row stride (elements), live weight slice address,
live scale slice address, row-map offset, rows, K (inputs per row), live weight row bytes, KPW (live scale columns / 4),
the global scale's float32 bits, the source column stride (elements: 1 for a row-major matrix, N for an expert of a
fused Llama-4 tensor read in place as its transposed view), 1 spare.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .device_math import _round_to_e4m3, _to_bf16_rne

_MAX = tl.standard._elementwise_max

FIELDS = 12
_SRC = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


@triton.jit
def _e2m1_code(q):
    """fp32 (already divided by its scale) -> E2M1 code 0..15: nearest, ties to the even code, sign when < 0."""
    a = tl.abs(q)
    code = ((a > 0.25).to(tl.int32) + (a >= 0.75).to(tl.int32) + (a > 1.25).to(tl.int32) + (a >= 1.75).to(tl.int32)
            + (a > 2.5).to(tl.int32) + (a >= 3.5).to(tl.int32) + (a > 5.0).to(tl.int32))  # fmt: skip
    return code | tl.where(q < 0, 8, 0)


@triton.jit
def _e4m3_bits(v):
    """The e4m3 byte of ``v``, a non-negative float32 that is exactly an e4m3 value (from ``_round_to_e4m3``)."""
    bits = v.to(tl.int32, bitcast=True)
    normal = (((((bits >> 23) & 255) - 120) << 3) | ((bits >> 20) & 7)) & 255
    sub = (v * 512.0).to(tl.int32)  # below 2^-6: v = m * 2^-9, m = 0..7
    return tl.where(v >= 0.015625, normal, sub).to(tl.uint8)


@triton.jit
def _quantize_kernel(table, row_map, SRC: tl.constexpr, CT: tl.constexpr, BLOCK_R: tl.constexpr, NB: tl.constexpr):
    entry = tl.program_id(0)
    t = table + entry * 12
    n_rows = tl.load(t + 5)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < n_rows
    src = tl.load(t + 0).to(tl.pointer_type(SRC))
    stride = tl.load(t + 1)
    dst_w = tl.load(t + 2).to(tl.pointer_type(tl.uint8))
    dst_s = tl.load(t + 3).to(tl.pointer_type(tl.uint8))
    map_off = tl.load(t + 4)
    k = tl.load(t + 6)
    row_bytes = tl.load(t + 7)
    kpw = tl.load(t + 8)
    g = tl.load(t + 9).to(tl.int32).to(tl.float32, bitcast=True)
    cs = tl.load(t + 10)
    r = tl.load(row_map + map_off + rows, mask=rmask, other=0).to(tl.int64)
    inner = (r % 32) * 4 + (r % 128) // 32  # word slot of row r inside a 512-byte scale tile
    tile = (r // 128) * kpw
    src_rows = src + rows.to(tl.int64)[:, None, None] * stride
    dst_rows = dst_w + r[:, None, None] * row_bytes
    j = tl.arange(0, 8)  # element pairs of a 16-element block
    b = tl.arange(0, NB)
    for k0 in range(0, k, NB * 16):
        blk = k0 // 16 + b  # [NB] scale columns
        col = blk[None, :, None] * 16 + 2 * j[None, None, :]  # even elements [1, NB, 8]
        m = rmask[:, None, None] & (col < k)
        ev = tl.load(src_rows + col * cs, mask=m, other=0.0).to(tl.float32)
        od = tl.load(src_rows + (col + 1) * cs, mask=m, other=0.0).to(tl.float32)
        # triton's own max combiner: a numpy reduction under the interpreter (a custom one runs per element)
        amax = tl.maximum(tl.reduce(tl.abs(ev), 2, _MAX), tl.reduce(tl.abs(od), 2, _MAX))  # [BLOCK_R, NB], exact
        if CT:
            local = tl.math.div_rn(amax, tl.full(amax.shape, 6.0, tl.float32))
            if SRC == tl.bfloat16:
                local = _to_bf16_rne(local).to(tl.float32)
            elif SRC == tl.float16:
                local = local.to(tl.float16).to(tl.float32)
            sv = _round_to_e4m3(tl.minimum(g * local, 448.0))
            sv = tl.where(sv == 0.0, 0.125, sv)
            denom = tl.math.div_rn(sv, tl.full(sv.shape, 0.0, tl.float32) + g)
        else:
            s = tl.math.div_rn(amax, tl.full(amax.shape, 0.0, tl.float32) + g * 6.0)
            s = tl.where(s == 0.0, 1.0, s)
            sv = _round_to_e4m3(tl.minimum(tl.maximum(s, 0.001953125), 448.0))
            denom = sv * g
        d = tl.broadcast_to(denom[:, :, None], ev.shape)
        lo = _e2m1_code(tl.math.div_rn(ev, d))
        hi = _e2m1_code(tl.math.div_rn(od, d))
        tl.store(dst_rows + (blk[None, :, None] * 8 + j[None, None, :]), (lo | (hi << 4)).to(tl.uint8), mask=m)
        soff = (tile[:, None] + blk[None, :] // 4) * 512 + inner[:, None] * 4 + blk[None, :] % 4
        tl.store(dst_s + soff, _e4m3_bits(sv), mask=rmask[:, None] & (blk[None, :] * 16 < k))


def launch(table: torch.Tensor, row_map: torch.Tensor, max_rows: int, src_dtype: torch.dtype, ct: bool) -> None:
    """Quantize and write every matrix of ``table`` (int64 ``[n, FIELDS]`` on the live device)."""
    n = table.shape[0]
    if n == 0:
        return
    block_r = 16
    grid = (n, triton.cdiv(max_rows, block_r))
    _quantize_kernel[grid](table, row_map, SRC=_SRC[src_dtype], CT=ct, BLOCK_R=block_r, NB=4)

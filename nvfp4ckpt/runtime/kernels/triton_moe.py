"""Fused NVFP4 MoE (SwiGLU, or non-gated relu2 experts) in Triton, reading weights in the TRT-LLM-gen kernel layout.

The weights are the outputs of ``nvfp4ckpt.layout.w13_to_kernel`` / ``w2_to_kernel``: rows shuffled in 32-row
blocks, gate/up rows interleaved, e4m3 block scales 128x4-swizzled. They are never un-shuffled in torch: every
load computes the kernel-layout address of the (row, k) it wants (see "Index math" below).

Numerics (the TRT-LLM-gen kernel's, as modelled by ``nvfp4ckpt.moe_torch.moe_forward_torch``):

* ``act="nvfp4"``: the hidden states are quantized once to NVFP4 with global scale ``1/a1``
  (``w13_input_scale_quant``) and linear 16-element e4m3 block scales, exactly like ``quant.quantize_activations``
  (same formulas, same ties). The pre-pass stores ``e2m1 * block_scale`` in fp16: a product of a 2-bit and a
  4-bit significand between 2^-10 and 2688, exact in fp16; the missing factor ``a1`` is part of ``g1_alphas``.
* FP4 weights are decoded in registers with integer bit moves (no table): fp16 ``e2m1 * e4m3 * 2^-8`` in nvfp4
  mode (exact, the ``2^8`` goes onto the fp32 accumulator), bf16 ``e2m1 * e4m3`` in bf16 mode (exact). The GEMMs
  run on fp16 (nvfp4) or bf16 (bf16 mode) tensor cores with fp32 accumulation: every product is exact and only
  the fp32 sums round.
* GEMM1 epilogue: ``gate = acc_gate * g1_alphas[e]`` (= a1*ws2_gate), ``up = acc_up * g1_scale_c[e]``
  (= a1*ws2_up/a2), ``inter = up * silu(gate)``. ``inter`` is therefore already divided by ``a2`` and is
  quant-dequantized to NVFP4 with global scale 1 (stored as the exact fp16 ``e2m1 * block_scale``).
* Non-gated experts (relu2, Nemotron-H; ``gated=False``): w13 holds up only, shuffled like w2 (no interleave);
  ``up = acc * g1_alphas[e]`` (= a1*ws2_up), ``inter = relu(up)^2``, then ``inter * (1/a2)`` (``w2_input_scale_quant``,
  required) is quantized with global scale 1, as above. In bf16 mode ``inter`` is rounded to bf16 as it is.
* GEMM2 epilogue: ``y = acc * g2_alphas[e]`` (= a2*ws2_down), fp32.
* Finalize: ``out[t] = sum_k topk_weights[t, k] * y[slot(t, k)]`` in k order (deterministic, no atomics on data).

``act="bf16"`` (W4A16): the bf16 hidden states feed GEMM1 directly. The scalars were built for NVFP4
activations, so the kernel undoes the ``a1`` in them: gate multiplier ``g1_alphas * w13_input_scale_quant``
(= ws2_gate), up multiplier ``g1_scale_c * w13_input_scale_quant`` (= ws2_up/a2). ``inter`` is rounded to bf16
(round-to-nearest-even, as torch). Without ``w2_input_scale_quant`` (= 1/a2) the ``1/a2`` stays in ``inter`` and
is undone by ``g2_alphas`` (= a2*ws2_down): mathematically identical, but bf16 rounds ``inter/a2`` instead of
``inter``, which differs from ``moe_forward_torch(act="bf16")`` by up to half a bf16 ulp per element unless a2 is
a power of two. Passing ``w2_input_scale_quant`` removes the ``a2`` from both (up multiplier / (1/a2), GEMM2
multiplier * (1/a2)).

Pipeline (7 launches + 1 memset, all graph-capturable: no host synchronisation):

1. ``_count_kernel``: tokens per expert (histogram + atomics).
2. ``_offsets_kernel`` (one program): each expert's slot range padded to BLOCK_M ("moe_align"), the expert of
   every BLOCK_M-row tile, and the per-expert write cursors.
3. ``_scatter_kernel``: each (token, k) pair gets a slot in its expert's range (an atomic cursor). The order
   inside an expert is arbitrary, but results do not depend on it: every row of a GEMM tile is computed
   independently with the same summation order, and the finalize reads slots by (token, k).
4. ``_quant_act_kernel`` (nvfp4 only): hidden states -> NVFP4 values (fp16).
5. ``_gemm1_swiglu_kernel``: one program = one expert tile x BLOCK_I intermediate channels (gate and up).
6. ``_gemm2_kernel``: one program = one expert tile x BLOCK_N output channels.
7. ``_finalize_kernel``: the routing-weighted sum over k.

Index math (w13, per expert, ``2I`` rows of ``H/2`` bytes)
----------------------------------------------------------
``w13_to_kernel`` writes ``out[j] = W31[h*I + s]`` with ``W31 = [up ; gate]``, ``h = (j>>3)&1`` (0 = up, 1 = gate)
and ``s = (j//32)*16 + (j%8)*2 + ((j>>4)&1)``. Inverting: intermediate channel ``s`` lives in kernel row

    up_row(s)   = (s//16)*32 + (s%16)//2 + 16*(s%2)
    gate_row(s) = up_row(s) + 8

so a 32-row block holds channels ``16*b .. 16*b+15`` of both halves. GEMM1 gathers the up rows and the gate rows
of its ``BLOCK_I`` channels (each row is contiguous along K) and gets both accumulators in natural channel order.

w2 (``H`` rows of ``I/2`` bytes): ``out[j] = down[(j//32)*32 + (j%8)*4 + (j%32)//8]``; output channel ``n`` lives
in kernel row ``(n//32)*32 + (n%4)*8 + (n%32)//4``.

Block scales (per expert, ``M`` rows x ``KS`` = K/16 columns, rows permuted exactly like the weights): the scale of
kernel row ``r``, column ``c`` is the byte at
``((r//128)*(KS/4) + c//4)*512 + (r%32)*16 + ((r%128)//32)*4 + c%4``, split below into a row part and a column part.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .device_math import _add, _max, _round_to_e4m3, _to_bf16_rne  # noqa: F401  (tests use tm._round_to_e4m3)

__all__ = ["MoETritonConfig", "default_config", "moe_align", "moe_forward_triton"]


# ---------------------------------------------------------------------------------------------------------------
# Device helpers
# ---------------------------------------------------------------------------------------------------------------


# Only builtins and this module's own @jit helpers are used inside the kernels (no tl.sum / tl.max / tl.cumsum /
# tl.sigmoid / tl.zeros, which are @jit functions of triton.language itself): under TRITON_INTERPRET=1 those only
# work if triton was first imported with the variable already set, which a test session cannot guarantee.


@triton.jit
def _e2m1_quarters(code):
    """E2M1 code (int32, 0..15) -> 4 * value as fp32 (exact).

    Magnitude code ``m = e1 e0 m0``: ``e = m >> 1``; value ``= m0 * 0.5`` if ``e == 0`` else
    ``(1 + m0/2) * 2^(e-1)``; in quarters: ``2*m0`` or ``(2 + m0) << e`` -> {0, 2, 4, 6, 8, 12, 16, 24}.
    """
    mag = code & 7
    e = mag >> 1
    m0 = mag & 1
    q = tl.where(e == 0, 2 * m0, (2 + m0) << e)
    q = tl.where((code & 8) != 0, -q, q)
    return q.to(tl.float32)


@triton.jit
def _nvfp4_qdq(blk, gs):
    """NVFP4 quant-dequant of fp32 blocks ``[A, B, 16]`` (16-element groups on the last axis).

    Mirrors ``quant.quantize_activations`` step by step (same operation order, IEEE divisions, bucketize ties
    toward the smaller magnitude): ``sf = e4m3(min(amax/6 * gs, 448))``, ``code = round_e2m1(x / (sf/gs))``.
    Returns ``e2m1(code) * sf`` (without the ``1/gs`` factor), which is exact in fp16 and in bf16.
    """
    amax = tl.reduce(tl.abs(blk), 2, _max)
    t = tl.math.div_rn(amax, tl.full(amax.shape, 6.0, tl.float32)) * gs
    sf = _round_to_e4m3(tl.minimum(t, 448.0))
    denom = tl.math.div_rn(sf, tl.full(sf.shape, 0.0, tl.float32) + gs)
    ok = denom > 0
    safe = tl.where(ok, denom, 1.0)
    scaled = tl.math.div_rn(blk, tl.broadcast_to(safe[:, :, None], blk.shape))
    scaled = tl.where(ok[:, :, None], scaled, 0.0)
    mag = tl.minimum(tl.abs(scaled), 6.0)
    # bucketize against the midpoints (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0), right=False semantics
    code = (
        (mag > 0.25).to(tl.int32)
        + (mag > 0.75).to(tl.int32)
        + (mag > 1.25).to(tl.int32)
        + (mag > 1.75).to(tl.int32)
        + (mag > 2.5).to(tl.int32)
        + (mag > 3.5).to(tl.int32)
        + (mag > 5.0).to(tl.int32)
    )
    val = _e2m1_quarters(code) * 0.25
    val = tl.where(scaled < 0, -val, val)
    return val * sf[:, :, None]


# PTX for 4 packed bytes -> fp16 bit patterns of their low nibbles ($0, $1) and high nibbles ($2, $3): each output
# element depends only on the input byte at the same position, so the result does not depend on how Triton groups
# elements into registers. prmt spreads two bytes into the low bytes of the two 16-bit halves (0x4140: bytes 0, 1;
# 0x4342: bytes 2, 3); then, in both halves at once, magnitude bits -> 9..11 and sign bit -> 15 (same bit moves as
# the portable path below): 2 prmt + 20 logic ops per 8 values instead of ~4 ops per value.
_FP4X4_TO_F16_ASM = tl.constexpr(
    """
{
.reg .b32 t, a, b;
prmt.b32 t, $4, 0, 0x4140;
shl.b32 a, t, 9;
shl.b32 b, t, 12;
and.b32 a, a, 0x0E000E00;
and.b32 b, b, 0x80008000;
or.b32 $0, a, b;
shl.b32 a, t, 5;
shl.b32 b, t, 8;
and.b32 a, a, 0x0E000E00;
and.b32 b, b, 0x80008000;
or.b32 $2, a, b;
prmt.b32 t, $4, 0, 0x4342;
shl.b32 a, t, 9;
shl.b32 b, t, 12;
and.b32 a, a, 0x0E000E00;
and.b32 b, b, 0x80008000;
or.b32 $1, a, b;
shl.b32 a, t, 5;
shl.b32 b, t, 8;
and.b32 a, a, 0x0E000E00;
and.b32 b, b, 0x80008000;
or.b32 $3, a, b;
}
"""
)


@triton.jit
def _e2m1_nibbles_to_f16(packed, FP4_ASM: tl.constexpr):
    """uint8 codes -> (low nibble, high nibble) as fp16 ``e2m1 * 2^-14``.

    e2m1 nibble ``s e1 e0 m`` -> fp16 bits ``s<<15 | (e1 e0 m)<<9``: exponent field ``e1e0`` and top mantissa bit
    ``m``, i.e. ``e2m1 * 2^-14`` (code 1 = 0.5 becomes the fp16 subnormal 2^-15, also exact).
    """
    if FP4_ASM:
        lo, hi = tl.inline_asm_elementwise(
            _FP4X4_TO_F16_ASM, "=r,=r,=r,=r,r", [packed], dtype=(tl.float16, tl.float16), is_pure=True, pack=4
        )
    else:
        # Nibble to the top of an int32 (sign -> bit 31), arithmetic shift right by 19 (magnitude -> bits 9..11,
        # sign copied into bits 12..31), keep bits 15 and 9..11: 3 integer ops per value.
        p = packed.to(tl.int32)
        lo = (((p << 28) >> 19) & 0x8E00).to(tl.int16).to(tl.float16, bitcast=True)
        hi = (((p << 24) >> 19) & 0x8E00).to(tl.int16).to(tl.float16, bitcast=True)
    return lo, hi


@triton.jit
def _decode_fp4_tile(
    packed, sf_bytes, ROWS: tl.constexpr, BLOCK_K: tl.constexpr, F16: tl.constexpr, FP4_ASM: tl.constexpr
):
    """Packed e2m1 ``uint8 [ROWS, BLOCK_K/2]`` + e4m3 scale bytes ``[ROWS, BLOCK_K/16]`` -> ``[ROWS, BLOCK_K]``.

    Element ``2j`` is the low nibble of byte ``j``, ``2j+1`` the high nibble. No table lookups: the bits are moved
    into fp16 bit patterns whose values are exact multiples of the codes (``_e2m1_nibbles_to_f16``); the e4m3
    byte ``s eeee mmm`` becomes fp16 bits ``s<<15 | (eeee mmm)<<7``, i.e. ``e4m3 * 2^-8`` (subnormals included).

    ``F16`` (nvfp4 mode): returns fp16 ``e2m1 * e4m3 * 2^-8`` = ``(e2m1*2^-14) * (e4m3*2^6)``, a product of a
    2-bit and a 4-bit significand within fp16's exact range, so the fp16 multiply is exact. The caller multiplies
    the fp32 accumulator by ``2^8`` (exact). Otherwise returns bf16 ``e2m1 * e4m3`` (exact in bf16; via fp32).
    ``FP4_ASM``: use the inline-PTX nibble decode (GPU only; same bits as the portable path).
    """
    lo, hi = _e2m1_nibbles_to_f16(packed, FP4_ASM)
    vals = tl.join(lo, hi)  # [ROWS, BLOCK_K/2, 2]: element 2j = lo nibble, 2j+1 = hi nibble
    vals = tl.reshape(vals, (ROWS, BLOCK_K // 16, 16))  # one 16-element scale group per [r, g, :]
    u = sf_bytes.to(tl.int32)
    sc = (((u & 0x80) << 8) | ((u & 0x7F) << 7)).to(tl.int16).to(tl.float16, bitcast=True)  # e4m3 * 2^-8
    if F16:
        vals = vals * (sc * 16384.0)[:, :, None]
        return tl.reshape(vals, (ROWS, BLOCK_K))
    else:
        vals = vals.to(tl.float32) * (sc.to(tl.float32) * 4194304.0)[:, :, None]  # * e4m3 * 2^22
        return tl.reshape(vals, (ROWS, BLOCK_K)).to(tl.bfloat16)


@triton.jit
def _mma(a, w, acc, DOT_F32: tl.constexpr):
    """``acc + a @ w^T`` for ``a [M, K]`` and ``w [N, K]`` (both fp16 or both bf16; tensor cores, fp32 accumulation).

    DOT_F32 (set under TRITON_INTERPRET=1): Triton 3.9's interpreter multiplies bf16 dot operands as their raw
    uint16 storage, so there the operands are widened to fp32 first (exact: a product of two fp16 or two bf16
    values is exact in fp32, so this is the same arithmetic as the tensor-core path).
    """
    if DOT_F32:
        return tl.dot(a.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
    else:
        return tl.dot(a, tl.trans(w), acc)


@triton.jit
def _swizzled_row_offset(r, KS):
    """Row part of the 128x4 swizzled scale offset of kernel row ``r`` (``KS`` scale columns)."""
    return (r // 128) * (KS // 4) * 512 + (r % 32) * 16 + ((r % 128) // 32) * 4


@triton.jit
def _swizzled_col_offset(c):
    """Column part of the 128x4 swizzled scale offset of scale column ``c``."""
    return (c // 4) * 512 + (c % 4)


# ---------------------------------------------------------------------------------------------------------------
# Routing bookkeeping ("moe_align"): sort (token, k) pairs into per-expert slot ranges padded to BLOCK_M
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _count_kernel(ids_ptr, counts_ptr, NUM_PAIRS, NUM_EXPERTS, BLOCK: tl.constexpr, E_POW2: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < NUM_PAIRS
    e = tl.load(ids_ptr + offs, mask=inb, other=-1)
    valid = inb & (e >= 0) & (e < NUM_EXPERTS)
    hist = tl.histogram(tl.where(valid, e, 0), E_POW2, mask=valid)
    ex = tl.arange(0, E_POW2)
    tl.atomic_add(counts_ptr + ex, hist, mask=(ex < NUM_EXPERTS) & (hist > 0))


@triton.jit
def _offsets_kernel(
    counts_ptr,
    cursor_ptr,
    expert_end_ptr,
    tile_expert_ptr,
    NUM_EXPERTS,
    MAX_TILES,
    BLOCK_M: tl.constexpr,
    E_POW2: tl.constexpr,
    TILE_CHUNK: tl.constexpr,
):
    """Expert e owns slots [start_e, start_e + ceil(count_e/BLOCK_M)*BLOCK_M), in expert order; real rows are
    [start_e, start_e + count_e). Tile t (slots t*BLOCK_M ...) belongs to the expert whose tile range holds t,
    i.e. e = number of experts whose tile range ends at or before t; tiles past the end get -1."""
    ex = tl.arange(0, E_POW2)
    em = ex < NUM_EXPERTS
    cnt = tl.load(counts_ptr + ex, mask=em, other=0)
    tiles = (cnt + BLOCK_M - 1) // BLOCK_M
    tile_end = tl.associative_scan(tiles, 0, _add)  # inclusive prefix sum, in tiles
    start = (tile_end - tiles) * BLOCK_M
    tl.store(cursor_ptr + ex, start, mask=em)
    tl.store(expert_end_ptr + ex, start + cnt, mask=em)
    for t0 in range(0, MAX_TILES, TILE_CHUNK):
        t = t0 + tl.arange(0, TILE_CHUNK)
        ended = (tile_end[None, :] <= t[:, None]) & em[None, :]
        e = tl.reduce(ended.to(tl.int32), 1, _add)
        e = tl.where(e < NUM_EXPERTS, e, -1)
        tl.store(tile_expert_ptr + t, e, mask=t < MAX_TILES)


@triton.jit
def _scatter_kernel(ids_ptr, cursor_ptr, slot_pair_ptr, pair_slot_ptr, NUM_PAIRS, NUM_EXPERTS, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < NUM_PAIRS
    e = tl.load(ids_ptr + offs, mask=inb, other=-1)
    valid = inb & (e >= 0) & (e < NUM_EXPERTS)
    slot = tl.atomic_add(cursor_ptr + tl.where(valid, e, 0), 1, mask=valid)  # old value = my slot
    tl.store(slot_pair_ptr + slot, offs, mask=valid)
    tl.store(pair_slot_ptr + offs, tl.where(valid, slot, -1), mask=inb)


# ---------------------------------------------------------------------------------------------------------------
# Activation quantization (nvfp4 mode)
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _quant_act_kernel(x_ptr, gs_ptr, out_ptr, H, stride_x, BLOCK_H: tl.constexpr):
    """out[t, :] = NVFP4 quant-dequant of x[t, :] with global scale gs, stored as e2m1*block_scale (exact fp16)."""
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    m = offs < H
    x = tl.load(x_ptr + t * stride_x + offs, mask=m, other=0.0).to(tl.float32)
    gs = tl.load(gs_ptr)
    q = _nvfp4_qdq(tl.reshape(x, (1, BLOCK_H // 16, 16)), gs)
    tl.store(out_ptr + t * H + offs, tl.reshape(q, (BLOCK_H,)).to(tl.float16), mask=m)


# ---------------------------------------------------------------------------------------------------------------
# GEMM1 + SwiGLU (+ NVFP4 re-quantization of the intermediate)
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _gemm1_swiglu_kernel(
    a_ptr,  # [T, H]: fp16 e2m1*block_scale values (nvfp4 mode) or the bf16 hidden states (bf16 mode)
    w_ptr,  # uint8 [E, 2I, H/2]: w13 in kernel layout
    s_ptr,  # uint8 [E, 2I, H/16]: w13 block scales, swizzled e4m3 bytes
    g1a_ptr,  # fp32 [E]: g1_alphas (gate multiplier)
    g1c_ptr,  # fp32 [E]: g1_scale_c (up multiplier)
    in_scale_ptr,  # fp32 [1]: w13_input_scale_quant = 1/a1 (used in bf16 mode)
    inter_scale_ptr,  # fp32 [1]: w2_input_scale_quant = 1/a2 (bf16 mode, only if HAS_INTER_SCALE)
    out_ptr,  # [S, INTER]: intermediate per slot (fp16 nvfp4 values, or bf16)
    slot_pair_ptr,  # int32 [S]: (token*K + k) of each slot
    tile_expert_ptr,  # int32 [max_tiles]: expert of each tile or -1
    expert_end_ptr,  # int32 [E]: one past the last real slot of each expert
    H,
    INTER,
    TOP_K,
    ACT_NVFP4: tl.constexpr,
    HAS_INTER_SCALE: tl.constexpr,
    GATED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_F32: tl.constexpr,
    FP4_ASM: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_i = tl.program_id(1)
    e = tl.load(tile_expert_ptr + pid_m)
    if e < 0:
        return
    e64 = e.to(tl.int64)

    # Rows of this tile: slots pid_m*BLOCK_M ...; the real ones map to token = pair // TOP_K.
    slot = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = slot < tl.load(expert_end_ptr + e)
    pair = tl.load(slot_pair_ptr + slot, mask=row_ok, other=0)
    token = (pair // TOP_K).to(tl.int64)

    # Intermediate channels s of this program and their kernel rows (see module docstring).
    s = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    if GATED:
        up_row = (s // 16) * 32 + (s % 16) // 2 + 16 * (s % 2)
    else:  # up rows only, shuffled like w2 (see GEMM2)
        up_row = (s // 32) * 32 + (s % 4) * 8 + (s % 32) // 4
    gate_row = up_row + 8

    half_h = H // 2
    ks = H // 16  # scale columns
    rows = 2 * INTER if GATED else INTER
    w_base = w_ptr + e64 * rows * half_h
    s_base = s_ptr + e64 * rows * ks
    up_w_ptrs = w_base + up_row[:, None].to(tl.int64) * half_h
    gate_w_ptrs = w_base + gate_row[:, None].to(tl.int64) * half_h
    up_s_ptrs = s_base + _swizzled_row_offset(up_row, ks)[:, None]
    gate_s_ptrs = s_base + _swizzled_row_offset(gate_row, ks)[:, None]
    a_ptrs = a_ptr + token[:, None] * H

    kb = tl.arange(0, BLOCK_K // 2)  # byte columns of a weight row
    kk = tl.arange(0, BLOCK_K)  # element columns of an activation row
    kc = tl.arange(0, BLOCK_K // 16)  # scale columns

    acc_up = tl.full((BLOCK_M, BLOCK_I), 0.0, tl.float32)
    acc_gate = tl.full((BLOCK_M, BLOCK_I), 0.0, tl.float32)
    for k0 in range(0, H, BLOCK_K):
        a = tl.load(a_ptrs + (k0 + kk)[None, :], mask=row_ok[:, None], other=0.0)
        col = _swizzled_col_offset(k0 // 16 + kc)[None, :]
        wu = tl.load(up_w_ptrs + (k0 // 2 + kb)[None, :])
        wu = _decode_fp4_tile(wu, tl.load(up_s_ptrs + col), BLOCK_I, BLOCK_K, ACT_NVFP4, FP4_ASM)
        acc_up = _mma(a, wu, acc_up, DOT_F32)
        if GATED:
            wg = tl.load(gate_w_ptrs + (k0 // 2 + kb)[None, :])
            wg = _decode_fp4_tile(wg, tl.load(gate_s_ptrs + col), BLOCK_I, BLOCK_K, ACT_NVFP4, FP4_ASM)
            acc_gate = _mma(a, wg, acc_gate, DOT_F32)

    gate_mul = tl.load(g1a_ptr + e)
    up_mul = tl.load(g1c_ptr + e)
    if ACT_NVFP4:  # fp16 weight tiles carry a factor 2^-8 (see _decode_fp4_tile)
        gate_mul = gate_mul * 256.0
        up_mul = up_mul * 256.0
    else:  # the scalars carry a1 (and 1/a2); bf16 activations have no a1 to cancel
        in_scale = tl.load(in_scale_ptr)
        gate_mul = gate_mul * in_scale
        up_mul = up_mul * in_scale
        if HAS_INTER_SCALE:
            up_mul = up_mul / tl.load(inter_scale_ptr)
    if GATED:
        gate = acc_gate * gate_mul
        up = acc_up * up_mul
        inter = up * (gate / (1.0 + tl.exp(-gate)))  # up * silu(gate)
    else:  # relu2: g1_alphas (= a1*ws2_up) scales up; 1/a2 applies to relu(up)^2, not to up
        up = tl.maximum(acc_up * gate_mul, 0.0)
        inter = up * up
        if ACT_NVFP4:
            inter = inter * tl.load(inter_scale_ptr)
    if ACT_NVFP4:
        # Intermediate -> NVFP4 with global scale 1 (it is already divided by a2 through g1_scale_c).
        inter = tl.reshape(_nvfp4_qdq(tl.reshape(inter, (BLOCK_M, BLOCK_I // 16, 16)), 1.0), (BLOCK_M, BLOCK_I))
    out_ptrs = out_ptr + slot[:, None].to(tl.int64) * INTER + s[None, :]
    if ACT_NVFP4:
        tl.store(out_ptrs, inter.to(tl.float16), mask=row_ok[:, None])  # e2m1*e4m3: exact in fp16
    else:
        tl.store(out_ptrs, _to_bf16_rne(inter), mask=row_ok[:, None])


# ---------------------------------------------------------------------------------------------------------------
# GEMM2
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _gemm2_kernel(
    a_ptr,  # [S, INTER]: intermediate per slot (fp16 nvfp4 values, or bf16)
    w_ptr,  # uint8 [E, H, INTER/2]: w2 in kernel layout
    s_ptr,  # uint8 [E, H, INTER/16]: swizzled e4m3 bytes
    g2a_ptr,  # fp32 [E]: g2_alphas
    inter_scale_ptr,  # fp32 [1]: 1/a2 (bf16 mode, only if HAS_INTER_SCALE)
    y_ptr,  # fp32 [S, H]
    tile_expert_ptr,
    expert_end_ptr,
    H,
    INTER,
    ACT_NVFP4: tl.constexpr,
    HAS_INTER_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_F32: tl.constexpr,
    FP4_ASM: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(tile_expert_ptr + pid_m)
    if e < 0:
        return
    e64 = e.to(tl.int64)
    slot = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = slot < tl.load(expert_end_ptr + e)

    # Output channels n (natural order) and the kernel rows holding them (inverse of the 32-row shuffle).
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    w_row = (n // 32) * 32 + (n % 4) * 8 + (n % 32) // 4

    half_i = INTER // 2
    ks = INTER // 16
    w_ptrs = w_ptr + e64 * H * half_i + w_row[:, None].to(tl.int64) * half_i
    s_ptrs = s_ptr + e64 * H * ks + _swizzled_row_offset(w_row, ks)[:, None]
    a_ptrs = a_ptr + slot[:, None].to(tl.int64) * INTER

    kb = tl.arange(0, BLOCK_K // 2)
    kk = tl.arange(0, BLOCK_K)
    kc = tl.arange(0, BLOCK_K // 16)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, INTER, BLOCK_K):
        a = tl.load(a_ptrs + (k0 + kk)[None, :], mask=row_ok[:, None], other=0.0)
        w = _decode_fp4_tile(
            tl.load(w_ptrs + (k0 // 2 + kb)[None, :]),
            tl.load(s_ptrs + _swizzled_col_offset(k0 // 16 + kc)[None, :]),
            BLOCK_N,
            BLOCK_K,
            ACT_NVFP4,
            FP4_ASM,
        )
        acc = _mma(a, w, acc, DOT_F32)

    out_mul = tl.load(g2a_ptr + e)
    if ACT_NVFP4:
        out_mul = out_mul * 256.0
    else:
        if HAS_INTER_SCALE:
            out_mul = out_mul * tl.load(inter_scale_ptr)
    y_ptrs = y_ptr + slot[:, None].to(tl.int64) * H + n[None, :]
    tl.store(y_ptrs, acc * out_mul, mask=row_ok[:, None])


# ---------------------------------------------------------------------------------------------------------------
# Finalize
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _finalize_kernel(
    y_ptr, pair_slot_ptr, w_ptr, out_ptr, H, TOP_K: tl.constexpr, BLOCK_H: tl.constexpr, OUT_BF16: tl.constexpr
):
    t = tl.program_id(0)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    hm = h < H
    acc = tl.full((BLOCK_H,), 0.0, tl.float32)
    for k in tl.static_range(TOP_K):  # fixed order k = 0, 1, ... -> deterministic
        slot = tl.load(pair_slot_ptr + t * TOP_K + k)
        wk = tl.load(w_ptr + t * TOP_K + k)
        ok = hm & ((tl.full(h.shape, 0, tl.int32) + slot) >= 0)  # slot -1: expert id out of range -> none
        yk = tl.load(y_ptr + slot.to(tl.int64) * H + h, mask=ok, other=0.0)
        acc += wk * yk
    if OUT_BF16:
        res = _to_bf16_rne(acc)
    else:
        res = acc
    tl.store(out_ptr + t.to(tl.int64) * H + h, res, mask=hm)


# ---------------------------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MoETritonConfig:
    """Tile sizes and launch parameters. BLOCK_I | I, BLOCK_N | H, BLOCK_K1 | H, BLOCK_K2 | I (all multiples
    of 16; BLOCK_K* multiples of 64 so one k-step covers whole 4-column groups of the swizzled scales)."""

    block_m: int = 16
    block_i: int = 32
    block_k1: int = 256
    block_n: int = 64
    block_k2: int = 256
    warps1: int = 4
    stages1: int = 4
    warps2: int = 4
    stages2: int = 4


def _largest_divisor(n: int, candidates: tuple[int, ...]) -> int:
    for c in candidates:
        if n % c == 0:
            return c
    raise ValueError(f"none of {candidates} divides {n}")


def default_config(num_tokens: int, top_k: int, num_experts: int, hidden: int, inter: int) -> MoETritonConfig:
    """Heuristic tile choice (not autotuned on hardware; checked only for sm_90 compilation without register
    spills). Decode (few rows per expert) is weight-bandwidth bound: small BLOCK_M, long K steps, deep pipelines,
    enough programs to fill the GPU. Prefill is compute bound: large tiles so each decoded weight tile is reused
    by many rows (wgmma from BLOCK_M=64 on)."""
    rows_per_expert = num_tokens * top_k / max(num_experts, 1)
    experts_hit = min(num_experts, num_tokens * top_k)
    if rows_per_expert <= 16:
        block_m = 16
    elif rows_per_expert <= 32:
        block_m = 32
    elif rows_per_expert <= 96:
        block_m = 64
    else:
        block_m = 128
    if block_m <= 32:
        block_i = 64 if experts_hit * inter // 64 >= 256 else 32  # >= ~2 programs per SM in GEMM1
        long_k = (256, 128, 64) if block_m == 16 else (128, 64)
        return MoETritonConfig(
            block_m=block_m,
            block_i=_largest_divisor(inter, (block_i, 32, 16)),
            block_k1=_largest_divisor(hidden, long_k),
            block_n=_largest_divisor(hidden, (64, 32, 16)),
            block_k2=_largest_divisor(inter, long_k),
            warps1=4,
            stages1=4,
            warps2=4,
            stages2=4,
        )
    return MoETritonConfig(
        block_m=block_m,
        block_i=_largest_divisor(inter, (64, 32, 16)),
        block_k1=_largest_divisor(hidden, (128, 64)),
        block_n=_largest_divisor(hidden, (128, 64, 32, 16)),
        block_k2=_largest_divisor(inter, (128, 64)),
        warps1=8,
        stages1=3,
        warps2=8,
        stages2=3,
    )


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def max_tiles(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Upper bound of sum_e ceil(count_e / block_m): floor(pairs/block_m) + number of experts that can be hit."""
    return num_pairs // block_m + min(num_experts, num_pairs)


@dataclass
class AlignedRouting:
    """Output of :func:`moe_align` (all int32, on the device)."""

    slot_pair: torch.Tensor  # [max_tiles*block_m]: (token*K + k) of each slot; padding slots are garbage
    pair_slot: torch.Tensor  # [T*K]: slot of each pair, -1 if its expert id was out of range
    tile_expert: torch.Tensor  # [max_tiles]: expert of each tile, -1 for unused tiles
    expert_end: torch.Tensor  # [E]: one past the last real slot of each expert
    counts: torch.Tensor  # [E]: pairs per expert
    block_m: int

    @property
    def num_tile_slots(self) -> int:
        return self.tile_expert.numel()


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> AlignedRouting:
    """Group the (token, k) pairs by expert into slot ranges padded to ``block_m`` (no host sync)."""
    device = topk_ids.device
    ids = topk_ids.reshape(-1).to(torch.int32).contiguous()
    num_pairs = ids.numel()
    tiles = max_tiles(num_pairs, num_experts, block_m)
    e_pow2 = max(16, _next_pow2(num_experts))
    counts = torch.zeros(num_experts, dtype=torch.int32, device=device)
    cursor = torch.empty(num_experts, dtype=torch.int32, device=device)
    expert_end = torch.empty(num_experts, dtype=torch.int32, device=device)
    tile_expert = torch.empty(max(tiles, 1), dtype=torch.int32, device=device)
    slot_pair = torch.empty(max(tiles, 1) * block_m, dtype=torch.int32, device=device)
    pair_slot = torch.empty(max(num_pairs, 1), dtype=torch.int32, device=device)
    pair_block = 256
    grid = (triton.cdiv(num_pairs, pair_block),)
    if num_pairs:
        _count_kernel[grid](ids, counts, num_pairs, num_experts, BLOCK=pair_block, E_POW2=e_pow2)
    _offsets_kernel[(1,)](
        counts, cursor, expert_end, tile_expert, num_experts, tiles,
        BLOCK_M=block_m, E_POW2=e_pow2, TILE_CHUNK=32 if e_pow2 >= 256 else 64,
    )  # fmt: skip
    if num_pairs:
        _scatter_kernel[grid](ids, cursor, slot_pair, pair_slot, num_pairs, num_experts, BLOCK=pair_block)
    return AlignedRouting(slot_pair, pair_slot[:num_pairs], tile_expert[:tiles], expert_end, counts, block_m)


def _interpreting() -> bool:
    """True when this module's kernels were defined under TRITON_INTERPRET=1 (Triton's CPU interpreter)."""
    return not isinstance(_gemm1_swiglu_kernel, triton.runtime.JITFunction)


def _use_fp4_asm() -> bool:
    """Inline-PTX nibble decode: on unless interpreting or NVFP4CKPT_TRITON_FP4_ASM=0. The portable path computes
    the same bits; in sm_90 SASS it costs ~13% more instructions per decoded weight in the decode-size GEMMs."""
    return not _interpreting() and os.environ.get("NVFP4CKPT_TRITON_FP4_ASM", "1") not in ("", "0")


def _scalar_tensor(v: torch.Tensor | float, device: torch.device) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v.reshape(-1)[:1].to(device=device, dtype=torch.float32)
    return torch.tensor([float(v)], dtype=torch.float32, device=device)


def moe_forward_triton(
    hidden_states: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w13_weight: torch.Tensor,
    w13_weight_scale: torch.Tensor,
    w2_weight: torch.Tensor,
    w2_weight_scale: torch.Tensor,
    g1_alphas: torch.Tensor,
    g1_scale_c: torch.Tensor,
    g2_alphas: torch.Tensor,
    w13_input_scale_quant: torch.Tensor | float,
    act: str = "nvfp4",
    *,
    w2_input_scale_quant: torch.Tensor | float | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    config: MoETritonConfig | None = None,
    gated: bool = True,
) -> torch.Tensor:
    """Fused NVFP4 MoE on kernel-layout weights. Returns ``[T, H]`` in ``out_dtype`` (bf16 or fp32).

    hidden_states: bf16 ``[T, H]`` (other float dtypes are cast); topk_ids int ``[T, K]`` (ids outside
    ``[0, E)`` contribute nothing); topk_weights fp32 ``[T, K]``.
    w13_weight uint8 ``[E, 2I, H/2]``, w13_weight_scale e4m3 ``[E, 2I, H/16]`` (swizzled bytes),
    w2_weight uint8 ``[E, H, I/2]``, w2_weight_scale e4m3 ``[E, H, I/16]`` (swizzled): ``layout.w13_to_kernel`` /
    ``layout.w2_to_kernel`` outputs. g1_alphas = a1*ws2_gate, g1_scale_c = a1*ws2_up/a2, g2_alphas = a2*ws2_down
    (fp32 ``[E]``), w13_input_scale_quant = 1/a1. ``w2_input_scale_quant`` (= 1/a2) is optional and only used
    in ``act="bf16"`` mode (see the module docstring). ``config`` overrides the tile heuristic.
    ``gated=False``: non-gated relu2 experts, w13 ``[E, I, H/2]`` (``layout.w31_to_kernel(.., gated=False)``),
    g1_alphas = a1*ws2_up; ``w2_input_scale_quant`` is then required in both modes.
    """
    if act not in ("nvfp4", "bf16"):
        raise ValueError(f"act must be 'nvfp4' or 'bf16', got {act!r}")
    if out_dtype not in (torch.bfloat16, torch.float32):
        raise ValueError("out_dtype must be torch.bfloat16 or torch.float32")
    num_tokens, hidden = hidden_states.shape
    num_experts, two_i, half_h = w13_weight.shape
    inter = two_i // 2 if gated else two_i
    if not gated and w2_input_scale_quant is None:
        raise ValueError("non-gated (relu2) experts need w2_input_scale_quant (1/a2)")
    if half_h * 2 != hidden:
        raise ValueError(f"w13_weight has {half_h * 2} inputs, hidden states have {hidden}")
    if tuple(w2_weight.shape) != (num_experts, hidden, inter // 2):
        raise ValueError(f"w2_weight must be [{num_experts}, {hidden}, {inter // 2}], got {tuple(w2_weight.shape)}")
    if tuple(w13_weight_scale.shape) != (num_experts, two_i, hidden // 16) or tuple(w2_weight_scale.shape) != (
        num_experts,
        hidden,
        inter // 16,
    ):
        raise ValueError("block scales must be [E, 2I (I non-gated), H/16] and [E, H, I/16]")
    if inter % 64 or hidden % 128:
        raise ValueError(f"need I % 64 == 0 and H % 128 == 0 (unpadded kernel layout), got I={inter}, H={hidden}")
    if topk_ids.shape != topk_weights.shape or topk_ids.shape[0] != num_tokens:
        raise ValueError("topk_ids and topk_weights must both be [T, K]")
    top_k = topk_ids.shape[1]
    device = hidden_states.device
    cfg = config or default_config(num_tokens, top_k, num_experts, hidden, inter)
    _check_config(cfg, hidden, inter)

    out = torch.empty(num_tokens, hidden, dtype=out_dtype, device=device)
    if num_tokens == 0:
        return out

    x = hidden_states
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32) or (act == "bf16" and x.dtype != torch.bfloat16):
        x = x.to(torch.bfloat16)  # W4A16 uses the hidden states as bf16 values, like moe_forward_torch
    if x.stride(-1) != 1:
        x = x.contiguous()
    weights = topk_weights.to(torch.float32).contiguous()
    w13 = w13_weight.contiguous().view(torch.uint8)
    s13 = w13_weight_scale.contiguous().view(torch.uint8)
    w2 = w2_weight.contiguous().view(torch.uint8)
    s2 = w2_weight_scale.contiguous().view(torch.uint8)
    g1a = g1_alphas.to(device=device, dtype=torch.float32).contiguous()
    g1c = g1_scale_c.to(device=device, dtype=torch.float32).contiguous()
    g2a = g2_alphas.to(device=device, dtype=torch.float32).contiguous()
    in_scale = _scalar_tensor(w13_input_scale_quant, device)
    has_inter_scale = act == "bf16" and w2_input_scale_quant is not None
    if not gated:  # relu2 divides its intermediate by a2 in the GEMM1 epilogue (nvfp4); bf16 keeps it undivided
        has_inter_scale = True
    inter_scale = _scalar_tensor(w2_input_scale_quant, device) if has_inter_scale else in_scale
    nvfp4 = act == "nvfp4"

    routing = moe_align(topk_ids, num_experts, cfg.block_m)
    tiles = routing.num_tile_slots
    num_slots = tiles * cfg.block_m

    if nvfp4:
        a = torch.empty(num_tokens, hidden, dtype=torch.float16, device=device)
        block_h = _largest_divisor(hidden, (1024, 512, 256, 128))  # H % 128 == 0 (checked above)
        _quant_act_kernel[(num_tokens, triton.cdiv(hidden, block_h))](
            x, in_scale, a, hidden, x.stride(0), BLOCK_H=block_h
        )
    else:
        a = x.contiguous()

    intermediate = torch.empty(num_slots, inter, dtype=torch.float16 if nvfp4 else torch.bfloat16, device=device)
    _gemm1_swiglu_kernel[(tiles, inter // cfg.block_i)](
        a, w13, s13, g1a, g1c, in_scale, inter_scale, intermediate,
        routing.slot_pair, routing.tile_expert, routing.expert_end,
        hidden, inter, top_k,
        ACT_NVFP4=nvfp4, HAS_INTER_SCALE=has_inter_scale, GATED=gated,
        BLOCK_M=cfg.block_m, BLOCK_I=cfg.block_i, BLOCK_K=cfg.block_k1,
        DOT_F32=_interpreting(), FP4_ASM=_use_fp4_asm(),
        num_warps=cfg.warps1, num_stages=cfg.stages1,
    )  # fmt: skip

    y = torch.empty(num_slots, hidden, dtype=torch.float32, device=device)
    _gemm2_kernel[(tiles, hidden // cfg.block_n)](
        intermediate, w2, s2, g2a, inter_scale, y,
        routing.tile_expert, routing.expert_end,
        hidden, inter,
        ACT_NVFP4=nvfp4, HAS_INTER_SCALE=has_inter_scale,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k2,
        DOT_F32=_interpreting(), FP4_ASM=_use_fp4_asm(),
        num_warps=cfg.warps2, num_stages=cfg.stages2,
    )  # fmt: skip

    block_h = min(1024, _next_pow2(hidden))
    _finalize_kernel[(num_tokens, triton.cdiv(hidden, block_h))](
        y, routing.pair_slot, weights, out, hidden, TOP_K=top_k, BLOCK_H=block_h, OUT_BF16=out_dtype == torch.bfloat16
    )
    return out


def _check_config(cfg: MoETritonConfig, hidden: int, inter: int) -> None:
    problems = []
    if cfg.block_m < 16 or cfg.block_m & (cfg.block_m - 1):
        problems.append("block_m must be a power of two >= 16")
    for name, val, dim in (
        ("block_i", cfg.block_i, inter),
        ("block_n", cfg.block_n, hidden),
        ("block_k1", cfg.block_k1, hidden),
        ("block_k2", cfg.block_k2, inter),
    ):
        if val < 16 or val & (val - 1) or dim % val:
            problems.append(f"{name}={val} must be a power of two >= 16 dividing {dim}")
    for name in ("block_k1", "block_k2"):
        if getattr(cfg, name) % 64:
            problems.append(f"{name} must be a multiple of 64")
    if problems:
        raise ValueError("bad MoETritonConfig: " + "; ".join(problems))


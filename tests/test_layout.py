"""The layout transform against FlashInfer's own helpers, compared as bytes."""

from __future__ import annotations

import pytest
import torch
from flashinfer import reorder_rows_for_gated_act_gemm, shuffle_matrix_a
from flashinfer.fused_moe.core import _maybe_get_cached_w3_w1_permute_indices, get_w2_permute_indices_with_cache

from nvfp4ckpt.layouts.trtllm_gen import transform as layout
from tests.conftest import reference_swizzle_128x4

# (E, H, I): tiny, Qwen3-30B-A3B at TP1/TP4, DeepSeek-V3-like rows with few columns.
SHAPES = [(2, 128, 64), (3, 256, 192), (2, 2048, 768), (1, 7168, 128), (2, 512, 2048)]


def _rand_u8(gen, *shape):
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)


@pytest.mark.parametrize("e,h,i", SHAPES)
def test_w13_matches_flashinfer(e, h, i):
    gen = torch.Generator().manual_seed(e * 1000 + i)
    gate, up = _rand_u8(gen, e, i, h // 2), _rand_u8(gen, e, i, h // 2)
    gate_s, up_s = _rand_u8(gen, e, i, h // 16), _rand_u8(gen, e, i, h // 16)
    weight, scale = layout.w13_to_kernel(gate, up, gate_s.view(torch.float8_e4m3fn), up_s.view(torch.float8_e4m3fn))
    assert weight.dtype == torch.uint8 and weight.shape == (e, 2 * i, h // 2)
    assert scale.dtype == torch.float8_e4m3fn and scale.shape == (e, 2 * i, h // 16)
    cache: dict = {}
    for x in range(e):
        w31 = torch.cat([up[x], gate[x]])
        s31 = torch.cat([up_s[x], gate_s[x]])
        perm = _maybe_get_cached_w3_w1_permute_indices(cache, w31, 128)
        assert torch.equal(weight[x], w31[perm])
        assert torch.equal(weight[x], shuffle_matrix_a(reorder_rows_for_gated_act_gemm(w31), 128))
        sperm = _maybe_get_cached_w3_w1_permute_indices(cache, s31, 128, num_elts_per_sf=16)
        assert torch.equal(scale[x].view(torch.uint8), reference_swizzle_128x4(s31[sperm]))


@pytest.mark.parametrize("e,h,i", SHAPES)
def test_w2_matches_flashinfer(e, h, i):
    gen = torch.Generator().manual_seed(7 + h)
    down, down_s = _rand_u8(gen, e, h, i // 2), _rand_u8(gen, e, h, i // 16)
    weight, scale = layout.w2_to_kernel(down, down_s)
    cache: dict = {}
    for x in range(e):
        perm = get_w2_permute_indices_with_cache(cache, down[x], 128)
        assert torch.equal(weight[x], down[x][perm])
        assert torch.equal(weight[x], shuffle_matrix_a(down[x], 128))
        sperm = get_w2_permute_indices_with_cache(cache, down_s[x], 128, num_elts_per_sf=16)
        assert torch.equal(scale[x].view(torch.uint8), reference_swizzle_128x4(down_s[x][sperm]))


@pytest.mark.parametrize("e,h,i", SHAPES)
def test_round_trip_is_exact(e, h, i):
    gen = torch.Generator().manual_seed(h + i)
    gate, up, down = _rand_u8(gen, e, i, h // 2), _rand_u8(gen, e, i, h // 2), _rand_u8(gen, e, h, i // 2)
    gs, us, ds = _rand_u8(gen, e, i, h // 16), _rand_u8(gen, e, i, h // 16), _rand_u8(gen, e, h, i // 16)
    # NaN and negative-zero e4m3 bytes must survive too: only bytes move.
    gs[..., 0, 0], us[..., 0, 0] = 0x7F, 0x80
    back = layout.w13_from_kernel(*layout.w13_to_kernel(gate, up, gs, us))
    for got, want in zip(back, (gate, up, gs, us)):
        assert torch.equal(got.view(torch.uint8), want)
    d, dsc = layout.w2_from_kernel(*layout.w2_to_kernel(down, ds))
    assert torch.equal(d, down) and torch.equal(dsc.view(torch.uint8), ds)


def test_closed_form_permutation_matches_documented_formula():
    rows = 2 * 384
    perm = layout.w13_row_permutation(rows)
    j = torch.arange(rows)
    half = (j >> 3) & 1
    s = (j // 32) * 16 + (j % 8) * 2 + ((j >> 4) & 1)
    assert torch.equal(perm, half * (rows // 2) + s)


@pytest.mark.parametrize("h,i,h_pad,i_pad", [(256, 96, 256, 128), (192, 128, 256, 128), (7168, 2048, 7168, 2048)])
def test_padded_sizes(h, i, h_pad, i_pad):
    dims = layout.MoEDims(1, h, i)
    assert (dims.hidden_padded, dims.intermediate_padded) == (h_pad, i_pad)
    assert dims.needs_padding == ((h, i) != (h_pad, i_pad))


@pytest.mark.gpu
@pytest.mark.parametrize("e,h,i", SHAPES)
def test_matches_flashinfer_gpu_scale_shuffle(e, h, i):
    from flashinfer import shuffle_matrix_sf_a

    gen = torch.Generator().manual_seed(11 * i + h)
    gate, up = _rand_u8(gen, e, i, h // 2), _rand_u8(gen, e, i, h // 2)
    gs, us = _rand_u8(gen, e, i, h // 16), _rand_u8(gen, e, i, h // 16)
    down, ds = _rand_u8(gen, e, h, i // 2), _rand_u8(gen, e, h, i // 16)
    w13, s13 = layout.w13_to_kernel(gate.cuda(), up.cuda(), gs.cuda(), us.cuda())
    w2, s2 = layout.w2_to_kernel(down.cuda(), ds.cuda())
    for x in range(e):
        w31 = torch.cat([up[x], gate[x]]).cuda()
        s31 = torch.cat([us[x], gs[x]]).cuda()
        fi_w = shuffle_matrix_a(reorder_rows_for_gated_act_gemm(w31), 128)
        fi_s = shuffle_matrix_sf_a(reorder_rows_for_gated_act_gemm(s31), 128)
        assert torch.equal(w13[x], fi_w)
        assert torch.equal(s13[x].view(torch.uint8).reshape(-1), fi_s.view(torch.uint8).reshape(-1))
        assert torch.equal(w2[x], shuffle_matrix_a(down[x].cuda(), 128))
        fi_s2 = shuffle_matrix_sf_a(ds[x].cuda(), 128)
        assert torch.equal(s2[x].view(torch.uint8).reshape(-1), fi_s2.view(torch.uint8).reshape(-1))


@pytest.mark.parametrize("rows", [64, 192, 1536, 4096])
@pytest.mark.parametrize("cols", [8, 12, 6, 1])
def test_strided_row_permutations_equal_index_gathers(rows, cols):
    x = torch.randint(0, 256, (2, rows, cols), dtype=torch.uint8, generator=torch.Generator().manual_seed(rows + cols))
    assert torch.equal(layout.w13_rows_to_kernel(x), x[:, layout.w13_row_permutation(rows)])
    assert torch.equal(layout.shuffle_rows(x), x[:, layout.shuffle_row_permutation(rows)])
    assert torch.equal(layout.w13_rows_from_kernel(layout.w13_rows_to_kernel(x)), x)
    assert torch.equal(layout.unshuffle_rows(layout.shuffle_rows(x)), x)


# Non-gated experts (relu2, Nemotron-H): w13 is up only, shuffled without the gated interleave.
NON_GATED_SHAPES = [(2, 128, 128), (3, 256, 256), (2, 2688, 1920)]  # 1920: Nemotron-3-Nano's 1856 padded to 128


@pytest.mark.parametrize("e,h,i", NON_GATED_SHAPES)
def test_non_gated_w13_matches_flashinfer(e, h, i):
    gen = torch.Generator().manual_seed(5 * i + h)
    up, up_s = _rand_u8(gen, e, i, h // 2), _rand_u8(gen, e, i, h // 16)
    weight, scale = layout.w31_to_kernel(up, up_s, gated=False)
    assert weight.shape == (e, i, h // 2) and scale.shape == (e, i, h // 16)
    cache: dict = {}
    for x in range(e):
        perm = _maybe_get_cached_w3_w1_permute_indices(cache, up[x], 128, is_gated_act_gemm=False)
        assert torch.equal(weight[x], up[x][perm])
        assert torch.equal(weight[x], shuffle_matrix_a(up[x], 128))
        sperm = _maybe_get_cached_w3_w1_permute_indices(cache, up_s[x], 128, num_elts_per_sf=16, is_gated_act_gemm=False)
        assert torch.equal(scale[x].view(torch.uint8), reference_swizzle_128x4(up_s[x][sperm]))
    w31, s31 = layout.w31_from_kernel(weight, scale, gated=False)
    assert torch.equal(w31, up) and torch.equal(s31, up_s)


def test_non_gated_pads_intermediate_to_128():
    assert layout.MoEDims(1, 2688, 1856, gated=False).intermediate_padded == 1920
    assert layout.MoEDims(1, 2688, 1856, gated=True).intermediate_padded == 1856
    up = torch.randint(0, 256, (2, 192, 64), dtype=torch.uint8)
    up_s = torch.randint(0, 256, (2, 192, 8), dtype=torch.uint8)
    w, s = layout.pad_w31(up, up_s, 128, 256, gated=False)
    assert w.shape == (2, 256, 64) and not w[:, 192:].any() and not s[:, 192:].any()
    back_w, back_s = layout.unpad_w31(w, s, 128, 192, gated=False)
    assert torch.equal(back_w, up) and torch.equal(back_s, up_s)


@pytest.mark.gpu
@pytest.mark.parametrize("e,h,i", NON_GATED_SHAPES)
def test_non_gated_matches_flashinfer_gpu_scale_shuffle(e, h, i):
    from flashinfer import shuffle_matrix_sf_a

    gen = torch.Generator().manual_seed(3 * i + h)
    up, up_s = _rand_u8(gen, e, i, h // 2), _rand_u8(gen, e, i, h // 16)
    weight, scale = layout.w31_to_kernel(up.cuda(), up_s.cuda(), gated=False)
    for x in range(e):
        assert torch.equal(weight[x], shuffle_matrix_a(up[x].cuda(), 128))
        fi_s = shuffle_matrix_sf_a(up_s[x].cuda(), 128)
        assert torch.equal(scale[x].view(torch.uint8).reshape(-1), fi_s.view(torch.uint8).reshape(-1))


@pytest.mark.parametrize("h,i", [(128, 64), (256, 192), (2048, 768)])
def test_per_expert_writers_match_flashinfer(h, i):
    """The numpy per-expert writers of the convert fast path, against FlashInfer's helpers directly."""
    gen = torch.Generator().manual_seed(h * 3 + i)
    gate, up, down = _rand_u8(gen, i, h // 2), _rand_u8(gen, i, h // 2), _rand_u8(gen, h, i // 2)
    gs, us, ds = _rand_u8(gen, i, h // 16), _rand_u8(gen, i, h // 16), _rand_u8(gen, h, i // 16)
    w13, s13 = torch.empty(2 * i, h // 2, dtype=torch.uint8), torch.empty(2 * i, h // 16, dtype=torch.uint8)
    w2, s2 = torch.empty(h, i // 2, dtype=torch.uint8), torch.empty(h, i // 16, dtype=torch.uint8)
    for half, (rows, scales) in enumerate(((up, us), (gate, gs))):
        layout.w13_rows_into(w13.numpy(), half, rows.numpy())
        layout.w13_scales_into(s13.numpy(), half, scales.numpy())
    layout.w2_rows_into(w2.numpy(), down.numpy())
    layout.w2_scales_into(s2.numpy(), ds.numpy())
    cache: dict = {}
    w31, s31 = torch.cat([up, gate]), torch.cat([us, gs])
    assert torch.equal(w13, w31[_maybe_get_cached_w3_w1_permute_indices(cache, w31, 128)])
    assert torch.equal(s13, reference_swizzle_128x4(s31[_maybe_get_cached_w3_w1_permute_indices(cache, s31, 128, num_elts_per_sf=16)]))
    assert torch.equal(w2, shuffle_matrix_a(down, 128))
    assert torch.equal(s2, reference_swizzle_128x4(ds[get_w2_permute_indices_with_cache(cache, ds, 128, num_elts_per_sf=16)]))

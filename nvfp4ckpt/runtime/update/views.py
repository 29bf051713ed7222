"""Where bytes go: the index maps of a shape (cached), one expert's source views, and the strided views that
match a source matrix element for element with its place in the live tensor (the kernel layout, docs/layout.md)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

from ..._lazy import torch
from ...layouts.trtllm_gen import transform as kernel_layout

if TYPE_CHECKING:
    from .plan import Plan

KERNEL_NAMES = ("w13_weight", "w13_weight_scale", "w2_weight", "w2_weight_scale")

@dataclass(frozen=True, eq=False)  # identity: cached per shape, hashed by id
class _Maps:
    w13_rows: tuple[torch.Tensor, ...]  # per w13 half (up, gate): kernel row of each source row
    w13_scale: tuple[torch.Tensor, ...]  # per half: flat destination of each source scale word (or byte)
    w13_words: bool
    w2_rows: torch.Tensor
    w2_scale: torch.Tensor
    w2_words: bool

    def to(self, device: torch.device) -> "_Maps":
        return _maps_on(self, str(device))

@lru_cache(maxsize=32)
def _maps(i_loc: int, i_pad: int, h: int, h_pad: int, gated: bool) -> _Maps:
    halves = kernel_layout.w13_halves(gated)
    perm13 = kernel_layout.w13_row_permutation(halves * i_pad) if gated else kernel_layout.shuffle_row_permutation(i_pad)
    inv13 = _inverse(perm13)
    w13_rows = tuple(inv13[k * i_pad : k * i_pad + i_loc].contiguous() for k in range(halves))
    k13, k13_pad = h // 16, h_pad // 16
    w13_words = k13 % 4 == 0
    w13_scale = tuple(_scale_index(rows, k13, k13_pad, w13_words) for rows in w13_rows)
    w2_rows = _inverse(kernel_layout.shuffle_row_permutation(h_pad))[:h].contiguous()
    k2, k2_pad = i_loc // 16, i_pad // 16
    w2_words = k2 % 4 == 0
    return _Maps(w13_rows, w13_scale, w13_words, w2_rows, _scale_index(w2_rows, k2, k2_pad, w2_words), w2_words)

@lru_cache(maxsize=32)
def _maps_on(maps: _Maps, device: str) -> _Maps:
    if device == "cpu":
        return maps
    dev = torch.device(device)
    return _Maps(
        tuple(t.to(dev) for t in maps.w13_rows), tuple(t.to(dev) for t in maps.w13_scale), maps.w13_words,
        maps.w2_rows.to(dev), maps.w2_scale.to(dev), maps.w2_words,
    )  # fmt: skip

def _inverse(perm: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), dtype=perm.dtype)
    return inv

def _scale_index(kernel_rows: torch.Tensor, k: int, k_pad: int, words: bool) -> torch.Tensor:
    """Flat offsets, in one expert's swizzled scale matrix ``[rows_pad, k_pad]``, of source scale row r's words (4 bytes
    that stay together) or bytes: the 128x4 interleave of layout.swizzle_scales_128x4, applied after the row order."""
    r = kernel_rows.reshape(-1, 1)
    tile = (r // 128) * (k_pad // 4)
    inner = (r % 32) * 4 + (r % 128) // 32  # word index inside a 512-byte tile
    if words:
        w = torch.arange(k // 4).reshape(1, -1)
        return ((tile + w) * 128 + inner).reshape(-1)
    c = torch.arange(k).reshape(1, -1)
    return ((tile + c // 4) * 512 + inner * 4 + c % 4).reshape(-1)

def _expert_views(plan: Plan, e: int) -> dict[str, torch.Tensor]:
    """``up``/``gate``/``down`` weights and ``*_s`` scales (uint8 views) of global expert ``e``, sliced to this rank."""
    t = plan.target
    i0, i1, i = t.i0, t.i1, t.info.intermediate_size
    out: dict[str, torch.Tensor] = {}
    if plan.fused is not None:
        gu, gus = plan.fused["gate_up"]["weight"][e], plan.fused["gate_up"]["weight_scale"][e].view(torch.uint8)
        d, ds = plan.fused["down"]["weight"][e], plan.fused["down"]["weight_scale"][e].view(torch.uint8)
        out["gate"], out["gate_s"] = gu[:, i0:i1].T, gus[:, i0:i1].T  # [gate | up] along the last dim
        out["up"], out["up_s"] = gu[:, i + i0 : i + i1].T, gus[:, i + i0 : i + i1].T
        out["down"], out["down_s"] = d[i0 // 2 : i1 // 2].T, ds[i0 // 16 : i1 // 16].T
        return out
    roles = plan.experts[e]
    for r in t.info.roles:
        w, s = roles[r]["weight"], roles[r]["weight_scale"].view(torch.uint8)
        if r == "down":
            out["down"], out["down_s"] = w[:, i0 // 2 : i1 // 2], s[:, i0 // 16 : i1 // 16]
        else:
            out[r], out[r + "_s"] = w[i0:i1], s[i0:i1]
    return out

def _local_experts(plan: Plan) -> list[int]:
    return list(range(plan.target.n_local)) if plan.fused is not None else plan.updated_rows

def _w13_halves(plan: Plan) -> tuple[str, ...]:
    return ("up", "gate") if plan.target.info.gated else ("up",)

def _views_of(plan: Plan, x: int) -> dict[str, torch.Tensor]:
    """``_expert_views`` of local row ``x``, computed once per plan."""
    cache = plan.cache.setdefault("views", {})
    if x not in cache:
        cache[x] = _expert_views(plan, x + plan.target.e0)
    return cache[x]

def _sources_of(plan: Plan, name: str) -> list[tuple[int, str]]:
    """(w13 half, key of _expert_views) of the source matrices that make up one expert of a kernel tensor."""
    sfx = "_s" if name.endswith("scale") else ""
    if name.startswith("w13"):
        return [(k, half + sfx) for k, half in enumerate(_w13_halves(plan))]
    return [(0, "down" + sfx)]

def _src_words(src: torch.Tensor, device: torch.device, words: bool) -> torch.Tensor:
    """A source scale matrix's bytes as a flat tensor on ``device``: int32 words when rows are whole words."""
    s = src.to(device)
    if not s.is_contiguous():
        s = s.contiguous()
    flat = s.reshape(-1)
    if words:
        try:
            return flat.view(torch.int32)
        except RuntimeError:  # misaligned storage offset
            return flat.clone().view(torch.int32)
    return flat

def _dst_flat(live_expert: torch.Tensor, words: bool) -> torch.Tensor:
    flat = live_expert.view(torch.uint8).reshape(-1)
    return flat.view(torch.int32) if words else flat

def _views(name: str, out: torch.Tensor, half: int, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(view of the live slice ``out``, view of source ``rows``) of the same shape, element for element the kernel
    layout (unpadded, gated): the views of layout.w13_rows_into / w13_scales_into / w2_rows_into / w2_scales_into, in
    torch, with any leading (expert) dims. Scales move as int32 words (the 4 bytes of a column group stay together)."""
    *lead, n, c = rows.shape
    return _dst_view(name, out, half, n, c), _src_view(name, rows)

def _dst_view(name: str, out: torch.Tensor, half: int, n: int, c: int) -> torch.Tensor:
    """:func:`_views`' destination: ``out`` ``[..., rows, cols]`` (uint8) for source matrices of ``n`` x ``c``."""
    lead = out.shape[:-2]
    m = len(lead)
    if name == "w13_weight":  # kernel row 32b + 16a + 8h + r holds half h's row 16b + 2r + a: (b, a, h, r, c)
        return out.view(*lead, n // 16, 2, 2, 8, c).select(m + 2, half)
    if name == "w13_weight_scale":  # words (B1, w, a, h, r, B0), b = 4*B1 + B0
        return out.view(torch.int32).view(*lead, n // 64, c // 4, 2, 2, 8, 4).select(m + 3, half)
    if name == "w2_weight":  # row 32b + 8p + q holds row 32b + 4q + p: (b, p, q, c)
        return out.view(*lead, n // 32, 4, 8, c)
    return out.view(torch.int32).view(*lead, n // 128, c // 4, 4, 8, 4)  # words (B1, w, p, q, B0)

def _src_view(name: str, rows: torch.Tensor, copy: bool = True) -> torch.Tensor:
    """Source rows ``[..., n, c]`` arranged as :func:`_views`' destination; ``copy=False`` raises rather than copy."""
    *lead, n, c = rows.shape
    m = len(lead)
    keep = tuple(range(m))
    shape = (lambda t, *s: t.reshape(*s)) if copy else (lambda t, *s: t.view(*s))
    if name == "w13_weight":  # (b, r, a, c) -> (b, a, r, c)
        return shape(rows, *lead, n // 16, 8, 2, c).permute(*keep, m, m + 2, m + 1, m + 3)
    if name == "w2_weight":  # (b, q, p, c) -> (b, p, q, c)
        return shape(rows, *lead, n // 32, 8, 4, c).permute(*keep, m, m + 2, m + 1, m + 3)
    words = _int32_rows(rows) if copy else rows.view(torch.int32)
    if name == "w13_weight_scale":  # (B1, B0, r, a, w) -> (B1, w, a, r, B0)
        return shape(words, *lead, n // 64, 4, 8, 2, c // 4).permute(*keep, m, m + 4, m + 3, m + 2, m + 1)
    return shape(words, *lead, n // 128, 4, 8, 4, c // 4).permute(*keep, m, m + 4, m + 3, m + 2, m + 1)  # (B1, B0, q, p, w)

def _int32_rows(rows: torch.Tensor) -> torch.Tensor:
    """``[..., n, c]`` bytes as ``[..., n, c/4]`` int32 words (a copy only when the bytes cannot be reinterpreted)."""
    try:
        return rows.view(torch.int32)
    except RuntimeError:  # not contiguous along c, or a misaligned offset
        pass
    dense = rows.contiguous()
    try:
        return dense.view(torch.int32)
    except RuntimeError:
        return dense.clone().view(torch.int32)  # fresh storage is aligned

"""Rank-sharded output (``convert --tp T --ep P``): what each MoE rank of an engine holds.

An engine with expert parallelism P and MoE tensor parallelism T has T*P ranks; rank
``r = ep_rank * T + tp_rank`` (SGLang's numbering: ``moe_ep_rank = rank // T``, ``moe_tp_rank = rank % T``)
holds experts ``[ep_rank*E/P, (ep_rank+1)*E/P)`` and, of each, the intermediate slice
``[tp_rank*I/T, (tp_rank+1)*I/T)``: those rows of gate and up, those input columns of down. The kernel
layout is a function of the shard's shape (the row shuffle and the gated interleave depend on I), so a
shuffled tensor cannot be re-sliced for another TP degree: each rank gets its own kernel-layout tensors,
built from its slice and zero-padded per gate/up half to a multiple of 64 where needed. The scalars keep
the global maxima a1/a2 (the kernel quantizes hidden states once, before routing, for all experts).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..._lazy import torch

from . import transform as layout
from ...errors import InputError


@dataclass(frozen=True)
class RankSpec:
    rank: int
    tp_rank: int
    ep_rank: int
    expert_start: int
    expert_end: int
    inter_start: int  # slice of the unpadded intermediate dimension
    inter_end: int
    gated: bool = True  # non-gated (relu2) shards pad I to 128, not 64

    @property
    def part(self) -> str:
        """Sub-folder holding this rank's MoE tensors."""
        return f"ranks/rank-{self.rank:03d}"

    @property
    def num_experts(self) -> int:
        return self.expert_end - self.expert_start

    @property
    def intermediate_size(self) -> int:
        return self.inter_end - self.inter_start

    @property
    def intermediate_padded(self) -> int:
        return layout.pad_intermediate(self.intermediate_size, self.gated)

    def to_dict(self) -> dict:
        d = {**asdict(self), "part": self.part}
        if self.gated:
            del d["gated"]  # gated is the default; keeps gated outputs' bytes as before
        return d


def rank_specs(
    tp: int, ep: int, num_experts: int, intermediate: int, where: str = "", gated: bool = True
) -> list[RankSpec]:
    """The T*P ranks of a layer, or a clear error when the sizes do not split."""
    if tp < 1 or ep < 1:
        raise InputError("--tp and --ep must be at least 1")
    if num_experts % ep:
        raise InputError(f"{where}: {num_experts} experts do not split evenly over --ep {ep}")
    if intermediate % tp or (intermediate // tp) % 16:
        raise InputError(
            f"{where}: intermediate size {intermediate} does not split over --tp {tp} into multiples of 16 "
            "(NVFP4 block scales cover 16 inputs of down_proj)"
        )
    e_loc, i_loc = num_experts // ep, intermediate // tp
    return [
        RankSpec(
            ep_rank * tp + tp_rank, tp_rank, ep_rank, ep_rank * e_loc, (ep_rank + 1) * e_loc,
            tp_rank * i_loc, (tp_rank + 1) * i_loc, gated,
        )  # fmt: skip
        for ep_rank in range(ep)
        for tp_rank in range(tp)
    ]


def slice_source(src: dict[str, torch.Tensor], r: RankSpec, intermediate: int) -> tuple[torch.Tensor, ...]:
    """(w31, s31, down, down_scale) of one rank from a layer read by ``convert.read_layer_source``."""
    e0, e1, i0, i1, i = r.expert_start, r.expert_end, r.inter_start, r.inter_end, intermediate
    w31 = src["w31"][e0:e1]
    s31 = src["s31"][e0:e1]
    halves = layout.w13_halves(r.gated)
    w31_loc = torch.cat([w31[:, h * i + i0 : h * i + i1] for h in range(halves)], dim=1)
    s31_loc = torch.cat([s31[:, h * i + i0 : h * i + i1] for h in range(halves)], dim=1)
    down = src["down"][e0:e1, :, i0 // 2 : i1 // 2].contiguous()
    down_s = src["down_scale"][e0:e1, :, i0 // 16 : i1 // 16].contiguous()
    return w31_loc, s31_loc, down, down_s


def to_kernel(
    w31: torch.Tensor, s31: torch.Tensor, down: torch.Tensor, down_s: torch.Tensor, h_pad: int, i_pad: int,
    gated: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad (when needed) and lay out one (rank's) set of expert tensors."""
    h, i = down.shape[-2], w31.shape[-2] // layout.w13_halves(gated)
    if (h_pad, i_pad) != (h, i):
        w31, s31 = layout.pad_w31(w31, s31, h_pad, i_pad, gated)
        down, down_s = layout.pad_down(down, down_s, h_pad, i_pad)
    w13, s13 = layout.w31_to_kernel(w31, s31, gated)
    w2, s2 = layout.w2_to_kernel(down, down_s)
    return w13, s13, w2, s2


def from_kernel(
    t: dict[str, torch.Tensor], hidden: int, inter: int, gated: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """Inverse of :func:`to_kernel`: (w31 ``[up; gate]`` or ``[up]``, s31, down, down_scale) as uint8,
    padding dropped. Also returns whether the padding was all zero, as a fifth element."""
    w31p, s31p = layout.w31_from_kernel(t["w13_weight"], t["w13_weight_scale"], gated)
    down, ds = layout.w2_from_kernel(t["w2_weight"], t["w2_weight_scale"])
    ds = ds.view(torch.uint8)
    h_pad, i_pad = down.shape[-2], w31p.shape[-2] // layout.w13_halves(gated)
    if (h_pad, i_pad) == (hidden, inter):
        return w31p, s31p, down, ds, True
    w31, s31 = layout.unpad_w31(w31p, s31p, hidden, inter, gated)
    d, dsc = layout.unpad_down(down, ds, hidden, inter)
    repadded = layout.pad_w31(w31, s31, h_pad, i_pad, gated) + layout.pad_down(d, dsc, h_pad, i_pad)
    zero = all(torch.equal(a, b) for a, b in zip(repadded, (w31p, s31p, down, ds)))
    return w31, s31, d, dsc, zero

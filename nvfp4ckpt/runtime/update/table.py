"""The host side of the GPU path: the address table of every source matrix of an update and its live slice.

``runtime.kernels.layout_write`` moves (or compares) all the matrices of one kind (w13 weights, w13 scales, w2
weights, w2 scales) in one launch from such a table. Building it touches each source tensor once (address and
row stride, no view is made), so the host work per update is one pass over the tensors, not a copy or a launch per
expert. Sources on another device (a trainer's host tensors) go through a bounded staging buffer on the live
device (``StagingBudget``), copied one tensor at a time, then scattered like the others.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

from ..._lazy import torch
from .plan import Plan
from .views import KERNEL_NAMES, _local_experts, _maps, _sources_of

STAGING_FRACTION = 0.01  # host sources: at most this share of the layer as extra device memory (or one source tensor)


@dataclass
class Matrix:
    """One source matrix (a w13 half, or down) of one expert, and where it goes."""

    tensor: torch.Tensor  # the source tensor as given (rows sliced by ``row0`` / columns by ``col0``)
    row0: int
    col0: int  # in bytes
    rows: int
    cols: int  # bytes per row
    dst: int  # address of the expert's live slice
    map_offset: int
    expert: int  # local row of the live tensor
    key: str  # views key (``gate``, ``up_s``, ...)
    half: int


@dataclass
class Group:
    """Matrices of one kind and shape on one device: one launch."""

    name: str  # kernel tensor name
    device: torch.device
    row_map: torch.Tensor  # int32 on ``device``
    kpw: int  # scales: padded scale columns / 4 ; weights: live row bytes
    matrices: list[Matrix] = field(default_factory=list)

    @property
    def scales(self) -> bool:
        return self.name.endswith("scale")


def supported(plan: Plan) -> bool:
    """Whether the table path takes this plan: per-expert sources (fused Llama-4 tensors are transposed views, which the
    stacked strided copies handle), every source row-contiguous and dense."""
    if plan.fused is not None:
        return False
    for e, roles in plan.experts.items():
        if e in plan.dense:  # quantized into contiguous chunks when written
            continue
        for kinds in roles.values():
            for kind in ("weight", "weight_scale"):
                t = kinds[kind]
                if t.dim() != 2 or (t.stride(1) != 1 and t.shape[1] > 1):
                    return False
    return True


def matrices(plan: Plan, name: str, device: torch.device) -> tuple[torch.Tensor, int, list[Matrix]]:
    """(row map on ``device``, kpw or live row bytes, the matrices of kernel tensor ``name``) of one plan."""
    t, info = plan.target, plan.target.info
    live = plan.live[name]
    i_loc = t.i1 - t.i0
    row_map, w2_offset = _row_map(i_loc, t.i_pad, info.hidden_size, info.hidden_padded, info.gated, str(device))
    expert_bytes = live.stride(0) * live.element_size()
    base = live.data_ptr()
    scales = name.endswith("scale")
    row_bytes = live.shape[-1] * live.element_size()  # live row length in bytes (padded)
    kpw = row_bytes // 4 if scales else row_bytes
    kind = "weight_scale" if scales else "weight"
    per_byte = 16 if scales else 2  # input channels per stored byte
    out: list[Matrix] = []
    e0, i0, h = t.e0, t.i0, info.hidden_size
    parts = [(half, key, key.removesuffix("_s")) for half, key in _sources_of(plan, name)]  # the same for every expert
    experts = plan.experts
    for x in _local_experts(plan):
        roles = experts[x + e0]
        dst = base + x * expert_bytes
        for half, key, role in parts:
            src = roles[role][kind]
            if role == "down":
                out.append(Matrix(src, 0, i0 // per_byte, h, i_loc // per_byte, dst, w2_offset, x, key, half))
            else:
                out.append(Matrix(src, i0, 0, i_loc, src.shape[1], dst, half * i_loc, x, key, half))
    return row_map, kpw, out


@lru_cache(maxsize=64)
def _row_map(i_loc: int, i_pad: int, h: int, h_pad: int, gated: bool, device: str) -> tuple[torch.Tensor, int]:
    """Kernel row of every source row: the w13 halves (``i_loc`` each), then w2 (``h``), int32 on ``device``."""
    maps = _maps(i_loc, i_pad, h, h_pad, gated)
    flat = torch.cat([*maps.w13_rows, maps.w2_rows]).to(torch.int32)
    return flat.to(device), len(maps.w13_rows) * i_loc


def groups(plans: list[Plan]) -> list[Group]:
    """Every matrix of the plans the table path takes, grouped into launches (kind, device, shape)."""
    out: dict[tuple, Group] = {}
    for plan in plans:
        for name in (n for n in KERNEL_NAMES if n in plan.live):
            device = plan.live[name].device
            row_map, kpw, ms = matrices(plan, name, device)
            key = (name, device, row_map.data_ptr(), kpw)
            g = out.setdefault(key, Group(name, device, row_map, kpw))
            g.matrices += ms
    return list(out.values())


def rows(g: Group, ms: list[Matrix], addresses: list[int]) -> tuple[list[list[int]], int]:
    """Table rows (and their common unit) for matrices ``ms`` whose source addresses are ``addresses``."""
    raw = []
    acc = 0
    for m, addr in zip(ms, addresses):
        stride = m.tensor.stride(0) * m.tensor.element_size()
        start = addr + m.row0 * stride + m.col0
        raw.append((start, stride, m))
        acc |= start | stride | m.cols | m.dst
    if g.scales:
        unit = 4 if acc % 4 == 0 else 1
        acc_dst = 0
    else:
        acc_dst = g.kpw
        unit = 8
        while unit > 1 and (acc | acc_dst) % unit:
            unit //= 2
    dst_stride = g.kpw if g.scales else g.kpw // unit
    table = [[start, stride // unit, m.dst, m.map_offset, m.rows, m.cols // unit, dst_stride, 0] for start, stride, m in raw]
    return table, unit


def launch(g: Group, check: bool, stage_all: bool = False):
    """Write (or compare) every matrix of the group. Returns the per-matrix difference counts (int32 on the device)
    when checking, else None. Sources on the live device are read in place; others are staged (bounded)."""
    from ..kernels import layout_write  # noqa: PLC0415  (Triton only on this path)

    flags = torch.zeros(len(g.matrices), dtype=torch.int32, device=g.device) if check else None

    def run(items: list[tuple[int, Matrix, int]]) -> None:
        """items: (index in the group, matrix, source address)."""
        if not items:
            return
        table, unit = rows(g, [m for _, m, _ in items], [a for _, _, a in items])
        t = torch.tensor(table, dtype=torch.int64).to(g.device, non_blocking=True)
        sub = torch.zeros(len(items), dtype=torch.int32, device=g.device) if check else None
        layout_write.launch(t, g.row_map, max(m.rows for _, m, _ in items), unit, g.scales, sub)
        if check:
            flags.index_copy_(0, torch.tensor([k for k, _, _ in items], device=g.device), sub)

    device = g.device
    local, foreign = [], []
    for k, m in enumerate(g.matrices):
        if m.tensor.device == device and not stage_all:
            local.append((k, m, m.tensor.data_ptr()))
        else:
            foreign.append((k, m))
    run(local)
    if foreign:
        _staged(g, foreign, run)
    return flags


def _staged(g: Group, items: list[tuple[int, Matrix]], run) -> None:
    """Copy foreign sources into a staging buffer on the live device a chunk at a time, then scatter each chunk."""
    sizes = [_aligned(m.tensor.numel() * m.tensor.element_size()) for _, m in items]
    total = sum(sizes)
    budget = max(int(total * STAGING_FRACTION), max(sizes))
    staging = torch.empty(min(budget, total), dtype=torch.uint8, device=g.device)
    chunk: list[tuple[int, Matrix, int]] = []
    used = 0
    for (k, m), size in zip(items, sizes):
        if used + size > staging.numel():
            run(chunk)  # stream order: the next copies into staging wait for this launch
            chunk, used = [], 0
        src = m.tensor if m.tensor.is_contiguous() else m.tensor.contiguous()
        slot = staging[used : used + src.numel() * src.element_size()]
        pinned = src.device.type == "cpu" and src.is_pinned()
        slot.copy_(src.reshape(-1).view(torch.uint8), non_blocking=pinned)
        staged = Matrix(_Staged(slot, tuple(src.shape)), m.row0, m.col0, m.rows, m.cols, m.dst, m.map_offset, m.expert, m.key, m.half)
        chunk.append((k, staged, slot.data_ptr()))
        used += size
    run(chunk)


def _aligned(n: int) -> int:
    return (n + 15) // 16 * 16


class _Staged:
    """What ``rows`` reads of a source tensor, for its contiguous staged copy (bytes)."""

    def __init__(self, slot: torch.Tensor, shape: tuple[int, ...]) -> None:
        self.slot, self.shape = slot, shape

    def stride(self, dim: int) -> int:
        return self.shape[1] if dim == 0 else 1

    def element_size(self) -> int:
        return 1


# ----------------------------------------------------------------------------------------------
# Unquantized experts: quantized and written in one pass (runtime/kernels/quantize_write.py)


def dense_supported(plan: Plan) -> bool:
    """The one-pass kernel writes weights and scales together: it needs all four kernel tensors live."""
    return bool(plan.dense) and all(n in plan.live for n in KERNEL_NAMES)


def launch_dense(plan: Plan, stage_all: bool = False) -> int:
    """Quantize every local unquantized expert of ``plan`` straight into the live tensors; returns bytes read.
    Sources on another device are staged (at most ``STAGING_FRACTION`` of their bytes, or one tensor, at a time)."""
    from ..kernels import quantize_write  # noqa: PLC0415  (Triton only on this path)

    t, info = plan.target, plan.target.info
    live = plan.live
    device = live["w13_weight"].device
    i_loc = t.i1 - t.i0
    row_map, w2_offset = _row_map(i_loc, t.i_pad, info.hidden_size, info.hidden_padded, info.gated, str(device))
    halves = {"up": 0, "gate": 1} if info.gated else {"up": 0}
    sup = {e: u for u, e in enumerate(plan.supplied)}
    raw = plan.raw[..., 0].float()
    ct = plan.fmt.global_scales_reciprocal
    items = []  # (tensor, row0, col0, rows, k, dst_w, dst_s, map_offset, row_bytes, kpw, global bits)
    for e in sorted(plan.dense):
        x = e - t.e0
        for ri, r in enumerate(info.roles):
            w = plan.dense[e][r]
            g = int(raw[sup[e], ri].view(torch.int32))
            if r == "down":
                wl, sl = live["w2_weight"], live["w2_weight_scale"]
                geo = (0, t.i0, info.hidden_size, i_loc, w2_offset)
            else:
                wl, sl = live["w13_weight"], live["w13_weight_scale"]
                geo = (t.i0, 0, i_loc, info.hidden_size, halves[r] * i_loc)
            dst_w = wl.data_ptr() + x * wl.stride(0) * wl.element_size()
            dst_s = sl.data_ptr() + x * sl.stride(0) * sl.element_size()
            items.append((w, *geo[:4], dst_w, dst_s, geo[4], wl.shape[-1] * wl.element_size(), sl.shape[-1] * sl.element_size() // 4, g))

    def run(chunk: list[tuple]) -> None:
        by_dtype: dict = {}
        for src, addr, stride, it in chunk:
            _, row0, col0, rows, k, dst_w, dst_s, mo, rb, kpw, g = it
            cstride = src.stride(1)  # 1, or a fused Llama-4 tensor's transposed view (its outputs contiguous)
            start = addr + (row0 * stride + col0 * cstride) * src.element_size()
            by_dtype.setdefault(src.dtype, []).append([start, stride, dst_w, dst_s, mo, rows, k, rb, kpw, g, cstride, 0])
        for dtype, rows_ in by_dtype.items():
            table = torch.tensor(rows_, dtype=torch.int64).to(device, non_blocking=True)
            quantize_write.launch(table, row_map, max(r[5] for r in rows_), dtype, ct)

    # read in place: any strides on the live device (fused Llama-4 views are [N, K] with stride (1, N))
    local = [(it[0], it[0].data_ptr(), it[0].stride(0), it) for it in items if it[0].device == device and not stage_all]
    run(local)
    foreign = [it for it in items if not (it[0].device == device and not stage_all)]
    if foreign:
        sizes = [_aligned(it[0].numel() * it[0].element_size()) for it in foreign]
        budget = max(int(sum(sizes) * STAGING_FRACTION), max(sizes))
        staging = torch.empty(min(budget, sum(sizes)), dtype=torch.uint8, device=device)
        chunk, used = [], 0
        for it, size in zip(foreign, sizes):
            if used + size > staging.numel():
                run(chunk)  # stream order: later copies into staging wait for this launch
                chunk, used = [], 0
            src = it[0] if it[0].is_contiguous() else it[0].contiguous()
            nbytes = src.numel() * src.element_size()
            slot = staging[used : used + nbytes]
            slot.copy_(src.reshape(-1).view(torch.uint8), non_blocking=src.device.type == "cpu" and src.is_pinned())
            staged = slot.view(src.dtype).view(src.shape)
            chunk.append((staged, staged.data_ptr(), staged.stride(0), it))
            used += size
        run(chunk)
    return sum(it[0].numel() * it[0].element_size() for it in items)

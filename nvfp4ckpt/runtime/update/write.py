"""Writing a validated plan into the live tensors: the weights and block scales (per device: numpy on the CPU,
strided torch copies, index maps for padded layers, Triton on CUDA) and the stored and dependent scalars."""

from __future__ import annotations

import dataclasses
import importlib.util
from functools import lru_cache

from ..._lazy import torch
from . import dense, table
from ...layouts.trtllm_gen import transform as kernel_layout
from .plan import Plan, _stored_rows, _stored_targets
from .views import KERNEL_NAMES, _Maps, _dst_flat, _dst_view, _local_experts, _sources_of, _src_view, _src_words, _views, _views_of

# Four ways to move the bytes, the same bytes each way (tests/test_live_update*.py check all four):
# - "table": CUDA (or the CPU under TRITON_INTERPRET=1 in tests), per-expert sources: one Triton launch per kernel
#   tensor for every expert of every layer in the update, from a device table of source addresses (update/table.py).
# - "numpy": CPU, no padding: the converter's per-expert numpy copies (layout.w13_rows_into, ...), strided views on
#   both sides; single-threaded and without the GIL (torch's OpenMP split of copies this small stalls on busy cores).
# - "strided": other devices, no padding: the same views in torch, one copy kernel per source tensor (a run of
#   experts at once for views of one stacked buffer: fused Llama-4 tensors).
# - "index": padded layers or sizes the views do not tile: the cached index maps, with index_copy_.
CPU_NUMPY = True  # tests switch it off to run the "strided" path on the CPU
CPU_TABLE = False  # tests switch it on to run the "table" path on the CPU (under TRITON_INTERPRET=1)
STAGE_ALL = False  # tests switch it on to stage every source as if it were on another device


@lru_cache(maxsize=1)
def _have_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def uses_table(plan: Plan) -> bool:
    """Whether the plan's weights and block scales go through the Triton table path."""
    devices = {plan.live[n].device.type for n in KERNEL_NAMES if n in plan.live}
    if not devices or not table.supported(plan):
        return False
    if devices == {"cuda"}:
        return _have_triton()
    return devices == {"cpu"} and CPU_TABLE


def write_plans(plans: list[Plan]) -> int:
    """Write every validated plan; returns the source bytes written. Table-path plans share one launch per kernel
    tensor; unquantized experts go through ``_write_dense``."""
    tabled = {id(p) for p in plans if uses_table(p)}
    base = {id(p): _without_dense(p) for p in plans}
    copied = 0
    for g in table.groups([base[id(p)] for p in plans if id(p) in tabled]):
        table.launch(g, check=False, stage_all=STAGE_ALL)
        copied += sum(m.rows * m.cols for m in g.matrices)
    for plan in plans:
        if plan.dense:
            copied += _write_dense(plan, id(plan) in tabled)
        if id(plan) not in tabled:
            copied += _write(base[id(plan)], scalars=False)
        _write(plan, kernel_tensors=False)  # scalars, and the report's list of written tensors
    return copied


def _write_dense(plan: Plan, tabled: bool) -> int:
    """The plan's unquantized experts: in one pass on the table path (quantize_write kernel), else quantized with
    torch a chunk of experts at a time, each chunk written like NVFP4 sources. Returns the bytes read."""
    if tabled and table.dense_supported(plan):
        return table.launch_dense(plan, stage_all=STAGE_ALL)
    device = next((plan.live[n].device for n in KERNEL_NAMES if n in plan.live), None)
    for sub in dense.quantized_chunks(plan, sorted(plan.dense), device) if device is not None else ():
        if tabled:
            for g in table.groups([sub]):
                table.launch(g, check=False, stage_all=STAGE_ALL)
        else:
            _write(sub, scalars=False)
    return sum(t.numel() * t.element_size() for roles in plan.dense.values() for t in roles.values())


def _without_dense(plan: Plan) -> Plan:
    """The plan's NVFP4 experts only (its dense experts are written from quantized chunks)."""
    if not plan.dense:
        return plan
    keep = [x for x in plan.updated_rows if x + plan.target.e0 not in plan.dense]
    experts = {e: roles for e, roles in plan.experts.items() if e not in plan.dense}
    return dataclasses.replace(plan, experts=experts, updated_rows=keep, cache={}, dense={})


def _path(plan: Plan, device: torch.device) -> str:
    t, info = plan.target, plan.target.info
    if uses_table(plan):
        return "table"
    if not info.gated or (info.hidden_padded, t.i_pad) != (info.hidden_size, t.i1 - t.i0):
        return "index"
    return "numpy" if device.type == "cpu" and CPU_NUMPY else "strided"

def _write(plan: Plan, kernel_tensors: bool = True, scalars: bool = True) -> int:
    """Write one plan: its weights and block scales (unless the table path did) and its scalars."""
    live, info = plan.live, plan.target.info
    copied = 0
    for name in (n for n in KERNEL_NAMES if n in live and kernel_tensors):
        tensor = live[name]
        path = _path(plan, tensor.device)
        maps = plan.maps.to(tensor.device) if path == "index" else None
        live_np = tensor.view(torch.uint8).numpy() if path == "numpy" else None
        dst_all: dict[int, torch.Tensor] = {}  # "strided": per w13 half, the destination view over every local expert
        for rows, src in _chunks(plan, name, path, tensor.device):
            if live_np is not None and isinstance(rows, int):  # one expert on the CPU: the converter's numpy copies
                for half, key in _sources_of(plan, name):
                    copied += _put_numpy(name, live_np[rows], half, src[key])
                continue
            if path == "strided" and isinstance(rows, int):  # one expert: index the prebuilt view (fewer host ops)
                for half, key in _sources_of(plan, name):
                    if half not in dst_all:
                        dst_all[half] = _dst_view(name, tensor.view(torch.uint8), half, *src[key].shape)
                    dst_all[half][rows].copy_(_src_view(name, src[key].to(tensor.device)))
                    copied += src[key].numel()
                continue
            dst = tensor[rows].view(torch.uint8)
            for half, key in _sources_of(plan, name):
                copied += _put(path, maps, name, dst, half, src[key])
    if scalars:
        written = _write_scalars(plan) | ({n for n in KERNEL_NAMES if n in live} if _local_experts(plan) else set())
        plan.report.written = sorted(f"{info.prefix}.{n}" for n in written)
    return copied

def _chunks(plan: Plan, name: str, path: str, device: torch.device):
    """(live rows, source views) to write for one kernel tensor: a run of consecutive experts at once (a slice, views
    ``[n, rows, cols]``) when every source of the run is an equally strided view of one buffer on the live device
    (a trainer's stacked experts, fused Llama-4 tensors) and the kernel views need no copy; else one expert at a
    time (an int, views ``[rows, cols]``)."""
    for run in _runs(_local_experts(plan)):
        stacked = _stacked_views(plan, name, run, device) if path != "index" and len(run) > 1 else None
        if stacked is not None:
            yield slice(run[0], run[-1] + 1), stacked
            continue
        for x in run:
            yield x, _views_of(plan, x)

def _runs(xs: list[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    for x in xs:
        if runs and runs[-1][-1] + 1 == x:
            runs[-1].append(x)
        else:
            runs.append([x])
    return runs

def _stacked_views(plan: Plan, name: str, run: list[int], device: torch.device) -> dict[str, torch.Tensor] | None:
    out: dict[str, torch.Tensor] = {}
    for _, key in _sources_of(plan, name):
        first, second = _views_of(plan, run[0])[key], _views_of(plan, run[1])[key]
        if first.untyped_storage().data_ptr() != second.untyped_storage().data_ptr():
            return None  # separate tensors (the common per-expert case): no need to look further
        ts = [_views_of(plan, x)[key] for x in run]
        same = all(
            t.device == device and t.dtype == first.dtype and t.shape == first.shape and t.stride() == first.stride()
            and t.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
            for t in ts
        )  # fmt: skip
        step = second.data_ptr() - first.data_ptr()
        if not same or step % first.element_size() or any(t.data_ptr() - first.data_ptr() != k * step for k, t in enumerate(ts)):
            return None
        view = first.as_strided((len(ts), *first.shape), (step // first.element_size(), *first.stride()), first.storage_offset())
        try:
            _src_view(name, view, copy=False)
        except RuntimeError:  # the kernel view of these strides would need a copy of the run: go expert by expert
            return None
        out[key] = view
    return out

def _put_numpy(name: str, out, half: int, src: torch.Tensor) -> int:
    """One source matrix of one expert into its live slice ``out`` (a numpy view of a CPU tensor), with the per-expert
    copies of ``convert``'s CPU fast path (layout.w13_rows_into, ...): the same views as :func:`_views`."""
    rows = src.cpu().numpy()
    if name == "w13_weight":
        kernel_layout.w13_rows_into(out, half, rows)
    elif name == "w13_weight_scale":
        kernel_layout.w13_scales_into(out, half, rows)
    elif name == "w2_weight":
        kernel_layout.w2_rows_into(out, rows)
    else:
        kernel_layout.w2_scales_into(out, rows)
    return rows.size

def _put(path: str, maps: "_Maps | None", name: str, dst: torch.Tensor, half: int, src: torch.Tensor) -> int:
    """Write one source matrix (a w13 half, or down) of one expert into its live slice ``dst`` (uint8)."""
    if path == "numpy":
        d, s = _views(name, dst, half, src.cpu())
        d.numpy()[...] = s.numpy()
    elif path == "strided":
        d, s = _views(name, dst, half, src.to(dst.device))
        d.copy_(s)
    elif name.endswith("scale"):
        words = maps.w13_words if name.startswith("w13") else maps.w2_words
        index = maps.w13_scale[half] if name.startswith("w13") else maps.w2_scale
        _dst_flat(dst, words).index_copy_(0, index, _src_words(src, dst.device, words))
    else:
        rows = maps.w13_rows[half] if name.startswith("w13") else maps.w2_rows
        cols = src.shape[1]
        (dst if cols == dst.shape[1] else dst[:, :cols]).index_copy_(0, rows, src.to(dst.device))
    return src.numel()

def _write_scalars(plan: Plan) -> set[str]:
    """Write the stored and dependent scalars; returns the names written."""
    live = plan.live
    written: set[str] = set()
    for name, values in _stored_rows(plan).items():
        if name in live:
            t = live[name]
            rows, picked, _ = _stored_targets(plan, name, t)
            if rows:
                src = values[picked].to(t.dtype).reshape(-1, *t.shape[1:]).to(t.device)
                t.index_copy_(0, torch.tensor(rows, dtype=torch.int64, device=t.device), src)
                written.add(name)
    if plan.scalar_rows:
        rows = torch.tensor(plan.scalar_rows, dtype=torch.int64)
        for name, values in plan.scalars.items():
            if name not in live:
                continue
            t = live[name]
            if name == "w13_input_scale_quant":
                t.copy_(values.to(t.device))
            else:
                t.index_copy_(0, rows.to(t.device), values.to(t.device))
            written.add(name)
    return written

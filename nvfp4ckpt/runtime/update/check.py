"""Proving what is live: compare the live tensors with the kernel layout of source tensors, on their device."""

from __future__ import annotations

import dataclasses

from ..._lazy import torch
from .plan import Plan, _stored_rows, _stored_targets
from .results import LiveCheck
from .views import KERNEL_NAMES, _Maps, _dst_flat, _expert_views, _local_experts, _sources_of, _src_words, _views, _views_of
from . import dense, table
from .write import _path, uses_table

def _compare(plan: Plan) -> LiveCheck:
    if plan.dense:  # unquantized sources: compare with their quantization (as the update would write it)
        device = next((plan.live[n].device for n in KERNEL_NAMES if n in plan.live), torch.device("cpu"))
        q = dense.quantized_sources(plan, device)
        experts = {e: ({r: {**kinds, **q[e][r]} for r, kinds in roles.items()} if e in q else roles) for e, roles in plan.experts.items()}
        plan = dataclasses.replace(plan, experts=experts, dense={}, cache={})
    live, t, info = plan.live, plan.target, plan.target.info
    padded = (info.hidden_padded, t.i_pad) != (info.hidden_size, t.i1 - t.i0)
    parts = [(name, live[name]) for name in KERNEL_NAMES if name in live]
    paths = {name: _path(plan, tensor.device) for name, tensor in parts}
    # Pass 1: a difference flag per (expert, source matrix) and, for padded layers, per (expert, tensor) for the
    # padding. On a GPU the flags stay on the device until one read-back (no synchronization per expert).
    checks: list[tuple] = []
    tabled = uses_table(plan)
    if tabled:  # one compare launch per kernel tensor; flags stay on the device until the read-back below
        order = {name: k for k, name in enumerate(KERNEL_NAMES)}
        for g in table.groups([plan]):
            flags = table.launch(g, check=True)
            checks += [(m.expert, g.name, m.half, m.key, (flags, k)) for k, m in enumerate(g.matrices)]
        checks.sort(key=lambda c: (c[0], order[c[1]], c[2]))
    for x in _local_experts(plan):
        src = _views_of(plan, x) if (padded or not tabled) else None
        for name, tensor in parts if not tabled else ():
            dst = tensor[x].view(torch.uint8)
            for half, key in _sources_of(plan, name):
                checks.append((x, name, half, key, _differs(paths[name], name, dst, half, src[key])))
        if padded:  # padding is zero iff the nonzero counts agree (the source bytes are compared above)
            for name, tensor in parts:
                want = sum(torch.count_nonzero(src[key].view(torch.uint8)).to(tensor.device) for _, key in _sources_of(plan, name))
                checks.append((x, name, None, None, torch.count_nonzero(tensor[x].view(torch.uint8)) != want))
    flags = _read_flags([c[-1] for c in checks])
    # Pass 2: the first flagged one, located with the index maps (one expert's gather).
    for (x, name, half, key, _), flagged in zip(checks, flags):
        if not flagged:
            continue
        e = x + t.e0
        if key is None:
            return LiveCheck(False, f"live {info.prefix}.{name}: expert {e} has nonzero padding (the kernel would read it)",
                             tensor=f"{info.prefix}.{name}", expert=e)  # fmt: skip
        dst = live[name][x].view(torch.uint8)
        diff = _locate(plan.maps.to(dst.device), name, dst, half, _expert_views(plan, e)[key])
        if diff is not None:
            kernel_row, source_row = diff
            return _diff(plan, name, e, kernel_row, key.removesuffix("_s"), "weight_scale" if key.endswith("_s") else "weight", source_row)
    for name, rows, experts, want in _expected_scalars(plan):
        t_live = live[name]
        got = t_live.detach().index_select(0, rows.to(t_live.device))
        want = want.to(t_live.dtype).to(t_live.device).reshape(got.shape)
        bad = (got.contiguous().view(torch.uint8).reshape(len(rows), -1) != want.contiguous().view(torch.uint8).reshape(len(rows), -1)).any(1)
        if bool(bad.any()):
            k = int(bad.nonzero()[0])
            row, expert = int(rows[k]), experts[k]
            return LiveCheck(
                False, f"live {info.prefix}.{name}: expert {expert} (row {row}) is {got[k].tolist()}, the source gives "
                f"{want[k].tolist()} (stale scalar)",
                tensor=f"{info.prefix}.{name}", expert=expert, row=row,
            )  # fmt: skip
    return LiveCheck(True, "equal", checked_experts=len(_local_experts(plan)), unchecked=plan.unchecked)

def _differs(path: str, name: str, dst: torch.Tensor, half: int, src: torch.Tensor) -> "bool | torch.Tensor":
    """Whether a source matrix differs from its place in live: a bool (CPU), a device flag (other devices), or True
    (padded layers: the index maps do the comparison in pass 2)."""
    if path == "index":
        return True
    if path == "numpy":
        import numpy as np

        d, s = _views(name, dst, half, src.cpu())
        return not np.array_equal(d.numpy(), s.numpy())
    d, s = _views(name, dst, half, src.to(dst.device))
    return (d != s).any()

def _read_flags(flags: list) -> list[bool]:
    """Flags as bools: a bool, a device flag, or (a table launch's per-matrix counts, index); one read-back per
    table launch and one per device for the rest."""
    counts = {id(f[0]): f[0] for f in flags if isinstance(f, tuple)}
    if counts:
        host = {k: v.cpu().tolist() for k, v in counts.items()}
        flags = [bool(host[id(f[0])][f[1]]) if isinstance(f, tuple) else f for f in flags]
    tensors = [f for f in flags if isinstance(f, torch.Tensor)]
    if not tensors:
        return [bool(f) for f in flags]
    by_device: dict = {}
    for f in tensors:
        by_device.setdefault(f.device, []).append(f)
    values = {dev: iter(torch.stack(fs).cpu().tolist()) for dev, fs in by_device.items()}  # one read-back per device
    return [bool(next(values[f.device])) if isinstance(f, torch.Tensor) else bool(f) for f in flags]

def _expected_scalars(plan: Plan):
    """(live name, live rows, their global experts, expected values) for every present scalar the source determines."""
    live, t = plan.live, plan.target
    for name, values in _stored_rows(plan).items():
        if name in live:
            rows, picked, experts = _stored_targets(plan, name, live[name])
            if rows:
                yield name, torch.tensor(rows, dtype=torch.int64), experts, values[picked]
    for name, values in plan.scalars.items():
        if name not in live or not plan.scalar_rows:
            continue
        if name == "w13_input_scale_quant":
            yield name, torch.zeros(1, dtype=torch.int64), [None], values
        else:
            yield name, torch.tensor(plan.scalar_rows, dtype=torch.int64), [x + t.e0 for x in plan.scalar_rows], values

def _locate(maps: _Maps, name: str, dst: torch.Tensor, half: int, src: torch.Tensor) -> tuple[int, int] | None:
    """(kernel row, source row) of the first source row whose bytes differ in live, or None; gathers one expert's
    matrix with the index maps."""
    rows = maps.w13_rows[half] if name.startswith("w13") else maps.w2_rows
    if name.endswith("scale"):
        words = maps.w13_words if name.startswith("w13") else maps.w2_words
        index = maps.w13_scale[half] if name.startswith("w13") else maps.w2_scale
        got = _dst_flat(dst, words).index_select(0, index)
        want = _src_words(src, dst.device, words)
        per_row = src.shape[1] // 4 if words else src.shape[1]
        if torch.equal(got, want):
            return None
        source_row = int((got != want).nonzero()[0]) // per_row
    else:
        got = dst.index_select(0, rows)[:, : src.shape[1]]
        want = src.to(dst.device)
        if torch.equal(got, want):
            return None
        source_row = int((got != want).any(1).nonzero()[0])
    return int(rows[source_row]), source_row

def _diff(plan: Plan, name: str, expert: int, row: int, role: str, kind: str, source_row: int) -> LiveCheck:
    prefix = plan.target.info.prefix
    if plan.fused is not None:
        proj = "gate_up_proj" if role != "down" else "down_proj"
        source = f"{prefix}.{proj}" + ("" if kind == "weight" else "_weight_scale")
        where = f"expert {expert}, {role} row {source_row + (plan.target.i0 if role != 'down' else 0)}"
    else:
        source = plan.names.get((expert, role, kind), f"{prefix}.{expert}.{role}")
        where = f"row {source_row + (plan.target.i0 if role != 'down' else 0)}"
    return LiveCheck(
        False, f"live {prefix}.{name}: expert {expert}, row {row} differs from {source} {where}",
        tensor=f"{prefix}.{name}", expert=expert, row=row, source_tensor=source, source_row=source_row,
    )  # fmt: skip

"""Planning and validating one layer's update: shapes, dtypes, completeness, scalar values, the live tensors, and
the dependent scalars (a1/a2 decisions). Nothing here writes a live byte."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Mapping

from ..._lazy import torch
from ...errors import AliasedTensorError, BadTensorError, InputError, MissingTensorError, StaleScalarError
from ...io import torch_dtype
from ...layouts.trtllm_gen.descriptor import canonical_specs
from ...layouts.trtllm_gen.scalars import kernel_scalars
from ...source.formats import QuantFormat
from . import dense
from .names import _FUSED_ROLES, _INPUT_SCALE_NAMES, DEPENDENT, KINDS, SCALAR_KINDS, Context, Target, _few
from .results import LayerUpdate
from .views import _Maps, _maps


@dataclass
class Plan:
    target: Target
    fmt: QuantFormat
    live: dict[str, torch.Tensor]  # short canonical name -> live tensor (present ones)
    experts: dict[int, dict[str, dict[str, torch.Tensor]]]  # global expert -> role -> kind -> tensor (this rank's)
    fused: dict[str, dict[str, torch.Tensor]] | None  # "gate_up"/"down" -> kind -> tensor
    updated_rows: list[int]  # local rows whose weights and stored per-expert scalars are written
    raw: torch.Tensor  # [len(supplied), roles, 2] raw global scales (source dtype) of every supplied expert
    supplied: list[int]  # global ids of every expert in the update (other ranks' too)
    scalar_rows: list[int]  # local rows whose dependent scalars are written
    scalars: dict[str, torch.Tensor]  # kernel_scalars over scalar_rows (float32, CPU)
    report: LayerUpdate
    names: dict = field(default_factory=dict)  # (expert, role, kind) -> source name, as given
    unchecked: list[str] = field(default_factory=list)
    cache: dict = field(default_factory=dict)  # per-plan memo (source views of each expert)
    dense: dict = field(default_factory=dict)  # global expert -> role -> unquantized weight (quantized when written)
    dense_scales: dict = field(default_factory=dict)  # role -> weight_scale_2 shared by every expert (fused Llama-4)

    @property
    def maps(self) -> _Maps:
        """Index maps for this shape (built on first use, then cached per shape)."""
        t, info = self.target, self.target.info
        return _maps(t.i1 - t.i0, t.i_pad, info.hidden_size, info.hidden_padded, info.gated)


def plan_layer(
    ctx: Context, prefix: str, entries: dict, live: Mapping[str, torch.Tensor], maxima: tuple[float, float] | None,
    for_check: bool = False, known: Mapping[int, tuple[float, float]] | None = None,
) -> Plan:  # fmt: skip
    target = ctx.targets[prefix]
    e0, e1 = target.e0, target.e1  # read per expert below
    info = target.info
    if entries["experts"] and entries["fused"]:
        raise InputError(f"{prefix}: the update mixes fused ({', '.join(entries['fused'])}) and per-expert tensors; send one form")
    live_t = _live_tensors(ctx, target, live)
    if any("dense" in kinds for kinds in entries["fused"].values()):  # unquantized fused Llama-4: per-expert views
        dense.split_fused(ctx, prefix, entries, live)
    roles = info.roles
    n13 = len(roles) - 1
    e_glob = info.num_experts
    fused = entries["fused"] or None
    dense_experts: dict = {}
    if fused is not None:
        _check_fused(ctx, target, fused)
        # one global scale per fused tensor: every expert gets it
        by_role = {r: fused[fr] for fr, rs in _FUSED_ROLES.items() for r in rs}
        raw_all = torch.stack([
            torch.stack([_scalar(by_role[r][k]) for k in SCALAR_KINDS]) for r in roles
        ]).unsqueeze(0).expand(e_glob, -1, -1)  # fmt: skip
        supplied = list(range(e_glob))
    else:
        dense_experts = dense.split(ctx, prefix, entries)
        if dense_experts:
            dense.global_scales(ctx, prefix, entries, dense_experts)
            dense.fill_input_scales(ctx, prefix, entries, dense_experts, live)
        _check_experts(ctx, target, entries, dense_experts)
        supplied = sorted(entries["experts"])
        raw_all = _gather_scalars([[[entries["experts"][e][r][k] for k in SCALAR_KINDS] for r in roles] for e in supplied])
    _check_scalar_values(ctx, prefix, raw_all, supplied, roles, entries["names"], fused is not None)
    ws2_sup = ctx.fmt.to_dequant_multiplier(raw_all[..., 0])  # [U, roles] float32, ModelOpt convention
    inp_sup = ctx.fmt.to_dequant_multiplier(raw_all[..., 1])

    # What the live tensors say about the experts this update does not touch.
    old_inp = _rows_of(live_t, "w13_input_scale", "w2_input_scale", target, e_glob)
    old_ws2 = _rows_of(live_t, "w13_weight_scale_2", "w2_weight_scale_2", target, e_glob)
    sup_idx = {e: k for k, e in enumerate(supplied)}
    unchecked: list[str] = []
    a_new: list[float] = []
    a_changed = False
    for which, cols in (("a1", slice(0, n13)), ("a2", slice(n13, n13 + 1))):
        sup_vals = dict(zip(supplied, inp_sup[:, cols].amax(1).tolist())) if supplied else {}
        old_vals = {}
        if old_inp is not None:
            rows, kind = old_inp
            base = 0 if kind == "global" else e0
            old_vals = {base + x: v for x, v in enumerate(rows[:, cols].amax(1).tolist())}
        old_vals |= {e: v[0 if which == "a1" else 1] for e, v in (known or {}).items()}  # applied earlier in a stream
        a_old = maxima[0 if which == "a1" else 1] if maxima else None
        if a_old is None and len(old_vals) == e_glob:
            a_old = max(old_vals.values())
        a, why = _new_maximum(sup_vals, old_vals, a_old, e_glob)
        if a is None:
            missing = [ctx.source_name(prefix, e, r, "input_global") for e in range(e_glob) if e not in sup_vals
                       for r in (roles[cols])]  # fmt: skip
            msg = (f"{prefix}: {which} (the layer maximum of the input scales over all {e_glob} experts) {why}; "
                   f"update the whole layer (every expert's tensors; missing {_few(missing)}) or pass input_scale_maxima")  # fmt: skip
            if for_check:
                unchecked.append(msg)
                a_new = []
                break
            raise StaleScalarError(msg)
        a_new.append(a)
        a_changed |= a_old is None or a != a_old

    # Rows whose dependent scalars are recomputed: every local expert whose weight_scale_2 is known.
    local = range(e0, e1)
    updated_rows = [e - e0 for e in supplied if e0 <= e < e1]
    known = [x for x in range(target.n_local) if (x + e0) in sup_idx or old_ws2 is not None]
    if a_new and a_changed and len(known) < target.n_local and not for_check:
        # refused even when live holds none of them: an engine plugin writes its own forms from the report
        missing = [ctx.source_name(prefix, e, r, "weight_global") for e in local if e not in sup_idx for r in roles]
        raise StaleScalarError(
            f"{prefix}: the update changes a1/a2 to {a_new[0]!r}/{a_new[1]!r}, so g1_alphas, g1_scale_c and g2_alphas of "
            f"every expert change, but the weight_scale_2 of experts outside the update is neither live nor supplied "
            f"(missing {_few(missing)}); include live {prefix}.w13_weight_scale_2 and .w2_weight_scale_2, or supply those tensors"
        )  # fmt: skip
    scalars: dict[str, torch.Tensor] = {}
    scalar_rows: list[int] = []
    if a_new:
        scalar_rows = known if (a_changed or for_check) else sorted(set(updated_rows))
        ws2_rows, inp_rows = [], []
        for x in scalar_rows:
            e = x + e0
            if e in sup_idx:
                ws2_rows.append(ws2_sup[sup_idx[e]])
                inp_rows.append(inp_sup[sup_idx[e]])
            else:
                ws2_rows.append(old_ws2[0][x])
                inp_rows.append(None)
        # kernel_scalars takes a1/a2 as maxima over its rows: one extra row holding (a1, a1, a2) and weight scales
        # of 1 makes them the layer's (global) values; rows without a known input scale borrow that row's.
        extra = torch.tensor([a_new[0]] * n13 + [a_new[1]], dtype=torch.float32)
        ws2_m = torch.stack([r.float() for r in ws2_rows] + [torch.ones(n13 + 1)])
        inp_m = torch.stack([extra if r is None else r.float() for r in inp_rows] + [extra])
        full = kernel_scalars(ws2_m, inp_m)
        scalars = {k: (v if k == "w13_input_scale_quant" else v[:-1].contiguous()) for k, v in full.items() if k in DEPENDENT}
    report = LayerUpdate(
        prefix=prefix,
        experts=[x + e0 for x in updated_rows],
        other_rank_experts=[e for e in supplied if not e0 <= e < e1],
        input_scale_maxima=(a_new[0], a_new[1]) if a_new else (float("nan"), float("nan")),
        scalars=scalars,
        scalar_rows=scalar_rows,
    )
    experts = {e: entries["experts"][e] for e in supplied if e0 <= e < e1} if fused is None else {}
    plan = Plan(target, ctx.fmt, live_t, experts, fused, updated_rows, raw_all, supplied, scalar_rows, scalars,
                 report, dict(entries["names"]), unchecked,
                 dense={e: w for e, w in dense_experts.items() if e0 <= e < e1},
                 dense_scales=entries.get("fused_scales", {}))  # fmt: skip
    local = [sup_idx[x + e0] for x in updated_rows]
    report.stored = {k: v[local].contiguous() for k, v in _stored_rows(plan).items()}
    report.input_scales = dict(zip(supplied, zip(inp_sup[:, :n13].amax(1).tolist(), inp_sup[:, n13].tolist()))) if supplied else {}
    return plan


def _live_tensors(ctx: Context, target: Target, live: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    info = target.info
    specs = canonical_specs(info.prefix, target.n_local, info.hidden_padded, target.i_pad, ctx.fmt.name,
                            info.scalar_dtype, info.gated)  # fmt: skip
    out: dict[str, torch.Tensor] = {}
    for full, dtype, shape in specs:
        t = live.get(full)
        if t is None:
            continue
        short = full[len(info.prefix) + 1 :]
        shapes = [shape]
        if short in _INPUT_SCALE_NAMES:  # engines may keep every expert's input scales on each rank (SGLang)
            shapes.append((info.num_experts, *shape[1:]))
        want = torch_dtype(dtype)
        ok_dtype = t.dtype == want or (dtype == "F8_E4M3" and t.dtype == torch.uint8)
        if tuple(t.shape) not in shapes or not ok_dtype:
            raise BadTensorError(
                f"live {full}: is {t.dtype} {list(t.shape)}; the layout says {want} {list(shape)} "
                f"({'rank ' + str(target.rank.rank) if target.rank else 'unsharded'}); pass the matching live tensor"
            )
        if not t.is_contiguous():
            raise BadTensorError(f"live {full}: is not contiguous; in-place updates need the parameter's own storage")
        out[short] = t.detach()  # same storage; writes must not be recorded by autograd
    if not out:
        raise MissingTensorError(f"{info.prefix}: the update has tensors for this layer but live has none of its canonical tensors")
    return out


def _check_experts(ctx: Context, target: Target, entries: dict, dense_experts: Mapping = {}) -> None:  # noqa: B006
    info = target.info
    h, i = info.hidden_size, info.intermediate_size
    roles = info.roles
    want = {"gate": (i, h), "up": (i, h), "down": (h, i)}
    scalar_dtype = torch_dtype(info.scalar_dtype)
    u8, f8 = torch.uint8, torch.float8_e4m3fn
    # expected (dtype, shape) of each role's packed weight and block scale, compared against the tensors' own
    # (dtype, shape) in one pass: this runs once per source tensor of every update
    packed = {r: ((u8, (want[r][0], want[r][1] // 2)), (f8, (want[r][0], want[r][1] // 16))) for r in roles}
    names = entries["names"]
    scalar_set, all_set = set(SCALAR_KINDS), set(KINDS)
    for e, by_role in sorted(entries["experts"].items()):
        is_dense = e in dense_experts
        kinds = scalar_set if is_dense else all_set  # dense experts: weights checked by dense.split
        for r in roles:
            got = by_role.get(r)
            if got is None or not got.keys() >= kinds:
                _missing(ctx, info, e, by_role, kinds)
        for r in roles:
            got = by_role[r]
            if not is_dense:
                w, s = got["weight"], got["weight_scale"]
                (wd, ws), (sd, ss) = packed[r]
                if w.dtype is not wd or w.shape != ws:
                    _expect(names[(e, r, "weight")], w, wd, ws)
                if s.dtype is not sd or s.shape != ss:
                    _expect(names[(e, r, "weight_scale")], s, sd, ss)
            for kind in SCALAR_KINDS:
                t = got[kind]
                if t.dtype is not scalar_dtype or t.numel() != 1:
                    _expect_scalar(names[(e, r, kind)], t, scalar_dtype)


def _missing(ctx: Context, info, e: int, by_role: dict, kinds) -> None:
    """Refuse expert ``e``: some of its tensors are not in the update."""
    missing = [(r, k) for r in info.roles for k in KINDS if k in kinds and k not in by_role.get(r, {})]
    names = [ctx.source_name(info.prefix, e, r, k) for r, k in missing]
    only_scalars = all(k in SCALAR_KINDS for _, k in missing)
    cls = StaleScalarError if only_scalars else MissingTensorError
    what = "its scalars would be stale" if only_scalars else "an expert is updated whole"
    raise cls(f"{info.prefix}: expert {e} is updated without {_few(names)} ({what}); send all four tensors of each projection")


def _check_fused(ctx: Context, target: Target, fused: dict) -> None:
    info = target.info
    if not info.gated:
        raise InputError(f"{info.prefix}: fused experts are gated (gate_up_proj); this layer is not")
    e, h, i = info.num_experts, info.hidden_size, info.intermediate_size
    scalar_dtype = torch_dtype(info.scalar_dtype)
    shapes = {"gate_up": ((e, h // 2, 2 * i), (e, h // 16, 2 * i)), "down": ((e, i // 2, h), (e, i // 16, h))}
    for role, (w_shape, s_shape) in shapes.items():
        proj = "gate_up_proj" if role == "gate_up" else "down_proj"
        kinds = fused.get(role, {})
        missing = [f"{info.prefix}.{proj}{sfx}" for sfx, k in ctx.fmt.fused_suffixes.items() if k not in kinds]
        if missing:
            raise MissingTensorError(f"{info.prefix}: fused update without {_few(missing)}; send all eight fused tensors")
        _expect(f"{info.prefix}.{proj}", kinds["weight"], torch.uint8, w_shape)
        _expect(f"{info.prefix}.{proj}_weight_scale", kinds["weight_scale"], torch.float8_e4m3fn, s_shape)
        for kind, sfx in (("weight_global", "_weight_scale_2"), ("input_global", "_input_scale")):
            _expect_scalar(f"{info.prefix}.{proj}{sfx}", kinds[kind], scalar_dtype)


def _check_scalar_values(ctx: Context, prefix: str, raw: torch.Tensor, supplied: list[int], roles, names: dict, fused: bool) -> None:
    conv = ctx.fmt.to_dequant_multiplier(raw)
    bad = ~torch.isfinite(conv) | (conv <= 0)
    if bad.any():
        u, r, k = (int(v) for v in bad.nonzero()[0])
        name = (f"{prefix}.{'gate_up_proj' if roles[r] != 'down' else 'down_proj'}" if fused
                else names[(supplied[u], roles[r], SCALAR_KINDS[k])])  # fmt: skip
        raise BadTensorError(f"{name}: global scale {float(raw[u, r, k])!r} is not finite and positive; the trainer's export is broken")


def _expect(name: str, t: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    if t.dtype != dtype or tuple(t.shape) != shape:
        raise BadTensorError(f"{name}: is {t.dtype} {list(t.shape)}; the layout needs {dtype} {list(shape)}")

def _expect_scalar(name: str, t: torch.Tensor, dtype: torch.dtype) -> None:
    if t.dtype != dtype or t.numel() != 1:
        raise BadTensorError(f"{name}: is {t.dtype} {list(t.shape)}; the layout needs one {dtype} value (the source's scalar dtype)")

def _scalar(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(()).cpu()

def _gather_scalars(nested: list) -> torch.Tensor:
    """[U][roles][2] scalar tensors -> one CPU tensor [U, roles, 2] (one device->host transfer per device)."""
    flat = [t for per_e in nested for per_r in per_e for t in per_r]  # detached by group(); one value each (checked)
    if not flat:
        return torch.empty((0, 0, 2))
    try:  # the common case: one device, one shape ([] or [1]): one stack, one transfer
        stacked = torch.stack(flat).cpu()
    except RuntimeError:  # mixed devices or shapes
        stacked = torch.stack([t.reshape(()).cpu() for t in flat])
    return stacked.reshape(len(nested), len(nested[0]), 2)

def _rows_of(live_t: dict, w13: str, w2: str, target: Target, e_glob: int) -> tuple[torch.Tensor, str] | None:
    """Live per-expert values [rows, roles] (w13 columns then w2) in the ModelOpt convention, and whether the rows are
    this rank's experts ("local") or every expert ("global"); None when live lacks them."""
    if w13 not in live_t or w2 not in live_t:
        return None
    a, b = live_t[w13].detach().float().cpu(), live_t[w2].detach().float().cpu()
    if a.shape[0] != b.shape[0]:
        return None
    return torch.cat([a, b.reshape(-1, 1)], 1), "global" if a.shape[0] == e_glob and e_glob != target.n_local else "local"

def _new_maximum(sup: dict[int, float], old: dict[int, float], a_old: float | None, n: int) -> tuple[float | None, str]:
    """The layer maximum after the update, or (None, why) when what is known does not determine it.

    ``sup``: expert -> max input scale in the update; ``old``: expert -> current value for experts live shows;
    ``a_old``: the current maximum over all experts, if known."""
    if len(set(sup) | set(old)) == n:
        return max(sup[e] if e in sup else old[e] for e in range(n)), ""
    if a_old is None:
        return None, "cannot be determined: neither every expert's input scale nor the current maximum is known"
    if not sup:
        return a_old, ""
    m = max(sup.values())
    if m >= a_old:
        return m, ""  # every other expert is <= a_old <= m
    if any(v == a_old for e, v in old.items() if e not in sup):
        return a_old, ""  # an untouched expert still holds the maximum
    if all(e in old and old[e] < a_old for e in sup):
        return a_old, ""  # none of the updated experts held it: an unseen expert does
    return None, "may drop: the update lowers input scales and the experts outside it are not all visible here"

def _stored_rows(plan: Plan) -> dict[str, torch.Tensor]:
    """Per-expert stored scalars of every supplied expert (rows in ``plan.supplied`` order), by canonical name."""
    n13 = len(plan.target.info.roles) - 1
    raw = plan.raw
    ws2 = plan.fmt.to_dequant_multiplier(raw[..., 0]) if raw.numel() else raw[..., 0].float()
    inp = plan.fmt.to_dequant_multiplier(raw[..., 1]) if raw.numel() else raw[..., 1].float()
    out = {
        "w13_weight_scale_2": ws2[:, :n13], "w2_weight_scale_2": ws2[:, n13],
        "w13_input_scale": inp[:, :n13], "w2_input_scale": inp[:, n13],
    }  # fmt: skip
    if plan.fmt.raw_scalar_names:  # the format keeps its stored global scales too (compressed-tensors)
        w13_w, w2_w, w13_i, w2_i = plan.fmt.raw_scalar_names
        out |= {w13_w: raw[:, :n13, 0], w2_w: raw[:, n13, 0], w13_i: raw[:, :n13, 1], w2_i: raw[:, n13, 1]}
    return out

def _stored_targets(plan: Plan, name: str, t: torch.Tensor) -> tuple[list[int], list[int], list[int]]:
    """(live rows, rows of ``_stored_rows`` values, global experts) a stored scalar tensor takes from the update: this
    rank's experts, or every supplied expert when the live tensor holds every expert's rows (input scales)."""
    t0, info = plan.target, plan.target.info
    every = name in _INPUT_SCALE_NAMES and t.shape[0] == info.num_experts and info.num_experts != t0.n_local
    picked = [(k, e) for k, e in enumerate(plan.supplied) if every or t0.e0 <= e < t0.e1]
    return [e if every else e - t0.e0 for _, e in picked], [k for k, _ in picked], [e for _, e in picked]


def check_aliasing(plans: list[Plan]) -> None:
    """Refuse live tensors that share bytes with each other (two scalars as views of one buffer: a write to one would
    change the other) and sources that share bytes with a live tensor (the update would read what it has already
    overwritten). Compares byte extents per device, so separate views of one allocation are fine."""
    spans: list[tuple] = []
    for plan in plans:
        for short, t in plan.live.items():
            spans.append((t.device, *_extent(t), f"live {plan.target.info.prefix}.{short}"))
    spans.sort(key=lambda s: (str(s[0]), s[1]))
    for a, b in zip(spans, spans[1:]):
        if a[0] == b[0] and b[1] < a[2]:
            raise AliasedTensorError(f"{a[3]} and {b[3]}: share memory; pass each canonical tensor as its own storage")
    starts: dict = {}  # device -> sorted live spans (disjoint now): one bisect per source
    for device, start, end, name in spans:
        starts.setdefault(device, []).append((start, end, name))
    for plan in plans:
        for key, t in _sources(plan):
            live_spans = starts.get(t.device)
            if not live_spans:
                continue
            s0, s1 = _extent(t)
            k = bisect.bisect_right(live_spans, (s1,)) - 1  # the last live span starting before the source ends
            if k >= 0 and live_spans[k][1] > s0:
                source = plan.names.get(key, f"{plan.target.info.prefix} {key}")
                raise AliasedTensorError(f"{source}: shares memory with {live_spans[k][2]}; pass a copy of the source (t.clone())")


def _sources(plan: Plan):
    """(name key, tensor) of every source tensor the plan reads."""
    if plan.fused is not None:
        for role, kinds in plan.fused.items():
            for kind, t in kinds.items():
                yield (None, role, kind), t
        return
    for e, roles in plan.experts.items():
        for role, kinds in roles.items():
            for kind, t in kinds.items():
                yield (e, role, kind), t


def _extent(t: torch.Tensor) -> tuple[int, int]:
    """[first byte, one past the last byte] that ``t`` can read."""
    start = t.data_ptr()
    d = t.dim()
    if d == 2:  # the common cases (matrices, scalars) without the generic loop: this runs once per source tensor
        (n, c), (s, u) = t.shape, t.stride()
        return start, start + ((n - 1) * s + (c - 1) * u + 1) * t.element_size() if n and c else start
    if d < 2 and t.numel() == 1:  # a scalar ([] or [1])
        return start, start + t.element_size()
    if t.numel() == 0:
        return start, start
    span = sum((n - 1) * s for n, s in zip(t.shape, t.stride())) + 1
    return start, start + span * t.element_size()

"""Unquantized expert weights (bf16, fp16, fp32) in an update: quantized exactly as the source's producer does
(``nvfp4ckpt.producer_quant``), then written like the NVFP4 tensors a trainer could have sent.

Planning needs only each expert's global scales (a reduction: ``global_scales``), so validation and the a1/a2
decisions run before any quantization. The weights are quantized at write time, a chunk of experts at a time on the
live tensors' device (``quantized_chunks``), and each chunk goes through the ordinary writers: the quantized layer
never exists whole. Input scales come from calibration, not from weights: a dense expert keeps its live input
scales unless the update supplies them (``fill_input_scales``).
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Mapping

from ..._lazy import torch
from ...errors import BadTensorError, InputError, StaleScalarError
from ... import producer_quant
from .names import Context, Target, _few

FLOAT_DTYPES = ("bfloat16", "float16", "float32")
CHUNK_FRACTION = 0.125  # quantize at most this share of a layer's dense weights at once (at least one expert)
MODELOPT_DIVIDE = "cpu"  # ModelOpt's weight_scale_2 = amax / 2688 as on a CPU export; "cuda" as on a GPU export


def is_dense(t: torch.Tensor) -> bool:
    return str(t.dtype).removeprefix("torch.") in FLOAT_DTYPES


def split(ctx: Context, prefix: str, entries: dict) -> dict[int, dict[str, torch.Tensor]]:
    """Move the dense weights of ``entries`` out (returned as expert -> role -> tensor) and check them: whole experts,
    the layer's shapes, finite values, not mixed with quantized tensors of the same expert."""
    target = ctx.targets[prefix]
    info = target.info
    dense: dict[int, dict[str, torch.Tensor]] = {}
    for e, roles in entries["experts"].items():
        got = {r: kinds.pop("dense") for r, kinds in roles.items() if "dense" in kinds}
        if not got:
            continue
        name = entries["names"]
        missing = [r for r in info.roles if r not in got]
        if missing:
            names = [ctx.source_name(prefix, e, r, "weight") for r in missing]
            raise InputError(f"{prefix}: expert {e} has unquantized weights for {', '.join(sorted(got))} but not {_few(names)}; "
                             "send every projection of an expert unquantized (or every one quantized)")  # fmt: skip
        for r in info.roles:
            extra = [k for k in ("weight", "weight_scale", "weight_global") if k in roles.get(r, {})]
            if extra:
                raise InputError(f"{name[(e, r, extra[0])]}: expert {e} is sent unquantized ({name[(e, r, 'dense')]}); "
                                 "do not send its quantized tensors too")  # fmt: skip
        h, i = info.hidden_size, info.intermediate_size
        want = {"gate": (i, h), "up": (i, h), "down": (h, i)}
        for r, t in got.items():
            if tuple(t.shape) != want[r]:
                raise BadTensorError(f"{name[(e, r, 'dense')]}: is {list(t.shape)}; the layer's {r} weight is {list(want[r])} ({t.dtype})")
        gated = [got[r] for r in info.roles if r != "down"]
        if len({t.dtype for t in gated}) > 1:
            raise BadTensorError(f"{name[(e, info.roles[0], 'dense')]}: gate and up of expert {e} have different dtypes "
                                 f"({', '.join(str(t.dtype) for t in gated)}); the producer quantizes them together in one dtype")  # fmt: skip
        dense[e] = got
    return dense


_FUSED_PROJ = {"gate_up": "gate_up_proj", "down": "down_proj"}


def split_fused(ctx: Context, prefix: str, entries: dict, live: Mapping[str, torch.Tensor]) -> None:
    """ModelOpt's fused Llama-4 experts sent unquantized (``gate_up_proj`` ``[E, H, 2I]``, ``down_proj`` ``[E, I, H]``)
    as per-expert dense entries: ``gate``/``up``/``down`` of expert e are the transposed views ``gate_up[e, :, :I].T``,
    ``gate_up[e, :, I:].T`` and ``down[e].T`` (no copy), and every expert gets the tensor's one weight_scale_2
    (ModelOpt quantizes each fused tensor with one scale over all experts, docs/producer-quant.md), kept in
    ``entries["fused_scales"]`` for ``global_scales`` and the quantizer. Fused input scales, if sent, go to every
    expert; without them every expert keeps its live ones, so live must show every expert's (not only this EP rank's:
    the layer maxima a1/a2 span all experts). Checks both weights (shape, dtype, finite, not all zero) first."""
    target = ctx.targets[prefix]
    info = target.info
    fused, names = entries["fused"], entries["names"]
    if not info.gated:
        raise InputError(f"{prefix}: fused experts are gated (gate_up_proj); this layer is not")
    if ctx.fmt.name != "modelopt":  # only ModelOpt has a fused form (only its names parse as fused)
        raise InputError(f"{prefix}: unquantized fused experts are ModelOpt's form; this layout is {ctx.fmt.name}")
    e_glob, h, i = info.num_experts, info.hidden_size, info.intermediate_size
    want = {"gate_up": (e_glob, h, 2 * i), "down": (e_glob, i, h)}
    scales: dict[str, torch.Tensor] = {}
    tensors: dict[str, torch.Tensor] = {}
    for fr, proj in _FUSED_PROJ.items():
        kinds = fused.get(fr, {})
        if "dense" not in kinds:
            other = f"{prefix}.{_FUSED_PROJ['down' if fr == 'gate_up' else 'gate_up']}"
            how = "is sent quantized" if "weight" in kinds else "is missing"
            raise InputError(f"{prefix}.{proj}: {how} while {other} is sent unquantized; send both fused weights unquantized "
                             "(or both as NVFP4 tensors)")  # fmt: skip
        name = names[(None, fr, "dense")]
        extra = [k for k in ("weight_scale", "weight_global") if k in kinds]
        if extra:
            raise InputError(f"{names[(None, fr, extra[0])]}: {name} is sent unquantized; do not send its quantized scales too")
        t = kinds["dense"]
        if tuple(t.shape) != want[fr]:
            raise BadTensorError(f"{name}: is {list(t.shape)}; the layer's unquantized fused {proj} is {list(want[fr])} "
                                 f"([experts, inputs, outputs]) in bfloat16, float16 or float32")  # fmt: skip
        try:
            scales[fr] = producer_quant.global_scale_modelopt_fused(t, divide_like=MODELOPT_DIVIDE)
        except ValueError as exc:
            raise BadTensorError(f"{name}: {exc}; the update is refused (nothing written)") from None
        tensors[fr] = t
        if "input_global" not in kinds:
            which = "w13_input_scale" if fr == "gate_up" else "w2_input_scale"
            held = live.get(f"{prefix}.{which}")
            if held is None or any(_live_row(held, target, e) is None for e in range(e_glob)):
                raise StaleScalarError(
                    f"{prefix}: {name} is sent unquantized without {name}_input_scale and live {prefix}.{which} does not "
                    f"show every expert's input scale (this rank holds experts {target.e0}-{target.e1 - 1} of {e_glob}; "
                    "input scales come from calibration, not from the weights); send it"
                )  # fmt: skip
    entries["fused_scales"] = {r: scales[fr] for fr, rs in (("gate_up", ("gate", "up")), ("down", ("down",))) for r in rs}
    gu, down = tensors["gate_up"], tensors["down"]
    for e in range(e_glob):
        views = {"gate": gu[e, :, :i].T, "up": gu[e, :, i:].T, "down": down[e].T}
        roles = entries["experts"].setdefault(e, {})
        for r, v in views.items():
            fr = "down" if r == "down" else "gate_up"
            roles[r] = {"dense": v}
            names[(e, r, "dense")] = f"{names[(None, fr, 'dense')]}[{e}]"
            if "input_global" in fused[fr]:
                roles[r]["input_global"] = fused[fr]["input_global"]
                names[(e, r, "input_global")] = names[(None, fr, "input_global")]
    entries["fused"] = {}


def global_scales(ctx: Context, prefix: str, entries: dict, dense: dict[int, dict[str, torch.Tensor]]) -> None:
    """Put each dense expert's global scales (the producer's, in the source's stored convention and scalar dtype)
    into ``entries`` as its ``weight_global`` tensors; non-finite weights are refused here, naming the tensor."""
    info = ctx.targets[prefix].info
    scalar_dtype = torch.float32 if info.scalar_dtype == "F32" else getattr(torch, _SCALAR[info.scalar_dtype])
    shape = (1,) if ctx.fmt.global_scales_reciprocal else ()
    shared = entries.get("fused_scales")  # fused Llama-4 tensors: one scale per tensor, from split_fused
    batched = _batched_scales(ctx, info, dense) if shared is None else None
    for e, roles in dense.items():
        for group in _groups(info.roles):
            if shared is not None:
                scale = shared[group[0]]
            elif batched is not None:
                scale = batched[(e, group)]
            else:
                try:
                    scale = _global_scale(ctx, [roles[r] for r in group])
                except ValueError as exc:
                    raise BadTensorError(f"{entries['names'][(e, group[0], 'dense')]}: {_reason(exc, group, entries, e)}") from None
            value = scale.reshape(shape).to(scalar_dtype)
            for r in group:
                entries["experts"][e][r]["weight_global"] = value
                entries["names"].setdefault((e, r, "weight_global"), entries["names"][(e, r, "dense")])


def fill_input_scales(ctx: Context, prefix: str, entries: dict, dense: Mapping[int, dict], live: Mapping[str, torch.Tensor]) -> None:
    """A dense expert without supplied input scales keeps its live ones (read in the source's stored convention);
    refused when live does not show them."""
    target = ctx.targets[prefix]
    info = target.info
    n13 = len(info.roles) - 1
    names = ctx.fmt.raw_scalar_names or ("", "", "w13_input_scale", "w2_input_scale")
    w13, w2 = live.get(f"{prefix}.{names[2]}"), live.get(f"{prefix}.{names[3]}")
    for e in dense:
        roles = entries["experts"][e]
        missing = [r for r in info.roles if "input_global" not in roles[r]]
        if not missing:
            continue
        row = _live_row(w13, target, e) if w13 is not None else None
        row2 = _live_row(w2, target, e) if w2 is not None else None
        if row is None or row2 is None:
            need = [ctx.source_name(prefix, e, r, "input_global") for r in missing]
            raise StaleScalarError(
                f"{prefix}: expert {e} is sent unquantized without {_few(need)} and live {prefix}.{names[2]}/{names[3]} "
                "does not show its current input scales (they come from calibration, not from the weights); send them"
            )  # fmt: skip
        shape = (1,) if ctx.fmt.global_scales_reciprocal else ()
        values = [w13[row][c] for c in range(n13)] + [w2[row2].reshape(())]
        for r, v in zip(info.roles, values):
            if r in missing:
                roles[r]["input_global"] = v.detach().reshape(shape).clone()
                entries["names"].setdefault((e, r, "input_global"), f"live {prefix}.{names[2] if r != 'down' else names[3]}[{e}]")


def quantized_chunks(plan, experts: list[int], device: torch.device) -> Iterator:
    """Sub-plans of ``plan`` whose ``experts`` hold the NVFP4 tensors of a chunk of its dense experts (quantized on
    ``device``), for the ordinary writers. At most ``CHUNK_FRACTION`` of the layer's dense bytes at once."""
    info = plan.target.info
    if not experts:
        return
    per_expert = sum(t.numel() * t.element_size() for t in plan.dense[experts[0]].values())
    total = per_expert * len(experts)
    step = max(1, int(total * CHUNK_FRACTION) // max(per_expert, 1))
    for k in range(0, len(experts), step):
        chunk = experts[k : k + step]
        quantized: dict[int, dict[str, dict[str, torch.Tensor]]] = {e: {} for e in chunk}
        for group in _groups(info.roles):
            stacked = [torch.stack([plan.dense[e][r].to(device) for e in chunk]) for r in group]
            outs = _quantize(plan.fmt.name, stacked, plan.dense_scales.get(group[0]))
            del stacked
            for r, out in zip(group, outs):
                for j, e in enumerate(chunk):
                    quantized[e][r] = {"weight": out.weight[j], "weight_scale": out.weight_scale[j]}
        rows = [e - plan.target.e0 for e in chunk]
        yield dataclasses.replace(plan, experts=quantized, updated_rows=rows, cache={}, dense={})


def quantized_sources(plan, device: torch.device) -> dict[int, dict[str, dict[str, torch.Tensor]]]:
    """Every dense expert of ``plan`` quantized at once (``check_live`` of dense tensors)."""
    out: dict = {}
    local = [e for e in plan.dense if plan.target.e0 <= e < plan.target.e1]
    for sub in quantized_chunks(plan, local, device):
        out.update(sub.experts)
    return out


# ----------------------------------------------------------------------------------------------


_SCALAR = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


def _groups(roles: tuple[str, ...]) -> list[tuple[str, ...]]:
    """Projections sharing one global scale: gate and up (both producers fuse them), down alone."""
    gated = tuple(r for r in roles if r != "down")
    return [gated, ("down",)]


def _batched_scales(ctx: Context, info, dense: dict[int, dict[str, torch.Tensor]]) -> dict | None:
    """Every dense expert's global scales in one pass ((expert, group) -> float32 0-d), or None when the weights
    differ in dtype or device or one is refused (the per-expert path then names the tensor)."""
    keys = [(e, group) for e in dense for group in _groups(info.roles)]
    if len(keys) < 2:
        return None
    fmt = "modelopt" if ctx.fmt.name == "modelopt" else "compressed-tensors"
    scales = producer_quant.global_scales_many([[dense[e][r] for r in group] for e, group in keys], fmt, divide_like=MODELOPT_DIVIDE)
    if scales is None:
        return None
    return dict(zip(keys, scales.unbind(0)))


def _global_scale(ctx: Context, weights: list[torch.Tensor]) -> torch.Tensor:
    if ctx.fmt.name == "modelopt":
        return producer_quant.global_scale_modelopt(weights, divide_like=MODELOPT_DIVIDE)
    return producer_quant.global_scale_compressed_tensors(weights)


def _quantize(fmt_name: str, weights: list[torch.Tensor], weight_scale_2: torch.Tensor | None = None):
    """``weight_scale_2``: a fused tensor's one scale (it spans more experts than the chunk); else computed per expert."""
    if fmt_name == "modelopt":
        return producer_quant.quantize_modelopt(weights, divide_like=MODELOPT_DIVIDE, weight_scale_2=weight_scale_2)
    return producer_quant.quantize_compressed_tensors(weights)


def _reason(exc: ValueError, group: tuple[str, ...], entries: dict, e: int) -> str:
    """The quantizer's message with its 'projection p' made the tensor's name."""
    text = str(exc)
    for p, r in enumerate(group):
        text = text.replace(f"projection {p} (of {len(group)}), expert 0", entries["names"][(e, r, "dense")])
    return text + "; the update is refused (nothing written)"


def _live_row(t: torch.Tensor, target: Target, e: int) -> int | None:
    """Row of global expert ``e`` in a live per-expert tensor (every expert's rows, or this rank's)."""
    if t.shape[0] == target.info.num_experts:
        return e
    if t.shape[0] == target.n_local and target.e0 <= e < target.e1:
        return e - target.e0
    return None

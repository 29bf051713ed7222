"""RL weight updates into a running vLLM model served with the ``nvfp4_trtllm`` plugin, with no re-shuffle.

Two paths:
- kernel format: :func:`reload_kernel_weights` = vLLM's ``reload_weights(is_checkpoint_format=False)`` (copies
  tensors into parameters by name, no processing) + :func:`refresh_derived`. vLLM derives ``a1_gscale`` /
  ``a2_gscale`` (1 / the input scales) and ``g1_scale_c`` when it builds the kernel; a kernel-format reload that
  changes the input scales or ``w13_weight_scale_2`` leaves them stale unless refreshed (checked in
  tests/test_engine_vllm.py). The refresh writes them in place (captured CUDA graphs keep their pointers).
- source format: :func:`update_from_source_` routes a trainer's source-named NVFP4 tensors (ModelOpt or
  compressed-tensors) through ``nvfp4ckpt.runtime.update.update_live_`` into the live kernel tensors, then writes vLLM's
  own forms of the scalars (``w13_weight_scale_2`` = g1_alphas, repeated input maxima, ...).
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping

import torch

# nvfp4ckpt imports (kept together: the restructure re-points them)
from ...errors import EngineRefusalError
from ...runtime.update import UpdateReport, update_live_
from ...runtime.update.stacked import expand_for_layout, named_as_sent
from .loader import plugin_layers
from .moe import KERNEL, RAW_CT, TrtllmCompressedTensorsMoE, TrtllmModelOptMoE


def refresh_derived(model: torch.nn.Module) -> list[str]:
    """Recompute, in place, what vLLM derived from the (reloaded) parameters of every plugin MoE layer."""
    layers = plugin_layers(model)
    for layer in layers.values():
        method = layer.quant_method
        if isinstance(method, TrtllmCompressedTensorsMoE):
            method.derive_scalars_(layer)  # vLLM's CT scalars are functions of the raw global scales
        method.refresh_derived_(layer)
    return sorted(layers)


def reload_kernel_weights(vllm_config, model: torch.nn.Module, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """``reload_weights(is_checkpoint_format=False)`` with vLLM parameter names and kernel-layout values, then
    :func:`refresh_derived`. ModelOpt: send ``w13_weight_scale_2`` as g1_alphas, ``w13_input_scale`` as the
    repeated a1 (vLLM's forms). compressed-tensors: send the raw ``*_global_scale`` tensors; vLLM's scalars
    are recomputed from them."""
    from vllm.model_executor.model_loader.reload.inplace import reload_weights

    reload_weights(vllm_config, model, iter(list(weights)), None, is_checkpoint_format=False)
    refresh_derived(model)


def update_from_source_(
    model: torch.nn.Module, named_tensors: Mapping[str, torch.Tensor], layout: dict, *, ignore_unknown: bool = False
) -> UpdateReport:
    """Write source-format NVFP4 expert tensors (the source checkpoint's names) into the live plugin layers."""
    layers = plugin_layers(model)
    by_prefix = {layer.quant_method.spec.prefix: layer for layer in layers.values()}
    live: dict[str, torch.Tensor] = {}
    maxima: dict[str, tuple[float, float]] = {}
    parts = set()
    for prefix, layer in by_prefix.items():
        method = layer.quant_method
        part = layer._nvfp4_trtllm["part"]
        parts.add(part.rank if part is not None else None)
        if part is None and layer.moe_config.num_local_experts != method.spec.num_experts:
            raise EngineRefusalError(
                f"{prefix}: source-format updates under vLLM expert parallelism need --ep output (convert with --ep "
                f"{layer.moe_config.moe_parallel_config.ep_size}); or reload kernel-format tensors"
            )
        names = KERNEL + (RAW_CT if isinstance(method, TrtllmCompressedTensorsMoE) else ())
        live.update({f"{prefix}.{n}": getattr(layer, n).data for n in names})
        if isinstance(method, TrtllmModelOptMoE):
            maxima[prefix] = (float(layer.w13_input_scale[0]), float(layer.w2_input_scale[0]))
    if len(parts) > 1:
        raise EngineRefusalError("plugin layers of one model read different rank parts; this cannot happen with one descriptor")
    # transformers-5 stacked experts (gate_up_proj [E, 2I, H], ...) as per-expert views first: the input scales
    # below are added per expert
    rank = next(iter(parts)) if parts else None
    named_tensors, labels = expand_for_layout(named_tensors, layout, ignore_unknown, rank)
    _check_gate_up(named_tensors, layout)
    named_tensors = _with_vllm_input_scales(named_tensors, layout, maxima)
    with named_as_sent(labels):
        report = update_live_(live, named_tensors, layout, rank=rank,
                              input_scale_maxima=maxima, ignore_unknown=ignore_unknown)  # fmt: skip
    for prefix, done in report.layers.items():
        layer = by_prefix[prefix]
        method = layer.quant_method
        if isinstance(method, TrtllmModelOptMoE):
            rows = torch.tensor(done.scalar_rows, dtype=torch.long)
            if rows.numel():
                layer.w13_weight_scale_2.data.index_copy_(0, rows, done.scalars["g1_alphas"].to(torch.float32))
                layer.w2_weight_scale_2.data.index_copy_(0, rows, done.scalars["g2_alphas"].to(torch.float32))
            a1, a2 = done.input_scale_maxima
            layer.w13_input_scale.data.fill_(a1)  # a float32 value as a Python float: exact
            layer.w2_input_scale.data.fill_(a2)
        else:
            method.derive_scalars_(layer)
        method.refresh_derived_(layer)
    return report


_DENSE = re.compile(r"^(?P<prefix>.+\.experts)\.(?P<expert>\d+)\.(?P<proj>[A-Za-z0-9_]+)\.weight$")


def _with_vllm_input_scales(
    named_tensors: Mapping[str, torch.Tensor], layout: dict, maxima: Mapping[str, tuple[float, float]]
) -> Mapping[str, torch.Tensor]:
    """Unquantized (bf16) experts keep their input scales, which the update reads from live; vLLM's ModelOpt layer
    keeps only a1/a2 (its ``w13_input_scale`` holds a1 for every expert), so an expert sent without input scales
    gets a1 (gate, up) and a2 (down): what vLLM itself holds for it, and the layer maxima stay as they are."""
    if layout.get("source_format") != "modelopt":
        return named_tensors  # compressed-tensors: the raw input global scales are live, the update reads them
    added: dict[str, torch.Tensor] = {}
    roles = {p: {proj: role for role, proj in info["source_projection_names"].items()} for p, info in layout["layers"].items()}
    for name, t in named_tensors.items():
        m = _DENSE.match(name)
        if m is None or m["prefix"] not in maxima or not t.dtype.is_floating_point or t.dtype == torch.float8_e4m3fn:
            continue
        scale_name = name.removesuffix(".weight") + ".input_scale"
        if scale_name not in named_tensors:
            a1, a2 = maxima[m["prefix"]]
            added[scale_name] = torch.tensor(a2 if roles[m["prefix"]].get(m["proj"]) == "down" else a1, dtype=torch.float32)
    return {**named_tensors, **added} if added else named_tensors


_SCALE = re.compile(r"^(?P<expert>.+\.experts\.\d+)\.(?P<proj>[A-Za-z0-9_]+)\.(?P<kind>weight_scale_2|weight_global_scale)$")


def _check_gate_up(named_tensors: Mapping[str, torch.Tensor], layout: dict) -> None:
    """vLLM keeps one w13 global scale per expert: refuse, before anything is written, an update whose gate and
    up global scales differ (per-expert names; a fused gate_up tensor has one scale by construction)."""
    if layout.get("activation", "swiglu") == "relu2":
        return
    roles: dict[str, str] = {}
    for info in layout["layers"].values():
        for role, proj in info["source_projection_names"].items():
            roles[proj] = role
    seen: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in named_tensors.items():
        m = _SCALE.match(name)
        if m and roles.get(m["proj"]) in ("gate", "up"):
            seen.setdefault(m["expert"], {})[roles[m["proj"]]] = t.to(torch.float32).reshape(())
    for expert, pair in seen.items():
        if len(pair) == 2 and pair["gate"].view(torch.int32) != pair["up"].view(torch.int32):
            raise EngineRefusalError(
                f"{expert}: gate and up global scales differ ({float(pair['gate'])!r} vs {float(pair['up'])!r}); vLLM "
                "keeps one per expert, so this update cannot be served exactly"
            )

"""transformers-5 stacked expert tensors in an update: ``<...>.experts.gate_up_proj`` ``[E, 2I, H]`` and
``<...>.experts.down_proj`` ``[E, H, I]`` (Nemotron-H: ``up_proj`` ``[E, I, H]``), what ``model.state_dict()`` of a
transformers-5 MoE model names, unquantized (bf16/fp16/fp32).

They are expanded into per-expert views under the source checkpoint's per-expert names (the names a producer
writes on disk, which the rest of the update already validates and quantizes): ``t[e, :I]`` is expert e's gate,
``t[e, I:]`` its up, ``down_proj[e]`` its down. Views, no copies. Every family's transformers-5 forward computes
``gate, up = linear(x, gate_up_proj[e]).chunk(2, dim=-1)`` (rows [0:I] are gate; docs/reload.md cites each).

Names: transformers 5 renames some modules in memory (its ``conversion_mapping.py``): Mixtral and MiniMax-M2
``block_sparse_moe`` -> ``mlp``, Nemotron-H ``backbone.`` -> ``model.``, and Qwen3.5-MoE's text-only model drops
``language_model``. A stacked name is taken back to the layout's (on-disk) layer prefix through these renames.

Llama-4 is not handled here: its fused tensors are input-major and share names with ModelOpt's fused NVFP4 export
(``names._parse_name``'s fused path).
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Iterator, Mapping

from ..._lazy import torch
from ...errors import BadTensorError, DuplicateTensorError, InputError, UnknownTensorError
from .names import Context, _check_dense, _parse_name

# family -> transformers-5 in-memory fragment -> on-disk fragment, tried after the name as sent. From
# transformers/conversion_mapping.py: "mixtral" (WeightRenaming(".block_sparse_moe.", ".mlp."), reused for
# minimax_m2), "nemotron_h" (WeightRenaming("backbone.", "model.")), "qwen3_5_text" (PrefixChange(
# prefix_to_remove="language_model", model_prefix="model"), reused for qwen3_5_moe_text).
_RENAMES: dict[str, tuple[tuple[str, str], ...]] = {
    "qwen3_moe": (),
    "qwen2_moe": (),
    "deepseek_v3": (),
    "kimi_k2": (),  # transformers loads it as DeepSeek-V3
    "glm4_moe": (),
    "qwen3_next": (("model.layers.", "model.language_model.layers."),),  # Qwen3.5-MoE's Qwen3_5MoeForCausalLM
    "mixtral": ((".mlp.", ".block_sparse_moe."),),
    "minimax_m2": ((".mlp.", ".block_sparse_moe."),),
    "nemotron_h": (("model.", "backbone."),),
}

_SUFFIXES = (".experts.gate_up_proj", ".experts.down_proj", ".experts.up_proj")
_WEIGHT_KINDS = ("dense", "weight", "weight_scale", "weight_global")  # what a stacked tensor supplies per expert


def families() -> tuple[str, ...]:
    """The families whose transformers-5 stacked expert tensors an update accepts."""
    return tuple(_RENAMES)


def _stacked_names(gated: bool) -> dict[str, tuple[str, ...]]:
    """Stacked parameter name -> the roles it holds, in row order."""
    return {"gate_up_proj": ("gate", "up"), "down_proj": ("down",)} if gated else {"up_proj": ("up",), "down_proj": ("down",)}


def expand(
    ctx: Context, named: Mapping[str, torch.Tensor], ignore_unknown: bool, complete: bool = True
) -> tuple[Mapping[str, torch.Tensor], list[str], dict[str, str]]:
    """``named`` with every transformers-5 stacked expert tensor replaced by per-expert views under the source's
    per-expert names; the stacked names ignored (``ignore_unknown``: layers not in the layout); and, for messages,
    each view's name -> what the trainer sent (``model.layers.3.mlp.experts.gate_up_proj[7, :128]``).

    ``complete``: a layer's stacked tensors must come together (``update_live_``; an ``UpdateStream`` takes them
    in any grouping). Refusals (``InputError`` subclasses, one line, naming the tensor) come before anything is
    written. ``named`` itself is returned when it holds no stacked name (the per-expert path costs nothing more)."""
    renames = _RENAMES.get(ctx.arch.name)
    if renames is None:
        return named, [], {}
    found = [n for n in named if n.endswith(_SUFFIXES)]  # one C call per name: this runs on every update
    if not found:
        return named, [], {}
    out: dict[str, torch.Tensor] = {}
    labels: dict[str, str] = {}
    ignored: list[str] = []
    by_layer: dict[str, dict[str, str]] = {}  # layer prefix -> stacked parameter -> name sent
    for name in found:
        module, _, param = name.rpartition(".")
        prefix = _layer_prefix(ctx, module, renames)
        kinds = _stacked_names(_gated(ctx, prefix)) if prefix is not None else {}
        if param not in kinds:
            if ignore_unknown:
                ignored.append(name)
                continue
            where = f"{prefix} is a {'gated' if _gated(ctx, prefix) else 'non-gated'} layer" if prefix else \
                f"{module} (or its on-disk spelling) is no MoE layer of the layout"  # fmt: skip
            raise UnknownTensorError(f"{name}: a transformers-5 stacked expert tensor, but {where} ({ctx.arch.name} naming); "
                                     "pass only expert tensors of the layout's layers (or ignore_unknown=True)")  # fmt: skip
        other = by_layer.setdefault(prefix, {}).get(param)
        if other is not None:
            raise DuplicateTensorError(f"{other} and {name}: two names for {prefix} {param}; send each tensor once")
        by_layer[prefix][param] = name
        _views(ctx, prefix, name, kinds[param], named[name], out, labels)
    _check_unmixed(ctx, named, found, by_layer)
    if complete:
        for prefix, sent in by_layer.items():
            want = _stacked_names(_gated(ctx, prefix))
            missing = [p for p in want if p not in sent]
            if missing:
                have = next(iter(sent.values()))
                raise InputError(f"{have}: sent without {have.rpartition('.')[0]}.{missing[0]}; an update of stacked (transformers-5) "
                                 "experts sends every stacked projection of the layer (an UpdateStream takes them one call at a time)")  # fmt: skip
    sent_stacked = set(found)
    rest = {n: t for n, t in named.items() if n not in sent_stacked}
    return {**rest, **out}, ignored, labels


def _layer_prefix(ctx: Context, module: str, renames: tuple[tuple[str, str], ...]) -> str | None:
    """The layout's layer prefix for a transformers-5 experts module: as sent, else through the family's renames."""
    if module in ctx.targets:
        return module
    for mem, disk in renames:
        if mem.startswith("."):  # a module inside each layer
            cand = module.replace(mem, disk, 1)
        elif module.startswith(mem):  # the model's prefix
            cand = disk + module[len(mem) :]
        else:
            continue
        if cand in ctx.targets:
            return cand
    return None


def _gated(ctx: Context, prefix: str) -> bool:
    return "gate" in ctx.targets[prefix].info.roles


def _views(ctx: Context, prefix: str, name: str, roles: tuple[str, ...], t, out: dict, labels: dict) -> None:
    """Per-expert views of one stacked tensor, checked whole first (dtype, shape, number of experts)."""
    _check_dense(name, t)
    info = ctx.targets[prefix].info
    if t.dtype == torch.uint8:
        raise BadTensorError(f"{name}: is uint8 (packed NVFP4?); no producer writes stacked NVFP4 experts under transformers-5 "
                             "names: send the unquantized weight (bfloat16, float16, float32) or per-expert NVFP4 tensors")  # fmt: skip
    if t.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise BadTensorError(f"{name}: is {t.dtype}; a stacked expert weight is bfloat16, float16 or float32 (unquantized)")
    e, h, i = info.num_experts, info.hidden_size, info.intermediate_size
    rows, cols = (len(roles) * i, h) if roles[0] != "down" else (h, i)
    if tuple(t.shape) != (e, rows, cols):
        hint = "; it holds every expert of the layer (send the whole parameter, not an expert-parallel shard)" \
            if t.dim() == 3 and tuple(t.shape[1:]) == (rows, cols) else f" ({', '.join(roles)} of each expert, out x in)"  # fmt: skip
        raise BadTensorError(f"{name}: is {list(t.shape)}; {prefix} wants [{e}, {rows}, {cols}]{hint}")
    if t.requires_grad:
        t = t.detach()  # a trainer's parameter: only its bytes are read
    for expert, one in enumerate(t.unbind(0)):
        for k, role in enumerate(roles):
            view = one[k * i : (k + 1) * i] if len(roles) > 1 else one
            per_expert = f"{prefix}.{expert}.{info.proj_names[role]}.weight"
            out[per_expert] = view
            labels[per_expert] = f"{name}[{expert}, {k * i}:{(k + 1) * i}]" if len(roles) > 1 else f"{name}[{expert}]"


def _check_unmixed(ctx: Context, named: Mapping[str, torch.Tensor], found: list[str], by_layer: dict[str, dict[str, str]]) -> None:
    """A layer sent stacked takes no per-expert weight of any expert in the same update: two sources for one
    expert (per-expert input scales are fine: a stacked tensor has none)."""
    stacked = set(found)
    arch, fmt = ctx.arch.name, ctx.fmt.name
    for name in named:
        if name in stacked:
            continue
        hit = _parse_name(arch, fmt, name)
        if hit is None or hit[0] not in by_layer or hit[1] is None or hit[3] not in _WEIGHT_KINDS:
            continue
        sent = by_layer[hit[0]]
        other = sent.get("down_proj") if hit[2] == "down" else next((v for k, v in sent.items() if k != "down_proj"), None)
        other = other or next(iter(sent.values()))
        raise DuplicateTensorError(f"{name} and {other}: expert {hit[1]} of {hit[0]} sent both per-expert and stacked "
                                   "(transformers-5); send one form per layer and update")  # fmt: skip


@contextmanager
def named_as_sent(labels: Mapping[str, str]) -> Iterator[None]:
    """Refusals raised inside name the stacked tensor a view came from (``...gate_up_proj[7, 0:128]``), not the
    per-expert name the trainer never sent. Same exception class, still one line."""
    try:
        yield
    except InputError as exc:
        if not labels:
            raise
        text = str(exc)
        hits = [n for n in labels if n in text]
        if not hits:
            raise
        pattern = re.compile("|".join(re.escape(n) for n in sorted(hits, key=len, reverse=True)) + r"(?![\w.])")
        raise type(exc)(pattern.sub(lambda m: labels[m.group(0)], text)) from None


def expand_for_layout(
    named: Mapping[str, torch.Tensor], layout: dict, ignore_unknown: bool = False, rank: int | None = None,
) -> tuple[Mapping[str, torch.Tensor], dict[str, str]]:  # fmt: skip
    """:func:`expand` for a caller that holds a layout descriptor, not a Context (engine plugins that rewrite
    per-expert names before ``update_live_``): (expanded tensors, view name -> name sent). Stacked names of layers
    outside the layout stay in the mapping (``update_live_`` ignores or refuses them)."""
    ctx = Context(layout, rank)  # rank-sharded layouts need the rank the live tensors belong to
    out, ignored, labels = expand(ctx, named, ignore_unknown)
    if ignored:
        out = {**out, **{n: named[n] for n in ignored}}
    return out, labels

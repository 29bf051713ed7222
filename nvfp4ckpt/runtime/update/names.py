"""Parsing source names: which layer, expert, projection and kind a trainer's tensor is, under the descriptor's
architecture and source format; grouping an update by layer."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Mapping

from ..._lazy import torch
from ...errors import BadTensorError, DuplicateTensorError, InputError, UnknownTensorError
from ...layouts.trtllm_gen.descriptor import LayerInfo
from ...layouts.trtllm_gen.ranks import RankSpec
from ...quant import GROUP_SIZE
from ...source import architectures
from ...source.checkpoint import _match_fused
from ...source.formats import FORMATS

KINDS = ("weight", "weight_scale", "weight_global", "input_global")  # a projection's four source tensors

SCALAR_KINDS = ("weight_global", "input_global")

DEPENDENT = ("g1_alphas", "g1_scale_c", "g2_alphas", "w13_input_scale_quant")  # functions of a1/a2 and weight_scale_2

_FUSED_ROLES = {"gate_up": ("gate", "up"), "down": ("down",)}

_INPUT_SCALE_NAMES = ("w13_input_scale", "w2_input_scale", "w13_input_global_scale", "w2_input_global_scale")


@dataclass(frozen=True)
class Target:
    """One MoE layer as this rank holds it."""

    info: LayerInfo
    rank: RankSpec | None

    @property
    def e0(self) -> int:
        return self.rank.expert_start if self.rank else 0

    @property
    def e1(self) -> int:
        return self.rank.expert_end if self.rank else self.info.num_experts

    @property
    def i0(self) -> int:
        return self.rank.inter_start if self.rank else 0

    @property
    def i1(self) -> int:
        return self.rank.inter_end if self.rank else self.info.intermediate_size

    @property
    def i_pad(self) -> int:
        return self.rank.intermediate_padded if self.rank else self.info.intermediate_padded

    @property
    def n_local(self) -> int:
        return self.e1 - self.e0


class Context:
    """The descriptor's view of source names: format, architecture, layers (and this rank's share of each)."""

    def __init__(self, layout: dict, rank: int | None) -> None:
        if not isinstance(layout, dict) or "layers" not in layout or "source_format" not in layout:
            raise InputError("layout: not a moe_kernel_layout descriptor (config['quantization_config']['moe_kernel_layout'])")
        fmt_cls = FORMATS.get(layout["source_format"])
        if fmt_cls is None:
            raise InputError(f"layout: unknown source_format {layout['source_format']!r}")
        self.fmt = fmt_cls(config_path=Path("config.json"), group_size=GROUP_SIZE)
        self.arch = architectures.get(layout["architecture"])
        parallel = layout.get("parallel") or {}
        gated = layout.get("activation", "swiglu") != "relu2"
        tp = int(parallel.get("tp", 1))
        self.targets: dict[str, Target] = {}
        for prefix, entry in layout["layers"].items():
            info = LayerInfo.from_dict(prefix, entry, gated, tp)
            self.targets[prefix] = Target(info, info.rank_spec(rank, "layout"))
        # bound once: parse() runs once per source tensor of every update
        self._names = (self.arch.name, self.fmt.name)
        self._roles = {prefix: t.info.roles for prefix, t in self.targets.items()}

    def parse(self, name: str) -> tuple[str, int | None, str, str] | None:
        """(layer prefix, expert or None for fused, role, kind), or None when ``name`` is no expert tensor."""
        hit = _parse_name(*self._names, name)
        if hit is None or hit[0] not in self._roles:
            return None
        if hit[1] is not None and hit[2] not in self._roles[hit[0]]:
            return None
        return hit

    def group(self, named: Mapping[str, torch.Tensor], ignore_unknown: bool) -> tuple[dict[str, dict], list[str]]:
        """Source tensors by layer: ``{"experts": {e: {role: {kind: t}}}, "fused": {role: {kind: t}}}``."""
        grouped: dict[str, dict] = {}
        ignored: list[str] = []
        targets = self.targets
        for name, tensor in named.items():
            hit = self.parse(name)
            if hit is None and self._fused_elsewhere(name):
                raise UnknownTensorError(
                    f"{name}: a fused Llama-4 expert tensor, but this layout's source is {self.fmt.name}, which has no "
                    "fused form (only ModelOpt exports experts.gate_up_proj/down_proj); send per-expert weights "
                    "(experts.N.gate_proj.weight = gate_up_proj[N, :, :I].T, up_proj = [N, :, I:].T, down_proj = down_proj[N].T)"
                )  # fmt: skip
            if hit is None:
                if ignore_unknown:
                    ignored.append(name)
                    continue
                suffixes = ", ".join(self.fmt.suffixes.values())
                raise UnknownTensorError(
                    f"{name}: not an expert tensor of any MoE layer in the layout ({self.arch.name} naming, "
                    f"{self.fmt.name} suffixes {suffixes}); pass only expert tensors (or ignore_unknown=True)"
                )
            _check_dense(name, tensor)
            if tensor.requires_grad:
                tensor = tensor.detach()  # a trainer's parameters: only their bytes are read
            prefix, expert, role, kind = hit
            if kind in ("weight", "dense"):
                kind = _weight_kind(name, tensor, kind, expert)
            layer = grouped.get(prefix)  # (get, then create: setdefault would build the empty dicts per tensor)
            if layer is None:
                layer = grouped[prefix] = {"experts": {}, "fused": {}, "names": {}}
            names = layer["names"]
            key = (expert, role, kind)
            other = names.get(key)
            if other is not None:
                what = f"expert {expert} {role} {kind}" if expert is not None else f"fused {role} {kind}"
                raise DuplicateTensorError(f"{other} and {name}: two names for {prefix} {what}; send each tensor once")
            if expert is None:
                layer["fused"].setdefault(role, {})[kind] = tensor
            else:
                if expert >= targets[prefix].info.num_experts:
                    raise UnknownTensorError(f"{name}: expert {expert} but {prefix} has {targets[prefix].info.num_experts} experts")
                by_role = layer["experts"].get(expert)
                if by_role is None:
                    by_role = layer["experts"][expert] = {}
                kinds = by_role.get(role)
                if kinds is None:
                    kinds = by_role[role] = {}
                kinds[kind] = tensor
            names[key] = name
        return grouped, ignored

    def _fused_elsewhere(self, name: str) -> bool:
        """A fused expert tensor name (ModelOpt's Llama-4 form) of a layer here, under a format without that form."""
        if not self.arch.fused_prefix_pattern or self.fmt.fused_projections:
            return False
        module, _, suffix = name.rpartition(".")
        return module in self.targets and suffix in FORMATS["modelopt"].fused_projections

    def source_name(self, prefix: str, expert: int, role: str, kind: str) -> str:
        info = self.targets[prefix].info
        proj = info.proj_names.get(role, role) if not info.source_fused else _default_proj(self.arch, role)
        return f"{prefix}.{expert}.{proj}.{self.fmt.suffixes[kind]}"



# Larger than a whole model's expert tensor names (Qwen3-30B-A3B: 73,728; DeepSeek-V3: 178,176; Kimi-K2: 276,480):
# an RL run sends the same names every step in the same order, and an LRU cache smaller than that set misses on
# every lookup (each name is evicted just before it comes round again). About 300 bytes an entry.
@lru_cache(maxsize=1 << 19)
def _parse_name(arch_name: str, fmt_name: str, name: str) -> tuple[str, int | None, str, str] | None:
    """A source name as (module prefix, expert or None for fused, role, kind) under an architecture's naming and a
    format's suffixes (cached: an RL run sends the same names every step)."""
    arch, fmt = architectures.get(arch_name), FORMATS[fmt_name]
    module, _, suffix = name.rpartition(".")
    if arch.fused_prefix_pattern and fmt.fused_projections:
        fused = _match_fused(fmt, re.compile(arch.fused_prefix_pattern), module, suffix)
        if fused is not None:
            return module, None, fused[0], fused[1]
    # "weight" is also the unquantized weight's suffix: ModelOpt's packed weight shares it (told apart by dtype in
    # group()), compressed-tensors packs into "weight_packed"
    kind = {"weight": "dense", fmt.weight_suffix: "weight", fmt.weight_scale_suffix: "weight_scale",
            fmt.weight_global_suffix: "weight_global", fmt.input_global_suffix: "input_global"}.get(suffix)  # fmt: skip
    hit = arch.match_expert(module)
    if hit is None or kind is None:
        return None
    return hit[0], hit[1], hit[2], kind

def _default_proj(arch: architectures.Architecture, role: str) -> str:
    return next(p for p, r in arch.projections.items() if r == role)

def _few(names: list[str], limit: int = 3) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _check_dense(name: str, t) -> None:
    """Refuse what an update cannot read as plain bytes, before anything is written: not a tensor, a DTensor (FSDP2's
    sharded parameters: gathering is a collective the caller must run on every rank, so it is not done here), other
    wrapper subclasses, sparse, nested or quantized tensors, and tensors without storage (the meta device)."""
    kind = type(t)
    if kind is not _tensor_type():  # subclasses: nn.Parameter is fine, wrappers (DTensor, ...) hold no bytes of their own
        if not isinstance(t, _tensor_type()):
            raise BadTensorError(f"{name}: is a {kind.__name__}, not a torch.Tensor")
        if kind.__name__ == "DTensor":
            raise BadTensorError(f"{name}: is a DTensor (sharded, e.g. by FSDP2); send t.full_tensor() (a collective: call it on every rank)")
        if _is_wrapper(t):
            raise BadTensorError(f"{name}: is a {kind.__name__} (a tensor subclass whose bytes are not its own); send a plain torch.Tensor")
    if t.layout is not _STRIDED[0] or t.is_nested or t.is_quantized:
        layout = "nested" if t.is_nested else "quantized" if t.is_quantized else str(t.layout).removeprefix("torch.")
        raise BadTensorError(f"{name}: is a {layout} tensor; send a dense one (t.to_dense() or t.dequantize())")
    if t.is_meta:
        raise BadTensorError(f"{name}: is on the meta device (it has no data); send the materialized tensor")


_STRIDED: list = []


def _tensor_type():
    """torch.Tensor (and torch.strided) bound once: these checks run once per source tensor."""
    if not _STRIDED:
        _STRIDED.append(torch.strided)
        _STRIDED.append(torch.Tensor)
    return _STRIDED[1]


def _is_wrapper(t) -> bool:
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass  # noqa: PLC0415

    return is_traceable_wrapper_subclass(t)


_FLOATS: list = []


def _weight_kind(name: str, t, kind: str, expert: int | None) -> str:
    """"dense" for an unquantized (bf16/fp16/fp32) weight, "weight" for a packed one; refuse what is neither."""
    if not _FLOATS:
        _FLOATS.extend((torch.bfloat16, torch.float16, torch.float32))
    if t.dtype in _FLOATS:  # fused (expert None): ModelOpt's Llama-4 gate_up_proj/down_proj, quantized per tensor
        return "dense"
    if kind == "dense" or t.dtype != torch.uint8:
        raise BadTensorError(f"{name}: is {t.dtype}; an expert weight is uint8 (packed NVFP4) or bfloat16, float16, float32 (unquantized)")
    return kind

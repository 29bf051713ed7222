"""The layout descriptor: what a converted checkpoint says about itself.

It sits in ``config.json["quantization_config"]["moe_kernel_layout"]`` and, JSON-encoded, in every
output safetensors header's metadata under ``nvfp4ckpt``. Readers must check ``layout`` and
``layout_version`` before trusting the bytes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from ... import __version__
from ...source.architectures import expert_roles
from ...source.formats import DESCRIPTOR_KEY, FORMATS
from ...io.json_input import Fields
from ...errors import InputError
from ...quant import GROUP_SIZE
from .transform import EPILOGUE_TILE_M, LAYOUT_NAME, LAYOUT_VERSION
from .ranks import RankSpec

METADATA_KEY = "nvfp4ckpt"

# Canonical per-layer tensor names (relative to the expert prefix P), in write order.
KERNEL_TENSORS = ("w13_weight", "w13_weight_scale", "w2_weight", "w2_weight_scale")
SCALAR_TENSORS = (
    "w13_weight_scale_2",  # [E, 2] col 0 = gate, col 1 = up (dequant multipliers); non-gated [E, 1] up
    "w2_weight_scale_2",  # [E]
    "w13_input_scale",  # [E, 2] col 0 = gate, col 1 = up; non-gated [E, 1] up
    "w2_input_scale",  # [E]
    "g1_alphas",  # [E] a1 * ws2_gate (non-gated: ws2_up) -> output1_scale_gate_scalar
    "g1_scale_c",  # [E] (1/a2) * (a1 * ws2_up) -> output1_scale_scalar
    "g2_alphas",  # [E] a2 * ws2_down      -> output2_scale_scalar
    "w13_input_scale_quant",  # [1] 1/a1 -> fp4_quantize global scale for hidden states
)


def canonical_names(source_format: str) -> list[str]:
    """One layer's canonical tensor names (relative to the expert prefix) in write order: kernel tensors, scalars,
    then the raw stored global scales the source format keeps (``QuantFormat.raw_scalar_names``)."""
    return list(KERNEL_TENSORS + SCALAR_TENSORS + FORMATS[source_format].raw_scalar_names)


def canonical_specs(
    prefix: str, num_experts: int, hidden: int, inter: int, source_format: str, scalar_dtype: str, gated: bool = True
) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, safetensors dtype, shape) of one layer's output tensors, in write order."""
    e, h, i = num_experts, hidden, inter
    n = 2 if gated else 1  # w13 halves: [up ; gate] or [up]
    shapes: dict[str, tuple[str, tuple[int, ...]]] = {
        "w13_weight": ("U8", (e, n * i, h // 2)),
        "w13_weight_scale": ("F8_E4M3", (e, n * i, h // 16)),
        "w2_weight": ("U8", (e, h, i // 2)),
        "w2_weight_scale": ("F8_E4M3", (e, h, i // 16)),
        "w13_weight_scale_2": ("F32", (e, n)),
        "w2_weight_scale_2": ("F32", (e,)),
        "w13_input_scale": ("F32", (e, n)),
        "w2_input_scale": ("F32", (e,)),
        "g1_alphas": ("F32", (e,)),
        "g1_scale_c": ("F32", (e,)),
        "g2_alphas": ("F32", (e,)),
        "w13_input_scale_quant": ("F32", (1,)),
        "w13_weight_global_scale": (scalar_dtype, (e, n)),
        "w2_weight_global_scale": (scalar_dtype, (e,)),
        "w13_input_global_scale": (scalar_dtype, (e, n)),
        "w2_input_global_scale": (scalar_dtype, (e,)),
    }
    return [(f"{prefix}.{n}", *shapes[n]) for n in canonical_names(source_format)]


@dataclass(frozen=True)
class LayerInfo:
    """One MoE layer as the descriptor records it: written by ``convert``, read back by ``open_converted``."""

    prefix: str
    num_experts: int
    hidden_size: int
    intermediate_size: int
    proj_names: dict[str, str]  # role -> source projection name (revert writes these names back)
    scalar_dtype: str
    scalar_shape: tuple[int, ...]
    hidden_padded: int  # stored sizes (padded where the kernel needs it)
    intermediate_padded: int
    source_fused: str | None = None  # "bmm": the source stored all experts in one input-major tensor per projection
    gated: bool = True  # w13 = [up ; gate] (SwiGLU) or [up] (relu2); checkpoint-wide, from the descriptor's activation
    ranks: tuple[RankSpec, ...] = ()  # rank-sharded output only

    @property
    def roles(self) -> tuple[str, ...]:
        return expert_roles(self.gated)

    @property
    def padded(self) -> bool:
        return (self.hidden_padded, self.intermediate_padded) != (self.hidden_size, self.intermediate_size)

    def tensor_names(self, source_format: str) -> list[str]:
        return [f"{self.prefix}.{n}" for n in canonical_names(source_format)]

    def rank_spec(self, rank: int | None, where: str) -> RankSpec | None:
        """The ``--tp/--ep`` rank a reader asked for (None for whole output), or a one-line error naming ``where``."""
        if not self.ranks:
            if rank not in (None, 0):
                raise InputError(f"{where}: not rank-sharded; there is no rank {rank}")
            return None
        if rank is None:
            raise InputError(f"{where}: rank-sharded checkpoint ({len(self.ranks)} ranks); pass rank=0..{len(self.ranks) - 1}")
        matches = [r for r in self.ranks if r.rank == rank]
        if not matches:
            raise InputError(f"{where}: no rank {rank}; ranks are 0..{len(self.ranks) - 1}")
        return matches[0]

    def to_dict(self) -> dict:
        """The descriptor's ``layers[prefix]`` entry (ranks are added by the writer of rank-sharded output)."""
        fused = {"source_fused": self.source_fused} if self.source_fused else {}
        return {
            **fused,
            "num_experts": self.num_experts,
            "hidden_size": self.hidden_size,
            "hidden_size_padded": self.hidden_padded,
            "intermediate_size": self.intermediate_size,
            "intermediate_size_padded": self.intermediate_padded,
            "source_projection_names": self.proj_names,
            "source_scalar_dtype": self.scalar_dtype,
            "source_scalar_shape": list(self.scalar_shape),
        }

    @classmethod
    def from_dict(cls, prefix: str, info: "dict | Fields", gated: bool = True, tp: int = 1) -> "LayerInfo":
        """A descriptor's ``layers[prefix]`` entry, every field type- and range-checked (``BadFieldError``)."""
        f = info if isinstance(info, Fields) else Fields(info, "descriptor", f"layers.{prefix}")
        num_experts = f.int("num_experts", lo=1, hi=_MAX_EXPERTS)
        hidden = f.int("hidden_size", lo=1, hi=_MAX_DIM)
        inter = f.int("intermediate_size", lo=1, hi=_MAX_DIM)
        proj_names = f.str_map("source_projection_names")
        wanted = set(expert_roles(gated))
        if set(proj_names) != wanted or not all(_PROJ_NAME.fullmatch(v) for v in proj_names.values()):
            f.fail("source_projection_names", proj_names, f"an object mapping {', '.join(sorted(wanted))} to module names")
        ranks = []
        for i, value in enumerate(f.list("ranks", [])):
            r = Fields(value, f.where, f"{f.name('ranks')}[{i}]")
            rank = r.int("rank", lo=0, hi=_MAX_EXPERTS)
            e0, e1 = r.int_list("experts", length=2)
            i0, i1 = r.int_list("intermediate", length=2)
            if not (e0 < e1 <= num_experts and i0 < i1 <= inter):
                r.fail(None, value, f"expert and intermediate ranges inside [0, {num_experts}) and [0, {inter})")
            ranks.append(RankSpec(rank, rank % tp, rank // tp, e0, e1, i0, i1, gated))
        return cls(
            prefix=prefix,
            num_experts=num_experts,
            hidden_size=hidden,
            intermediate_size=inter,
            proj_names=proj_names,
            scalar_dtype=f.str("source_scalar_dtype", choices=("F32", "BF16", "F16")),
            scalar_shape=tuple(f.int_list("source_scalar_shape", lo=1)),
            hidden_padded=f.int("hidden_size_padded", hidden, lo=hidden, hi=_MAX_DIM),
            intermediate_padded=f.int("intermediate_size_padded", inter, lo=inter, hi=_MAX_DIM),
            source_fused=f.str("source_fused", None, choices=("bmm",)),
            gated=gated,
            ranks=tuple(ranks),
        )


_MAX_EXPERTS = 1 << 16
_MAX_DIM = 1 << 24
_PROJ_NAME = re.compile(r"[A-Za-z0-9_]{1,64}")


def build_descriptor(
    *,
    source_format: str,
    architecture: str,
    routing: dict,
    layers: list[LayerInfo],
    config_had_quantization_config: bool,
    activation: str = "silu",
) -> dict:
    gated = activation != "relu2"
    hidden = sorted({l.hidden_size for l in layers})
    inter = sorted({l.intermediate_size for l in layers})
    hidden_p = sorted({l.hidden_padded for l in layers})
    inter_p = sorted({l.intermediate_padded for l in layers})
    return {
        "layout": LAYOUT_NAME,
        "layout_version": LAYOUT_VERSION,
        "kernel": "flashinfer.fused_moe.trtllm_fp4_block_scale_moe",
        "epilogue_tile_m": EPILOGUE_TILE_M,
        "activation": "swiglu" if gated else activation,
        "w13_order": "up_gate" if gated else "up",
        "gated_act_row_interleave": gated,
        "scale_swizzle": "128x4",
        "scale_group_size": GROUP_SIZE,
        "scalar_convention": "modelopt_dequant",
        "w13_scalar_columns": ["gate", "up"] if gated else ["up"],
        "hidden_size": hidden[0] if len(hidden) == 1 else hidden,
        "hidden_size_padded": hidden_p[0] if len(hidden_p) == 1 else hidden_p,
        "intermediate_size": inter[0] if len(inter) == 1 else inter,
        "intermediate_size_padded": inter_p[0] if len(inter_p) == 1 else inter_p,
        "padding": (
            "zero rows/columns per gate/up half (I, to 64) and on the hidden dimension (H, to 128); padded values contribute 0"
            if gated
            else "zero rows/columns of up (I, to 128) and on the hidden dimension (H, to 128); padded values contribute 0"
        ),
        "source_format": source_format,
        "architecture": architecture,
        "routing": routing,
        "layers": {l.prefix: l.to_dict() for l in layers},
        "config_had_quantization_config": config_had_quantization_config,
        "tool": "nvfp4ckpt",
        "tool_version": __version__,
    }


def header_metadata(descriptor: dict) -> dict[str, str]:
    return {"format": "pt", METADATA_KEY: json.dumps(descriptor, sort_keys=True, separators=(",", ":"))}


def descriptor_from_config(config: dict) -> dict | None:
    qcfg = config.get("quantization_config")
    if isinstance(qcfg, dict) and isinstance(qcfg.get(DESCRIPTOR_KEY), dict):
        return qcfg[DESCRIPTOR_KEY]
    return None

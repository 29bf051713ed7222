"""One source MoE layer -> its TRT-LLM-gen output tensors (whole or per rank), and the checkpoint's descriptor."""

from __future__ import annotations

from ..._lazy import torch
from ...io import Array
from ...source.checkpoint import SourceCheckpoint, SourceMoELayer
from ...source.stacked import read_layer_source
from .descriptor import LayerInfo, build_descriptor
from .fast_path import convert_layer_fast, has_fast_path
from .ranks import RankSpec, slice_source, to_kernel
from .scalars import layer_scalars
from .shapes import HIDDEN_ALIGN, padded_dims


def checkpoint_descriptor(
    ckpt: SourceCheckpoint, ranks: dict[str, list[RankSpec]] | None, tp: int, ep: int, pad_hidden: int = HIDDEN_ALIGN
) -> dict:
    infos = [
        LayerInfo(
            l.prefix, l.num_experts, l.hidden_size, l.intermediate_size, l.proj_names, l.scalar_dtype,
            tuple(l.scalar_shape), *padded_dims(l, pad_hidden), "bmm" if l.fused else None,
        )  # fmt: skip
        for l in ckpt.layers
    ]
    descriptor = build_descriptor(
        source_format=ckpt.format.name,
        architecture=ckpt.arch.name,
        routing=ckpt.routing.to_dict(),
        layers=infos,
        config_had_quantization_config=isinstance(ckpt.config.get("quantization_config"), dict),
        activation=ckpt.arch.activation,
    )
    if pad_hidden != HIDDEN_ALIGN:
        descriptor["padding"] = descriptor["padding"].replace("(H, to 128)", f"(H, to {pad_hidden})")
    if ranks:
        first = next(iter(ranks.values()))
        descriptor["parallel"] = {
            "tp": tp,
            "ep": ep,
            "rank_order": "rank = ep_rank * tp + tp_rank",
            "ranks": [{"rank": r.rank, "tp_rank": r.tp_rank, "ep_rank": r.ep_rank, "part": r.part} for r in first],
            "non_expert_tensors": "top-level files, whole (engines slice them as usual)",
        }
        for prefix, specs in ranks.items():
            descriptor["layers"][prefix]["ranks"] = [
                {
                    "rank": r.rank,
                    "experts": [r.expert_start, r.expert_end],
                    "intermediate": [r.inter_start, r.inter_end],
                    "intermediate_size_padded": r.intermediate_padded,
                }
                for r in specs
            ]
    return descriptor


def on_cpu(device: str) -> bool:
    return device.split(":")[0] == "cpu"


def convert_layer_ranks(
    ckpt: SourceCheckpoint, layer: SourceMoELayer, ranks: list[RankSpec], device: str = "cpu", pad_hidden: int = HIDDEN_ALIGN
) -> dict[str, torch.Tensor]:
    """Every rank's output tensors of one MoE layer (the source layer is read once), keyed by
    ``part/name``. Scalars use the global a1/a2 and are sliced to each rank's experts."""
    src = read_layer_source(ckpt, layer)
    dev = torch.device(device)
    h_pad, _ = padded_dims(layer, pad_hidden)
    scalars = layer_scalars(ckpt, layer, src["raw_scalars"])
    out: dict[str, torch.Tensor] = {}
    for r in ranks:
        pieces = (t.to(dev) for t in slice_source(src, r, layer.intermediate_size))
        w13, s13, w2, s2 = to_kernel(*pieces, h_pad, r.intermediate_padded, layer.gated)
        tensors = {"w13_weight": w13.cpu(), "w13_weight_scale": s13.cpu(), "w2_weight": w2.cpu(), "w2_weight_scale": s2.cpu()}
        for name, value in scalars.items():
            tensors[name] = value if name == "w13_input_scale_quant" else value[r.expert_start : r.expert_end].contiguous()
        for name, value in tensors.items():
            out[f"{r.part}/{layer.prefix}.{name}"] = value
    return out


def convert_layer(
    ckpt: SourceCheckpoint, layer: SourceMoELayer, device: str = "cpu", pad_hidden: int = HIDDEN_ALIGN
) -> dict[str, Array]:
    """All output tensors of one MoE layer, keyed by full name: their bytes, as the writer takes them.
    On the CPU fast path these are numpy arrays (block scales as raw uint8; torch is not imported),
    otherwise CPU torch tensors of the output dtypes."""
    if on_cpu(device) and has_fast_path(layer, pad_hidden):
        return {f"{layer.prefix}.{k}": v for k, v in convert_layer_fast(ckpt, layer).items()}
    src = read_layer_source(ckpt, layer)
    dev = torch.device(device)
    pieces = (src[k].to(dev) for k in ("w31", "s31", "down", "down_scale"))
    w13, s13, w2, s2 = to_kernel(*pieces, *padded_dims(layer, pad_hidden), gated=layer.gated)
    out = {
        "w13_weight": w13.cpu(),
        "w13_weight_scale": s13.cpu(),
        "w2_weight": w2.cpu(),
        "w2_weight_scale": s2.cpu(),
        **layer_scalars(ckpt, layer, src["raw_scalars"]),
    }
    return {f"{layer.prefix}.{k}": v for k, v in out.items()}

"""A source layer's stored (padded) sizes and its output tensors' names, dtypes and shapes, per rank."""

from __future__ import annotations

from ...io import PlannedTensor
from ...source.checkpoint import SourceMoELayer
from . import transform as layout
from .descriptor import canonical_specs
from .ranks import RankSpec


def padded_dims(layer: SourceMoELayer) -> tuple[int, int]:
    """(H, I) as stored: padded to H % 128 == 0 and I % 64 == 0 where the kernel needs it."""
    dims = layout.MoEDims(layer.num_experts, layer.hidden_size, layer.intermediate_size, layer.gated)
    return dims.hidden_padded, dims.intermediate_padded


def layer_output_specs(layer: SourceMoELayer, source_format: str) -> list[PlannedTensor]:
    """Names, dtypes and shapes of one layer's output tensors, in write order."""
    h_pad, i_pad = padded_dims(layer)
    specs = canonical_specs(layer.prefix, layer.num_experts, h_pad, i_pad, source_format, layer.scalar_dtype, layer.gated)
    return [PlannedTensor(name, dtype, shape) for name, dtype, shape in specs]


def layer_specs(layer: SourceMoELayer, source_format: str, ranks: list[RankSpec] | None = None) -> list[PlannedTensor]:
    """The layer's output tensors in write order: whole, or for each rank (``PlannedTensor.part``) in rank order."""
    if ranks is None:
        return layer_output_specs(layer, source_format)
    h_pad, _ = padded_dims(layer)
    return [
        PlannedTensor(n, dtype, shape, part=r.part)
        for r in ranks
        for n, dtype, shape in canonical_specs(
            layer.prefix, r.num_experts, h_pad, r.intermediate_padded, source_format, layer.scalar_dtype, layer.gated,
        )
    ]

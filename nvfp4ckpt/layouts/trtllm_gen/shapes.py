"""A source layer's stored (padded) sizes and its output tensors' names, dtypes and shapes, per rank."""

from __future__ import annotations

from ...errors import InputError
from ...io import PlannedTensor
from ...source.checkpoint import SourceMoELayer
from . import transform as layout
from .descriptor import canonical_specs
from .ranks import RankSpec


HIDDEN_ALIGN = 128  # the kernel's need (block-scale rows of w2); vLLM pads H to 256 (convert --pad-hidden 256)


def check_pad_hidden(pad_hidden: int) -> None:
    if isinstance(pad_hidden, bool) or not isinstance(pad_hidden, int) or pad_hidden < HIDDEN_ALIGN or pad_hidden % HIDDEN_ALIGN:
        raise InputError(f"--pad-hidden {pad_hidden}: use a multiple of {HIDDEN_ALIGN} (128; 256 for vLLM)")


def padded_dims(layer: SourceMoELayer, pad_hidden: int = HIDDEN_ALIGN) -> tuple[int, int]:
    """(H, I) as stored: H padded to a multiple of ``pad_hidden`` and I to 64 (non-gated: 128) where needed."""
    dims = layout.MoEDims(layer.num_experts, layer.hidden_size, layer.intermediate_size, layer.gated)
    return -(-layer.hidden_size // pad_hidden) * pad_hidden, dims.intermediate_padded


def layer_output_specs(layer: SourceMoELayer, source_format: str, pad_hidden: int = HIDDEN_ALIGN) -> list[PlannedTensor]:
    """Names, dtypes and shapes of one layer's output tensors, in write order."""
    h_pad, i_pad = padded_dims(layer, pad_hidden)
    specs = canonical_specs(layer.prefix, layer.num_experts, h_pad, i_pad, source_format, layer.scalar_dtype, layer.gated)
    return [PlannedTensor(name, dtype, shape) for name, dtype, shape in specs]


def layer_specs(
    layer: SourceMoELayer, source_format: str, ranks: list[RankSpec] | None = None, pad_hidden: int = HIDDEN_ALIGN
) -> list[PlannedTensor]:
    """The layer's output tensors in write order: whole, or for each rank (``PlannedTensor.part``) in rank order."""
    if ranks is None:
        return layer_output_specs(layer, source_format, pad_hidden)
    h_pad, _ = padded_dims(layer, pad_hidden)
    return [
        PlannedTensor(n, dtype, shape, part=r.part)
        for r in ranks
        for n, dtype, shape in canonical_specs(
            layer.prefix, r.num_experts, h_pad, r.intermediate_padded, source_format, layer.scalar_dtype, layer.gated,
        )
    ]

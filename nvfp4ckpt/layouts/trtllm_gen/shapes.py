"""A source layer's stored (padded) sizes and its output tensors' names, dtypes and shapes, per rank."""

from __future__ import annotations

import re

from ...errors import InputError
from ...io import PlannedTensor
from ...source.checkpoint import SourceMoELayer
from . import transform as layout
from .descriptor import canonical_specs
from .ranks import RankSpec


HIDDEN_ALIGN = 128  # the kernel's need (block-scale rows of w2); vLLM pads H to 256 (convert --pad-hidden 256)
# What an engine pads H to: the kernel's 128, vLLM's 256 (trtllm_nvfp4_hidden_alignment), and 512, which vLLM and
# SGLang use for non-gated experts with per-token activation scales. Nothing else is written, so nothing else is
# accepted (verify and revert read the value back from the descriptor's padding text).
PAD_HIDDEN_CHOICES = (128, 256, 512)
_PADDING_TEXT = re.compile(r"\(H, to (\d+)\)")


def check_pad_hidden(pad_hidden: int) -> None:
    if isinstance(pad_hidden, bool) or pad_hidden not in PAD_HIDDEN_CHOICES:
        raise InputError(
            f"--pad-hidden {pad_hidden}: choose 128 (the kernel's need), 256 (vLLM's padding) or 512 (vLLM/SGLang with "
            "per-token activation scales on non-gated experts)"
        )


def pad_hidden_of(descriptor: dict) -> int | None:
    """The ``--pad-hidden`` a converted checkpoint was written with: the ``(H, to N)`` of its descriptor's padding
    text (None when the text names none)."""
    found = _PADDING_TEXT.search(str(descriptor.get("padding", "")))
    return int(found.group(1)) if found else None


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

"""FlashInfer's TRT-LLM-gen fused-MoE layout (``trtllm_fp4_moe``): the layout protocol of ``nvfp4ckpt.layouts``.

- ``transform``: the byte transform both ways (row order, 128x4 scale swizzle, padding), torch and numpy forms.
- ``ranks``: ``--tp/--ep`` rank slicing, and whole source tensors -> kernel tensors (and back).
- ``scalars``: the kernel scalars from a layer's global scales.
- ``shapes``: stored (padded) sizes and each output tensor's name, dtype and shape.
- ``fast_path``: the numpy-only CPU transform of gated, unpadded per-expert layers.
- ``layer``: one source layer -> its output tensors; the checkpoint's descriptor.
- ``descriptor``: canonical tensor names and the on-disk descriptor's schema.
- ``converted``: reading a converted checkpoint back (layers, ranks, reassembly).
"""

from __future__ import annotations

from .converted import ConvertedCheckpoint, open_converted
from .descriptor import header_metadata
from .layer import checkpoint_descriptor, convert_layer, convert_layer_ranks, on_cpu
from .ranks import rank_specs
from .shapes import HIDDEN_ALIGN, PAD_HIDDEN_CHOICES, check_pad_hidden, layer_specs, pad_hidden_of, padded_dims
from .transform import LAYOUT_NAME as NAME
from .transform import LAYOUT_VERSION as VERSION

__all__ = [
    "NAME", "VERSION", "ConvertedCheckpoint", "checkpoint_descriptor", "convert_layer", "convert_layer_ranks",
    "HIDDEN_ALIGN", "PAD_HIDDEN_CHOICES", "check_pad_hidden", "pad_hidden_of", "header_metadata", "layer_specs", "on_cpu", "open_converted", "padded_dims", "rank_specs",
]  # fmt: skip

"""Output layouts: how a converted checkpoint stores its MoE layers, one module (or package) each.

``LAYOUTS`` maps the descriptor's ``layout`` name to the module that owns it. A layout module provides:
``NAME``/``VERSION``; ``rank_specs`` (how ``--tp/--ep`` split a layer); ``layer_specs`` (a layer's output tensors,
planned from headers); ``convert_layer``/``convert_layer_ranks`` (their bytes); ``checkpoint_descriptor`` and
``header_metadata`` (what the output says about itself); ``on_cpu`` (whether a device string is the CPU); and
``open_converted`` (reading an output back). Adding a layout is one module plus its line in ``LAYOUTS``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import InputError

LAYOUTS: dict[str, str] = {
    "trtllm_fp4_moe": "nvfp4ckpt.layouts.trtllm_gen",  # FlashInfer's TRT-LLM-gen fused MoE
}
DEFAULT_LAYOUT = "trtllm_fp4_moe"


def get(name: str) -> ModuleType:
    """The module that owns output layout ``name``."""
    if name not in LAYOUTS:
        raise InputError(f"output layout {name!r} is unknown to nvfp4ckpt; known: {', '.join(LAYOUTS)}")
    return importlib.import_module(LAYOUTS[name])

"""nvfp4ckpt: kernel-ready NVFP4 MoE checkpoints for FlashInfer's TRT-LLM-gen fused MoE.

Library entry points (the CLI is a thin layer over these):

    from nvfp4ckpt import convert_checkpoint, inspect_checkpoint, write_example
"""

from __future__ import annotations

__version__ = "0.1.0"

from .api import convert_checkpoint, inspect_checkpoint, write_example  # noqa: E402

__all__ = ["__version__", "convert_checkpoint", "inspect_checkpoint", "write_example"]

"""nvfp4ckpt: kernel-ready NVFP4 MoE checkpoints for FlashInfer's TRT-LLM-gen fused MoE.

The public verbs (the CLI is a thin layer over these):

    from nvfp4ckpt import convert_checkpoint, revert_checkpoint, inspect_checkpoint, write_example
    from nvfp4ckpt import verify_checkpoint, load_moe_layer

Each is imported on first use (PEP 562), so ``import nvfp4ckpt`` stays cheap and never imports torch;
docs/design.md has the package map.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "convert_checkpoint": ".convert",
    "ConvertResult": ".convert",
    "revert_checkpoint": ".revert",
    "RevertResult": ".revert",
    "inspect_checkpoint": ".inspect",
    "InspectReport": ".inspect",
    "write_example": ".example",
    "ExampleResult": ".example",
    "verify_checkpoint": ".verify",
    "VerifyReport": ".verify",
    "load_moe_layer": ".runtime",
    "MoELayer": ".runtime",
    "Progress": ".progress",
}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:
    from .convert import ConvertResult, convert_checkpoint
    from .example import ExampleResult, write_example
    from .inspect import InspectReport, inspect_checkpoint
    from .progress import Progress
    from .revert import RevertResult, revert_checkpoint
    from .runtime import MoELayer, load_moe_layer
    from .verify import VerifyReport, verify_checkpoint


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'nvfp4ckpt' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))

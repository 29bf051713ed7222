"""The public library surface, re-exported by ``nvfp4ckpt``."""

from __future__ import annotations

from .convert import ConvertResult, Progress, convert_checkpoint
from .example import ExampleResult, write_example
from .inspect import InspectReport, inspect_checkpoint

__all__ = [
    "ConvertResult",
    "ExampleResult",
    "InspectReport",
    "Progress",
    "convert_checkpoint",
    "inspect_checkpoint",
    "write_example",
]

"""How the long-running verbs report progress: one definition of each callback type.

``ProgressFn`` gets ``Progress`` records from the checkpoint writers (convert, revert); ``TickFn`` gets
``(label, done, total)`` from step-wise work (verify's checks, the GSM8K runner). The CLI draws bars from both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass
class Progress:
    """What a checkpoint writer reports as it goes (the CLI draws bars from it)."""

    stage: str  # "plan" | "layer" | "bytes" | "done" | "notice" (a one-line message for the user)
    layers_done: int = 0
    layers_total: int = 0
    bytes_done: int = 0
    bytes_total: int = 0
    message: str = ""


ProgressFn = Callable[[Progress], None]
TickFn = Callable[[str, int, int], None]  # (label, done, total)

"""What an update did (``UpdateReport``, ``LayerUpdate``) and what a check found (``LiveCheck``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..._lazy import torch


@dataclass
class LayerUpdate:
    """What one layer's update did (on this rank)."""

    prefix: str
    experts: list[int]  # global expert ids whose weights were written on this rank
    other_rank_experts: list[int]  # experts in the update held by other ranks (their input scales still count)
    input_scale_maxima: tuple[float, float]  # (a1, a2) after the update
    scalars: dict[str, torch.Tensor]  # DEPENDENT scalars (float32, CPU) of the rows in ``scalar_rows`` (quant: [1])
    scalar_rows: list[int]  # local expert rows the scalars cover (all local experts whenever a1/a2 changed)
    stored: dict[str, torch.Tensor] = field(default_factory=dict)  # per-expert stored scalars of ``experts``, canonical names
    input_scales: dict[int, tuple[float, float]] = field(default_factory=dict)  # every supplied expert: (max w13, w2)
    written: list[str] = field(default_factory=list)  # live tensor names written

@dataclass
class UpdateReport:
    layers: dict[str, LayerUpdate]
    ignored: list[str]  # names skipped with ignore_unknown=True
    bytes_copied: int  # source bytes written into live tensors
    seconds: float

@dataclass
class LiveCheck:
    """Result of ``check_live``: ``ok``, or the first difference found."""

    ok: bool
    message: str
    tensor: str | None = None  # live tensor name
    expert: int | None = None  # global expert id
    row: int | None = None  # row of that expert in the live tensor (kernel order)
    source_tensor: str | None = None
    source_row: int | None = None
    checked_experts: int = 0
    unchecked: list[str] = field(default_factory=list)  # what could not be checked from the given tensors, and why

    def __bool__(self) -> bool:
        return self.ok

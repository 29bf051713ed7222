"""``--device`` parsed once: a torch device that exists here, or a one-line InputError."""

from __future__ import annotations

from .._lazy import torch
from ..errors import InputError


def parse_device(text: str | None, option: str = "--device") -> "torch.device":
    """``None``: cuda when present, else cpu. Anything torch cannot parse, another device type, or a CUDA
    device this machine does not have is refused here (not as a traceback deep in a kernel call)."""
    if text is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise InputError(f"{option} {text!r}: not a device; use cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda") or (dev.type == "cpu" and dev.index not in (None, 0)):
        raise InputError(f"{option} {text!r}: unsupported device; use cpu, cuda or cuda:N")
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise InputError(f"{option} {text}: no CUDA device here; use --device cpu")
        if dev.index is not None and dev.index >= count:
            raise InputError(f"{option} {text}: this machine has {count} CUDA device(s) (cuda:0 to cuda:{count - 1})")
    return dev

"""Compute kernels of nvfp4ckpt.

``triton_moe.moe_forward_triton`` is the project's own fused NVFP4 MoE: it reads expert weights directly in the
TRT-LLM-gen kernel layout written by ``nvfp4ckpt.layout``. Triton is an optional dependency, so nothing is
imported eagerly here: ``from nvfp4ckpt.kernels import moe_forward_triton`` imports Triton on first use.
"""

from __future__ import annotations

__all__ = ["moe_forward_triton", "triton_available"]


def triton_available() -> bool:
    """True when ``import triton`` works (it still needs a GPU or ``TRITON_INTERPRET=1`` to run)."""
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - depends on the environment
        return False
    return True


def __getattr__(name: str):
    if name == "moe_forward_triton":
        from .triton_moe import moe_forward_triton

        return moe_forward_triton
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Compute kernels of nvfp4ckpt.

``triton_moe.moe_forward_triton`` is the project's own fused NVFP4 MoE: it reads expert weights directly in the
TRT-LLM-gen kernel layout written by ``nvfp4ckpt.layouts.trtllm_gen``. Triton is an optional dependency, so nothing is
imported eagerly here: ``from nvfp4ckpt.runtime.kernels import moe_forward_triton`` imports Triton on first use.
"""

from __future__ import annotations

__all__ = ["moe_forward_triton"]


def __getattr__(name: str):
    if name == "moe_forward_triton":
        from .triton_moe import moe_forward_triton

        return moe_forward_triton
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Reference fused NVFP4 MoE (SwiGLU experts) in pure torch, on SOURCE-layout weights.

This is the numerical model of FlashInfer's TRT-LLM-gen ``trtllm_fp4_block_scale_moe`` (shared layout reference,
sections 4 and 6), written for clarity, not speed. It runs on CPU or GPU.

Per layer (H = hidden, I = intermediate, K = top_k):

1. Activations. ``act="nvfp4"``: the hidden states are quantized once, before routing, to NVFP4 with the single
   global scale ``1/a1`` and linear 16-element e4m3 block scales, and dequantized
   (``quant.quantize_activations(x, 1/a1)``). ``act="bf16"`` (W4A16): the hidden states are used as bf16 values.
2. Weights are dequantized exactly: ``e2m1 * e4m3 * weight_scale_2`` (``quant.dequantize``; the e2m1*e4m3
   product is exact, the global multiplier rounds once in fp32).
3. For every routed (token, expert) pair: ``gate = x @ Wg^T``, ``up = x @ Wu^T`` (each dot product computed in
   float64 and rounded once to fp32, see ``_gemm``),
   ``inter = up * silu(gate)`` (non-gated experts, ``gate=None``: ``inter = relu(up)^2``, Nemotron-H's relu2); then ``act="nvfp4"``: ``inter`` is quant-dequantized to NVFP4 with global scale
   ``1/a2`` (the static ``w2`` input scale, not a dynamic amax); ``act="bf16"``: ``inter`` is rounded to bf16.
   ``y = inter @ Wd^T`` (float64, rounded to fp32).
4. Finalize: ``out[t] = sum_k topk_weights[t, k] * y[t, k]``, summed in k order, fp32.

The loop is over experts: the pairs routed to one expert are gathered and go through its GEMMs together.
Expert ids outside ``[0, E)`` (e.g. experts of another EP rank) contribute nothing.

Precision is pinned by the reference itself, whatever the caller's global settings: its GEMMs run in float64
(``_gemm``), which no TF32 or reduced-precision switch touches, so CPU and GPU give the same values (docs/verify.md).
"""

from __future__ import annotations

from .._lazy import torch

from .backends import ACT_MODES
from ..quant import dequantize, quantize_activations

__all__ = ["ACT_MODES", "moe_forward_torch"]



def _gemm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b.T`` correctly rounded to fp32. float64 because fp32 GEMMs follow global switches the reference must
    not inherit: ``torch.backends.cuda.matmul.allow_tf32`` / ``set_float32_matmul_precision`` (TF32 on CUDA, and
    bf16 through oneDNN on AMX CPUs: 2.4e-3 rel-L2 per GEMM here) and ``NVIDIA_TF32_OVERRIDE=1``, which cuBLAS
    reads once at init so no flag can undo it. Flipping the flags around the call instead would not cover the
    latter and would race with the other threads of verify's pool; float64 changes no global state."""
    return (a.double() @ b.double().T).float()


def _scalar(v: torch.Tensor | float) -> float:
    return float(v.item()) if isinstance(v, torch.Tensor) else float(v)


def moe_forward_torch(
    hidden_states: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    gate: torch.Tensor | None,
    up: torch.Tensor,
    down: torch.Tensor,
    gate_scale: torch.Tensor | None,
    up_scale: torch.Tensor,
    down_scale: torch.Tensor,
    ws2_gate: torch.Tensor | None,
    ws2_up: torch.Tensor,
    ws2_down: torch.Tensor,
    a1: float,
    a2: float,
    act: str = "nvfp4",
) -> torch.Tensor:
    """Reference NVFP4 MoE forward. Returns fp32 ``[T, H]``.

    hidden_states: bf16/fp32 ``[T, H]``; topk_ids: int ``[T, K]``; topk_weights: fp32 ``[T, K]``.
    gate/up: uint8 ``[E, I, H/2]``, down: uint8 ``[E, H, I/2]`` (two e2m1 codes per byte, low nibble first).
    gate_scale/up_scale: float8_e4m3fn ``[E, I, H/16]``, down_scale ``[E, H, I/16]`` (linear layout).
    ws2_*: fp32 ``[E]`` (ModelOpt ``weight_scale_2``); a1/a2: the w13/w2 input scales (max over all experts).
    ``gate``, ``gate_scale`` and ``ws2_gate`` are None for non-gated (relu2) experts.
    """
    if act not in ACT_MODES:
        raise ValueError(f"act must be one of {ACT_MODES}, got {act!r}")
    num_tokens, hidden = hidden_states.shape
    num_experts, inter_size, _ = up.shape
    gated = gate is not None
    if topk_ids.shape != topk_weights.shape or topk_ids.shape[0] != num_tokens:
        raise ValueError("topk_ids and topk_weights must both be [T, K]")
    if (gated and up.shape != gate.shape) or down.shape != (num_experts, hidden, inter_size // 2):
        raise ValueError("gate/up must be [E, I, H/2] and down [E, H, I/2]")
    if up.shape[-1] * 2 != hidden:
        raise ValueError(f"up has {up.shape[-1] * 2} inputs, hidden states have {hidden}")
    top_k = topk_ids.shape[1]
    device = hidden_states.device
    a1f, a2f = _scalar(a1), _scalar(a2)

    if act == "nvfp4":
        x = quantize_activations(hidden_states, 1.0 / a1f)
    else:
        x = hidden_states.to(torch.bfloat16).float()

    flat_ids = topk_ids.reshape(-1).to(device=device, dtype=torch.int64)
    y = torch.zeros(num_tokens * top_k, hidden, dtype=torch.float32, device=device)
    for e in torch.unique(flat_ids).tolist():
        if not 0 <= e < num_experts:
            continue
        pairs = torch.nonzero(flat_ids == e).squeeze(1)
        xe = x.index_select(0, pairs // top_k)
        w_up = dequantize(up[e], up_scale[e], ws2_up[e])
        w_down = dequantize(down[e], down_scale[e], ws2_down[e])
        u = _gemm(xe, w_up)
        if gated:
            g = _gemm(xe, dequantize(gate[e], gate_scale[e], ws2_gate[e]))
            inter = u * torch.nn.functional.silu(g)
        else:
            inter = torch.relu(u).square()
        if act == "nvfp4":
            inter = quantize_activations(inter, 1.0 / a2f)
        else:
            inter = inter.to(torch.bfloat16).float()
        y[pairs] = _gemm(inter, w_down)

    weights = topk_weights.to(device=device, dtype=torch.float32)
    y = y.view(num_tokens, top_k, hidden)
    out = torch.zeros(num_tokens, hidden, dtype=torch.float32, device=device)
    for k in range(top_k):  # fixed summation order: k = 0, 1, ...
        out += weights[:, k : k + 1] * y[:, k]
    return out

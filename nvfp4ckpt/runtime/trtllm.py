"""FlashInfer's TRT-LLM-gen fused MoE (SM100/SM103) called on a layer's tensors as stored.

Unexercised on the hardware available to this project: the argument construction is unit-tested on CPU against
the installed FlashInfer's signature.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING

from .._lazy import torch
from ..errors import InputError
from .routing import needs_fp32_logits

if TYPE_CHECKING:
    from .layer import MoELayer


def trtllm_kwargs(
    layer: MoELayer,
    hidden_fp4: torch.Tensor,
    hidden_scale: torch.Tensor,
    router_logits: torch.Tensor,
    signature: inspect.Signature,
) -> dict:
    """Keyword arguments for ``trtllm_fp4_block_scale_moe``, adapted to the installed version's signature.

    Follows SGLang's call (layout reference, section 5): linear hidden-state scales ``[T, H/16]`` e4m3, fp32
    logits for DeepSeekV3 routing, bf16 routing bias, ``output1_scale_scalar = g1_scale_c``,
    ``output1_scale_gate_scalar = g1_alphas``, ``output2_scale_scalar = g2_alphas``, SwiGLU activation.
    """
    from flashinfer.tllm_enums import RoutingMethodType

    t = layer.tensors
    r = layer.routing
    num_tokens = hidden_fp4.shape[0]
    method = RoutingMethodType[r["method"]]
    logits = router_logits.float() if needs_fp32_logits(r["method"]) else router_logits.to(torch.bfloat16)
    bias = layer.routing_bias.to(torch.bfloat16) if layer.routing_bias is not None else None
    kwargs = {
        "routing_logits": logits,
        "routing_bias": bias,
        "hidden_states": hidden_fp4,
        "hidden_states_scale": hidden_scale.view(torch.float8_e4m3fn).reshape(num_tokens, layer.stored_hidden // 16),
        "gemm1_weights": t["w13_weight"],
        "gemm1_weights_scale": t["w13_weight_scale"].view(torch.float8_e4m3fn),
        "gemm1_bias": None,
        "gemm1_alpha": None,
        "gemm1_beta": None,
        "gemm1_clamp_limit": None,
        "gemm2_weights": t["w2_weight"],
        "gemm2_weights_scale": t["w2_weight_scale"].view(torch.float8_e4m3fn),
        "gemm2_bias": None,
        "output1_scale_scalar": t["g1_scale_c"],
        "output1_scale_gate_scalar": t["g1_alphas"],
        "output2_scale_scalar": t["g2_alphas"],
        "num_experts": layer.num_experts,
        "top_k": int(r["top_k"]),
        "n_group": r.get("n_group"),
        "topk_group": r.get("topk_group"),
        "intermediate_size": layer.stored_intermediate,  # the (padded) I the weights were built with
        "local_expert_offset": layer.expert_offset,
        "local_num_experts": layer.num_local_experts,
        "routed_scaling_factor": r.get("routed_scaling_factor"),
        "routing_method_type": int(method),
        "do_finalize": True,
    }
    params = signature.parameters
    if "activation_type" in params:  # FlashInfer >= 0.6.3
        from flashinfer.tllm_enums import ActivationType

        kwargs["activation_type"] = int(ActivationType.Swiglu if layer.gated else ActivationType.Relu2)
    elif "gated_act_type" in params and layer.gated:  # 0.3 .. 0.6.2: GatedActType.SwiGlu == 0
        kwargs["gated_act_type"] = 0
    elif not layer.gated:
        raise InputError("installed FlashInfer's trtllm_fp4_block_scale_moe has no activation_type (needs >= 0.6.3 for relu2)")
    if "tile_tokens_dim" in params:  # removed in 0.6.0; None means automatic from 0.4.1
        kwargs["tile_tokens_dim"] = None
    if "tune_max_num_tokens" in params:
        kwargs["tune_max_num_tokens"] = max(1, 1 << (num_tokens - 1).bit_length())
    unknown = [k for k in kwargs if k not in params]
    if unknown:
        raise InputError(f"installed FlashInfer's trtllm_fp4_block_scale_moe has no argument(s) {unknown}; unsupported version")
    missing = [
        name for name, p in params.items()
        if p.default is inspect.Parameter.empty and p.kind is not inspect.Parameter.VAR_KEYWORD and name not in kwargs
    ]  # fmt: skip
    if missing:
        raise InputError(f"installed FlashInfer's trtllm_fp4_block_scale_moe requires {missing}; unsupported version")
    return kwargs


def run_trtllm(layer: MoELayer, hidden_states: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
    if layer.device.type != "cuda" or torch.cuda.get_device_capability(layer.device)[0] != 10:
        raise InputError("--backend trtllm needs an SM100/SM103 GPU (B200, GB200, B300); use --backend triton here")
    from flashinfer import fp4_quantize
    from flashinfer.fused_moe import trtllm_fp4_block_scale_moe

    hs_fp4, hs_sf = fp4_quantize(
        layer.pad_hidden(hidden_states.to(torch.bfloat16)),
        global_scale=layer.tensors["w13_input_scale_quant"],
        sf_vec_size=16,
        sf_use_ue8m0=False,
        is_sf_swizzled_layout=False,
    )
    kwargs = trtllm_kwargs(layer, hs_fp4, hs_sf, router_logits, inspect.signature(trtllm_fp4_block_scale_moe))
    return trtllm_fp4_block_scale_moe(**kwargs)[0][:, : layer.hidden_size]

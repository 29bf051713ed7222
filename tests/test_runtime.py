"""The runtime API: loading a layer, running the torch backend, TRT-LLM-gen arguments (on CPU)."""

from __future__ import annotations

import inspect

import pytest
import torch

from nvfp4ckpt import convert_checkpoint
from nvfp4ckpt.errors import InputError
from nvfp4ckpt.runtime import load_moe_layer
from nvfp4ckpt.runtime.backends import default_backend
from nvfp4ckpt.runtime.trtllm import trtllm_kwargs


@pytest.fixture(scope="module")
def ds_converted(tmp_path_factory):
    from nvfp4ckpt import write_example

    root = tmp_path_factory.mktemp("rt")
    write_example(root / "src", arch="deepseek_v3", format="modelopt")
    convert_checkpoint(root / "src", root / "dst")
    return root / "dst"


def test_load_by_number_and_prefix(ds_converted):
    a = load_moe_layer(ds_converted, 2)
    b = load_moe_layer(ds_converted, "model.layers.2.mlp.experts")
    assert a.prefix == b.prefix == "model.layers.2.mlp.experts"
    assert a.tensors["w13_weight"].shape == (8, 256, 128)
    assert a.routing["method"] == "DeepSeekV3" and a.routing_bias is not None and a.routing_bias.shape == (8,)
    with pytest.raises(InputError, match="no MoE layer 0"):
        load_moe_layer(ds_converted, 0)  # layer 0 is dense in DeepSeek-V3


def test_torch_backend_runs_and_routes(ds_converted):
    layer = load_moe_layer(ds_converted, 1)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 256, generator=gen).to(torch.bfloat16)
    logits = torch.randn(5, 8, generator=gen).to(torch.bfloat16)
    out = layer(x, logits, backend="auto")
    assert out.shape == (5, 256) and torch.isfinite(out).all() and out.abs().max() > 0
    ids, weights = layer.route(logits)
    assert ids.shape == (5, 2) and torch.allclose(weights.sum(-1), torch.full((5,), 2.5))  # routed_scaling_factor
    assert default_backend("cpu") == "torch"
    with pytest.raises(InputError, match="CUDA"):
        layer(x, logits, backend="triton")
    with pytest.raises(InputError, match="SM100"):
        layer(x, logits, backend="trtllm")


def test_trtllm_kwargs_match_installed_signature(ds_converted):
    from flashinfer.fused_moe import trtllm_fp4_block_scale_moe
    from flashinfer.tllm_enums import ActivationType, RoutingMethodType

    layer = load_moe_layer(ds_converted, 1)
    t = 6
    hs = torch.randint(0, 256, (t, 128), dtype=torch.uint8)
    sf = torch.randint(0, 256, (t * 16,), dtype=torch.uint8)  # fp4_quantize returns linear bytes
    logits = torch.randn(t, 8, dtype=torch.bfloat16)
    sig = inspect.signature(trtllm_fp4_block_scale_moe)
    kw = trtllm_kwargs(layer, hs, sf, logits, sig)
    sig.bind(**kw)  # every argument exists, nothing required is missing
    assert kw["routing_logits"].dtype == torch.float32  # DeepSeekV3 routing wants fp32 logits
    assert kw["routing_bias"].dtype == torch.bfloat16 and kw["routing_bias"].shape == (8,)
    assert kw["hidden_states_scale"].dtype == torch.float8_e4m3fn and kw["hidden_states_scale"].shape == (t, 16)
    assert kw["gemm1_weights"] is layer.tensors["w13_weight"] and kw["gemm2_weights"] is layer.tensors["w2_weight"]
    assert kw["gemm1_weights_scale"].dtype == torch.float8_e4m3fn
    assert kw["output1_scale_scalar"] is layer.tensors["g1_scale_c"]
    assert kw["output1_scale_gate_scalar"] is layer.tensors["g1_alphas"]
    assert kw["output2_scale_scalar"] is layer.tensors["g2_alphas"]
    assert (kw["num_experts"], kw["top_k"], kw["n_group"], kw["topk_group"]) == (8, 2, 2, 1)
    assert kw["intermediate_size"] == 128 and kw["local_expert_offset"] == 0 and kw["local_num_experts"] == 8
    assert kw["routed_scaling_factor"] == 2.5
    assert kw["routing_method_type"] == int(RoutingMethodType.DeepSeekV3)
    assert kw["activation_type"] == int(ActivationType.Swiglu)
    assert kw["tune_max_num_tokens"] == 8


def test_trtllm_kwargs_older_signature(ds_converted):
    """FlashInfer 0.4-0.5 spelled the activation gated_act_type and still had tile_tokens_dim."""

    def old(routing_logits, routing_bias, hidden_states, hidden_states_scale, gemm1_weights, gemm1_weights_scale,
            gemm1_bias, gemm1_alpha, gemm1_beta, gemm1_clamp_limit, gemm2_weights, gemm2_weights_scale, gemm2_bias,
            output1_scale_scalar, output1_scale_gate_scalar, output2_scale_scalar, num_experts, top_k, n_group,
            topk_group, intermediate_size, local_expert_offset, local_num_experts, routed_scaling_factor,
            tile_tokens_dim=None, routing_method_type=0, do_finalize=True, enable_pdl=None, gated_act_type=0,
            output=None, tune_max_num_tokens=8192):  # fmt: skip
        pass

    layer = load_moe_layer(ds_converted, 1)
    kw = trtllm_kwargs(layer, torch.zeros(2, 128, dtype=torch.uint8), torch.zeros(32, dtype=torch.uint8),
                       torch.zeros(2, 8), inspect.signature(old))  # fmt: skip
    assert kw["gated_act_type"] == 0 and kw["tile_tokens_dim"] is None and "activation_type" not in kw

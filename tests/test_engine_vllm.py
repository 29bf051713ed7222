"""The vLLM plugin against the real vllm==0.33.0 package, on CPU.

Golden: vLLM's STOCK NVFP4 MoE method (ModelOpt or compressed-tensors) is built from the SOURCE example checkpoint
and runs its own ``process_weights_after_loading`` (``prepare_nvfp4_moe_layer_for_fi_or_cutlass``: w1/w3 reorder,
H/I padding, FlashInfer's permute indices, and the scale interleave). Only two things are replaced, both outside
the processing itself:
- FlashInfer's ``nvfp4_block_scale_interleave`` (CUDA only) by vLLM's own torch implementation of the same 128x4
  interleave, ``nvfp4_utils.swizzle_blockscale``, with its trailing ``.cuda()`` device move made a no-op;
- environment probes: the TRT-LLM experts' ``_supports_current_device`` (Blackwell + FlashInfer) answers True, and
  ``torch.accelerator.current_device_index`` answers "cpu" (and ``current_platform.is_cuda_alike`` True for the
  non-gated family, which vLLM's config refuses off CUDA).
Then the CONVERTED checkpoint is loaded through the plugin (its config, MoE method and loader) and every forward-time
tensor and attribute is compared: bytes as uint8, scalars as float bits.
"""

from __future__ import annotations

import contextlib
import json
import socket
from pathlib import Path
from unittest import mock

import pytest
import torch

import flashinfer
import vllm  # noqa: F401  (a test that cannot import what it tests fails)
from safetensors.torch import load_file
from vllm.config import DeviceConfig, ModelConfig, VllmConfig, set_current_vllm_config
from vllm.distributed import parallel_state
from vllm.model_executor.layers.fused_moe.activation import MoEActivation
from vllm.model_executor.layers.fused_moe.config import FusedMoEConfig, FusedMoEParallelConfig, RoutingMethodType
from vllm.model_executor.layers.fused_moe.expert_map_manager import ExpertMapManager
from vllm.model_executor.layers.fused_moe.experts import trtllm_nvfp4_moe
from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts
from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import CompressedTensorsConfig
from vllm.model_executor.layers.quantization.modelopt import ModelOptNvFp4Config
from vllm.model_executor.layers.quantization.utils import nvfp4_utils
from vllm.platforms import current_platform

from nvfp4ckpt import convert_checkpoint
from nvfp4ckpt.engines.vllm import register
from nvfp4ckpt.engines.vllm.config import Nvfp4TrtllmConfig
from nvfp4ckpt.engines.vllm.loader import load_converted_experts
from nvfp4ckpt.errors import EngineRefusalError

FAMILIES = ["qwen3_moe", "deepseek_v3", "mixtral", "qwen2_moe", "qwen3_next", "glm4_moe", "kimi_k2", "minimax_m2", "llama4", "nemotron_h"]
FORMATS = ["modelopt", "compressed-tensors"]


# ------------------------------------------------------------------------------------------------
# Environment: vLLM config + a single-process gloo group (vLLM parameters ask for the TP rank)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", autouse=True)
def vllm_env():
    register()
    cfg = VllmConfig(device_config=DeviceConfig(device="cpu"))
    with set_current_vllm_config(cfg):
        owned = not parallel_state.model_parallel_is_initialized()
        if owned:
            parallel_state.init_distributed_environment(
                world_size=1, rank=0, distributed_init_method=f"tcp://127.0.0.1:{_free_port()}", local_rank=0, backend="gloo"
            )
            parallel_state.initialize_model_parallel(1, 1)
        yield cfg
        if owned:  # leave no process group behind for other engines' tests in the same pytest run
            parallel_state.destroy_model_parallel()
            parallel_state.destroy_distributed_environment()


@contextlib.contextmanager
def blackwell_probes(gated: bool = True):
    """Only environment probes: the processing itself is vLLM's, untouched."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(trtllm_nvfp4_moe.TrtLlmNvFp4ExpertsBase, "_supports_current_device", staticmethod(lambda: True)))
        stack.enter_context(mock.patch.object(torch.accelerator, "current_device_index", lambda: "cpu"))
        if not gated:
            stack.enter_context(mock.patch.object(type(current_platform), "is_cuda_alike", lambda self=None: True))
        yield


@contextlib.contextmanager
def torch_interleave():
    """FlashInfer's CUDA-only nvfp4_block_scale_interleave -> vLLM's torch swizzle_blockscale (same 128x4 layout)."""
    calls: list[tuple[int, ...]] = []

    def interleave(x: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(x.shape))
        with mock.patch.object(torch.Tensor, "cuda", lambda self, *a, **k: self):  # its device move only
            return nvfp4_utils.swizzle_blockscale(x.view(torch.float8_e4m3fn)).view(torch.uint8).reshape(-1)

    with mock.patch.object(flashinfer, "nvfp4_block_scale_interleave", interleave):
        yield calls


@contextlib.contextmanager
def shuffle_forbidden():
    """Any FlashInfer shuffle / interleave / permute-index call fails the test."""
    import flashinfer.fused_moe.core as core

    def boom(*a, **k):
        raise AssertionError("the plugin called a FlashInfer shuffle")

    with contextlib.ExitStack() as stack:
        for mod, name in [
            (flashinfer, "nvfp4_block_scale_interleave"), (flashinfer, "shuffle_matrix_a"), (flashinfer, "shuffle_matrix_sf_a"),
            (core, "_maybe_get_cached_w3_w1_permute_indices"), (core, "get_w2_permute_indices_with_cache"),
        ]:  # fmt: skip
            if hasattr(mod, name):
                stack.enter_context(mock.patch.object(mod, name, boom))
        yield


# ------------------------------------------------------------------------------------------------
# Checkpoints


def _realistic_source(src: Path, out: Path, fmt: str) -> Path:
    """The example, made like the producers' output in the two ways vLLM's processing depends on:
    - per-expert activation scales: experts in the upper half get larger input scales (x1.25 gate/up, x1.5 down),
      as calibration gives them (so a1/a2 differ between EP ranks' experts and the global maxima matter);
    - compressed-tensors: each expert's gate and up share one weight_global_scale, as llm-compressor 0.14 writes
      them (observers/helpers.py ``fuse_weight_observers`` links gate_proj/up_proj of every MLP, experts
      included; vLLM keeps one). The built-in example quantizes them separately: up takes gate's value here.
    Only scalars change; the weight bytes stay."""
    import re
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(src, out, dirs_exist_ok=True)
    tensors = {f: load_file(f) for f in sorted(out.glob("*.safetensors"))}
    name = re.compile(r"(?P<ex>.*\.experts\.(?P<e>\d+))\.(?P<proj>\w+)\.(?P<kind>input_scale|input_global_scale|weight_global_scale)")
    experts = max((int(m["e"]) for t in tensors.values() for k in t if (m := name.fullmatch(k))), default=-1) + 1
    gate = {}
    for t in tensors.values():
        for k, v in t.items():
            m = name.fullmatch(k)
            if m and m["kind"] == "weight_global_scale" and m["proj"] in ("gate_proj", "w1"):
                gate[m["ex"]] = v
    for f, t in tensors.items():
        for k in list(t):
            m = name.fullmatch(k)
            if not m:
                continue
            if m["kind"] == "weight_global_scale" and m["proj"] in ("up_proj", "w3") and m["ex"] in gate:
                t[k] = gate[m["ex"]].clone()
            elif m["kind"] != "weight_global_scale" and int(m["e"]) >= experts // 2:
                f_ = 1.5 if m["proj"] in ("down_proj", "w2") else 1.25
                t[k] = t[k] * f_ if m["kind"] == "input_scale" else t[k] / f_  # CT stores the reciprocal
        save_file(t, f, metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def converted(example_factory, tmp_path_factory):
    cache: dict[tuple, tuple[Path, Path]] = {}

    def make(arch: str, fmt: str, tp: int = 1, ep: int = 1) -> tuple[Path, Path]:
        key = (arch, fmt, tp, ep)
        if key not in cache:
            src = _realistic_source(example_factory(arch, fmt), tmp_path_factory.mktemp(f"src-{arch}-{fmt}") / "src", fmt)
            dst = tmp_path_factory.mktemp(f"vllm-{arch}-{fmt}-{tp}-{ep}")
            convert_checkpoint(src, dst, overwrite=True, tp=tp, ep=ep)
            cache[key] = (src, dst)
        return cache[key]

    return make


def _config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def _source_tensors(src: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(src.glob("*.safetensors")):
        out.update(load_file(f))
    return out


# ------------------------------------------------------------------------------------------------
# Layers


def _moe_config(desc: dict, prefix: str, tp: int, tp_rank: int, ep: int, ep_rank: int) -> FusedMoEConfig:
    info = desc["layers"][prefix]
    e = int(info["num_experts"])
    pc = FusedMoEParallelConfig(
        tp_size=tp, pcp_size=1, dp_size=1, ep_size=ep, tp_rank=tp_rank, pcp_rank=0, dp_rank=0, ep_rank=ep_rank,
        sp_size=1, use_ep=ep > 1, all2all_backend="allgather_reducescatter", enable_eplb=False,
    )  # fmt: skip
    routing = getattr(RoutingMethodType, str(desc["routing"]["method"]), RoutingMethodType.Renormalize)
    act = MoEActivation.SILU if desc["activation"] == "swiglu" else MoEActivation.RELU2_NO_MUL
    with blackwell_probes(act.is_gated):  # vLLM refuses non-gated MoE configs off CUDA
        return FusedMoEConfig(
            num_experts=e, experts_per_token=int(desc["routing"]["top_k"]), hidden_dim=int(info["hidden_size"]),
            intermediate_size=int(info["intermediate_size"]), num_local_experts=e // ep, num_logical_experts=e,
            activation=act, device="cpu", routing_method=routing, moe_parallel_config=pc, in_dtype=torch.bfloat16,
            moe_backend="flashinfer_trtllm",
        )  # fmt: skip


def _layer(quant_config, moe_config: FusedMoEConfig, prefix: str, gated: bool, ckpt_names=("gate_proj", "down_proj", "up_proj")) -> RoutedExperts:
    pc = moe_config.moe_parallel_config
    emm = ExpertMapManager(
        max_num_batched_tokens=256, top_k=moe_config.experts_per_token, global_num_experts=moe_config.num_experts,
        num_redundant_experts=0, num_expert_group=None, moe_parallel_config=pc, placement_strategy="linear", enable_eplb=False,
    )  # fmt: skip
    with blackwell_probes(gated):
        return RoutedExperts(
            prefix, torch.bfloat16, moe_config, quant_config, expert_map_manager=emm,
            ckpt_gate_proj_name=ckpt_names[0], ckpt_down_proj_name=ckpt_names[1], ckpt_up_proj_name=ckpt_names[2] if gated else None,
        )  # fmt: skip


def stock_layer(src: Path, desc: dict, prefix: str, par: tuple[int, int, int, int]) -> tuple[RoutedExperts, list]:
    """vLLM's own MoE method on the SOURCE checkpoint, with vLLM's own processing."""
    qcfg = _config(src)["quantization_config"]
    quant = ModelOptNvFp4Config.from_config(qcfg) if qcfg["quant_method"] == "modelopt" else CompressedTensorsConfig.from_config(qcfg)
    gated = desc["activation"] == "swiglu"
    names = desc["layers"][prefix]["source_projection_names"]
    ckpt = (names["gate"], names["down"], names["up"]) if gated else (names["up"], names["down"], None)  # as vLLM's models name them
    layer = _layer(quant, _moe_config(desc, prefix, *par), prefix, gated, ckpt)
    weights = [(k[len(prefix) + 1 :], v) for k, v in _source_tensors(src).items() if k.startswith(prefix + ".")]
    list(layer.load_weights(weights))
    with blackwell_probes(gated), torch_interleave() as calls:
        layer.quant_method.process_weights_after_loading(layer)
    return layer, calls


def plugin_layer(dst: Path, prefix: str, par: tuple[int, int, int, int]) -> RoutedExperts:
    """The plugin's method on the CONVERTED checkpoint: its config, its loader, its post-processing."""
    qcfg = _config(dst)["quantization_config"]
    desc = qcfg["moe_kernel_layout"]
    quant = Nvfp4TrtllmConfig.from_config(qcfg)
    gated = desc["activation"] == "swiglu"
    layer = _layer(quant, _moe_config(desc, prefix, *par), prefix, gated)
    model = torch.nn.ModuleDict({"experts": layer})
    with shuffle_forbidden():
        load_converted_experts(model, dst)
        with blackwell_probes(gated):
            layer.quant_method.process_weights_after_loading(layer)
    return layer


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def forward_state(layer: RoutedExperts) -> dict[str, object]:
    """Every tensor and attribute the TRT-LLM path reads at forward time (tensors as bytes + dtype + shape)."""
    m = layer.quant_method
    q = m.moe_quant_config
    ex = m.moe_kernel.fused_experts
    mc = layer.moe_config
    out: dict[str, object] = {}

    def put(name: str, v) -> None:
        if isinstance(v, torch.Tensor):
            out[name] = (str(v.dtype), tuple(v.shape), _bytes(v))
        else:
            out[name] = v

    for n, p in layer.named_parameters():
        put(f"param.{n}", p)
        out[f"param_class.{n}"] = type(p).__name__
    for n in ("w13_input_scale", "w2_input_scale"):
        put(f"attr.{n}", getattr(layer, n))
    for n in ("a1_gscale", "a2_gscale", "g1_alphas", "g2_alphas", "w1_scale", "w2_scale"):
        put(f"quant.{n}", getattr(q, n))
    for n in ("g1_scale_c", "gemm1_alpha", "gemm1_beta", "gemm1_clamp_limit", "intermediate_size_per_partition",
              "hidden_dim", "hidden_dim_unpadded", "local_num_experts", "ep_rank", "topk", "routing_method_type"):  # fmt: skip
        put(f"experts.{n}", getattr(ex, n))
    for n in ("hidden_dim", "hidden_dim_unpadded", "intermediate_size_per_partition", "num_local_experts"):
        put(f"moe_config.{n}", getattr(mc, n))
    out["experts_class"] = type(ex).__name__
    out["backend"] = m.nvfp4_backend
    return out


def assert_same_state(stock: dict, plugin: dict) -> None:
    assert stock.keys() == plugin.keys(), set(stock) ^ set(plugin)
    for k in stock:
        a, b = stock[k], plugin[k]
        if isinstance(a, tuple) and len(a) == 3 and isinstance(a[2], torch.Tensor):
            assert a[:2] == b[:2], f"{k}: {a[:2]} != {b[:2]}"
            assert torch.equal(a[2], b[2]), f"{k}: bytes differ"
        else:
            assert a == b, f"{k}: {a!r} != {b!r}"


def _moe_prefixes(dst: Path) -> list[str]:
    return list(_config(dst)["quantization_config"]["moe_kernel_layout"]["layers"])


# ------------------------------------------------------------------------------------------------
# Golden tests


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("arch", FAMILIES)
def test_golden_single_rank(converted, arch, fmt):
    if (arch, fmt) == ("llama4", "modelopt"):
        pytest.xfail(
            "harness gap, not a plugin result: ModelOpt's fused Llama-4 experts are split by Llama4Model."
            "load_moe_expert_weights (model code this layer-level harness does not run); llama4 is covered from "
            "compressed-tensors (per-expert)"
        )
    src, dst = converted(arch, fmt)
    desc = _config(dst)["quantization_config"]["moe_kernel_layout"]
    for prefix in _moe_prefixes(dst):
        stock, calls = stock_layer(src, desc, prefix, (1, 0, 1, 0))
        assert len(calls) == 2 * desc["layers"][prefix]["num_experts"]  # vLLM's processing did interleave every expert
        plugin = plugin_layer(dst, prefix, (1, 0, 1, 0))
        assert_same_state(forward_state(stock), forward_state(plugin))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("tp,ep", [(2, 1), (1, 2)])
def test_golden_rank_output(converted, fmt, tp, ep):
    """--tp/--ep output: vLLM rank (ep_rank, tp_rank) reads ranks/rank-(ep_rank*T + tp_rank) and equals vLLM's own
    sharded processing of the source."""
    src, dst = converted("qwen3_moe", fmt, tp, ep)
    desc = _config(dst)["quantization_config"]["moe_kernel_layout"]
    prefix = _moe_prefixes(dst)[0]
    for ep_rank in range(ep):
        for tp_rank in range(tp):
            par = (tp, tp_rank, ep, ep_rank)
            stock, _ = stock_layer(src, desc, prefix, par)
            plugin = plugin_layer(dst, prefix, par)
            assert_same_state(forward_state(stock), forward_state(plugin))


@pytest.mark.parametrize("fmt", FORMATS)
def test_golden_ep_from_whole_layer_output(converted, fmt):
    """Output written without --ep: vLLM's EP ranks take their experts along dim 0 (no transform)."""
    src, dst = converted("qwen3_moe", fmt)
    desc = _config(dst)["quantization_config"]["moe_kernel_layout"]
    prefix = _moe_prefixes(dst)[0]
    for ep_rank in range(2):
        par = (1, 0, 2, ep_rank)
        assert_same_state(forward_state(stock_layer(src, desc, prefix, par)[0]), forward_state(plugin_layer(dst, prefix, par)))


# ------------------------------------------------------------------------------------------------
# Plugin behaviour


@pytest.mark.parametrize("fmt", FORMATS)
def test_postprocessing_idempotent_and_identity_kept(converted, fmt):
    _, dst = converted("qwen3_moe", fmt)
    prefix = _moe_prefixes(dst)[0]
    layer = plugin_layer(dst, prefix, (1, 0, 1, 0))
    params = dict(layer.named_parameters())
    ptrs = {n: p.data_ptr() for n, p in params.items()}
    first = forward_state(layer)
    with shuffle_forbidden(), blackwell_probes():
        layer.quant_method.process_weights_after_loading(layer)
    assert_same_state(first, forward_state(layer))
    after = dict(layer.named_parameters())
    assert after.keys() == params.keys()
    for n, p in params.items():
        assert after[n] is p, f"{n}: parameter object replaced"
        assert p.data_ptr() == ptrs[n], f"{n}: storage moved"
    assert layer.quant_method.moe_kernel.fused_experts.g1_scale_c is layer.g1_scale_c


def test_stock_vllm_refuses_converted_checkpoint(converted):
    """vLLM's real config verification, without the plugin registered, refuses the converted files."""
    import subprocess
    import sys

    src, dst = converted("qwen3_moe", "modelopt")
    code = (
        "from vllm.config import ModelConfig\n"
        f"ModelConfig(model={str(src)!r})\n"
        "try:\n"
        f"    ModelConfig(model={str(dst)!r})\n"
        "except Exception as e:\n"
        "    print('REFUSED', e)\n"
        "else:\n"
        "    print('ACCEPTED')\n"
    )
    env = {**__import__("os").environ, "VLLM_PLUGINS": ""}  # load no general plugin
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert "REFUSED" in out.stdout, out.stdout + out.stderr
    assert "Unknown quantization method: nvfp4_trtllm" in out.stdout


def test_plugin_config_is_detected(converted):
    """With the plugin registered, vLLM's own verification picks nvfp4_trtllm from config.json."""
    _, dst = converted("qwen3_moe", "modelopt")
    mc = ModelConfig(model=str(dst))
    assert mc.quantization == "nvfp4_trtllm"
    mc = ModelConfig(model=str(dst), quantization="nvfp4_trtllm")
    assert mc.quantization == "nvfp4_trtllm"


def test_refuses_mismatched_tp(converted):
    _, dst = converted("qwen3_moe", "modelopt", 2, 1)
    prefix = _moe_prefixes(dst)[0]
    with pytest.raises(EngineRefusalError, match=r"converted with --tp 2 --ep 1 but vLLM runs this MoE with tp 1 ep 2"):
        plugin_layer(dst, prefix, (1, 0, 2, 0))
    _, whole = converted("qwen3_moe", "modelopt")
    with pytest.raises(EngineRefusalError, match=r"cannot be re-sliced: convert with --tp 2"):
        plugin_layer(whole, prefix, (2, 0, 1, 0))


def test_refuses_example_ct_with_separate_gate_up_scales(example_factory, tmp_path):
    """A compressed-tensors example with separate gate/up global scales (``untied_gate_up``; llm-compressor ties
    them): refused, never rounded."""
    src = example_factory("qwen3_moe", "compressed-tensors", untied_gate_up=True)
    dst = tmp_path / "dst"
    convert_checkpoint(src, dst)
    prefix = _moe_prefixes(dst)[0]
    with pytest.raises(EngineRefusalError, match=rf"^{prefix}\.w13_weight_global_scale: gate and up global scales differ"):
        plugin_layer(dst, prefix, (1, 0, 1, 0))


def test_stock_modelopt_config_reads_the_same_on_vllm_032_and_033(example_factory):
    """vLLM 0.32 reads a flat ModelOpt section's exclusions from ``ignore`` only (0.33 falls back to
    ``exclude_modules``): the stock config the plugin builds lists every exclusion under ``ignore``, so both
    versions exclude the same modules; the ModelOpt example's own config.json already has them there."""
    from nvfp4ckpt.engines.vllm.config import stock_modelopt_config

    old_style = {"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 16, "exclude_modules": ["lm_head", "*.mlp.gate"]}
    built = stock_modelopt_config(old_style)
    assert built["ignore"] == ["lm_head", "*.mlp.gate"]
    assert ModelOptNvFp4Config.from_config(built).exclude_modules == ["lm_head", "*.mlp.gate"]
    both = stock_modelopt_config({**old_style, "ignore": ["lm_head", "model.embed_tokens"]})
    assert both["ignore"] == ["lm_head", "model.embed_tokens", "*.mlp.gate"]
    nested = {"quantization": {"quant_algo": "NVFP4", "exclude_modules": ["lm_head"]}}
    assert stock_modelopt_config(nested) is nested
    with pytest.raises(EngineRefusalError, match=r"^config.json source_quantization_config.ignore: a list"):
        stock_modelopt_config({**old_style, "ignore": "lm_head"})
    example = _config(example_factory("qwen3_moe", "modelopt"))["quantization_config"]
    assert "exclude_modules" not in example and stock_modelopt_config(example) == example


def test_plugin_config_excludes_what_the_source_excludes(converted):
    """The plugin's stock config of a converted ModelOpt example excludes the router and lm_head (left bf16)."""
    _, dst = converted("qwen3_moe", "modelopt")
    cfg = Nvfp4TrtllmConfig.from_config(_config(dst)["quantization_config"])
    assert {"lm_head", "*.mlp.gate"} <= set(cfg.source.exclude_modules)


def test_refuses_different_gate_up_scale(converted, tmp_path):
    """vLLM keeps one w13 global scale: a layer whose gate and up weight_scale_2 differ is refused by name."""
    import shutil

    from safetensors.torch import save_file

    _, dst = converted("qwen3_moe", "modelopt")
    bad = tmp_path / "bad"
    shutil.copytree(dst, bad)
    prefix = _moe_prefixes(dst)[0]
    for f in bad.glob("*.safetensors"):
        t = load_file(f)
        key = f"{prefix}.w13_weight_scale_2"
        if key in t:
            t[key] = t[key].clone()
            t[key][3, 1] = torch.nextafter(t[key][3, 1], torch.tensor(1.0))
            save_file(t, f, metadata={"format": "pt"})
    with pytest.raises(EngineRefusalError, match=rf"{prefix}\.w13_weight_scale_2: gate and up global scales differ.*\[3\]"):
        plugin_layer(bad, prefix, (1, 0, 1, 0))


def test_unloaded_layer_refused(converted):
    _, dst = converted("qwen3_moe", "modelopt")
    prefix = _moe_prefixes(dst)[0]
    qcfg = _config(dst)["quantization_config"]
    layer = _layer(Nvfp4TrtllmConfig.from_config(qcfg), _moe_config(qcfg["moe_kernel_layout"], prefix, 1, 0, 1, 0), prefix, True)
    with pytest.raises(EngineRefusalError, match="never loaded: serve with --load-format nvfp4_trtllm"):
        layer.quant_method.process_weights_after_loading(layer)
    with pytest.raises(EngineRefusalError, match="load only through --load-format nvfp4_trtllm"):
        layer.w13_weight.weight_loader(layer.w13_weight, torch.zeros(1))


# ------------------------------------------------------------------------------------------------
# RL weight updates


def _vllm_param_tensors(dst: Path, prefix: str, fmt: str) -> dict[str, torch.Tensor]:
    """A trainer's kernel-format tensors under vLLM's parameter names (as it would send them), from a converted
    checkpoint: ModelOpt scalars in vLLM's forms, compressed-tensors raw global scales."""
    conv: dict[str, torch.Tensor] = {}
    for f in sorted(dst.glob("*.safetensors")):
        conv.update(load_file(f))
    t = {n: conv[f"{prefix}.{n}"] for n in ("w13_weight", "w13_weight_scale", "w2_weight", "w2_weight_scale")}
    e = t["w13_weight"].shape[0]
    if fmt == "modelopt":
        t["w13_weight_scale_2"] = conv[f"{prefix}.g1_alphas"]
        t["w2_weight_scale_2"] = conv[f"{prefix}.g2_alphas"]
        t["w13_input_scale"] = conv[f"{prefix}.w13_input_scale"].max().repeat(e)
        t["w2_input_scale"] = conv[f"{prefix}.w2_input_scale"].max().repeat(e)
    else:
        for n in ("w13_weight_global_scale", "w2_weight_global_scale", "w13_input_global_scale", "w2_input_global_scale"):
            t[n] = conv[f"{prefix}.{n}"]
    return t


@pytest.fixture(scope="module")
def converted_seed1(example_factory, tmp_path_factory):
    def make(fmt: str, ep: int = 1) -> tuple[Path, Path]:
        src = _realistic_source(example_factory("qwen3_moe", fmt, seed=1), tmp_path_factory.mktemp(f"src-seed1-{fmt}") / "src", fmt)
        dst = tmp_path_factory.mktemp(f"vllm-seed1-{fmt}-{ep}")
        convert_checkpoint(src, dst, overwrite=True, ep=ep)
        return src, dst

    return make


@pytest.mark.parametrize("fmt", FORMATS)
def test_reload_kernel_format(converted, converted_seed1, fmt):
    """vLLM's reload_weights(is_checkpoint_format=False) copies kernel-layout tensors by name; a1_gscale and
    g1_scale_c go stale (vLLM derived them at kernel build) until refresh_derived rewrites them in place."""
    from vllm.model_executor.model_loader.reload.inplace import reload_weights

    from nvfp4ckpt.engines.vllm.rl import refresh_derived

    _, dst = converted("qwen3_moe", fmt)
    _, dst1 = converted_seed1(fmt)
    prefix = _moe_prefixes(dst)[0]
    layer = plugin_layer(dst, prefix, (1, 0, 1, 0))
    want = forward_state(plugin_layer(dst1, prefix, (1, 0, 1, 0)))
    model = torch.nn.ModuleDict({"experts": layer})
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    q = layer.quant_method.moe_quant_config
    a1_ptr, a1_old = q.a1_gscale.data_ptr(), q.a1_gscale.clone()
    new = {f"experts.{n}": v for n, v in _vllm_param_tensors(dst1, prefix, fmt).items()}
    vcfg = VllmConfig(model_config=ModelConfig(model=str(dst)), device_config=DeviceConfig(device="cpu"))
    with shuffle_forbidden():
        reload_weights(vcfg, model, iter(new.items()), None, is_checkpoint_format=False)
    if fmt == "modelopt":
        assert torch.equal(q.a1_gscale, a1_old), "a1_gscale should still hold the old input scale (the caveat)"
        assert not torch.equal(1.0 / layer.w13_input_scale, q.a1_gscale), "seed 1 must change a1 for this test"
    with shuffle_forbidden():
        refresh_derived(model)
    assert_same_state(want, forward_state(layer))
    assert q.a1_gscale.data_ptr() == a1_ptr
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == ptrs


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("ep,ep_rank", [(1, 0), (2, 1)])
def test_update_from_source(converted, converted_seed1, fmt, ep, ep_rank):
    """Source-format trainer tensors -> nvfp4ckpt.live.update_live_ -> the live vLLM layer: equals loading the
    converted new checkpoint (and so, by the golden tests, vLLM's own processing of the new source). With --ep
    output, a rank writes its own experts and takes a1/a2 over every expert it is sent."""
    from nvfp4ckpt.engines.vllm.rl import update_from_source_

    _, dst = converted("qwen3_moe", fmt, 1, ep)
    src1, dst1 = converted_seed1(fmt, ep)
    prefix = _moe_prefixes(dst)[0]
    par = (1, 0, ep, ep_rank)
    layer = plugin_layer(dst, prefix, par)
    model = torch.nn.ModuleDict({"experts": layer})
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    named = {k: v for k, v in _source_tensors(src1).items() if k.startswith(prefix + ".")}
    layout = _config(dst)["quantization_config"]["moe_kernel_layout"]
    with shuffle_forbidden():
        report = update_from_source_(model, named, layout)
    assert prefix in report.layers
    assert_same_state(forward_state(plugin_layer(dst1, prefix, par)), forward_state(layer))
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == ptrs


def test_update_from_source_refuses_different_gate_up(converted, converted_seed1):
    from nvfp4ckpt.engines.vllm.rl import update_from_source_

    _, dst = converted("qwen3_moe", "modelopt")
    src1, _ = converted_seed1("modelopt")
    prefix = _moe_prefixes(dst)[0]
    layer = plugin_layer(dst, prefix, (1, 0, 1, 0))
    model = torch.nn.ModuleDict({"experts": layer})
    named = {k: v for k, v in _source_tensors(src1).items() if k.startswith(prefix + ".")}
    named[f"{prefix}.2.up_proj.weight_scale_2"] = named[f"{prefix}.2.up_proj.weight_scale_2"] * 2
    before = _bytes(layer.w13_weight).clone()
    with pytest.raises(EngineRefusalError, match=rf"^{prefix}\.2: gate and up global scales differ"):
        update_from_source_(model, named, _config(dst)["quantization_config"]["moe_kernel_layout"])
    assert torch.equal(before, _bytes(layer.w13_weight)), "nothing may be written before the refusal"


# ------------------------------------------------------------------------------------------------
# The load format


class _Model(torch.nn.Module):
    """The two things the loader needs from a vLLM model: its modules and a ``load_weights`` (which records)."""

    def __init__(self, layers: list[RoutedExperts]) -> None:
        super().__init__()
        self.moe = torch.nn.ModuleList(layers)
        self.seen: list[str] = []

    def load_weights(self, weights):
        self.seen = [n for n, _ in weights]
        return set(self.seen)


@pytest.mark.parametrize("tp", [1, 2])
def test_load_format_routes_tensors(converted, tp):
    """--load-format nvfp4_trtllm: vLLM's default loader streams the top-level files minus the converted MoE
    layers into model.load_weights; the MoE layers get their tensors (this rank's part) by name."""
    from vllm.model_executor.model_loader import get_model_loader

    src, dst = converted("qwen3_moe", "modelopt", tp, 1)
    qcfg = _config(dst)["quantization_config"]
    quant = Nvfp4TrtllmConfig.from_config(qcfg)
    prefixes = _moe_prefixes(dst)
    tp_rank = tp - 1
    layers = [_layer(quant, _moe_config(qcfg["moe_kernel_layout"], p, tp, tp_rank, 1, 0), p, True) for p in prefixes]
    model = _Model(layers)
    vcfg = VllmConfig(model_config=ModelConfig(model=str(dst)), device_config=DeviceConfig(device="cpu"))
    from vllm.config import LoadConfig

    loader = get_model_loader(LoadConfig(load_format="nvfp4_trtllm"))
    with shuffle_forbidden():
        loader.load_weights(model, vcfg.model_config)
    top = set()
    for f in dst.glob("*.safetensors"):
        top |= set(load_file(f))
    assert set(model.seen) == {n for n in top if not n.startswith(tuple(p + "." for p in prefixes))}
    assert model.seen and not any(".mlp.experts." in n for n in model.seen)
    for p, layer in zip(prefixes, layers):
        with shuffle_forbidden(), blackwell_probes():
            layer.quant_method.process_weights_after_loading(layer)
        assert_same_state(forward_state(plugin_layer(dst, p, (tp, tp_rank, 1, 0))), forward_state(layer))
        if tp > 1:
            desc = qcfg["moe_kernel_layout"]
            assert_same_state(forward_state(stock_layer(src, desc, p, (tp, tp_rank, 1, 0))[0]), forward_state(layer))


# ------------------------------------------------------------------------------------------------
# Hidden sizes vLLM pads (H % 256 != 0): convert --pad-hidden 256


@pytest.mark.parametrize("fmt", FORMATS)
def test_golden_hidden_padded_to_256(tmp_path, fmt):
    """H = 384: vLLM's processing pads it to 512 (trtllm_nvfp4_hidden_alignment); convert --pad-hidden 256 writes
    the same bytes, which the plugin loads as they are. Without the option the plugin refuses by layer."""
    from nvfp4ckpt import write_example

    raw = tmp_path / "raw"
    write_example(raw, format=fmt, arch="qwen3_moe", config_overrides={"hidden_size": 384})
    src = _realistic_source(raw, tmp_path / "src", fmt)
    dst, dst128 = tmp_path / "dst", tmp_path / "dst128"
    convert_checkpoint(src, dst, pad_hidden=256)
    convert_checkpoint(src, dst128)
    desc = _config(dst)["quantization_config"]["moe_kernel_layout"]
    assert (desc["hidden_size"], desc["hidden_size_padded"]) == (384, 512)
    for prefix in _moe_prefixes(dst):
        stock, _ = stock_layer(src, desc, prefix, (1, 0, 1, 0))
        assert stock.w2_weight.shape[1] == 512
        assert_same_state(forward_state(stock), forward_state(plugin_layer(dst, prefix, (1, 0, 1, 0))))
    with pytest.raises(EngineRefusalError, match=r"vLLM pads the hidden size 384 to 512 .* files hold 384: convert with --pad-hidden 256$"):
        plugin_layer(dst128, _moe_prefixes(dst128)[0], (1, 0, 1, 0))


def test_pad_hidden_must_be_a_multiple_of_128(example_factory, tmp_path):
    from nvfp4ckpt.errors import InputError

    with pytest.raises(InputError, match=r"--pad-hidden 192: choose 128 \(the kernel's need\), 256"):
        convert_checkpoint(example_factory("qwen3_moe", "modelopt"), tmp_path / "x", pad_hidden=192)


def test_entry_point_registers_through_vllm(converted):
    """vLLM's own plugin loading (entry point group vllm.general_plugins, as `vllm serve` runs it) registers the
    quantization method and the load format; checked in a fresh process."""
    import os
    import subprocess
    import sys

    _, dst = converted("qwen3_moe", "modelopt")
    code = (
        "from vllm.plugins import load_general_plugins\n"
        "load_general_plugins()\n"
        "from vllm.config import LoadConfig, ModelConfig\n"
        "from vllm.model_executor.model_loader import get_model_loader\n"
        f"print('QUANT', ModelConfig(model={str(dst)!r}).quantization)\n"
        "print('LOADER', type(get_model_loader(LoadConfig(load_format='nvfp4_trtllm'))).__name__)\n"
    )
    env = {**os.environ, "VLLM_PLUGINS": "nvfp4ckpt"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert "QUANT nvfp4_trtllm" in out.stdout, out.stdout + out.stderr
    assert "LOADER Nvfp4TrtllmModelLoader" in out.stdout, out.stdout + out.stderr


@pytest.mark.slow
@pytest.mark.parametrize("form", ["per-expert", "stacked"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_update_from_source_takes_bf16_expert_weights(tmp_path_factory, fmt, form):
    """A trainer's unquantized (bf16) expert weights through the vLLM plugin's RL path, per expert or as a
    transformers-5 model's stacked experts (``mlp.experts.gate_up_proj`` [E, 2I, H], ``down_proj``: expanded to
    per-expert views before vLLM's input scales are filled in): quantized as the producer does, the live layer equals
    the plugin layer loaded from the producer's converted checkpoint (real ModelOpt / llm-compressor output of the
    same bf16 model), with no shuffle call and the same storage."""
    from nvfp4ckpt.engines.vllm.rl import update_from_source_
    from nvfp4ckpt.layouts.trtllm_gen.converted import open_converted
    from tests.test_live_update_bf16 import bf16_experts, made
    from tests.test_live_update_stacked import stacked_of

    state, _, conv = made("qwen3_moe", fmt, tmp_path_factory.mktemp("vllm-bf16"))
    prefix = _moe_prefixes(conv)[0]
    par = (1, 0, 1, 0)
    layer = plugin_layer(conv, prefix, par)
    want = forward_state(plugin_layer(conv, prefix, par))
    model = torch.nn.ModuleDict({"experts": layer})
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    for name in ("w13_weight", "w2_weight", "w13_weight_scale", "w2_weight_scale"):
        getattr(layer, name).data.view(torch.uint8).fill_(0x11)  # stale weights, to be replaced
    if form == "stacked":
        named = stacked_of(state, prefix)
    else:
        named = bf16_experts(state, prefix, open_converted(conv).layer(prefix))
    layout = _config(conv)["quantization_config"]["moe_kernel_layout"]
    with shuffle_forbidden():
        report = update_from_source_(model, named, layout)
    assert report.layers[prefix].experts == list(range(len(report.layers[prefix].experts))) and report.layers[prefix].experts
    assert_same_state(want, forward_state(layer))
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == ptrs

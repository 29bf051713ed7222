"""The SGLang plugin against the REAL sglang 0.5.23 (CPU): golden equality with SGLang's own processing.

For each family and source format, SGLang's STOCK NVFP4 MoE method is built on a real FusedMoE from the SOURCE
example, loaded through FusedMoE.weight_loader and post-processed by its own process_weights_after_loading. Only
two things are pointed elsewhere: the platform facts (``override_platform(is_blackwell=True)``, SGLang's own
override) and FlashInfer's CUDA-only ``nvfp4_block_scale_interleave``, replaced by SGLang's torch
``swizzle_blockscale`` (the same 128x4 permutation). Then the CONVERTED checkpoint is loaded through the plugin and
both layers' ``apply`` payloads (SGLang's FlashInferTrtllmFp4MoeQuantInfo, captured at MoeRunner.run) are compared
byte for byte.
"""

from __future__ import annotations

import os
import re
import tempfile
import types
from pathlib import Path

import pytest
import torch

from nvfp4ckpt.cli import app  # noqa: F401  (the CLI must import beside sglang)
from nvfp4ckpt.convert import convert_checkpoint

import sglang.srt.layers.quantization.utils as sgl_qutils
from sglang.srt.layers.moe import MoeRunner
from sglang.srt.layers.moe.fused_moe_triton.layer import FusedMoE
from sglang.srt.runtime_context import get_parallel, override_platform

from nvfp4ckpt.engines import sglang as plugin
from nvfp4ckpt.runtime.update import check_live, check_live_

from .conftest import load_dir, u8

SERVED = ("qwen3_moe", "deepseek_v3", "mixtral", "glm4_moe", "kimi_k2", "qwen2_moe")
FORMATS = ("modelopt", "compressed-tensors")


# ----------------------------------------------------------------------------------------------------------------
# SGLang process state: a one-process gloo group, the published server args, the MoE runner config


@pytest.fixture(scope="module", autouse=True)
def sglang_runtime():
    from sglang.srt.distributed.parallel_state import (
        init_distributed_environment,
        initialize_model_parallel,
        model_parallel_is_initialized,
    )
    from sglang.srt.layers.moe.utils import initialize_moe_config
    from sglang.test.test_utils import publish_build_topology

    if not torch.distributed.is_initialized():
        init = "file://" + tempfile.mktemp(prefix="nvfp4ckpt-sglang-")
        init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo", distributed_init_method=init)
    if not model_parallel_is_initialized():
        publish_build_topology(tp_size=1, ep_size=1, pp_size=1, moe_runner_backend="flashinfer_trtllm", device="cpu")
        initialize_model_parallel(backend="gloo")
    initialize_moe_config()
    plugin.register()
    yield
    # Leave the process as we found it for the tests that follow in the same session (another engine's among them).
    # (SGLang's destroy_model_parallel imports its HTTP bootstrap, i.e. uvicorn; torch's teardown frees every group.)
    from sglang.srt.runtime_context import reset_context

    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    reset_context()


@pytest.fixture(autouse=True)
def torch_interleave(monkeypatch):
    """FlashInfer's nvfp4_block_scale_interleave is CUDA-only; SGLang ships the same permutation in torch."""
    import flashinfer

    def interleave(x: torch.Tensor) -> torch.Tensor:
        return sgl_qutils.swizzle_blockscale(x.view(torch.float8_e4m3fn)).view(torch.uint8).reshape(-1)

    monkeypatch.setattr(flashinfer, "nvfp4_block_scale_interleave", interleave)


@pytest.fixture(autouse=True)
def capture_runner(monkeypatch):
    """MoeRunner.run returns the payload it was given (the TRT-LLM-gen kernel runs only on Blackwell)."""
    monkeypatch.setattr(MoeRunner, "run", lambda self, dispatch_output, quant_info: quant_info)


# ----------------------------------------------------------------------------------------------------------------
# helpers


def _cfg(root: Path) -> dict:
    import json

    return json.loads((root / "config.json").read_text())


def _moe_sizes(cfg: dict) -> tuple[int, int, int, int]:
    e = cfg.get("num_experts") or cfg.get("n_routed_experts") or cfg.get("num_local_experts")
    i = cfg.get("moe_intermediate_size") or cfg.get("intermediate_size")
    k = cfg.get("num_experts_per_tok")
    return int(e), int(cfg["hidden_size"]), int(i), int(k)


def _routing(cfg: dict):
    """The routing type the SGLang model passes to FusedMoE (nvfp4ckpt records FlashInfer's name for the family)."""
    from sglang.srt.layers.moe.utils import RoutingMethodType

    from nvfp4ckpt.source.architectures import for_config

    return RoutingMethodType[for_config(cfg).routing(cfg).method]


def _build(quant_config, cfg: dict, prefix: str, tp: int = 1, ep: int = 1, tp_rank: int = 0, ep_rank: int = 0) -> FusedMoE:
    e, h, i, k = _moe_sizes(cfg)
    par = _par(tp, ep, tp_rank, ep_rank)
    # Environment probes only: SGLang's platform facts, and the raw torch capability query the compressed-tensors
    # config makes when it picks its MoE scheme.
    with override_platform(is_blackwell=True), get_parallel().override(**par), _blackwell_capability():
        return FusedMoE(
            num_experts=e, hidden_size=h, intermediate_size=i, layer_id=0, top_k=k, quant_config=quant_config,
            prefix=prefix, params_dtype=torch.bfloat16, activation="silu", routing_method_type=_routing(cfg),
        )  # fmt: skip


def _blackwell_capability():
    from unittest import mock

    return mock.patch.object(torch.cuda, "get_device_capability", lambda *a, **k: (10, 0))


def _stock_config(cfg: dict):
    from sglang.srt.layers.quantization import QUANTIZATION_METHODS

    q = cfg["quantization_config"]
    method = "modelopt_fp4" if q["quant_method"] == "modelopt" else q["quant_method"]
    return QUANTIZATION_METHODS[method].from_config(q)


def _load_source(layer: FusedMoE, tensors: dict[str, torch.Tensor], prefix: str, proj: dict[str, str], fmt: str) -> None:
    """What the models' load_weights do: experts.{e}.{proj}.{suffix} -> FusedMoE.weight_loader(w13_/w2_ param)."""
    shard = {proj["gate"]: "w1", proj["up"]: "w3", proj["down"]: "w2"}
    pat = re.compile(re.escape(prefix) + r"\.(\d+)\.(\w+)\.(\w+)$")
    params = dict(layer.named_parameters())
    n = 0
    for name, t in tensors.items():
        m = pat.match(name)
        if not m or m[2] not in shard:
            continue
        sid = shard[m[2]]
        param = params[("w13_" if sid in ("w1", "w3") else "w2_") + m[3]]
        layer.weight_loader(param, t, name, shard_id=sid, expert_id=int(m[1]))
        n += 1
    assert n, f"no expert tensors of {prefix} in the source"


def _stock_layer(src: Path, prefix: str, **par) -> FusedMoE:
    cfg = _cfg(src)
    layer = _build(_stock_config(cfg), cfg, prefix, **par)
    proj = _proj_names(src, prefix)
    _load_source(layer, load_dir(src), prefix, proj, cfg["quantization_config"]["quant_method"])
    with override_platform(is_blackwell=True), get_parallel().override(**_par(**par)):
        layer.quant_method.process_weights_after_loading(layer)
    return layer


def _par(tp: int = 1, ep: int = 1, tp_rank: int = 0, ep_rank: int = 0) -> dict:
    """SGLang's parallel state of one rank of a tp*ep job (attention TP over the same ranks, no DP), as FusedMoE
    reads it. This process's groups have one member, so the group handles are width stand-ins: nothing here
    communicates (the overrides' validation reads only ``world_size``)."""
    n, rank = tp * ep, ep_rank * tp + tp_rank
    width = types.SimpleNamespace(world_size=n)
    if n == 1:
        return {}
    return dict(
        tp_size=n, tp_rank=rank, attn_tp_size=n, attn_tp_rank=rank, tp_group=width, attn_tp_group=width,
        moe_tp_size=tp, moe_tp_rank=tp_rank, moe_ep_size=ep, moe_ep_rank=ep_rank,
        moe_ep_group=types.SimpleNamespace(world_size=ep),
    )  # fmt: skip


def _proj_names(src: Path, prefix: str) -> dict[str, str]:
    from nvfp4ckpt.source.checkpoint import open_checkpoint

    ckpt = open_checkpoint(src)
    layer = next(l for l in ckpt.layers if l.prefix == prefix)
    return dict(layer.proj_names)


def _plugin_layer(conv: Path, prefix: str, **par) -> FusedMoE:
    cfg = _cfg(conv)
    qc = plugin.Nvfp4TrtllmConfig.from_config(cfg["quantization_config"])
    qc.checkpoint_root = str(conv)
    layer = _build(qc, cfg, prefix, **par)
    assert isinstance(layer.quant_method, plugin.Nvfp4TrtllmMoEMethod)
    params = dict(layer.named_parameters())
    for name, t in load_dir(conv).items():  # the fall-through path of the models' load_weights
        if name.startswith(prefix + ".") and name[len(prefix) + 1 :] in params:
            p = params[name[len(prefix) + 1 :]]
            p.weight_loader(p, t)
    layer.quant_method.process_weights_after_loading(layer)
    return layer


def _payload(layer: FusedMoE, h: int):
    d = types.SimpleNamespace(hidden_states=torch.zeros(1, h, dtype=torch.bfloat16), topk_output=None)
    with override_platform(is_blackwell=True):
        return layer.quant_method.apply(layer, d)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes (a fresh dense copy: SGLang's compressed-tensors input scale is a stride-0 expand)."""
    dense = torch.empty(tuple(t.shape) or (1,), dtype=t.dtype)
    dense.copy_(t.detach().reshape(dense.shape))
    return u8(dense)


def payload_differences(a, b) -> list[str]:
    """Fields of two FlashInferTrtllmFp4MoeQuantInfo that differ (tensors: dtype, shape, bytes)."""
    import dataclasses

    out = []
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
                out.append(f"{f.name}: {type(x).__name__} vs {type(y).__name__}")
            elif (x.dtype, tuple(x.shape)) != (y.dtype, tuple(y.shape)):
                out.append(f"{f.name}: {x.dtype} {tuple(x.shape)} vs {y.dtype} {tuple(y.shape)}")
            elif not torch.equal(_bytes(x), _bytes(y)):
                out.append(f"{f.name}: bytes differ ({x.reshape(-1)[:4].tolist()} vs {y.reshape(-1)[:4].tolist()})")
        elif x != y:
            out.append(f"{f.name}: {x!r} vs {y!r}")
    return out


def assert_same_payload(a, b) -> None:
    diff = payload_differences(a, b)
    assert not diff, "; ".join(diff)


def _convert(src: Path, out: Path, tp: int = 1, ep: int = 1) -> Path:
    convert_checkpoint(src, out, tp=tp, ep=ep)
    return out


def _prefixes(conv: Path) -> list[str]:
    return list(_cfg(conv)["quantization_config"]["moe_kernel_layout"]["layers"])


def _tie_w13_global_scales(src: Path, dst: Path, take: str) -> Path:
    """A copy of a compressed-tensors example whose gate and up weight_global_scale both hold ``take``'s
    (weights untouched): SGLang's compressed-tensors path keeps only the gate scale, exact only when they are equal."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    from nvfp4ckpt.source.checkpoint import open_checkpoint

    proj = dict(open_checkpoint(src).layers[0].proj_names)  # e.g. gate_proj/up_proj, Mixtral w1/w3
    shutil.copytree(src, dst)
    other, mine = proj["up" if take == "gate" else "gate"], proj[take]
    everything = load_dir(src)
    for f in sorted(dst.glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            meta, names = h.metadata(), list(h.keys())
        out = {}
        for n in names:
            t = everything[n]
            if n.endswith(f".{other}.weight_global_scale"):
                t = everything[n.replace(f".{other}.", f".{mine}.")].clone()
            out[n] = t
        save_file(out, f, metadata=meta)
    return dst


# ----------------------------------------------------------------------------------------------------------------
# tests


def _source(example_factory, tmp_path: Path, arch: str, fmt: str, **kw) -> Path:
    src = example_factory(arch, fmt, **kw)
    if fmt == "compressed-tensors":  # see test_compressed_tensors_untied_gate_up_is_served_exactly
        src = _tie_w13_global_scales(src, tmp_path / "tied-src", "gate")
    return src


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("arch", SERVED)
def test_golden_matches_sglang_processing(example_factory, tmp_path, arch, fmt):
    src = _source(example_factory, tmp_path, arch, fmt)
    conv = _convert(src, tmp_path / "conv")
    h = _moe_sizes(_cfg(src))[1]
    for prefix in _prefixes(conv):
        stock = _stock_layer(src, prefix)
        mine = _plugin_layer(conv, prefix)
        assert_same_payload(_payload(stock, h), _payload(mine, h))
        assert mine.intermediate_size_per_partition == stock.intermediate_size_per_partition
        assert mine.trtllm_padded_hidden_size == getattr(stock, "trtllm_padded_hidden_size", None)


def test_compressed_tensors_untied_gate_up_is_served_exactly(example_factory, tmp_path):
    """SGLang's compressed-tensors MoE keeps only the gate weight_global_scale and warns; the kernel takes the up
    half's dequant scale separately (g1_scale_c), so the plugin serves the checkpoint exactly: its g1_scale_c is
    what SGLang's own formula gives with the up scale, everything else is SGLang's bytes."""
    src = example_factory("qwen3_moe", "compressed-tensors", untied_gate_up=True)  # llm-compressor ties them
    w = load_dir(src)
    gate = [t for n, t in w.items() if n.endswith(".gate_proj.weight_global_scale")]
    up = [t for n, t in w.items() if n.endswith(".up_proj.weight_global_scale")]
    assert any(not torch.equal(g, u) for g, u in zip(gate, up)), "the example must have untied gate/up scales"
    conv = _convert(src, tmp_path / "conv")
    prefix = _prefixes(conv)[0]
    mine = _payload(_plugin_layer(conv, prefix), 256)
    stock = _payload(_stock_layer(src, prefix), 256)
    assert [d.split(":")[0] for d in payload_differences(stock, mine)] == ["g1_scale_c"]
    up_side = _payload(_stock_layer(_tie_w13_global_scales(src, tmp_path / "up", "up"), prefix), 256)
    assert torch.equal(_bytes(mine.g1_scale_c), _bytes(up_side.g1_scale_c))


@pytest.mark.parametrize(("tp", "ep"), [(2, 1), (1, 2), (2, 2)])
def test_rank_output_matches_sglang_sharded_processing(example_factory, tmp_path, tp, ep):
    """ModelOpt: every rank's payload equals SGLang's own processing on that rank, byte for byte."""
    src = example_factory("qwen3_moe", "modelopt")
    conv = _convert(src, tmp_path / "conv", tp=tp, ep=ep)
    h = _moe_sizes(_cfg(src))[1]
    prefix = _prefixes(conv)[0]
    for ep_rank in range(ep):
        for tp_rank in range(tp):
            par = dict(tp=tp, ep=ep, tp_rank=tp_rank, ep_rank=ep_rank)
            stock, mine = _stock_layer(src, prefix, **par), _plugin_layer(conv, prefix, **par)
            with get_parallel().override(**_par(**par)):
                assert_same_payload(_payload(stock, h), _payload(mine, h))


KERNEL_FIELDS = ("w13_weight", "w13_weight_scale", "w2_weight", "w2_weight_scale")
SCALAR_FIELDS = ("g1_alphas", "g1_scale_c", "g2_alphas")


@pytest.mark.parametrize(("tp", "ep", "rank_output"), [(2, 1, True), (1, 2, True), (2, 2, True), (1, 2, False)])
def test_compressed_tensors_rank_output_against_sglang(example_factory, tmp_path, tp, ep, rank_output):
    """compressed-tensors: SGLang's own sharded processing differs from ModelOpt's in two ways it is self-consistent
    about, so each rank is compared with SGLang's unsharded processing, sliced to the rank:
    - under EP it takes a1/a2 from the rank's local experts (ModelOpt's path, and nvfp4ckpt, from all experts);
    - under TP, FusedMoE pads I per rank to 128 before loading and slices the checkpoint in padded chunks (rank r
      holds rows [128r, 128r+128)), where nvfp4ckpt splits I evenly and pads each half to 64, as ModelOpt's path.
    Weights are compared with nvfp4ckpt's inverse of the layout (padding out), scalars byte for byte."""
    from nvfp4ckpt.layouts.trtllm_gen.ranks import from_kernel

    src = _source(example_factory, tmp_path, "qwen3_moe", "compressed-tensors")
    conv = _convert(src, tmp_path / "conv", tp=tp, ep=ep) if rank_output else _convert(src, tmp_path / "conv")
    e, h, i, _ = _moe_sizes(_cfg(src))
    prefix = _prefixes(conv)[0]
    whole = _payload(_stock_layer(src, prefix), h)
    w31, s31, down, down_s, zero = from_kernel({f: getattr(whole, f) for f in KERNEL_FIELDS}, h, i)
    assert zero
    e_loc, i_loc = e // ep, i // tp
    for ep_rank in range(ep):
        for tp_rank in range(tp):
            par = dict(tp=tp, ep=ep, tp_rank=tp_rank, ep_rank=ep_rank)
            with get_parallel().override(**_par(**par)):
                stock = _payload(_stock_layer(src, prefix, **par), h)
                mine = _payload(_plugin_layer(conv, prefix, **par), h)
            e0, i0 = ep_rank * e_loc, tp_rank * i_loc
            ex = slice(e0, e0 + e_loc)
            m = from_kernel({f: getattr(mine, f) for f in KERNEL_FIELDS}, h, i_loc)
            assert m[4], "padding must be zero"
            rows = torch.cat([torch.arange(i0, i0 + i_loc), torch.arange(i + i0, i + i0 + i_loc)])  # [up; gate]
            assert torch.equal(u8(m[0]), u8(w31[ex][:, rows]))
            assert torch.equal(u8(m[1]), u8(s31[ex][:, rows]))
            assert torch.equal(u8(m[2]), u8(down[ex][:, :, i0 // 2 : (i0 + i_loc) // 2]))
            assert torch.equal(u8(m[3]), u8(down_s[ex][:, :, i0 // 16 : (i0 + i_loc) // 16]))
            for f in SCALAR_FIELDS:
                assert torch.equal(_bytes(getattr(mine, f)), _bytes(getattr(whole, f)[ex])), f
            assert torch.equal(_bytes(mine.w13_input_scale_quant), _bytes(whole.w13_input_scale_quant))
            assert (mine.local_expert_offset, mine.local_num_experts) == (stock.local_expert_offset, stock.local_num_experts)
            assert mine.global_num_experts == stock.global_num_experts == e
            assert mine.intermediate_size_per_partition == max(64, -(-i_loc // 64) * 64)


def test_engine_ep_on_unsharded_output_slices_experts(example_factory, tmp_path):
    src = example_factory("qwen3_moe", "modelopt")
    conv = _convert(src, tmp_path / "conv")
    h = _moe_sizes(_cfg(src))[1]
    prefix = _prefixes(conv)[0]
    for ep_rank in range(2):  # (compressed-tensors under engine EP: see the test above)
        par = dict(ep=2, ep_rank=ep_rank)
        stock, mine = _stock_layer(src, prefix, **par), _plugin_layer(conv, prefix, **par)
        with get_parallel().override(**_par(**par)):
            assert_same_payload(_payload(stock, h), _payload(mine, h))


def test_tp_mismatch_is_refused(example_factory, tmp_path):
    src = example_factory("qwen3_moe", "modelopt")
    conv = _convert(src, tmp_path / "conv", tp=2)
    prefix = _prefixes(conv)[0]
    with pytest.raises(plugin.InputError, match=r"converted with --tp 2 --ep 1.*convert again with --tp 4 --ep 1"):
        _plugin_layer(conv, prefix, tp=4)
    unsharded = _convert(src, tmp_path / "flat")
    with pytest.raises(plugin.InputError, match=r"converted without --tp.*--tp 2"):
        _plugin_layer(unsharded, prefix, tp=2)


@pytest.mark.parametrize("fmt", FORMATS)
def test_never_shuffles_and_post_processing_is_idempotent(example_factory, tmp_path, monkeypatch, fmt):
    import flashinfer
    import sglang.srt.layers.moe.moe_runner.flashinfer_trtllm as fi_trtllm

    def boom(*a, **k):
        raise AssertionError("the plugin called SGLang's shuffle")

    monkeypatch.setattr(sgl_qutils, "prepare_static_weights_for_trtllm_fp4_moe", boom)
    monkeypatch.setattr(fi_trtllm, "align_fp4_moe_weights_for_flashinfer_trtllm", boom)
    monkeypatch.setattr(flashinfer, "nvfp4_block_scale_interleave", boom)
    monkeypatch.setattr(sgl_qutils, "swizzle_blockscale", boom)
    src = example_factory("deepseek_v3", fmt)
    conv = _convert(src, tmp_path / "conv", tp=2)
    prefix = _prefixes(conv)[0]
    layer = _plugin_layer(conv, prefix, tp=2, tp_rank=1)
    before = {n: (p, p.data_ptr(), _bytes(p.data).clone()) for n, p in layer.named_parameters()}
    for _ in range(2):  # SGLang's end_weight_update runs it again after every update
        layer.quant_method.process_weights_after_loading(layer)
    after = dict(layer.named_parameters())
    assert after.keys() == before.keys()
    for n, (p, ptr, data) in before.items():
        assert after[n] is p and p.data_ptr() == ptr, n
        assert torch.equal(_bytes(p.data), data), n


def _begin_weight_update(model: torch.nn.Module) -> None:
    """What SGLang's WeightUpdater.begin_weight_update runs on each model."""
    from sglang.srt.model_loader.loader import DefaultModelLoader

    DefaultModelLoader.restore_weights_before_loading(model, torch.device("cpu"))


def _end_weight_update(model: torch.nn.Module) -> None:
    """What SGLang's WeightUpdater.end_weight_update runs: post-processing of every quantized module, again."""
    from sglang.srt.model_loader.loader import DefaultModelLoader

    DefaultModelLoader.postprocess_weights(model, torch.device("cpu"))


def test_direct_load_format_with_kernel_tensors(example_factory, tmp_path):
    """update_weights_from_tensor(load_format="direct") copies kernel-layout tensors by parameter name; the
    post-processing end_weight_update runs afterwards must leave them as given."""
    from sglang.srt.model_executor.model_runner_components.weight_updater import _model_load_weights_direct

    src_a, src_b = example_factory("qwen3_moe", "modelopt", seed=0), example_factory("qwen3_moe", "modelopt", seed=1)
    conv_a, conv_b = _convert(src_a, tmp_path / "a"), _convert(src_b, tmp_path / "b")
    prefix = _prefixes(conv_a)[0]
    layer = _plugin_layer(conv_a, prefix)
    model = torch.nn.Module()
    model.add_module("experts", layer)
    new = load_dir(conv_b)
    names = [n for n, _ in layer.named_parameters()]
    ptrs = {n: p.data_ptr() for n, p in layer.named_parameters()}
    tensors = [(f"experts.{n}", new[f"{prefix}.{n}"]) for n in names]
    tensors = [(n, t.reshape(()) if n.endswith("w13_input_scale_quant") else t) for n, t in tensors]
    _begin_weight_update(model)
    _model_load_weights_direct(model, tensors)
    _end_weight_update(model)
    expected = _payload(_plugin_layer(conv_b, prefix), 256)
    assert_same_payload(_payload(layer, 256), expected)
    assert {n: p.data_ptr() for n, p in layer.named_parameters()} == ptrs


@pytest.mark.parametrize(("fmt", "tp", "tp_rank"), [(f, 1, 0) for f in FORMATS] + [(f, 2, 1) for f in FORMATS])
def test_custom_weight_loader_routes_source_tensors_in_place(example_factory, tmp_path, fmt, tp, tp_rank):
    """--custom-weight-loader nvfp4ckpt.engines.sglang.load_weights with SOURCE-named tensors of another
    checkpoint leaves exactly what loading that checkpoint's conversion gives, in the same storage."""
    src_a, src_b = example_factory("qwen3_moe", fmt, seed=0), example_factory("qwen3_moe", fmt, seed=1)
    conv_a, conv_b = _convert(src_a, tmp_path / "a", tp=tp), _convert(src_b, tmp_path / "b", tp=tp)
    prefix = _prefixes(conv_a)[0]
    par = dict(tp=tp, tp_rank=tp_rank)
    layer = _plugin_layer(conv_a, prefix, **par)
    model = torch.nn.Module()
    model.add_module("experts", layer)
    ptrs = {n: p.data_ptr() for n, p in layer.named_parameters()}
    source = {n: t for n, t in load_dir(src_b).items() if n.startswith(prefix + ".")}
    layout = _cfg(conv_a)["quantization_config"]["moe_kernel_layout"]
    rank = tp_rank if tp > 1 else None
    maxima = plugin.input_scale_maxima(model)
    stale = check_live(plugin.live_tensors(model), source, layout, rank=rank, input_scale_maxima=maxima)
    assert not stale.ok
    forwarded: list[str] = []
    model.load_weights = lambda named: forwarded.extend(n for n, _ in named)
    _begin_weight_update(model)
    plugin.load_weights(model, list(source.items()) + [("lm_head.weight", torch.zeros(2, 2))])
    _end_weight_update(model)
    assert forwarded == ["lm_head.weight"]
    check_live_(plugin.live_tensors(model), source, layout, rank=rank, input_scale_maxima=plugin.input_scale_maxima(model))
    with get_parallel().override(**_par(**par)):
        assert_same_payload(_payload(layer, 256), _payload(_plugin_layer(conv_b, prefix, **par), 256))
    assert {n: p.data_ptr() for n, p in layer.named_parameters()} == ptrs


# ----------------------------------------------------------------------------------------------------------------
# the converted config, stock SGLang and the entry point


def _model_config(path: Path):
    from sglang.srt.configs.model_config import ModelConfig

    return ModelConfig(model_path=str(path))


def test_stock_sglang_refuses_converted_files(example_factory, tmp_path, monkeypatch):
    from sglang.srt.layers.quantization import QUANTIZATION_METHODS

    monkeypatch.delitem(QUANTIZATION_METHODS, plugin.QUANT_METHOD)  # SGLang as installed, no plugin
    conv = _convert(example_factory("qwen3_moe", "modelopt"), tmp_path / "conv")
    with pytest.raises(ValueError, match="Unknown quantization method: nvfp4_trtllm"):
        _model_config(conv)
    from sglang.srt.configs.model_config import ModelConfig

    with pytest.raises(ValueError, match=r"\(nvfp4_trtllm\) does not match"):
        ModelConfig(model_path=str(conv), quantization="modelopt_fp4")
    _model_config(example_factory("qwen3_moe", "modelopt"))  # the source itself still loads


def test_entry_point_registers_method_and_model_config_accepts_it(example_factory, tmp_path):
    from importlib.metadata import entry_points

    from sglang.srt.arg_groups.choices import QUANTIZATION_CHOICES
    from sglang.srt.layers.quantization import QUANTIZATION_METHODS, get_quantization_config
    from sglang.srt.configs.load_config import LoadConfig
    from sglang.srt.model_loader.weight_utils import get_quant_config
    from sglang.srt.plugins import load_plugins

    assert any(ep.value == "nvfp4ckpt.engines.sglang:register" for ep in entry_points(group="sglang.srt.plugins"))
    load_plugins()  # what SGLang's engine, scheduler and detokenizer run at start
    assert QUANTIZATION_METHODS[plugin.QUANT_METHOD] is plugin.Nvfp4TrtllmConfig
    assert plugin.QUANT_METHOD in QUANTIZATION_CHOICES
    for fmt in FORMATS:
        conv = _convert(example_factory("deepseek_v3", fmt), tmp_path / fmt)
        mc = _model_config(conv)
        assert mc.quantization == plugin.QUANT_METHOD
        assert get_quantization_config(mc.quantization) is plugin.Nvfp4TrtllmConfig
        qc = get_quant_config(mc, LoadConfig(), {"gate_up_proj": ["gate_proj", "up_proj"]})  # what SGLang's loader calls
        assert isinstance(qc, plugin.Nvfp4TrtllmConfig)
        assert type(qc.inner).__name__ == ("ModelOptFp4Config" if fmt == "modelopt" else "CompressedTensorsConfig")
        assert qc.packed_modules_mapping is qc.inner.packed_modules_mapping
        assert qc.packed_modules_mapping == {"gate_up_proj": ["gate_proj", "up_proj"]}


@pytest.mark.parametrize("family", sorted(plugin.REFUSED_FAMILIES))
def test_refused_families_by_name(example_factory, tmp_path, family):
    conv = _convert(example_factory(family, "modelopt"), tmp_path / "conv")
    with pytest.raises(plugin.InputError, match=f"family '{family}' is not served by the SGLang plugin"):
        plugin.Nvfp4TrtllmConfig.from_config(_cfg(conv)["quantization_config"])


def _moe_only_model(arch: str, qc, cfg: dict, prefixes: list[str]):
    """The model's module tree down to its MoE layers (attention needs a GPU build), with the family's REAL
    SGLang weight-loading code: Qwen3MoeForCausalLM.load_weights, or DeepSeek's DeepseekV2WeightLoaderMixin."""
    from sglang.srt.models.deepseek_common.deepseek_weight_loader import DeepseekV2WeightLoaderMixin
    from sglang.srt.models.qwen3_moe import Qwen3MoeForCausalLM

    class DeepseekMoEOnly(torch.nn.Module, DeepseekV2WeightLoaderMixin):
        def load_weights(self, weights):
            self.do_load_weights(weights)

        def post_load_weights(self, is_nextn=False, weight_names=None):
            pass  # MLA kv_b_proj splitting: attention only, not built here

    class Qwen3MoEOnly(torch.nn.Module):
        load_weights = Qwen3MoeForCausalLM.load_weights

    holder = (Qwen3MoEOnly if arch == "qwen3_moe" else DeepseekMoEOnly)()
    holder.model = torch.nn.Module()
    holder.model.layers = torch.nn.ModuleList()
    n_layers = int(cfg["num_hidden_layers"])
    for n in range(n_layers):
        block = torch.nn.Module()
        prefix = next((p for p in prefixes if f".layers.{n}." in p + "."), None)
        if prefix is not None:
            block.mlp = torch.nn.Module()
            block.mlp.experts = _build(qc, cfg, prefix)
        holder.model.layers.append(block)
    holder.config = types.SimpleNamespace(**{k: v for k, v in cfg.items() if k != "quantization_config"})
    holder.quant_config = qc
    holder.num_fused_shared_experts = 0
    holder.pp_group = types.SimpleNamespace(is_last_rank=True)
    return holder


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3", "kimi_k2"])
def test_model_load_weights_routes_converted_names(example_factory, tmp_path, arch, fmt):
    """SGLang's own model weight loading, fed the converted files' MoE tensors as its loader iterates them
    (top-level *.safetensors), reaches the plugin's parameters by name; the result equals SGLang's processing of the
    source."""
    from sglang.srt.model_loader.weight_utils import safetensors_weights_iterator

    src = _source(example_factory, tmp_path, arch, fmt)
    conv = _convert(src, tmp_path / "conv")
    cfg = _cfg(conv)
    qc = plugin.Nvfp4TrtllmConfig.from_config(cfg["quantization_config"])
    qc.checkpoint_root = str(conv)
    prefixes = _prefixes(conv)
    model = _moe_only_model(arch, qc, cfg, prefixes)
    files = sorted(str(p) for p in conv.glob("*.safetensors"))
    # the tensors of the modules built here (the loaders index params_dict for dense names of unbuilt modules)
    model.load_weights((n, t) for n, t in safetensors_weights_iterator(files) if any(n.startswith(p + ".") for p in prefixes))
    _end_weight_update(model)  # DefaultModelLoader's post-processing of every quantized module
    h = _moe_sizes(cfg)[1]
    for prefix in prefixes:
        layer = model.get_submodule(prefix)
        assert layer._nvfp4ckpt_loaded == set(layer.quant_method._specs(1, 1))
        assert_same_payload(_payload(_stock_layer(src, prefix), h), _payload(layer, h))


def test_missing_or_misshapen_tensor_is_refused(example_factory, tmp_path):
    src = example_factory("qwen3_moe", "modelopt")
    conv = _convert(src, tmp_path / "conv")
    prefix = _prefixes(conv)[0]
    cfg = _cfg(conv)
    qc = plugin.Nvfp4TrtllmConfig.from_config(cfg["quantization_config"])
    layer = _build(qc, cfg, prefix)
    params = dict(layer.named_parameters())
    tensors = load_dir(conv)
    for name, p in params.items():
        if name != "g1_scale_c":
            p.weight_loader(p, tensors[f"{prefix}.{name}"])
    with pytest.raises(plugin.MissingTensorError, match=rf"{re.escape(prefix)}\.g1_scale_c was not loaded"):
        layer.quant_method.process_weights_after_loading(layer)
    p = params["w2_weight"]
    with pytest.raises(plugin.BadTensorError, match=rf"{re.escape(prefix)}\.w2_weight: checkpoint has torch.uint8 \(8, 256, 32\)"):
        p.weight_loader(p, tensors[f"{prefix}.w2_weight"][:, :, :32].contiguous())


def test_moe_layer_under_another_name_is_refused(example_factory, tmp_path):
    conv = _convert(example_factory("qwen3_moe", "modelopt"), tmp_path / "conv")
    cfg = _cfg(conv)
    qc = plugin.Nvfp4TrtllmConfig.from_config(cfg["quantization_config"])
    with pytest.raises(plugin.InputError, match=r"SGLang names MoE layer 'model.layers.0.block_sparse_moe.experts', the checkpoint 'model.layers.0.mlp.experts'"):
        _build(qc, cfg, "model.layers.0.block_sparse_moe.experts")


def _stale_bf16_model(fmt: str, tmp):
    """A producer checkpoint of a seeded bf16 Qwen3-MoE and its conversion; a plugin layer of its first MoE layer with
    stale weights in a model, what that layer holds when loaded from the conversion, and its parameters' pointers."""
    from tests.test_live_update_bf16 import made

    state, src, conv = made("qwen3_moe", fmt, tmp)
    prefix = _prefixes(conv)[0]
    layer = _plugin_layer(conv, prefix)
    expected = _payload(_plugin_layer(conv, prefix), 256)
    model = torch.nn.Module()
    model.add_module("experts", layer)
    ptrs = {n: p.data_ptr() for n, p in layer.named_parameters()}
    for name in ("w13_weight", "w2_weight", "w13_weight_scale", "w2_weight_scale"):
        u8(getattr(layer, name).data).fill_(0x11)  # stale weights, to be replaced
    return state, src, conv, prefix, model, layer, expected, ptrs


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
def test_custom_weight_loader_takes_bf16_expert_weights(tmp_path_factory, fmt):
    """update_weights_from_tensor through the plugin's loader with a trainer's unquantized (bf16) expert weights:
    quantized as the producer does, the live layer equals the plugin layer loaded from the producer's converted
    checkpoint (real ModelOpt / llm-compressor output of the same bf16 model), in the same storage."""
    from nvfp4ckpt.layouts.trtllm_gen.converted import open_converted
    from tests.test_live_update_bf16 import bf16_experts

    state, src, conv, prefix, model, layer, expected, ptrs = _stale_bf16_model(fmt, tmp_path_factory.mktemp("sglang-bf16"))
    named = bf16_experts(state, prefix, open_converted(conv).layer(prefix))
    forwarded: list[str] = []
    model.load_weights = lambda pairs: forwarded.extend(n for n, _ in pairs)
    _begin_weight_update(model)
    plugin.load_weights(model, list(named.items()))
    _end_weight_update(model)
    assert forwarded == []
    assert_same_payload(_payload(layer, 256), expected)
    layout = _cfg(conv)["quantization_config"]["moe_kernel_layout"]
    check_live_(plugin.live_tensors(model), src, layout, input_scale_maxima=plugin.input_scale_maxima(model))
    assert {n: p.data_ptr() for n, p in layer.named_parameters()} == ptrs


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
def test_custom_weight_loader_takes_transformers5_stacked_experts(tmp_path_factory, fmt):
    """A transformers-5 trainer's whole state dict through the plugin's loader: this layer's stacked experts
    (``mlp.experts.gate_up_proj`` [E, 2I, H], ``down_proj``) are written in place as the producer's checkpoint;
    everything else (the other layer's experts included: a layer this process does not hold) reaches SGLang's own
    loader under the names sent."""
    from nvfp4ckpt.layouts.trtllm_gen.converted import open_converted
    from tests.test_live_update_stacked import stacked_of

    state, src, conv, prefix, model, layer, expected, ptrs = _stale_bf16_model(fmt, tmp_path_factory.mktemp("sglang-stacked"))
    forwarded: list[str] = []
    model.load_weights = lambda pairs: forwarded.extend(n for n, _ in pairs)
    _begin_weight_update(model)
    plugin.load_weights(model, list(state.items()))
    _end_weight_update(model)
    assert sorted(forwarded) == sorted(set(state) - set(stacked_of(state, prefix)))
    assert_same_payload(_payload(layer, 256), expected)
    layout = _cfg(conv)["quantization_config"]["moe_kernel_layout"]
    check_live_(plugin.live_tensors(model), src, layout, input_scale_maxima=plugin.input_scale_maxima(model))
    assert {n: p.data_ptr() for n, p in layer.named_parameters()} == ptrs

"""In-place updates from transformers-5 STACKED expert tensors: ``model.state_dict()`` of a transformers-5 MoE model
names its experts ``<...>.experts.gate_up_proj`` [E, 2I, H] and ``<...>.experts.down_proj`` [E, H, I] (Nemotron-H:
``up_proj`` [E, I, H]). Sent as they are, they must leave the live layer byte for byte as the same weights sent per
expert (``experts.N.gate_proj.weight``, ...), and as the producer's converted checkpoint of the same bf16 model.

The stacked names and tensors are taken from real transformers-5 models (``tests.producers.tiny_model``, or a
model built from the family's example config), never spelled by hand.
"""

from __future__ import annotations

import re

import pytest
import torch

from nvfp4ckpt import convert_checkpoint
from nvfp4ckpt.errors import (
    BadTensorError,
    DuplicateTensorError,
    InputError,
    UnknownTensorError,
)
from nvfp4ckpt.example import write_example
from nvfp4ckpt.layouts.trtllm_gen.converted import open_converted
from nvfp4ckpt.runtime import load_moe_layer
from nvfp4ckpt.runtime.update import UpdateStream, update_live_
from nvfp4ckpt.runtime.update import stacked as stacked_mod
from nvfp4ckpt.runtime.update.names import Context
from nvfp4ckpt.source import architectures
from tests.test_live_update import assert_layer_equals, assert_untouched, snapshot
from tests.test_live_update_bf16 import assert_each_refused, made, scramble

_STACKED = re.compile(r"\.experts\.(gate_up_proj|up_proj|down_proj)$")


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("stacked")


def layer_index(prefix: str) -> int:
    return int(re.search(r"\.layers\.(\d+)\.", prefix)[1])


def stacked_of(state: dict, prefix: str) -> dict[str, torch.Tensor]:
    """The transformers-5 stacked expert tensors of the layout layer ``prefix`` (on-disk name), found in a real
    model's state dict by layer index only: whatever transformers calls the module is what is sent."""
    n = layer_index(prefix)
    out = {k: v for k, v in state.items() if _STACKED.search(k) and f".layers.{n}." in k and "shared" not in k}
    assert len(out) == 2, sorted(out)
    return out


def per_expert_of(stacked: dict[str, torch.Tensor], info) -> dict[str, torch.Tensor]:
    """The same weights under the source checkpoint's per-expert names (copies: the existing bf16 path's input)."""
    i, names, out = info.intermediate_size, info.proj_names, {}
    for name, t in stacked.items():
        param = name.rpartition(".")[2]
        for e in range(t.shape[0]):
            if param == "gate_up_proj":  # rows [0:I] are gate (``gate, up = ....chunk(2, dim=-1)``)
                out[f"{info.prefix}.{e}.{names['gate']}.weight"] = t[e, :i].clone()
                out[f"{info.prefix}.{e}.{names['up']}.weight"] = t[e, i:].clone()
            else:
                role = "down" if param == "down_proj" else "up"
                out[f"{info.prefix}.{e}.{names[role]}.weight"] = t[e].clone()
    return out


def live_of(layer) -> dict[str, torch.Tensor]:
    return {f"{layer.prefix}.{k}": v for k, v in layer.tensors.items()}


# ---------------------------------------------------------------------------------------------------------------------
# Against the real producers (nvidia-modelopt, llm-compressor) of the same seeded bf16 transformers-5 model


@pytest.mark.slow
@pytest.mark.parametrize(
    "arch,fmt",
    [("qwen3_moe", "modelopt"), ("qwen3_moe", "compressed-tensors"), ("mixtral", "modelopt"), ("mixtral", "compressed-tensors"),
     ("deepseek_v3", "modelopt"), ("deepseek_v3", "compressed-tensors"), ("nemotron_h", "compressed-tensors")],
)  # fmt: skip
def test_stacked_update_equals_per_expert_and_the_producer(tmp, arch, fmt):
    state, src, conv = made(arch, fmt, tmp)
    ckpt = open_converted(conv)
    for info in ckpt.layers:
        stacked = stacked_of(state, info.prefix)
        assert all(t.dtype == torch.bfloat16 and t.dim() == 3 for t in stacked.values())
        layer = load_moe_layer(conv, info.prefix)
        ptrs = {k: v.data_ptr() for k, v in layer.tensors.items()}
        scramble(layer)
        report = layer.update_(stacked)
        assert {k: v.data_ptr() for k, v in layer.tensors.items()} == ptrs
        assert report.layers[info.prefix].experts == list(range(info.num_experts))
        assert_layer_equals(layer, conv)  # the producer's checkpoint, converted: gate/up order and all scales
        from_stacked = snapshot(layer)
        assert layer.check_live(tensors=stacked).ok
        assert layer.check_live(source=src).ok

        scramble(layer, seed=9)
        layer.update_(per_expert_of(stacked, info))  # the existing bf16 path
        for name, value in snapshot(layer).items():
            assert torch.equal(value, from_stacked[name]), name


def test_real_names_differ_from_the_checkpoint_where_transformers_renames(tmp):
    """Mixtral's transformers-5 module is ``mlp`` (on disk ``block_sparse_moe``), Nemotron-H's model is ``model``
    (on disk ``backbone``): the names a trainer sends are not the checkpoint's, and are still taken."""
    from tests import producers

    for arch, sent, on_disk in (
        ("mixtral", "model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.block_sparse_moe.experts"),
        ("nemotron_h", "model.layers.1.mixer.experts.up_proj", "backbone.layers.1.mixer.experts"),
    ):
        config = producers.tiny_config(arch)
        with torch.device("meta"):
            from transformers import AutoModelForCausalLM

            names = list(AutoModelForCausalLM.from_config(config).state_dict())
        assert sent in names and not any(on_disk in n for n in names)
        layout = _example_layout(tmp, arch, "compressed-tensors")
        ctx = Context(layout, None)
        assert on_disk in ctx.targets
        t = _zeros_for(ctx, on_disk, sent.rpartition(".")[2])
        out, ignored, labels = stacked_mod.expand(ctx, {sent: t}, ignore_unknown=False, complete=False)
        assert not ignored and all(n.startswith(on_disk + ".") for n in out) and set(labels) == set(out)


def test_views_share_the_trainers_storage(tmp):
    layout = _example_layout(tmp, "qwen3_moe", "modelopt")
    ctx = Context(layout, None)
    prefix = next(iter(ctx.targets))
    i = ctx.targets[prefix].info.intermediate_size
    gate_up = torch.randn(_shape(ctx, prefix, "gate_up_proj"), dtype=torch.bfloat16, requires_grad=True)
    down = torch.randn(_shape(ctx, prefix, "down_proj"), dtype=torch.bfloat16)
    out, _, labels = stacked_mod.expand(ctx, {f"{prefix}.gate_up_proj": gate_up, f"{prefix}.down_proj": down}, False)
    gate3, up3 = out[f"{prefix}.3.gate_proj.weight"], out[f"{prefix}.3.up_proj.weight"]
    assert gate3.untyped_storage().data_ptr() == gate_up.untyped_storage().data_ptr() == up3.untyped_storage().data_ptr()
    assert torch.equal(gate3, gate_up.detach()[3, :i]) and torch.equal(up3, gate_up.detach()[3, i:])
    assert not gate3.requires_grad
    assert labels[f"{prefix}.3.up_proj.weight"] == f"{prefix}.gate_up_proj[3, {i}:{2 * i}]"
    assert stacked_mod.expand(ctx, {f"{prefix}.3.gate_proj.weight": down[0]}, False)[0].keys() == {f"{prefix}.3.gate_proj.weight"}


def test_qwen3_5_text_model_names_map_to_language_model(tmp):
    """Qwen3_5MoeForCausalLM drops ``language_model`` (transformers' PrefixChange for qwen3_5_text); the checkpoint
    (and so the layout) keeps ``model.language_model.layers``."""
    layout = _example_layout(tmp, "qwen3_next", "modelopt")
    layout = {**layout, "layers": {p.replace("model.layers.", "model.language_model.layers."): v for p, v in layout["layers"].items()}}
    ctx = Context(layout, None)
    prefix = next(iter(ctx.targets))
    sent = prefix.replace("model.language_model.layers.", "model.layers.") + ".down_proj"
    out, _, _ = stacked_mod.expand(ctx, {sent: _zeros_for(ctx, prefix, "down_proj")}, False, complete=False)
    assert f"{prefix}.0.down_proj.weight" in out


# ---------------------------------------------------------------------------------------------------------------------
# Every family with transformers-5 stacked experts: a real transformers-5 model built from the example's config


def _hf_model(arch_name: str, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    arch = architectures.get(arch_name)
    cfg = arch.example_config()
    cfg = cfg.get("text_config", cfg)
    model_type = arch.hf_model_type or cfg["model_type"]
    config = AutoConfig.for_model(model_type, **{k: v for k, v in cfg.items() if k != "model_type"})
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)


@pytest.mark.slow
@pytest.mark.parametrize("arch", stacked_mod.families())
def test_every_family_stacked_equals_per_expert(tmp, arch):
    fmt = "modelopt" if arch != "nemotron_h" else "compressed-tensors"
    src = tmp / f"ex-{arch}"
    if not (tmp / f"ex-{arch}-c").exists():
        write_example(src, format=fmt, arch=arch)
        convert_checkpoint(src, tmp / f"ex-{arch}-c")
    conv = tmp / f"ex-{arch}-c"
    state = {k: v.detach() for k, v in _hf_model(arch).state_dict().items()}
    for info in open_converted(conv).layers:
        stacked = stacked_of(state, info.prefix)
        layer = load_moe_layer(conv, info.prefix)
        ptrs = {k: v.data_ptr() for k, v in layer.tensors.items()}
        loaded = snapshot(layer)
        layer.update_(stacked)
        assert {k: v.data_ptr() for k, v in layer.tensors.items()} == ptrs
        from_stacked = snapshot(layer)
        assert not torch.equal(from_stacked["w13_weight"], loaded["w13_weight"])
        assert layer.check_live(tensors=stacked).ok
        # a fresh layer (its zero padding, Nemotron-H's I=192, is never written), through the existing bf16 path
        layer = load_moe_layer(conv, info.prefix)
        layer.update_(per_expert_of(stacked, info))
        for name, value in snapshot(layer).items():
            assert torch.equal(value, from_stacked[name]), f"{arch} {info.prefix}.{name}"


# ---------------------------------------------------------------------------------------------------------------------
# Refusals: one line, naming the tensor, nothing written


def _layer(tmp, arch="qwen3_moe", fmt="modelopt"):
    state, _, conv = made(arch, fmt, tmp)
    info = open_converted(conv).layers[-1]
    layer = load_moe_layer(conv, info.prefix)
    return stacked_of(state, info.prefix), info, layer, snapshot(layer), {k: v.data_ptr() for k, v in layer.tensors.items()}


@pytest.mark.slow
def test_stacked_refusals_write_nothing(tmp):
    stacked, info, layer, before, ptrs = _layer(tmp)
    gu, dn = sorted(stacked, key=lambda n: "down" in n)
    i = info.intermediate_size
    per = per_expert_of(stacked, info)
    nan = stacked[gu].clone()
    nan[5, 3, 7] = float("nan")
    cases = [
        ("fewer experts", BadTensorError, rf"{re.escape(gu)}: is \[7, 256, 256\]; .* wants \[8, 256, 256\]; it holds every expert",
         {gu: stacked[gu][:7], dn: stacked[dn]}),
        ("transposed", BadTensorError, rf"{re.escape(dn)}: is \[8, 128, 256\]; .* wants \[8, 256, 128\]",
         {gu: stacked[gu], dn: stacked[dn].transpose(1, 2)}),
        ("2-D", BadTensorError, rf"{re.escape(dn)}: is \[256, 128\]", {gu: stacked[gu], dn: stacked[dn][0]}),
        ("int dtype", BadTensorError, rf"{re.escape(dn)}: is torch.int16", {gu: stacked[gu], dn: stacked[dn].to(torch.int16)}),
        ("uint8", BadTensorError, rf"{re.escape(gu)}: is uint8 .*no producer writes stacked NVFP4",
         {gu: stacked[gu].view(torch.uint8)[..., :256], dn: stacked[dn]}),
        ("mixed with per-expert", DuplicateTensorError, rf"{re.escape(info.prefix)}.4.down_proj.weight and {re.escape(dn)}: expert 4",
         {**stacked, f"{info.prefix}.4.down_proj.weight": per[f"{info.prefix}.4.down_proj.weight"]}),
        ("stacked gate_up, per-expert down", DuplicateTensorError, r"sent both per-expert and stacked",
         {gu: stacked[gu], **{n: t for n, t in per.items() if ".down_proj." in n}}),
        ("gate_up alone", InputError, rf"{re.escape(gu)}: sent without {re.escape(dn)}", {gu: stacked[gu]}),
        ("NaN named as sent", BadTensorError, rf"{re.escape(gu)}\[5, 0:{i}\].*NaN.*refused", {gu: nan, dn: stacked[dn]}),
        ("unknown layer", UnknownTensorError, r"model.layers.7.mlp.experts.down_proj: a transformers-5 stacked expert tensor",
         {**stacked, "model.layers.7.mlp.experts.down_proj": stacked[dn]}),
    ]  # fmt: skip
    assert_each_refused(layer, cases, before, ptrs)


@pytest.mark.slow
def test_two_spellings_of_one_stacked_tensor_are_refused(tmp):
    """Mixtral: transformers-5's ``mlp`` and the checkpoint's ``block_sparse_moe`` name the same layer."""
    stacked, _, layer, before, ptrs = _layer(tmp, "mixtral")
    gu = next(n for n in stacked if n.endswith("gate_up_proj"))
    assert ".mlp." in gu
    with pytest.raises(DuplicateTensorError, match=r"two names for .*block_sparse_moe.experts gate_up_proj"):
        layer.update_({**stacked, gu.replace(".mlp.", ".block_sparse_moe."): stacked[gu]})
    assert_untouched(layer, before, ptrs)


@pytest.mark.slow
def test_ignore_unknown_reports_stacked_names_as_sent(tmp):
    """A trainer's whole state dict: other layers' stacked tensors and non-expert weights are ignored by their own
    names (an engine hands those to its own loader)."""
    state, _, conv = made("deepseek_v3", "compressed-tensors", tmp)
    info = open_converted(conv).layers[-1]
    layer = load_moe_layer(conv, info.prefix)
    live = live_of(layer)
    held = {k for k in stacked_of(state, info.prefix)}
    report = update_live_(live, state, layer.descriptor, ignore_unknown=True)
    assert set(report.layers) == {info.prefix}
    assert set(report.ignored) == set(state) - held
    assert_layer_equals(layer, conv)


# ---------------------------------------------------------------------------------------------------------------------
# UpdateStream


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["modelopt", "compressed-tensors"])
def test_stream_takes_stacked_tensors_one_at_a_time(tmp, fmt):
    state, _, conv = made("mixtral", fmt, tmp)
    info = open_converted(conv).layers[0]
    stacked = stacked_of(state, info.prefix)
    layer = load_moe_layer(conv, info.prefix)
    scramble(layer)
    stream = UpdateStream(live_of(layer), layer.descriptor)
    gu, dn = sorted(stacked, key=lambda n: "down" in n)
    assert stream.add({gu: stacked[gu]}) == []  # held: the experts are not complete yet
    assert len(stream.pending_names) == 2 * info.num_experts
    done = stream.add({dn: stacked[dn]})
    assert len(done) == 1 and done[0].layers[info.prefix].experts == list(range(info.num_experts))
    assert stream.finish() == [] and not stream.pending_names
    assert_layer_equals(layer, conv)


@pytest.mark.slow
def test_stream_refusal_names_the_stacked_tensor(tmp):
    stacked, _, layer, before, ptrs = _layer(tmp)
    stream = UpdateStream(live_of(layer), layer.descriptor)
    gu, dn = sorted(stacked, key=lambda n: "down" in n)
    bad = stacked[dn].clone()
    bad[2].fill_(float("inf"))
    stream.add({gu: stacked[gu]})
    with pytest.raises(BadTensorError, match=rf"{re.escape(dn)}\[2\].*infinite"):
        stream.add({dn: bad})
    assert_untouched(layer, before, ptrs)


# ---------------------------------------------------------------------------------------------------------------------


def _example_layout(tmp, arch: str, fmt: str) -> dict:
    import json

    conv = tmp / f"layout-{arch}-{fmt}"
    if not conv.exists():
        write_example(tmp / f"layout-{arch}-{fmt}-src", format=fmt, arch=arch)
        convert_checkpoint(tmp / f"layout-{arch}-{fmt}-src", conv)
    return json.loads((conv / "config.json").read_text())["quantization_config"]["moe_kernel_layout"]


def _shape(ctx: Context, prefix: str, param: str) -> tuple[int, int, int]:
    info = ctx.targets[prefix].info
    e, h, i = info.num_experts, info.hidden_size, info.intermediate_size
    return {"gate_up_proj": (e, 2 * i, h), "up_proj": (e, i, h), "down_proj": (e, h, i)}[param]


def _zeros_for(ctx: Context, prefix: str, param: str) -> torch.Tensor:
    return torch.zeros(_shape(ctx, prefix, param), dtype=torch.bfloat16)

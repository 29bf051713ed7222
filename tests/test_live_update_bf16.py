"""In-place updates from UNQUANTIZED expert weights (issue 21): the bf16 weights a trainer holds, quantized as the
source's producer quantizes them, must leave the live layer byte for byte equal to the producer's checkpoint after
`convert`. The checkpoints are made here by the real producers (nvidia-modelopt, llm-compressor) from the same
seeded bf16 model whose weights the update then sends.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nvfp4ckpt import convert_checkpoint
from nvfp4ckpt.errors import BadTensorError, InputError, StaleScalarError, UnknownTensorError
from nvfp4ckpt.layouts.trtllm_gen.converted import open_converted
from nvfp4ckpt.runtime import load_moe_layer
from nvfp4ckpt.runtime.update import UpdateStream, update_live_
from tests import producers
from tests.conftest import interpreted, u8
from tests.test_live_update import assert_layer_equals, assert_untouched, layer_source, snapshot
from tests.test_live_update_table import on_cpu

# the table path under Triton's interpreter without CUDA (tests/conftest.py: interpreted)
layout_write, quantize_write = interpreted("nvfp4ckpt.runtime.kernels.layout_write", "nvfp4ckpt.runtime.kernels.quantize_write")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the one-pass kernel: compiled on CUDA, interpreted here
KEEP = ("w13_input_scale", "w2_input_scale", "w13_input_global_scale", "w2_input_global_scale")  # calibration
_MADE: dict = {}


def made(arch: str, fmt: str, tmp: Path) -> tuple[dict, Path, Path]:
    """(bf16 state dict of the seeded model, producer checkpoint, its conversion), made once per module."""
    key = (arch, fmt)
    if key not in _MADE:
        state = {k: v.detach().clone() for k, v in producers.tiny_model(arch, 0).state_dict().items()}
        make = producers.make_modelopt_checkpoint if fmt == "modelopt" else producers.make_compressed_tensors_checkpoint
        src = make(tmp / f"{arch}-{fmt}", arch, 0)
        convert_checkpoint(src, tmp / f"{arch}-{fmt}-c")
        _MADE[key] = (state, src, tmp / f"{arch}-{fmt}-c")
    return _MADE[key]


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("bf16")


def bf16_experts(state: dict, layer_prefix: str, info, experts=None) -> dict[str, torch.Tensor]:
    """The trainer's unquantized expert weights of one layer under the source checkpoint's names."""
    layer = int(layer_prefix.split(".layers.")[1].split(".")[0])
    fused = state[f"model.layers.{layer}.mlp.experts.gate_up_proj"]  # [E, 2I, H], gate rows first
    down = state[f"model.layers.{layer}.mlp.experts.down_proj"]  # [E, H, I]
    i = fused.shape[1] // 2
    names = info.proj_names
    out = {}
    for e in range(fused.shape[0]) if experts is None else experts:
        out[f"{layer_prefix}.{e}.{names['gate']}.weight"] = fused[e, :i].clone()
        out[f"{layer_prefix}.{e}.{names['up']}.weight"] = fused[e, i:].clone()
        out[f"{layer_prefix}.{e}.{names['down']}.weight"] = down[e].clone()
    return out


def scramble(layer, seed: int = 7) -> None:
    """Random bytes in every live tensor except the input scales (calibration, which a weight update keeps)."""
    g = torch.Generator().manual_seed(seed)
    for name, t in layer.tensors.items():
        if name not in KEEP:
            u8(t).copy_(torch.randint(0, 256, (u8(t).numel(),), dtype=torch.uint8, generator=g).view(u8(t).shape))
    for name in ("w13_weight_scale_2", "w2_weight_scale_2", "g1_alphas", "g1_scale_c", "g2_alphas", "w13_input_scale_quant"):
        if name in layer.tensors:  # positive and finite, but wrong
            t = layer.tensors[name]
            t.copy_(torch.empty(t.shape, dtype=t.dtype).uniform_(0.5, 2.0, generator=g))


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["modelopt", "compressed-tensors"])
@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "deepseek_v3"])
def test_bf16_update_equals_the_producers_checkpoint(tmp, arch, fmt):
    state, src, conv = made(arch, fmt, tmp)
    ckpt = open_converted(conv)
    for info in ckpt.layers:
        layer = load_moe_layer(conv, info.prefix)
        ptrs = {k: v.data_ptr() for k, v in layer.tensors.items()}
        scramble(layer)
        named = bf16_experts(state, info.prefix, info)
        assert all(t.dtype == torch.bfloat16 for t in named.values())
        report = layer.update_(named)
        assert {k: v.data_ptr() for k, v in layer.tensors.items()} == ptrs
        assert_layer_equals(layer, conv)  # weights, block scales, global and per-expert scales, derived scalars
        assert report.layers[info.prefix].experts == list(range(info.num_experts))
        assert layer.check_live(source=src).ok
        assert layer.check_live(tensors=named).ok


@pytest.mark.slow
def test_bf16_and_nvfp4_experts_mixed_and_streamed(tmp, monkeypatch):
    """Some experts unquantized, others as the producer's NVFP4 tensors, through the CPU path; then one tensor per
    add() through a stream, with torch-quantized chunks of one expert on the CPU path."""
    from nvfp4ckpt.runtime.update import dense

    state, src, conv = made("qwen3_moe", "compressed-tensors", tmp)
    info = open_converted(conv).layers[-1]
    nvfp4 = {n: t for n, t in layer_source(src, info.prefix).items() if n.startswith(tuple(f"{info.prefix}.{e}." for e in (0, 3, 5)))}
    bf16 = bf16_experts(state, info.prefix, info, [e for e in range(info.num_experts) if e not in (0, 3, 5)])
    layer = load_moe_layer(conv, info.prefix)
    scramble(layer)
    layer.update_({**nvfp4, **bf16})
    assert_layer_equals(layer, conv)

    monkeypatch.setattr(dense, "CHUNK_FRACTION", 0.0)  # one expert per quantized chunk
    scramble(layer, seed=8)
    live = {f"{info.prefix}.{k}": v for k, v in layer.tensors.items()}
    stream = UpdateStream(live, layer.descriptor)
    for name, t in {**bf16, **nvfp4}.items():
        stream.add({name: t})
    stream.finish()
    assert_layer_equals(layer, conv)


def _layer(tmp, fmt="modelopt"):
    state, src, conv = made("qwen3_moe", fmt, tmp)
    info = open_converted(conv).layers[-1]
    layer = load_moe_layer(conv, info.prefix)
    return state, info, layer, snapshot(layer), {k: v.data_ptr() for k, v in layer.tensors.items()}


@pytest.mark.slow
def test_bf16_refusals_write_nothing(tmp):
    state, info, layer, before, ptrs = _layer(tmp)
    named = bf16_experts(state, info.prefix, info)
    p = info.prefix
    gate, down = f"{p}.6.gate_proj.weight", f"{p}.7.down_proj.weight"
    cases = [
        ("shape", BadTensorError, rf"{down}: is \[\d+, \d+\]; the layer's down weight", {**named, down: named[down][:, :64]}),
        ("nan", BadTensorError, rf"{gate}.*NaN.*refused", {**named, gate: named[gate].clone().index_fill_(0, torch.tensor([3]), float("nan"))}),
        ("inf", BadTensorError, rf"{down}.*infinite", {**named, down: named[down].clone().fill_(float("inf"))}),
        ("all zero (ModelOpt writes NaN scales)", BadTensorError, r"every weight .* is 0", {**named, down: torch.zeros_like(named[down])}),
        ("int dtype", BadTensorError, rf"{down}: is torch.int16", {**named, down: named[down].to(torch.int16)}),
        ("not whole", InputError, r"expert 7 has unquantized weights for gate, up but not", {k: v for k, v in named.items() if k != down}),
    ]
    assert_each_refused(layer, cases, before, ptrs)


@pytest.mark.slow
def test_bf16_all_zero_expert_under_compressed_tensors_is_what_llm_compressor_writes(tmp):
    """llm-compressor writes an all-zero projection as global scale 1.0, block scales 0.125, codes 0: so does the update."""
    state, info, layer, _, _ = _layer(tmp, "compressed-tensors")
    named = bf16_experts(state, info.prefix, info)
    down = f"{info.prefix}.2.down_proj.weight"
    named[down] = torch.zeros_like(named[down])
    layer.update_(named)
    w2 = layer.tensors["w2_weight"][2]
    assert int(u8(w2).count_nonzero()) == 0
    assert torch.equal(layer.tensors["w2_weight_global_scale"][2].reshape(()), torch.tensor(1.0))
    assert bool((layer.tensors["w2_weight_scale"][2].float() == 0.125).all())


@pytest.mark.slow
def test_bf16_without_live_input_scales_needs_them_supplied(tmp):
    """Input scales come from calibration: without them live (a plugin that keeps other forms) they must be sent."""
    state, info, layer, before, ptrs = _layer(tmp)
    named = bf16_experts(state, info.prefix, info, [1])
    live = {f"{info.prefix}.{k}": v for k, v in layer.tensors.items() if k not in KEEP}
    maxima = {info.prefix: (float(layer.tensors["w13_input_scale"].max()), float(layer.tensors["w2_input_scale"].max()))}
    with pytest.raises(StaleScalarError, match=r"expert 1 is sent unquantized without .*input_scale.*send them"):
        update_live_(live, named, layer.descriptor, input_scale_maxima=maxima)
    assert_untouched(layer, before, ptrs)
    w13_in, w2_in = layer.tensors["w13_input_scale"][1], layer.tensors["w2_input_scale"][1]
    for r, v in (("gate_proj", w13_in[0]), ("up_proj", w13_in[1]), ("down_proj", w2_in)):
        named[f"{info.prefix}.1.{r}.input_scale"] = v.clone()
    update_live_(live, named, layer.descriptor, input_scale_maxima=maxima)
    got = {k: u8(v) for k, v in layer.tensors.items()}
    want = open_converted(made("qwen3_moe", "modelopt", tmp)[2]).read_layer(info)
    for name in ("w13_weight", "w13_weight_scale", "w2_weight", "w2_weight_scale"):
        assert torch.equal(got[name][1], u8(want[name])[1]), name


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["modelopt", "compressed-tensors"])
@pytest.mark.parametrize("staged", [False, True])
def test_bf16_one_pass_kernel_gives_the_producers_bytes(tmp, monkeypatch, fmt, staged):
    """The GPU path (runtime/kernels/quantize_write.py: bf16 read once, codes and scales written into live), here
    under Triton's interpreter: the producer's checkpoint byte for byte, with sources read in place or staged (as
    host tensors are for a GPU engine), mixed with NVFP4 experts that take the copy kernels."""
    from nvfp4ckpt.runtime.update import table, write

    monkeypatch.setattr(write, "CPU_TABLE", True)
    monkeypatch.setattr(write, "STAGE_ALL", staged)
    monkeypatch.setattr(table, "STAGING_FRACTION", 0.0)  # one tensor per staged chunk
    launches = []
    real = quantize_write.launch
    monkeypatch.setattr(quantize_write, "launch", lambda *a, **k: launches.append(a[3]) or real(*a, **k))
    state, src, conv = made("deepseek_v3", fmt, tmp)
    for info in open_converted(conv).layers:
        layer = load_moe_layer(conv, info.prefix, DEVICE)
        scramble(layer)
        nvfp4 = {n: t for n, t in layer_source(src, info.prefix).items() if n.startswith(f"{info.prefix}.1.")}
        named = {**bf16_experts(state, info.prefix, info, [e for e in range(info.num_experts) if e != 1]), **nvfp4}
        launches.clear()
        layer.update_(named)
        assert launches and set(launches) == {torch.bfloat16}  # really the one-pass kernel
        assert_layer_equals(on_cpu(layer), conv)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["modelopt", "compressed-tensors"])
def test_one_pass_kernel_on_cuda_gives_the_cpu_bytes(example_factory, tmp_path, fmt):
    """On CUDA the one-pass kernel (bf16 read once) writes exactly the bytes of the CPU path, which the tests above
    hold to the real producers' checkpoints; host (pinned) and device sources, pointers unchanged."""
    src = example_factory("qwen3_moe", fmt, 0)
    convert_checkpoint(src, tmp_path / "c")
    info = open_converted(tmp_path / "c").layers[-1]
    g = torch.Generator().manual_seed(5)
    h, i = info.hidden_size, info.intermediate_size
    named = {}
    for e in range(info.num_experts):
        for r, shape in (("gate", (i, h)), ("up", (i, h)), ("down", (h, i))):
            named[f"{info.prefix}.{e}.{info.proj_names[r]}.weight"] = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
    cpu = load_moe_layer(tmp_path / "c", info.prefix)
    cpu.update_(named)
    for sources in ({n: t.cuda() for n, t in named.items()}, {n: t.pin_memory() for n, t in named.items()}):
        gpu = load_moe_layer(tmp_path / "c", info.prefix, "cuda")
        ptrs = {k: v.data_ptr() for k, v in gpu.tensors.items()}
        gpu.update_(sources)
        assert {k: v.data_ptr() for k, v in gpu.tensors.items()} == ptrs
        for name, t in cpu.tensors.items():
            assert torch.equal(u8(gpu.tensors[name].cpu()), u8(t)), name
        assert gpu.check_live(tensors=sources).ok


# ----------------------------------------------------------------------------------------------
# ModelOpt's fused Llama-4 experts sent unquantized: gate_up_proj [E, H, 2I] and down_proj [E, I, H] as the trainer
# holds them (transformers' Llama4TextExperts); ModelOpt quantizes each with ONE weight_scale_2 over every expert.


def fused_bf16(state: dict, prefix: str) -> dict[str, torch.Tensor]:
    """The trainer's fused expert tensors of one Llama-4 layer (``prefix`` = ``...feed_forward.experts``)."""
    return {f"{prefix}.{p}": state[f"{prefix}.{p}"].clone() for p in ("gate_up_proj", "down_proj")}


@pytest.mark.slow
def test_bf16_fused_llama4_update_equals_modelopts_checkpoint(tmp):
    """Every live byte (codes, swizzled block scales, weight_scale_2 of every expert, derived scalars) equals the
    conversion of ModelOpt 0.47's own checkpoint of the same bf16 model; the fused input scales sent or kept live
    give the same; pointers unchanged; check_live against the producer's checkpoint and the bf16 tensors."""
    state, src, conv = made("llama4", "modelopt", tmp)
    layers = open_converted(conv).layers
    assert len(layers) == 2 and all(info.source_fused for info in layers)
    for info in layers:
        layer = load_moe_layer(conv, info.prefix)
        ptrs = {k: v.data_ptr() for k, v in layer.tensors.items()}
        named = fused_bf16(state, info.prefix)
        assert named[f"{info.prefix}.gate_up_proj"].shape == (info.num_experts, info.hidden_size, 2 * info.intermediate_size)
        scramble(layer)
        report = layer.update_(named)
        assert {k: v.data_ptr() for k, v in layer.tensors.items()} == ptrs
        assert_layer_equals(layer, conv)
        assert report.layers[info.prefix].experts == list(range(info.num_experts))
        ws2 = layer.tensors["w13_weight_scale_2"]
        assert (ws2 == ws2[0, 0]).all() and (layer.tensors["w2_weight_scale_2"] == layer.tensors["w2_weight_scale_2"][0]).all()
        assert layer.check_live(source=src).ok
        assert layer.check_live(tensors=named).ok
        # with the source's fused input scales sent along (as a trainer holding calibration would): the same bytes
        source = layer_source(src, info.prefix)
        scales = {n: t for n, t in source.items() if n.endswith("_input_scale")}
        assert len(scales) == 2
        scramble(layer, seed=9)
        layer.update_({**named, **scales})
        assert_layer_equals(layer, conv)
        # a non-contiguous trainer tensor (e.g. a transposed parameter) reads the same values
        odd = {n: t.transpose(1, 2).contiguous().transpose(1, 2) for n, t in named.items()}
        scramble(layer, seed=10)
        layer.update_(odd)
        assert_layer_equals(layer, conv)


@pytest.mark.slow
def test_bf16_fused_llama4_on_tp_ep_ranks(tmp):
    """tp=2 x ep=2: each rank gets the whole fused tensors and writes its experts' share of the intermediate dim."""
    state, src, _ = made("llama4", "modelopt", tmp)
    conv = tmp / "llama4-modelopt-tp2ep2"
    if not conv.exists():
        convert_checkpoint(src, conv, tp=2, ep=2)
    info = open_converted(conv).layers[-1]
    named = fused_bf16(state, info.prefix)
    scales = {n: t for n, t in layer_source(src, info.prefix).items() if n.endswith("_input_scale")}
    for rank in range(4):
        layer = load_moe_layer(conv, info.prefix, rank=rank)
        # without the fused input scales: this rank's live tensors show only its experts' (a1/a2 span all experts)
        before, ptrs = snapshot(layer), {k: v.data_ptr() for k, v in layer.tensors.items()}
        with pytest.raises(StaleScalarError, match=rf"gate_up_proj is sent unquantized without {info.prefix}.gate_up_proj_input_scale"):
            layer.update_(named)
        assert_untouched(layer, before, ptrs)
        scramble(layer)
        report = layer.update_({**named, **scales})
        assert report.layers[info.prefix].experts == list(range(layer.rank.expert_start, layer.rank.expert_end))
        assert_layer_equals(layer, conv, rank)
        assert layer.check_live(tensors={**named, **scales}).ok


@pytest.mark.slow
def test_bf16_fused_llama4_streamed_and_chunked(tmp, monkeypatch):
    """One tensor per add(): applied once both fused weights are held; quantized one expert at a time with the
    tensor's scale (the chunk must not compute its own)."""
    from nvfp4ckpt.runtime.update import dense

    monkeypatch.setattr(dense, "CHUNK_FRACTION", 0.0)
    state, _, conv = made("llama4", "modelopt", tmp)
    info = open_converted(conv).layers[0]
    layer = load_moe_layer(conv, info.prefix)
    scramble(layer)
    live = {f"{info.prefix}.{k}": v for k, v in layer.tensors.items()}
    stream = UpdateStream(live, layer.descriptor)
    items = list(fused_bf16(state, info.prefix).items())
    assert stream.add(dict(items[:1])) == []  # gate_up alone: held
    assert len(stream.add(dict(items[1:]))) == 1
    assert stream.finish() == [] and not stream.pending_names
    assert_layer_equals(layer, conv)


@pytest.mark.slow
@pytest.mark.parametrize("staged", [False, True])
def test_bf16_fused_llama4_one_pass_kernel(tmp, monkeypatch, staged):
    """The one-pass kernel reads each expert of the fused tensors in place as a transposed view (column stride 2I or
    H in its table), or staged: ModelOpt's bytes, under Triton's interpreter."""
    from nvfp4ckpt.runtime.update import table, write

    monkeypatch.setattr(write, "CPU_TABLE", True)
    monkeypatch.setattr(write, "STAGE_ALL", staged)
    monkeypatch.setattr(table, "STAGING_FRACTION", 0.0)
    tables = []
    real = quantize_write.launch
    monkeypatch.setattr(quantize_write, "launch", lambda *a, **k: tables.append(a[0].clone()) or real(*a, **k))
    state, src, conv = made("llama4", "modelopt", tmp)
    info = open_converted(conv).layers[-1]
    layer = load_moe_layer(conv, info.prefix, DEVICE)
    scramble(layer)
    named = {n: t.to(DEVICE) for n, t in fused_bf16(state, info.prefix).items()}
    layer.update_(named)
    strides = {int(s) for t in tables for s in t[:, 10]}
    assert tables and strides == ({1} if staged else {2 * info.intermediate_size, info.hidden_size})
    assert_layer_equals(on_cpu(layer), conv)
    # a tp x ep rank: the kernel starts inside each expert's intermediate dim (down's columns via the column stride)
    ranked = tmp / "llama4-modelopt-tp2ep2"
    if not ranked.exists():
        convert_checkpoint(src, ranked, tp=2, ep=2)
    scales = {n: t.to(DEVICE) for n, t in layer_source(src, info.prefix).items() if n.endswith("_input_scale")}
    layer = load_moe_layer(ranked, info.prefix, DEVICE, rank=3)
    assert layer.rank.inter_start > 0
    scramble(layer)
    tables.clear()
    layer.update_({**named, **scales})
    assert tables
    assert_layer_equals(on_cpu(layer), ranked, 3)


@pytest.mark.slow
def test_bf16_fused_llama4_refusals_write_nothing(tmp):
    state, src, conv = made("llama4", "modelopt", tmp)
    info = open_converted(conv).layers[-1]
    layer = load_moe_layer(conv, info.prefix)
    before, ptrs = snapshot(layer), {k: v.data_ptr() for k, v in layer.tensors.items()}
    named = fused_bf16(state, info.prefix)
    p = info.prefix
    gu, down = f"{p}.gate_up_proj", f"{p}.down_proj"
    nvfp4 = layer_source(src, p)
    nan = named[gu].clone()
    nan[5, 3, 200] = float("nan")
    cases = [
        ("transposed", BadTensorError, rf"{down}: is \[8, 256, 128\]; the layer's unquantized fused down_proj is \[8, 128, 256\]",
         {**named, down: named[down].transpose(1, 2).contiguous()}),
        ("experts", BadTensorError, rf"{gu}: is \[7, 256, 256\]", {**named, gu: named[gu][:7]}),
        ("nan", BadTensorError, rf"{gu}: expert 5: the weight contains NaN; the update is refused", {**named, gu: nan}),
        ("inf", BadTensorError, rf"{down}: expert 0: the weight contains an infinite value", {**named, down: named[down].clone().fill_(float("-inf"))}),
        ("all zero", BadTensorError, rf"{down}: every weight of the fused tensor is 0 .*NaN block scales", {**named, down: torch.zeros_like(named[down])}),
        ("int", BadTensorError, rf"{down}: is torch.int32", {**named, down: named[down].to(torch.int32)}),
        ("half quantized", InputError, rf"{down}: is sent quantized while {gu} is sent unquantized",
         {gu: named[gu], **{n: t for n, t in nvfp4.items() if n.startswith(down)}}),
        ("one alone", InputError, rf"{down}: is missing while {gu} is sent unquantized", {gu: named[gu]}),
        ("with its scales", InputError, rf"{gu}_weight_scale_2: {gu} is sent unquantized; do not send its quantized scales",
         {**named, f"{gu}_weight_scale_2": nvfp4[f"{gu}_weight_scale_2"]}),
        ("mixed forms", InputError, r"mixes fused .* and per-expert tensors", {**named, f"{p}.0.gate_proj.weight": named[gu][0, :, :128].T}),
    ]
    for what, error, pattern, bad in cases:
        with pytest.raises(error, match=pattern) as exc:
            layer.update_(bad)
        assert "\n" not in str(exc.value), what
        assert_untouched(layer, before, ptrs)
    # an all-zero EXPERT inside a non-zero tensor is what ModelOpt exports finite (block scales 1.0, codes 0)
    zero = {**named, gu: named[gu].clone()}
    zero[gu][2] = 0
    layer.update_(zero)
    assert int(u8(layer.tensors["w13_weight"][2]).count_nonzero()) == 0
    assert bool((layer.tensors["w13_weight_scale"][2].float() == 1.0).all())
    assert layer.check_live(tensors=zero).ok


def test_fused_names_under_compressed_tensors_say_only_modelopt_has_them(example_factory, tmp_path):
    """compressed-tensors has no fused Llama-4 form: its layouts refuse gate_up_proj/down_proj by saying so (even with
    ignore_unknown: these are expert tensors, skipping them would leave the experts stale)."""
    src = example_factory("llama4", "compressed-tensors", 0)
    convert_checkpoint(src, tmp_path / "c")
    info = open_converted(tmp_path / "c").layers[0]
    layer = load_moe_layer(tmp_path / "c", info.prefix)
    before, ptrs = snapshot(layer), {k: v.data_ptr() for k, v in layer.tensors.items()}
    e, h, i = info.num_experts, info.hidden_size, info.intermediate_size
    live = {f"{info.prefix}.{k}": v for k, v in layer.tensors.items()}
    for ignore in (False, True):
        with pytest.raises(UnknownTensorError, match=r"gate_up_proj: a fused Llama-4 expert tensor, but this layout's source "
                           r"is compressed-tensors, which has no fused form \(only ModelOpt"):  # fmt: skip
            update_live_(live, {f"{info.prefix}.gate_up_proj": torch.zeros(e, h, 2 * i, dtype=torch.bfloat16)},
                         layer.descriptor, ignore_unknown=ignore)  # fmt: skip
    assert_untouched(layer, before, ptrs)


def assert_each_refused(layer, cases, before, ptrs) -> None:
    """Each (what, error, message pattern, tensors) update is refused with one line and writes nothing."""
    for what, error, pattern, bad in cases:
        with pytest.raises(error, match=pattern) as exc:
            layer.update_(bad)
        assert "\n" not in str(exc.value), what
        assert_untouched(layer, before, ptrs)

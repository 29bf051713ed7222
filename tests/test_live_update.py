"""In-place updates of live kernel-layout tensors (nvfp4ckpt.runtime.update): seed A's converted layer, updated with seed B's
SOURCE tensors, must equal seed B's converted tensors byte for byte, without moving any tensor."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from nvfp4ckpt import convert_checkpoint, write_example
from nvfp4ckpt.source.checkpoint import open_checkpoint
from nvfp4ckpt.layouts.trtllm_gen.converted import open_converted
from nvfp4ckpt.errors import (
    BadTensorError,
    InputError,
    LiveMismatchError,
    MissingTensorError,
    StaleScalarError,
    UnknownTensorError,
)
from nvfp4ckpt.runtime.update import check_live, check_live_, update_live_
from nvfp4ckpt.runtime import load_moe_layer
from tests.conftest import u8

_CONVERTED: dict[tuple, Path] = {}


@pytest.fixture(scope="module")
def converted(example_factory, tmp_path_factory):
    """(arch, fmt, seed, tp, ep, overrides) -> (source folder, converted folder), cached for the module."""

    def make(arch="qwen3_moe", fmt="modelopt", seed=0, tp=1, ep=1, overrides: tuple = ()):
        key = (arch, fmt, seed, tp, ep, overrides)
        if key not in _CONVERTED:
            if overrides:
                src = tmp_path_factory.mktemp(f"src-{arch}-{fmt}-{seed}")
                write_example(src, arch=arch, format=fmt, seed=seed, config_overrides=dict(overrides))
            else:
                src = example_factory(arch, fmt, seed)
            dst = tmp_path_factory.mktemp(f"conv-{arch}-{fmt}-{seed}-{tp}-{ep}")
            convert_checkpoint(src, dst / "out", tp=tp, ep=ep)
            _CONVERTED[key] = (src, dst / "out")
        return _CONVERTED[key]

    return make


def layer_source(src: Path, prefix: str) -> dict[str, torch.Tensor]:
    """One layer's source tensors, read with the source checkpoint reader (as a trainer would emit them)."""
    ckpt = open_checkpoint(src)
    layer = next(l for l in ckpt.layers if l.prefix == prefix)
    return {n: ckpt.files.read(n) for n in layer.source_names()}


def expert_names(named: dict[str, torch.Tensor], prefix: str, experts) -> dict[str, torch.Tensor]:
    keep = tuple(f"{prefix}.{e}." for e in experts)
    return {n: t for n, t in named.items() if n.startswith(keep)}


def assert_layer_equals(layer, conv: Path, rank: int | None = None) -> None:
    ckpt = open_converted(conv)
    info = ckpt.layer(layer.prefix)
    spec = next(r for r in info.ranks if r.rank == rank) if rank is not None else None
    want = ckpt.read_layer(info, rank=spec)
    assert want.keys() == layer.tensors.keys()
    for name, value in want.items():
        assert torch.equal(u8(layer.tensors[name]), u8(value)), f"{layer.prefix}.{name} differs"


def snapshot(layer) -> dict[str, torch.Tensor]:
    return {k: u8(v).clone() for k, v in layer.tensors.items()}


def assert_untouched(layer, before: dict[str, torch.Tensor], ptrs: dict[str, int]) -> None:
    for k, v in layer.tensors.items():
        assert v.data_ptr() == ptrs[k], k
        assert torch.equal(u8(v), before[k]), f"{k} was written by a refused update"


def merged_source(a: Path, b: Path, out: Path, names: set[str], keep_from_a: tuple[str, ...] = ()) -> Path:
    """A's source checkpoint with the tensors in ``names`` taken from B (except suffixes in ``keep_from_a``): the
    checkpoint a partial update should be equivalent to. Written with the real safetensors library."""
    shutil.copytree(a, out)
    b_ckpt = open_checkpoint(b)
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(f, "pt") as sf:
            meta = sf.metadata()
        tensors = load_file(f)
        for n in tensors:
            if n in names and not n.endswith(keep_from_a):
                tensors[n] = b_ckpt.files.read(n)
        save_file(tensors, f, metadata=meta)
    return out


# ----------------------------------------------------------------------------------------------
# Whole-layer updates: every format and expert form


@pytest.mark.parametrize(
    "arch,fmt",
    [
        ("qwen3_moe", "modelopt"),
        ("qwen3_moe", "compressed-tensors"),
        ("deepseek_v3", "modelopt"),
        ("mixtral", "compressed-tensors"),
        ("llama4", "modelopt"),  # fused gate_up_proj / down_proj experts
        ("nemotron_h", "modelopt"),  # non-gated relu2, I padded 192 -> 256
    ],
)
def test_update_equals_the_converted_seed(converted, arch, fmt):
    src_a, conv_a = converted(arch, fmt, 0)
    src_b, conv_b = converted(arch, fmt, 1)
    for info in open_converted(conv_a).layers:
        layer = load_moe_layer(conv_a, info.prefix)
        ptrs = {k: v.data_ptr() for k, v in layer.tensors.items()}
        named = layer_source(src_b, info.prefix)
        if arch == "llama4":
            assert any(n.endswith(".gate_up_proj") for n in named)  # really the fused form
        report = layer.update_(named)
        assert {k: v.data_ptr() for k, v in layer.tensors.items()} == ptrs
        assert_layer_equals(layer, conv_b)
        done = report.layers[info.prefix]
        assert done.experts == list(range(info.num_experts)) and done.scalar_rows == list(range(info.num_experts))
        want = open_converted(conv_b).read_layer(info)
        for name, value in done.scalars.items():  # the report carries the canonical scalars for engine plugins
            assert torch.equal(u8(value), u8(want[name])), name
        assert layer.check_live(source=src_b).ok
        assert layer.check_live(tensors=named).ok
        assert not layer.check_live(source=src_a).ok


@pytest.mark.parametrize("arch,fmt,tp", [("qwen3_moe", "modelopt", 1), ("llama4", "modelopt", 1), ("mixtral", "compressed-tensors", 2)])
def test_torch_strided_path_gives_the_same_bytes(converted, monkeypatch, arch, fmt, tp):
    """The "strided" writer (the one GPUs use) on the CPU: the same bytes as the numpy path the CPU uses."""
    from nvfp4ckpt.runtime import update as live
    from nvfp4ckpt.runtime.update import names, plan as planning, write

    monkeypatch.setattr(write, "CPU_NUMPY", False)
    _, conv_a = converted(arch, fmt, 0, tp=tp)
    src_b, conv_b = converted(arch, fmt, 1, tp=tp)
    for rank in range(tp):
        for info in open_converted(conv_a).layers:
            r = rank if tp > 1 else None
            layer = load_moe_layer(conv_a, info.prefix, rank=r)
            named = layer_source(src_b, info.prefix)
            ctx = names.Context(layer.descriptor, r)
            plan = planning.plan_layer(ctx, info.prefix, ctx.group(named, False)[0][info.prefix], live._layer_live(layer), None)
            assert write._path(plan, torch.device("cpu")) == "strided"  # really the path under test
            layer.update_(named)
            assert_layer_equals(layer, conv_b, rank if tp > 1 else None)
            assert layer.check_live(tensors=named).ok
            w2s = layer.tensors["w2_weight_scale"]
            u8(w2s)[-1] ^= 0x40
            result = layer.check_live(tensors=named)
            u8(w2s)[-1] ^= 0x40
            last = layer.rank.expert_end - 1 if layer.rank else layer.num_experts - 1
            assert not result.ok and result.tensor.endswith(".w2_weight_scale") and result.expert == last, result


def stacked_like_a_trainer(named: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The same tensors as per-expert views of one stacked buffer per projection and kind (as a trainer holding
    grouped-GEMM weights emits them)."""
    out = dict(named)
    groups: dict[str, list[str]] = {}
    for n in named:
        e, rest = n[len(prefix) + 1 :].split(".", 1)
        groups.setdefault(rest, []).append(n)
    for rest, names in groups.items():
        names.sort(key=lambda n: int(n[len(prefix) + 1 :].split(".", 1)[0]))
        buf = torch.stack([named[n] for n in names])
        out.update({n: buf[k] for k, n in enumerate(names)})
    return out


@pytest.mark.parametrize("numpy_on_cpu", [True, False])
@pytest.mark.parametrize("tp,ep", [(1, 1), (2, 2)])
def test_stacked_trainer_buffers_are_written_a_run_at_a_time(converted, monkeypatch, numpy_on_cpu, tp, ep):
    from nvfp4ckpt.runtime.update import write as live

    monkeypatch.setattr(live, "CPU_NUMPY", numpy_on_cpu)
    runs = []
    real = live._stacked_views
    monkeypatch.setattr(live, "_stacked_views", lambda *a: runs.append(r := real(*a)) or r)
    _, conv_a = converted("qwen3_moe", "modelopt", 0, tp=tp, ep=ep)
    src_b, conv_b = converted("qwen3_moe", "modelopt", 1, tp=tp, ep=ep)
    prefix = "model.layers.1.mlp.experts"
    named = stacked_like_a_trainer(layer_source(src_b, prefix), prefix)
    for rank in range(tp * ep) if tp * ep > 1 else [None]:
        layer = load_moe_layer(conv_a, prefix, rank=rank)
        ptrs = {k: v.data_ptr() for k, v in layer.tensors.items()}
        layer.update_(named)
        assert {k: v.data_ptr() for k, v in layer.tensors.items()} == ptrs
        assert_layer_equals(layer, conv_b, rank)
    assert runs and all(r is not None for r in runs)  # every kernel tensor went a run of experts at a time


def test_update_from_gpu_style_mapping_and_whole_state_dict(converted):
    """Model level: an engine's subset of canonical tensors, named tensors for the whole model (non-expert names
    ignored on request), every layer routed to its own tensors."""
    src_a, conv_a = converted("deepseek_v3", "modelopt", 0)
    src_b, conv_b = converted("deepseek_v3", "modelopt", 1)
    ckpt_a, ckpt_b = open_converted(conv_a), open_converted(conv_b)
    keep = ("w13_weight", "w13_weight_scale", "w2_weight", "w2_weight_scale", "g1_alphas", "g1_scale_c", "g2_alphas",
            "w13_input_scale_quant")  # fmt: skip
    live = {}
    for info in ckpt_a.layers:
        t = ckpt_a.read_layer(info)
        live |= {f"{info.prefix}.{k}": t[k] for k in keep}
    everything = {n: open_checkpoint(src_b).files.read(n) for n in open_checkpoint(src_b).files.tensors}
    with pytest.raises(UnknownTensorError, match="not an expert tensor"):
        update_live_(live, everything, ckpt_a.descriptor)
    report = update_live_(live, everything, ckpt_a.descriptor, ignore_unknown=True)
    assert set(report.layers) == {l.prefix for l in ckpt_a.layers}
    assert report.ignored and not any(".experts." in n for n in report.ignored)
    for info in ckpt_b.layers:
        want = ckpt_b.read_layer(info)
        for k in keep:
            assert torch.equal(u8(live[f"{info.prefix}.{k}"]), u8(want[k])), k
    assert check_live(live, src_b, ckpt_a.descriptor).ok


# ----------------------------------------------------------------------------------------------
# Subsets of experts


@pytest.mark.parametrize("fmt", ["modelopt", "compressed-tensors"])
def test_subset_equals_converting_the_merged_source(converted, tmp_path, fmt):
    src_a, conv_a = converted("qwen3_moe", fmt, 0)
    src_b, _ = converted("qwen3_moe", fmt, 1)
    prefix = "model.layers.1.mlp.experts"
    named = expert_names(layer_source(src_b, prefix), prefix, (1, 6))
    merged = merged_source(src_a, src_b, tmp_path / "merged", set(named))
    convert_checkpoint(merged, tmp_path / "merged-conv")

    layer = load_moe_layer(conv_a, prefix)
    ptrs = {k: v.data_ptr() for k, v in layer.tensors.items()}
    report = layer.update_(named)
    assert report.layers[prefix].experts == [1, 6]
    assert {k: v.data_ptr() for k, v in layer.tensors.items()} == ptrs
    assert_layer_equals(layer, tmp_path / "merged-conv")
    assert layer.check_live(source=merged).ok
    other = load_moe_layer(conv_a, 0)  # a layer not in the update is not touched by it
    assert_layer_equals(other, tmp_path / "merged-conv")


def test_subset_that_changes_a1_needs_the_other_experts_weight_scale_2(converted, tmp_path):
    """Live without the stored weight_scale_2 (as an engine may pass it): a partial update that moves a1 would leave
    every other expert's g1_alphas stale, so it is refused; with them live it goes through."""
    src_a, conv_a = converted("qwen3_moe", "modelopt", 0)
    src_b, _ = converted("qwen3_moe", "modelopt", 1)
    prefix = "model.layers.1.mlp.experts"
    named = expert_names(layer_source(src_b, prefix), prefix, (2,))
    raised = {n: (t * 4 if n.endswith("input_scale") else t) for n, t in named.items()}  # a new layer maximum
    layer = load_moe_layer(conv_a, prefix)
    desc = open_converted(conv_a).descriptor
    live = {f"{prefix}.{k}": v for k, v in layer.tensors.items() if k not in ("w13_weight_scale_2", "w2_weight_scale_2")}
    before, ptrs = snapshot(layer), {k: v.data_ptr() for k, v in layer.tensors.items()}
    with pytest.raises(StaleScalarError, match=r"weight_scale_2 of experts outside the update.*experts\.0\.gate_proj\.weight_scale_2"):
        update_live_(live, raised, desc)
    assert_untouched(layer, before, ptrs)

    merged = merged_source(src_a, src_b, tmp_path / "merged", set(named))
    for f in merged.glob("*.safetensors"):  # the same x4 input scales, in the merged source
        with safe_open(f, "pt") as sf:
            meta = sf.metadata()
        t = load_file(f)
        t.update({n: v for n, v in raised.items() if n in t})
        save_file(t, f, metadata=meta)
    convert_checkpoint(merged, tmp_path / "merged-conv")
    layer.update_(raised)
    assert_layer_equals(layer, tmp_path / "merged-conv")


# ----------------------------------------------------------------------------------------------
# --tp/--ep ranks


@pytest.mark.parametrize(
    "arch,fmt,tp,ep",
    [
        ("qwen3_moe", "compressed-tensors", 2, 2),
        ("llama4", "modelopt", 2, 2),  # fused experts, sliced per rank
        ("mixtral", "modelopt", 4, 1),  # I 128 / 4 = 32 per rank, padded to 64 per half: the index-map path
    ],
)
def test_rank_layers_take_only_their_slice(converted, arch, fmt, tp, ep):
    src_a, conv_a = converted(arch, fmt, 0, tp=tp, ep=ep)
    src_b, conv_b = converted(arch, fmt, 1, tp=tp, ep=ep)
    prefix = open_converted(conv_a).layers[-1].prefix
    named = {n: t.requires_grad_() if t.is_floating_point() and t.dtype == torch.float32 else t
             for n, t in layer_source(src_b, prefix).items()}  # a trainer's parameters  # fmt: skip
    for rank in range(tp * ep):
        layer = load_moe_layer(conv_a, prefix, rank=rank)
        ptrs = {k: v.data_ptr() for k, v in layer.tensors.items()}
        report = layer.update_(named)  # every rank gets the whole layer and keeps its share
        assert {k: v.data_ptr() for k, v in layer.tensors.items()} == ptrs
        assert report.layers[prefix].experts == list(range(layer.rank.expert_start, layer.rank.expert_end))
        assert_layer_equals(layer, conv_b, rank)
        assert layer.global_input_scales == load_moe_layer(conv_b, prefix, rank=rank).global_input_scales
        assert layer.check_live(source=src_b).ok


def test_rank_subset_keeps_or_refuses_a1(converted, tmp_path):
    """A rank sees only its experts' input scales. A partial update with unchanged input scales keeps the global
    a1/a2 (and equals converting the merged source); one that lowers every input scale this rank could see the
    maximum in is refused, since the maximum may then drop, and nothing is written."""
    src_a, conv_a = converted("qwen3_moe", "modelopt", 0, tp=2, ep=2)
    src_b, _ = converted("qwen3_moe", "modelopt", 1)
    prefix = "model.layers.0.mlp.experts"
    a_named = layer_source(src_a, prefix)
    b_named = layer_source(src_b, prefix)
    names = set(expert_names(b_named, prefix, (1, 6)))
    named = {n: (a_named[n] if n.endswith(".input_scale") else b_named[n]) for n in names}  # new weights, same input scales
    merged = merged_source(src_a, src_b, tmp_path / "merged", names, keep_from_a=(".input_scale",))
    convert_checkpoint(merged, tmp_path / "merged-conv", tp=2, ep=2)
    for rank in range(4):
        layer = load_moe_layer(conv_a, prefix, rank=rank)
        layer.update_(named)
        assert_layer_equals(layer, tmp_path / "merged-conv", rank)

    layer = load_moe_layer(conv_a, prefix, rank=0)  # experts 0..3
    lowered = {n: (t / 2 if n.endswith(".input_scale") else t) for n, t in expert_names(a_named, prefix, range(4)).items()}
    before, ptrs = snapshot(layer), {k: v.data_ptr() for k, v in layer.tensors.items()}
    with pytest.raises(StaleScalarError, match=r"a1 .* may drop.*update the whole layer"):
        layer.update_(lowered)
    assert_untouched(layer, before, ptrs)
    # with the whole layer in the update the rank knows every input scale: accepted
    whole = {**a_named, **lowered}
    report = layer.update_(whole)
    assert report.layers[prefix].input_scale_maxima[0] == float(max(t for n, t in whole.items() if n.endswith(("gate_proj.input_scale", "up_proj.input_scale"))))


# ----------------------------------------------------------------------------------------------
# Padding


@pytest.mark.parametrize("fmt", ["modelopt", "compressed-tensors"])
def test_padded_layers(converted, fmt):
    overrides = (("hidden_size", 192), ("moe_intermediate_size", 80))  # both H and I padded
    src_a, conv_a = converted("qwen3_moe", fmt, 0, overrides=overrides)
    src_b, conv_b = converted("qwen3_moe", fmt, 1, overrides=overrides)
    prefix = "model.layers.1.mlp.experts"
    layer = load_moe_layer(conv_a, prefix)
    assert layer.intermediate_padded == 128 and layer.hidden_padded == 256
    layer.update_(layer_source(src_b, prefix))
    assert_layer_equals(layer, conv_b)
    assert layer.check_live(source=src_b).ok
    # a byte in the padding (never written by updates) is reported: the kernel would read it
    w2 = layer.tensors["w2_weight"]
    w2[3, 5, -1] = 0x11
    result = layer.check_live(source=src_b)
    assert not result.ok and result.tensor == f"{prefix}.w2_weight" and result.expert == 3 and "padding" in result.message


# ----------------------------------------------------------------------------------------------
# Refusals: nothing is written


def _refusal_cases(prefix: str, named: dict[str, torch.Tensor], fmt_weight: str):
    up = f"{prefix}.3.up_proj.{fmt_weight}"
    scale = f"{prefix}.3.up_proj.weight_scale"
    ws2 = f"{prefix}.3.gate_proj.weight_scale_2"
    yield "shape", BadTensorError, r"up_proj\.weight.*\[127, 128\]", {**named, up: named[up][:-1]}
    yield "dtype", BadTensorError, r"weight_scale: is torch.uint8", {**named, scale: named[scale].view(torch.uint8)}
    yield "scalar dtype", BadTensorError, "scalar dtype", {**named, ws2: named[ws2].double()}
    yield "unknown", UnknownTensorError, "not an expert tensor", {**named, f"{prefix}.3.up_proj.bias": named[up]}
    yield "unknown layer", UnknownTensorError, "not an expert tensor", {**named, up.replace("layers.1.", "layers.7."): named[up]}
    yield "expert range", UnknownTensorError, "expert 8 but", {**named, up.replace(".3.", ".8."): named[up]}
    yield "stale scalars", StaleScalarError, r"without .*gate_proj\.weight_scale_2.*stale", {k: v for k, v in named.items() if k != ws2}
    yield "missing weight", MissingTensorError, r"without .*up_proj\.weight\b", {k: v for k, v in named.items() if k != up}
    yield "non-finite", BadTensorError, "not finite and positive", {**named, ws2: torch.tensor(float("inf"))}


def test_refusals_leave_the_layer_untouched(converted):
    src_a, conv_a = converted("qwen3_moe", "modelopt", 0)
    src_b, _ = converted("qwen3_moe", "modelopt", 1)
    prefix = "model.layers.1.mlp.experts"
    named = layer_source(src_b, prefix)
    layer = load_moe_layer(conv_a, prefix)
    before, ptrs = snapshot(layer), {k: v.data_ptr() for k, v in layer.tensors.items()}
    for what, error, pattern, bad in _refusal_cases(prefix, named, "weight"):
        with pytest.raises(error, match=pattern) as exc:
            layer.update_(bad)
        assert "\n" not in str(exc.value), what
        assert_untouched(layer, before, ptrs)
    # a live tensor of the wrong shape (another rank's, say) is refused too
    live = {f"{prefix}.{k}": v for k, v in layer.tensors.items()}
    live[f"{prefix}.w2_weight"] = live[f"{prefix}.w2_weight"][:4]
    with pytest.raises(BadTensorError, match="live .*w2_weight"):
        update_live_(live, named, open_converted(conv_a).descriptor)
    assert_untouched(layer, before, ptrs)
    with pytest.raises(InputError, match="rank"):
        update_live_(live, named, open_converted(conv_a).descriptor, rank=1)


# ----------------------------------------------------------------------------------------------
# check_live


def test_check_live_catches_one_flipped_byte_in_each_tensor(converted):
    src_a, conv_a = converted("qwen3_moe", "compressed-tensors", 0)
    prefix = "model.layers.1.mlp.experts"
    layer = load_moe_layer(conv_a, prefix)
    named = layer_source(src_a, prefix)
    assert layer.check_live(tensors=named).ok
    for name, t in layer.tensors.items():
        flat = u8(t) if t.is_contiguous() else None
        assert flat is not None and flat.data_ptr() == t.data_ptr()
        where = flat.numel() - 1 if t.shape[0] > 1 else 0  # last expert's last byte
        flat[where] ^= 0x01
        result = layer.check_live(tensors=named)
        flat[where] ^= 0x01
        assert not result.ok and result.tensor == f"{prefix}.{name}", (name, result)
        if name != "w13_input_scale_quant":
            assert result.expert == 7, (name, result)
        if name in ("w13_weight", "w13_weight_scale", "w2_weight", "w2_weight_scale"):
            assert result.row is not None and result.source_tensor.startswith(f"{prefix}.7.")
            with pytest.raises(LiveMismatchError, match=rf"{name}: expert 7, row \d+ differs"):
                flat[where] ^= 0x01
                try:
                    check_live_({f"{prefix}.{k}": v for k, v in layer.tensors.items()}, named, open_converted(conv_a).descriptor)
                finally:
                    flat[where] ^= 0x01
    assert layer.check_live(tensors=named).ok


def test_check_live_catches_a_stale_scalar(converted):
    src_a, conv_a = converted("qwen3_moe", "compressed-tensors", 0)
    src_b, _ = converted("qwen3_moe", "compressed-tensors", 1)
    prefix = "model.layers.1.mlp.experts"
    layer = load_moe_layer(conv_a, prefix)
    old = layer.tensors["g1_alphas"].clone()
    layer.update_(layer_source(src_b, prefix))
    assert layer.check_live(source=src_b).ok
    layer.tensors["g1_alphas"][5] = old[5]  # as a reload that forgot the dependent scalars (SGLang #25190)
    result = layer.check_live(source=src_b)
    assert not result.ok and result.tensor == f"{prefix}.g1_alphas" and result.expert == 5 and "stale" in result.message


@pytest.mark.gpu
def test_update_on_cuda_keeps_pointers_and_graphs(converted):
    src_a, conv_a = converted("qwen3_moe", "modelopt", 0)
    src_b, conv_b = converted("qwen3_moe", "modelopt", 1)
    prefix = "model.layers.1.mlp.experts"
    layer = load_moe_layer(conv_a, prefix, "cuda")
    ptrs = {k: v.data_ptr() for k, v in layer.tensors.items()}
    w = layer.tensors["w13_weight"]
    out = torch.empty_like(w)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out.copy_(w)
    named = layer_source(src_b, prefix)
    layer.update_({n: t.cuda() for n, t in expert_names(named, prefix, range(4)).items()})  # GPU tensors
    layer.update_(expert_names(named, prefix, range(4, 8)))  # host tensors
    assert {k: v.data_ptr() for k, v in layer.tensors.items()} == ptrs
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out.cpu(), open_converted(conv_b).read_layer(open_converted(conv_b).layer(prefix))["w13_weight"])
    assert_layer_equals(type("L", (), {"prefix": prefix, "tensors": {k: v.cpu() for k, v in layer.tensors.items()}})(), conv_b)
    assert layer.check_live(source=src_b).ok


def test_engine_style_global_input_scales_on_a_rank(converted, tmp_path):
    """SGLang keeps every expert's input scales on each rank ([E_global, 2]): then a rank can follow a partial update
    that lowers the maximum, and writes the global rows."""
    src_a, conv_a = converted("qwen3_moe", "modelopt", 0, tp=2, ep=2)
    prefix = "model.layers.0.mlp.experts"
    a_named = layer_source(src_a, prefix)
    lowered = {n: (t / 2 if n.endswith(".input_scale") else t) for n, t in expert_names(a_named, prefix, range(4)).items()}
    merged = tmp_path / "merged"
    shutil.copytree(src_a, merged)
    for f in merged.glob("*.safetensors"):
        with safe_open(f, "pt") as sf:
            meta = sf.metadata()
        t = load_file(f)
        t.update({n: v for n, v in lowered.items() if n in t})
        save_file(t, f, metadata=meta)
    convert_checkpoint(merged, tmp_path / "ranks", tp=2, ep=2)
    convert_checkpoint(merged, tmp_path / "whole")
    whole = open_converted(tmp_path / "whole").read_layer(open_converted(tmp_path / "whole").layer(prefix))
    full_a = open_converted(conv_a).reassemble_layer(open_converted(conv_a).layer(prefix))

    layer = load_moe_layer(conv_a, prefix, rank=0)
    live = {f"{prefix}.{k}": v for k, v in layer.tensors.items()}
    live[f"{prefix}.w13_input_scale"] = full_a["w13_input_scale"].clone()  # every expert's, as the engine holds them
    live[f"{prefix}.w2_input_scale"] = full_a["w2_input_scale"].clone()
    report = update_live_(live, lowered, layer.descriptor, rank=0)
    assert report.layers[prefix].experts == [0, 1, 2, 3]
    ranks = open_converted(tmp_path / "ranks")
    want = ranks.read_layer(ranks.layer(prefix), rank=ranks.layer(prefix).ranks[0])
    for k, v in want.items():
        if k not in ("w13_input_scale", "w2_input_scale"):  # live holds the global ones instead of these
            assert torch.equal(u8(live[f"{prefix}.{k}"]), u8(v)), k
    for k in ("w13_input_scale", "w2_input_scale"):
        assert torch.equal(u8(live[f"{prefix}.{k}"]), u8(whole[k])), k
    # experts of other ranks: this rank writes nothing of theirs but their rows of the every-expert input scales
    other = {n: (t * 3 if n.endswith(".input_scale") else t) for n, t in expert_names(a_named, prefix, (5,)).items()}
    before = {k: u8(v).clone() for k, v in layer.tensors.items()}
    report = update_live_(live, other, layer.descriptor, rank=0)
    assert report.layers[prefix].experts == [] and report.layers[prefix].other_rank_experts == [5]
    assert float(live[f"{prefix}.w2_input_scale"][5]) == float(other[f"{prefix}.5.down_proj.input_scale"])
    assert float(live[f"{prefix}.w13_input_scale"][5].max()) == report.layers[prefix].input_scale_maxima[0]  # the new a1
    assert torch.equal(u8(layer.tensors["w13_weight"]), before["w13_weight"])  # not this rank's expert
    assert not torch.equal(u8(layer.tensors["g1_alphas"]), before["g1_alphas"])  # a1 moved: every local g1 follows


def test_layers_without_live_tensors(converted):
    src_a, conv_a = converted("qwen3_moe", "modelopt", 0)
    src_b, conv_b = converted("qwen3_moe", "modelopt", 1)
    ckpt = open_converted(conv_a)
    layer = load_moe_layer(conv_a, 1)
    live = {f"{layer.prefix}.{k}": v for k, v in layer.tensors.items()}
    named = {**layer_source(src_b, "model.layers.0.mlp.experts"), **layer_source(src_b, layer.prefix)}
    before, ptrs = snapshot(layer), {k: v.data_ptr() for k, v in layer.tensors.items()}
    with pytest.raises(MissingTensorError, match="model.layers.0.mlp.experts: the update has tensors for this layer but live has none"):
        update_live_(live, named, ckpt.descriptor)
    assert_untouched(layer, before, ptrs)
    report = update_live_(live, named, ckpt.descriptor, ignore_unknown=True)  # another pipeline stage holds layer 0
    assert list(report.layers) == [layer.prefix] and all(n.startswith("model.layers.0.") for n in report.ignored)
    assert_layer_equals(layer, conv_b)
    stored = report.layers[layer.prefix].stored  # per-expert scalars as written, for engine plugins
    want = open_converted(conv_b).read_layer(open_converted(conv_b).layer(1))
    for k in ("w13_weight_scale_2", "w2_weight_scale_2", "w13_input_scale", "w2_input_scale"):
        assert torch.equal(u8(stored[k]), u8(want[k])), k


@pytest.mark.parametrize("rank", [None, 3])
def test_forward_after_update_equals_a_fresh_load(converted, rank):
    """The layer's own forward (torch backend) after update_ equals a fresh load of the updated checkpoint: the cached
    un-shuffled weights and the rank's global a1/a2 follow the update."""
    tp, ep = (2, 2) if rank is not None else (1, 1)
    _, conv_a = converted("deepseek_v3", "modelopt", 0, tp=tp, ep=ep)
    src_b, conv_b = converted("deepseek_v3", "modelopt", 1, tp=tp, ep=ep)
    prefix = "model.layers.2.mlp.experts"
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 256, generator=gen).to(torch.bfloat16)
    logits = torch.randn(6, 8, generator=gen).to(torch.bfloat16)
    layer = load_moe_layer(conv_a, prefix, rank=rank)
    ids, weights = layer.route(logits)  # the router (and its bias) is not an expert tensor: the same for both
    ids = layer.local_ids(ids)
    before = layer.forward_torch(x, ids, weights)  # fills the cache of un-shuffled weights
    layer.update_(layer_source(src_b, prefix))
    after = layer.forward_torch(x, ids, weights)
    fresh = load_moe_layer(conv_b, prefix, rank=rank).forward_torch(x, ids, weights)
    assert torch.equal(after, fresh) and not torch.equal(before, after)


@pytest.mark.gpu
def test_triton_forward_after_update_on_cuda(converted):
    _, conv_a = converted("qwen3_moe", "modelopt", 0)
    src_b, conv_b = converted("qwen3_moe", "modelopt", 1)
    prefix = "model.layers.1.mlp.experts"
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(9, 256, generator=gen).to(torch.bfloat16).cuda()
    logits = torch.randn(9, 8, generator=gen).to(torch.bfloat16).cuda()
    layer = load_moe_layer(conv_a, prefix, "cuda")
    ids, weights = layer.route(logits)
    layer.forward_triton(x, ids, weights)
    layer.update_({n: t.cuda() for n, t in layer_source(src_b, prefix).items()})
    fresh = load_moe_layer(conv_b, prefix, "cuda")
    assert torch.equal(layer.forward_triton(x, ids, weights), fresh.forward_triton(x, ids, weights))


@pytest.mark.parametrize(
    "arch,fmt,tp,ep,budget",
    [
        ("qwen3_moe", "modelopt", 1, 1, None),  # one tensor at a time, applied per whole layer
        ("qwen3_moe", "compressed-tensors", 1, 1, 200_000),  # a memory budget forces partial applications
        ("deepseek_v3", "modelopt", 2, 2, 200_000),  # ranks: partial applications follow the a1/a2 rules
        ("llama4", "modelopt", 1, 1, None),  # fused tensors
    ],
)
def test_update_stream_one_tensor_at_a_time(converted, arch, fmt, tp, ep, budget):
    from nvfp4ckpt.runtime.update import UpdateStream

    _, conv_a = converted(arch, fmt, 0, tp=tp, ep=ep)
    src_b, conv_b = converted(arch, fmt, 1, tp=tp, ep=ep)
    ckpt = open_converted(conv_a)
    named = {}
    for info in ckpt.layers:
        named |= layer_source(src_b, info.prefix)
    order = sorted(named, key=lambda n: hash(n) % 1000)  # an arbitrary interleaving of layers and experts
    for rank in range(tp * ep) if tp * ep > 1 else [None]:
        layers = [load_moe_layer(conv_a, info.prefix, rank=rank) for info in ckpt.layers]
        live = {f"{l.prefix}.{k}": v for l in layers for k, v in l.tensors.items()}
        maxima = {l.prefix: l.global_input_scales for l in layers if l.global_input_scales}
        stream = UpdateStream(live, ckpt.descriptor, rank=rank, input_scale_maxima=maxima, max_pending_bytes=budget)
        applied = []
        for n in order:
            applied += stream.add({n: named[n]})
        applied += stream.finish()
        assert not stream.pending_names and applied
        if budget is not None:
            assert len(applied) > len(ckpt.layers)  # really applied in parts
        for l in layers:
            assert_layer_equals(l, conv_b, rank)


def test_update_stream_refuses_an_incomplete_expert_at_finish(converted):
    from nvfp4ckpt.runtime.update import UpdateStream

    _, conv_a = converted("qwen3_moe", "modelopt", 0)
    src_b, _ = converted("qwen3_moe", "modelopt", 1)
    prefix = "model.layers.1.mlp.experts"
    layer = load_moe_layer(conv_a, prefix)
    named = layer_source(src_b, prefix)
    del named[f"{prefix}.5.down_proj.weight_scale"]
    stream = UpdateStream({f"{prefix}.{k}": v for k, v in layer.tensors.items()}, layer.descriptor)
    assert stream.add(named) == []  # expert 5 incomplete: the layer waits
    before, ptrs = snapshot(layer), {k: v.data_ptr() for k, v in layer.tensors.items()}
    with pytest.raises(MissingTensorError, match=r"expert 5 is updated without .*5\.down_proj\.weight_scale"):
        stream.finish()
    assert_untouched(layer, before, ptrs)
    with pytest.raises(UnknownTensorError):
        stream.add({"model.layers.1.mlp.experts.5.down_proj.bias": named[f"{prefix}.5.down_proj.weight"]})


def test_name_cache_holds_a_whole_model():
    """A whole-model update sends the same names every step in the same order: the parse cache must hold them all
    (an LRU cache smaller than the set misses on every lookup). A Kimi-K2-sized name set, twice: all hits."""
    from nvfp4ckpt.runtime.update import names

    names._parse_name.cache_clear()
    ns = [f"model.layers.{l}.mlp.experts.{e}.{p}.{s}" for l in range(60) for e in range(384)
          for p in ("gate_proj", "up_proj", "down_proj") for s in ("weight", "weight_scale", "weight_scale_2", "input_scale")]  # fmt: skip
    for n in ns:
        names._parse_name("deepseek_v3", "modelopt", n)
    before = names._parse_name.cache_info().hits
    for n in ns:
        names._parse_name("deepseek_v3", "modelopt", n)
    assert names._parse_name.cache_info().hits - before == len(ns)
    names._parse_name.cache_clear()

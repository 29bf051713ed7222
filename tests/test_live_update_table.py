"""The GPU write path of in-place updates (runtime/update/table.py + runtime/kernels/layout_write.py): one Triton launch
per kernel tensor from a table of source addresses. On the CPU it runs under Triton's interpreter
(TRITON_INTERPRET=1), the same kernels, and must give convert's bytes exactly; check_live through the same table
must find one flipped byte. The refusals of issue 20 (all or nothing for every tensor) are here too.
"""

from __future__ import annotations


import pytest
import torch

from nvfp4ckpt.errors import AliasedTensorError, BadTensorError, DuplicateTensorError
from nvfp4ckpt.layouts.trtllm_gen.converted import open_converted
from nvfp4ckpt.runtime import load_moe_layer
from nvfp4ckpt.runtime.update import update_live_
from tests.conftest import interpreted, u8
from tests.test_live_update import assert_layer_equals, assert_untouched, converted, layer_source, snapshot  # noqa: F401

# the kernels under Triton's interpreter without CUDA (tests/conftest.py: interpreted)
(layout_write,) = interpreted("nvfp4ckpt.runtime.kernels.layout_write")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PREFIX = "model.layers.1.mlp.experts"


def on_cpu(layer):
    """The layer's live tensors copied to the host (for byte comparisons with the converted files)."""
    return type("L", (), {"prefix": layer.prefix, "tensors": {k: v.cpu() for k, v in layer.tensors.items()}})()


@pytest.fixture
def table_path(monkeypatch):
    """Force the table path on the CPU and count its launches."""
    from nvfp4ckpt.runtime.update import write

    monkeypatch.setattr(write, "CPU_TABLE", True)
    launches = []
    real = layout_write.launch
    monkeypatch.setattr(layout_write, "launch", lambda *a, **k: launches.append((a[3], a[4], a[5] is not None)) or real(*a, **k))
    return launches


@pytest.mark.parametrize(
    "arch,fmt,tp,ep",
    [
        ("qwen3_moe", "modelopt", 1, 1),
        ("qwen3_moe", "compressed-tensors", 1, 1),
        ("mixtral", "compressed-tensors", 2, 1),  # a TP rank: row slices of gate/up, column slices of down
        ("deepseek_v3", "modelopt", 1, 2),  # an EP rank
        ("nemotron_h", "modelopt", 1, 1),  # relu2, intermediate padded 192 -> 256: the row maps carry the padding
    ],
)
def test_table_path_writes_converts_bytes(converted, table_path, arch, fmt, tp, ep):
    _, conv_a = converted(arch, fmt, 0, tp=tp, ep=ep)
    src_b, conv_b = converted(arch, fmt, 1, tp=tp, ep=ep)
    ranks = list(range(tp * ep)) if tp * ep > 1 else [None]
    for info in open_converted(conv_a).layers:
        named = layer_source(src_b, info.prefix)
        for rank in ranks:
            layer = load_moe_layer(conv_a, info.prefix, DEVICE, rank=rank)
            ptrs = {k: v.data_ptr() for k, v in layer.tensors.items()}
            table_path.clear()
            layer.update_(named)
            assert len(table_path) == 4 and not any(check for *_, check in table_path)  # one launch per kernel tensor
            assert {k: v.data_ptr() for k, v in layer.tensors.items()} == ptrs
            assert_layer_equals(on_cpu(layer), conv_b, rank)
            assert layer.check_live(tensors=named).ok


def test_one_launch_per_kernel_tensor_for_a_whole_model(converted, table_path):
    """The model-level update puts every layer's matrices into the same four launches."""
    _, conv_a = converted("qwen3_moe", "modelopt", 0)
    src_b, conv_b = converted("qwen3_moe", "modelopt", 1)
    ckpt = open_converted(conv_a)
    layers = [load_moe_layer(conv_a, info.prefix, DEVICE) for info in ckpt.layers]
    assert len(layers) > 1
    live = {f"{layer.prefix}.{k}": v for layer in layers for k, v in layer.tensors.items()}
    named = {n: t for layer in layers for n, t in layer_source(src_b, layer.prefix).items()}
    report = update_live_(live, named, ckpt.descriptor)
    assert len(table_path) == 4 and set(report.layers) == {layer.prefix for layer in layers}
    for layer in layers:
        assert_layer_equals(on_cpu(layer), conv_b)


@pytest.mark.parametrize("fraction", [0.0, 1.0])
def test_staged_sources_give_the_same_bytes(converted, table_path, monkeypatch, fraction):
    """Sources on another device than live (a trainer's host tensors for a GPU engine) go through a bounded staging
    buffer: here every source is staged, in chunks of one tensor (fraction 0) or all at once."""
    from nvfp4ckpt.runtime.update import table, write

    monkeypatch.setattr(write, "STAGE_ALL", True)
    monkeypatch.setattr(table, "STAGING_FRACTION", fraction)
    _, conv_a = converted("qwen3_moe", "modelopt", 0)
    src_b, conv_b = converted("qwen3_moe", "modelopt", 1)
    layer = load_moe_layer(conv_a, PREFIX, DEVICE)
    layer.update_(layer_source(src_b, PREFIX))  # host tensors: staged on a GPU whatever STAGE_ALL says
    assert_layer_equals(on_cpu(layer), conv_b)
    assert (len(table_path) > 4) == (fraction == 0.0)  # one launch per staged chunk


def test_table_check_finds_one_flipped_byte(converted, table_path):
    src_a, conv_a = converted("qwen3_moe", "compressed-tensors", 0)
    layer = load_moe_layer(conv_a, PREFIX, DEVICE)
    named = layer_source(src_a, PREFIX)
    assert layer.check_live(tensors=named).ok
    assert any(check for *_, check in table_path)  # the comparison went through the table kernels
    for name in ("w13_weight", "w13_weight_scale", "w2_weight", "w2_weight_scale"):
        flat = u8(layer.tensors[name])
        for where, expert in ((0, 0), (flat.numel() - 1, layer.num_experts - 1)):
            flat[where] ^= 0x10
            result = layer.check_live(tensors=named)
            flat[where] ^= 0x10
            assert not result.ok and result.tensor == f"{PREFIX}.{name}" and result.expert == expert, (name, result)
            assert result.row is not None and result.source_tensor.startswith(f"{PREFIX}.{expert}.")


# ----------------------------------------------------------------------------------------------
# All or nothing, for every tensor (issue 20): refused before the first byte, every live byte unchanged


def _refusal(converted):
    _, conv_a = converted("qwen3_moe", "modelopt", 0)
    src_b, _ = converted("qwen3_moe", "modelopt", 1)
    layer = load_moe_layer(conv_a, PREFIX)
    return layer, layer_source(src_b, PREFIX), snapshot(layer), {k: v.data_ptr() for k, v in layer.tensors.items()}


@pytest.mark.parametrize("form", ["meta", "sparse", "nested"])
def test_sources_without_plain_bytes_are_refused(converted, form):
    layer, named, before, ptrs = _refusal(converted)
    last = f"{PREFIX}.7.down_proj.weight"  # the last tensor: today's code wrote every other expert first
    t = named[last]
    named[last] = {"meta": lambda: t.to("meta"), "sparse": lambda: t.to_sparse(), "nested": lambda: torch.nested.nested_tensor([t])}[form]()
    with pytest.raises(BadTensorError, match=rf"{last}: is .*(meta|sparse|nested)") as exc:
        layer.update_(named)
    assert "\n" not in str(exc.value)
    assert_untouched(layer, before, ptrs)


def test_dtensor_sources_are_refused(converted, tmp_path):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    layer, named, before, ptrs = _refusal(converted)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        name = f"{PREFIX}.5.gate_proj.weight"
        named[name] = DTensor.from_local(named[name], mesh, [Shard(0)])
        with pytest.raises(BadTensorError, match=rf"{name}: is a DTensor.*full_tensor"):
            layer.update_(named)
    finally:
        dist.destroy_process_group()
    assert_untouched(layer, before, ptrs)


def test_two_spellings_of_one_expert_are_refused(converted):
    layer, named, before, ptrs = _refusal(converted)
    name = f"{PREFIX}.1.up_proj.weight"
    named[name.replace("experts.1.", "experts.01.")] = torch.zeros_like(named[name])
    with pytest.raises(DuplicateTensorError, match=r"experts\.1\.up_proj\.weight and .*experts\.01\.up_proj\.weight: two names"):
        layer.update_(named)
    assert_untouched(layer, before, ptrs)


def test_live_tensors_sharing_memory_are_refused(converted):
    layer, named, before, ptrs = _refusal(converted)
    live = {f"{PREFIX}.{k}": v for k, v in layer.tensors.items()}
    live[f"{PREFIX}.g2_alphas"] = layer.tensors["g1_alphas"].view(-1)  # two scalars as views of one buffer
    with pytest.raises(AliasedTensorError, match="g1_alphas and live .*g2_alphas: share memory|g2_alphas and live .*g1_alphas: share memory"):
        update_live_(live, named, layer.descriptor)
    assert_untouched(layer, before, ptrs)


def test_a_source_aliasing_live_storage_is_refused(converted):
    layer, named, before, ptrs = _refusal(converted)
    name = f"{PREFIX}.2.up_proj.weight"
    n = named[name].shape[0]
    named[name] = layer.tensors["w13_weight"][6, :n]  # bytes the update itself overwrites
    with pytest.raises(AliasedTensorError, match=rf"{name}: shares memory with live .*w13_weight; pass a copy"):
        layer.update_(named)
    assert_untouched(layer, before, ptrs)


@pytest.mark.gpu
def test_cpu_live_with_cuda_sources_and_cuda_live_with_host_sources(converted):
    """Sources on another device than live work (copied per tensor, or staged for the table path)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    _, conv_a = converted("qwen3_moe", "modelopt", 0)
    src_b, conv_b = converted("qwen3_moe", "modelopt", 1)
    named = layer_source(src_b, PREFIX)
    host_live = load_moe_layer(conv_a, PREFIX)
    host_live.update_({n: t.cuda() for n, t in named.items()})
    assert_layer_equals(host_live, conv_b)
    gpu_live = load_moe_layer(conv_a, PREFIX, "cuda")
    gpu_live.update_({n: t.pin_memory() for n, t in named.items()})
    gpu_live_cpu = type("L", (), {"prefix": PREFIX, "tensors": {k: v.cpu() for k, v in gpu_live.tensors.items()}})()
    assert_layer_equals(gpu_live_cpu, conv_b)


def test_warmup_runs_every_common_variant_without_touching_memory():
    """warmup() launches the four common kernel variants over an empty table (nothing is read or written)."""
    layout_write.warmup("cpu")  # under the interpreter here; on CUDA it compiles them

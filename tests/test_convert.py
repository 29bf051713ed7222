"""End to end: example checkpoints of every architecture and format convert to the contract."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from flashinfer.fused_moe.core import _maybe_get_cached_w3_w1_permute_indices, get_w2_permute_indices_with_cache
from safetensors import safe_open

from nvfp4ckpt import convert_checkpoint, write_example
from nvfp4ckpt.source.checkpoint import open_checkpoint
from nvfp4ckpt.layouts.trtllm_gen.descriptor import METADATA_KEY
from nvfp4ckpt.output import MANIFEST_NAME
from tests.conftest import ARCHS, FORMATS, reference_swizzle_128x4, tree_digest, load_dir, u8




@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_convert_meets_output_contract(example_factory, tmp_path, arch, fmt):
    src = example_factory(arch, fmt)
    before = tree_digest(src)
    dst = tmp_path / "out"
    result = convert_checkpoint(src, dst)
    assert tree_digest(src) == before, "the source checkpoint must never be touched"

    ckpt = open_checkpoint(src)
    source = load_dir(src)
    out = load_dir(dst)
    expert_names = ckpt.expert_tensor_names
    assert len(ckpt.layers) == result.num_moe_layers >= 2

    # Every non-expert tensor carried over byte for byte under its own name.
    carried = {n for n in source if n not in expert_names}
    assert carried <= set(out)
    for name in carried:
        assert out[name].dtype == source[name].dtype and out[name].shape == source[name].shape
        assert torch.equal(u8(out[name]), u8(source[name])), name
    assert not (set(out) & expert_names)

    suffix = ckpt.format.suffixes
    for layer in ckpt.layers:
        p, e, h, i = layer.prefix, layer.num_experts, layer.hidden_size, layer.intermediate_size
        assert out[f"{p}.w13_weight"].dtype == torch.uint8 and out[f"{p}.w13_weight"].shape == (e, 2 * i, h // 2)
        assert out[f"{p}.w13_weight_scale"].dtype == torch.float8_e4m3fn and out[f"{p}.w13_weight_scale"].shape == (e, 2 * i, h // 16)
        assert out[f"{p}.w2_weight"].dtype == torch.uint8 and out[f"{p}.w2_weight"].shape == (e, h, i // 2)
        assert out[f"{p}.w2_weight_scale"].dtype == torch.float8_e4m3fn and out[f"{p}.w2_weight_scale"].shape == (e, h, i // 16)
        cache: dict = {}
        ws2 = torch.zeros(e, 3)
        inp = torch.zeros(e, 3)
        proj = layer.proj_names
        for x in range(e):
            name = lambda role, kind: f"{p}.{x}.{proj[role]}.{suffix[kind]}"  # noqa: E731
            w31 = torch.cat([source[name("up", "weight")], source[name("gate", "weight")]])
            s31 = torch.cat([u8(source[name("up", "weight_scale")]).reshape(i, -1), u8(source[name("gate", "weight_scale")]).reshape(i, -1)])
            perm = _maybe_get_cached_w3_w1_permute_indices(cache, w31, 128)
            assert torch.equal(out[f"{p}.w13_weight"][x], w31[perm])
            assert torch.equal(u8(out[f"{p}.w13_weight_scale"][x]).reshape(2 * i, -1), reference_swizzle_128x4(s31[perm]))
            down = source[name("down", "weight")]
            dperm = get_w2_permute_indices_with_cache(cache, down, 128)
            assert torch.equal(out[f"{p}.w2_weight"][x], down[dperm])
            ds = u8(source[name("down", "weight_scale")]).reshape(h, -1)
            assert torch.equal(u8(out[f"{p}.w2_weight_scale"][x]).reshape(h, -1), reference_swizzle_128x4(ds[dperm]))
            for r, role in enumerate(("gate", "up", "down")):
                wg = source[name(role, "weight_global")].float().reshape(())
                ig = source[name(role, "input_global")].float().reshape(())
                ws2[x, r] = 1 / wg if fmt == "compressed-tensors" else wg
                inp[x, r] = 1 / ig if fmt == "compressed-tensors" else ig
                if fmt == "compressed-tensors":  # raw global scales kept bit-exact
                    col = {"gate": 0, "up": 1}.get(role)
                    raw_w = out[f"{p}.w13_weight_global_scale"][x, col] if col is not None else out[f"{p}.w2_weight_global_scale"][x]
                    assert torch.equal(u8(raw_w), u8(source[name(role, "weight_global")]))
        a1, a2 = inp[:, :2].max(), inp[:, 2].max()
        expect = {
            "w13_weight_scale_2": ws2[:, :2],
            "w2_weight_scale_2": ws2[:, 2],
            "w13_input_scale": inp[:, :2],
            "w2_input_scale": inp[:, 2],
            "g1_alphas": a1 * ws2[:, 0],
            "g1_scale_c": (1 / a2) * (a1 * ws2[:, 1]),
            "g2_alphas": a2 * ws2[:, 2],
            "w13_input_scale_quant": (1 / a1).reshape(1),
        }
        for key, value in expect.items():
            got = out[f"{p}.{key}"]
            assert got.dtype == torch.float32 and got.shape == value.shape, key
            assert torch.equal(got, value.float()), key

    # config.json: model config kept, descriptor added.
    src_cfg = json.loads((src / "config.json").read_text())
    out_cfg = json.loads((dst / "config.json").read_text())
    for key, value in src_cfg.items():
        if key != "quantization_config":
            assert out_cfg[key] == value
    # Declared as nvfp4_trtllm (stock engines refuse it), the source's own section kept as it was.
    assert out_cfg["quantization_config"]["quant_method"] == "nvfp4_trtllm"
    assert out_cfg["quantization_config"]["source_quantization_config"] == src_cfg["quantization_config"]
    desc = out_cfg["quantization_config"]["moe_kernel_layout"]
    assert desc["layout"] == "trtllm_fp4_moe" and desc["epilogue_tile_m"] == 128 and desc["w13_order"] == "up_gate"
    assert desc["source_format"] == fmt and desc["architecture"] == arch
    assert desc["intermediate_size"] == desc["intermediate_size_padded"] == 128
    assert set(desc["layers"]) == {l.prefix for l in ckpt.layers}
    # Same descriptor in every safetensors header.
    for f in dst.glob("*.safetensors"):
        with safe_open(f, "pt") as sf:
            assert json.loads(sf.metadata()[METADATA_KEY]) == desc
    # Manifest lists every other file with its size and sha256, but the model card (verify --update-card edits it).
    manifest = json.loads((dst / MANIFEST_NAME).read_text())
    listed = {f["name"]: f for f in manifest["files"]}
    on_disk = {p.relative_to(dst).as_posix() for p in dst.rglob("*") if p.is_file()} - {MANIFEST_NAME, "README.md"}
    assert set(listed) == on_disk
    for name, entry in listed.items():
        data = (dst / name).read_bytes()
        assert entry["size"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()
    # Tokenizer and generation config copied.
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (dst / name).read_bytes() == (src / name).read_bytes()
    assert not list(tmp_path.glob(".*partial*"))


def test_sharded_output_with_index(example_factory, tmp_path):
    src = example_factory("deepseek_v3", "modelopt")
    dst = tmp_path / "sharded"
    convert_checkpoint(src, dst, max_shard_size="300KB")
    shards = sorted(dst.glob("*.safetensors"))
    assert len(shards) > 3
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    stored = {}
    for f in shards:
        with safe_open(f, "pt") as sf:
            for k in sf.keys():
                stored[k] = f.name
    assert index["weight_map"] == stored
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in load_dir(dst).values())
    single = tmp_path / "single"
    convert_checkpoint(src, single)
    assert {k: u8(v) for k, v in load_dir(single).items()}.keys() == stored.keys()
    a, b = load_dir(single), load_dir(dst)
    assert all(torch.equal(u8(a[k]), u8(b[k])) for k in a)


def test_output_is_deterministic(example_factory, tmp_path):
    src = example_factory("qwen3_moe", "compressed-tensors")
    convert_checkpoint(src, tmp_path / "a")
    convert_checkpoint(src, tmp_path / "b")
    assert (tmp_path / "a" / MANIFEST_NAME).read_bytes() == (tmp_path / "b" / MANIFEST_NAME).read_bytes()
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")


def test_single_file_source_and_overwrite(tmp_path):
    src = tmp_path / "src"
    write_example(src, arch="mixtral", shards=1)
    assert (src / "model.safetensors").exists() and not (src / "model.safetensors.index.json").exists()
    dst = tmp_path / "dst"
    convert_checkpoint(src, dst)
    (dst / "stale.txt").write_text("old")
    convert_checkpoint(src, dst, overwrite=True)
    assert not (dst / "stale.txt").exists() and (dst / MANIFEST_NAME).exists()


def test_flat_and_nested_modelopt_configs_agree(example_factory, tmp_path):
    src = example_factory("qwen3_moe", "modelopt")
    nested_only = tmp_path / "nested"
    flat_only = tmp_path / "flat"
    for target in (nested_only, flat_only):
        target.mkdir()
        for f in src.iterdir():
            (target / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("quantization_config")
    (nested_only / "config.json").write_text(json.dumps(cfg))
    (flat_only / "hf_quant_config.json").unlink()
    convert_checkpoint(nested_only, tmp_path / "o1")
    convert_checkpoint(flat_only, tmp_path / "o2")
    a, b = load_dir(tmp_path / "o1"), load_dir(tmp_path / "o2")
    assert a.keys() == b.keys() and all(torch.equal(u8(a[k]), u8(b[k])) for k in a)
    qcfg = json.loads((tmp_path / "o1" / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "nvfp4_trtllm" and qcfg["source_quantization_config"]["quant_algo"] == "NVFP4"
    assert qcfg["moe_kernel_layout"]["config_had_quantization_config"] is False


@pytest.mark.gpu
def test_cuda_transform_is_byte_identical(example_factory, tmp_path):
    src = example_factory("deepseek_v3", "compressed-tensors")
    convert_checkpoint(src, tmp_path / "cpu", device="cpu")
    convert_checkpoint(src, tmp_path / "cuda", device="cuda")
    assert tree_digest(tmp_path / "cpu") == tree_digest(tmp_path / "cuda")


def test_workers_do_not_change_bytes(example_factory, tmp_path):
    src = example_factory("qwen3_moe", "modelopt")
    convert_checkpoint(src, tmp_path / "w1", workers=1, max_shard_size="400KB")
    convert_checkpoint(src, tmp_path / "w3", workers=3, max_shard_size="400KB")
    assert tree_digest(tmp_path / "w1") == tree_digest(tmp_path / "w3")

"""The architecture registry: a new family is one entry; a fake one registered through the real registry converts."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from nvfp4ckpt import convert_checkpoint, inspect_checkpoint
from nvfp4ckpt.source import architectures
from nvfp4ckpt.source.architectures import Architecture, Routing
from nvfp4ckpt.errors import UnsupportedArchitectureError
from nvfp4ckpt import verify_checkpoint


@pytest.fixture
def fake_family():
    arch = Architecture(
        name="fake_moe",
        model_types=("fake_moe",),
        expert_pattern=r"(?P<prefix>.+\.moe\.experts)\.(?P<expert>\d+)\.(?P<proj>[a-z0-9_]+)",
        projections={"wi": "gate", "wu": "up", "wo": "down"},
        router_suffix="router.weight",
        routing=lambda cfg: Routing(method="Renormalize", top_k=int(cfg["num_experts_per_tok"]), num_experts=int(cfg["num_experts"])),
    )
    architectures.register(arch)
    try:
        yield arch
    finally:
        architectures.unregister(arch.name)


def test_fake_family_converts_through_the_registry(example_factory, tmp_path, fake_family):
    src = tmp_path / "src"
    shutil.copytree(example_factory("qwen3_moe", "modelopt"), src)
    renames = {".mlp.experts.": ".moe.experts.", ".gate_proj.": ".wi.", ".up_proj.": ".wu.", ".down_proj.": ".wo."}
    for f in src.glob("*.safetensors"):
        tensors = {}
        for name, t in load_file(f).items():
            if ".mlp.experts." in name:
                for old, new in renames.items():
                    name = name.replace(old, new)
            tensors[name] = t
        save_file(tensors, f, metadata={"format": "pt"})
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"] = {
        (k.replace(".mlp.experts.", ".moe.experts.").replace(".gate_proj.", ".wi.").replace(".up_proj.", ".wu.").replace(".down_proj.", ".wo.")
         if ".mlp.experts." in k else k): v
        for k, v in index["weight_map"].items()
    }  # fmt: skip
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "fake_moe"
    (src / "config.json").write_text(json.dumps(cfg))
    (src / "hf_quant_config.json").unlink()

    report = inspect_checkpoint(src)
    assert report.architecture == "fake_moe" and [l.prefix for l in report.moe_layers] == [
        "model.layers.0.moe.experts", "model.layers.1.moe.experts",
    ]  # fmt: skip
    convert_checkpoint(src, tmp_path / "dst")
    checked = verify_checkpoint(tmp_path / "dst", source=src, backend="torch", tokens=8)
    assert checked.passed, checked.to_dict()
    desc = json.loads((tmp_path / "dst" / "config.json").read_text())["quantization_config"]["moe_kernel_layout"]
    assert desc["layers"]["model.layers.1.moe.experts"]["source_projection_names"] == {"gate": "wi", "up": "wu", "down": "wo"}


def test_unknown_family_lists_the_registered_ones():
    with pytest.raises(UnsupportedArchitectureError, match="supported: deepseek_v3, glm4_moe, kimi_k2, llama4, .*qwen3_moe"):
        architectures.for_config({"model_type": "gpt_oss"})


def test_unknown_family_says_what_is_missing(example_factory, tmp_path):
    """An unregistered model_type whose experts are named like a known family: the message says which."""
    src = tmp_path / "src"
    shutil.copytree(example_factory("qwen3_moe", "modelopt"), src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "qwen4_moe"
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitectureError, match=r"follow qwen3_moe's naming: .*add 'qwen4_moe' to that entry's model_types"):
        convert_checkpoint(src, tmp_path / "dst")
    # inspect describes what it can instead of refusing (issue 25): the family unknown, the experts read by naming
    report = inspect_checkpoint(src)
    assert report.architecture == "unknown" and not report.family_known and report.model_type == "qwen4_moe"
    assert len(report.moe_layers) == 2 and report.moe_layers[0].num_experts == 8 and report.format == "modelopt"
    assert any("follow qwen3_moe's naming" in i for i in report.issues)
    # experts under a block name no family uses: nothing to suggest but a new entry
    for f in src.glob("*.safetensors"):
        save_file({k.replace(".mlp.experts.", ".ffn.experts."): v for k, v in load_file(f).items()}, f, metadata={"format": "pt"})
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k.replace(".mlp.experts.", ".ffn.experts."): v for k, v in index["weight_map"].items()}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UnsupportedArchitectureError, match="match no registered naming; register an Architecture"):
        convert_checkpoint(src, tmp_path / "dst")
    assert not (tmp_path / "dst").exists()

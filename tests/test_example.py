"""The built-in example is a real model folder: transformers instantiates it, tokenizer loads."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from nvfp4ckpt import write_example
from nvfp4ckpt.source.checkpoint import open_checkpoint
from nvfp4ckpt.io import CheckpointFiles
from tests.conftest import ARCHS, tree_digest

QUANT_SUFFIXES = re.compile(r"\.(weight_scale_2|weight_scale|input_scale|weight_packed|weight_global_scale|input_global_scale)$")


@pytest.mark.parametrize("arch", ARCHS)
def test_transformers_instantiates_and_names_match(example_factory, arch):
    root = example_factory(arch, "modelopt")
    config = AutoConfig.from_pretrained(root)
    assert config.model_type == arch
    model = AutoModelForCausalLM.from_config(config)
    expected = set(model.state_dict())
    names = {QUANT_SUFFIXES.sub(".weight", n) for n in CheckpointFiles(root).tensors}
    experts = re.compile(r"\.experts\.\d+\.(gate_proj|up_proj|down_proj|w1|w2|w3)\.weight$")
    # transformers holds experts fused in memory; everything else must be named exactly as it expects.
    non_expert = {n.replace(".block_sparse_moe.", ".mlp.") for n in names if not experts.search(n)}
    assert non_expert == {n for n in expected if ".experts." not in n}
    ckpt = open_checkpoint(root)
    assert len(ckpt.layers) == sum(1 for n in expected if n.endswith("experts.down_proj"))


def test_tokenizer_is_byte_level_and_loads(example_factory):
    tok = AutoTokenizer.from_pretrained(example_factory())
    text = "Question: Weng earns $12 an hour. ünïcödé 😀\nAnswer:"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    assert tok.eos_token == "</s>" and tok.convert_tokens_to_ids("</s>") == 2


@pytest.mark.parametrize("fmt", ["modelopt", "compressed-tensors"])
def test_example_is_deterministic(tmp_path, fmt):
    write_example(tmp_path / "a", format=fmt, arch="mixtral", seed=3)
    write_example(tmp_path / "b", format=fmt, arch="mixtral", seed=3)
    write_example(tmp_path / "c", format=fmt, arch="mixtral", seed=4)
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")
    assert tree_digest(tmp_path / "a") != tree_digest(tmp_path / "c")


def test_example_quantization_is_valid_nvfp4(example_factory):
    from nvfp4ckpt.quant import dequantize

    root = example_factory("qwen3_moe", "modelopt")
    files = CheckpointFiles(root)
    p = "model.layers.0.mlp.experts.0.gate_proj"
    w = dequantize(files.read(f"{p}.weight"), files.read(f"{p}.weight_scale"), files.read(f"{p}.weight_scale_2"))
    assert w.shape == (128, 256) and torch.isfinite(w).all() and w.abs().max() > 0
    # ModelOpt shares weight_scale_2 between gate and up.
    assert torch.equal(files.read(f"{p}.weight_scale_2"), files.read(p.replace("gate", "up") + ".weight_scale_2"))


def test_interrupted_example_leaves_no_out(tmp_path, monkeypatch):
    """example writes into a partial folder and renames it at the end: Ctrl-C half-way leaves neither a
    half-written OUT nor the partial folder, and a rerun (no --overwrite needed) succeeds."""
    import nvfp4ckpt.example as example_module

    real = example_module._write_shards

    def interrupted(out, builder, **kw):
        real(out, builder, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(example_module, "_write_shards", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_example(tmp_path / "ex", seed=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    monkeypatch.undo()
    result = write_example(tmp_path / "ex", seed=1)
    assert (tmp_path / "ex" / "config.json").is_file() and result.path == tmp_path / "ex"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ex"]


# ----------------------------------------------------------------------------------------------------------------
# Issue 23: the examples load in the engines as real checkpoints of their family do


def test_modelopt_example_config_is_what_modelopt_writes(example_factory):
    """ModelOpt 0.47's export: hf_quant_config.json keeps the nested section (``exclude_modules``), config.json gets
    ModelOpt's own ``convert_hf_quant_config_format`` of it (exclusions under ``ignore``: vLLM 0.32 reads only that)."""
    import json

    from modelopt.torch.export.convert_hf_config import convert_hf_quant_config_format

    root = example_factory("qwen3_moe", "modelopt")
    hf = json.loads((root / "hf_quant_config.json").read_text())
    qcfg = json.loads((root / "config.json").read_text())["quantization_config"]
    assert qcfg == convert_hf_quant_config_format(hf)
    assert "exclude_modules" not in qcfg and qcfg["ignore"] == hf["quantization"]["exclude_modules"]


@pytest.mark.parametrize("arch", ["deepseek_v3", "kimi_k2"])
def test_deepseek_style_example_asks_for_the_correction_bias(example_factory, arch):
    """vLLM's DeepSeek-V2/V3 model (deepseek_v2.py) builds the router's e_score_correction_bias only for
    ``topk_method == "noaux_tc"`` and routes with ``scoring_func`` (default softmax): without them a real load of the
    example fails on the bias tensor (KeyError) and the routing would not be DeepSeek-V3's. As the real
    DeepSeek-V3 and Kimi-K2 config.json files say."""
    import json

    root = example_factory(arch, "modelopt")
    names = json.loads((root / "model.safetensors.index.json").read_text())["weight_map"]
    assert any(n.endswith(".mlp.gate.e_score_correction_bias") for n in names)
    cfg = json.loads((root / "config.json").read_text())
    assert cfg.get("topk_method") == "noaux_tc" and cfg.get("scoring_func") == "sigmoid"


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "deepseek_v3"])
def test_compressed_tensors_example_ties_gate_and_up_global_scales(example_factory, arch):
    """llm-compressor fuses the gate/up weight observers of every MLP (experts, shared experts, dense MLPs): one
    weight_global_scale for both, bitwise. ``untied_gate_up=True`` keeps the untied case (engines refuse it)."""
    import re

    def pairs(root):
        files = CheckpointFiles(root)
        gate_up = re.compile(r"(?P<mlp>.+)\.(?P<proj>gate_proj|up_proj|w1|w3)\.weight_global_scale$")
        found: dict[str, dict[str, torch.Tensor]] = {}
        for n in files.tensors:
            if m := gate_up.match(n):
                found.setdefault(m["mlp"], {})["gate" if m["proj"] in ("gate_proj", "w1") else "up"] = files.read(n)
        return found

    tied = pairs(example_factory(arch, "compressed-tensors"))
    assert tied and all(set(p) == {"gate", "up"} for p in tied.values())
    assert all(torch.equal(p["gate"].view(torch.int32), p["up"].view(torch.int32)) for p in tied.values())
    untied = pairs(example_factory(arch, "compressed-tensors", untied_gate_up=True))
    assert all(not torch.equal(p["gate"], p["up"]) for p in untied.values())

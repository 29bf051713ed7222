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

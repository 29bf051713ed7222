"""convert -> revert gives back the source, tensor for tensor, for every architecture and format."""

from __future__ import annotations

import json

import pytest
import torch

from nvfp4ckpt import convert_checkpoint
from nvfp4ckpt.cli import main
from nvfp4ckpt import revert_checkpoint
from tests.conftest import ARCHS, FORMATS, tree_digest, load_dir



@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_is_byte_identical(example_factory, tmp_path, arch, fmt):
    src = example_factory(arch, fmt)
    convert_checkpoint(src, tmp_path / "conv")
    before = tree_digest(tmp_path / "conv")
    result = revert_checkpoint(tmp_path / "conv", tmp_path / "back")
    assert tree_digest(tmp_path / "conv") == before
    assert result.source_format == fmt
    a, b = load_dir(src), load_dir(tmp_path / "back")
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert torch.equal(a[name].reshape(-1).view(torch.uint8), b[name].reshape(-1).view(torch.uint8)), name
    assert json.loads((tmp_path / "back" / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    for name in ("tokenizer.json", "generation_config.json"):
        assert (tmp_path / "back" / name).read_bytes() == (src / name).read_bytes()
    assert not (tmp_path / "back" / "nvfp4ckpt_manifest.json").exists()
    # The reverted checkpoint converts again to the same bytes.
    convert_checkpoint(tmp_path / "back", tmp_path / "again")
    c1, c2 = load_dir(tmp_path / "conv"), load_dir(tmp_path / "again")
    assert all(torch.equal(c1[k].reshape(-1).view(torch.uint8), c2[k].reshape(-1).view(torch.uint8)) for k in c1)


def test_revert_restores_missing_quantization_config(example_factory, tmp_path):
    src = tmp_path / "src"
    import shutil

    shutil.copytree(example_factory("qwen3_moe", "modelopt"), src)
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("quantization_config")
    (src / "config.json").write_text(json.dumps(cfg))
    convert_checkpoint(src, tmp_path / "conv")
    revert_checkpoint(tmp_path / "conv", tmp_path / "back")
    assert json.loads((tmp_path / "back" / "config.json").read_text()) == cfg


def test_revert_cli_errors(example_factory, tmp_path, capsys):
    assert main(["revert", str(example_factory()), str(tmp_path / "x")]) == 2
    assert "not a converted checkpoint" in " ".join(capsys.readouterr().err.split())
    convert_checkpoint(example_factory(), tmp_path / "conv")
    assert main(["revert", str(tmp_path / "conv"), str(tmp_path / "back"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["source_format"] == "modelopt"
    assert main(["revert", str(tmp_path / "conv"), str(tmp_path / "back")]) == 2

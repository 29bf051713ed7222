"""Checkpoints written by the real producers (nvidia-modelopt, llm-compressor/compressed-tensors):
inspect, convert, verify (structure, exact layout, numerics) and revert, on files no one here wrote."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import load_dir
from nvfp4ckpt import convert_checkpoint, inspect_checkpoint
from nvfp4ckpt import revert_checkpoint
from nvfp4ckpt import verify_checkpoint
from tests.producers import ARCHES, UNSUPPORTED, make_compressed_tensors_checkpoint, make_modelopt_checkpoint

PRODUCERS = {
    "modelopt": ("modelopt", make_modelopt_checkpoint),
    "compressed-tensors": ("llmcompressor", make_compressed_tensors_checkpoint),
}



CASES = [
    pytest.param(
        fmt, arch,
        marks=[pytest.mark.xfail(strict=True, reason=f"the {fmt} producer cannot make {arch} here (tests/producers.py)")]
        if (fmt, arch) in UNSUPPORTED else [],
    )  # fmt: skip
    for fmt in PRODUCERS
    for arch in ARCHES
]


@pytest.mark.slow
@pytest.mark.parametrize("fmt,arch", CASES)
def test_real_producer_checkpoint(tmp_path, arch, fmt):
    _, make = PRODUCERS[fmt]  # the producer is in the test extra: without it this fails (ImportError), it does not skip
    src = make(tmp_path / "src", arch=arch, seed=0)

    report = inspect_checkpoint(src)
    assert report.format == fmt and report.architecture == arch
    assert len(report.moe_layers) == (1 if arch in ("deepseek_v3", "glm4_moe", "nemotron_h") else 2)
    assert report.moe_layers[0].num_experts == 8 and report.moe_layers[0].intermediate_size == 128
    per_expert_down = any("per-expert down_proj input scales" in i for i in report.issues)
    assert per_expert_down == (fmt == "compressed-tensors")  # llm-compressor calibrates it per expert
    if arch == "llama4":  # ModelOpt writes Llama-4's experts fused: one input-major tensor per projection
        assert f"{report.moe_layers[0].prefix}.gate_up_proj" in load_dir(src)

    result = convert_checkpoint(src, tmp_path / "conv")
    assert result.source_format == fmt
    checked = verify_checkpoint(tmp_path / "conv", source=src, backend="torch", tokens=32)
    assert checked.passed, checked.to_dict()
    assert [c.status for c in checked.checks] == ["pass", "pass", "pass"]

    back = tmp_path / "back"
    revert_checkpoint(tmp_path / "conv", back)
    a, b = load_dir(src), load_dir(back)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert torch.equal(a[name].reshape(-1).view(torch.uint8), b[name].reshape(-1).view(torch.uint8)), name
    assert json.loads((back / "config.json").read_text()) == json.loads((src / "config.json").read_text())

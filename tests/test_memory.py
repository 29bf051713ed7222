"""Peak memory of `convert` is bounded by a few MoE layers, not by the checkpoint: a checkpoint larger than the
memory budget converts with peak RSS under it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from nvfp4ckpt import write_example

# 16 MoE layers of 64 experts, H 1024, I 512: 56 MB of experts per layer, about 0.95 GB in all.
SHAPE = {"hidden_size": 1024, "moe_intermediate_size": 512, "num_experts": 64, "vocab_size": 1024,
         "num_attention_heads": 8, "num_key_value_heads": 2}  # fmt: skip
LAYER_BYTES = 64 * 3 * 512 * 1024 // 2 * 9 // 8
BUDGET = 650 * 2**20  # bytes of RSS, well below the checkpoint's size


def peak_rss(cmd: list[str]) -> int:
    """Peak RSS in bytes of a child process (measured from a fresh parent, so pytest's own memory is not counted)."""
    code = (
        "import resource, subprocess, sys;"
        "subprocess.run(sys.argv[1:], check=True);"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)"
    )
    out = subprocess.run([sys.executable, "-c", code, *cmd], check=True, capture_output=True, text=True)
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_peak_rss_stays_under_budget(tmp_path):
    src = tmp_path / "src"
    write_example(src, shape="qwen3-30b-a3b", layers=16, config_overrides=SHAPE, max_shard_size="300MB")
    size = sum(p.stat().st_size for p in src.iterdir())
    assert size > BUDGET * 1.3
    baseline = peak_rss([sys.executable, "-c", "import nvfp4ckpt.convert"])
    peak = peak_rss([sys.executable, "-m", "nvfp4ckpt", "convert", str(src), str(tmp_path / "dst"), "-q", "--workers", "1"])
    report = {"checkpoint_bytes": size, "baseline_rss": baseline, "peak_rss": peak, "layer_bytes": LAYER_BYTES}
    assert peak < BUDGET, json.dumps(report)
    assert peak - baseline < 8 * LAYER_BYTES, json.dumps(report)  # a few layers in flight, whatever the layer count
    assert json.loads((tmp_path / "dst" / "config.json").read_text())["quantization_config"]["moe_kernel_layout"]

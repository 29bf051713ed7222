"""Issue 14: work grows linearly with the input. 40k tensors in one header (104 s when shard planning re-summed
the open shard for every tensor) convert in seconds; a 1 GiB config is refused by its size, not parsed."""

from __future__ import annotations

import json
import struct
import time

import numpy as np

from nvfp4ckpt import convert_checkpoint, write_example
from nvfp4ckpt.io import PlannedTensor, plan_shards
from tests.conftest import load_dir


def test_plan_shards_is_linear():
    tensors = [PlannedTensor(f"t.{i}", "F32", (1,)) for i in range(40_000)]
    start = time.perf_counter()
    plans = plan_shards(tensors, 1 << 40)
    assert time.perf_counter() - start < 5  # the quadratic version: about 3 minutes
    assert len(plans) == 1 and len(plans[0].tensors) == 40_000
    small = plan_shards(tensors[:10], 8)  # two 4-byte tensors per shard, order kept
    assert [[t.name for t in p.tensors] for p in small] == [[f"t.{i}", f"t.{i + 1}"] for i in range(0, 10, 2)]


def test_forty_thousand_tensors_in_one_header(tmp_path):
    src = tmp_path / "src"
    write_example(src, format="modelopt", arch="qwen3_moe", seed=0, shards=1)
    n = 40_000
    header = {f"model.extra.{i}.weight": {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]} for i in range(n)}
    body = json.dumps(header).encode()
    values = np.arange(n, dtype=np.float32)
    (src / "model-extra.safetensors").write_bytes(struct.pack("<Q", len(body)) + body + values.tobytes())
    weight_map = {name: "model-extra.safetensors" for name in header}
    from safetensors import safe_open

    with safe_open(src / "model.safetensors", "np") as f:
        weight_map.update({k: "model.safetensors" for k in f.keys()})
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    start = time.perf_counter()
    convert_checkpoint(src, tmp_path / "dst")
    assert time.perf_counter() - start < 60  # ~9 s on 2 shared cores; quadratic planning took minutes
    out = load_dir(tmp_path / "dst")
    assert out["model.extra.39999.weight"].item() == 39999.0 and out["model.extra.0.weight"].item() == 0.0

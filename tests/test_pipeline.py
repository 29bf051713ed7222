"""The streaming pipeline's fast paths give the same bytes as the plain ones: the per-expert transform into
pooled buffers against ``read_layer_source`` + ``to_kernel``, pooled output buffers reused across layers, and files on
disk hashing to their manifest entries."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from nvfp4ckpt import convert_checkpoint, write_example
from nvfp4ckpt.layouts.trtllm_gen.fast_path import convert_layer_fast, has_fast_path
from nvfp4ckpt.layouts.trtllm_gen.scalars import layer_scalars
from nvfp4ckpt.layouts.trtllm_gen.shapes import padded_dims
from nvfp4ckpt.source.stacked import read_layer_source
from nvfp4ckpt.source.checkpoint import open_checkpoint
from nvfp4ckpt.output import MANIFEST_NAME
from nvfp4ckpt.io import BufferPool, buffers_from
from nvfp4ckpt.layouts.trtllm_gen.ranks import to_kernel

SMALL = {"hidden_size": 256, "moe_intermediate_size": 128, "num_experts": 8, "vocab_size": 512,
         "num_attention_heads": 4, "num_key_value_heads": 2}  # fmt: skip


@pytest.mark.parametrize("fmt", ["modelopt", "compressed-tensors"])
def test_mapped_layer_matches_stacked_transform(tmp_path, fmt):
    # Small shards: a layer's experts spread over several files.
    write_example(tmp_path / "src", format=fmt, shape="qwen3-30b-a3b", layers=2, config_overrides=SMALL, max_shard_size="300KB")
    ckpt = open_checkpoint(tmp_path / "src")
    assert any(len({ckpt.files.info(n).file for n in layer.source_names()}) > 1 for layer in ckpt.layers)
    pool = BufferPool()
    seen: set[int] = set()
    for layer in ckpt.layers:
        assert has_fast_path(layer)
        src = read_layer_source(ckpt, layer)
        expected = to_kernel(src["w31"], src["s31"], src["down"], src["down_scale"], *padded_dims(layer))
        with buffers_from(pool):
            got = convert_layer_fast(ckpt, layer)
        for key, ref in zip(("w13_weight", "w13_weight_scale", "w2_weight", "w2_weight_scale"), expected):
            # numpy uint8 on the fast path (the writer only takes bytes; the header has the dtype)
            assert isinstance(got[key], np.ndarray) and got[key].dtype == np.uint8, key
            assert got[key].shape == tuple(ref.shape), key
            assert np.array_equal(got[key], ref.view(torch.uint8).numpy()), key
        # Scalars: computed in numpy here, in torch on the plain path; the same float32 bits either way.
        ref_scalars = layer_scalars(ckpt, layer, src["raw_scalars"])
        assert set(ref_scalars) <= set(got)
        for key, ref in ref_scalars.items():
            assert isinstance(got[key], np.ndarray), key
            assert got[key].tobytes() == ref.contiguous().view(torch.uint8).numpy().tobytes(), key
        ptrs = []
        for key in ("w13_weight", "w13_weight_scale", "w2_weight", "w2_weight_scale"):
            lease = pool.lease(got[key])
            assert lease is not None
            ptrs.append(lease.ptr)
            del lease  # as the sink does once the bytes are written and hashed: the buffer goes back
        if seen:
            assert set(ptrs) == seen, "the second layer reuses the first layer's buffers"
        seen = set(ptrs)
    assert pool.lease(torch.empty(4)) is None


def test_files_hash_to_manifest_for_any_workers(tmp_path):
    # vocab 4096: embeddings and lm_head of 2 MiB, so carried tensors go through pooled read buffers too
    write_example(tmp_path / "src", shape="qwen3-30b-a3b", layers=3, config_overrides={**SMALL, "vocab_size": 4096},
                  max_shard_size="2MB")  # fmt: skip
    manifests = []
    for workers in (1, 3):
        dst = tmp_path / f"out{workers}"
        convert_checkpoint(tmp_path / "src", dst, workers=workers, max_shard_size="3MB")
        manifest = json.loads((dst / MANIFEST_NAME).read_text())
        for entry in manifest["files"]:
            data = (dst / entry["name"]).read_bytes()
            assert len(data) == entry["size"] and hashlib.sha256(data).hexdigest() == entry["sha256"], entry["name"]
        manifests.append(manifest)
    assert manifests[0] == manifests[1]

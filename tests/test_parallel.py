"""Rank-sharded output (--tp/--ep): each rank's tensors are FlashInfer's preparation of that rank's slice."""

from __future__ import annotations

import json

import pytest
import torch
from flashinfer.fused_moe.core import _maybe_get_cached_w3_w1_permute_indices, get_w2_permute_indices_with_cache
from safetensors import safe_open

from nvfp4ckpt import convert_checkpoint
from nvfp4ckpt.cli import main
from nvfp4ckpt import revert_checkpoint
from nvfp4ckpt import load_moe_layer
from nvfp4ckpt import verify_checkpoint
from tests.conftest import reference_swizzle_128x4, load_dir, u8




@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("ep", [1, 2])
def test_rank_tensors_match_flashinfer_on_the_rank_slice(example_factory, tmp_path, tp, ep):
    src = example_factory("qwen3_moe", "compressed-tensors")
    dst = tmp_path / "out"
    convert_checkpoint(src, dst, tp=tp, ep=ep)
    source = load_dir(src)
    desc = json.loads((dst / "config.json").read_text())["quantization_config"]["moe_kernel_layout"]
    e, h, i = 8, 256, 128
    e_loc, i_loc = e // ep, i // tp
    i_pad = -(-i_loc // 64) * 64  # tp=4: 32 -> 64 per half
    p = "model.layers.1.mlp.experts"
    if tp * ep == 1:
        assert "parallel" not in desc and not (dst / "ranks").exists()
        return
    assert desc["parallel"]["tp"] == tp and desc["parallel"]["ep"] == ep
    top = load_dir(dst)
    assert not any(".experts." in k for k in top)  # experts live only in the rank folders
    cache: dict = {}
    for ep_rank in range(ep):
        for tp_rank in range(tp):
            rank = ep_rank * tp + tp_rank
            part = dst / "ranks" / f"rank-{rank:03d}"
            out = load_dir(part)
            with safe_open(next(part.glob("*.safetensors")), "pt") as sf:
                info = json.loads(sf.metadata()["nvfp4ckpt_rank"])
            assert (info["tp_rank"], info["ep_rank"]) == (tp_rank, ep_rank)
            assert out[f"{p}.w13_weight"].shape == (e_loc, 2 * i_pad, h // 2)
            assert out[f"{p}.w2_weight"].shape == (e_loc, h, i_pad // 2)
            i0, i1 = tp_rank * i_loc, (tp_rank + 1) * i_loc
            for x in range(e_loc):
                g = ep_rank * e_loc + x
                # The slice an engine loads for this rank, padded per half as vLLM does, then FlashInfer's prep.
                w31 = torch.zeros(2 * i_pad, h // 2, dtype=torch.uint8)
                s31 = torch.zeros(2 * i_pad, h // 16, dtype=torch.uint8)
                for half, proj in enumerate(("up_proj", "gate_proj")):
                    w31[half * i_pad : half * i_pad + i_loc] = source[f"{p}.{g}.{proj}.weight_packed"][i0:i1]
                    s31[half * i_pad : half * i_pad + i_loc] = u8(source[f"{p}.{g}.{proj}.weight_scale"]).reshape(i, -1)[i0:i1]
                perm = _maybe_get_cached_w3_w1_permute_indices(cache, w31, 128)
                assert torch.equal(out[f"{p}.w13_weight"][x], w31[perm])
                assert torch.equal(u8(out[f"{p}.w13_weight_scale"][x]).reshape(2 * i_pad, -1), reference_swizzle_128x4(s31[perm]))
                down = torch.zeros(h, i_pad // 2, dtype=torch.uint8)
                down[:, : i_loc // 2] = source[f"{p}.{g}.down_proj.weight_packed"][:, i0 // 2 : i1 // 2]
                ds = torch.zeros(h, i_pad // 16, dtype=torch.uint8)
                ds[:, : i_loc // 16] = u8(source[f"{p}.{g}.down_proj.weight_scale"]).reshape(h, -1)[:, i0 // 16 : i1 // 16]
                dperm = get_w2_permute_indices_with_cache(cache, down, 128)
                assert torch.equal(out[f"{p}.w2_weight"][x], down[dperm])
                assert torch.equal(u8(out[f"{p}.w2_weight_scale"][x]).reshape(h, -1), reference_swizzle_128x4(ds[dperm]))
            # Global a1/a2: every rank carries the same hidden-state scale.
            full_in = torch.stack([1 / source[f"{p}.{g}.{r}.input_global_scale"].float() for g in range(e) for r in ("gate_proj", "up_proj")])
            assert torch.equal(out[f"{p}.w13_input_scale_quant"], (1 / full_in.max()).reshape(1))

    report = verify_checkpoint(dst, source=src, backend="torch", tokens=32)
    assert report.passed, report.to_dict()
    assert all(n.rel_l2 < 1e-6 for n in report.numerics)  # sum over ranks == the whole layer (fp32 order aside)
    back = tmp_path / "back"
    revert_checkpoint(dst, back)
    a, b = load_dir(src), load_dir(back)
    assert a.keys() == b.keys() and all(torch.equal(u8(a[k]), u8(b[k])) for k in a)


def test_runtime_rank_layers_sum_to_the_layer(example_factory, tmp_path):
    src = example_factory("deepseek_v3", "modelopt")
    convert_checkpoint(src, tmp_path / "whole")
    convert_checkpoint(src, tmp_path / "ranks", tp=2, ep=2)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(7, 256, generator=gen).to(torch.bfloat16)
    logits = torch.randn(7, 8, generator=gen).to(torch.bfloat16)
    whole = load_moe_layer(tmp_path / "whole", 1)(x, logits, backend="torch", act="bf16")
    parts = sum(load_moe_layer(tmp_path / "ranks", 1, rank=r)(x, logits, backend="torch", act="bf16") for r in range(4))
    assert torch.allclose(parts, whole, rtol=1e-5, atol=1e-5)
    with pytest.raises(Exception, match="pass rank="):
        load_moe_layer(tmp_path / "ranks", 1)


def test_splits_that_do_not_divide(example_factory, tmp_path, capsys):
    src = example_factory()
    assert main(["convert", str(src), str(tmp_path / "a"), "--ep", "3"]) == 2
    assert "8 experts do not split evenly over --ep 3" in " ".join(capsys.readouterr().err.split())
    assert main(["convert", str(src), str(tmp_path / "b"), "--tp", "16"]) == 2
    assert "does not split over --tp 16" in " ".join(capsys.readouterr().err.split())

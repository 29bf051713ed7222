"""Sizes the kernel cannot take as they are (I % 64, H % 128) are zero-padded per gate/up half."""

from __future__ import annotations

import json

import pytest
import torch
from flashinfer.fused_moe.core import _maybe_get_cached_w3_w1_permute_indices, get_w2_permute_indices_with_cache
from safetensors.torch import load_file

from nvfp4ckpt import convert_checkpoint, inspect_checkpoint, write_example
from nvfp4ckpt import revert_checkpoint
from nvfp4ckpt import verify_checkpoint
from tests.conftest import reference_swizzle_128x4, load_dir, u8




# (hidden, moe intermediate): I needs padding; H needs padding; both.
CASES = [(256, 96, 256, 128), (192, 128, 256, 128), (192, 80, 256, 128)]


@pytest.mark.parametrize("h,i,h_pad,i_pad", CASES)
@pytest.mark.parametrize("fmt", ["modelopt", "compressed-tensors"])
def test_padded_conversion(tmp_path, h, i, h_pad, i_pad, fmt):
    src = tmp_path / "src"
    write_example(src, format=fmt, config_overrides={"hidden_size": h, "moe_intermediate_size": i})
    assert any("need zero padding" in issue for issue in inspect_checkpoint(src).issues)
    convert_checkpoint(src, tmp_path / "conv")
    desc = json.loads((tmp_path / "conv" / "config.json").read_text())["quantization_config"]["moe_kernel_layout"]
    assert (desc["hidden_size"], desc["hidden_size_padded"]) == (h, h_pad)
    assert (desc["intermediate_size"], desc["intermediate_size_padded"]) == (i, i_pad)

    out, source = load_dir(tmp_path / "conv"), load_dir(src)
    p = "model.layers.1.mlp.experts"
    suffix = "weight" if fmt == "modelopt" else "weight_packed"
    assert out[f"{p}.w13_weight"].shape == (8, 2 * i_pad, h_pad // 2)
    assert out[f"{p}.w2_weight_scale"].shape == (8, h_pad, i_pad // 16)
    cache: dict = {}
    for x in (0, 5):
        # FlashInfer's preparation of vLLM-style padded halves [up | 0 | gate | 0], zero-padded inputs.
        w31 = torch.zeros(2 * i_pad, h_pad // 2, dtype=torch.uint8)
        s31 = torch.zeros(2 * i_pad, h_pad // 16, dtype=torch.uint8)
        for half, proj in enumerate(("up_proj", "gate_proj")):
            w31[half * i_pad : half * i_pad + i, : h // 2] = source[f"{p}.{x}.{proj}.{suffix}"]
            s31[half * i_pad : half * i_pad + i, : h // 16] = u8(source[f"{p}.{x}.{proj}.weight_scale"]).reshape(i, -1)
        perm = _maybe_get_cached_w3_w1_permute_indices(cache, w31, 128)
        assert torch.equal(out[f"{p}.w13_weight"][x], w31[perm])
        assert torch.equal(u8(out[f"{p}.w13_weight_scale"][x]).reshape(2 * i_pad, -1), reference_swizzle_128x4(s31[perm]))
        down = torch.zeros(h_pad, i_pad // 2, dtype=torch.uint8)
        down[:h, : i // 2] = source[f"{p}.{x}.down_proj.{suffix}"]
        dperm = get_w2_permute_indices_with_cache(cache, down, 128)
        assert torch.equal(out[f"{p}.w2_weight"][x], down[dperm])

    report = verify_checkpoint(tmp_path / "conv", source=src, backend="torch", tokens=16)
    assert report.passed, report.to_dict()
    assert all(n.rel_l2 == 0.0 for n in report.numerics)

    revert_checkpoint(tmp_path / "conv", tmp_path / "back")
    back = load_dir(tmp_path / "back")
    assert back.keys() == source.keys()
    assert all(torch.equal(u8(back[k]), u8(source[k])) and back[k].shape == source[k].shape for k in source)


def test_nonzero_padding_is_caught(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    src = tmp_path / "src"
    write_example(src, config_overrides={"moe_intermediate_size": 96}, shards=1)
    convert_checkpoint(src, tmp_path / "conv")
    f = tmp_path / "conv" / "model.safetensors"
    with safe_open(f, "pt") as sf:
        meta = sf.metadata()
    t = load_file(f)
    from nvfp4ckpt.layouts.trtllm_gen import transform as layout

    name = "model.layers.0.mlp.experts.w2_weight"
    down, ds = layout.w2_from_kernel(t[name], t[name + "_scale"])
    down[:, :, -1] = 0x11  # garbage in the padded intermediate columns
    t[name], t[name + "_scale"] = layout.w2_to_kernel(down, ds)
    save_file(t, f, metadata=meta)
    report = verify_checkpoint(tmp_path / "conv", source=src, checks=("layout",))
    assert report.checks[0].problems == ["model.layers.0.mlp.experts: padding bytes are not zero"]


# convert --pad-hidden: every accepted value with a hidden size it really pads (and 512 on non-gated experts, where
# vLLM and SGLang use it), through convert -> verify (with and without the source) -> revert, all by the CLI.
PAD_HIDDEN_CASES = [
    ("qwen3_moe", 192, 128, 256),
    ("qwen3_moe", 192, 256, 256),
    ("qwen3_moe", 384, 256, 512),
    ("qwen3_moe", 192, 512, 512),
    ("qwen3_moe", 640, 512, 1024),
    ("nemotron_h", 192, 512, 512),
]


@pytest.mark.parametrize("arch,h,pad,h_pad", PAD_HIDDEN_CASES)
def test_pad_hidden_convert_verify_revert(tmp_path, capsys, arch, h, pad, h_pad):
    from nvfp4ckpt.cli import main

    src, conv, back = tmp_path / "src", tmp_path / "conv", tmp_path / "back"
    write_example(src, arch=arch, config_overrides={"hidden_size": h}, shards=1)
    assert main(["convert", str(src), str(conv), "--pad-hidden", str(pad), "--quiet"]) == 0
    desc = json.loads((conv / "config.json").read_text())["quantization_config"]["moe_kernel_layout"]
    assert (desc["hidden_size"], desc["hidden_size_padded"]) == (h, h_pad) and f"(H, to {pad})" in desc["padding"]
    out = load_dir(conv)
    w13 = next(v for k, v in out.items() if k.endswith(".w13_weight"))
    assert w13.shape[-1] == h_pad // 2
    assert main(["verify", str(conv), "--source", str(src), "--tokens", "8", "--quiet"]) == 0
    assert main(["verify", str(conv), "--quiet"]) == 0  # descriptor self-consistency reads the padding back
    assert main(["revert", str(conv), str(back), "--quiet"]) == 0
    source, reverted = load_dir(src), load_dir(back)
    assert reverted.keys() == source.keys()
    assert all(torch.equal(u8(reverted[k]), u8(source[k])) and reverted[k].shape == source[k].shape for k in source)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("value", [192, 384, 1024])
def test_pad_hidden_other_values_are_refused(example_factory, tmp_path, capsys, value):
    from nvfp4ckpt.cli import main

    assert main(["convert", str(example_factory()), str(tmp_path / "x"), "--pad-hidden", str(value)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--pad-hidden {value}: choose 128 (the kernel's need), 256" in err, err
    assert not (tmp_path / "x").exists()

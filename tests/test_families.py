"""The model families beyond the first three: each a registry entry, an example, convert + verify + revert.

Naming facts per family are in docs/formats.md ("Families"); the routing oracles here are transformers' own
router modules where transformers has them (MiniMax-M2, Llama-4).
"""

from __future__ import annotations

import json

import pytest
import torch
from flashinfer import shuffle_matrix_a
from flashinfer.fused_moe.core import _maybe_get_cached_w3_w1_permute_indices

from nvfp4ckpt import convert_checkpoint, inspect_checkpoint
from nvfp4ckpt.source import architectures
from nvfp4ckpt.cli import main
from nvfp4ckpt import revert_checkpoint
from nvfp4ckpt.runtime.routing import route
from nvfp4ckpt import load_moe_layer
from nvfp4ckpt import verify_checkpoint
from tests.conftest import FORMATS, load_dir, reference_swizzle_128x4, u8

NEW_FAMILIES = ("qwen2_moe", "qwen3_next", "glm4_moe", "kimi_k2", "minimax_m2", "llama4", "nemotron_h")
ROUTING = {
    "qwen2_moe": "Default",  # norm_topk_prob=False (Qwen1.5/Qwen2-MoE's default)
    "qwen3_next": "RenormalizeNaive",
    "glm4_moe": "DeepSeekV3",
    "kimi_k2": "DeepSeekV3",
    "minimax_m2": "MiniMax2",
    "llama4": "Llama4",
    "nemotron_h": "DeepSeekV3",
}


def _descriptor(path):
    return json.loads((path / "config.json").read_text())["quantization_config"]["moe_kernel_layout"]


def _expected_moe_prefixes(arch: str, config: dict) -> list[str]:
    spec = architectures.get(arch)
    text = config.get("text_config", config)
    n = spec.names
    return [f"{n.layers}.{i}.{n.block}.experts" for i, kind in enumerate(spec.layer_kinds(text)) if kind == "moe"]


@pytest.mark.parametrize("arch", NEW_FAMILIES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_family_converts_verifies_and_reverts(example_factory, tmp_path, arch, fmt):
    src = example_factory(arch, fmt)
    config = json.loads((src / "config.json").read_text())
    report = inspect_checkpoint(src)
    assert report.architecture == arch
    assert [l.prefix for l in report.moe_layers] == _expected_moe_prefixes(arch, config)

    convert_checkpoint(src, tmp_path / "conv")
    desc = _descriptor(tmp_path / "conv")
    assert desc["architecture"] == arch and desc["routing"]["method"] == ROUTING[arch]
    checked = verify_checkpoint(tmp_path / "conv", source=src, backend="torch", tokens=16)
    assert checked.passed, checked.to_dict()
    assert [c.status for c in checked.checks] == ["pass", "pass", "pass"]

    # everything that is not a routed expert is carried over byte for byte (routers, biases, shared experts, mixers)
    a, c = load_dir(src), load_dir(tmp_path / "conv")
    carried = [k for k in a if ".experts." not in k]
    assert carried and all(torch.equal(u8(a[k]), u8(c[k])) for k in carried)

    revert_checkpoint(tmp_path / "conv", tmp_path / "back")
    b = load_dir(tmp_path / "back")
    assert a.keys() == b.keys()
    assert all(a[k].dtype == b[k].dtype and torch.equal(u8(a[k]), u8(b[k])) for k in a)


def test_nemotron_h_is_non_gated_and_padded_to_128(example_factory, tmp_path):
    src = example_factory("nemotron_h", "modelopt")
    convert_checkpoint(src, tmp_path / "conv")
    desc = _descriptor(tmp_path / "conv")
    assert desc["activation"] == "relu2" and desc["w13_order"] == "up" and desc["gated_act_row_interleave"] is False
    assert desc["w13_scalar_columns"] == ["up"]
    assert (desc["intermediate_size"], desc["intermediate_size_padded"]) == (192, 256)
    a, c = load_dir(src), load_dir(tmp_path / "conv")
    p = "backbone.layers.1.mixer.experts"
    assert c[f"{p}.w13_weight"].shape == (8, 256, 128) and c[f"{p}.w13_weight_scale_2"].shape == (8, 1)
    assert not any(k.startswith(f"{p}.0.gate") for k in a)  # the source has no gate projection at all
    # Each expert's w13 is FlashInfer's non-gated preparation of its zero-padded up_proj.
    cache: dict = {}
    for e in range(8):
        up = torch.zeros(256, 128, dtype=torch.uint8)
        up[:192] = a[f"{p}.{e}.up_proj.weight"]
        up_s = torch.zeros(256, 16, dtype=torch.uint8)
        up_s[:192] = a[f"{p}.{e}.up_proj.weight_scale"].view(torch.uint8)
        assert torch.equal(c[f"{p}.w13_weight"][e], shuffle_matrix_a(up, 128))
        sperm = _maybe_get_cached_w3_w1_permute_indices(cache, up_s, 128, num_elts_per_sf=16, is_gated_act_gemm=False)
        assert torch.equal(c[f"{p}.w13_weight_scale"][e].view(torch.uint8), reference_swizzle_128x4(up_s[sperm]))


def test_nemotron_h_gated_layout_is_caught(example_factory, tmp_path):
    """A w13 laid out as if gated (the interleave applied) fails the layout check, naming the layer (here the
    padded rows land among the real ones, so the padding check is the first to see it)."""
    from safetensors.torch import load_file, save_file

    from nvfp4ckpt.layouts.trtllm_gen import transform as layout

    src = example_factory("nemotron_h", "modelopt")
    convert_checkpoint(src, tmp_path / "conv")
    name = "backbone.layers.1.mixer.experts.w13_weight"
    for f in (tmp_path / "conv").glob("*.safetensors"):
        tensors = load_file(f)
        if name in tensors:
            up = layout.unshuffle_rows(tensors[name])
            tensors[name] = layout.w13_rows_to_kernel(up)  # the gated row order: wrong for relu2
            save_file(tensors, f, metadata=dict(__import__("safetensors").safe_open(f, "pt").metadata()))
    checked = verify_checkpoint(tmp_path / "conv", source=src, backend="torch", tokens=8, hash_files=False)
    layout_check = next(c for c in checked.checks if c.name == "layout")
    assert layout_check.status == "fail" and "backbone.layers.1.mixer.experts" in " ".join(layout_check.problems)


@pytest.mark.parametrize("tp,ep", [(2, 1), (1, 2), (2, 2)])
def test_nemotron_h_rank_sharded(example_factory, tmp_path, tp, ep):
    src = example_factory("nemotron_h", "compressed-tensors")
    convert_checkpoint(src, tmp_path / "conv", tp=tp, ep=ep)
    desc = _descriptor(tmp_path / "conv")
    ranks = desc["layers"]["backbone.layers.1.mixer.experts"]["ranks"]
    assert [r["intermediate_size_padded"] for r in ranks] == [-(-192 // tp // 128) * 128] * (tp * ep)  # to 128, not 64
    checked = verify_checkpoint(tmp_path / "conv", source=src, backend="torch", tokens=8)
    assert checked.passed, checked.to_dict()
    revert_checkpoint(tmp_path / "conv", tmp_path / "back")
    a, b = load_dir(src), load_dir(tmp_path / "back")
    assert all(torch.equal(u8(a[k]), u8(b[k])) for k in a)


# ----------------------------------------------------------------------------------------------
# Routing oracles: transformers' own routers


def test_minimax2_routing_matches_transformers():
    from transformers.models.minimax_m2.configuration_minimax_m2 import MiniMaxM2Config
    from transformers.models.minimax_m2.modeling_minimax_m2 import MiniMaxM2TopKRouter

    cfg = MiniMaxM2Config(num_local_experts=16, num_experts_per_tok=4, hidden_size=64, num_hidden_layers=1)
    router = MiniMaxM2TopKRouter(cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        router.weight.copy_(torch.randn(16, 64, generator=gen))
    bias = 0.1 * torch.randn(16, generator=gen)
    x = torch.randn(33, 64, generator=gen)
    logits, hf_w, hf_ids = router(x, bias)
    ids, w = route(logits, "MiniMax2", 4, bias=bias)
    order_hf, order = hf_ids.argsort(-1), ids.long().argsort(-1)
    assert torch.equal(hf_ids.gather(1, order_hf), ids.long().gather(1, order))
    torch.testing.assert_close(w.gather(1, order), hf_w.float().gather(1, order_hf), rtol=1e-6, atol=0)


def test_llama4_routing_and_input_weights_match_transformers(example_factory):
    from transformers.models.llama4.configuration_llama4 import Llama4TextConfig
    from transformers.models.llama4.modeling_llama4 import Llama4Router

    cfg = Llama4TextConfig(num_local_experts=8, num_experts_per_tok=1, hidden_size=256, num_hidden_layers=1)
    router = Llama4Router(cfg)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        router.weight.copy_(torch.randn(8, 256, generator=gen))
    x = torch.randn(17, 256, generator=gen)
    scores, logits = router(x)
    ids, w = route(logits, "Llama4", 1)
    assert torch.equal(ids.long()[:, 0], scores.argmax(-1))
    torch.testing.assert_close(w[:, 0], scores.max(-1).values.float(), rtol=0, atol=0)

    # The converted layer scales each token's *input* by its weight (as Llama4TextMoe does), not the output.
    from nvfp4ckpt.runtime.reference import moe_forward_torch

    layer = load_moe_layer(_converted(example_factory), 0)
    hidden = torch.randn(17, 256, generator=gen).to(torch.bfloat16)
    got = layer(hidden, logits, backend="torch", act="bf16")
    s = layer.source_weights()
    scaled = (hidden * w.to(torch.bfloat16)).to(torch.bfloat16)
    want = moe_forward_torch(
        scaled, ids, torch.ones_like(w), s.gate, s.up, s.down, s.gate_scale, s.up_scale, s.down_scale,
        s.ws2_gate, s.ws2_up, s.ws2_down, s.a1, s.a2, act="bf16",
    )  # fmt: skip
    assert torch.equal(got, want)
    on_output = moe_forward_torch(
        hidden, ids, w, s.gate, s.up, s.down, s.gate_scale, s.up_scale, s.down_scale,
        s.ws2_gate, s.ws2_up, s.ws2_down, s.a1, s.a2, act="bf16",
    )  # fmt: skip
    assert not torch.allclose(got, on_output, rtol=1e-3, atol=1e-3)  # SwiGLU is not homogeneous: the place matters


_CONVERTED: dict = {}


def _converted(example_factory):
    if "llama4" not in _CONVERTED:
        import tempfile
        from pathlib import Path

        out = Path(tempfile.mkdtemp()) / "conv"
        convert_checkpoint(example_factory("llama4", "modelopt"), out)
        _CONVERTED["llama4"] = out
    return _CONVERTED["llama4"]


def test_relu2_reference_matches_a_float64_loop():
    from nvfp4ckpt import quant
    from nvfp4ckpt.runtime.reference import moe_forward_torch

    gen = torch.Generator().manual_seed(3)
    e, h, i = 3, 128, 128

    def q(rows, cols):
        qs = [quant.quantize_linear(torch.randn(rows, cols, generator=gen) / cols**0.5, 1.0) for _ in range(e)]
        return torch.stack([x.weight for x in qs]), torch.stack([x.weight_scale for x in qs]), torch.stack([x.weight_scale_2 for x in qs]).float()

    up, up_s, ws2_up = q(i, h)
    down, down_s, ws2_down = q(h, i)
    x = (2 * torch.randn(5, h, generator=gen)).to(torch.bfloat16)
    ids, w = route(torch.randn(5, e, generator=gen), "renormalize", 2)
    out = moe_forward_torch(x, ids, w, None, up, down, None, up_s, down_s, None, ws2_up, ws2_down, 1.0, 1.0, act="bf16")
    ref = torch.zeros(5, h, dtype=torch.float64)
    for t in range(5):
        for k in range(2):
            x_e = int(ids[t, k])
            wu = quant.dequantize(up[x_e], up_s[x_e], 1.0).double() * float(ws2_up[x_e])
            wd = quant.dequantize(down[x_e], down_s[x_e], 1.0).double() * float(ws2_down[x_e])
            inter = torch.relu(wu @ x[t].double()) ** 2
            ref[t] += float(w[t, k]) * (wd @ inter.float().to(torch.bfloat16).double())
    assert float((out.double() - ref).norm() / ref.norm()) < 1e-5


# ----------------------------------------------------------------------------------------------
# CLI


@pytest.mark.parametrize("model_type", NEW_FAMILIES)
def test_example_arch_takes_the_model_type(tmp_path, model_type, capsys):
    assert main(["example", str(tmp_path / "ex"), "--arch", model_type, "--json"]) == 0
    config = json.loads((tmp_path / "ex" / "config.json").read_text())
    assert config["model_type"] == model_type
    assert main(["inspect", str(tmp_path / "ex"), "--json"]) == 0


def test_inspect_lists_supported_families(tmp_path, capsys):
    assert main(["inspect", "--families", "--json"]) == 0
    listed = {f["name"]: f for f in json.loads(capsys.readouterr().out)["families"]}
    assert set(NEW_FAMILIES) | {"qwen3_moe", "deepseek_v3", "mixtral"} <= set(listed)
    assert listed["nemotron_h"]["activation"] == "relu2" and listed["llama4"]["routing"] == "Llama4"


# ----------------------------------------------------------------------------------------------
# verify --gsm8k: the whole-model runner builds the model with transformers, so it covers the families whose
# transformers model matches the checkpoint (and whose example carries every tensor of it).

GSM8K_FAMILIES = ("qwen2_moe", "glm4_moe", "kimi_k2", "minimax_m2")


# Token-identical on every run: each side generates in a fresh process (eval/fresh.py), so what earlier tests left
# in this process cannot change the numbers (issue #26: this test was a known flake under a rerun-once marker).
@pytest.mark.parametrize("arch", GSM8K_FAMILIES)
def test_gsm8k_runs_for_family(example_factory, tmp_path, arch):
    from nvfp4ckpt.eval.gsm8k import run_gsm8k
    from tests.test_gsm8k import DATA

    src = example_factory(arch, "modelopt")
    convert_checkpoint(src, tmp_path / "conv")
    report = run_gsm8k(tmp_path / "conv", source=src, data=DATA, num_shots=1, num_questions=2, max_new_tokens=8, device="cpu")
    assert report.passed and report.identical == 1.0, [c for c in report.checks]


@pytest.mark.parametrize(
    "arch,message",
    [
        ("llama4", "multimodal wrapper"),
        ("qwen3_next", "no tensor for model.layers.0.linear_attn"),
        ("nemotron_h", "verify --gsm8k cannot run nemotron_h: transformers' Nemotron-H mixer"),
    ],
)
def test_gsm8k_says_clearly_when_the_runner_cannot_build_a_family(example_factory, tmp_path, arch, message):
    from nvfp4ckpt.errors import Nvfp4CkptError
    from nvfp4ckpt.eval.gsm8k import run_gsm8k
    from tests.test_gsm8k import DATA

    src = example_factory(arch, "modelopt")
    convert_checkpoint(src, tmp_path / "conv")
    with pytest.raises(Nvfp4CkptError, match=message):
        run_gsm8k(tmp_path / "conv", source=src, data=DATA, num_shots=1, num_questions=1, max_new_tokens=4, device="cpu")


# ----------------------------------------------------------------------------------------------
# Fused ("BMM") expert inputs: ModelOpt writes Llama-4's experts as one input-major tensor per projection


def test_llama4_fused_experts_against_flashinfer(example_factory, tmp_path):
    src = example_factory("llama4", "modelopt")
    convert_checkpoint(src, tmp_path / "conv")
    desc = _descriptor(tmp_path / "conv")
    p = "language_model.model.layers.1.feed_forward.experts"
    assert desc["layers"][p]["source_fused"] == "bmm"
    a, c = load_dir(src), load_dir(tmp_path / "conv")
    assert a[f"{p}.gate_up_proj"].shape == (8, 128, 256) and f"{p}.0.gate_proj.weight" not in a
    cache: dict = {}
    for e in range(8):
        rows = a[f"{p}.gate_up_proj"][e].T.contiguous()  # [2I, H/2]: gate rows, then up rows
        srows = a[f"{p}.gate_up_proj_weight_scale"][e].view(torch.uint8).T.contiguous()
        w31, s31 = torch.cat([rows[128:], rows[:128]]), torch.cat([srows[128:], srows[:128]])
        perm = _maybe_get_cached_w3_w1_permute_indices(cache, w31, 128)
        assert torch.equal(c[f"{p}.w13_weight"][e], w31[perm])
        sperm = _maybe_get_cached_w3_w1_permute_indices(cache, s31, 128, num_elts_per_sf=16)
        assert torch.equal(c[f"{p}.w13_weight_scale"][e].view(torch.uint8), reference_swizzle_128x4(s31[sperm]))
        down = a[f"{p}.down_proj"][e].T.contiguous()
        assert torch.equal(c[f"{p}.w2_weight"][e], shuffle_matrix_a(down, 128))
    # one global scale per fused tensor, repeated for every expert and both halves
    ws2 = a[f"{p}.gate_up_proj_weight_scale_2"]
    assert torch.equal(c[f"{p}.w13_weight_scale_2"], ws2.expand(8, 2))


def test_fused_experts_with_a_wrong_shape_are_refused(example_factory, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from nvfp4ckpt.errors import BadTensorError

    src = tmp_path / "src"
    shutil.copytree(example_factory("llama4", "modelopt"), src)
    name = "language_model.model.layers.1.feed_forward.experts.down_proj"
    for f in src.glob("*.safetensors"):
        tensors = load_file(f)
        if name in tensors:
            tensors[name] = tensors[name][:, :32].contiguous()
            save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(BadTensorError, match=rf"tensor '{name}' is U8\[8, 32, 256\]; expected U8\[8, 64, 256\]"):
        convert_checkpoint(src, tmp_path / "dst")
    assert not (tmp_path / "dst").exists()


def test_fused_and_per_expert_tensors_in_one_layer_are_refused(example_factory, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from nvfp4ckpt.errors import BadTensorError

    src = tmp_path / "src"
    shutil.copytree(example_factory("llama4", "modelopt"), src)
    p = "language_model.model.layers.1.feed_forward.experts"
    f = next(f for f in src.glob("*.safetensors") if f"{p}.down_proj" in load_file(f))
    tensors = load_file(f)
    tensors[f"{p}.0.gate_proj.weight"] = torch.zeros(128, 128, dtype=torch.uint8)  # a stray per-expert tensor
    save_file(tensors, f, metadata={"format": "pt"})
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"][f"{p}.0.gate_proj.weight"] = f.name
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(BadTensorError, match=f"{p} has both fused and per-expert tensors"):
        convert_checkpoint(src, tmp_path / "dst")


def test_runtime_refuses_what_it_cannot_run(example_factory, tmp_path):
    from nvfp4ckpt.errors import InputError

    convert_checkpoint(example_factory("nemotron_h", "modelopt"), tmp_path / "nemo")
    layer = load_moe_layer(tmp_path / "nemo", 1)
    x = torch.randn(4, layer.hidden_size, dtype=torch.bfloat16)
    ids, w = torch.zeros(4, 2, dtype=torch.int32), torch.ones(4, 2)
    if not torch.cuda.is_available():  # relu2 runs on Triton too (tests/test_triton_moe.py), on a GPU
        with pytest.raises(InputError, match="--backend triton needs a CUDA GPU"):
            layer.forward_triton(x, ids, w)
    llama = load_moe_layer(_converted(example_factory), 1)
    llama.routing = {**llama.routing, "top_k": 2}
    with pytest.raises(InputError, match="applies weights on the input; top_k must be 1"):
        llama(torch.randn(3, 256, dtype=torch.bfloat16), torch.randn(3, 8))


def test_qwen3_5_moe_reads_as_qwen3_next(example_factory, tmp_path):
    """Qwen3.5 MoE checkpoints (a multimodal wrapper; text model under model.language_model) use Qwen3-Next's entry."""
    import shutil

    from safetensors.torch import load_file, save_file

    src = tmp_path / "src"
    shutil.copytree(example_factory("qwen3_next", "modelopt"), src)
    for f in src.glob("*.safetensors"):
        save_file({k.replace("model.layers.", "model.language_model.layers."): v for k, v in load_file(f).items()}, f, metadata={"format": "pt"})
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k.replace("model.layers.", "model.language_model.layers."): v for k, v in index["weight_map"].items()}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    cfg = json.loads((src / "config.json").read_text())
    text = {k: v for k, v in cfg.items() if k not in ("quantization_config", "architectures")}
    (src / "config.json").write_text(json.dumps({
        "model_type": "qwen3_5_moe", "architectures": ["Qwen3_5MoeForConditionalGeneration"],
        "quantization_config": cfg["quantization_config"], "text_config": {**text, "model_type": "qwen3_5_moe_text"},
    }))  # fmt: skip
    report = inspect_checkpoint(src)
    assert report.architecture == "qwen3_next" and report.routing["method"] == "RenormalizeNaive"
    assert [l.prefix for l in report.moe_layers] == [f"model.language_model.layers.{i}.mlp.experts" for i in range(2)]
    convert_checkpoint(src, tmp_path / "conv")
    assert verify_checkpoint(tmp_path / "conv", source=src, backend="torch", tokens=8).passed

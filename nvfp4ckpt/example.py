"""The built-in example: a tiny, seeded NVFP4 MoE checkpoint that transformers can instantiate.

It mirrors what the real producers write (see docs/formats.md): ModelOpt shares one
weight_scale_2 between gate and up and one input_scale across a layer's experts;
compressed-tensors keeps a global scale per module and per-expert down-projection input scales.
Attention, dense MLPs and shared experts are quantized too; routers, norms, embeddings and
lm_head stay bf16 (DeepSeek's correction bias fp32).
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from . import architectures
from .errors import InputError, OutputExistsError
from .formats.compressed_tensors import PACK_FORMAT
from .io import TORCH_TO_DTYPE, PlannedTensor, ShardPlan, ShardWriter
from .quant import quantize_linear

FORMAT_CHOICES = ("modelopt", "compressed-tensors")

_CORPUS = """Question: Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.
How many clips did Natalia sell altogether in April and May?
Answer: Natalia sold 48/2 = 24 clips in May. Natalia sold 48+24 = 72 clips altogether in April and May. #### 72
Question: Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much did she earn?
Answer: Weng earns 12/60 = $0.2 per minute. Working 50 minutes, she earned 0.2 x 50 = $10. #### 10
The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9 10 100 1000 + - * / = $ % , . ? !
"""
SPECIAL_TOKENS = ["<|endoftext|>", "<s>", "</s>", "<|im_end|>"]


@dataclass
class ExampleResult:
    path: Path
    architecture: str
    format: str
    files: list[str]
    num_tensors: int


def write_example(
    out: str | Path,
    *,
    format: str = "modelopt",
    arch: str = "qwen3_moe",
    seed: int = 0,
    shards: int = 2,
    overwrite: bool = False,
    config_overrides: dict | None = None,
) -> ExampleResult:
    """Write the tiny example checkpoint to ``out`` (``config_overrides`` changes its sizes)."""
    if format not in FORMAT_CHOICES:
        raise InputError(f"--format {format!r}: choose one of {', '.join(FORMAT_CHOICES)}")
    spec = architectures.get(arch)
    out_path = Path(out).expanduser()
    if out_path.exists() and any(out_path.iterdir()):
        if not overwrite:
            raise OutputExistsError(f"{out_path}: exists and is not empty; pass --overwrite to replace it")
        shutil.rmtree(out_path)
    out_path.mkdir(parents=True, exist_ok=True)
    config = {**spec.example_config(), **(config_overrides or {})}
    gen = torch.Generator().manual_seed(seed)
    tensors = _model_tensors(spec.name, config, format, gen)

    exclude = ["lm_head", "model.embed_tokens", "*.gate"] if spec.name != "mixtral" else ["lm_head", "model.embed_tokens", "*.block_sparse_moe.gate"]
    if format == "modelopt":
        section = {"quant_algo": "NVFP4", "kv_cache_quant_algo": None, "group_size": 16, "exclude_modules": exclude}
        (out_path / "hf_quant_config.json").write_text(
            json.dumps({"producer": {"name": "nvfp4ckpt-example", "version": "0"}, "quantization": section}, indent=2) + "\n"
        )
        config["quantization_config"] = {"quant_method": "modelopt", **section}
    else:
        scheme = {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16, "symmetric": True, "dynamic": False}
        config["quantization_config"] = {
            "quant_method": "compressed-tensors",
            "format": PACK_FORMAT,
            "quantization_status": "compressed",
            "config_groups": {
                "group_0": {
                    "targets": ["Linear"],
                    "format": PACK_FORMAT,
                    "weights": scheme,
                    "input_activations": {**scheme, "dynamic": "local"},
                }
            },
            "ignore": ["lm_head", r"re:.*mlp.gate$", r"re:.*block_sparse_moe.gate$"],
        }
    (out_path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_path / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": 2, "do_sample": False}, indent=2) + "\n"
    )
    _write_tokenizer(out_path)
    files = _write_shards(out_path, tensors, shards)
    return ExampleResult(out_path, spec.name, format, sorted(p.name for p in out_path.iterdir()), len(tensors))


# ----------------------------------------------------------------------------------------------


def _write_shards(out: Path, tensors: dict[str, torch.Tensor], shards: int) -> list[str]:
    """Split into ``shards`` files of about equal size (so a layer's experts straddle files)."""
    planned = [PlannedTensor(n, TORCH_TO_DTYPE[t.dtype], tuple(t.shape)) for n, t in tensors.items()]
    total = sum(p.nbytes for p in planned)
    shards = max(1, min(shards, len(planned)))
    groups: list[list[PlannedTensor]] = [[] for _ in range(shards)]
    start = 0
    for p in planned:
        groups[min(shards - 1, start * shards // max(total, 1))].append(p)
        start += p.nbytes
    plans = [ShardPlan("", g) for g in groups if g]
    for i, plan in enumerate(plans):
        plan.filename = "model.safetensors" if len(plans) == 1 else f"model-{i + 1:05d}-of-{len(plans):05d}.safetensors"
    for plan in plans:
        writer = ShardWriter(out / plan.filename, plan, {"format": "pt"})
        for t in plan.tensors:
            writer.write(t.name, tensors[t.name])
        writer.close()
    if len(plans) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": {t.name: p.filename for p in plans for t in p.tensors}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return [p.filename for p in plans]


def _write_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS], trainer=trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "pad_token": "<|endoftext|>",
                "unk_token": None,
                "add_bos_token": False,
                "model_max_length": 2048,
            },
            indent=2,
        )
        + "\n"
    )


class _Builder:
    def __init__(self, fmt: str, gen: torch.Generator) -> None:
        self.fmt = fmt
        self.gen = gen
        self.tensors: dict[str, torch.Tensor] = {}

    def randn(self, *shape: int, std: float) -> torch.Tensor:
        return torch.randn(shape, generator=self.gen) * std

    def plain(self, name: str, value: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> None:
        self.tensors[name] = value.to(dtype).contiguous()

    def norm(self, name: str, size: int) -> None:
        self.plain(f"{name}.weight", 1.0 + self.randn(size, std=0.02))

    def linear(self, module: str, out_f: int, in_f: int, *, input_amax: float) -> None:
        w = self.randn(out_f, in_f, std=1.0 / math.sqrt(in_f))
        q = quantize_linear(w, input_amax)
        self._emit(module, q.weight, q.weight_scale, q.weight_scale_2, q.input_scale)

    def linear_group(self, modules: list[str], shapes: list[tuple[int, int]], *, input_amax: float) -> None:
        """Several linears sharing one weight_scale_2 (ModelOpt fuses gate/up this way)."""
        ws = [self.randn(o, i, std=1.0 / math.sqrt(i)) for o, i in shapes]
        amax = max(float(w.abs().max()) for w in ws)
        ws2 = torch.tensor(amax / (6.0 * 448.0), dtype=torch.float32)
        for module, w in zip(modules, ws):
            q = _requantize(w, ws2, input_amax)
            self._emit(module, q.weight, q.weight_scale, ws2, q.input_scale)

    def _emit(self, module: str, weight, weight_scale, ws2, input_scale) -> None:
        if self.fmt == "modelopt":
            self.tensors[f"{module}.weight"] = weight
            self.tensors[f"{module}.weight_scale"] = weight_scale
            self.tensors[f"{module}.weight_scale_2"] = ws2.reshape(()).float()
            self.tensors[f"{module}.input_scale"] = input_scale.reshape(()).float()
        else:
            self.tensors[f"{module}.weight_packed"] = weight
            self.tensors[f"{module}.weight_scale"] = weight_scale
            self.tensors[f"{module}.weight_global_scale"] = (1.0 / ws2.float()).reshape(1)
            self.tensors[f"{module}.input_global_scale"] = (1.0 / input_scale.float()).reshape(1)


def _requantize(w: torch.Tensor, ws2: torch.Tensor, input_amax: float):
    from .quant import E4M3_MAX, GROUP_SIZE, QuantizedLinear, encode_e2m1

    n, k = w.shape
    blocks = w.float().reshape(n, k // GROUP_SIZE, GROUP_SIZE)
    scale = (blocks.abs().amax(-1) / 6.0 / ws2).clamp(max=E4M3_MAX).to(torch.float8_e4m3fn)
    denom = (scale.float() * ws2).unsqueeze(-1)
    scaled = torch.where(denom > 0, blocks / denom.clamp(min=1e-30), torch.zeros_like(blocks))
    return QuantizedLinear(encode_e2m1(scaled.reshape(n, k)), scale, ws2, torch.tensor(input_amax / (6.0 * 448.0)))


def _model_tensors(arch: str, cfg: dict, fmt: str, gen: torch.Generator) -> dict[str, torch.Tensor]:
    b = _Builder(fmt, gen)
    h, v = cfg["hidden_size"], cfg["vocab_size"]
    b.plain("model.embed_tokens.weight", b.randn(v, h, std=0.02))
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        amax = lambda: float(2.0 + 6.0 * torch.rand((), generator=gen))  # noqa: E731
        b.norm(f"{p}.input_layernorm", h)
        b.norm(f"{p}.post_attention_layernorm", h)
        _attention(b, arch, cfg, f"{p}.self_attn", amax())
        if arch == "deepseek_v3" and layer < cfg["first_k_dense_replace"]:
            _dense_mlp(b, f"{p}.mlp", h, cfg["intermediate_size"], amax(), fmt)
            continue
        block = f"{p}.block_sparse_moe" if arch == "mixtral" else f"{p}.mlp"
        num_experts = cfg.get("num_experts") or cfg.get("n_routed_experts") or cfg["num_local_experts"]
        inter = cfg.get("moe_intermediate_size") or cfg["intermediate_size"]
        names = ("w1", "w3", "w2") if arch == "mixtral" else ("gate_proj", "up_proj", "down_proj")
        b.plain(f"{block}.gate.weight", b.randn(num_experts, h, std=1.0 / math.sqrt(h)))
        if arch == "deepseek_v3":
            b.plain(f"{block}.gate.e_score_correction_bias", b.randn(num_experts, std=0.1), torch.float32)
        a13, a2_base = amax(), amax()
        for e in range(num_experts):
            ex = f"{block}.experts.{e}"
            if fmt == "modelopt":
                # One input_scale per layer, gate and up share weight_scale_2 (as ModelOpt exports).
                b.linear_group([f"{ex}.{names[0]}", f"{ex}.{names[1]}"], [(inter, h), (inter, h)], input_amax=a13)
                b.linear(f"{ex}.{names[2]}", h, inter, input_amax=a2_base)
            else:
                # compressed-tensors: a global scale per module; down input scales differ per expert.
                b.linear(f"{ex}.{names[0]}", inter, h, input_amax=a13)
                b.linear(f"{ex}.{names[1]}", inter, h, input_amax=a13)
                b.linear(f"{ex}.{names[2]}", h, inter, input_amax=a2_base * (0.5 + float(torch.rand((), generator=gen))))
        if arch == "deepseek_v3" and cfg.get("n_shared_experts"):
            _dense_mlp(b, f"{block}.shared_experts", h, inter * cfg["n_shared_experts"], amax(), fmt)
    b.norm("model.norm", h)
    b.plain("lm_head.weight", b.randn(v, h, std=0.02))
    return b.tensors


def _dense_mlp(b: _Builder, p: str, h: int, inter: int, amax: float, fmt: str) -> None:
    if fmt == "modelopt":
        b.linear_group([f"{p}.gate_proj", f"{p}.up_proj"], [(inter, h), (inter, h)], input_amax=amax)
    else:
        b.linear(f"{p}.gate_proj", inter, h, input_amax=amax)
        b.linear(f"{p}.up_proj", inter, h, input_amax=amax)
    b.linear(f"{p}.down_proj", h, inter, input_amax=amax * 0.5)


def _attention(b: _Builder, arch: str, cfg: dict, p: str, amax: float) -> None:
    h, nh = cfg["hidden_size"], cfg["num_attention_heads"]
    if arch == "deepseek_v3":
        ql, kvl = cfg["q_lora_rank"], cfg["kv_lora_rank"]
        rope, nope, vd = cfg["qk_rope_head_dim"], cfg["qk_nope_head_dim"], cfg["v_head_dim"]
        b.linear(f"{p}.q_a_proj", ql, h, input_amax=amax)
        b.norm(f"{p}.q_a_layernorm", ql)
        b.linear(f"{p}.q_b_proj", nh * (nope + rope), ql, input_amax=amax)
        b.linear(f"{p}.kv_a_proj_with_mqa", kvl + rope, h, input_amax=amax)
        b.norm(f"{p}.kv_a_layernorm", kvl)
        b.linear(f"{p}.kv_b_proj", nh * (nope + vd), kvl, input_amax=amax)
        b.linear(f"{p}.o_proj", h, nh * vd, input_amax=amax)
        return
    hd, nkv = cfg["head_dim"], cfg["num_key_value_heads"]
    b.linear(f"{p}.q_proj", nh * hd, h, input_amax=amax)
    b.linear(f"{p}.k_proj", nkv * hd, h, input_amax=amax)
    b.linear(f"{p}.v_proj", nkv * hd, h, input_amax=amax)
    b.linear(f"{p}.o_proj", h, nh * hd, input_amax=amax)
    if arch == "qwen3_moe":
        b.norm(f"{p}.q_norm", hd)
        b.norm(f"{p}.k_norm", hd)

"""The built-in example: a tiny, seeded NVFP4 MoE checkpoint that transformers can instantiate.

It mirrors what the real producers write (see docs/formats.md): ModelOpt shares one
weight_scale_2 between gate and up and one input_scale across a layer's experts;
compressed-tensors gives gate and up one weight_global_scale (llm-compressor fuses their observers) and keeps
per-expert down-projection input scales. ``untied_gate_up=True`` quantizes gate and up with their own global
scales instead (what neither producer writes; engines that keep one w13 scale refuse it).
Attention, dense MLPs and shared experts are quantized too; routers, norms, embeddings and
lm_head stay bf16 (DeepSeek's correction bias fp32).
"""

from __future__ import annotations

import json
import math
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ._lazy import torch

from .source import architectures
from .errors import InputError, OutputExistsError
from .source.formats import FORMATS
from .progress import TickFn
from .io import PlannedTensor, ShardPlan, ShardWriter, dtype_name, parse_size, plan_shards
from .output.install import install
from .output.safe_paths import destination_path, make_folder, refuse_link
from .quant import quantize_linear

FORMAT_CHOICES = tuple(FORMATS)

# Real models' layer shapes for synthetic checkpoints (config facts of the public NVFP4 releases).
SHAPES: dict[str, tuple[str, dict]] = {
    "qwen3-30b-a3b": ("qwen3_moe", {
        "hidden_size": 2048, "moe_intermediate_size": 768, "intermediate_size": 6144, "num_experts": 128,
        "num_experts_per_tok": 8, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
        "vocab_size": 151936, "num_hidden_layers": 48,
    }),
    "qwen3-235b-a22b": ("qwen3_moe", {
        "hidden_size": 4096, "moe_intermediate_size": 1536, "intermediate_size": 12288, "num_experts": 128,
        "num_experts_per_tok": 8, "num_attention_heads": 64, "num_key_value_heads": 4, "head_dim": 128,
        "vocab_size": 151936, "num_hidden_layers": 94,
    }),
    "deepseek-v3": ("deepseek_v3", {
        "hidden_size": 7168, "moe_intermediate_size": 2048, "intermediate_size": 18432, "n_routed_experts": 256,
        "n_shared_experts": 1, "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4, "first_k_dense_replace": 3,
        "routed_scaling_factor": 2.5, "num_attention_heads": 128, "num_key_value_heads": 128, "q_lora_rank": 1536,
        "kv_lora_rank": 512, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128, "v_head_dim": 128,
        "vocab_size": 129280, "num_hidden_layers": 61,
    }),
    "mixtral-8x7b": ("mixtral", {
        "hidden_size": 4096, "intermediate_size": 14336, "num_local_experts": 8, "num_experts_per_tok": 2,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 32000,
        "num_hidden_layers": 32,
    }),
}  # fmt: skip

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
    shape: str | None = None,
    layers: int | None = None,
    max_shard_size: str | int | None = None,
    progress: TickFn | None = None,
    untied_gate_up: bool = False,
) -> ExampleResult:
    """Write an example checkpoint to ``out``.

    Without ``shape``: the tiny example (real quantization of seeded random weights, ``shards`` files).
    With ``shape`` (see ``SHAPES``): a synthetic checkpoint at a real model's layer shapes with ``layers``
    decoder layers, random but valid NVFP4 data, sharded by ``max_shard_size`` (default 5GB, like the
    published NVFP4 checkpoints). ``config_overrides`` changes config entries in both modes.
    ``untied_gate_up``: gate and up get their own global scales (the producers share one).
    """
    if format not in FORMAT_CHOICES:
        raise InputError(f"--format {format!r}: choose one of {', '.join(FORMAT_CHOICES)}")
    if shape is not None:
        if shape not in SHAPES:
            raise InputError(f"--shape {shape!r}: choose one of {', '.join(SHAPES)}")
        arch, base = SHAPES[shape]
        config = {**architectures.get(arch).example_config(), **base}
    else:
        config = architectures.get(arch).example_config()
    spec = architectures.get(arch)
    config.update(config_overrides or {})
    if layers is not None:
        if layers < 1:
            raise InputError("--layers must be at least 1")
        config["num_hidden_layers"] = layers + int(config.get("first_k_dense_replace") or 0)
        if "hybrid_override_pattern" in config:
            config["hybrid_override_pattern"] = (config["hybrid_override_pattern"] * layers)[: config["num_hidden_layers"]]
    final_path = destination_path(out)  # absolute (``.`` works); a symlink is refused
    if final_path.exists() and not final_path.is_dir():
        raise OutputExistsError(f"{final_path}: exists and is not a folder; pass another OUT")
    if final_path.exists() and any(final_path.iterdir()) and not overwrite:
        raise OutputExistsError(f"{final_path}: exists and is not empty; pass overwrite=True to replace it")
    # Written into a partial folder next to OUT and renamed at the end, as convert does: an interrupted run
    # leaves no half-written OUT (a rerun removes the partial folder).
    out_path = final_path.with_name(f".{final_path.name}.nvfp4ckpt-example-partial")
    refuse_link(out_path, "partial folder")  # a planted symlink is refused, never written through
    if out_path.exists():
        shutil.rmtree(out_path)
    final_path.parent.mkdir(parents=True, exist_ok=True)
    make_folder(out_path, "partial folder")
    try:
        num_tensors = _write_example_files(
            out_path, config, spec, format, seed, shape, shards, max_shard_size, progress, untied_gate_up
        )
    except BaseException:
        shutil.rmtree(out_path, ignore_errors=True)
        raise
    install(out_path, final_path)
    return ExampleResult(final_path, spec.name, format, sorted(p.name for p in final_path.iterdir()), num_tensors)


def _write_example_files(
    out_path: Path, config: dict, spec, format: str, seed: int, shape, shards: int, max_shard_size: str | None,
    progress: TickFn | None = None, untied_gate_up: bool = False,
) -> int:
    """Every file of the example into ``out_path``; the number of tensors written."""
    builder = _Builder(format, seed, random_weights=shape is not None, untied_gate_up=untied_gate_up)
    text_config = config["text_config"] if isinstance(config.get("text_config"), dict) else config
    _model_tensors(spec, text_config, builder)

    names = spec.names
    # routers (and Qwen's shared-expert gate) stay bf16, as the producers leave them
    unquantized = [f"{names.block}.{names.router}"] + ([f"{names.block}.{names.shared_expert_gate}"] if names.shared_expert_gate else [])
    qcfg, extra_files = FORMATS[format].example_quantization(names.lm_head, names.embed, unquantized)
    config["quantization_config"] = qcfg
    for name, data in extra_files.items():
        (out_path / name).write_text(json.dumps(data, indent=2) + "\n")
    (out_path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_path / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": 2, "do_sample": False}, indent=2) + "\n"
    )
    _write_tokenizer(out_path)
    if shape is not None:
        shard_bytes = parse_size(max_shard_size or "5GB")
        _write_shards(out_path, builder, by_bytes=shard_bytes, progress=progress)
    else:
        _write_shards(out_path, builder, count=shards, progress=progress)
    return len(builder.specs)


# ----------------------------------------------------------------------------------------------


def _write_shards(
    out: Path, b: _Builder, *, count: int | None = None, by_bytes: int | None = None, progress: TickFn | None = None
) -> list[str]:
    """Write the builder's tensors in registration order, one at a time: into ``count`` files of
    about equal size (so a layer's experts straddle files), or into shards of at most ``by_bytes``."""
    planned = [PlannedTensor(n, dtype_name(d), tuple(shape)) for n, (d, shape, _) in b.specs.items()]
    total = sum(p.nbytes for p in planned)
    if by_bytes is not None:
        plans = plan_shards(planned, by_bytes)
    else:
        n = max(1, min(count or 1, len(planned)))
        groups: list[list[PlannedTensor]] = [[] for _ in range(n)]
        start = 0
        for p in planned:
            groups[min(n - 1, start * n // max(total, 1))].append(p)
            start += p.nbytes
        plans = [ShardPlan("", g) for g in groups if g]
        for i, plan in enumerate(plans):
            plan.filename = "model.safetensors" if len(plans) == 1 else f"model-{i + 1:05d}-of-{len(plans):05d}.safetensors"
    done = 0
    for plan in plans:
        writer = ShardWriter(out / plan.filename, plan, {"format": "pt"})
        for t in plan.tensors:
            writer.write(t.name, b.specs[t.name][2]())
            done += t.nbytes
            if progress is not None:
                progress("written", done, total)
        writer.close()
    if len(plans) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": {t.name: p.filename for p in plans for t in p.tensors}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return [p.filename for p in plans]


def _write_tokenizer(out: Path) -> None:
    from ._lazy import require

    require("tokenizers")  # one-line error naming the extra on the core install
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
    """Registers every tensor lazily (name, dtype, shape, thunk) so a checkpoint of any size is
    written one tensor (or one gate/up group) at a time. Each tensor draws from its own generator
    seeded by (seed, name), so the bytes do not depend on the order tensors are produced in.

    ``random_weights``: the realistic-shape mode; weights are random E2M1 codes and block scales
    drawn from a sane e4m3 range (valid NVFP4, not a trained model), skipping the quantizer.
    """

    def __init__(self, fmt: str, seed: int, random_weights: bool = False, untied_gate_up: bool = False) -> None:
        self.fmt = fmt
        self.untied_gate_up = untied_gate_up
        self.qf = FORMATS[fmt]  # the format's tensor names, scalar convention and producer habits
        self.seed = seed
        self.random_weights = random_weights
        self.specs: dict[str, tuple[torch.dtype, tuple[int, ...], Callable[[], torch.Tensor]]] = {}
        self._group_cache: dict[str, torch.Tensor] = {}

    def gen(self, name: str) -> torch.Generator:
        return torch.Generator().manual_seed((self.seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))

    def scalar(self, name: str, low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand((), generator=self.gen("scalar:" + name)))

    def dense(self, name: str, shape: tuple[int, ...], *, std: float, mean: float = 0.0, dtype=None) -> None:
        dtype = dtype or torch.bfloat16

        def make() -> torch.Tensor:
            return (torch.randn(shape, generator=self.gen(name)) * std + mean).to(dtype)

        self.specs[name] = (dtype, shape, make)

    def norm(self, name: str, size: int) -> None:
        self.dense(f"{name}.weight", (size,), std=0.02, mean=1.0)

    def linear(self, module: str, out_f: int, in_f: int, *, input_amax: float) -> None:
        self.linear_group([module], [(out_f, in_f)], input_amax=input_amax, shared_global=False)

    def linear_group(
        self, modules: list[str], shapes: list[tuple[int, int]], *, input_amax: float, shared_global: bool = True
    ) -> None:
        """Linears computed together; with ``shared_global`` they share one weight_scale_2 (ModelOpt gate/up)."""
        names = [self._names(m) for m in modules]

        def compute() -> None:
            self._group_cache.clear()
            quantized = self._quantize_group(modules, shapes, input_amax, shared_global)
            for module_names, q in zip(names, quantized):
                self._group_cache.update(zip(module_names, q))

        for module_names, (o, i) in zip(names, shapes):
            dtypes_shapes = [
                (torch.uint8, (o, i // 2)),
                (torch.float8_e4m3fn, (o, i // 16)),
                (torch.float32, self.qf.example_scalar_shape),
                (torch.float32, self.qf.example_scalar_shape),
            ]
            for name, (dtype, shape) in zip(module_names, dtypes_shapes):
                self.specs[name] = (dtype, shape, self._from_group(name, compute))

    def fused_experts(self, prefix: str, num_experts: int, inter: int, hidden: int, a13: float, a2: float) -> None:
        """ModelOpt's fused ("BMM") experts: ``gate_up_proj`` U8 ``[E, H/2, 2I]`` (gate then up along the last
        dim), ``down_proj`` U8 ``[E, I/2, H]``, scales in the same input-major layout, one global scale per tensor."""
        shapes = {
            "gate_up_proj": ((inter * 2, hidden), a13),
            "down_proj": ((hidden, inter), a2),
        }
        entries = []
        for proj, ((rows, cols), amax) in shapes.items():
            p = f"{prefix}.{proj}"
            entries += [
                (p, torch.uint8, (num_experts, cols // 2, rows)),
                (f"{p}_weight_scale", torch.float8_e4m3fn, (num_experts, cols // 16, rows)),
                (f"{p}_weight_scale_2", torch.float32, ()),
                (f"{p}_input_scale", torch.float32, ()),
            ]

        def compute() -> None:
            self._group_cache.clear()
            for proj, ((rows, cols), amax) in shapes.items():
                p = f"{prefix}.{proj}"
                weights = torch.randn(num_experts, rows, cols, generator=self.gen(p)) / math.sqrt(cols)
                ws2 = torch.tensor(float(weights.abs().max()) / (6.0 * 448.0))  # one global scale for all experts
                q = [_requantize(w, ws2, amax) for w in weights]
                self._group_cache[p] = torch.stack([x.weight for x in q]).transpose(1, 2).contiguous()
                scale = torch.stack([x.weight_scale.view(torch.uint8) for x in q]).transpose(1, 2).contiguous()
                self._group_cache[f"{p}_weight_scale"] = scale.view(torch.float8_e4m3fn)
                self._group_cache[f"{p}_weight_scale_2"] = ws2.float().reshape(())
                self._group_cache[f"{p}_input_scale"] = torch.tensor(amax / (6.0 * 448.0), dtype=torch.float32)

        for name, dtype, shape in entries:
            self.specs[name] = (dtype, shape, self._from_group(name, compute))

    def _from_group(self, name: str, compute: Callable[[], None]) -> Callable[[], torch.Tensor]:
        def make() -> torch.Tensor:
            if name not in self._group_cache:
                compute()
            return self._group_cache.pop(name)

        return make

    def _names(self, module: str) -> list[str]:
        return [f"{module}.{suffix}" for suffix in self.qf.role_suffixes().values()]

    def _quantize_group(self, modules, shapes, input_amax: float, shared_global: bool) -> list[list[torch.Tensor]]:
        input_scale = torch.tensor(input_amax / (6.0 * 448.0), dtype=torch.float32)
        out = []
        if self.random_weights:
            shared = torch.tensor(self.scalar(modules[0], 1e-4, 4e-4), dtype=torch.float32)
            for module, (o, i) in zip(modules, shapes):
                g = self.gen(module)
                packed = torch.randint(0, 256, (o, i // 2), dtype=torch.uint8, generator=g)
                # e4m3 bytes 0x28..0x5F: 2^-2 .. 2^4 (positive, normal, finite)
                scale = torch.randint(0x28, 0x60, (o, i // 16), dtype=torch.uint8, generator=g).view(torch.float8_e4m3fn)
                ws2 = shared if shared_global else torch.tensor(self.scalar(module, 1e-4, 4e-4), dtype=torch.float32)
                out.append(self._emit(packed, scale, ws2, input_scale))
            return out
        weights = [torch.randn(o, i, generator=self.gen(m)) / math.sqrt(i) for m, (o, i) in zip(modules, shapes)]
        ws2_shared = max(float(w.abs().max()) for w in weights) / (6.0 * 448.0)
        for w in weights:
            q = _requantize(w, torch.tensor(ws2_shared), input_amax) if shared_global else quantize_linear(w, input_amax)
            out.append(self._emit(q.weight, q.weight_scale, q.weight_scale_2, input_scale))
        return out

    def _emit(self, weight, weight_scale, ws2, input_scale) -> list[torch.Tensor]:
        stored = self.qf.from_dequant_multiplier
        shape = self.qf.example_scalar_shape
        return [weight, weight_scale, stored(ws2.float()).reshape(shape), stored(input_scale.float()).reshape(shape)]


def _requantize(w: torch.Tensor, ws2: torch.Tensor, input_amax: float):
    from .quant import E4M3_MAX, GROUP_SIZE, QuantizedLinear, encode_e2m1

    n, k = w.shape
    blocks = w.float().reshape(n, k // GROUP_SIZE, GROUP_SIZE)
    scale = (blocks.abs().amax(-1) / 6.0 / ws2).clamp(max=E4M3_MAX).to(torch.float8_e4m3fn)
    denom = (scale.float() * ws2).unsqueeze(-1)
    scaled = torch.where(denom > 0, blocks / denom.clamp(min=1e-30), torch.zeros_like(blocks))
    return QuantizedLinear(encode_e2m1(scaled.reshape(n, k)), scale, ws2.float().reshape(()), torch.tensor(input_amax / (6.0 * 448.0)))


def _model_tensors(spec: architectures.Architecture, cfg: dict, b: _Builder) -> None:
    """Every tensor of the family's model, named as its checkpoints name them (``spec.names``); each decoder
    layer as ``spec.layer_kinds`` says (MoE, dense MLP, or a hybrid model's Mamba/attention/MLP mixer)."""
    names = spec.names
    h, v = cfg["hidden_size"], cfg["vocab_size"]
    b.dense(f"{names.embed}.weight", (v, h), std=0.02)
    hybrid = names.attention == names.block  # Nemotron-H: one norm and one "mixer" per layer
    bias_suffix = spec.routing(cfg).bias_suffix  # the router's correction bias, if the family has one
    for layer, kind in enumerate(spec.layer_kinds(cfg)):
        p = f"{names.layers}.{layer}"
        amax = lambda what: b.scalar(f"{p}.{what}", 2.0, 8.0)  # noqa: E731
        if hybrid:
            b.norm(f"{p}.norm", h)
        else:
            b.norm(f"{p}.input_layernorm", h)
            b.norm(f"{p}.post_attention_layernorm", h)
            _attention(b, names.attention_kind, cfg, f"{p}.{names.attention}", amax("attn"), names.qkv_bias)
        block = f"{p}.{names.block}"
        if kind == "mamba":
            _mamba_mixer(b, cfg, block)
            continue
        if kind == "attention":
            _attention(b, "gqa", cfg, block, amax("attn"))
            continue
        if kind in ("dense", "mlp"):
            inter = cfg.get("intermediate_size_mlp") or cfg["intermediate_size"]
            _dense_mlp(b, block, h, inter, amax("mlp"), gated=spec.gated)
            continue
        num_experts = cfg.get("num_experts") or cfg.get("n_routed_experts") or cfg["num_local_experts"]
        inter = cfg.get("moe_intermediate_size") or cfg["intermediate_size"]
        gate_name, up_name, down_name = names.projections
        b.dense(f"{block}.{names.router}.weight", (num_experts, h), std=1.0 / math.sqrt(h))
        if bias_suffix:
            b.dense(f"{block}.{bias_suffix}", (num_experts,), std=0.1, dtype=torch.float32)
        a13, a2_base = amax("experts_in"), amax("experts_inter")
        if spec.fused_prefix_pattern and b.qf.fused_suffixes:
            b.fused_experts(f"{block}.experts", num_experts, inter, h, a13, a2_base)  # as ModelOpt exports Llama-4
            num_experts = 0
        for e in range(num_experts):
            ex = f"{block}.experts.{e}"
            if not spec.gated:
                b.linear(f"{ex}.{up_name}", inter, h, input_amax=a13)
            elif not b.untied_gate_up:
                # gate and up share one global scale (ModelOpt's weight_scale_2; llm-compressor fuses the gate/up
                # observers, so compressed-tensors' weight_global_scale too); one input_scale per layer
                b.linear_group([f"{ex}.{gate_name}", f"{ex}.{up_name}"], [(inter, h), (inter, h)], input_amax=a13)
            else:
                # untied_gate_up: a global scale per module
                b.linear(f"{ex}.{gate_name}", inter, h, input_amax=a13)
                b.linear(f"{ex}.{up_name}", inter, h, input_amax=a13)
            # compressed-tensors: down input scales differ per expert
            down_amax = a2_base if b.qf.example_shared_scales else a2_base * b.scalar(f"{ex}.down", 0.5, 1.5)
            b.linear(f"{ex}.{down_name}", h, inter, input_amax=down_amax)
        if names.shared_expert:
            shared = (
                cfg.get("shared_expert_intermediate_size")
                or cfg.get("moe_shared_expert_intermediate_size")
                or inter * int(cfg.get("n_shared_experts") or 1)
            )
            _dense_mlp(b, f"{block}.{names.shared_expert}", h, shared, amax("shared"), gated=spec.gated)
        if names.shared_expert_gate:
            b.dense(f"{block}.{names.shared_expert_gate}.weight", (1, h), std=1.0 / math.sqrt(h))
    b.norm(names.final_norm, h)
    b.dense(f"{names.lm_head}.weight", (v, h), std=0.02)


def _mamba_mixer(b: _Builder, cfg: dict, p: str) -> None:
    """A Mamba-2 mixer's tensors (bf16/fp32, not quantized; shapes follow transformers' NemotronH)."""
    h = cfg["hidden_size"]
    heads, head_dim, state, groups = cfg["mamba_num_heads"], cfg["mamba_head_dim"], cfg["ssm_state_size"], cfg["n_groups"]
    inner = heads * head_dim
    conv_dim = inner + 2 * groups * state
    b.dense(f"{p}.in_proj.weight", (inner + conv_dim + heads, h), std=1.0 / math.sqrt(h))
    b.dense(f"{p}.conv1d.weight", (conv_dim, 1, cfg["conv_kernel"]), std=0.1)
    b.dense(f"{p}.conv1d.bias", (conv_dim,), std=0.1)
    b.dense(f"{p}.dt_bias", (heads,), std=0.1)
    b.dense(f"{p}.A_log", (heads,), std=0.1, dtype=torch.float32)
    b.dense(f"{p}.D", (heads,), std=0.1, mean=1.0, dtype=torch.float32)
    b.norm(f"{p}.norm", inner)
    b.dense(f"{p}.out_proj.weight", (h, inner), std=1.0 / math.sqrt(inner))


def _dense_mlp(b: _Builder, p: str, h: int, inter: int, amax: float, gated: bool = True) -> None:
    if not gated:  # relu2 MLP: up and down only
        b.linear(f"{p}.up_proj", inter, h, input_amax=amax)
    elif not b.untied_gate_up:
        b.linear_group([f"{p}.gate_proj", f"{p}.up_proj"], [(inter, h), (inter, h)], input_amax=amax)
    else:
        b.linear(f"{p}.gate_proj", inter, h, input_amax=amax)
        b.linear(f"{p}.up_proj", inter, h, input_amax=amax)
    b.linear(f"{p}.down_proj", h, inter, input_amax=amax * 0.5)


def _attention(b: _Builder, kind: str, cfg: dict, p: str, amax: float, qkv_bias: bool = False) -> None:
    h, nh = cfg["hidden_size"], cfg["num_attention_heads"]
    if kind == "mla":
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
    hd, nkv = cfg.get("head_dim") or h // nh, cfg["num_key_value_heads"]
    b.linear(f"{p}.q_proj", nh * hd, h, input_amax=amax)
    b.linear(f"{p}.k_proj", nkv * hd, h, input_amax=amax)
    b.linear(f"{p}.v_proj", nkv * hd, h, input_amax=amax)
    b.linear(f"{p}.o_proj", h, nh * hd, input_amax=amax)
    if qkv_bias:
        for proj, size in (("q_proj", nh * hd), ("k_proj", nkv * hd), ("v_proj", nkv * hd)):
            b.dense(f"{p}.{proj}.bias", (size,), std=0.02)
    if kind == "gqa_full_qk_norm":  # MiniMax-M2: one norm over all heads
        b.norm(f"{p}.q_norm", nh * hd)
        b.norm(f"{p}.k_norm", nkv * hd)
    if kind == "gqa_qk_norm":
        b.norm(f"{p}.q_norm", hd)
        b.norm(f"{p}.k_norm", hd)

"""Whole-model runner: a transformers model whose MoE experts are nvfp4ckpt's fused NVFP4 MoE.

    from nvfp4ckpt.model_runner import load_converted_model, load_source_model, generate
    conv = load_converted_model("qwen3-trtllm", device="cuda")        # trtllm on Blackwell, triton elsewhere
    gens, seconds = generate(conv, ["Question: 1+1?\\nAnswer:"], max_new_tokens=32)

How the model is built (no transformers quantizer is involved):

1. ``config.json`` without its ``quantization_config`` becomes a transformers config; the model is instantiated on
   the meta device (``AutoModelForCausalLM.from_config(..., dtype=bfloat16)``), so nothing is allocated yet.
2. Each MoE block's experts module is replaced by :class:`FusedExperts` (transformers' own router picks the
   experts, ``routing="hf"``) or the whole block by :class:`FusedMoEBlock` (router logits go to nvfp4ckpt's
   routing / the TRT-LLM-gen kernel's own routing, ``routing="kernel"``; always used by the trtllm backend).
3. Every remaining parameter and persistent buffer is read from the safetensors files by name (Mixtral's on-disk
   ``block_sparse_moe`` is transformers 5's ``mlp``): NVFP4 linears (ModelOpt ``weight``/``weight_scale``/
   ``weight_scale_2``, compressed-tensors ``weight_packed``/``weight_scale``/``weight_global_scale``) are
   dequantized to bf16 once (W4A16 for the non-expert linears), everything else is used as stored.
   Rotary embeddings (non-persistent buffers) are recomputed from the config.

Converted side: the experts are the converted checkpoint's kernel-layout tensors (``runtime.MoELayer``) run with
the chosen backend. Source side: the experts are the un-converted checkpoint's tensors run through the float32
torch reference (``moe_torch.moe_forward_torch``). Both sides share everything else, byte for byte.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..io.json_input import Fields, load_json
from ..source import architectures
from ..source.checkpoint import SourceCheckpoint, open_checkpoint
from ..layouts.trtllm_gen.converted import ConvertedCheckpoint, open_converted
from ..progress import TickFn
from ..errors import InputError, UnsupportedArchitectureError
from ..source.formats import FORMATS
from ..io import CheckpointFiles
from ..quant import dequantize
from ..runtime.backends import resolve_backend, sync
from ..runtime.layer import MoELayer, load_moe_layer, source_moe_layer
from ..runtime.routing import needs_fp32_logits

ROUTING_MODES = ("auto", "hf", "kernel")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "tiktoken.model")




# ----------------------------------------------------------------------------------------------
# MoE modules


class FusedExperts(nn.Module):
    """Drop-in for transformers 5's fused experts module: ``forward(hidden, top_k_index, top_k_weights)``.

    The routing is the model's own (the MoE block's router); only the expert computation is nvfp4ckpt's.
    """

    def __init__(self, moe: MoELayer, backend: str, act: str) -> None:
        super().__init__()
        self.moe, self.backend, self.act = moe, backend, act

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        ids = top_k_index.to(torch.int32)
        weights = top_k_weights.to(torch.float32)
        if self.backend == "triton":
            out = self.moe.forward_triton(hidden_states, ids, weights, self.act)
        else:
            out = self.moe.forward_torch(hidden_states, ids, weights, self.act)
        return out.to(hidden_states.dtype)

    def extra_repr(self) -> str:
        return f"{self.moe.prefix}, experts={self.moe.num_experts}, backend={self.backend}, act={self.act}"


class FusedMoEBlock(nn.Module):
    """Replaces a whole MoE block: router logits from the block's gate weight, routing as the kernel does it
    (``runtime.MoELayer.__call__``), plus the block's shared experts (DeepSeek-V3)."""

    def __init__(self, block: nn.Module, moe: MoELayer, backend: str, act: str, fp32_logits: bool) -> None:
        super().__init__()
        self.gate = block.gate
        self.shared_experts = getattr(block, "shared_experts", None)
        self.moe, self.backend, self.act, self.fp32_logits = moe, backend, act, fp32_logits

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        weight = self.gate.weight
        if self.fp32_logits:
            logits = nn.functional.linear(x.float(), weight.float())
        else:
            logits = nn.functional.linear(x, weight.to(x.dtype))
        out = self.moe(x, logits, backend=self.backend, act=self.act).to(hidden_states.dtype).reshape(shape)
        if self.shared_experts is not None:
            out = out + self.shared_experts(hidden_states)
        return out

    def extra_repr(self) -> str:
        return f"{self.moe.prefix}, experts={self.moe.num_experts}, backend={self.backend}, act={self.act}"


# ----------------------------------------------------------------------------------------------
# Loaded model


@dataclass
class LoadedModel:
    """A ready-to-generate model and how it was built."""

    side: str  # "converted" | "source"
    path: Path
    model: nn.Module
    tokenizer: object
    device: torch.device
    backend: str  # MoE backend actually used: trtllm | triton | torch
    act: str
    routing: str  # hf | kernel
    architecture: str
    moe_layers: list[str]
    load_seconds: float
    info: dict = field(default_factory=dict)

    def close(self) -> None:
        """Drop the model's tensors (frees GPU memory before the other side is loaded)."""
        self.model = None  # type: ignore[assignment]
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {device}: no CUDA GPU here; use --device cpu")
    return dev


def resolve_routing(routing: str, backend: str) -> str:
    if routing not in ROUTING_MODES:
        raise InputError(f"routing {routing!r}: choose one of {', '.join(ROUTING_MODES)}")
    if backend == "trtllm":
        if routing == "hf":
            raise InputError("the trtllm backend routes inside the kernel; use routing 'kernel' (or 'auto') with it")
        return "kernel"
    return "hf" if routing == "auto" else routing


def load_converted_model(
    path: str | Path | ConvertedCheckpoint,
    *,
    device: str | torch.device | None = None,
    backend: str = "auto",
    act: str = "nvfp4",
    routing: str = "auto",
    tokenizer: str | Path | None = None,
) -> LoadedModel:
    """The whole model of a converted checkpoint, its MoE layers on the fused kernel layout."""
    start = time.perf_counter()
    ckpt = path if isinstance(path, ConvertedCheckpoint) else open_converted(path)
    dev = resolve_device(device)
    chosen = resolve_backend(backend, act, dev)
    mode = resolve_routing(routing, chosen)
    tok = load_tokenizer(ckpt.root, tokenizer)
    arch, model = build_skeleton(ckpt.config, ckpt.root / "config.json")
    layers = {}
    for info in ckpt.layers:
        layers[info.prefix] = load_moe_layer(ckpt, info.prefix, dev)
    install_moe(model, arch, layers, chosen, act, mode)
    load_weights(model, arch, ckpt.files, ckpt.source_format, dev)
    model.eval()
    return LoadedModel(
        "converted", ckpt.root, model, tok, dev, chosen, act, mode, arch.name, list(layers),
        time.perf_counter() - start, {"source_format": ckpt.source_format},
    )  # fmt: skip


def load_source_model(
    path: str | Path | SourceCheckpoint,
    *,
    device: str | torch.device | None = None,
    act: str = "nvfp4",
    routing: str = "hf",
    tokenizer: str | Path | None = None,
) -> LoadedModel:
    """The whole model of an un-converted NVFP4 checkpoint, its MoE layers run by the float32 torch reference."""
    start = time.perf_counter()
    src = path if isinstance(path, SourceCheckpoint) else open_checkpoint(path)
    dev = resolve_device(device)
    resolve_backend("torch", act, dev)
    mode = resolve_routing(routing, "torch")
    tok = load_tokenizer(src.root, tokenizer)
    arch, model = build_skeleton(src.config, src.root / "config.json")
    layers = {layer.prefix: source_moe_layer(src, layer, dev) for layer in src.layers}
    install_moe(model, arch, layers, "torch", act, mode)
    load_weights(model, arch, src.files, src.format.name, dev)
    model.eval()
    return LoadedModel(
        "source", src.root, model, tok, dev, "torch", act, mode, arch.name, list(layers),
        time.perf_counter() - start, {"source_format": src.format.name},
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Building


def load_tokenizer(root: Path, override: str | Path | None = None):
    """The tokenizer of the checkpoint folder, or of ``override`` (a folder or Hub id)."""
    from transformers import AutoTokenizer

    check_tokenizer(root, override)
    where = override if override is not None else root
    try:
        tok = AutoTokenizer.from_pretrained(str(where))
    except Exception as exc:  # transformers raises OSError/ValueError/... for unusable folders
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"{where}: could not load a tokenizer ({reason}); pass --tokenizer PATH with a working one") from exc
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise InputError(f"{where}: the tokenizer has neither a pad nor an eos token; batched generation needs one")
        tok.pad_token = tok.eos_token
    return tok


def check_tokenizer(root: Path, override: str | Path | None = None) -> None:
    """The one-line error for a checkpoint folder without tokenizer files (and no ``--tokenizer``)."""
    if override is None and not any((Path(root) / f).is_file() for f in TOKENIZER_FILES):
        raise InputError(
            f"{root}: no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}); pass --tokenizer PATH "
            "(the source model's folder or Hub id)"
        )


def check_runnable(config: dict, where: Path) -> architectures.Architecture:
    """The architecture of a config.json dict, or the one-line error for a model the runner cannot build (checked
    before anything is loaded; transformers' own model types are checked by ``build_skeleton``)."""
    arch = architectures.for_config(config, str(where))
    if arch.runner_unsupported:
        raise UnsupportedArchitectureError(
            f"{where}: verify --gsm8k cannot run {arch.name}: {arch.runner_unsupported}; its MoE layers are covered by "
            "verify's structure, layout and numerics checks"
        )
    if isinstance(config.get("text_config"), dict):
        raise UnsupportedArchitectureError(
            f"{where}: a multimodal wrapper ({config.get('model_type')!r} around a text model) is not supported by the "
            "model runner; run the text model's checkpoint"
        )
    return arch


def build_skeleton(config: dict, where: Path) -> tuple[architectures.Architecture, nn.Module]:
    """(architecture, model on the meta device) from a config.json dict, without its quantization_config."""
    arch = check_runnable(config, where)
    import transformers
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cfg = json.loads(json.dumps(config))
    cfg.pop("quantization_config", None)  # nvfp4ckpt dequantizes/fuses itself: no transformers quantizer
    model_type = cfg["model_type"] = arch.hf_model_type or cfg.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise UnsupportedArchitectureError(
            f"{where}: transformers {transformers.__version__} has no model type {model_type!r}; upgrade transformers"
        )
    hf_config = CONFIG_MAPPING[model_type].from_dict(cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.bfloat16)
    return arch, model


def _candidates(name: str, arch: architectures.Architecture, to_disk: bool) -> list[str]:
    """``name`` first, then its spelling on disk (``to_disk``) or in memory (renames match whole components)."""
    out = [name]
    for mem, disk in arch.hf_renames:
        a, b = (mem, disk) if to_disk else (disk, mem)
        dotted = f".{name}."
        if a in dotted:
            out.append(dotted.replace(a, b)[1:-1])
    return out


def _submodule(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def install_moe(
    model: nn.Module, arch: architectures.Architecture, layers: dict[str, MoELayer], backend: str, act: str, routing: str
) -> None:
    """Replace every MoE block's experts (``routing="hf"``) or the whole block (``"kernel"``)."""
    for prefix, moe in layers.items():
        block_disk = prefix.rsplit(".", 1)[0]
        path = next((p for p in _candidates(block_disk, arch, to_disk=False) if _submodule(model, p) is not None), None)
        block = _submodule(model, path) if path else None
        if block is None or not hasattr(block, "gate"):
            raise InputError(
                f"MoE layer {prefix}: the transformers model has no MoE block at {block_disk!r}; config.json and the "
                "checkpoint's layers disagree"
            )
        fused_style = isinstance(getattr(getattr(block, "experts", None), "gate_up_proj", None), nn.Parameter)
        if routing == "hf" and fused_style:
            block.experts = FusedExperts(moe, backend, act)
        else:  # the kernel's routing, or transformers < 5 (per-expert ModuleList): replace the whole block
            parent_path, _, leaf = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            setattr(parent, leaf, FusedMoEBlock(block, moe, backend, act, fp32_logits=needs_fp32_logits(moe.routing.get("method"))))


def _nvfp4_weight(files: CheckpointFiles, fmt_name: str, module: str) -> torch.Tensor | None:
    """Dequantized fp32 weight of an NVFP4 linear stored under ``module``, or None when it is not NVFP4 there."""
    fmt = FORMATS[fmt_name]
    packed = f"{module}.{fmt.weight_suffix}"
    scale = f"{module}.{fmt.weight_scale_suffix}"
    glob = f"{module}.{fmt.weight_global_suffix}"
    info = files.tensors.get(packed)
    if info is None or info.dtype != "U8":
        return None
    if scale not in files.tensors or glob not in files.tensors:
        raise InputError(f"{files.root}: {packed} is packed NVFP4 but {scale} or {glob} is missing")
    g = files.read(glob).float().reshape(-1)[0]
    ws2 = 1.0 / g if fmt.global_scales_reciprocal else g
    return dequantize(files.read(packed), files.read(scale).view(torch.float8_e4m3fn), ws2)


def load_weights(model: nn.Module, arch: architectures.Architecture, files: CheckpointFiles, fmt_name: str, device: torch.device) -> None:
    """Materialize every parameter and persistent buffer still on the meta device from the checkpoint; recompute
    rotary buffers."""
    non_persistent = {n for n, _ in model.named_non_persistent_buffers()} if hasattr(model, "named_non_persistent_buffers") else set()
    targets = [(n, t, True) for n, t in model.named_parameters(remove_duplicate=False) if t.is_meta]
    targets += [(n, t, False) for n, t in model.named_buffers(remove_duplicate=False) if t.is_meta and n not in non_persistent]
    missing: list[str] = []
    for name, meta, is_param in targets:
        value = _read_target(files, fmt_name, arch.name, name)
        if value is None:
            missing.append(name)
            continue
        if tuple(value.shape) != tuple(meta.shape):
            raise InputError(
                f"{files.root}: tensor for {name} has shape {list(value.shape)}, the model built from config.json expects "
                f"{list(meta.shape)}"
            )
        _assign(model, name, value.to(device=device, dtype=meta.dtype), is_param)
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    for name in list(missing):
        if name in tied:
            _assign(model, name, model.get_parameter(tied[name]), True)
            missing.remove(name)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise InputError(f"{files.root}: no tensor for {shown}; the checkpoint does not match config.json")
    _rebuild_meta_buffers(model, device)


def _read_target(files: CheckpointFiles, fmt_name: str, arch: str, name: str) -> torch.Tensor | None:
    for disk in _candidates(name, architectures.get(arch), to_disk=True):
        if name.endswith(".weight"):
            w = _nvfp4_weight(files, fmt_name, disk[: -len(".weight")])
            if w is not None:
                return w
        if disk in files.tensors:
            return files.read(disk)
    return None


def _assign(model: nn.Module, name: str, value: torch.Tensor, is_param: bool) -> None:
    module_path, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_path) if module_path else model
    if is_param:
        module._parameters[leaf] = value if isinstance(value, nn.Parameter) else nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[leaf] = value


def _rebuild_meta_buffers(model: nn.Module, device: torch.device) -> None:
    """Rotary embeddings keep computed (non-persistent) buffers: build those modules again from the config."""
    for path, module in list(model.named_modules()):
        if not any(b is not None and b.is_meta for b in module._buffers.values()):
            continue
        if "Rotary" not in type(module).__name__ or not hasattr(module, "config"):
            names = [f"{path}.{n}" for n, b in module._buffers.items() if b is not None and b.is_meta]
            raise InputError(f"cannot initialize buffer(s) {names}: not in the checkpoint and not a rotary embedding")
        fresh = type(module)(config=module.config).to(device)
        parent_path, _, leaf = path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, leaf, fresh)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise InputError(f"model tensors left uninitialized: {left[:5]}")


# ----------------------------------------------------------------------------------------------
# Generation


@dataclass
class Generation:
    """One completion: text cut before the first stop string, the generated token ids up to the stop."""

    text: str
    token_ids: list[int]
    finish: str  # "stop" (a stop string), "eos", or "length"
    eos_token: int | None = None  # the end-of-sequence id that ended it (finish "eos"); not in token_ids
    # With ``generate(..., top_logits=k)``: for every step in ``steps``, the k largest logits (float32, as greedy
    # decoding saw them, largest first) and their token ids; arrays [len(steps), k].
    top_ids: np.ndarray | None = field(default=None, repr=False, compare=False)
    top_logits: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def steps(self) -> list[int]:
        """Every token the model chose, the one that ended the completion included (an eos token too)."""
        return self.token_ids + ([self.eos_token] if self.eos_token is not None else [])


TimingFn = Callable[[float, float, int], None]  # (prefill seconds, seconds per decode step, steps measured)
CLOCK_STEPS = 4  # decode steps of the first batch timed for the run's estimate


class _StepClock:
    """A logits processor that only reads the clock (the scores pass through untouched, so the tokens are those of
    a run without it): called once after the prefill and once per decode step, it reports the first batch's
    prefill time and time per decode step after ``steps`` steps, a few seconds into a run that may take hours."""

    def __init__(self, device: torch.device, report: TimingFn, steps: int = CLOCK_STEPS) -> None:
        self.device, self.report, self.steps = device, report, steps
        self.start = 0.0
        self.times: list[float] = []
        self.done = False

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if not self.done:
            sync(self.device)
            self.times.append(time.perf_counter())
            if len(self.times) > self.steps:
                self.finish()
        return scores

    def finish(self) -> None:
        """Report what was measured (also called when the batch ended before ``steps`` decode steps)."""
        if self.done or not self.times:
            return
        self.done = True
        prefill = self.times[0] - self.start
        steps = len(self.times) - 1
        per_step = (self.times[-1] - self.times[0]) / steps if steps else prefill
        self.report(prefill, per_step, steps)


class _TopLogits:
    """A logits processor (run after transformers' own, if any) that changes nothing and keeps each step's ``k``
    largest logits, on the device until generation ends. Greedy decoding picks the first of them."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.values: list[torch.Tensor] = []
        self.ids: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        values, ids = scores.float().topk(min(self.k, scores.shape[-1]), dim=-1)
        self.values.append(values)
        self.ids.append(ids)
        return scores

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """([steps, batch, k] ids, [steps, batch, k] float32 logits)."""
        return torch.stack(self.ids).cpu().numpy(), torch.stack(self.values).cpu().numpy()


def generate(
    loaded: LoadedModel,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 512,
    batch_size: int = 8,
    stop_strings: Sequence[str] = (),
    eos_token_ids: Sequence[int] | None = None,
    progress: TickFn | None = None,
    stage: str = "generate",
    top_logits: int = 0,
    on_timing: TimingFn | None = None,
) -> tuple[list[Generation], float]:
    """Greedy, batched (left padding, KV cache) generation; returns completions in prompt order and seconds spent.

    Prompts are batched longest first (less padding, and the largest batch runs first); every sequence stops at
    its own eos or stop string. The batches (which prompts, how much padding) depend only on the prompts, the
    tokenizer and ``batch_size``, so two models run with the same ones see the same batches. ``top_logits=k``:
    keep the k largest logits of every step in each ``Generation`` (where two runs first differ, and by how much).
    ``on_timing``: called once, early in the first batch, with its prefill time and time per decode step
    (``_StepClock``), for an estimate of the whole run.
    """
    from transformers import GenerationConfig, LogitsProcessorList

    if max_new_tokens < 1 or batch_size < 1:
        raise InputError("--max-new-tokens and --batch-size must be at least 1")
    tok = loaded.tokenizer
    eos = list(eos_token_ids) if eos_token_ids is not None else eos_ids(loaded.path, tok)
    gen_config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        use_cache=True,
        eos_token_id=eos or None,
        pad_token_id=tok.pad_token_id,
        stop_strings=list(stop_strings) or None,
    )
    lengths = [len(tok(p).input_ids) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: (-lengths[i], i))
    results: list[Generation | None] = [None] * len(prompts)
    tick = progress or (lambda stage, done, total: None)
    tick(stage, 0, len(prompts))
    seconds = 0.0
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        enc = tok([prompts[i] for i in idx], return_tensors="pt", padding=True).to(loaded.device)
        recorder = _TopLogits(top_logits) if top_logits > 0 else None
        clock = _StepClock(loaded.device, on_timing) if on_timing is not None and start == 0 else None
        processors = [p for p in (recorder, clock) if p is not None]
        extra = {"logits_processor": LogitsProcessorList(processors)} if processors else {}
        sync(loaded.device)
        t0 = time.perf_counter()
        if clock is not None:
            clock.start = t0
        with torch.inference_mode():
            out = loaded.model.generate(**enc, generation_config=gen_config, tokenizer=tok, **extra)
        sync(loaded.device)
        if clock is not None:
            clock.finish()
        seconds += time.perf_counter() - t0
        new = out[:, enc["input_ids"].shape[1] :].tolist()
        top = recorder.arrays() if recorder is not None else None
        for row, (i, ids) in enumerate(zip(idx, new)):
            gen = _finish(tok, ids, set(eos), stop_strings)
            if top is not None:
                n = len(gen.steps)
                gen.top_ids, gen.top_logits = top[0][:n, row], top[1][:n, row]
            results[i] = gen
        tick(stage, min(start + batch_size, len(order)), len(prompts))
    return [r for r in results if r is not None], seconds


def eos_ids(root: Path, tok) -> list[int]:
    """End-of-sequence ids: generation_config.json's (int or list), else the tokenizer's."""
    ids: list[int] = []
    path = Path(root) / "generation_config.json"
    if path.is_file():
        gen = Fields(load_json(path, "generation config"), str(path))  # bounded, regular file, typed
        value = gen.raw("eos_token_id")
        if type(value) is int:
            ids = [value]
        elif isinstance(value, list):
            ids = gen.int_list("eos_token_id", lo=0)
    if tok.eos_token_id is not None and tok.eos_token_id not in ids:
        ids.append(tok.eos_token_id)
    return ids


def _finish(tok, ids: list[int], eos: set[int], stop_strings: Sequence[str]) -> Generation:
    finish, eos_token = "length", None
    for n, t in enumerate(ids):
        if t in eos:
            ids, finish, eos_token = ids[:n], "eos", t
            break
    text = tok.decode(ids, skip_special_tokens=False)
    hits = [text.find(s) for s in stop_strings if s and s in text]
    if hits:
        # The shortest prefix of tokens whose text holds a stop string: what an engine generated before stopping
        # (the rest are the pad tokens of a finished row in the batch).
        lo, hi = 1, len(ids)
        while lo < hi:
            mid = (lo + hi) // 2
            if any(s and s in tok.decode(ids[:mid], skip_special_tokens=False) for s in stop_strings):
                hi = mid
            else:
                lo = mid + 1
        return Generation(text[: min(hits)], ids[:lo], "stop")
    return Generation(text, ids, finish, eos_token)


__all__ = [
    "FusedExperts",
    "FusedMoEBlock",
    "Generation",
    "LoadedModel",
    "ROUTING_MODES",
    "build_skeleton",
    "check_runnable",
    "check_tokenizer",
    "generate",
    "load_converted_model",
    "load_source_model",
    "load_tokenizer",
]

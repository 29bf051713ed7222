"""Load format ``nvfp4_trtllm``: vLLM's default safetensors loader for everything but the converted MoE layers,
whose tensors are read by name, with no transform, into the plugin's parameters.

Why a loader: a model's ``load_weights`` maps per-expert checkpoint names (``experts.3.up_proj.weight``) and
silently drops names it cannot map (``RoutedExperts.load_weights``), and ``--tp``/``--ep`` output keeps each
rank's MoE tensors under ``ranks/rank-NNN/``, which vLLM's glob of the top-level folder never sees. vLLM rank
(ep_rank, tp_rank) reads part ``rank = ep_rank * T + tp_rank`` of the conversion's ``--tp T``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

# nvfp4ckpt imports (kept together: the restructure re-points them)
from ...errors import EngineRefusalError
from .moe import TrtllmModelOptMoE, _TrtllmMoE


class _Folder:
    """Tensor name -> safetensors file, for one folder of the converted checkpoint."""

    def __init__(self, folder: Path) -> None:
        self.where: dict[str, Path] = {}
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(f, "pt") as s:
                for k in s.keys():
                    self.where[k] = f

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        by_file: dict[Path, list[str]] = {}
        for n in names:
            if n in self.where:
                by_file.setdefault(self.where[n], []).append(n)
        for f, ns in by_file.items():
            with safe_open(f, "pt") as s:
                for n in ns:
                    out[n] = s.get_tensor(n)
        return out


def plugin_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """layer_name -> RoutedExperts layer for every MoE layer the plugin's methods own."""
    return {
        m.layer_name: m for m in model.modules() if isinstance(getattr(m, "quant_method", None), _TrtllmMoE)
    }


def load_converted_experts(model: torch.nn.Module, root: str | Path) -> list[str]:
    """Read every plugin layer's converted tensors from ``root`` (this rank's part) and put them in place."""
    root = Path(root)
    descriptor = json.loads((root / "config.json").read_text())["quantization_config"]["moe_kernel_layout"]
    parts = {int(r["rank"]): r["part"] for r in (descriptor.get("parallel") or {}).get("ranks", [])}
    layers = plugin_layers(model)
    folders: dict[str, _Folder] = {}

    def folder(part: str) -> _Folder:
        if part not in folders:
            folders[part] = _Folder(root / part if part else root)
        return folders[part]

    for name, layer in layers.items():
        method = layer.quant_method
        spec = method.spec
        part = layer._nvfp4_trtllm["part"]
        rel = parts[part.rank] if part is not None else ""
        names = [f"{spec.prefix}.{n}" for n in _file_names(method)]
        got = folder(rel).read(names)
        tensors = {k[len(spec.prefix) + 1 :]: v for k, v in got.items()}
        maxima = None
        if isinstance(method, TrtllmModelOptMoE):
            maxima = _input_maxima(spec.prefix, [folder(p) for p in (parts.values() if parts else [""])])
        method.load_converted_(layer, tensors, maxima)
    return sorted(layers)


def _file_names(method: _TrtllmMoE) -> list[str]:
    names = ["w13_weight", "w13_weight_scale", "w2_weight", "w2_weight_scale"]
    if isinstance(method, TrtllmModelOptMoE):
        return names + ["g1_alphas", "g2_alphas", "w13_weight_scale_2"]
    return names + ["w13_weight_global_scale", "w2_weight_global_scale", "w13_input_global_scale", "w2_input_global_scale"]


def _input_maxima(prefix: str, folders: list[_Folder]) -> tuple[torch.Tensor, torch.Tensor]:
    """a1, a2: maxima of the per-expert input scales over every expert (every rank part holds its experts' rows)."""
    a1 = a2 = None
    for f in folders:
        t = f.read([f"{prefix}.w13_input_scale", f"{prefix}.w2_input_scale"])
        if len(t) != 2:
            raise EngineRefusalError(f"{prefix}.w13_input_scale / w2_input_scale: missing from the converted files")
        m1, m2 = t[f"{prefix}.w13_input_scale"].max(), t[f"{prefix}.w2_input_scale"].max()
        a1 = m1 if a1 is None else torch.maximum(a1, m1)
        a2 = m2 if a2 is None else torch.maximum(a2, m2)
    assert a1 is not None and a2 is not None
    return a1.to(torch.float32), a2.to(torch.float32)


class Nvfp4TrtllmModelLoader(DefaultModelLoader):
    """``--load-format nvfp4_trtllm``."""

    def _prepare_weights(self, *args, **kwargs):
        fmt = self.load_config.load_format
        self.load_config.load_format = "safetensors"  # the default loader only knows its own format names
        try:
            return super()._prepare_weights(*args, **kwargs)
        finally:
            self.load_config.load_format = fmt

    def load_weights(self, model: torch.nn.Module, model_config) -> None:
        layers = plugin_layers(model)
        if not layers:
            raise EngineRefusalError(
                f"{model_config.model}: --load-format nvfp4_trtllm needs --quantization nvfp4_trtllm (no MoE layer uses it)"
            )
        prefixes = tuple(f"{layer.quant_method.spec.prefix}." for layer in layers.values())
        weights = ((n, t) for n, t in self.get_all_weights(model_config, model) if not n.startswith(prefixes))
        model.load_weights(weights)
        load_converted_experts(model, model_config.model)

"""The ``nvfp4_trtllm`` quantization config: vLLM's stock config for dense layers, the plugin's MoE methods.

A converted checkpoint's ``quantization_config`` is ``{"quant_method": "nvfp4_trtllm",
"source_quantization_config": {...}, "moe_kernel_layout": {<descriptor>}}``. Every layer except the MoE layers
the descriptor lists is delegated to the config vLLM itself builds from ``source_quantization_config``
(``ModelOptNvFp4Config`` or ``CompressedTensorsConfig``), so attention, shared experts and dense MLPs load and
run exactly as they do for the source checkpoint.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase
from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import CompressedTensorsConfig
from vllm.model_executor.layers.quantization.modelopt import ModelOptNvFp4Config

# nvfp4ckpt imports (kept together: the restructure re-points them)
from ...errors import EngineRefusalError
from . import QUANT_METHOD
from .moe import LayerSpec, TrtllmCompressedTensorsMoE, TrtllmModelOptMoE

LAYOUT_NAME = "trtllm_fp4_moe"
LAYOUT_VERSION = 1
# Families whose MoE vLLM 0.33.0 does not run with FLASHINFER_TRTLLM from an NVFP4 checkpoint (see
# docs/serving.md; tests/test_engine_vllm.py proves the served ones against vLLM's own processing).
UNSERVED_ARCHITECTURES: dict[str, str] = {}


def stock_modelopt_config(src: dict) -> dict:
    """The ModelOpt ``quantization_config`` handed to vLLM's stock config, read the same on vLLM 0.32 and 0.33.

    A flat config.json section lists exclusions under ``ignore`` (ModelOpt 0.47's export) or, in older exports and
    hand-written configs, ``exclude_modules``. vLLM 0.33 reads ``ignore`` and falls back to ``exclude_modules``;
    vLLM 0.32 reads ``ignore`` only, so a section with only ``exclude_modules`` would quantize the excluded layers
    there. Both lists go under ``ignore`` (order kept, duplicates dropped). The nested hf_quant_config.json form
    (``{"quantization": {...}}``) is read from ``exclude_modules`` by both and is passed as it is."""
    if "quantization" in src:
        return src
    merged: list = []
    for key in ("ignore", "exclude_modules"):
        value = src.get(key)
        if value is None:
            continue
        if not isinstance(value, list):
            raise EngineRefusalError(f"config.json source_quantization_config.{key}: a list of module names, not {type(value).__name__}")
        merged += [m for m in value if m not in merged]
    return {**src, "ignore": merged} if merged or "ignore" in src else src


class Nvfp4TrtllmConfig(QuantizationConfig):
    """``nvfp4_trtllm``: kernel-layout MoE tensors, stock everything else."""

    def __init__(self, source: QuantizationConfig, source_config: dict, descriptor: dict) -> None:
        self.source = source  # set before QuantizationConfig.__init__ touches packed_modules_mapping
        super().__init__()
        self.source_config = source_config
        self.descriptor = descriptor
        self.source_format = str(descriptor.get("source_format"))
        self.gated = descriptor.get("activation", "swiglu") != "relu2"
        self.layers = {prefix: LayerSpec.from_descriptor(prefix, info, descriptor) for prefix, info in descriptor["layers"].items()}

    # packed_modules_mapping is set by vLLM on the config it holds; the stock config needs it for exclusions
    @property  # type: ignore[override]
    def packed_modules_mapping(self) -> dict[str, list[str]]:
        return self.source.packed_modules_mapping

    @packed_modules_mapping.setter
    def packed_modules_mapping(self, value: dict[str, list[str]]) -> None:
        self.source.packed_modules_mapping = value

    def __getattr__(self, name: str) -> Any:
        # anything vLLM asks of a quant config that is not MoE-specific is the stock config's answer
        if name == "source":
            raise AttributeError(name)
        return getattr(self.source, name)

    def get_name(self) -> str:  # type: ignore[override]
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.half]

    @classmethod
    def get_min_capability(cls) -> int:
        return 100  # FlashInfer's TRT-LLM-gen fused MoE runs on SM100/SM103 only

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # config.json's quantization_config only

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "Nvfp4TrtllmConfig":
        src = config.get("source_quantization_config")
        desc = config.get("moe_kernel_layout")
        if not isinstance(src, dict) or not isinstance(desc, dict):
            raise EngineRefusalError(
                "config.json quantization_config: nvfp4_trtllm needs 'source_quantization_config' and "
                "'moe_kernel_layout' (write the checkpoint with nvfp4ckpt convert)"
            )
        if desc.get("layout") != LAYOUT_NAME or desc.get("layout_version") != LAYOUT_VERSION:
            raise EngineRefusalError(
                f"config.json moe_kernel_layout: layout {desc.get('layout')!r} version {desc.get('layout_version')!r}; "
                f"this plugin reads {LAYOUT_NAME!r} version {LAYOUT_VERSION} (upgrade nvfp4ckpt)"
            )
        arch = str(desc.get("architecture"))
        if arch in UNSERVED_ARCHITECTURES:
            raise EngineRefusalError(f"architecture {arch}: {UNSERVED_ARCHITECTURES[arch]}")
        method = str(src.get("quant_method", "")).lower()
        if method.startswith("modelopt"):
            source: QuantizationConfig = ModelOptNvFp4Config.from_config(stock_modelopt_config(src))
        elif method == "compressed-tensors":
            source = CompressedTensorsConfig.from_config(src)
        else:
            raise EngineRefusalError(
                f"config.json source_quantization_config: quant_method {method!r} is neither modelopt nor compressed-tensors"
            )
        return cls(source, src, desc)

    @classmethod
    def override_quantization_method(cls, hf_quant_cfg, user_quant, hf_config=None) -> str | None:
        # a converted checkpoint picks this method even without --quantization
        if isinstance(hf_quant_cfg, dict) and hf_quant_cfg.get("quant_method") == QUANT_METHOD:
            return QUANT_METHOD
        return None

    def apply_vllm_mapper(self, hf_to_vllm_mapper) -> None:
        self.source.apply_vllm_mapper(hf_to_vllm_mapper)
        mapped = hf_to_vllm_mapper.apply_list(list(self.layers))
        self.layers = {new: spec for new, spec in zip(mapped, self.layers.values())}

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        if isinstance(layer, RoutedExperts) and prefix in self.layers:
            spec = self.layers[prefix]
            if self.source_format == "compressed-tensors":
                return TrtllmCompressedTensorsMoE(layer.moe_config, prefix, spec)
            return TrtllmModelOptMoE(self.source, layer.moe_config, spec)
        return self.source.get_quant_method(layer, prefix)

"""compressed-tensors ``nvfp4-pack-quantized`` (llm-compressor). Global scales are stored as
quantization multipliers: ``weight_global_scale = 1 / weight_scale_2``."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from ...errors import NotNvfp4Error
from ...io.json_input import Fields
from .base import QuantFormat

PACK_FORMAT = "nvfp4-pack-quantized"


@dataclass
class CompressedTensorsFormat(QuantFormat):
    name: ClassVar[str] = "compressed-tensors"
    weight_suffix: ClassVar[str] = "weight_packed"
    weight_scale_suffix: ClassVar[str] = "weight_scale"
    weight_global_suffix: ClassVar[str] = "weight_global_scale"
    input_global_suffix: ClassVar[str] = "input_global_scale"
    global_scales_reciprocal: ClassVar[bool] = True
    example_scalar_shape: ClassVar[tuple[int, ...]] = (1,)
    example_shared_scales: ClassVar[bool] = False  # llm-compressor calibrates each expert's down input scale
    # SGLang's parameter names for the stored (quantization-multiplier) global scales, kept unchanged.
    raw_scalar_names: ClassVar[tuple[str, ...]] = (
        "w13_weight_global_scale", "w2_weight_global_scale", "w13_input_global_scale", "w2_input_global_scale",
    )  # fmt: skip

    @classmethod
    def detect(cls, root: Path, config: dict) -> "CompressedTensorsFormat | None":
        qcfg = config.get("quantization_config")
        if not isinstance(qcfg, dict) or qcfg.get("quant_method") != "compressed-tensors":
            return None
        path = root / "config.json"
        q = Fields(config, str(path)).obj("quantization_config")
        groups = list(q.objects("config_groups", {}))
        formats = {q.str("format", None)} | {g.str("format", None) for _, g in groups}
        formats.discard(None)
        if PACK_FORMAT not in formats:
            raise NotNvfp4Error(
                f"{path}: compressed-tensors format {sorted(formats) or 'unset'} is not {PACK_FORMAT!r}; "
                "only NVFP4 (nvfp4-pack-quantized) checkpoints can be converted"
            )
        sizes = set()
        for _, g in groups:
            if not g.has("weights"):
                continue
            w = g.obj("weights")
            bits, kind = w.int("num_bits", None), w.str("type", None)
            if bits not in (None, 4) or kind not in (None, "float"):
                raise NotNvfp4Error(f"{path}: weights are {bits}-bit {kind}, not NVFP4 (4-bit float)")
            if w.has("group_size"):
                sizes.add(w.int("group_size", lo=1))
        if len(sizes) > 1:
            raise NotNvfp4Error(f"{path}: several group sizes {sorted(sizes)}; NVFP4 needs 16 everywhere")
        fmt = cls(config_path=path, group_size=sizes.pop() if sizes else 16, exclude=q.str_list("ignore", []))
        fmt.check_group_size()
        return fmt

    @classmethod
    def example_quantization(cls, lm_head: str, embed: str, unquantized: list[str]) -> tuple[dict, dict[str, dict]]:
        scheme = {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16, "symmetric": True, "dynamic": False}
        qcfg = {
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
            "ignore": [lm_head] + [f"re:.*{re.escape(m)}$" for m in unquantized],
        }
        return qcfg, {}

"""NVIDIA ModelOpt NVFP4 (``quant_algo: NVFP4``): nested hf_quant_config.json or flat quantization_config."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from ...errors import NotNvfp4Error
from ...io import read_json
from ...io.json_input import Fields
from .base import QuantFormat


@dataclass
class ModelOptFormat(QuantFormat):
    name: ClassVar[str] = "modelopt"
    weight_suffix: ClassVar[str] = "weight"
    weight_scale_suffix: ClassVar[str] = "weight_scale"
    weight_global_suffix: ClassVar[str] = "weight_scale_2"
    input_global_suffix: ClassVar[str] = "input_scale"
    global_scales_reciprocal: ClassVar[bool] = False
    example_scalar_shape: ClassVar[tuple[int, ...]] = ()
    example_shared_scales: ClassVar[bool] = True  # one input_scale per layer (down included)
    # ModelOpt's fused ("BMM") expert tensors (Llama-4): <prefix>.<proj><suffix>; the suffix names the kind.
    fused_projections: ClassVar[dict[str, str]] = {"gate_up_proj": "gate_up", "down_proj": "down"}
    fused_suffixes: ClassVar[dict[str, str]] = {
        "": "weight", "_weight_scale": "weight_scale", "_weight_scale_2": "weight_global", "_input_scale": "input_global",
    }  # fmt: skip

    exclude_field: ClassVar[str] = "exclude_modules"

    @classmethod
    def detect(cls, root: Path, config: dict) -> "ModelOptFormat | None":
        qcfg = config.get("quantization_config")
        path = root / "config.json"
        section: Fields | None = None
        if isinstance(qcfg, dict) and ("quant_algo" in qcfg or qcfg.get("quant_method") == "modelopt"):
            section = Fields(config, str(path)).obj("quantization_config")
        else:
            hf_path = root / "hf_quant_config.json"
            if os.path.lexists(hf_path):
                hf = Fields(read_json(hf_path), str(hf_path))  # a FIFO or a 1 GiB file is refused, never read
                section = hf.obj("quantization") if hf.has("quantization") else hf
                path = hf_path
        if section is None:
            return None
        algo = section.raw("quant_algo")
        if algo != "NVFP4":
            raise NotNvfp4Error(
                f"{path}: ModelOpt quant_algo is {_shown(algo)}, not 'NVFP4'; only NVFP4 checkpoints can be converted"
            )
        fmt = cls(config_path=path, group_size=_group_size(section, path), exclude=_exclusions(section))
        fmt.check_group_size()
        return fmt

    @classmethod
    def example_quantization(cls, lm_head: str, embed: str, unquantized: list[str]) -> tuple[dict, dict[str, dict]]:
        """What ModelOpt 0.47's HF export writes: hf_quant_config.json keeps the nested section with
        ``exclude_modules``; config.json gets ``convert_hf_quant_config_format`` of it (``config_groups``, the
        exclusions under ``ignore``, no ``exclude_modules``: vLLM 0.32 reads only ``ignore``)."""
        exclude = [lm_head, embed] + [f"*.{m}" for m in unquantized]
        producer = {"name": "nvfp4ckpt-example", "version": "0"}
        section = {"quant_algo": "NVFP4", "kv_cache_quant_algo": None, "group_size": 16, "exclude_modules": exclude}
        hf_quant_config = {"producer": producer, "quantization": section}
        scheme = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16}
        flat = {
            "config_groups": {"group_0": {"input_activations": dict(scheme), "weights": dict(scheme), "targets": ["Linear"]}},
            "ignore": list(exclude),
            "quant_algo": "NVFP4",
            "producer": producer,
            "quant_method": "modelopt",
        }
        return flat, {"hf_quant_config.json": hf_quant_config}

    def flat_quantization_config(self) -> dict:
        """ModelOpt with only hf_quant_config.json: the flat form engines read from config.json."""
        section = {"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": self.group_size}
        if self.exclude:
            section["ignore"] = list(self.exclude)
        return section


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _group_size(section: Fields, path: Path) -> int:
    sizes = set()
    if section.has("group_size"):
        sizes.add(section.int("group_size", lo=1))
    for _, group in section.objects("config_groups", {}):
        if group.has("weights"):
            weights = group.obj("weights")
            if weights.has("group_size"):
                sizes.add(weights.int("group_size", lo=1))
    if not sizes:
        return 16  # NVFP4 fixes it; older exports leave it out
    if len(sizes) > 1:
        raise NotNvfp4Error(f"{path}: several group sizes {sorted(sizes)}; NVFP4 needs 16 everywhere")
    return sizes.pop()


def _exclusions(section: Fields) -> list[str]:
    out: list[str] = []
    for key in ("exclude_modules", "ignore"):
        out.extend(section.str_list(key, []))
    return out

"""What every source format provides."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from ...errors import NotNvfp4Error
from ...io import Array, as_float32
from ...quant import GROUP_SIZE
from .patterns import compile_input_pattern

# A converted checkpoint's config.json["quantization_config"] is
#   {"quant_method": KERNEL_QUANT_METHOD, SOURCE_QUANT_KEY: <the source's own quantization_config>, DESCRIPTOR_KEY: ...}
# The quant_method is one no stock engine knows, so SGLang and vLLM refuse the files ("Unknown quantization
# method") unless the nvfp4ckpt plugin is installed; a stock ModelOpt loader would shuffle the weights twice.
DESCRIPTOR_KEY = "moe_kernel_layout"
KERNEL_QUANT_METHOD = "nvfp4_trtllm"
SOURCE_QUANT_KEY = "source_quantization_config"


@dataclass
class QuantFormat:
    """A source NVFP4 format.

    Tensor suffixes are per linear module (``<module>.<suffix>``). ``global_scales_reciprocal``
    says the stored global scales are quantization multipliers (compressed-tensors) rather than
    ModelOpt's dequantization multipliers.
    """

    name: ClassVar[str]
    weight_suffix: ClassVar[str]
    weight_scale_suffix: ClassVar[str]
    weight_global_suffix: ClassVar[str]
    input_global_suffix: ClassVar[str]
    global_scales_reciprocal: ClassVar[bool]
    # Canonical names of the stored global scales a converted checkpoint keeps unchanged next to the ModelOpt-
    # convention ones (w13 weight, w2 weight, w13 input, w2 input), for engines that read them; () keeps none.
    raw_scalar_names: ClassVar[tuple[str, ...]] = ()
    # Fused ("BMM") experts, all experts of a layer in one tensor per projection: projection -> role and
    # tensor-name suffix -> kind. Empty: the format never stores experts fused.
    fused_projections: ClassVar[dict[str, str]] = {}
    fused_suffixes: ClassVar[dict[str, str]] = {}
    # How the format's producer writes checkpoints (``write_example`` imitates it): the shape of a stored global
    # scale, and whether a layer has one input scale (else the down projections have one per expert; gate and up
    # share one weight global scale in both producers unless write_example(untied_gate_up=True)).
    example_scalar_shape: ClassVar[tuple[int, ...]] = ()
    example_shared_scales: ClassVar[bool] = False

    config_path: Path
    group_size: int
    exclude: list[str] = field(default_factory=list)

    @classmethod
    def detect(cls, root: Path, config: dict) -> "QuantFormat | None":  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def role_suffixes(cls) -> dict[str, str]:
        """Role -> tensor suffix (class-level; ``suffixes`` on an instance)."""
        return {
            "weight": cls.weight_suffix,
            "weight_scale": cls.weight_scale_suffix,
            "weight_global": cls.weight_global_suffix,
            "input_global": cls.input_global_suffix,
        }

    @property
    def suffixes(self) -> dict[str, str]:
        """Role -> tensor suffix."""
        return self.role_suffixes()

    @classmethod
    def stored_scalar_names(cls) -> tuple[str, ...]:
        """The canonical tensors that hold the global scales in this format's stored convention (what revert
        writes back): the raw ones where kept, else the ModelOpt-convention ones."""
        return cls.raw_scalar_names or ("w13_weight_scale_2", "w2_weight_scale_2", "w13_input_scale", "w2_input_scale")

    def flat_quantization_config(self) -> dict:
        """The flat ``config.json["quantization_config"]`` engines read, for a checkpoint whose config.json has
        none (its quantization config lives elsewhere)."""
        raise NotImplementedError(f"{self.name} checkpoints always carry quantization_config in config.json")

    @classmethod
    def to_dequant_multiplier(cls, value: Array) -> Array:
        """Stored global scale -> ModelOpt convention (dequant multiplier), float32 (torch or numpy, as given)."""
        v = as_float32(value)
        return 1.0 / v if cls.global_scales_reciprocal else v

    # ModelOpt convention -> this format's stored convention: the same map (1/x is its own inverse).
    from_dequant_multiplier = to_dequant_multiplier

    @classmethod
    def example_quantization(cls, lm_head: str, embed: str, unquantized: list[str]) -> tuple[dict, dict[str, dict]]:
        """(config.json's quantization_config, other JSON files by name) as this format's producer writes them,
        for ``write_example``; ``unquantized`` are module names (relative to a layer) left in bf16."""
        raise NotImplementedError

    exclude_field: ClassVar[str] = "ignore"  # the config field the exclusions come from (named in errors)

    def __post_init__(self) -> None:
        # ``re:`` entries come from the input: compiled once here, refused when invalid or backtracking-prone.
        self._regexes = {
            p: compile_input_pattern(p[3:], str(self.config_path), self.exclude_field).regex for p in self.exclude if p.startswith("re:")
        }

    def is_excluded(self, module: str) -> bool:
        """True when the module is listed as not quantized (globs, plain names or ``re:`` regexes)."""
        parts = module.split(".")
        for pattern in self.exclude:
            if pattern.startswith("re:"):
                if self._regexes[pattern].match(module):
                    return True
                continue
            if fnmatch.fnmatchcase(module, pattern) or module == pattern or module.startswith(pattern + "."):
                return True
            if any(fnmatch.fnmatchcase(p, pattern) for p in parts):
                return True
        return False

    def check_group_size(self) -> None:
        if self.group_size != GROUP_SIZE:
            raise NotNvfp4Error(
                f"{self.config_path}: group size {self.group_size} is not NVFP4's 16; only NVFP4 (E2M1, 16-element "
                "e4m3 block scales) checkpoints can be converted"
            )

    def describe(self) -> dict:
        return {"name": self.name, "group_size": self.group_size, "exclude": list(self.exclude)}

"""Source quantization formats: how a checkpoint says it is NVFP4 and how it names its tensors.

Each format is a ``QuantFormat``; ``detect_format`` picks the one a checkpoint uses, or raises
``NotNvfp4Error`` / ``AlreadyConvertedError`` with a one-line reason.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path

from ...errors import AlreadyConvertedError, NotNvfp4Error
from .base import DESCRIPTOR_KEY, KERNEL_QUANT_METHOD, SOURCE_QUANT_KEY, QuantFormat
from .compressed_tensors import CompressedTensorsFormat
from .modelopt import ModelOptFormat

# The registry of source formats, in detection order: a new format is one module plus one line here.
FORMATS: dict[str, type[QuantFormat]] = {
    ModelOptFormat.name: ModelOptFormat,
    CompressedTensorsFormat.name: CompressedTensorsFormat,
}
# The CLI's --format choices, from the registry.
SourceFormat = Enum("SourceFormat", {name.upper().replace("-", "_"): name for name in FORMATS}, type=str)

__all__ = ["DESCRIPTOR_KEY", "KERNEL_QUANT_METHOD", "SOURCE_QUANT_KEY", "FORMATS", "QuantFormat", "SourceFormat", "detect_format", "CompressedTensorsFormat", "ModelOptFormat"]


def detect_format(root: Path, config: dict) -> QuantFormat:
    """Return the source format of the checkpoint in ``root`` (config.json already parsed)."""
    qcfg = config.get("quantization_config")
    if isinstance(qcfg, dict) and DESCRIPTOR_KEY in qcfg:
        raise AlreadyConvertedError(
            f"{root / 'config.json'}: this checkpoint is already in the TRT-LLM-gen kernel layout "
            f"(quantization_config.{DESCRIPTOR_KEY} is present); use it as is, or convert its source instead"
        )
    for fmt in FORMATS.values():
        found = fmt.detect(root, config)
        if found is not None:
            return found
    if isinstance(qcfg, dict):
        what = qcfg.get("quant_algo") or qcfg.get("format") or qcfg.get("quant_method") or "unknown"
        raise NotNvfp4Error(
            f"{root / 'config.json'}: quantization {what!r} is not NVFP4; nvfp4ckpt reads ModelOpt NVFP4 "
            "(quant_algo NVFP4) and compressed-tensors nvfp4-pack-quantized checkpoints"
        )
    raise NotNvfp4Error(
        f"{root}: no NVFP4 quantization config (config.json has no quantization_config and there is no "
        "hf_quant_config.json); quantize the model with ModelOpt or llm-compressor first"
    )

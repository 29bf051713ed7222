"""vLLM plugin: quantization method ``nvfp4_trtllm`` and load format ``nvfp4_trtllm``.

vLLM calls :func:`register` through the ``vllm.general_plugins`` entry point (in every process it starts).
``vllm serve DST --quantization nvfp4_trtllm --load-format nvfp4_trtllm --moe-backend flashinfer_trtllm``
then serves a checkpoint written by ``nvfp4ckpt convert``: dense layers through vLLM's stock ModelOpt /
compressed-tensors methods, MoE layers through vLLM's own FlashInfer TRT-LLM-gen experts with the converted
tensors put in place as they are (docs/serving.md).
"""

from __future__ import annotations

QUANT_METHOD = "nvfp4_trtllm"
LOAD_FORMAT = "nvfp4_trtllm"

_registered = False


def register() -> None:
    """Register the quantization config and the model loader with vLLM (idempotent)."""
    global _registered
    if _registered:
        return
    from vllm.model_executor.layers.quantization import register_quantization_config
    from vllm.model_executor.model_loader import register_model_loader

    from .config import Nvfp4TrtllmConfig
    from .loader import Nvfp4TrtllmModelLoader

    register_quantization_config(QUANT_METHOD)(Nvfp4TrtllmConfig)
    register_model_loader(LOAD_FORMAT)(Nvfp4TrtllmModelLoader)
    _registered = True

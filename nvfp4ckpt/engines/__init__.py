"""Serving-engine plugins: let SGLang and vLLM load nvfp4ckpt's kernel-layout checkpoints with no re-shuffle.

Each plugin registers the quantization method ``nvfp4_trtllm`` (the converted config's ``quant_method``) through the
engine's own entry point; nothing here is imported unless the engine loads it.
"""

"""Output layouts: how a converted checkpoint stores its MoE layers. Today one, ``trtllm_gen``."""

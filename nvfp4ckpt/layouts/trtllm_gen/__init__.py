"""FlashInfer's TRT-LLM-gen fused-MoE layout: the transform both ways, padding, rank slicing, the descriptor and
reading a converted checkpoint back."""

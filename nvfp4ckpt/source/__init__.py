"""Reading source checkpoints: ``formats/`` (one module per NVFP4 source format), ``architectures`` (the
registry of MoE families: one entry each) and ``checkpoint`` (opening a folder and finding its MoE layers)."""

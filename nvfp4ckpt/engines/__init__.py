"""Serving-engine plugins: load nvfp4ckpt's kernel-layout MoE tensors into an engine with no re-shuffle.

Each engine gets its own sub-module (``vllm``, ``sglang``); they import their engine lazily, so importing
``nvfp4ckpt.engines`` never pulls in an engine.
"""

"""Serving-engine plugins: let SGLang and vLLM load nvfp4ckpt's kernel-layout checkpoints with no re-shuffle.

Each plugin registers the quantization method ``nvfp4_trtllm`` (the converted config's ``quant_method``) through the
engine's own entry point (pyproject.toml); nothing here imports an engine. ``ENGINES`` lists the plugins with the
engine version they are tested against; a third-party plugin registers the same way the built-ins do.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Engine:
    name: str
    plugin: str  # "module:function" the engine's entry point calls
    entry_point_group: str
    tested_version: str
    docs: str


ENGINES: dict[str, Engine] = {}


def register(engine: Engine) -> Engine:
    ENGINES[engine.name] = engine
    return engine


register(Engine("sglang", "nvfp4ckpt.engines.sglang:register", "sglang.srt.plugins", "0.5.23", "docs/serving.md"))
register(Engine("vllm", "nvfp4ckpt.engines.vllm:register", "vllm.general_plugins", "0.33.0", "docs/serving.md"))

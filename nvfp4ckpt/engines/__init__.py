"""Serving-engine plugins (SGLang, vLLM) that load converted checkpoints without re-shuffling them.

Each plugin module registers itself here: ``ENGINES["sglang"] = <its loader entry>``. This package imports no
engine; importing a plugin module is what imports its engine.
"""

from __future__ import annotations

from typing import Any

ENGINES: dict[str, Any] = {}  # engine name -> the plugin's entry point (filled by the plugin modules)

"""Running converted MoE layers: the layer (``layer``), its backends, routing, and the float32 reference."""

from __future__ import annotations

from .layer import MoELayer, load_moe_layer

__all__ = ["MoELayer", "load_moe_layer"]

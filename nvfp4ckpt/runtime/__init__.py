"""Running converted MoE layers: the layer (``layer``), its backends, routing, and the float32 reference."""

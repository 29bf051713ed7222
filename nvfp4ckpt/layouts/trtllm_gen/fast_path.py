"""The CPU fast path of the TRT-LLM-gen transform (numpy only: torch is never imported)."""

from __future__ import annotations

import numpy as np

from ...io import out_buffer, scratch_buffer
from ...source.checkpoint import SourceCheckpoint, SourceMoELayer
from . import transform as layout
from .scalars import layer_scalars
from .shapes import HIDDEN_ALIGN, padded_dims


# The CPU fast path: the same bytes as ``read_layer_source`` + ``parallel.to_kernel`` (tests check it), but one
# expert at a time: its six tensors are read into a small scratch buffer (cache-warm, reused) and permuted from there
# straight into the output buffers (pooled by the writer): no stacked per-layer source copy, no intermediate
# row-permuted copy. The copies go through numpy: single-threaded and without the GIL, so layer threads run them in
# parallel, whereas a torch copy this small is split over OpenMP threads, which stalls badly when the cores are busy.


def has_fast_path(layer: SourceMoELayer, pad_hidden: int = HIDDEN_ALIGN) -> bool:
    """Gated per-expert layers that need no padding (the kernel layout is then a pure per-expert permutation)
    and have float32 global scales (as ModelOpt and llm-compressor write them; numpy has no bfloat16)."""
    return (
        padded_dims(layer, pad_hidden) == (layer.hidden_size, layer.intermediate_size)
        and layer.scalar_dtype == "F32"
        and bool(layer.experts)
        and all(set(names) == {"gate", "up", "down"} for names in layer.experts)
    )


def convert_layer_fast(ckpt: SourceCheckpoint, layer: SourceMoELayer) -> dict[str, np.ndarray]:
    e, h, i = layer.num_experts, layer.hidden_size, layer.intermediate_size
    files = ckpt.files
    w13 = out_buffer((e, 2 * i, h // 2))
    s13 = out_buffer((e, 2 * i, h // 16))
    w2 = out_buffer((e, h, i // 2))
    s2 = out_buffer((e, h, i // 16))
    raw = np.empty((e, 3, 2), dtype=np.float32)
    w_bytes, s_bytes = i * h // 2, i * h // 16  # per expert and projection (up, gate and down alike)
    with scratch_buffer(3 * (w_bytes + s_bytes)) as scratch:  # one expert's source tensors, reused
        cuts = np.cumsum([w_bytes] * 3 + [s_bytes] * 2)
        up, gate, down, up_s, gate_s, down_s = np.split(scratch, cuts)
        up, gate, down = up.reshape(i, h // 2), gate.reshape(i, h // 2), down.reshape(h, i // 2)
        up_s, gate_s, down_s = up_s.reshape(i, h // 16), gate_s.reshape(i, h // 16), down_s.reshape(h, i // 16)
        for x, names in enumerate(layer.experts):
            for name, dst in ((names["up"].weight, up), (names["gate"].weight, gate), (names["down"].weight, down),
                              (names["up"].weight_scale, up_s), (names["gate"].weight_scale, gate_s),
                              (names["down"].weight_scale, down_s)):  # fmt: skip
                files.read_into(name, dst)
            for half, (rows, scales) in enumerate(((up, up_s), (gate, gate_s))):
                layout.w13_rows_into(w13[x], half, rows)
                layout.w13_scales_into(s13[x], half, scales)
            layout.w2_rows_into(w2[x], down)
            layout.w2_scales_into(s2[x], down_s)
            for r, role in enumerate(("gate", "up", "down")):
                files.read_into(names[role].weight_global, raw[x, r, 0:1])  # a slice: a view, not a copy
                files.read_into(names[role].input_global, raw[x, r, 1:2])
    return {"w13_weight": w13, "w13_weight_scale": s13, "w2_weight": w2, "w2_weight_scale": s2, **layer_scalars(ckpt, layer, raw)}

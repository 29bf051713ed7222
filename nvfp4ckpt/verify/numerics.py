"""The ``numerics`` check: each MoE layer run with a backend against the float32 reference, held to that backend's
thresholds (``runtime.backends``)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from .._lazy import torch

from ..source.checkpoint import SourceCheckpoint
from ..layouts.trtllm_gen.converted import ConvertedCheckpoint
from ..layouts.trtllm_gen.descriptor import LayerInfo
from ..errors import InputError
from ..runtime.backends import BACKENDS, sync
from ..runtime.layer import MoELayer, load_moe_layer, source_moe_layer, stacked_source_weights



@dataclass
class LayerNumerics:
    prefix: str
    backend: str
    act: str
    tokens: int
    rel_l2: float
    cosine: float
    max_abs: float
    frac_close: float
    passed: bool
    seconds: float
    reference: str  # "source" | "converted"
    read_seconds: float = 0.0  # loading tensors from files (converted and reference) onto the device
    compute_seconds: float = 0.0  # the backend's MoE plus the float32 reference



def check_layer_numerics(
    ckpt: ConvertedCheckpoint,
    src: SourceCheckpoint | None,
    layer: LayerInfo,
    backend: str,
    act: str,
    tokens: int,
    seed: int,
    device: torch.device,
) -> LayerNumerics:
    start = time.perf_counter()
    ranks = [r.rank for r in layer.ranks] or [None]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    hidden = (torch.randn(tokens, layer.hidden_size, generator=gen) * 2.0).to(torch.bfloat16).to(device)
    logits = torch.randn(tokens, layer.num_experts, generator=gen).to(torch.bfloat16).to(device)
    out = None
    read_s = compute_s = 0.0
    for rank in ranks:  # rank-sharded: the layer's output is the sum of every rank's partial output
        t0 = time.perf_counter()
        moe = load_moe_layer(ckpt, layer.prefix, device, rank=rank)
        sync(device)
        t1 = time.perf_counter()
        part = moe(hidden, logits, backend=backend, act=act).float()
        sync(device)
        read_s, compute_s = read_s + t1 - t0, compute_s + time.perf_counter() - t1
        out = part if out is None else out + part
        del moe
    t0 = time.perf_counter()
    moe = load_moe_layer(ckpt, layer.prefix, device, rank=ranks[0])
    ref_layer = _reference_layer(ckpt, moe, src, layer, device) if src is not None or layer.ranks else moe
    sync(device)
    t1 = time.perf_counter()
    ids, weights = ref_layer.route(logits)
    ref_in, weights = ref_layer.weights_on_input(hidden, weights)
    ref = ref_layer.forward_torch(ref_in, ids, weights, act).float()
    sync(device)
    read_s, compute_s = read_s + t1 - t0, compute_s + time.perf_counter() - t1
    diff = out - ref
    rel_l2 = float(diff.norm() / ref.norm().clamp(min=1e-30))
    # float64: in float32 the cosine of two near-equal vectors rounds to 1.000002
    cos = float(torch.nn.functional.cosine_similarity(out.flatten().double(), ref.flatten().double(), dim=0))
    close = float(torch.isclose(out, ref, atol=0.1, rtol=0.85).float().mean())
    th = BACKENDS[backend].thresholds[act]
    passed = bool(torch.isfinite(out).all()) and rel_l2 <= th.max_rel_l2 and cos >= th.min_cosine and close >= th.min_frac_close
    return LayerNumerics(
        prefix=layer.prefix,
        backend=backend,
        act=act,
        tokens=tokens,
        rel_l2=rel_l2,
        cosine=cos,
        max_abs=float(diff.abs().max()),
        frac_close=close,
        passed=passed,
        seconds=time.perf_counter() - start,
        reference="source" if src is not None else "converted",
        read_seconds=read_s,
        compute_seconds=compute_s,
    )


def _reference_layer(
    ckpt: ConvertedCheckpoint, moe: MoELayer, src: SourceCheckpoint | None, layer: LayerInfo, device: torch.device
) -> MoELayer:
    """The same routing configuration, with the whole layer's weights read from the source checkpoint
    (or, without one, reassembled from the converted checkpoint's ranks)."""
    if src is not None:  # routing from the source's config: a tampered descriptor routing shows up as a mismatch
        src_layer = next((l for l in src.layers if l.prefix == layer.prefix), None)
        if src_layer is None:
            raise InputError(f"{src.root}: has no MoE layer {layer.prefix}; is it the source of this checkpoint?")
        return source_moe_layer(src, src_layer, device)
    s = ckpt.reassemble_layer(layer)
    ws2 = torch.cat([s["w13_weight_scale_2"], s["w2_weight_scale_2"].unsqueeze(1)], 1)
    inp = torch.cat([s["w13_input_scale"], s["w2_input_scale"].unsqueeze(1)], 1)
    ref = MoELayer(
        layer.prefix, layer.num_experts, layer.hidden_size, layer.intermediate_size, moe.routing, {}, moe.routing_bias,
        gated=layer.gated,
    )  # fmt: skip
    ref._source = stacked_source_weights(s, ws2, inp, device)
    return ref



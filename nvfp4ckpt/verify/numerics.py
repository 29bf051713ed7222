"""The ``numerics`` check: each MoE layer run with a backend against the float32 reference, held to that backend's
thresholds (``runtime.backends``)."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, fields, replace

from .._lazy import torch

from ..source.checkpoint import SourceCheckpoint
from ..layouts.trtllm_gen.converted import ConvertedCheckpoint
from ..layouts.trtllm_gen.descriptor import LayerInfo
from ..errors import InputError
from ..runtime.backends import BACKENDS, sync
from ..runtime.layer import MoELayer, load_moe_layer, source_moe_layer, stacked_source_weights
from ..runtime.routing import read_router_bias



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
    experts: list[int] | None = None  # [first, end) of the sampled experts; None: all
    token_rel_l2: float = 0.0  # the worst token's rel-L2 (a lost (token, expert) pair shows here, whatever T)
    worst_token: int = -1


@dataclass(frozen=True)
class Comparison:
    rel_l2: float
    token_rel_l2: float
    worst_token: int
    cosine: float
    max_abs: float
    frac_close: float
    finite: bool


def compare(out: torch.Tensor, ref: torch.Tensor) -> Comparison:
    """The backend's output against the reference, both fp32 ``[T, H]``."""
    diff = out - ref
    per_token = diff.norm(dim=1) / ref.norm(dim=1).clamp(min=1e-30)  # a token with no output on either side: 0
    worst = int(per_token.argmax()) if per_token.numel() else -1
    return Comparison(
        rel_l2=float(diff.norm() / ref.norm().clamp(min=1e-30)),
        token_rel_l2=float(per_token[worst]) if worst >= 0 else 0.0,
        worst_token=worst,
        # float64: in float32 the cosine of two near-equal vectors rounds to 1.000002
        cosine=float(torch.nn.functional.cosine_similarity(out.flatten().double(), ref.flatten().double(), dim=0)),
        max_abs=float(diff.abs().max()),
        frac_close=float(torch.isclose(out, ref, atol=0.1, rtol=0.85).float().mean()),
        finite=bool(torch.isfinite(out).all()),
    )


def within(c: Comparison, th) -> bool:
    """Whether a comparison meets a backend's ``Threshold`` (NaN fails every test)."""
    token_ok = th.max_token_rel_l2 is None or c.token_rel_l2 <= th.max_token_rel_l2
    return c.finite and c.rel_l2 <= th.max_rel_l2 and token_ok and c.cosine >= th.min_cosine and c.frac_close >= th.min_frac_close



# Sampled numerics (the CPU default): the router logits of the sampled experts are raised by this much, so nearly
# every token routes to them and each sampled expert sees most of the tokens (the routing itself is unchanged).
SAMPLE_BOOST = 4.0


@dataclass(frozen=True)
class NumericsSample:
    """Which part of the checkpoint the numerics check runs: ``layers`` MoE layers (seeded) and, in each, a block of
    ``experts`` consecutive experts (seeded); ``None`` means all."""

    layers: int | None = 2
    experts: int | None = 8

    def pick_layers(self, layers: list[LayerInfo], seed: int, chosen_by_user: bool) -> list[LayerInfo]:
        if chosen_by_user or self.layers is None or self.layers >= len(layers):
            return layers
        keep = set(random.Random(seed).sample(range(len(layers)), self.layers))
        return [l for n, l in enumerate(layers) if n in keep]

    def pick_experts(self, layer: LayerInfo, seed: int) -> range | None:
        """A seeded block of consecutive experts (a block keeps grouped routing simple: it lies in one or two
        groups); None for all experts, and for rank-sharded layers (their ranks split the experts already)."""
        if self.experts is None or layer.ranks or self.experts >= layer.num_experts:
            return None
        start = random.Random(f"{seed}:{layer.prefix}").randrange(layer.num_experts - self.experts + 1)
        return range(start, start + self.experts)


FULL = NumericsSample(None, None)


def check_layer_numerics(
    ckpt: ConvertedCheckpoint,
    src: SourceCheckpoint | None,
    layer: LayerInfo,
    backend: str,
    act: str,
    tokens: int,
    seed: int,
    device: torch.device,
    experts: range | None = None,
    tensors: dict[str, torch.Tensor] | None = None,
    source: dict[str, torch.Tensor] | None = None,
) -> LayerNumerics:
    """One layer's backend output against the float32 reference. ``experts``: only this block of experts runs (the
    output compared is their part of the layer's output). ``tensors``/``source``: the layer's canonical tensors and
    the stacked source layer, already read (the single-pass scan), instead of reading them here."""
    start = time.perf_counter()
    ranks = [r.rank for r in layer.ranks] or [None]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    hidden = (torch.randn(tokens, layer.hidden_size, generator=gen) * 2.0).to(torch.bfloat16).to(device)
    logits = torch.randn(tokens, layer.num_experts, generator=gen)
    if experts is not None:
        logits[:, experts.start : experts.stop] += SAMPLE_BOOST
    logits = logits.to(torch.bfloat16).to(device)
    out = None
    read_s = compute_s = 0.0
    for rank in ranks:  # rank-sharded: the layer's output is the sum of every rank's partial output
        t0 = time.perf_counter()
        moe = load_moe_layer(ckpt, layer.prefix, device, rank=rank, tensors=tensors)
        if experts is not None:
            moe = only_experts(moe, experts)
        sync(device)
        t1 = time.perf_counter()
        # fp32 output where the backend has it (Triton): the kernel's arithmetic without the final bf16 rounding,
        # which would otherwise set the noise floor (1.7e-3) far above a wrong block scale's error
        part = moe(hidden, logits, backend=backend, act=act, out_dtype=torch.float32).float()
        sync(device)
        read_s, compute_s = read_s + t1 - t0, compute_s + time.perf_counter() - t1
        out = part if out is None else out + part
    t0 = time.perf_counter()
    if src is not None and source is not None and "raw_scalars_all" in source:
        ref_layer = _block_reference(src, moe, layer, source, experts, device)  # already just these experts
    elif src is not None or layer.ranks:
        ref_layer = _reference_layer(ckpt, moe, src, layer, device, source)
        if experts is not None:
            ref_layer = only_experts(ref_layer, experts)
    else:
        ref_layer = moe
    del moe
    sync(device)
    t1 = time.perf_counter()
    ids, weights = ref_layer.route(logits)
    if experts is not None:
        ids = torch.where((ids >= experts.start) & (ids < experts.stop), ids - experts.start, -1)
    ref_in, weights = ref_layer.weights_on_input(hidden, weights)
    ref = ref_layer.forward_torch(ref_in, ids, weights, act).float()
    sync(device)
    read_s, compute_s = read_s + t1 - t0, compute_s + time.perf_counter() - t1
    c = compare(out, ref)
    return LayerNumerics(
        prefix=layer.prefix,
        backend=backend,
        act=act,
        tokens=tokens,
        rel_l2=c.rel_l2,
        cosine=c.cosine,
        max_abs=c.max_abs,
        frac_close=c.frac_close,
        passed=within(c, BACKENDS[backend].thresholds[act]),
        seconds=time.perf_counter() - start,
        reference="source" if src is not None else "converted",
        read_seconds=read_s,
        compute_seconds=compute_s,
        experts=[experts.start, experts.stop] if experts is not None else None,
        token_rel_l2=c.token_rel_l2,
        worst_token=c.worst_token,
    )


def only_experts(moe: MoELayer, experts: range) -> MoELayer:
    """The layer restricted to a block of its experts, like an expert-parallel rank: global routing, other
    experts contribute nothing; a1/a2 stay the maxima over all experts (the kernel's global scales)."""
    e0, e1 = experts.start, experts.stop
    if moe.tensors:
        t = moe.tensors
        scales = moe.global_input_scales or (float(t["w13_input_scale"].max()), float(t["w2_input_scale"].max()))
        tensors = {k: (v if k == "w13_input_scale_quant" else v[e0:e1].contiguous()) for k, v in t.items()}
        return replace(moe, tensors=tensors, expert_offset=e0, global_input_scales=scales, _source=None)
    s = moe.source_weights()
    cut = {f.name: (v[e0:e1].contiguous() if isinstance(v, torch.Tensor) else v) for f in fields(s) for v in [getattr(s, f.name)]}
    return replace(moe, expert_offset=e0, _source=replace(s, **cut))


def _reference_layer(
    ckpt: ConvertedCheckpoint,
    moe: MoELayer,
    src: SourceCheckpoint | None,
    layer: LayerInfo,
    device: torch.device,
    source: dict[str, torch.Tensor] | None = None,
) -> MoELayer:
    """The same routing configuration, with the whole layer's weights read from the source checkpoint
    (or, without one, reassembled from the converted checkpoint's ranks)."""
    if src is not None:  # routing from the source's config: a tampered descriptor routing shows up as a mismatch
        src_layer = next((l for l in src.layers if l.prefix == layer.prefix), None)
        if src_layer is None:
            raise InputError(f"{src.root}: has no MoE layer {layer.prefix}; is it the source of this checkpoint?")
        return source_moe_layer(src, src_layer, device, stacked=source)
    s = ckpt.reassemble_layer(layer)
    ws2 = torch.cat([s["w13_weight_scale_2"], s["w2_weight_scale_2"].unsqueeze(1)], 1)
    inp = torch.cat([s["w13_input_scale"], s["w2_input_scale"].unsqueeze(1)], 1)
    ref = MoELayer(
        layer.prefix, layer.num_experts, layer.hidden_size, layer.intermediate_size, moe.routing, {}, moe.routing_bias,
        gated=layer.gated,
    )  # fmt: skip
    ref._source = stacked_source_weights(s, ws2, inp, device)
    return ref




def _block_reference(
    src: SourceCheckpoint, moe: MoELayer, layer: LayerInfo, block: dict, experts: range | None, device: torch.device
) -> MoELayer:
    """The reference from source tensors of a block of experts read by the layout comparison
    (``verify.layout.fast_compare_layer``): their weights, a1/a2 from every expert's input scales, and the routing
    of the source's config (not the descriptor's)."""
    to_mult = src.format.to_dequant_multiplier
    ws2 = to_mult(block["raw_scalars"][:, :, 0])
    inp = to_mult(block["raw_scalars_all"][:, :, 1])
    src_layer = next(l for l in src.layers if l.prefix == layer.prefix)
    routing = src.routing.to_dict()  # the source's own routing (as main's _reference_layer): a tampered descriptor shows
    bias = read_router_bias(src.files, src_layer.block, routing, device)
    ref = MoELayer(
        layer.prefix, layer.num_experts, layer.hidden_size, layer.intermediate_size, routing, {}, bias,
        expert_offset=experts.start if experts is not None else 0, gated=layer.gated,
    )  # fmt: skip
    ref._source = stacked_source_weights(block, ws2, inp, device)
    return ref

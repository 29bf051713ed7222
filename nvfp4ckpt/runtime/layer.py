"""Run one MoE layer of a converted checkpoint: the small library behind ``verify`` and the GSM8K runner.

    from nvfp4ckpt.runtime import load_moe_layer
    layer = load_moe_layer("qwen3-trtllm", 3, "cuda")          # decoder layer 3 (or the expert prefix)
    out = layer(hidden_states, router_logits)                    # bf16 [T, H]; backend chosen for the GPU

Backends (``trtllm``, ``triton``, ``torch``) and how ``auto`` picks one: ``runtime.backends``.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from pathlib import Path

from .._lazy import torch

from ..layouts.trtllm_gen.converted import ConvertedCheckpoint, open_converted
from ..layouts.trtllm_gen.descriptor import LayerInfo
from ..layouts.trtllm_gen.ranks import RankSpec, from_kernel
from ..errors import InputError
from ..source.checkpoint import SourceCheckpoint, SourceMoELayer
from ..source.stacked import read_layer_source
from .routing import read_router_bias


_INTERPRETER_LOCK = threading.Lock()


@dataclass
class SourceWeights:
    """A layer's weights back in source layout (for the torch reference); the gate fields are None for
    non-gated (relu2) experts."""

    gate: torch.Tensor | None
    up: torch.Tensor
    down: torch.Tensor
    gate_scale: torch.Tensor | None
    up_scale: torch.Tensor
    down_scale: torch.Tensor
    ws2_gate: torch.Tensor | None
    ws2_up: torch.Tensor
    ws2_down: torch.Tensor
    a1: float
    a2: float


def stacked_source_weights(
    stacked: dict[str, torch.Tensor], ws2: torch.Tensor, input_scale: torch.Tensor, device: torch.device | str
) -> SourceWeights:
    """SourceWeights from a whole layer in source layout: ``w31`` ``[up; gate]``, ``s31``, ``down``, ``down_scale``
    (uint8) and ModelOpt-convention scales ``[E, 3]`` (columns gate, up, down); a1/a2 are their maxima.
    Non-gated layers: ``w31`` is ``[up]`` and the scales are ``[E, 2]`` (up, down)."""
    n = ws2.shape[1] - 1  # w13 halves
    i = stacked["w31"].shape[-2] // n
    e4m3 = torch.float8_e4m3fn
    ws2 = ws2.float().to(device)
    gated = n == 2
    return SourceWeights(
        gate=stacked["w31"][:, i:].contiguous().to(device) if gated else None,
        up=stacked["w31"][:, :i].contiguous().to(device),
        down=stacked["down"].to(device),
        gate_scale=stacked["s31"][:, i:].contiguous().view(e4m3).to(device) if gated else None,
        up_scale=stacked["s31"][:, :i].contiguous().view(e4m3).to(device),
        down_scale=stacked["down_scale"].view(e4m3).to(device),
        ws2_gate=ws2[:, 0].contiguous() if gated else None,
        ws2_up=ws2[:, n - 1].contiguous(),
        ws2_down=ws2[:, n].contiguous(),
        a1=float(input_scale[:, :n].max()),
        a2=float(input_scale[:, n].max()),
    )


@dataclass
class MoELayer:
    """One MoE layer's kernel-ready tensors on a device, with its routing configuration."""

    prefix: str
    num_experts: int
    hidden_size: int
    intermediate_size: int
    routing: dict
    tensors: dict[str, torch.Tensor]
    routing_bias: torch.Tensor | None = None
    hidden_padded: int | None = None  # stored sizes when the converter padded them (None: not padded)
    intermediate_padded: int | None = None
    expert_offset: int = 0  # rank-sharded output: first global expert of this rank
    rank: RankSpec | None = None
    global_input_scales: tuple[float, float] | None = None  # (a1, a2) over all ranks' experts
    gated: bool = True  # SwiGLU; False: non-gated relu2 (w13 holds up only)
    descriptor: dict | None = field(default=None, repr=False)  # the checkpoint's moe_kernel_layout (for update_)
    _source: SourceWeights | None = field(default=None, repr=False)

    def update_(self, named_tensors):
        """Write new source-format expert tensors into this layer's tensors in place (see nvfp4ckpt.runtime.update)."""
        from .update import update_layer_

        return update_layer_(self, named_tensors)

    def check_live(self, source=None, tensors=None):
        """Whether the live tensors equal the kernel layout of a source checkpoint folder or named source tensors."""
        from .update import check_layer

        return check_layer(self, source=source, tensors=tensors)

    @property
    def num_local_experts(self) -> int:
        return self.tensors["w13_weight"].shape[0] if self.tensors else self.num_experts

    def local_ids(self, topk_ids: torch.Tensor) -> torch.Tensor:
        """Global expert ids -> this rank's (experts of other ranks become -1 and contribute nothing)."""
        if self.expert_offset == 0 and self.num_local_experts == self.num_experts:
            return topk_ids
        local = topk_ids.long() - self.expert_offset
        return torch.where((local >= 0) & (local < self.num_local_experts), local, -1).to(topk_ids.dtype)

    @property
    def stored_hidden(self) -> int:
        return self.hidden_padded or self.hidden_size

    @property
    def stored_intermediate(self) -> int:
        return self.intermediate_padded or self.intermediate_size

    def pad_hidden(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Zero columns up to the stored hidden size (the kernel sees the padded H)."""
        extra = self.stored_hidden - hidden_states.shape[-1]
        return torch.nn.functional.pad(hidden_states, (0, extra)) if extra else hidden_states

    @property
    def device(self) -> torch.device:
        return self.tensors["w13_weight"].device

    def route(self, router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from .routing import route

        r = self.routing
        return route(
            router_logits,
            r["method"],
            int(r["top_k"]),
            bias=self.routing_bias,
            n_group=r.get("n_group"),
            topk_group=r.get("topk_group"),
            routed_scaling_factor=r.get("routed_scaling_factor", 1.0),
            norm_topk_prob=r.get("norm_topk_prob", True),
        )

    def weights_on_input(self, hidden: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Llama-4 routing scales the expert input: ``x * w`` (in the hidden dtype, before any quantization,
        as vLLM's ``apply_router_weight_on_input``; top-1 only), then the output weight is 1."""
        from .routing import WEIGHTS_ON_INPUT, canonical_method

        if canonical_method(self.routing["method"]) not in WEIGHTS_ON_INPUT:
            return hidden, weights
        if weights.shape[1] != 1:
            raise InputError(f"{self.prefix}: {self.routing['method']} routing applies weights on the input; top_k must be 1")
        return (hidden * weights.to(hidden.dtype)).to(hidden.dtype), torch.ones_like(weights)

    def source_weights(self) -> SourceWeights:
        """Un-shuffled weights and ModelOpt-convention scalars (cached)."""
        if self._source is None:
            t = self.tensors
            logical_i = self.rank.intermediate_size if self.rank else self.intermediate_size
            w31, s31, down, down_s, _ = from_kernel(t, self.hidden_size, logical_i, self.gated)  # padding dropped
            e4m3 = torch.float8_e4m3fn
            up, up_s = w31[:, :logical_i], s31[:, :logical_i].view(e4m3)
            gate = w31[:, logical_i:] if self.gated else None
            gate_s = s31[:, logical_i:].view(e4m3) if self.gated else None
            ws2_13 = t["w13_weight_scale_2"]
            self._source = SourceWeights(
                gate, up, down, gate_s, up_s, down_s.view(e4m3),
                ws2_13[:, 0].contiguous() if self.gated else None, ws2_13[:, -1].contiguous(), t["w2_weight_scale_2"],
                *(self.global_input_scales or (float(t["w13_input_scale"].max()), float(t["w2_input_scale"].max()))),
            )  # fmt: skip
        return self._source

    def __call__(
        self,
        hidden_states: torch.Tensor,
        router_logits: torch.Tensor,
        backend: str = "auto",
        act: str = "nvfp4",
        out_dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """MoE output ``[T, H]`` (fp32 for torch, bf16 for the GPU backends unless ``out_dtype``: Triton also writes
        fp32); see ``runtime.backends``."""
        from .backends import run_backend

        return run_backend(self, hidden_states, router_logits, backend, act, out_dtype)

    def forward_torch(self, hidden_states, topk_ids, topk_weights, act: str = "nvfp4") -> torch.Tensor:
        from .reference import moe_forward_torch

        s = self.source_weights()
        return moe_forward_torch(
            hidden_states, topk_ids, topk_weights, s.gate, s.up, s.down, s.gate_scale, s.up_scale, s.down_scale,
            s.ws2_gate, s.ws2_up, s.ws2_down, s.a1, s.a2, act=act,
        )  # fmt: skip

    def forward_triton(self, hidden_states, topk_ids, topk_weights, act: str = "nvfp4", out_dtype=None) -> torch.Tensor:
        from .backends import interpreting

        if self.device.type != "cuda" and not interpreting():
            raise InputError("--backend triton needs a CUDA GPU (SM80 or newer); use --backend torch on CPU")
        from .kernels import triton_moe
        from .kernels.triton_moe import moe_forward_triton

        if self.device.type != "cuda" and not triton_moe._interpreting():
            raise InputError(
                "--backend triton on the CPU: the kernels were defined before TRITON_INTERPRET=1 was set; set it "
                "before nvfp4ckpt's kernels are imported"
            )

        t = self.tensors
        # Triton's interpreter patches triton.language module-wide while a kernel runs: one at a time (verify runs
        # layers on a thread pool)
        with _INTERPRETER_LOCK if self.device.type != "cuda" else contextlib.nullcontext():
            out = moe_forward_triton(
                self.pad_hidden(hidden_states), topk_ids, topk_weights, t["w13_weight"], t["w13_weight_scale"], t["w2_weight"],
                t["w2_weight_scale"], t["g1_alphas"], t["g1_scale_c"], t["g2_alphas"], t["w13_input_scale_quant"], act,
                w2_input_scale_quant=1.0 / (self.global_input_scales[1] if self.global_input_scales else float(t["w2_input_scale"].max())),
                out_dtype=out_dtype or torch.bfloat16, gated=self.gated,
            )  # fmt: skip
        return out[:, : self.hidden_size]


def load_moe_layer(
    path: str | Path | ConvertedCheckpoint,
    layer: str | int,
    device: str | torch.device = "cpu",
    rank: int | None = None,
    tensors: dict[str, torch.Tensor] | None = None,
) -> MoELayer:
    """Load one MoE layer (expert prefix, or decoder layer number) of a converted checkpoint onto ``device``.

    For rank-sharded output (``convert --tp/--ep``) pass ``rank``: the layer then holds that rank's experts and
    intermediate slice, routes with the global router and ignores tokens routed to other ranks; the sum of all
    ranks' outputs is the layer's output. ``tensors``: the layer's canonical tensors already read (by short name).
    """
    ckpt = path if isinstance(path, ConvertedCheckpoint) else open_converted(path)
    info: LayerInfo = ckpt.layer(layer)
    spec: RankSpec | None = info.rank_spec(rank, str(ckpt.root))
    global_scales = None
    if spec is not None:  # a1/a2 are maxima over every rank's experts, as the converter computed them
        a1 = max(float(ckpt.files_for(r).read(f"{info.prefix}.w13_input_scale").max()) for r in info.ranks)
        a2 = max(float(ckpt.files_for(r).read(f"{info.prefix}.w2_input_scale").max()) for r in info.ranks)
        global_scales = (a1, a2)
    routing = dict(ckpt.descriptor.get("routing") or {})
    bias = read_router_bias(ckpt.files, info.prefix.rsplit(".", 1)[0], routing, device)
    return MoELayer(
        prefix=info.prefix,
        num_experts=info.num_experts,
        hidden_size=info.hidden_size,
        intermediate_size=info.intermediate_size,
        routing=routing,
        tensors=(
            ckpt.read_layer(info, device, rank=spec) if tensors is None else {k: v.to(device) for k, v in tensors.items()}
        ),
        routing_bias=bias,
        hidden_padded=info.hidden_padded,
        intermediate_padded=spec.intermediate_padded if spec else info.intermediate_padded,
        expert_offset=spec.expert_start if spec else 0,
        rank=spec,
        global_input_scales=global_scales,
        gated=info.gated,
        descriptor=ckpt.descriptor,
    )


def source_moe_layer(
    src: SourceCheckpoint,
    layer: SourceMoELayer,
    device: torch.device,
    routing: dict | None = None,
    stacked: dict[str, torch.Tensor] | None = None,
) -> MoELayer:
    """A MoELayer whose torch reference runs the source checkpoint's expert tensors (no kernel layout): the
    reference of ``verify`` and the source side of the GSM8K runner. ``routing`` defaults to the source's;
    ``stacked``: the layer already read by ``read_layer_source``."""
    s = read_layer_source(src, layer) if stacked is None else stacked
    to_mult = src.format.to_dequant_multiplier
    weights = stacked_source_weights(s, to_mult(s["raw_scalars"][:, :, 0]), to_mult(s["raw_scalars"][:, :, 1]), device)
    routing = src.routing.to_dict() if routing is None else routing
    bias = read_router_bias(src.files, layer.block, routing, device)
    moe = MoELayer(
        layer.prefix, layer.num_experts, layer.hidden_size, layer.intermediate_size, routing, {}, bias, gated=layer.gated
    )
    moe._source = weights
    return moe

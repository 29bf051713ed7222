"""Run one MoE layer of a converted checkpoint: the small library behind ``verify`` and the GSM8K runner.

    from nvfp4ckpt.runtime import load_moe_layer
    layer = load_moe_layer("qwen3-trtllm", 3, "cuda")          # decoder layer 3 (or the expert prefix)
    out = layer(hidden_states, router_logits)                    # bf16 [T, H]; backend chosen for the GPU

Backends:
- ``trtllm``: FlashInfer's ``trtllm_fp4_block_scale_moe`` on the tensors as stored (SM100/SM103 only).
- ``triton``: nvfp4ckpt's own fused NVFP4 MoE reading the kernel layout directly (CUDA, SM80 and newer).
- ``torch``: the float32 reference on the un-shuffled weights (CPU or GPU; slow, simple).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path

from ._lazy import torch

from .converted import ConvertedCheckpoint, open_converted
from .descriptor import LayerInfo
from .parallel import RankSpec, from_kernel
from .errors import InputError

BACKENDS = ("auto", "trtllm", "triton", "torch")
ACT_MODES = ("nvfp4", "bf16")


def default_backend(device: torch.device | str) -> str:
    """trtllm on SM100/SM103, triton on other CUDA GPUs from SM80, torch otherwise."""
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return "torch"
    major, _ = torch.cuda.get_device_capability(dev)
    if major == 10:
        return "trtllm"
    if major >= 8:
        return "triton"
    return "torch"


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
        """Write new source-format expert tensors into this layer's tensors in place (see nvfp4ckpt.live)."""
        from .live import update_layer_

        return update_layer_(self, named_tensors)

    def check_live(self, source=None, tensors=None):
        """Whether the live tensors equal the kernel layout of a source checkpoint folder or named source tensors."""
        from .live import check_layer

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
    ) -> torch.Tensor:
        """MoE output ``[T, H]`` (fp32 for torch, bf16 for the GPU backends)."""
        if backend not in BACKENDS:
            raise InputError(f"--backend {backend!r}: choose one of {', '.join(BACKENDS)}")
        if act not in ACT_MODES:
            raise InputError(f"--act {act!r}: choose one of {', '.join(ACT_MODES)}")
        if backend == "auto":
            backend = default_backend(self.device)
        if backend == "trtllm":
            if act != "nvfp4":
                raise InputError("--backend trtllm runs W4A4 only; use --act nvfp4 (or --backend triton for --act bf16)")
            return run_trtllm(self, hidden_states, router_logits)
        topk_ids, topk_weights = self.route(router_logits)
        topk_ids = self.local_ids(topk_ids)
        hidden_states, topk_weights = self.weights_on_input(hidden_states, topk_weights)
        if backend == "triton":
            return self.forward_triton(hidden_states, topk_ids, topk_weights, act)
        return self.forward_torch(hidden_states, topk_ids, topk_weights, act)

    def forward_torch(self, hidden_states, topk_ids, topk_weights, act: str = "nvfp4") -> torch.Tensor:
        from .moe_torch import moe_forward_torch

        s = self.source_weights()
        return moe_forward_torch(
            hidden_states, topk_ids, topk_weights, s.gate, s.up, s.down, s.gate_scale, s.up_scale, s.down_scale,
            s.ws2_gate, s.ws2_up, s.ws2_down, s.a1, s.a2, act=act,
        )  # fmt: skip

    def forward_triton(self, hidden_states, topk_ids, topk_weights, act: str = "nvfp4") -> torch.Tensor:
        if not self.gated:
            raise InputError(
                f"{self.prefix}: the Triton backend runs SwiGLU experts only, this layer is non-gated (relu2); "
                "use --backend torch (or trtllm on Blackwell)"
            )
        if self.device.type != "cuda":
            raise InputError("--backend triton needs a CUDA GPU (SM80 or newer); use --backend torch on CPU")
        from .kernels.triton_moe import moe_forward_triton

        t = self.tensors
        out = moe_forward_triton(
            self.pad_hidden(hidden_states), topk_ids, topk_weights, t["w13_weight"], t["w13_weight_scale"], t["w2_weight"],
            t["w2_weight_scale"], t["g1_alphas"], t["g1_scale_c"], t["g2_alphas"], t["w13_input_scale_quant"], act,
            w2_input_scale_quant=1.0 / (self.global_input_scales[1] if self.global_input_scales else float(t["w2_input_scale"].max())),
        )  # fmt: skip
        return out[:, : self.hidden_size]


def load_moe_layer(
    path: str | Path | ConvertedCheckpoint, layer: str | int, device: str | torch.device = "cpu", rank: int | None = None
) -> MoELayer:
    """Load one MoE layer (expert prefix, or decoder layer number) of a converted checkpoint onto ``device``.

    For rank-sharded output (``convert --tp/--ep``) pass ``rank``: the layer then holds that rank's experts and
    intermediate slice, routes with the global router and ignores tokens routed to other ranks; the sum of all
    ranks' outputs is the layer's output.
    """
    ckpt = path if isinstance(path, ConvertedCheckpoint) else open_converted(path)
    info: LayerInfo = ckpt.layer(layer)
    spec: RankSpec | None = None
    if info.ranks:
        if rank is None:
            raise InputError(f"{ckpt.root}: rank-sharded checkpoint ({len(info.ranks)} ranks); pass rank=0..{len(info.ranks) - 1}")
        matches = [r for r in info.ranks if r.rank == rank]
        if not matches:
            raise InputError(f"{ckpt.root}: no rank {rank}; ranks are 0..{len(info.ranks) - 1}")
        spec = matches[0]
    elif rank not in (None, 0):
        raise InputError(f"{ckpt.root}: not rank-sharded; there is no rank {rank}")
    global_scales = None
    if spec is not None:  # a1/a2 are maxima over every rank's experts, as the converter computed them
        a1 = max(float(ckpt.files_for(r).read(f"{info.prefix}.w13_input_scale").max()) for r in info.ranks)
        a2 = max(float(ckpt.files_for(r).read(f"{info.prefix}.w2_input_scale").max()) for r in info.ranks)
        global_scales = (a1, a2)
    routing = dict(ckpt.descriptor.get("routing") or {})
    bias = None
    if routing.get("bias_suffix"):
        block = info.prefix.rsplit(".", 1)[0]
        name = f"{block}.{routing['bias_suffix']}"
        if name in ckpt.files.tensors:
            bias = ckpt.files.read(name).to(device)
    return MoELayer(
        prefix=info.prefix,
        num_experts=info.num_experts,
        hidden_size=info.hidden_size,
        intermediate_size=info.intermediate_size,
        routing=routing,
        tensors=ckpt.read_layer(info, device, rank=spec),
        routing_bias=bias,
        hidden_padded=info.hidden_padded,
        intermediate_padded=spec.intermediate_padded if spec else info.intermediate_padded,
        expert_offset=spec.expert_start if spec else 0,
        rank=spec,
        global_input_scales=global_scales,
        gated=info.gated,
        descriptor=ckpt.descriptor,
    )


# ----------------------------------------------------------------------------------------------
# FlashInfer TRT-LLM-gen kernel (SM100/SM103). Unexercised on the hardware available to this project:
# the argument construction below is unit-tested on CPU against the installed FlashInfer's signature.


def trtllm_kwargs(
    layer: MoELayer,
    hidden_fp4: torch.Tensor,
    hidden_scale: torch.Tensor,
    router_logits: torch.Tensor,
    signature: inspect.Signature,
) -> dict:
    """Keyword arguments for ``trtllm_fp4_block_scale_moe``, adapted to the installed version's signature.

    Follows SGLang's call (layout reference, section 5): linear hidden-state scales ``[T, H/16]`` e4m3, fp32
    logits for DeepSeekV3 routing, bf16 routing bias, ``output1_scale_scalar = g1_scale_c``,
    ``output1_scale_gate_scalar = g1_alphas``, ``output2_scale_scalar = g2_alphas``, SwiGLU activation.
    """
    from flashinfer.tllm_enums import RoutingMethodType

    t = layer.tensors
    r = layer.routing
    num_tokens = hidden_fp4.shape[0]
    method = RoutingMethodType[r["method"]]
    logits = router_logits.float() if r["method"] == "DeepSeekV3" else router_logits.to(torch.bfloat16)
    bias = layer.routing_bias.to(torch.bfloat16) if layer.routing_bias is not None else None
    kwargs = {
        "routing_logits": logits,
        "routing_bias": bias,
        "hidden_states": hidden_fp4,
        "hidden_states_scale": hidden_scale.view(torch.float8_e4m3fn).reshape(num_tokens, layer.stored_hidden // 16),
        "gemm1_weights": t["w13_weight"],
        "gemm1_weights_scale": t["w13_weight_scale"].view(torch.float8_e4m3fn),
        "gemm1_bias": None,
        "gemm1_alpha": None,
        "gemm1_beta": None,
        "gemm1_clamp_limit": None,
        "gemm2_weights": t["w2_weight"],
        "gemm2_weights_scale": t["w2_weight_scale"].view(torch.float8_e4m3fn),
        "gemm2_bias": None,
        "output1_scale_scalar": t["g1_scale_c"],
        "output1_scale_gate_scalar": t["g1_alphas"],
        "output2_scale_scalar": t["g2_alphas"],
        "num_experts": layer.num_experts,
        "top_k": int(r["top_k"]),
        "n_group": r.get("n_group"),
        "topk_group": r.get("topk_group"),
        "intermediate_size": layer.stored_intermediate,  # the (padded) I the weights were built with
        "local_expert_offset": layer.expert_offset,
        "local_num_experts": layer.num_local_experts,
        "routed_scaling_factor": r.get("routed_scaling_factor"),
        "routing_method_type": int(method),
        "do_finalize": True,
    }
    params = signature.parameters
    if "activation_type" in params:  # FlashInfer >= 0.6.3
        from flashinfer.tllm_enums import ActivationType

        kwargs["activation_type"] = int(ActivationType.Swiglu if layer.gated else ActivationType.Relu2)
    elif "gated_act_type" in params and layer.gated:  # 0.3 .. 0.6.2: GatedActType.SwiGlu == 0
        kwargs["gated_act_type"] = 0
    elif not layer.gated:
        raise InputError("installed FlashInfer's trtllm_fp4_block_scale_moe has no activation_type (needs >= 0.6.3 for relu2)")
    if "tile_tokens_dim" in params:  # removed in 0.6.0; None means automatic from 0.4.1
        kwargs["tile_tokens_dim"] = None
    if "tune_max_num_tokens" in params:
        kwargs["tune_max_num_tokens"] = max(1, 1 << (num_tokens - 1).bit_length())
    unknown = [k for k in kwargs if k not in params]
    if unknown:
        raise InputError(f"installed FlashInfer's trtllm_fp4_block_scale_moe has no argument(s) {unknown}; unsupported version")
    missing = [
        name for name, p in params.items()
        if p.default is inspect.Parameter.empty and p.kind is not inspect.Parameter.VAR_KEYWORD and name not in kwargs
    ]  # fmt: skip
    if missing:
        raise InputError(f"installed FlashInfer's trtllm_fp4_block_scale_moe requires {missing}; unsupported version")
    return kwargs


def run_trtllm(layer: MoELayer, hidden_states: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
    if layer.device.type != "cuda" or torch.cuda.get_device_capability(layer.device)[0] != 10:
        raise InputError("--backend trtllm needs an SM100/SM103 GPU (B200, GB200, B300); use --backend triton here")
    from flashinfer import fp4_quantize
    from flashinfer.fused_moe import trtllm_fp4_block_scale_moe

    hs_fp4, hs_sf = fp4_quantize(
        layer.pad_hidden(hidden_states.to(torch.bfloat16)),
        global_scale=layer.tensors["w13_input_scale_quant"],
        sf_vec_size=16,
        sf_use_ue8m0=False,
        is_sf_swizzled_layout=False,
    )
    kwargs = trtllm_kwargs(layer, hs_fp4, hs_sf, router_logits, inspect.signature(trtllm_fp4_block_scale_moe))
    return trtllm_fp4_block_scale_moe(**kwargs)[0][:, : layer.hidden_size]

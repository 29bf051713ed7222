"""The plugin's MoE methods: vLLM's own NVFP4 MoE methods with the converted tensors put in place.

vLLM 0.33.0's FLASHINFER_TRTLLM path leaves these forward-time tensors on a ``RoutedExperts`` layer after
``process_weights_after_loading`` (``prepare_nvfp4_moe_layer_for_fi_or_cutlass`` + ``TrtLlmNvFp4Experts``):

=====================  ==========================================  ===========================================
parameter              vLLM's value                                 from the converted files
=====================  ==========================================  ===========================================
w13_weight (+_scale)   [w3; w1] reordered, H->256 / I->64 padded,   ``w13_weight`` / ``w13_weight_scale`` as is
                       shuffled, scales 128x4-interleaved
w2_weight (+_scale)    same for down                                ``w2_weight`` / ``w2_weight_scale`` as is
w13_weight_scale_2     [E_loc] gate ``weight_scale_2`` * a1         ``g1_alphas`` (gate and up scale_2 must be equal)
w2_weight_scale_2      [E_loc] ``weight_scale_2`` * a2              ``g2_alphas``
w13_input_scale        [E_loc] a1 repeated                          max of every expert's ``w13_input_scale``
w2_input_scale         [E_loc] a2 repeated                          max of every expert's ``w2_input_scale``
g1_scale_c             g1_alphas * (1/a2), computed by vLLM         (vLLM computes it from the two above)
=====================  ==========================================  ===========================================

compressed-tensors sources: vLLM keeps the four raw ``*_global_scale`` parameters ([E_loc, 2] / [E_loc]) and
takes a1/a2 over the experts of its own rank only; the plugin loads the raw scales and derives the rest with
the same float32 operations. ModelOpt: vLLM's ``ModelOptNvFp4FusedMoE`` itself runs, under
``weights_already_processed()`` (its pre-processed-weights path), which skips every transform.

Post-processing is idempotent: it never calls FlashInfer's shuffle or interleave, and keeps the identity of
every parameter (vLLM itself re-registers ``g1_scale_c`` on each call; the plugin restores the original
object with the new values copied in).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from vllm.model_executor.layers.fused_moe.oracle.nvfp4 import NvFp4MoeBackend, make_nvfp4_moe_kernel
from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors_moe.compressed_tensors_moe_w4a4_nvfp4 import (  # noqa: E501
    CompressedTensorsW4A4Nvfp4MoEMethod,
)
from vllm.model_executor.layers.quantization.modelopt import ModelOptNvFp4FusedMoE
from vllm.model_executor.layers.quantization.utils.flashinfer_utils import trtllm_nvfp4_hidden_alignment
from vllm.model_executor.parameter import ModelWeightParameter, PerTensorScaleParameter
from vllm.model_executor.utils import weights_already_processed

# nvfp4ckpt imports (kept together: the restructure re-points them)
from ...errors import EngineRefusalError

GROUP = 16
KERNEL = ("w13_weight", "w13_weight_scale", "w2_weight", "w2_weight_scale")
RAW_CT = ("w13_weight_global_scale", "w2_weight_global_scale", "w13_input_global_scale", "w2_input_global_scale")
# Parameters vLLM's TrtLlmNvFp4Experts (re-)registers on every post-processing call.
_REREGISTERED = ("g1_scale_c", "gemm1_clamp_limit", "gemm1_beta", "gemm1_alpha")


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


@dataclass(frozen=True)
class RankPart:
    rank: int
    tp_rank: int
    ep_rank: int
    experts: tuple[int, int]
    intermediate_padded: int


@dataclass(frozen=True)
class LayerSpec:
    """One converted MoE layer as its descriptor entry states it."""

    prefix: str
    num_experts: int
    hidden_size: int
    hidden_padded: int
    intermediate_size: int
    intermediate_padded: int
    gated: bool
    source_format: str
    tp: int = 1
    ep: int = 1
    ranks: dict[int, RankPart] = field(default_factory=dict)

    @classmethod
    def from_descriptor(cls, prefix: str, info: dict, descriptor: dict) -> "LayerSpec":
        par = descriptor.get("parallel") or {}
        tp, ep = int(par.get("tp", 1)), int(par.get("ep", 1))
        ranks = {
            int(r["rank"]): RankPart(
                int(r["rank"]), int(r["rank"]) % tp, int(r["rank"]) // tp, (int(r["experts"][0]), int(r["experts"][1])),
                int(r["intermediate_size_padded"]),
            )  # fmt: skip
            for r in info.get("ranks") or ()
        }
        return cls(
            prefix=prefix,
            num_experts=int(info["num_experts"]),
            hidden_size=int(info["hidden_size"]),
            hidden_padded=int(info.get("hidden_size_padded", info["hidden_size"])),
            intermediate_size=int(info["intermediate_size"]),
            intermediate_padded=int(info.get("intermediate_size_padded", info["intermediate_size"])),
            gated=descriptor.get("activation", "swiglu") != "relu2",
            source_format=str(descriptor.get("source_format")),
            tp=tp,
            ep=ep,
            ranks=ranks,
        )

    def part_for(self, tp_size: int, tp_rank: int, ep_size: int, ep_rank: int) -> RankPart | None:
        """The ``ranks/rank-NNN`` part vLLM's (tp, ep) rank reads, or None for whole-layer (top-level) files."""
        if not self.ranks:
            if tp_size != 1:
                raise EngineRefusalError(
                    f"{self.prefix}: vLLM shards this MoE over {tp_size} tensor-parallel ranks but the checkpoint was "
                    f"converted without --tp; a shuffled tensor cannot be re-sliced: convert with --tp {tp_size}"
                )
            return None
        if (self.tp, self.ep) != (tp_size, ep_size):
            raise EngineRefusalError(
                f"{self.prefix}: converted with --tp {self.tp} --ep {self.ep} but vLLM runs this MoE with tp {tp_size} "
                f"ep {ep_size}: convert with --tp {tp_size} --ep {ep_size} (vLLM with --enable-expert-parallel has MoE tp 1)"
            )
        return self.ranks[ep_rank * self.tp + tp_rank]


def _refusing_loader(prefix: str):
    def weight_loader(param, loaded_weight, *args, **kwargs):
        raise EngineRefusalError(
            f"{prefix}: expert tensors of an nvfp4_trtllm checkpoint load only through --load-format nvfp4_trtllm "
            "(or reload_weights(is_checkpoint_format=False) with kernel-layout tensors)"
        )

    return weight_loader


class _TrtllmMoE:
    """What both plugin methods share: shapes, by-name loading, identity-keeping post-processing."""

    spec: LayerSpec
    nvfp4_backend: NvFp4MoeBackend

    def _check_backend(self) -> None:
        if self.nvfp4_backend != NvFp4MoeBackend.FLASHINFER_TRTLLM:
            raise EngineRefusalError(
                f"{self.spec.prefix}: vLLM chose the {self.nvfp4_backend.value} NVFP4 MoE backend; nvfp4_trtllm files "
                "are laid out for FLASHINFER_TRTLLM (Blackwell SM100/SM103; pass --moe-backend flashinfer_trtllm)"
            )
        if getattr(self, "per_token_activation", False):
            raise EngineRefusalError(
                f"{self.spec.prefix}: per-token NVFP4 activation is not supported by nvfp4_trtllm (the files carry the "
                "static input scales); drop the moe activation override"
            )

    def _dims(self, layer, hidden_size: int, inter_local: int) -> tuple[int, int, RankPart | None]:
        """(H_pad, I_pad) vLLM's TRT-LLM path uses, checked against what the files hold."""
        pc = layer.moe_config.moe_parallel_config
        part = self.spec.part_for(pc.tp_size, pc.tp_rank, pc.ep_size, pc.ep_rank)
        gated = layer.moe_config.is_act_and_mul
        if gated != self.spec.gated:
            raise EngineRefusalError(f"{self.spec.prefix}: the descriptor's activation does not match the model's MoE activation")
        align = trtllm_nvfp4_hidden_alignment(per_token_activation=False, is_act_and_mul=gated)
        h_pad = _round_up(hidden_size, align)
        i_pad = _round_up(inter_local, 64 if gated else 128)
        file_i_pad = part.intermediate_padded if part else self.spec.intermediate_padded
        if hidden_size != self.spec.hidden_size:
            raise EngineRefusalError(f"{self.spec.prefix}: the model's hidden size {hidden_size} is not the converted {self.spec.hidden_size}")
        if self.spec.hidden_padded != h_pad:
            raise EngineRefusalError(
                f"{self.spec.prefix}: vLLM pads the hidden size {hidden_size} to {h_pad} (multiple of {align}) but the "
                f"files hold {self.spec.hidden_padded}: convert with --pad-hidden {align}"
            )
        if file_i_pad != i_pad:
            raise EngineRefusalError(
                f"{self.spec.prefix}: vLLM pads the per-rank intermediate size {inter_local} to {i_pad} but the files hold {file_i_pad}"
            )
        return h_pad, i_pad, part

    def _local_ids(self, layer, part: RankPart | None) -> torch.Tensor:
        """Row of the file tensor for each local expert (EP: experts along dim 0)."""
        e_glob = layer.moe_config.num_experts
        if e_glob != self.spec.num_experts:
            raise EngineRefusalError(f"{self.spec.prefix}: vLLM has {e_glob} experts (redundant experts?), the files {self.spec.num_experts}")
        ids = [layer._map_global_expert_id_to_local_expert_id(g) for g in range(e_glob)]
        local = sorted((loc, g) for g, loc in enumerate(ids) if loc >= 0)
        glob = torch.tensor([g for _, g in local], dtype=torch.long)
        if part is None:
            return glob
        e0, e1 = part.experts
        if glob.tolist() != list(range(e0, e1)):
            raise EngineRefusalError(
                f"{self.spec.prefix}: vLLM places experts {glob.tolist()[:4]}... on this rank but {part.experts} were "
                "converted for it: use the linear expert placement"
            )
        return glob - e0

    def _create_common(self, layer, num_experts: int, hidden_size: int, inter: int, params_dtype, cls_w, cls_s) -> None:
        h_pad, i_pad, part = self._dims(layer, hidden_size, inter)
        n = 2 if self.spec.gated else 1
        loader = _refusing_loader(self.spec.prefix)
        shapes = {
            "w13_weight": ((num_experts, n * i_pad, h_pad // 2), torch.uint8),
            "w2_weight": ((num_experts, h_pad, i_pad // 2), torch.uint8),
            "w13_weight_scale": ((num_experts, n * i_pad, h_pad // GROUP), torch.float8_e4m3fn),
            "w2_weight_scale": ((num_experts, h_pad, i_pad // GROUP), torch.float8_e4m3fn),
        }
        for name, (shape, dtype) in shapes.items():
            layer.register_parameter(name, cls_w(torch.zeros(shape, dtype=dtype), loader))
        for name in ("w13_weight_scale_2", "w2_weight_scale_2"):
            layer.register_parameter(name, cls_s(torch.zeros(num_experts, dtype=torch.float32), loader))
        layer.num_experts = num_experts
        layer.params_dtype = params_dtype
        layer._nvfp4_trtllm = {"part": part, "loaded": False}

    def _copy_kernel_tensors(self, layer, tensors: dict[str, torch.Tensor], rows: torch.Tensor) -> None:
        for name in KERNEL:
            self._copy(layer, name, tensors, name, rows)

    def _copy(self, layer, param_name: str, tensors: dict[str, torch.Tensor], file_name: str, rows: torch.Tensor) -> None:
        if file_name not in tensors:
            raise EngineRefusalError(f"{self.spec.prefix}.{file_name}: missing from the converted files")
        dst = getattr(layer, param_name)
        src = tensors[file_name].index_select(0, rows)
        if src.dtype != dst.dtype and not (src.dtype.is_floating_point and dst.dtype == torch.float32 and src.dim() <= 2):
            raise EngineRefusalError(f"{self.spec.prefix}.{file_name}: dtype {src.dtype}, vLLM's {param_name} is {dst.dtype}")
        if tuple(src.shape) != tuple(dst.shape):
            raise EngineRefusalError(
                f"{self.spec.prefix}.{file_name}: shape {tuple(src.shape)} (this rank's rows), vLLM's {param_name} is {tuple(dst.shape)}"
            )
        dst.data.copy_(src)

    def _check_gate_up_equal(self, scale: torch.Tensor, file_name: str) -> None:
        """vLLM keeps one w13 global scale (the gate's); refuse where the up one differs (bitwise, never rounded)."""
        if scale.dim() == 2 and scale.shape[1] == 2:
            s = scale.to(torch.float32).contiguous()
            bad = (s[:, 0].view(torch.int32) != s[:, 1].view(torch.int32)).nonzero().flatten()
            if bad.numel():
                raise EngineRefusalError(
                    f"{self.spec.prefix}.{file_name}: gate and up global scales differ for expert row(s) {bad.tolist()[:4]}; "
                    "vLLM keeps one (the gate's), so this layer cannot be served exactly"
                )

    def _require_loaded(self, layer) -> None:
        state = getattr(layer, "_nvfp4_trtllm", None)
        if not state or not state["loaded"]:
            raise EngineRefusalError(
                f"{self.spec.prefix}: the converted expert tensors were never loaded: serve with --load-format nvfp4_trtllm"
            )

    def _keep_identity(self, layer, before: dict[str, torch.nn.Parameter]) -> None:
        """vLLM re-registers g1_scale_c (and the clamp/alpha/beta tensors) as new Parameters on every call:
        put the original objects back with the new values (CUDA graphs and RL reloads hold the old ones)."""
        experts = self.moe_kernel.fused_experts
        for name, old in before.items():
            new = layer._parameters.get(name)
            if new is None or new is old:
                continue
            if new.shape != old.shape or new.dtype != old.dtype:
                old.data = new.data
            else:
                old.data.copy_(new.data)
            layer.register_parameter(name, old)
            if getattr(experts, name, None) is new:
                setattr(experts, name, old)

    def _before(self, layer) -> dict[str, torch.nn.Parameter]:
        return {n: layer._parameters[n] for n in _REREGISTERED if layer._parameters.get(n) is not None}

    def refresh_derived_(self, layer) -> None:
        """After an in-place reload of kernel-format tensors (``reload_weights(is_checkpoint_format=False)``):
        recompute, in place, what vLLM derived from them when the kernel was built: a1_gscale = 1/w13_input_scale,
        a2_gscale = 1/w2_input_scale (vLLM's make_nvfp4_moe_quant_config) and g1_scale_c (its
        _compute_g1_scale_c). Without this they keep the old input scales' values."""
        q = self.moe_quant_config
        q.a1_gscale.copy_(1.0 / layer.w13_input_scale)
        q.a2_gscale.copy_(1.0 / layer.w2_input_scale)
        layer.g1_scale_c.data.copy_(self.moe_kernel.fused_experts._compute_g1_scale_c())


class TrtllmModelOptMoE(_TrtllmMoE, ModelOptNvFp4FusedMoE):
    """ModelOpt NVFP4 sources: vLLM's ModelOptNvFp4FusedMoE on its pre-processed-weights path."""

    def __init__(self, quant_config, moe_config, spec: LayerSpec) -> None:
        super().__init__(quant_config, moe_config)
        self.spec = spec
        self._check_backend()

    def create_weights(self, layer, num_experts, hidden_size, intermediate_size_per_partition, params_dtype, **extra):
        def weight(data, loader):
            return ModelWeightParameter(data=data, input_dim=1, output_dim=2, weight_loader=loader)

        def scale(data, loader):
            return PerTensorScaleParameter(data=data, weight_loader=loader)

        self._create_common(layer, num_experts, hidden_size, intermediate_size_per_partition, params_dtype, weight, scale)
        for name in ("w13_input_scale", "w2_input_scale"):
            layer.register_parameter(name, scale(torch.zeros(num_experts, dtype=torch.float32), _refusing_loader(self.spec.prefix)))
        layer.quant_config = self.quant_config

    def load_converted_(self, layer, tensors: dict[str, torch.Tensor], input_maxima: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Put one rank's converted tensors (canonical names without the layer prefix) in place. ``input_maxima``:
        (a1, a2), the float32 maxima of ``w13_input_scale`` / ``w2_input_scale`` over ALL experts (every rank's)."""
        self._check_gate_up_equal(tensors["w13_weight_scale_2"], "w13_weight_scale_2")
        rows = self._local_ids(layer, layer._nvfp4_trtllm["part"])
        self._copy_kernel_tensors(layer, tensors, rows)
        self._copy(layer, "w13_weight_scale_2", tensors, "g1_alphas", rows)
        self._copy(layer, "w2_weight_scale_2", tensors, "g2_alphas", rows)
        a1, a2 = input_maxima
        layer.w13_input_scale.data.copy_(a1.to(torch.float32).reshape(()).repeat(rows.numel()))
        layer.w2_input_scale.data.copy_(a2.to(torch.float32).reshape(()).repeat(rows.numel()))
        layer._nvfp4_trtllm["loaded"] = True

    def process_weights_after_loading(self, layer) -> None:
        self._require_loaded(layer)
        before = self._before(layer)
        with weights_already_processed():
            super().process_weights_after_loading(layer)  # restores padded dims, builds the kernel: no transform
        self._keep_identity(layer, before)


class TrtllmCompressedTensorsMoE(_TrtllmMoE, CompressedTensorsW4A4Nvfp4MoEMethod):
    """compressed-tensors NVFP4 sources: the forward-time state of vLLM's CompressedTensorsW4A4Nvfp4MoEMethod."""

    def __init__(self, moe_config, layer_name: str, spec: LayerSpec) -> None:
        super().__init__(moe_config, layer_name=layer_name)
        self.spec = spec
        self._check_backend()

    def create_weights(self, layer, num_experts, hidden_size, intermediate_size_per_partition, params_dtype, **extra):
        def param(data, loader):
            p = torch.nn.Parameter(data, requires_grad=False)
            p.weight_loader = loader
            return p

        self._create_common(layer, num_experts, hidden_size, intermediate_size_per_partition, params_dtype, param, param)
        n = 2 if self.spec.gated else 1
        loader = _refusing_loader(self.spec.prefix)
        for name in RAW_CT:
            shape = (num_experts, n) if name.startswith("w13") else (num_experts,)
            layer.register_parameter(name, param(torch.zeros(shape, dtype=torch.float32), loader))
        # vLLM's CT method keeps the activation scales as plain tensor attributes, not parameters
        layer.w13_input_scale = torch.zeros(num_experts, dtype=torch.float32)
        layer.w2_input_scale = torch.zeros(num_experts, dtype=torch.float32)

    def load_converted_(self, layer, tensors: dict[str, torch.Tensor], input_maxima=None) -> None:
        """Put one rank's converted tensors in place; vLLM's scalars from the raw global scales of THIS rank's
        experts, with vLLM's own float32 operations (its CT method takes a1/a2 over local experts only)."""
        self._check_gate_up_equal(tensors["w13_weight_global_scale"], "w13_weight_global_scale")
        rows = self._local_ids(layer, layer._nvfp4_trtllm["part"])
        self._copy_kernel_tensors(layer, tensors, rows)
        for name in RAW_CT:
            self._copy(layer, name, tensors, name, rows)
        self.derive_scalars_(layer)
        layer._nvfp4_trtllm["loaded"] = True

    @staticmethod
    def derive_scalars_(layer) -> None:
        """vLLM's CT formulas (process_weights_after_loading + prepare_nvfp4_moe_layer_for_fi_or_cutlass +
        TrtLlmNvFp4Experts), written in place from the raw global-scale parameters."""
        e = layer.w13_weight_global_scale.shape[0]
        a13 = (1.0 / layer.w13_input_global_scale).max().to(torch.float32).repeat(e)
        a2 = (1.0 / layer.w2_input_global_scale).max().to(torch.float32).repeat(e)
        layer.w13_input_scale.copy_(a13)
        layer.w2_input_scale.copy_(a2)
        layer.w13_weight_scale_2.data.copy_((1.0 / layer.w13_weight_global_scale[:, 0].contiguous()) * a13)
        layer.w2_weight_scale_2.data.copy_((1.0 / layer.w2_weight_global_scale) * a2)

    def process_weights_after_loading(self, layer) -> None:
        self._require_loaded(layer)
        before = self._before(layer)
        mc = layer.moe_config
        mc.hidden_dim = layer.w2_weight.shape[1]
        mc.intermediate_size_per_partition = layer.w2_weight.shape[2] * 2
        self.moe_quant_config = self.get_fused_moe_quant_config(layer)
        self.moe_kernel = make_nvfp4_moe_kernel(
            moe_quant_config=self.moe_quant_config,
            moe_config=self.moe,
            experts_cls=self.experts_cls,
            backend=self.nvfp4_backend,
            routing_tables=layer._expert_routing_tables(),
        )
        with weights_already_processed():  # TrtLlmNvFp4Experts: the alphas are already folded
            self.moe_kernel.fused_experts.process_weights_after_loading(layer)
        self._keep_identity(layer, before)

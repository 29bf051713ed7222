"""SGLang plugin: serve nvfp4ckpt's kernel-layout checkpoints with SGLang's flashinfer_trtllm MoE, no re-shuffle.

Loaded by SGLang through the entry-point group ``sglang.srt.plugins`` (``register``). It registers the quantization
method ``nvfp4_trtllm`` (the ``quant_method`` a converted config.json declares):

- every non-MoE layer goes to SGLang's stock config built from ``quantization_config.source_quantization_config``
  (``ModelOptFp4Config`` or ``CompressedTensorsConfig``);
- every MoE layer the descriptor lists gets :class:`Nvfp4TrtllmMoEMethod`: the parameters SGLang's TRT-LLM FP4 runner
  reads, created in the kernel layout, loaded by name with no transform (engine EP slices experts along dim 0;
  ``--tp/--ep`` output is read from ``ranks/rank-NNN/``), and a post-processing that only checks and is idempotent
  (SGLang re-runs it after every weight update). ``apply`` builds SGLang's ``FlashInferTrtllmFp4MoeQuantInfo`` and
  runs SGLang's own runner.

Tested against sglang 0.5.23 (see docs/serving.md).
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any, Iterable

import torch
from torch.nn import Parameter

from sglang.srt.layers.moe import MoeRunner, MoeRunnerBackend, MoeRunnerConfig
from sglang.srt.layers.moe.utils import get_moe_a2a_backend, get_moe_runner_backend
from sglang.srt.layers.quantization.base_config import FusedMoEMethodBase, QuantizationConfig

from ..errors import BadTensorError, InputError, MissingTensorError
from ..layouts.trtllm_gen.converted import ConvertedCheckpoint, open_converted
from ..layouts.trtllm_gen.descriptor import LayerInfo
from ..layouts.trtllm_gen.ranks import RankSpec
from ..layouts.trtllm_gen.transform import LAYOUT_NAME, LAYOUT_VERSION

QUANT_METHOD = "nvfp4_trtllm"

# Families SGLang 0.5.23 itself serves with FusedMoE + the flashinfer_trtllm NVFP4 runner, and whose converted
# output the golden tests compare with SGLang's own processing (tests/test_engine_sglang.py).
SERVED_FAMILIES = ("qwen3_moe", "deepseek_v3", "kimi_k2", "glm4_moe", "mixtral", "qwen2_moe")
# Registered nvfp4ckpt families refused here, with the reason.
REFUSED_FAMILIES = {
    "llama4": "SGLang's Llama-4 MoE applies the router weight on the input and loads fused BMM experts; "
    "its flashinfer_trtllm NVFP4 path is not verified against this layout",
    "qwen3_next": "SGLang's Qwen3-Next/Qwen3.5 MoE wraps experts in its own fused shared-expert path; not verified",
    "minimax_m2": "SGLang's MiniMax-M2 NVFP4 experts go through its own MiniMax quantization path; not verified",
    "nemotron_h": "SGLang's Nemotron-H has non-gated relu2 experts inside hybrid Mamba blocks; its flashinfer_trtllm "
    "path is not verified against this layout",
}

KERNEL_NAMES = ("w13_weight", "w13_weight_scale", "w2_weight", "w2_weight_scale")
FORWARD_SCALARS = ("g1_alphas", "g1_scale_c", "g2_alphas", "w13_input_scale_quant")
STORED_SCALARS = ("w13_weight_scale_2", "w2_weight_scale_2", "w13_input_scale", "w2_input_scale")
CT_GLOBAL_SCALES = ("w13_weight_global_scale", "w2_weight_global_scale", "w13_input_global_scale", "w2_input_global_scale")


def register() -> None:
    """Entry point (``sglang.srt.plugins``): make ``nvfp4_trtllm`` a quantization method SGLang knows."""
    from sglang.srt.arg_groups.choices import QUANTIZATION_CHOICES, add_quantization_method_choices
    from sglang.srt.layers.quantization import QUANTIZATION_METHODS

    QUANTIZATION_METHODS[QUANT_METHOD] = Nvfp4TrtllmConfig
    if QUANT_METHOD not in QUANTIZATION_CHOICES:
        add_quantization_method_choices([QUANT_METHOD])


def check_layout(layout: Any, where: str = "quantization_config.moe_kernel_layout") -> dict:
    """The descriptor, or a one-line refusal when this plugin cannot serve it."""
    if not isinstance(layout, dict):
        raise InputError(f"{where}: missing; this config.json was not written by `nvfp4ckpt convert`")
    if layout.get("layout") != LAYOUT_NAME or not isinstance(layout.get("layout_version"), int):
        raise InputError(f"{where}: layout {layout.get('layout')!r} is not {LAYOUT_NAME!r}; not an nvfp4ckpt checkpoint")
    if layout["layout_version"] > LAYOUT_VERSION:
        raise InputError(f"{where}: layout version {layout['layout_version']} is newer than this nvfp4ckpt ({LAYOUT_VERSION}); upgrade nvfp4ckpt")
    arch = layout.get("architecture")
    if arch in REFUSED_FAMILIES:
        raise InputError(f"{where}: family {arch!r} is not served by the SGLang plugin: {REFUSED_FAMILIES[arch]}")
    if arch not in SERVED_FAMILIES:
        raise InputError(f"{where}: family {arch!r} is not one the SGLang plugin serves ({', '.join(SERVED_FAMILIES)})")
    return layout


def _stock_config(source: Any) -> tuple[QuantizationConfig, str]:
    """SGLang's own config for the source's quantization_config (used for every non-MoE layer)."""
    if not isinstance(source, dict):
        raise InputError("quantization_config.source_quantization_config: missing; convert the checkpoint again")
    method = str(source.get("quant_method", "")).lower()
    if method == "modelopt":
        from sglang.srt.layers.quantization.modelopt_quant import ModelOptFp4Config

        inner = ModelOptFp4Config.from_config(source)
        if not isinstance(inner, ModelOptFp4Config) or not inner.is_checkpoint_nvfp4_serialized or inner.is_w4a16:
            raise InputError(f"source_quantization_config: quant_algo {source.get('quant_algo')!r} is not NVFP4 (W4A4)")
        if inner.use_per_token_activation:
            raise InputError(
                "SGLANG_FLASHINFER_NVFP4_PER_TOKEN_ACTIVATION is set: per-token activation scales change g1/g2 alphas, "
                "which the converted files hold for static scales; unset it"
            )
        return inner, "modelopt"
    if method == "compressed-tensors":
        from sglang.srt.layers.quantization.compressed_tensors.compressed_tensors import CompressedTensorsConfig

        return CompressedTensorsConfig.from_config(source), "compressed-tensors"
    raise InputError(f"source_quantization_config: quant_method {method!r} is not modelopt or compressed-tensors")


class Nvfp4TrtllmConfig(QuantizationConfig):
    """``--quantization nvfp4_trtllm``: the stock source config for dense layers, kernel-layout MoE layers."""

    def __init__(self, inner: QuantizationConfig, source_format: str, layout: dict) -> None:
        super().__init__()
        self.inner = inner
        self.source_format = source_format
        self.layout = layout
        if inner.packed_modules_mapping is None:
            inner.packed_modules_mapping = {}
        self.packed_modules_mapping = inner.packed_modules_mapping  # one dict: models update it in place
        self.checkpoint_root: str | None = None  # default: the served model path (get_server_args().model_path)

    @classmethod
    def get_name(cls) -> str:
        return QUANT_METHOD

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        return [torch.bfloat16, torch.half]

    @classmethod
    def get_min_capability(cls) -> int:
        return 100  # the TRT-LLM-gen fused MoE runs on SM100/SM103 only

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "Nvfp4TrtllmConfig":
        layout = check_layout(config.get("moe_kernel_layout"))
        source = config.get("source_quantization_config")
        if isinstance(source, dict):  # SGLang's loader adds runtime fields to the top level; the stock config reads them
            source = {**source, **{k: config[k] for k in ("packed_modules_mapping", "hf_config") if k in config}}
        inner, fmt = _stock_config(source)
        if fmt != layout.get("source_format"):
            raise InputError(f"quantization_config: source format {fmt!r} differs from the descriptor's {layout.get('source_format')!r}")
        return cls(inner, fmt, layout)

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        from sglang.srt.layers.moe.fused_moe_triton.layer import FusedMoE

        layers = self.layout.get("layers") or {}
        if isinstance(layer, FusedMoE):
            if prefix in layers:
                return Nvfp4TrtllmMoEMethod(self, prefix)
            idx = re.search(r"\.layers\.(\d+)\.", f"{prefix}.")
            twin = next((p for p in layers if idx and f".layers.{idx[1]}." in f"{p}."), None)
            if twin is not None:  # the same decoder layer under another name: its tensors would never arrive
                raise InputError(f"SGLang names MoE layer {prefix!r}, the checkpoint {twin!r}; this model class is not served")
        return self.inner.get_quant_method(layer, prefix)  # dense layers, and MoE layers nvfp4ckpt did not convert

    def can_fuse_shared_expert(self) -> bool:
        return False  # shared experts stay dense source tensors; the kernel-layout expert tensors hold routed ones only

    def get_scaled_act_names(self) -> list[str]:
        return self.inner.get_scaled_act_names()

    def apply_weight_name_mapper(self, hf_to_sglang_mapper) -> None:
        self.inner.apply_weight_name_mapper(hf_to_sglang_mapper)

    def update_packed_modules_mapping(self, mapping: dict[str, list[str]]) -> None:
        self.inner.update_packed_modules_mapping(mapping)
        self.packed_modules_mapping = self.inner.packed_modules_mapping

    def __getattr__(self, name: str) -> Any:  # e.g. exclude_modules, kv_cache_quant_algo, is_layer_excluded
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    @property
    def root(self) -> Path:
        if self.checkpoint_root is not None:
            return Path(self.checkpoint_root)
        from sglang.srt.runtime_context import get_server_args

        return Path(get_server_args().model_path)


class Nvfp4TrtllmMoEMethod(FusedMoEMethodBase):
    """Kernel-layout MoE parameters, loaded by name, never shuffled; ``apply`` runs SGLang's TRT-LLM FP4 runner."""

    def __init__(self, config: Nvfp4TrtllmConfig, prefix: str) -> None:
        self.config = config
        self.prefix = prefix
        layout = config.layout
        gated = layout.get("activation", "swiglu") != "relu2"
        tp = int((layout.get("parallel") or {}).get("tp", 1))
        self.info = LayerInfo.from_dict(prefix, layout["layers"][prefix], gated, tp)
        backend = get_moe_runner_backend()
        if backend.is_flashinfer_trtllm_routed():
            self.backend = MoeRunnerBackend.FLASHINFER_TRTLLM_ROUTED
        elif backend.is_flashinfer_trtllm() or backend.is_auto():
            self.backend = MoeRunnerBackend.FLASHINFER_TRTLLM
        else:
            raise InputError(
                f"{prefix}: --moe-runner-backend {backend.value} cannot run kernel-layout weights; "
                "use --moe-runner-backend flashinfer_trtllm"
            )
        if not get_moe_a2a_backend().is_none():
            raise InputError(f"{prefix}: --moe-a2a-backend {get_moe_a2a_backend().value} is not supported; use the default (none)")
        self.rank: RankSpec | None = None

    # -- creation -------------------------------------------------------------------------------------------------

    def _rank_for(self, layer: torch.nn.Module) -> RankSpec | None:
        """This process's ``ranks/rank-NNN`` (rank = ep_rank * T + tp_rank), or None for unsharded output."""
        t, p = int(layer.moe_tp_size), int(layer.moe_ep_size)
        parallel = self.config.layout.get("parallel") or {}
        if not self.info.ranks:
            if t != 1:
                raise InputError(
                    f"{self.prefix}: converted without --tp, but SGLang runs this MoE layer with tensor parallel size {t}; "
                    f"convert with --tp {t} --ep {p} (a shuffled tensor cannot be re-sliced), or serve with --ep-size equal to --tp-size"
                )
            return None
        ck_tp, ck_ep = int(parallel.get("tp", 1)), int(parallel.get("ep", 1))
        if (t, p) != (ck_tp, ck_ep):
            raise InputError(
                f"{self.prefix}: converted with --tp {ck_tp} --ep {ck_ep}, but SGLang runs this MoE layer with "
                f"tensor parallel {t}, expert parallel {p}; convert again with --tp {t} --ep {p}"
            )
        r = int(layer.moe_ep_rank) * t + int(layer.moe_tp_rank)
        spec = next((s for s in self.info.ranks if s.rank == r), None)
        if spec is None:
            raise InputError(f"{self.prefix}: the descriptor has no rank {r}; convert again with --tp {t} --ep {p}")
        return spec

    def _specs(self, e_loc: int, i_pad: int) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        h_pad, n = self.info.hidden_padded, 2 if self.info.gated else 1
        ct = self.config.source_format == "compressed-tensors"
        specs: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {
            "w13_weight": (torch.uint8, (e_loc, n * i_pad, h_pad // 2)),
            "w13_weight_scale": (torch.float8_e4m3fn, (e_loc, n * i_pad, h_pad // 16)),
            "w2_weight": (torch.uint8, (e_loc, h_pad, i_pad // 2)),
            "w2_weight_scale": (torch.float8_e4m3fn, (e_loc, h_pad, i_pad // 16)),
            "g1_alphas": (torch.float32, (e_loc,)),
            "g1_scale_c": (torch.float32, (e_loc,)),
            "g2_alphas": (torch.float32, (e_loc,)),
            # SGLang's ModelOpt path holds 1/a1 0-dim; its compressed-tensors path one copy per local expert
            "w13_input_scale_quant": (torch.float32, (e_loc,) if ct else ()),
            "w13_weight_scale_2": (torch.float32, (e_loc, n)),
            "w2_weight_scale_2": (torch.float32, (e_loc,)),
            "w13_input_scale": (torch.float32, (e_loc, n)),
            "w2_input_scale": (torch.float32, (e_loc,)),
        }
        if ct:
            dtype = torch.bfloat16 if self.info.scalar_dtype == "BF16" else torch.float32
            specs.update({
                "w13_weight_global_scale": (dtype, (e_loc, n)), "w2_weight_global_scale": (dtype, (e_loc,)),
                "w13_input_global_scale": (dtype, (e_loc, n)), "w2_input_global_scale": (dtype, (e_loc,)),
            })  # fmt: skip
        return specs

    def create_weights(
        self, layer: torch.nn.Module, num_experts: int, hidden_size: int, intermediate_size_per_partition: int,
        params_dtype: torch.dtype, **extra_weight_attrs: Any,
    ) -> None:  # fmt: skip
        info, cfg = self.info, layer.moe_runner_config
        where = self.prefix
        if getattr(layer, "num_fused_shared_experts", 0):
            raise InputError(f"{where}: fused shared experts are not in the kernel-layout tensors; serve with --disable-shared-experts-fusion")
        if bool(cfg.is_gated) != info.gated:
            raise InputError(f"{where}: SGLang builds a {'gated' if cfg.is_gated else 'non-gated'} MoE, the checkpoint is {'gated' if info.gated else 'non-gated'}")
        if cfg.activation not in (("silu",) if info.gated else ("relu2",)):
            raise InputError(f"{where}: activation {cfg.activation!r} is not the checkpoint's ({'silu' if info.gated else 'relu2'})")
        if cfg.gemm1_alpha is not None or cfg.gemm1_clamp_limit is not None or cfg.swiglu_limit is not None:
            raise InputError(f"{where}: SwiGLU alpha/limit models rescale w13 block scales at load; not representable in the converted files")
        if hidden_size != info.hidden_size:
            raise InputError(f"{where}: SGLang's hidden size {hidden_size} differs from the checkpoint's {info.hidden_size}")
        moe_i = extra_weight_attrs.get("moe_intermediate_size")
        if moe_i is not None and int(moe_i) != info.intermediate_size:
            raise InputError(f"{where}: SGLang's MoE intermediate size {moe_i} differs from the checkpoint's {info.intermediate_size}")
        self.rank = self._rank_for(layer)
        p = int(layer.moe_ep_size)
        e_loc = self.rank.num_experts if self.rank else info.num_experts // p
        if info.num_experts % p or num_experts != e_loc:
            raise InputError(f"{where}: {info.num_experts} experts over expert parallel {p} gives {info.num_experts / p:g} per rank, SGLang asks {num_experts}")
        i_pad = self.rank.intermediate_padded if self.rank else info.intermediate_padded
        self.e0 = self.rank.expert_start if self.rank else int(layer.moe_ep_rank) * e_loc
        self.e_loc = e_loc
        # The sizes the runner reads (FusedMoE rounds I up to 128 for non-ModelOpt methods before create_weights).
        layer.intermediate_size_per_partition = i_pad
        cfg.intermediate_size_per_partition = i_pad
        layer.trtllm_padded_hidden_size = info.hidden_padded if info.hidden_padded != info.hidden_size else None
        layer.params_dtype = params_dtype
        layer._nvfp4ckpt_loaded = set()
        for name, (dtype, shape) in self._specs(e_loc, i_pad).items():
            param = Parameter(torch.zeros(shape, dtype=dtype), requires_grad=False)
            param.weight_loader = functools.partial(self._load, layer, name)  # the model's load_weights calls it by name
            layer.register_parameter(name, param)

    # -- loading ----------------------------------------------------------------------------------------------------

    def _load(self, layer: torch.nn.Module, name: str, param: Parameter, loaded: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        """Copy one converted tensor into its parameter: bytes only, experts sliced for engine EP."""
        where = f"{self.prefix}.{name}"
        if name == "w13_input_scale_quant":
            if loaded.numel() != 1 or loaded.dtype != torch.float32:
                raise BadTensorError(f"{where}: expected one float32 value, got {loaded.dtype} {tuple(loaded.shape)}")
            param.data.copy_(loaded.reshape(()).expand(param.shape))
        else:
            if self.rank is None and loaded.dim() and loaded.shape[0] == self.info.num_experts != self.e_loc:
                loaded = loaded[self.e0 : self.e0 + self.e_loc]  # engine EP on unsharded output: experts are dim 0
            if tuple(loaded.shape) != tuple(param.shape) or loaded.dtype != param.dtype:
                raise BadTensorError(
                    f"{where}: checkpoint has {loaded.dtype} {tuple(loaded.shape)}, this rank needs {param.dtype} {tuple(param.shape)}; "
                    "convert again for this --tp/--ep"
                )
            param.data.view(torch.uint8).copy_(loaded.contiguous().view(torch.uint8))
        layer._nvfp4ckpt_loaded.add(name)

    def _load_rank_files(self, layer: torch.nn.Module) -> None:
        """``--tp/--ep`` output keeps MoE tensors under ``ranks/rank-NNN/``, which SGLang's loader does not read."""
        ckpt = open_converted(self.config.root)
        info = ckpt.layer(self.prefix)
        spec = next(s for s in info.ranks if s.rank == self.rank.rank)
        tensors = ckpt.read_layer(info, rank=spec)
        params = dict(layer.named_parameters(recurse=False))
        for name, t in tensors.items():
            if name in params:
                self._load(layer, name, params[name], t)
        layer._nvfp4ckpt_maxima = _global_maxima(ckpt, info)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        """Idempotent: loads ``ranks/`` output the first time, checks completeness; never moves a byte of a loaded layer."""
        params = dict(layer.named_parameters(recurse=False))
        required = set(self._specs(1, 1))
        if self.rank is not None and not (layer._nvfp4ckpt_loaded & set(KERNEL_NAMES)):
            self._load_rank_files(layer)
        missing = sorted(required - layer._nvfp4ckpt_loaded)
        if missing:
            raise MissingTensorError(
                f"{self.config.root}: {self.prefix}.{missing[0]} was not loaded ({len(missing)} missing); "
                "is this the folder `nvfp4ckpt convert` wrote?"
            )
        if not hasattr(layer, "_nvfp4ckpt_maxima"):
            layer._nvfp4ckpt_maxima = (
                float(params["w13_input_scale"].max()), float(params["w2_input_scale"].max()),
            ) if self.rank is None and self.e_loc == self.info.num_experts else None  # fmt: skip
        if getattr(layer, "dispatcher", None) is not None:
            layer.dispatcher.set_quant_config({"input_global_scale": None})  # no FP4 dispatch (a2a backend is none)

    # -- running -----------------------------------------------------------------------------------------------------

    def create_moe_runner(self, layer: torch.nn.Module, moe_runner_config: MoeRunnerConfig) -> None:
        import sglang.srt.layers.moe.moe_runner.flashinfer_trtllm  # noqa: F401  (registers the fused function)

        self.moe_runner_config = moe_runner_config
        self.runner = MoeRunner(self.backend, moe_runner_config)

    def get_moe_runner_backend(self, layer: torch.nn.Module):
        return self.backend

    def quant_info(self, layer: torch.nn.Module):
        """The payload SGLang's flashinfer_trtllm FP4 runner takes, from this layer's kernel-layout parameters."""
        from sglang.srt.layers.moe.moe_runner.flashinfer_trtllm import FlashInferTrtllmFp4MoeQuantInfo
        from sglang.srt.layers.moe.utils import RoutingMethodType

        a1_quant = layer.w13_input_scale_quant
        return FlashInferTrtllmFp4MoeQuantInfo(
            w13_weight=layer.w13_weight.data,
            w2_weight=layer.w2_weight.data,
            w13_weight_scale=layer.w13_weight_scale.data,
            w2_weight_scale=layer.w2_weight_scale.data,
            g1_scale_c=layer.g1_scale_c.data,
            g1_alphas=layer.g1_alphas.data,
            g2_alphas=layer.g2_alphas.data,
            w13_input_scale_quant=a1_quant[:1] if a1_quant.dim() else a1_quant,  # the kernel takes one value
            global_num_experts=layer.num_experts,
            local_expert_offset=layer.moe_ep_rank * layer.num_local_experts,
            local_num_experts=layer.num_local_experts,
            intermediate_size_per_partition=layer.intermediate_size_per_partition,
            routing_method_type=getattr(layer, "routing_method_type", RoutingMethodType.Default),  # None: the runner uses Default
            use_per_token_activation=False,
            padded_hidden_size=layer.trtllm_padded_hidden_size,
        )

    def apply(self, layer: torch.nn.Module, dispatch_output):
        return self.runner.run(dispatch_output, self.quant_info(layer))


def _global_maxima(ckpt: ConvertedCheckpoint, info: LayerInfo) -> tuple[float, float]:
    """a1/a2 (max input scales over every expert of the layer), from every rank's scalar tensors."""
    a1 = a2 = 0.0
    for r in info.ranks:
        files = ckpt.files_for(r)
        a1 = max(a1, float(files.read_to(f"{info.prefix}.w13_input_scale", "cpu").max()))
        a2 = max(a2, float(files.read_to(f"{info.prefix}.w2_input_scale", "cpu").max()))
    return a1, a2


# ----------------------------------------------------------------------------------------------------------------------
# RL weight updates


def _moe_layers(model: torch.nn.Module) -> dict[str, tuple[torch.nn.Module, Nvfp4TrtllmMoEMethod]]:
    return {
        m.quant_method.prefix: (m, m.quant_method)
        for m in model.modules()
        if isinstance(getattr(m, "quant_method", None), Nvfp4TrtllmMoEMethod)
    }


def load_weights(model: torch.nn.Module, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """``--custom-weight-loader nvfp4ckpt.engines.sglang.load_weights``: route SOURCE-named expert tensors into the
    live kernel-layout parameters in place (``nvfp4ckpt.runtime.update.update_live_``), everything else to ``model.load_weights``.

    Use it as ``update_weights_from_tensor(named_tensors, load_format="nvfp4ckpt.engines.sglang.load_weights")``
    between ``begin_weight_update`` and ``end_weight_update``: the post-processing SGLang runs at the end is idempotent.
    """
    from ..runtime.update import update_live_  # noqa: PLC0415  (only the RL path needs it)

    named = dict(named_tensors)
    layers = _moe_layers(model)
    if not layers:
        model.load_weights(list(named.items()))
        return
    any_method = next(iter(layers.values()))[1]
    ranks = {m.rank.rank if m.rank else None for _, m in layers.values()}
    if len(ranks) != 1:
        raise InputError("MoE layers of this process hold different ranks; cannot update them in one call")
    for prefix, (layer, method) in layers.items():
        if method.rank is None and method.e_loc != method.info.num_experts:
            raise InputError(f"{prefix}: RL updates under SGLang expert parallelism need `nvfp4ckpt convert --ep` output")
    live: dict[str, torch.Tensor] = {}
    ct = any_method.config.source_format == "compressed-tensors"
    for prefix, (layer, method) in layers.items():
        params = dict(layer.named_parameters(recurse=False))
        names = KERNEL_NAMES + STORED_SCALARS + (CT_GLOBAL_SCALES if ct else FORWARD_SCALARS[:3])
        live.update({f"{prefix}.{n}": params[n].data for n in names})
        if not ct:
            live[f"{prefix}.w13_input_scale_quant"] = params["w13_input_scale_quant"].data.view(1)  # same storage
    report = update_live_(
        live, named, any_method.config.layout, rank=ranks.pop(), input_scale_maxima=input_scale_maxima(model),
        ignore_unknown=True,
    )  # fmt: skip
    for prefix, upd in report.layers.items():
        layer, method = layers[prefix]
        layer._nvfp4ckpt_maxima = tuple(upd.input_scale_maxima)
        if ct:  # SGLang's compressed-tensors forms: written from the recomputed canonical scalars
            _write_ct_scalars(layer, upd)
    rest = [(n, named[n]) for n in report.ignored]
    if rest:
        model.load_weights(rest)


def _write_ct_scalars(layer: torch.nn.Module, upd: Any) -> None:
    rows = torch.tensor(upd.scalar_rows, dtype=torch.long)
    if not len(rows):
        return
    for name in ("g1_alphas", "g1_scale_c", "g2_alphas"):
        getattr(layer, name).data[rows] = upd.scalars[name].to(torch.float32)
    layer.w13_input_scale_quant.data.fill_(float(upd.scalars["w13_input_scale_quant"].reshape(-1)[0]))


def live_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Canonical full name -> live tensor (same storage) of every kernel-layout MoE parameter, in the canonical shapes
    (``w13_input_scale_quant`` as ``[1]``), for ``nvfp4ckpt.runtime.update.check_live_``."""
    out: dict[str, torch.Tensor] = {}
    for prefix, (layer, _) in _moe_layers(model).items():
        for name, p in layer.named_parameters(recurse=False):
            t = p.data
            if name == "w13_input_scale_quant":
                t = t.view(1) if t.dim() == 0 else t[:1]  # SGLang's forms: 0-dim, or one copy per local expert
            out[f"{prefix}.{name}"] = t
    return out


def input_scale_maxima(model: torch.nn.Module) -> dict[str, tuple[float, float]]:
    """prefix -> (a1, a2) the live scalars were computed with (for ``check_live_``/``update_live_`` on one rank)."""
    return {p: l._nvfp4ckpt_maxima for p, (l, _) in _moe_layers(model).items() if l._nvfp4ckpt_maxima is not None}

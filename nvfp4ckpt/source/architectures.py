"""Per-architecture adapters: how experts are named and how tokens are routed.

A new MoE family is one ``register(Architecture(...))`` call. Routing is recorded by name
(FlashInfer's ``RoutingMethodType`` member name), never by number: the numbers changed between
FlashInfer versions.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Callable

from ..errors import BadFieldError, UnsupportedArchitectureError
from ..io.json_input import Fields

ROLES = ("gate", "up", "down")
ACTIVATIONS = {"silu": True, "relu2": False}  # activation -> gated (SwiGLU [up ; gate]) or not (up only)


def expert_roles(gated: bool) -> tuple[str, ...]:
    """Projections every expert has, in the order of the source scalar columns."""
    return ROLES if gated else ("up", "down")


@dataclass(frozen=True)
class Routing:
    """How a layer picks experts (what the fused kernel needs besides the weights)."""

    method: str  # FlashInfer RoutingMethodType member name, e.g. "RenormalizeNaive", "DeepSeekV3"
    top_k: int
    num_experts: int
    n_group: int | None = None
    topk_group: int | None = None
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    bias_suffix: str | None = None  # name of the router's correction bias relative to the MoE block

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ModelNames:
    """Where a family's tensors live (used to write its example checkpoint and in ``inspect``)."""

    layers: str = "model.layers"  # decoder layers
    block: str = "mlp"  # the MoE block inside a layer
    projections: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # gate, up, down ("" = none)
    router: str = "gate"  # router module inside the block (its .weight is bf16)
    shared_expert: str | None = None  # shared expert module inside the block
    shared_expert_gate: str | None = None  # Qwen2-MoE/Qwen3-Next: sigmoid gate on the shared expert
    attention: str = "self_attn"  # attention module inside a layer ("" for hybrid mixers)
    attention_kind: str = "gqa"  # "gqa", "gqa_qk_norm" (per head), "gqa_full_qk_norm" (over all heads) or "mla"
    qkv_bias: bool = False  # Qwen2-MoE's q/k/v projections have biases
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"


@dataclass(frozen=True)
class Architecture:
    """Naming and routing of one model family.

    ``expert_pattern`` must match a per-expert module name and capture ``prefix`` (up to and
    including ``.experts``), ``expert`` and ``proj``; ``projections`` maps each on-disk
    projection name to its role (several spellings may map to one role).
    """

    name: str
    model_types: tuple[str, ...]
    expert_pattern: str
    projections: dict[str, str]
    router_suffix: str  # router weight relative to the MoE block (prefix without ".experts")
    routing: Callable[[dict], Routing]
    description: str = ""
    example_config: Callable[[], dict] = field(default=lambda: {}, repr=False)
    activation: str = "silu"  # a key of ACTIVATIONS; "relu2" experts have up and down only
    names: ModelNames = ModelNames()
    # Fused ("BMM") experts: all experts of a layer in one tensor per projection, input-major, as ModelOpt exports
    # Llama-4: ``<prefix>.gate_up_proj`` U8 [E, H/2, 2I] ([gate | up] along the last dim), ``<prefix>.down_proj``
    # U8 [E, I/2, H], each with ``_weight_scale`` (same layout) and one ``_weight_scale_2``/``_input_scale``.
    # Must capture ``prefix`` (up to and including ``.experts``).
    fused_prefix_pattern: str | None = None
    # decoder layer index -> "moe" | "dense" | "mamba" | "attention" | "mlp" (for examples; default: all MoE)
    layer_kinds: Callable[[dict], list[str]] = field(default=lambda cfg: _all_moe(cfg), repr=False)
    # Hints for loaders built on transformers (eval.model_runner, engine plugins):
    hf_model_type: str | None = None  # the model_type transformers knows this family under, when it differs
    # transformers-in-memory name fragment -> on-disk fragment (used only when the first spelling is absent)
    hf_renames: tuple[tuple[str, str], ...] = ()
    # Why the transformers-based model runner (verify --gsm8k) cannot run this family, if it cannot.
    runner_unsupported: str | None = None
    # The config field holding one expert's intermediate size (checked against the tensors when present).
    expert_intermediate_key: str = "moe_intermediate_size"
    # The config fields ``layer_kinds`` reads to say which decoder layers are MoE (named when they disagree with the
    # tensors); num_hidden_layers is always checked as well.
    layer_kind_fields: tuple[str, ...] = ()

    @property
    def gated(self) -> bool:
        return ACTIVATIONS[self.activation]

    @property
    def roles(self) -> tuple[str, ...]:
        return expert_roles(self.gated)

    @property
    def regex(self) -> re.Pattern[str]:
        return re.compile(self.expert_pattern)

    def match_expert(self, module: str) -> tuple[str, int, str] | None:
        """``model.layers.3.mlp.experts.7.up_proj`` -> (``model.layers.3.mlp.experts``, 7, "up")."""
        m = self.regex.fullmatch(module)
        if m is None or m["proj"] not in self.projections:
            return None
        return m["prefix"], int(m["expert"]), self.projections[m["proj"]]


_REGISTRY: dict[str, Architecture] = {}


def register(arch: Architecture) -> Architecture:
    _REGISTRY[arch.name] = arch
    return arch


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def registered() -> list[Architecture]:
    return list(_REGISTRY.values())


def for_config(config: dict, where: str = "config.json") -> Architecture:
    """The adapter for a model config (by ``model_type``), or a clear error."""
    model_type = config.get("model_type")
    text_config = config.get("text_config")
    candidates = [model_type]
    if isinstance(text_config, dict):
        candidates.append(text_config.get("model_type"))
    for arch in _REGISTRY.values():
        if any(isinstance(c, str) and c in arch.model_types for c in candidates):
            return arch
    known = ", ".join(sorted(t for a in _REGISTRY.values() for t in a.model_types))
    raise UnsupportedArchitectureError(
        f"{where}: model_type {model_type!r} is not supported (supported: {known}); "
        "add an Architecture entry in nvfp4ckpt/source/architectures.py for it"
    )


def describe(arch: Architecture) -> dict:
    """What ``inspect --families`` shows: names, model types, activation, routing and the expert tensor names."""
    cfg = arch.example_config()
    text = cfg.get("text_config", cfg) if isinstance(cfg.get("text_config"), dict) else cfg
    try:
        method = arch.routing(text).method
    except (KeyError, TypeError, ValueError, BadFieldError):
        method = None
    n = arch.names
    projs = ",".join(p for p in n.projections if p)
    return {
        "name": arch.name,
        "model_types": list(arch.model_types),
        "activation": arch.activation,
        "routing": method,
        "experts": f"{n.layers}.{{L}}.{n.block}.experts.{{e}}.{{{projs}}}",
        "router": f"{n.layers}.{{L}}.{n.block}.{arch.router_suffix}",
        "description": arch.description,
    }


def diagnose(model_type: str | None, tensor_names: list[str]) -> str:
    """For an unsupported model_type: which registered family its expert tensors look like (if any)."""
    modules = sorted({n.rpartition(".")[0] for n in tensor_names if ".experts." in n})
    if not modules:
        return "no tensor name contains '.experts.'; is this a MoE checkpoint with per-expert tensors?"
    like = [a.name for a in _REGISTRY.values() if a.match_expert(modules[0]) is not None]
    if like:
        return (
            f"its expert tensors (e.g. {modules[0]}) follow {like[0]}'s naming: if the model is otherwise the same, add "
            f"{model_type!r} to that entry's model_types; otherwise register an Architecture for it"
        )
    return f"its expert tensors (e.g. {modules[0]}) match no registered naming; register an Architecture for it"


def get(name: str) -> Architecture:
    """A family by its name or by any transformers ``model_type`` it covers (``llama4_text`` is ``llama4``)."""
    arch = _REGISTRY.get(name) or next((a for a in _REGISTRY.values() if name in a.model_types), None)
    if arch is None:
        known = ", ".join(sorted({n for a in _REGISTRY.values() for n in (a.name, *a.model_types)}))
        raise UnsupportedArchitectureError(f"unknown architecture {name!r}; choose a family or model_type: {known}")
    return arch


# ----------------------------------------------------------------------------------------------
# Built-in families

def _experts_of(block: str) -> str:
    """``expert_pattern`` for per-expert modules ``<...>.<block>.experts.<e>.<proj>``."""
    return rf"(?P<prefix>.+\.{re.escape(block)}\.experts)\.(?P<expert>\d+)\.(?P<proj>[a-z0-9_]+)"


_MLP_EXPERTS = _experts_of("mlp")
_GATE_UP_DOWN = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}


# Routing and layer kinds read the config through typed accessors (io.json_input.Fields): a string "false",
# a NaN, 0 or a float where a count belongs is a one-line BadFieldError naming config.json and the field.
_MAX_EXPERTS = 1 << 16
_MAX_LAYERS = 1 << 16


def fields(cfg: "dict | Fields", where: str = "config.json") -> Fields:
    return cfg if isinstance(cfg, Fields) else Fields(cfg, where)


def _top_k(f: Fields) -> int:
    return f.int("num_experts_per_tok", lo=1, hi=_MAX_EXPERTS)


def _experts(f: Fields, key: str) -> int:
    return f.int(key, lo=1, hi=_MAX_EXPERTS)


def _scaling(f: Fields) -> float:
    # 0/false used to be taken as 1.0 silently (``or 1.0``); NaN/Infinity/"nan" reached config.json as bare NaN.
    return f.num("routed_scaling_factor", 1.0, above=0.0, hi=1e6)


def _qwen3_routing(cfg: "dict | Fields") -> Routing:
    f = fields(cfg)
    norm = f.bool("norm_topk_prob", True)
    return Routing(
        method="RenormalizeNaive" if norm else "Default",
        top_k=_top_k(f),
        # transformers >= 5.2x writes Qwen3-MoE's expert count as num_local_experts
        num_experts=_experts(f, "num_experts" if f.has("num_experts") else "num_local_experts"),
        norm_topk_prob=norm,
    )


def _deepseek_routing(cfg: "dict | Fields") -> Routing:
    f = fields(cfg)
    num_experts = _experts(f, "n_routed_experts")
    n_group = f.int("n_group", 1, lo=1, hi=num_experts)
    if num_experts % n_group:
        f.fail("n_group", n_group, f"a divisor of n_routed_experts ({num_experts}): experts are split into equal groups")
    return Routing(
        method="DeepSeekV3",
        top_k=_top_k(f),
        num_experts=num_experts,
        n_group=n_group,
        topk_group=f.int("topk_group", 1, lo=1, hi=n_group),
        routed_scaling_factor=_scaling(f),
        norm_topk_prob=f.bool("norm_topk_prob", True),
        bias_suffix="gate.e_score_correction_bias",
    )


def _qwen2_routing(cfg: "dict | Fields") -> Routing:
    # Qwen1.5/Qwen2-MoE default to norm_topk_prob=False (transformers' Qwen2MoeConfig)
    f = fields(cfg)
    return _qwen3_routing(Fields({"norm_topk_prob": False, **f.data}, f.where, f.at))


def _minimax_m2_routing(cfg: "dict | Fields") -> Routing:
    # sigmoid scores, selection on scores + e_score_correction_bias, weights renormalized (FlashInfer MiniMax2)
    f = fields(cfg)
    return Routing(
        method="MiniMax2",
        top_k=_top_k(f),
        num_experts=_experts(f, "num_local_experts"),
        routed_scaling_factor=_scaling(f),
        bias_suffix="e_score_correction_bias",
    )


def _llama4_routing(cfg: "dict | Fields") -> Routing:
    # top-1 on the logits, sigmoid of the chosen logit, applied to the expert's *input* (FlashInfer Llama4)
    f = fields(cfg)
    return Routing(
        method="Llama4",
        top_k=_top_k(f),
        num_experts=_experts(f, "num_local_experts"),
        norm_topk_prob=False,
    )


def _mixtral_routing(cfg: "dict | Fields") -> Routing:
    f = fields(cfg)
    return Routing(
        method="Renormalize",
        top_k=_top_k(f),
        num_experts=_experts(f, "num_local_experts"),
    )


def _num_layers(f: Fields) -> int:
    return f.int("num_hidden_layers", lo=1, hi=_MAX_LAYERS)


def _all_moe(cfg: "dict | Fields") -> list[str]:
    return ["moe"] * _num_layers(fields(cfg))


def _qwen_layer_kinds(cfg: "dict | Fields") -> list[str]:
    f = fields(cfg)
    step = f.int("decoder_sparse_step", 1, lo=1)
    dense = set(f.int_list("mlp_only_layers", []))
    n = _num_layers(f)
    return ["dense" if i in dense or (i + 1) % step else "moe" for i in range(n)]


def _first_k_dense(cfg: "dict | Fields") -> list[str]:
    f = fields(cfg)
    k = f.int("first_k_dense_replace", 0, lo=0)
    return ["dense" if i < k else "moe" for i in range(_num_layers(f))]


def _llama4_layer_kinds(cfg: "dict | Fields") -> list[str]:
    f = fields(cfg)
    step = f.int("interleave_moe_layer_step", 1, lo=1)
    return ["moe" if (i + 1) % step == 0 else "dense" for i in range(_num_layers(f))]


_HYBRID_KINDS = {"M": "mamba", "E": "moe", "*": "attention", "-": "mlp"}


def _nemotron_h_layer_kinds(cfg: "dict | Fields") -> list[str]:
    f = fields(cfg)
    pattern = f.str("hybrid_override_pattern")
    if len(pattern) > _MAX_LAYERS or set(pattern) - set(_HYBRID_KINDS):
        f.fail("hybrid_override_pattern", pattern, "a string of " + "".join(_HYBRID_KINDS))
    return [_HYBRID_KINDS[c] for c in pattern]


_TINY_COMMON = {
    "hidden_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "vocab_size": 512,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "bos_token_id": 1,
    "eos_token_id": 2,
}

QWEN3_MOE = register(
    Architecture(
        name="qwen3_moe",
        model_types=("qwen3_moe",),
        expert_pattern=_MLP_EXPERTS,
        projections=_GATE_UP_DOWN,
        router_suffix="gate.weight",
        routing=_qwen3_routing,
        description="Qwen3-MoE: every layer MoE, softmax top-k renormalized, no shared expert",
        names=ModelNames(attention_kind="gqa_qk_norm"),
        layer_kinds=_qwen_layer_kinds,
        layer_kind_fields=("mlp_only_layers", "decoder_sparse_step"),
        example_config=lambda: {
            **_TINY_COMMON,
            "architectures": ["Qwen3MoeForCausalLM"],
            "model_type": "qwen3_moe",
            "intermediate_size": 512,
            "moe_intermediate_size": 128,
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "norm_topk_prob": True,
            "num_key_value_heads": 2,
            "head_dim": 64,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "rope_theta": 1000000.0,
        },
    )
)

# The MoE part of the DeepSeek-V3-style tiny examples (DeepSeek-V3, GLM-4 MoE, and Kimi-K2 through DeepSeek-V3's):
# one dense first layer, then routed + shared experts with grouped sigmoid routing.
_DEEPSEEK_STYLE_MOE = {
    "num_hidden_layers": 3,
    "first_k_dense_replace": 1,
    "intermediate_size": 512,
    "moe_intermediate_size": 128,
    "n_routed_experts": 8,
    "n_shared_experts": 1,
    "num_experts_per_tok": 2,
    "n_group": 2,
    "topk_group": 1,
    "routed_scaling_factor": 2.5,
    "norm_topk_prob": True,
}

DEEPSEEK_V3 = register(
    Architecture(
        name="deepseek_v3",
        model_types=("deepseek_v3",),
        expert_pattern=_MLP_EXPERTS,
        projections=_GATE_UP_DOWN,
        router_suffix="gate.weight",
        routing=_deepseek_routing,
        description="DeepSeek-V3/R1: dense first layers, shared experts, sigmoid grouped top-k with correction bias",
        names=ModelNames(shared_expert="shared_experts", attention_kind="mla"),
        layer_kinds=_first_k_dense,
        layer_kind_fields=("first_k_dense_replace",),
        example_config=lambda: {
            **_TINY_COMMON,
            "architectures": ["DeepseekV3ForCausalLM"],
            "model_type": "deepseek_v3",
            **_DEEPSEEK_STYLE_MOE,
            # as DeepSeek-V3's (and Kimi-K2's) config.json: vLLM builds the router's e_score_correction_bias only
            # for noaux_tc, and routes with softmax unless scoring_func says sigmoid
            "topk_method": "noaux_tc",
            "scoring_func": "sigmoid",
            "num_key_value_heads": 4,
            "q_lora_rank": 64,
            "kv_lora_rank": 64,
            "qk_rope_head_dim": 32,
            "qk_nope_head_dim": 32,
            "v_head_dim": 32,
            "rope_theta": 10000.0,
        },
    )
)

MIXTRAL = register(
    Architecture(
        name="mixtral",
        model_types=("mixtral",),
        hf_renames=((".mlp.", ".block_sparse_moe."),),
        expert_pattern=_experts_of("block_sparse_moe"),
        # w1 = gate, w3 = up, w2 = down; llm-compressor renames them to gate/up/down_proj.
        projections={"w1": "gate", "w3": "up", "w2": "down", **_GATE_UP_DOWN},
        router_suffix="gate.weight",
        routing=_mixtral_routing,
        description="Mixtral: block_sparse_moe.experts.{w1,w3,w2}, softmax top-k renormalized",
        expert_intermediate_key="intermediate_size",
        names=ModelNames(block="block_sparse_moe", projections=("w1", "w3", "w2")),
        example_config=lambda: {
            **_TINY_COMMON,
            "architectures": ["MixtralForCausalLM"],
            "model_type": "mixtral",
            "intermediate_size": 128,
            "num_local_experts": 8,
            "num_experts_per_tok": 2,
            "num_key_value_heads": 2,
            "head_dim": 64,
            "rope_theta": 1000000.0,
            "sliding_window": None,
        },
    )
)

QWEN2_MOE = register(
    Architecture(
        name="qwen2_moe",
        model_types=("qwen2_moe",),
        expert_pattern=_MLP_EXPERTS,
        projections=_GATE_UP_DOWN,
        router_suffix="gate.weight",
        routing=_qwen2_routing,
        description="Qwen1.5/Qwen2-MoE: softmax top-k (renormalized only with norm_topk_prob), shared expert with a sigmoid gate",
        names=ModelNames(shared_expert="shared_expert", shared_expert_gate="shared_expert_gate", qkv_bias=True),
        layer_kinds=_qwen_layer_kinds,
        layer_kind_fields=("mlp_only_layers", "decoder_sparse_step"),
        example_config=lambda: {
            **_TINY_COMMON,
            "architectures": ["Qwen2MoeForCausalLM"],
            "model_type": "qwen2_moe",
            "intermediate_size": 512,
            "moe_intermediate_size": 128,
            "shared_expert_intermediate_size": 256,
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "norm_topk_prob": False,
            "num_key_value_heads": 2,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "rope_theta": 1000000.0,
        },
    )
)

QWEN3_NEXT = register(
    Architecture(
        name="qwen3_next",
        # Qwen3.5 MoE (top level qwen3_5_moe, text model qwen3_5_moe_text, tensors under model.language_model.)
        # has the same experts, shared expert and routing
        model_types=("qwen3_next", "qwen3_5_moe", "qwen3_5_moe_text"),
        expert_pattern=_MLP_EXPERTS,
        projections=_GATE_UP_DOWN,
        router_suffix="gate.weight",
        routing=_qwen3_routing,
        description="Qwen3-Next / Qwen3.5 MoE: hybrid linear/full attention, many experts renormalized, gated shared expert",
        names=ModelNames(shared_expert="shared_expert", shared_expert_gate="shared_expert_gate", attention_kind="gqa_qk_norm"),
        layer_kinds=_qwen_layer_kinds,
        layer_kind_fields=("mlp_only_layers", "decoder_sparse_step"),
        example_config=lambda: {
            **_TINY_COMMON,
            "architectures": ["Qwen3NextForCausalLM"],
            "model_type": "qwen3_next",
            "intermediate_size": 512,
            "moe_intermediate_size": 128,
            "shared_expert_intermediate_size": 128,
            "num_experts": 16,
            "num_experts_per_tok": 4,
            "norm_topk_prob": True,
            "num_key_value_heads": 2,
            "head_dim": 64,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "full_attention_interval": 4,
            "rope_theta": 10000000.0,
        },
    )
)

GLM4_MOE = register(
    Architecture(
        name="glm4_moe",
        model_types=("glm4_moe",),
        expert_pattern=_MLP_EXPERTS,
        projections=_GATE_UP_DOWN,
        router_suffix="gate.weight",
        routing=_deepseek_routing,
        description="GLM-4.5/4.6/4.7: DeepSeek-V3-style MoE (sigmoid + correction bias, shared expert, dense first layers), GQA attention",
        names=ModelNames(shared_expert="shared_experts", attention_kind="gqa"),
        layer_kinds=_first_k_dense,
        layer_kind_fields=("first_k_dense_replace",),
        example_config=lambda: {
            **_TINY_COMMON,
            "architectures": ["Glm4MoeForCausalLM"],
            "model_type": "glm4_moe",
            **_DEEPSEEK_STYLE_MOE,
            "n_group": 1,  # a later key keeps the first one's place: same config.json key order
            "num_key_value_heads": 2,
            "head_dim": 64,
            "partial_rotary_factor": 0.5,
            "use_qk_norm": False,
            "rope_theta": 1000000.0,
        },
    )
)

KIMI_K2 = register(
    Architecture(
        name="kimi_k2",
        model_types=("kimi_k2",),
        hf_model_type="deepseek_v3",  # transformers knows Kimi-K2 as DeepSeek-V3
        expert_pattern=_MLP_EXPERTS,
        projections=_GATE_UP_DOWN,
        router_suffix="gate.weight",
        routing=_deepseek_routing,
        description="Kimi-K2 / K2-Thinking: DeepSeek-V3 architecture (MLA, 384 experts, one group), its own model_type",
        names=ModelNames(shared_expert="shared_experts", attention_kind="mla"),
        layer_kinds=_first_k_dense,
        layer_kind_fields=("first_k_dense_replace",),
        example_config=lambda: {
            **DEEPSEEK_V3.example_config(),
            "architectures": ["DeepseekV3ForCausalLM"],
            "model_type": "kimi_k2",
            "n_routed_experts": 12,
            "n_group": 1,
            "topk_group": 1,
            "routed_scaling_factor": 2.827,
        },
    )
)

MINIMAX_M2 = register(
    Architecture(
        name="minimax_m2",
        model_types=("minimax_m2",),
        hf_renames=((".mlp.", ".block_sparse_moe."),),
        expert_pattern=_experts_of("block_sparse_moe"),
        projections={"w1": "gate", "w3": "up", "w2": "down", **_GATE_UP_DOWN},
        router_suffix="gate.weight",
        routing=_minimax_m2_routing,
        description="MiniMax-M2: block_sparse_moe.experts.{w1,w3,w2}, sigmoid top-k with a routing bias, renormalized",
        expert_intermediate_key="intermediate_size",
        names=ModelNames(block="block_sparse_moe", projections=("w1", "w3", "w2"), attention_kind="gqa_full_qk_norm"),
        example_config=lambda: {
            **_TINY_COMMON,
            "architectures": ["MiniMaxM2ForCausalLM"],
            "model_type": "minimax_m2",
            "intermediate_size": 128,
            "num_local_experts": 8,
            "num_experts_per_tok": 2,
            "scoring_func": "sigmoid",
            "use_routing_bias": True,
            "num_key_value_heads": 2,
            "head_dim": 64,
            "rope_theta": 5000000.0,
        },
    )
)

LLAMA4 = register(
    Architecture(
        name="llama4",
        model_types=("llama4", "llama4_text"),
        expert_pattern=_experts_of("feed_forward"),
        fused_prefix_pattern=r"(?P<prefix>.+\.feed_forward\.experts)",
        projections=_GATE_UP_DOWN,
        router_suffix="router.weight",
        routing=_llama4_routing,
        description="Llama-4 Scout/Maverick: top-1 sigmoid routing applied to the expert input, shared expert",
        names=ModelNames(
            layers="language_model.model.layers", block="feed_forward", router="router", shared_expert="shared_expert",
            embed="language_model.model.embed_tokens", final_norm="language_model.model.norm", lm_head="language_model.lm_head",
        ),
        layer_kinds=_llama4_layer_kinds,
        layer_kind_fields=("interleave_moe_layer_step",),
        expert_intermediate_key="intermediate_size",
        example_config=lambda: {
            "architectures": ["Llama4ForConditionalGeneration"],
            "model_type": "llama4",
            "torch_dtype": "bfloat16",
            "text_config": {
                **_TINY_COMMON,
                "model_type": "llama4_text",
                "intermediate_size": 128,
                "intermediate_size_mlp": 512,
                "num_local_experts": 8,
                "num_experts_per_tok": 1,
                "interleave_moe_layer_step": 1,
                "num_key_value_heads": 2,
                "head_dim": 64,
                "rope_theta": 500000.0,
            },
        },
    )
)

NEMOTRON_H = register(
    Architecture(
        name="nemotron_h",
        model_types=("nemotron_h",),
        expert_pattern=_experts_of("mixer"),
        projections={"up_proj": "up", "down_proj": "down"},
        router_suffix="gate.weight",
        routing=_deepseek_routing,
        description="Nemotron-H / Nemotron-3: hybrid Mamba-2/attention/MoE, non-gated relu2 experts (w13 = up only)",
        activation="relu2",
        names=ModelNames(
            layers="backbone.layers", block="mixer", projections=("", "up_proj", "down_proj"), shared_expert="shared_experts",
            attention="mixer", embed="backbone.embeddings", final_norm="backbone.norm_f",
        ),
        layer_kinds=_nemotron_h_layer_kinds,
        layer_kind_fields=("hybrid_override_pattern",),
        runner_unsupported=(
            "transformers' Nemotron-H mixer is not a router + experts block the runner can replace (hybrid Mamba, "
            "non-gated relu2 experts)"
        ),
        example_config=lambda: {
            **_TINY_COMMON,
            "architectures": ["NemotronHForCausalLM"],
            "model_type": "nemotron_h",
            "num_hidden_layers": 4,
            "hybrid_override_pattern": "ME*E",
            "intermediate_size": 512,
            "moe_intermediate_size": 192,  # not a multiple of 128: the non-gated kernel path pads it (as the real 1856)
            "moe_shared_expert_intermediate_size": 256,
            "n_routed_experts": 8,
            "num_experts_per_tok": 2,
            "n_group": 1,
            "topk_group": 1,
            "routed_scaling_factor": 2.5,
            "norm_topk_prob": True,
            "mlp_hidden_act": "relu2",
            "num_key_value_heads": 2,
            "head_dim": 64,
            "mamba_num_heads": 8,
            "mamba_head_dim": 32,
            "ssm_state_size": 16,
            "n_groups": 1,
            "conv_kernel": 4,
        },
    )
)

"""Per-architecture adapters: how experts are named and how tokens are routed.

A new MoE family is one ``register(Architecture(...))`` call. Routing is recorded by name
(FlashInfer's ``RoutingMethodType`` member name), never by number: the numbers changed between
FlashInfer versions.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Callable

from .errors import UnsupportedArchitectureError

ROLES = ("gate", "up", "down")


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
        if any(c in arch.model_types for c in candidates if c):
            return arch
    known = ", ".join(sorted(t for a in _REGISTRY.values() for t in a.model_types))
    raise UnsupportedArchitectureError(
        f"{where}: model_type {model_type!r} is not supported (supported: {known}); "
        "add an Architecture entry in nvfp4ckpt/architectures.py for it"
    )


def get(name: str) -> Architecture:
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise UnsupportedArchitectureError(f"unknown architecture {name!r}; choose one of: {known}") from None


# ----------------------------------------------------------------------------------------------
# Built-in families

_MLP_EXPERTS = r"(?P<prefix>.+\.mlp\.experts)\.(?P<expert>\d+)\.(?P<proj>[a-z0-9_]+)"
_GATE_UP_DOWN = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}


def _qwen3_routing(cfg: dict) -> Routing:
    norm = bool(cfg.get("norm_topk_prob", True))
    return Routing(
        method="RenormalizeNaive" if norm else "Default",
        top_k=int(cfg["num_experts_per_tok"]),
        # transformers >= 5.2x writes Qwen3-MoE's expert count as num_local_experts
        num_experts=int(cfg.get("num_experts") or cfg["num_local_experts"]),
        norm_topk_prob=norm,
    )


def _deepseek_routing(cfg: dict) -> Routing:
    return Routing(
        method="DeepSeekV3",
        top_k=int(cfg["num_experts_per_tok"]),
        num_experts=int(cfg["n_routed_experts"]),
        n_group=int(cfg.get("n_group") or 1),
        topk_group=int(cfg.get("topk_group") or 1),
        routed_scaling_factor=float(cfg.get("routed_scaling_factor") or 1.0),
        norm_topk_prob=bool(cfg.get("norm_topk_prob", True)),
        bias_suffix="gate.e_score_correction_bias",
    )


def _mixtral_routing(cfg: dict) -> Routing:
    return Routing(
        method="Renormalize",
        top_k=int(cfg["num_experts_per_tok"]),
        num_experts=int(cfg["num_local_experts"]),
    )


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

DEEPSEEK_V3 = register(
    Architecture(
        name="deepseek_v3",
        model_types=("deepseek_v3",),
        expert_pattern=_MLP_EXPERTS,
        projections=_GATE_UP_DOWN,
        router_suffix="gate.weight",
        routing=_deepseek_routing,
        description="DeepSeek-V3/R1: dense first layers, shared experts, sigmoid grouped top-k with correction bias",
        example_config=lambda: {
            **_TINY_COMMON,
            "architectures": ["DeepseekV3ForCausalLM"],
            "model_type": "deepseek_v3",
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
        expert_pattern=r"(?P<prefix>.+\.block_sparse_moe\.experts)\.(?P<expert>\d+)\.(?P<proj>[a-z0-9_]+)",
        # w1 = gate, w3 = up, w2 = down; llm-compressor renames them to gate/up/down_proj.
        projections={"w1": "gate", "w3": "up", "w2": "down", **_GATE_UP_DOWN},
        router_suffix="gate.weight",
        routing=_mixtral_routing,
        description="Mixtral: block_sparse_moe.experts.{w1,w3,w2}, softmax top-k renormalized",
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

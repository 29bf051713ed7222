"""Token -> expert routing in pure torch, matching FlashInfer's ``RoutingMethodType``.

``route(router_logits, method, top_k, ...)`` returns ``(topk_ids int32 [T, K], topk_weights fp32 [T, K])``.

Methods (FlashInfer enum value in brackets; the FlashInfer member names such as ``"DeepSeekV3"`` or
``"RenormalizeNaive"`` are accepted as aliases):

- ``"default"`` [0]: softmax over all experts, top-k, no renormalization
  (HF Qwen3-MoE / Qwen2-MoE with ``norm_topk_prob=False``).
- ``"renormalize"`` [1]: top-k on the logits, then softmax over the k selected logits (HF Mixtral;
  mathematically the same weights as ``renormalize_naive``).
- ``"renormalize_naive"`` [4]: softmax, top-k, divide by the sum of the k probabilities (HF Qwen3-MoE with
  ``norm_topk_prob=True``). With ``norm_topk_prob=False`` it is ``"default"``.
- ``"deepseek_v3"`` [2]: ``scores = sigmoid(logits)``; selection uses ``scores + bias``
  (``e_score_correction_bias``): the experts are split into ``n_group`` groups, a group is rated by the sum of
  its two largest biased scores, the best ``topk_group`` groups are kept and the top-k experts are taken among
  them; the weights are the *unbiased* scores of the chosen experts, divided by their sum (+1e-20, as HF and
  FlashInfer's reference) when ``norm_topk_prob``, times ``routed_scaling_factor`` (HF DeepseekV3TopkRouter).

- ``"minimax2"`` [7]: ``scores = sigmoid(logits)``, top-k on ``scores + bias``, weights are the unbiased scores
  of the chosen experts divided by their sum (+1e-20), times ``routed_scaling_factor`` (HF MiniMax-M2).
- ``"llama4"`` [3]: top-k on the logits (Llama-4 uses k = 1), weight = ``sigmoid(logit)`` of each chosen
  expert, no renormalization. Llama-4 applies the weight to the expert's *input*; ``route`` only returns it
  (``runtime.MoELayer`` scales the hidden states, as vLLM's ``apply_router_weight_on_input``).

For the softmax methods ``bias`` (if given) is added to the logits before anything else and the weights are
multiplied by ``routed_scaling_factor`` (default 1.0), as in FlashInfer's reference implementations.

Ties are broken deterministically: among equal values the expert (or group) with the lower index wins, on
every device (a stable descending sort; ``torch.topk`` makes no such promise). The returned experts of a token
are ordered by decreasing selection value (biased score for DeepSeek-V3, probability/logit otherwise).
All arithmetic is fp32, whatever the logits' dtype.
"""

from __future__ import annotations

from .._lazy import torch

__all__ = ["FLASHINFER_ROUTING_METHOD_TYPE", "ROUTING_METHODS", "canonical_method", "needs_fp32_logits", "read_router_bias", "route"]

ROUTING_METHODS = ("default", "renormalize", "renormalize_naive", "deepseek_v3", "llama4", "minimax2")
WEIGHTS_ON_INPUT = ("llama4",)  # methods whose weight scales the expert input, not its output
FP32_LOGITS = ("deepseek_v3",)  # methods the kernel (and SGLang) route on float32 logits; the others on bf16

# flashinfer.tllm_enums.RoutingMethodType values (recorded for reference; compare by name, not number).
FLASHINFER_ROUTING_METHOD_TYPE = {
    "default": 0,
    "renormalize": 1,
    "deepseek_v3": 2,
    "llama4": 3,
    "renormalize_naive": 4,
    "minimax2": 7,
}

_ALIASES = {
    "default": "default",
    "renormalize": "renormalize",
    "renormalizenaive": "renormalize_naive",
    "renormalize_naive": "renormalize_naive",
    "deepseekv3": "deepseek_v3",
    "deepseek_v3": "deepseek_v3",
    "llama4": "llama4",
    "minimax2": "minimax2",
}


def canonical_method(method: str) -> str:
    """``"DeepSeekV3"``/``"deepseek_v3"`` -> ``"deepseek_v3"`` etc.; raises ValueError for unknown methods."""
    key = str(method).strip().lower().replace("-", "_")
    if key not in _ALIASES:
        raise ValueError(f"unknown routing method {method!r}; expected one of {ROUTING_METHODS}")
    return _ALIASES[key]


def needs_fp32_logits(method: str | None) -> bool:
    """True for routing methods whose router logits stay float32 (DeepSeek-V3: sigmoid + grouped top-k)."""
    try:
        return canonical_method(method) in FP32_LOGITS
    except ValueError:
        return False


def read_router_bias(files, block: str, routing: dict, device) -> torch.Tensor | None:
    """The router's correction bias (``<block>.<routing["bias_suffix"]>``) from ``files`` onto ``device``, or None
    when the family has none or the checkpoint does not store it."""
    suffix = routing.get("bias_suffix")
    if not suffix:
        return None
    name = f"{block}.{suffix}"
    return files.read(name).to(device) if name in files.tensors else None


def _topk_desc(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k along the last dim, largest first; ties go to the lower index (stable sort)."""
    vals, idx = torch.sort(values, dim=-1, descending=True, stable=True)
    return vals[..., :k], idx[..., :k]


def route(
    router_logits: torch.Tensor,
    method: str,
    top_k: int,
    *,
    bias: torch.Tensor | None = None,
    n_group: int | None = None,
    topk_group: int | None = None,
    routed_scaling_factor: float | None = 1.0,
    norm_topk_prob: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Select ``top_k`` experts per token. Returns ``(topk_ids int32 [T, K], topk_weights fp32 [T, K])``."""
    method = canonical_method(method)
    if router_logits.dim() != 2:
        raise ValueError(f"router_logits must be [T, E], got shape {tuple(router_logits.shape)}")
    num_experts = router_logits.shape[1]
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k={top_k} must be in [1, {num_experts}]")
    scale = 1.0 if routed_scaling_factor is None else float(routed_scaling_factor)
    logits = router_logits.float()
    bias_f = None if bias is None else bias.reshape(-1).to(device=logits.device, dtype=torch.float32)
    if bias_f is not None and bias_f.numel() != num_experts:
        raise ValueError(f"bias has {bias_f.numel()} entries, expected {num_experts}")

    if method == "deepseek_v3":
        ids, weights = _route_deepseek_v3(logits, top_k, bias_f, n_group, topk_group, norm_topk_prob)
    elif method == "minimax2":
        ids, weights = _route_deepseek_v3(logits, top_k, bias_f, 1, 1, True)
    elif method == "llama4":
        top_logits, ids = _topk_desc(logits if bias_f is None else logits + bias_f, top_k)
        weights = torch.sigmoid(top_logits)
    else:
        if bias_f is not None:
            logits = logits + bias_f
        if method == "renormalize":
            top_logits, ids = _topk_desc(logits, top_k)
            weights = torch.softmax(top_logits, dim=-1)
        else:
            probs = torch.softmax(logits, dim=-1)
            weights, ids = _topk_desc(probs, top_k)
            if method == "renormalize_naive" and norm_topk_prob:
                weights = weights / weights.sum(dim=-1, keepdim=True)
    if scale != 1.0:
        weights = weights * scale
    return ids.to(torch.int32), weights.to(torch.float32).contiguous()


def _route_deepseek_v3(
    logits: torch.Tensor,
    top_k: int,
    bias: torch.Tensor | None,
    n_group: int | None,
    topk_group: int | None,
    norm_topk_prob: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    num_tokens, num_experts = logits.shape
    n_group = 1 if not n_group else int(n_group)
    topk_group = n_group if not topk_group else int(topk_group)
    if num_experts % n_group:
        raise ValueError(f"{num_experts} experts do not split into n_group={n_group} groups")
    if not 1 <= topk_group <= n_group:
        raise ValueError(f"topk_group={topk_group} must be in [1, n_group={n_group}]")
    group_size = num_experts // n_group
    if top_k > topk_group * group_size:
        raise ValueError(f"top_k={top_k} exceeds the {topk_group * group_size} experts of the kept groups")

    scores = torch.sigmoid(logits)
    choice = scores if bias is None else scores + bias
    if n_group > 1:
        grouped = choice.view(num_tokens, n_group, group_size)
        top2, _ = _topk_desc(grouped, min(2, group_size))
        group_scores = top2.sum(dim=-1)  # [T, n_group]
        _, keep = _topk_desc(group_scores, topk_group)
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
        expert_mask = group_mask.unsqueeze(-1).expand(num_tokens, n_group, group_size).reshape(num_tokens, num_experts)
        choice = choice.masked_fill(~expert_mask, float("-inf"))
    _, ids = _topk_desc(choice, top_k)
    weights = scores.gather(1, ids)
    if norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return ids, weights

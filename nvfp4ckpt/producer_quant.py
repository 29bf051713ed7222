"""NVFP4 weight quantization exactly as the two real producers do it, in pure torch (CPU or CUDA).

``quantize_modelopt`` reproduces nvidia-modelopt 0.47.0 (``NVFP4_DEFAULT_CFG`` + ``export_hf_checkpoint``) and
``quantize_compressed_tensors`` reproduces llm-compressor 0.14.0.1 / compressed-tensors 0.20.1
(``QuantizationModifier(scheme="NVFP4")``, format ``nvfp4-pack-quantized``), bit for bit, from the unquantized
weights. Each call takes the projections that share one global scale (``[gate, up]`` of E experts, or
``[down]`` alone) and returns, per projection, the tensors the producer writes: packed E2M1 codes, linear e4m3
block scales and the per-expert global scale in the producer's own convention. ``quantize_modelopt_fused`` does
the same for ModelOpt's fused Llama-4 expert tensors (one scale per tensor, stored input-major).

The arithmetic, with the producer source lines it copies, is in ``docs/producer-quant.md``. In short:

* ModelOpt: ``weight_scale_2 = amax / 2688`` (fp32, amax over gate and up together);
  ``weight_scale = e4m3(clamp(block_amax / (6 * weight_scale_2), 2**-9, 448))`` (0 -> 1.0 first);
  codes = E2M1 of ``w / (float(weight_scale) * weight_scale_2)`` in fp32.
* compressed-tensors: ``weight_global_scale = float32(reciprocal(amax) * 2688)`` evaluated in the WEIGHT dtype
  (bf16 for a bf16 model: hence values like 30976.0), 1.0 if that is not finite;
  ``weight_scale = e4m3(global_scale * dtype(block_amax / 6))`` (0 -> 0.125 after the cast);
  codes = E2M1 of ``w / (float(weight_scale) / global_scale)`` in fp32.
* E2M1 rounding is the same in both: nearest value, ties to the even code (0.25 -> 0, 0.75 -> 1, 1.25 -> 1,
  1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4), sign bit set when the scaled value is < 0 (so -0.0 gives code 0 and a
  small negative value that rounds to zero gives code 8).

Every division is between two tensors on the input's device, never by a Python number: PyTorch on CUDA turns
``tensor / python_float`` into a multiplication by the float32 reciprocal, which is not the CPU result.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from ._lazy import torch

GROUP_SIZE = 16
E2M1_MAX = 6.0
E4M3_MAX = 448.0
E4M3_MIN_SUBNORMAL = 2.0**-9  # ModelOpt's lower clamp of a block scale
CT_ZERO_SCALE = 0.125  # compressed-tensors' replacement for an e4m3 block scale that is 0
_E2M1_BOUNDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)  # midpoints between consecutive E2M1 magnitudes
_ROUND_UP_TIES = (0.75, 1.75, 3.5)  # midpoints whose upper neighbour has the even code
_DTYPES = ("bfloat16", "float16", "float32")
_CHUNK_ELEMENTS = 1 << 24  # experts per step: at most ~16M weights (fp32 temporaries of ~64 MB each)


@dataclass
class QuantizedProjection:
    """One projection of E experts, in the producer's source format (tensors on the input's device).

    ``weight``: uint8 ``[E, N, K/2]``, element 2j of a row in the low nibble of byte j (bit 3 of a nibble is the
    sign). ``weight_scale``: float8_e4m3fn ``[E, N, K/16]``, linear (unswizzled). ``global_scale``: float32 ``[E]``,
    ModelOpt's ``weight_scale_2`` (a dequantization multiplier: ``W = e2m1 * weight_scale * weight_scale_2``) or
    compressed-tensors' ``weight_global_scale`` (its reciprocal convention: ``W = e2m1 * weight_scale /
    weight_global_scale``), exactly as the producer stores it (ModelOpt: a 0-d tensor per expert, compressed-tensors:
    shape ``[1]``).
    """

    weight: torch.Tensor
    weight_scale: torch.Tensor
    global_scale: torch.Tensor


def quantize_modelopt(
    weights: Sequence[torch.Tensor], *, divide_like: Literal["cpu", "cuda"] = "cpu",
    weight_scale_2: torch.Tensor | None = None,
) -> list[QuantizedProjection]:
    """Quantize projections that share a ``weight_scale_2`` the way ModelOpt 0.47.0 exports NVFP4.

    ``weights``: the projections of one fusion group (``[gate, up]``, or ``[down]``), each ``[E, N, K]`` (or
    ``[N, K]``, read as E=1) in bf16, fp16 or fp32 (the model's dtype: ModelOpt quantizes ``weight.to(model
    dtype)``), all with the same E, dtype and device; K a multiple of 16. Returns one ``QuantizedProjection`` per
    input, in order. ``weight_scale_2`` of expert e is ``max_p amax(weights[p][e]) / 2688`` in fp32.

    ``divide_like``: the device ModelOpt ran its export on. ModelOpt divides the fp32 amax by the Python number
    2688.0; PyTorch does that as a true division on the CPU but, on CUDA, as a multiplication by
    ``float32(1 / 2688)``, which gives a weight_scale_2 one ulp away for about a fifth of the amax values (and then
    block scales / codes that can differ). ``"cpu"`` (default) reproduces a CPU export (what the tests check
    against the real library), ``"cuda"`` a GPU export. The result does not depend on the device this runs on.

    Raises ``ValueError`` for a non-finite weight (naming projection and expert), for bad shapes or dtypes, and
    for a group whose weight_scale_2 is 0 in some expert (all weights 0; or, in fp32, amax below ~2e-42):
    ModelOpt writes ``weight_scale_2 = 0``, NaN block scales and all codes 0x7 there, which no engine can use
    (see docs/producer-quant.md). A zero gate next to a non-zero up is fine (block scales 1.0, codes 0).

    ``weight_scale_2``: the group's scale given instead of computed (float32, ``[E]`` or one value for every
    expert): a scale that spans more than these weights, as ModelOpt's one scale per fused Llama-4 tensor spans every
    expert (:func:`global_scale_modelopt_fused`) while the experts are quantized a chunk at a time. The weights are
    then not reduced, so they are not checked for NaN/inf here: the caller computed the scale from them.
    """
    ws = _batched(weights)
    ws2 = _modelopt_ws2(ws, divide_like) if weight_scale_2 is None else _given_ws2(weight_scale_2, ws)
    ws2_x6 = ws2 * E2M1_MAX  # ModelOpt: per_block_amax / (E2M1_MAX * weights_scaling_factor_2)
    out = []
    for w in ws:
        e, n, k = w.shape
        packed, scales = _outputs(w)
        for lo, hi in _chunks(e, n * k):
            blocks = w[lo:hi].reshape(hi - lo, n, k // GROUP_SIZE, GROUP_SIZE)
            block_amax = _abs_max(blocks).float()
            scale = block_amax / ws2_x6[lo:hi, None, None]
            scale = torch.where(scale == 0, torch.ones_like(scale), scale)
            scale = scale.clamp(min=E4M3_MIN_SUBNORMAL, max=E4M3_MAX).to(torch.float8_e4m3fn)
            denom = scale.float() * ws2[lo:hi, None, None]
            packed[lo:hi] = _encode_e2m1(blocks / denom.unsqueeze(-1))
            scales[lo:hi] = scale
        out.append(QuantizedProjection(packed, scales, ws2.clone()))
    return out


def quantize_modelopt_fused(weight: torch.Tensor, *, divide_like: Literal["cpu", "cuda"] = "cpu") -> QuantizedProjection:
    """Quantize one of ModelOpt's fused Llama-4 expert tensors as ModelOpt 0.47.0 exports it.

    ``weight``: ``Llama4TextExperts.gate_up_proj`` ``[E, H, 2I]`` or ``.down_proj`` ``[E, I, H]``, input-major (the
    input dim K in the middle, what the experts' ``bmm`` multiplies by), bf16/fp16/fp32, K a multiple of 16. ModelOpt
    quantizes the transpose ``[E, N, K]`` (16-element blocks along K, the input dim) with ONE weight_scale_2 for the
    whole tensor (every expert; gate and up together, being one tensor), then transposes the codes and scales back.
    Returns that stored form: ``weight`` uint8 ``[E, K/2, N]`` (inputs 2j and 2j+1 of output n in byte ``[e, j, n]``,
    2j low), ``weight_scale`` float8_e4m3fn ``[E, K/16, N]``, ``global_scale`` float32 0-d.

    Raises ``ValueError`` for a non-finite weight (naming the expert), bad shapes or dtypes, or an all-zero tensor
    (weight_scale_2 = 0, see :func:`quantize_modelopt`); an all-zero expert in a non-zero tensor is fine (block
    scales 1.0, codes 0).
    """
    ws2 = global_scale_modelopt_fused(weight, divide_like=divide_like)
    q = quantize_modelopt([weight.transpose(1, 2)], weight_scale_2=ws2)[0]
    return QuantizedProjection(q.weight.transpose(1, 2).contiguous(), q.weight_scale.transpose(1, 2).contiguous(), ws2)


def global_scale_modelopt_fused(weight: torch.Tensor, *, divide_like: Literal["cpu", "cuda"] = "cpu") -> torch.Tensor:
    """Only the ``weight_scale_2`` (float32 0-d) of a fused Llama-4 tensor ``[E, K, N]``: ``max |w| / 2688`` over the
    whole tensor (ModelOpt's one per-tensor weight quantizer of ``gate_up_proj`` / ``down_proj``)."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 3:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"a fused expert tensor is [E, K, N] (input-major), got {shape}")
    ws = _batched([weight.transpose(1, 2)])  # the dtype, K % 16 and E checks of the transposed form ModelOpt quantizes
    try:
        amax = _group_amax(ws).amax()  # per expert first (names the expert of a NaN), then over the tensor: exact
    except ValueError as exc:
        raise ValueError(str(exc).replace("projection 0 (of 1), ", "")) from None
    try:
        return _ws2_of(amax.reshape(1), divide_like).reshape(())
    except ValueError:
        raise ValueError(
            "every weight of the fused tensor is 0 (amax 0, or so small that weight_scale_2 = amax/2688 underflows to "
            "0); ModelOpt 0.47.0 would export weight_scale_2 = 0 with NaN block scales for it"
        ) from None


def quantize_compressed_tensors(weights: Sequence[torch.Tensor]) -> list[QuantizedProjection]:
    """Quantize projections that share a ``weight_global_scale`` the way llm-compressor 0.14.0.1 with
    compressed-tensors 0.20.1 writes ``nvfp4-pack-quantized``.

    ``weights``: as for :func:`quantize_modelopt` (the dtype matters more here: the global scale and the block
    scales' ``amax / 6`` are computed in the weight dtype, as the producer's observers do). Returns one
    ``QuantizedProjection`` per input; ``global_scale`` is ``weight_global_scale`` (quantization multiplier,
    ``float32(dtype(reciprocal(amax)) * 2688)`` rounded in the weight dtype).

    An all-zero group (amax 0) is accepted: the producer writes ``weight_global_scale = 1.0``, block scales 0.125
    and codes 0, and so does this. (So does an fp16 group whose ``2688 / amax`` overflows fp16, i.e. amax below
    about 0.041: global scale 1.0.) Raises ``ValueError`` for a non-finite weight, bad shapes or dtypes.
    """
    ws = _batched(weights)
    dtype = ws[0].dtype
    gs = _ct_global_scale(ws)
    six = torch.full((), E2M1_MAX, dtype=torch.float32, device=gs.device)
    out = []
    for w in ws:
        e, n, k = w.shape
        packed, scales = _outputs(w)
        for lo, hi in _chunks(e, n * k):
            blocks = w[lo:hi].reshape(hi - lo, n, k // GROUP_SIZE, GROUP_SIZE)
            # calculate_qparams: max_val_pos / (bit_range.to(dtype) / 2), a division in the weight dtype
            local = (_abs_max(blocks).float() / six).to(dtype)
            scale = (gs[lo:hi, None, None] * local).clamp(min=-E4M3_MAX, max=E4M3_MAX)
            scale = scale.to(torch.float8_e4m3fn).float()  # round_to_quantized_type_dtype, back in fp32
            scale = torch.where(scale == 0, torch.full_like(scale, CT_ZERO_SCALE), scale)
            # forward_helpers._quantize: scale = scale / global_scale; x / scale (fp32)
            eff = scale / gs[lo:hi, None, None]
            scale = scale.to(torch.float8_e4m3fn)  # exact: every value is already an e4m3 value
            packed[lo:hi] = _encode_e2m1(blocks / eff.unsqueeze(-1))
            scales[lo:hi] = scale
        out.append(QuantizedProjection(packed, scales, gs.clone()))
    return out


def global_scale_modelopt(weights: Sequence[torch.Tensor], *, divide_like: Literal["cpu", "cuda"] = "cpu") -> torch.Tensor:
    """Only the ``weight_scale_2`` (float32 ``[E]``) that :func:`quantize_modelopt` gives the same group: one
    reduction over the weights, no quantization (the in-place update decides its scalars with it first)."""
    return _modelopt_ws2(_batched(weights), divide_like)


def global_scale_compressed_tensors(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """Only the ``weight_global_scale`` (float32 ``[E]``) that :func:`quantize_compressed_tensors` gives the group."""
    return _ct_global_scale(_batched(weights))


def global_scales_many(
    groups: Sequence[Sequence[torch.Tensor]], fmt: Literal["modelopt", "compressed-tensors"], *,
    divide_like: Literal["cpu", "cuda"] = "cpu",
) -> torch.Tensor | None:  # fmt: skip
    """The global scale of many groups at once (one expert's gate and up, or its down, per group; all of one dtype
    and device): float32 ``[len(groups)]``, each value exactly what :func:`global_scale_modelopt` /
    :func:`global_scale_compressed_tensors` give that group alone. ``max |w|`` is taken with
    ``torch._foreach_norm(inf)`` (a max: exact in any dtype), a few launches for every tensor and one host sync,
    where the per-group functions launch several reductions and sync once per group (an RL update's hundreds of
    experts). None when a group has a NaN, an inf or a zero scale: the caller asks the per-group functions, whose
    errors name the tensor."""
    flat = [w for g in groups for w in g]
    if not flat or len({(w.dtype, w.device) for w in flat}) != 1:
        return None
    norms = torch.stack(torch._foreach_norm(flat, float("inf")))  # per tensor, in the weight dtype
    if not bool(torch.isfinite(norms).all()):
        return None
    ids = torch.tensor([k for k, g in enumerate(groups) for _ in g], device=norms.device)
    amax = torch.zeros(len(groups), dtype=norms.dtype, device=norms.device)
    amax.scatter_reduce_(0, ids, norms, "amax", include_self=False)  # per group: a max, exact
    try:
        return _ws2_of(amax, divide_like) if fmt == "modelopt" else _ct_from_amax(amax)
    except ValueError:  # a zero scale (ModelOpt)
        return None


def _modelopt_ws2(ws: list[torch.Tensor], divide_like: str) -> torch.Tensor:
    if divide_like not in ("cpu", "cuda"):  # before the reduction (_ws2_of checks it again for its other callers)
        raise ValueError(f"divide_like must be 'cpu' or 'cuda', not {divide_like!r}")
    return _ws2_of(_group_amax(ws), divide_like)


def _ws2_of(amax: torch.Tensor, divide_like: str) -> torch.Tensor:
    """``amax / 2688`` as ModelOpt computes it on ``divide_like``; refuses a 0 (naming the experts)."""
    if divide_like not in ("cpu", "cuda"):
        raise ValueError(f"divide_like must be 'cpu' or 'cuda', not {divide_like!r}")
    amax = amax.float()  # exact: the max of the weights, in any dtype
    if divide_like == "cpu":  # quant_utils -> NVFP4QTensor.get_weights_scaling_factor_2_from_quantizer
        ws2 = amax / torch.full_like(amax, E2M1_MAX * E4M3_MAX)
    else:  # PyTorch CUDA's div_true_kernel for a CPU-scalar divisor: a * (float)(1.0 / b)
        ws2 = amax * torch.full_like(amax, 1.0 / (E2M1_MAX * E4M3_MAX))
    zero = (ws2 == 0).nonzero().flatten().tolist()
    if zero:
        raise ValueError(
            f"expert(s) {_ids(zero)}: every weight of the projection group is 0 (amax 0, or so small that "
            "weight_scale_2 = amax/2688 underflows to 0); ModelOpt 0.47.0 would export weight_scale_2 = 0 with "
            "NaN block scales for it"
        )
    return ws2


def _given_ws2(ws2: torch.Tensor, ws: list[torch.Tensor]) -> torch.Tensor:
    """A caller's weight_scale_2 as float32 ``[E]`` on the weights' device: one value per expert, or one for all."""
    e, device = ws[0].shape[0], ws[0].device
    if not isinstance(ws2, torch.Tensor) or ws2.dtype != torch.float32 or ws2.numel() not in (1, e):
        raise ValueError(f"weight_scale_2 must be a float32 tensor of 1 or {e} values, got {ws2!r:.80}")
    ws2 = ws2.to(device).reshape(-1).expand(e)
    if not bool((torch.isfinite(ws2) & (ws2 > 0)).all()):
        raise ValueError("weight_scale_2 must be finite and positive")
    return ws2


def _ct_global_scale(ws: list[torch.Tensor]) -> torch.Tensor:
    return _ct_from_amax(_group_amax(ws))  # in the weight dtype, as the observers keep min/max


def _ct_from_amax(amax: torch.Tensor) -> torch.Tensor:
    dtype = amax.dtype
    # compressed_tensors.quantization.utils.helpers.generate_gparam: 448 * 6 / clamp(amax, finfo.tiny), where
    # `python float / tensor` is Tensor.__rtruediv__ = reciprocal() * float, each rounded to the weight dtype.
    gs = amax.clamp(min=torch.finfo(dtype).tiny).reciprocal() * (E4M3_MAX * E2M1_MAX)
    gs = torch.nan_to_num(gs, nan=1.0, posinf=1.0, neginf=1.0).float()
    return gs


def _batched(weights: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Check the group and view every projection as ``[E, N, K]``."""
    if isinstance(weights, torch.Tensor) or len(weights) == 0:
        raise ValueError("weights must be a non-empty sequence of tensors (the projections sharing a global scale)")
    out = []
    for p, w in enumerate(weights):
        if not isinstance(w, torch.Tensor):
            raise TypeError(f"projection {p}: expected a torch.Tensor, got {type(w).__name__}")
        if str(w.dtype).removeprefix("torch.") not in _DTYPES:
            raise ValueError(f"projection {p}: dtype {w.dtype} is not one of bfloat16, float16, float32")
        if w.dim() == 2:
            w = w.unsqueeze(0)
        if w.dim() != 3:
            raise ValueError(f"projection {p}: expected [E, N, K] or [N, K], got shape {tuple(w.shape)}")
        if w.shape[-1] % GROUP_SIZE or w.shape[-1] == 0 or w.shape[1] == 0:
            raise ValueError(f"projection {p}: input size K={w.shape[-1]} is not a positive multiple of {GROUP_SIZE}")
        first = out[0] if out else w
        if (w.shape[0], w.dtype, w.device) != (first.shape[0], first.dtype, first.device):
            raise ValueError(
                f"projection {p}: {w.shape[0]} experts, {w.dtype} on {w.device} differs from projection 0 "
                f"({first.shape[0]} experts, {first.dtype} on {first.device})"
            )
        out.append(w)
    if out[0].shape[0] == 0:
        raise ValueError("no experts (E = 0)")
    return out


def _group_amax(ws: list[torch.Tensor]) -> torch.Tensor:
    """Per-expert ``max |w|`` over all projections of the group, in the weight dtype; raises on NaN/inf."""
    amax = None
    for p, w in enumerate(ws):
        lo, hi = w.amin(dim=(1, 2)), w.amax(dim=(1, 2))  # NaN propagates; no copy of a strided slice
        bad = ~(torch.isfinite(lo) & torch.isfinite(hi))
        if bool(bad.any()):
            e = int(bad.nonzero()[0, 0])
            kind = "NaN" if bool(torch.isnan(w[e]).any()) else "an infinite value"
            raise ValueError(f"projection {p} (of {len(ws)}), expert {e}: the weight contains {kind}")
        m = torch.maximum(lo.abs(), hi.abs())
        amax = m if amax is None else torch.maximum(amax, m)
    return amax


def _abs_max(blocks: torch.Tensor) -> torch.Tensor:
    """``max |x|`` over the last dim (exact in the input dtype)."""
    return torch.maximum(blocks.amax(dim=-1).abs(), blocks.amin(dim=-1).abs())


def _encode_e2m1(scaled: torch.Tensor) -> torch.Tensor:
    """Packed E2M1 codes ``[..., K/2]`` of fp32 ``[..., K/16, 16]``: nearest, ties to even, sign = (x < 0).

    ModelOpt's ``NVFP4QTensor._cast_fp4`` (searchsorted over the midpoints, +1 on 0.75/1.75/3.5) and
    compressed-tensors' ``cast_to_fp4`` / Triton ``_round_to_fp4`` thresholds are the same function on finite
    values; values above 6 give code 7.
    """
    scaled = scaled.flatten(-2).contiguous()
    sign = (scaled < 0).to(torch.uint8) << 3
    mag = scaled.abs_()
    bounds = torch.tensor(_E2M1_BOUNDS, dtype=mag.dtype, device=mag.device)
    code = torch.bucketize(mag, bounds, out_int32=True).to(torch.uint8)  # number of midpoints < |x|
    for tie in _ROUND_UP_TIES:
        code += mag == tie
    code |= sign
    return code[..., 0::2] | (code[..., 1::2] << 4)


def _outputs(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    e, n, k = w.shape
    packed = torch.empty((e, n, k // 2), dtype=torch.uint8, device=w.device)
    scales = torch.empty((e, n, k // GROUP_SIZE), dtype=torch.float8_e4m3fn, device=w.device)
    return packed, scales


def _chunks(experts: int, per_expert: int):
    step = max(1, _CHUNK_ELEMENTS // max(1, per_expert))
    for lo in range(0, experts, step):
        yield lo, min(experts, lo + step)


def _ids(ids: list[int]) -> str:
    return ", ".join(map(str, ids[:8])) + (f" and {len(ids) - 8} more" if len(ids) > 8 else "")

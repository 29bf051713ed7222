"""MoE backends: what runs a converted MoE layer, chosen in one place.

Each backend is a small class: ``supported(device, act, gated)`` says why it cannot run (or None), ``run`` runs a
layer, ``auto_on`` says on which GPUs ``--backend auto`` picks it, and ``thresholds`` are the numerics ``verify``
holds it to (per activation mode; measured margins in docs/verify.md). ``BACKENDS`` is the registry, in ``auto``'s
order of preference. Adding a backend is one class here plus its registry line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, ClassVar

from .._lazy import torch
from ..errors import InputError

if TYPE_CHECKING:
    from .layer import MoELayer


class Backend(str, Enum):
    AUTO = "auto"
    TRTLLM = "trtllm"
    TRITON = "triton"
    TORCH = "torch"


class Act(str, Enum):
    """Activation precision: W4A4 (activations quantized to NVFP4, as the kernels run) or W4A16 (bf16)."""

    NVFP4 = "nvfp4"
    BF16 = "bf16"


BACKEND_CHOICES = tuple(b.value for b in Backend)
ACT_MODES = tuple(a.value for a in Act)


@dataclass(frozen=True)
class Threshold:
    max_rel_l2: float  # the whole output
    min_cosine: float
    min_frac_close: float  # FlashInfer's own criterion: isclose(atol=0.1, rtol=0.85)
    max_token_rel_l2: float | None = None  # the worst token (None: not held to one); the whole output dilutes a
    # lost (token, expert) pair by sqrt(tokens), one token does not


def interpreting() -> bool:
    """Whether Triton kernels run under its CPU interpreter (``TRITON_INTERPRET=1``, read when they are defined)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


class MoEBackend:
    name: ClassVar[str]
    needs_cuda: ClassVar[bool] = True
    acts: ClassVar[tuple[str, ...]] = ACT_MODES
    thresholds: ClassVar[dict[str, Threshold]] = {}

    @staticmethod
    def auto_on(capability: tuple[int, int] | None) -> bool:
        """Whether ``--backend auto`` picks this backend on a GPU of this compute capability (None: no GPU)."""
        return False

    def supported(self, device: torch.device, act: str) -> str | None:
        """None when this backend can run here with ``act``, else the one-line reason (an InputError message)."""
        if self.needs_cuda and device.type != "cuda":
            return f"--backend {self.name} needs a CUDA GPU; use --backend torch on this machine"
        return self.act_unsupported(act)

    def act_unsupported(self, act: str) -> str | None:
        if act not in self.acts:
            return f"--backend {self.name} runs W4A4 only; use --act nvfp4 (or --backend triton for --act bf16)"
        return None

    def run(
        self, layer: MoELayer, hidden_states: torch.Tensor, router_logits: torch.Tensor, act: str, out_dtype=None
    ) -> torch.Tensor:
        """Route, then run the experts (backends that route inside the kernel override this). ``out_dtype``: the
        output precision where the backend offers a choice (None: its serving default)."""
        topk_ids, topk_weights = layer.route(router_logits)
        topk_ids = layer.local_ids(topk_ids)
        hidden_states, topk_weights = layer.weights_on_input(hidden_states, topk_weights)
        return self.experts(layer, hidden_states, topk_ids, topk_weights, act, out_dtype)

    def experts(self, layer: MoELayer, hidden_states, topk_ids, topk_weights, act: str, out_dtype=None) -> torch.Tensor:
        raise NotImplementedError


class TrtllmBackend(MoEBackend):
    """FlashInfer's ``trtllm_fp4_block_scale_moe`` on the tensors as stored (SM100/SM103; routes in the kernel)."""

    name = "trtllm"
    acts = (Act.NVFP4.value,)
    thresholds = {"nvfp4": Threshold(0.2, 0.98, 0.92)}  # FlashInfer's own test criterion

    @staticmethod
    def auto_on(capability: tuple[int, int] | None) -> bool:
        return capability is not None and capability[0] == 10

    def run(self, layer: MoELayer, hidden_states: torch.Tensor, router_logits: torch.Tensor, act: str, out_dtype=None) -> torch.Tensor:
        from .trtllm import run_trtllm  # bf16 output only

        return run_trtllm(layer, hidden_states, router_logits)


class TritonBackend(MoEBackend):
    """nvfp4ckpt's own fused NVFP4 MoE reading the kernel layout directly (CUDA, SM80 and newer; SwiGLU and relu2)."""

    name = "triton"
    # Compared in fp32 output (verify asks for it), so only the kernel's fp32 summation order and the rounding flips
    # it causes in the intermediate (NVFP4 or bf16) remain. Measured (scripts/verify_thresholds.py, docs/verify.md):
    # <= 1.7e-7 on every example family (CPU interpreter and H100); bf16 flips up to 1.8e-3 on a token; at
    # Qwen3-30B-A3B sizes on the H100 one re-quantization flip gave 6.1e-4 whole and 5.6e-3 on its token. A lost
    # (token, expert) pair gives 5.3e-2 or more on its token in the examples, 4.9e-3 at the least at Qwen3 sizes.
    thresholds = {
        "bf16": Threshold(1e-2, 0.9999, 0.999, max_token_rel_l2=2e-2),
        "nvfp4": Threshold(1e-2, 0.9999, 0.999, max_token_rel_l2=2e-2),
    }

    @staticmethod
    def auto_on(capability: tuple[int, int] | None) -> bool:
        return capability is not None and capability[0] >= 8

    def supported(self, device: torch.device, act: str) -> str | None:
        if device.type == "cpu" and interpreting():  # the kernels under Triton's CPU interpreter (tests, tiny shapes)
            return self.act_unsupported(act)
        return super().supported(device, act)

    def experts(self, layer: MoELayer, hidden_states, topk_ids, topk_weights, act: str, out_dtype=None) -> torch.Tensor:
        return layer.forward_triton(hidden_states, topk_ids, topk_weights, act, out_dtype=out_dtype or torch.bfloat16)


class TorchBackend(MoEBackend):
    """The float32 reference on the un-shuffled weights (CPU or GPU; slow, simple)."""

    name = "torch"
    needs_cuda = False
    # Re-computes the reference from the converted layout, so any difference is a layout error: 0 unsharded,
    # <= 8.6e-8 (whole and worst token) for --tp/--ep (fp32 order of the rank sum).
    thresholds = {
        "nvfp4": Threshold(1e-6, 0.999999, 1.0, max_token_rel_l2=1e-6),
        "bf16": Threshold(1e-6, 0.999999, 1.0, max_token_rel_l2=1e-6),
    }

    @staticmethod
    def auto_on(capability: tuple[int, int] | None) -> bool:
        return True

    def experts(self, layer: MoELayer, hidden_states, topk_ids, topk_weights, act: str, out_dtype=None) -> torch.Tensor:
        return layer.forward_torch(hidden_states, topk_ids, topk_weights, act)  # always fp32


# The registry, in auto's order of preference.
BACKENDS: dict[str, MoEBackend] = {b.name: b for b in (TrtllmBackend(), TritonBackend(), TorchBackend())}


def _capability(device: torch.device | str) -> tuple[int, int] | None:
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return None
    return tuple(torch.cuda.get_device_capability(dev))


def default_backend(device: torch.device | str) -> str:
    """trtllm on SM100/SM103, triton on other CUDA GPUs from SM80, torch otherwise."""
    cap = _capability(device)
    return next(b.name for b in BACKENDS.values() if b.auto_on(cap))


def check_choice(backend: str, act: str) -> None:
    if backend not in BACKEND_CHOICES:
        raise InputError(f"--backend {backend!r}: choose one of {', '.join(BACKEND_CHOICES)}")
    if act not in ACT_MODES:
        raise InputError(f"--act {act!r}: choose one of {', '.join(ACT_MODES)}")


def resolve_backend(backend: str, act: str, device: torch.device) -> str:
    """The backend that runs on ``device`` for ``--backend``/``--act``, or an InputError saying why none can."""
    check_choice(backend, act)
    chosen = default_backend(device) if backend == Backend.AUTO.value else backend
    reason = BACKENDS[chosen].supported(device, act)
    if reason:
        raise InputError(reason)
    return chosen


def for_layer(requested: str, chosen: str, gated: bool) -> str:
    """The backend for one layer. Every backend now runs both SwiGLU and non-gated (relu2) experts, so this is the
    chosen one; kept as the one place a per-layer choice would go."""
    return chosen


def run_backend(layer: MoELayer, hidden_states, router_logits, backend: str = "auto", act: str = "nvfp4", out_dtype=None):
    """``layer``'s MoE output with ``backend`` (auto: ``default_backend`` of the layer's device); ``out_dtype``: see
    ``MoEBackend.run``."""
    check_choice(backend, act)
    if backend == Backend.AUTO.value:
        backend = default_backend(layer.device)
    impl = BACKENDS[backend]
    reason = impl.act_unsupported(act)
    if reason:
        raise InputError(reason)
    return impl.run(layer, hidden_states, router_logits, act, out_dtype)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (timing); a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)

"""MoE backends: what runs a converted MoE layer, chosen in one place.

Each backend is a small class: ``supported(device, act, gated)`` says why it cannot run (or None), ``run`` runs a
layer, ``auto_on`` says on which GPUs ``--backend auto`` picks it, and ``thresholds`` are the numerics ``verify``
holds it to (per activation mode; measured margins in docs/verify.md). ``BACKENDS`` is the registry, in ``auto``'s
order of preference. Adding a backend is one class here plus its registry line.
"""

from __future__ import annotations

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
    max_rel_l2: float
    min_cosine: float
    min_frac_close: float  # FlashInfer's own criterion: isclose(atol=0.1, rtol=0.85)


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

    def run(self, layer: MoELayer, hidden_states: torch.Tensor, router_logits: torch.Tensor, act: str) -> torch.Tensor:
        """Route, then run the experts (backends that route inside the kernel override this)."""
        topk_ids, topk_weights = layer.route(router_logits)
        topk_ids = layer.local_ids(topk_ids)
        hidden_states, topk_weights = layer.weights_on_input(hidden_states, topk_weights)
        return self.experts(layer, hidden_states, topk_ids, topk_weights, act)

    def experts(self, layer: MoELayer, hidden_states, topk_ids, topk_weights, act: str) -> torch.Tensor:
        raise NotImplementedError


class TrtllmBackend(MoEBackend):
    """FlashInfer's ``trtllm_fp4_block_scale_moe`` on the tensors as stored (SM100/SM103; routes in the kernel)."""

    name = "trtllm"
    acts = (Act.NVFP4.value,)
    thresholds = {"nvfp4": Threshold(0.2, 0.98, 0.92)}  # FlashInfer's own test criterion

    @staticmethod
    def auto_on(capability: tuple[int, int] | None) -> bool:
        return capability is not None and capability[0] == 10

    def run(self, layer: MoELayer, hidden_states: torch.Tensor, router_logits: torch.Tensor, act: str) -> torch.Tensor:
        from .trtllm import run_trtllm

        return run_trtllm(layer, hidden_states, router_logits)


class TritonBackend(MoEBackend):
    """nvfp4ckpt's own fused NVFP4 MoE reading the kernel layout directly (CUDA, SM80 and newer; SwiGLU only)."""

    name = "triton"
    # Emulates the kernel's numerics exactly except for fp32 summation order and the rare activation-quantization
    # rounding flip that order causes. nvfp4 measured on the H200 (docs/benchmarks.md): 1.7e-3 typically, 5.6e-2
    # when a block of the re-quantized intermediate rounds the other way; a layout error gives > 0.3.
    thresholds = {"bf16": Threshold(1e-2, 0.9999, 0.999), "nvfp4": Threshold(0.1, 0.995, 0.99)}

    @staticmethod
    def auto_on(capability: tuple[int, int] | None) -> bool:
        return capability is not None and capability[0] >= 8

    def experts(self, layer: MoELayer, hidden_states, topk_ids, topk_weights, act: str) -> torch.Tensor:
        return layer.forward_triton(hidden_states, topk_ids, topk_weights, act)


class TorchBackend(MoEBackend):
    """The float32 reference on the un-shuffled weights (CPU or GPU; slow, simple)."""

    name = "torch"
    needs_cuda = False
    # Re-computes the reference from the converted layout, so any difference is a layout error.
    thresholds = {"nvfp4": Threshold(1e-6, 0.999999, 1.0), "bf16": Threshold(1e-6, 0.999999, 1.0)}

    @staticmethod
    def auto_on(capability: tuple[int, int] | None) -> bool:
        return True

    def experts(self, layer: MoELayer, hidden_states, topk_ids, topk_weights, act: str) -> torch.Tensor:
        return layer.forward_torch(hidden_states, topk_ids, topk_weights, act)


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
    """The backend for one layer: with ``--backend auto`` the (SwiGLU-only) Triton kernel leaves non-gated (relu2)
    layers to the torch backend; an explicit choice is kept (and refuses such layers itself)."""
    if requested == Backend.AUTO.value and chosen == TritonBackend.name and not gated:
        return TorchBackend.name
    return chosen


def run_backend(layer: MoELayer, hidden_states, router_logits, backend: str = "auto", act: str = "nvfp4"):
    """``layer``'s MoE output with ``backend`` (auto: ``default_backend`` of the layer's device)."""
    check_choice(backend, act)
    if backend == Backend.AUTO.value:
        backend = default_backend(layer.device)
    impl = BACKENDS[backend]
    reason = impl.act_unsupported(act)
    if reason:
        raise InputError(reason)
    return impl.run(layer, hidden_states, router_logits, act)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (timing); a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)

"""Update live kernel-layout MoE weights in place from source-format tensors, and prove what is live.

An RL trainer emits new NVFP4 expert weights named as the source checkpoint names them (ModelOpt or
compressed-tensors, per-expert or Llama-4 fused). ``update_live_`` writes their kernel layout (docs/layout.md)
straight into the tensors an engine or ``load_moe_layer`` already holds: ``data_ptr()`` never changes, so a CUDA
graph captured before the update replays with the new weights. See docs/reload.md.

How the bytes move: the kernel layout is a fixed permutation of each expert's rows (gated interleave + 32-row
shuffle) and, for block scales, of 4-byte words (the 128x4 swizzle). Without padding both are pure reshapes and
permutes, so each source tensor is copied straight into a strided view of its expert's slice of the live tensor
(numpy on the CPU, one torch copy elsewhere; a run of experts at once when the sources are views of one stacked
buffer). Padded layers use index maps computed once per shape and cached, with ``index_copy_``. No copy of the layer
is made: the only temporaries are one expert-projection of source bytes when it has to change device or be made
contiguous. Zero padding (sizes the kernel cannot take) is never written, so it stays zero.

Scalars: ``g1_alphas``, ``g1_scale_c``, ``g2_alphas`` and ``w13_input_scale_quant`` depend on a1/a2, the maxima
of the input scales over ALL experts of the layer (all ranks' too). They are recomputed with the converter's own
``convert.kernel_scalars`` (same float32 bits). An update whose effect on a1/a2 cannot be determined from what
is supplied and live, or that would leave any expert's scalars stale, is refused before anything is written.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Mapping

from ..._lazy import torch
from ...errors import InputError, LiveMismatchError
from ...source.checkpoint import open_checkpoint
from . import stacked
from .check import _compare
from .names import Context
from .plan import check_aliasing, plan_layer
from .results import LayerUpdate, LiveCheck, UpdateReport
from .write import write_plans

__all__ = ["LayerUpdate", "LiveCheck", "UpdateReport", "UpdateStream", "check_live", "check_live_", "update_live_", "warmup"]


def warmup(device: torch.device | str = "cuda") -> None:
    """Load the GPU write and compare kernels for ``device`` now (an engine's start-up), so that the first update is
    not charged for compiling them. Without Triton, or on the CPU, nothing to do."""
    from .write import _have_triton  # noqa: PLC0415

    if torch.device(device).type == "cuda" and _have_triton():
        from ..kernels.layout_write import warmup as load  # noqa: PLC0415

        load(device)


def update_live_(
    live: Mapping[str, torch.Tensor],
    named_tensors: Mapping[str, torch.Tensor],
    layout: dict,
    *,
    rank: int | None = None,
    input_scale_maxima: Mapping[str, tuple[float, float]] | None = None,
    ignore_unknown: bool = False,
) -> UpdateReport:
    """Write the kernel layout of ``named_tensors`` (source checkpoint names) into ``live`` (canonical names), in place.

    ``layout`` is the converted checkpoint's descriptor; ``rank`` the ``--tp/--ep`` rank the live tensors belong to.
    ``input_scale_maxima`` (prefix -> current (a1, a2)) lets a rank that does not see every expert's input scales
    accept partial updates (``MoELayer.update_`` passes its own). Everything is validated first; a refusal raises an
    ``InputError`` subclass and writes nothing. ``ignore_unknown`` skips names that are not expert tensors of a
    descriptor layer (a trainer's whole state dict) and layers with no tensor in ``live`` (pipeline stages held
    elsewhere) instead of refusing them; the report lists them.
    """
    return _update_live(Context(layout, rank), live, named_tensors, input_scale_maxima, ignore_unknown)

def _update_live(
    ctx: "Context", live: Mapping[str, torch.Tensor], named_tensors: Mapping[str, torch.Tensor],
    input_scale_maxima: Mapping[str, tuple[float, float]] | None, ignore_unknown: bool,
    known_inputs: Mapping[str, dict[int, tuple[float, float]]] | None = None,
) -> UpdateReport:  # fmt: skip
    """update_live_; ``known_inputs`` (prefix -> expert -> current (max w13, w2) input scale) adds what an
    UpdateStream has already applied to what live shows."""
    start = time.perf_counter()
    # transformers-5 stacked experts (gate_up_proj [E, 2I, H], ...) become per-expert views under the source's names
    named_tensors, ignored_stacked, labels = stacked.expand(ctx, named_tensors, ignore_unknown)
    with stacked.named_as_sent(labels):
        grouped, ignored = ctx.group(named_tensors, ignore_unknown)
        ignored += ignored_stacked
        if ignore_unknown:  # e.g. pipeline parallelism: layers this process does not hold
            for prefix in [p for p in grouped if not any(k.startswith(p + ".") for k in live)]:
                names = grouped.pop(prefix)["names"].values()
                ignored += sorted({labels[n].partition("[")[0] if n in labels else n for n in names})  # as sent
        plans = [
            plan_layer(ctx, prefix, entries, live, (input_scale_maxima or {}).get(prefix), known=(known_inputs or {}).get(prefix))
            for prefix, entries in grouped.items()
        ]
        check_aliasing(plans)
        copied = write_plans(plans)  # nothing is written before every layer has been validated
    return UpdateReport(
        layers={p.target.info.prefix: p.report for p in plans}, ignored=ignored, bytes_copied=copied,
        seconds=time.perf_counter() - start,
    )  # fmt: skip

def check_live(
    live: Mapping[str, torch.Tensor],
    source: Mapping[str, torch.Tensor] | str | Path,
    layout: dict,
    *,
    rank: int | None = None,
    input_scale_maxima: Mapping[str, tuple[float, float]] | None = None,
) -> LiveCheck:
    """Whether ``live`` holds exactly the kernel layout of ``source`` (named source tensors, or a source checkpoint
    folder, read one layer at a time). Compares on the live tensors' device, one expert at a time (no copy of the
    layer); returns the first difference (tensor, expert, kernel row, source tensor and row)."""
    ctx = Context(layout, rank)
    if isinstance(source, (str, Path)):
        ckpt = open_checkpoint(source)
        if ckpt.format.name != ctx.fmt.name:
            raise InputError(f"{ckpt.root}: source format {ckpt.format.name} but the layout was converted from {ctx.fmt.name}")
        checked, unchecked = 0, []
        for layer in ckpt.layers:
            if not any(k.startswith(layer.prefix + ".") for k in live):
                continue
            named = {n: ckpt.files.read(n) for n in layer.source_names()}
            result = check_live(live, named, layout, rank=rank, input_scale_maxima=input_scale_maxima)
            if not result.ok:
                return result
            checked += result.checked_experts
            unchecked += result.unchecked
        if not checked:
            raise InputError(f"{ckpt.root}: none of its MoE layers has live tensors to check")
        return LiveCheck(True, f"live tensors equal the kernel layout of {ckpt.root} ({checked} experts)", checked_experts=checked, unchecked=unchecked)
    source, _, labels = stacked.expand(ctx, source, False)
    checked, unchecked = 0, []
    with stacked.named_as_sent(labels):  # refusals name the stacked tensors as sent
        grouped, _ = ctx.group(source, False)
        for prefix, entries in grouped.items():
            result = _compare(plan_layer(ctx, prefix, entries, live, (input_scale_maxima or {}).get(prefix), for_check=True))
            if not result.ok:
                return result
            checked += result.checked_experts
            unchecked += result.unchecked
    return LiveCheck(True, f"live tensors equal the kernel layout of the given tensors ({checked} experts)", checked_experts=checked, unchecked=unchecked)

def check_live_(
    live: Mapping[str, torch.Tensor],
    source: Mapping[str, torch.Tensor] | str | Path,
    layout: dict,
    *,
    rank: int | None = None,
    input_scale_maxima: Mapping[str, tuple[float, float]] | None = None,
) -> LiveCheck:
    """:func:`check_live` that raises ``LiveMismatchError`` (one line: tensor, expert, row) on a difference."""
    result = check_live(live, source, layout, rank=rank, input_scale_maxima=input_scale_maxima)
    if not result.ok:
        raise LiveMismatchError(result.message)
    return result

def update_layer_(layer, named_tensors: Mapping[str, torch.Tensor]) -> UpdateReport:
    """``runtime.MoELayer.update_``: the model-level update on one loaded layer; refreshes its cached state."""
    live = _layer_live(layer)
    report = update_live_(live, named_tensors, _layer_descriptor(layer), rank=layer.rank.rank if layer.rank else None,
                          input_scale_maxima=_layer_maxima(layer))  # fmt: skip
    done = report.layers.get(layer.prefix)
    if done is not None:
        if layer.global_input_scales is not None:
            layer.global_input_scales = done.input_scale_maxima
        layer._source = None  # the torch backend's un-shuffled copy is stale now
    return report

def check_layer(layer, source: str | Path | None = None, tensors: Mapping[str, torch.Tensor] | None = None) -> LiveCheck:
    """``runtime.MoELayer.check_live``: ``source`` (a source checkpoint folder) or ``tensors`` (named source tensors)."""
    if (source is None) == (tensors is None):
        raise InputError("check_live: pass exactly one of source= (a source checkpoint folder) or tensors= (named source tensors)")
    return check_live(_layer_live(layer), source if tensors is None else tensors, _layer_descriptor(layer),
                      rank=layer.rank.rank if layer.rank else None, input_scale_maxima=_layer_maxima(layer))  # fmt: skip

def _layer_live(layer) -> dict[str, torch.Tensor]:
    return {f"{layer.prefix}.{name}": t for name, t in layer.tensors.items()}

def _layer_descriptor(layer) -> dict:
    if not getattr(layer, "descriptor", None):
        raise InputError(f"{layer.prefix}: this MoELayer has no layout descriptor; load it with load_moe_layer")
    return layer.descriptor

def _layer_maxima(layer) -> dict[str, tuple[float, float]] | None:
    return {layer.prefix: tuple(layer.global_input_scales)} if layer.global_input_scales else None


from .stream import UpdateStream  # noqa: E402  (it calls _update_live)

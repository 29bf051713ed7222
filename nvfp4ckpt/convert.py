"""Source checkpoint -> kernel-ready checkpoint, streaming one MoE layer at a time.

The output is planned from headers alone (names, dtypes, shapes, shards), then written shard by
shard into a temporary folder next to DST that is renamed into place only when complete.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from ._lazy import torch

from . import layout
from .checkpoint import MoELayer, SourceCheckpoint, _natural_key, open_checkpoint
from .descriptor import (
    LayerInfo,
    canonical_specs,
    build_descriptor,
    header_metadata,
)
from .errors import InputError
from .formats import DESCRIPTOR_KEY, KERNEL_QUANT_METHOD, SOURCE_QUANT_KEY
from .io import Array, PlannedTensor, as_float32, out_buffer, parse_size, scratch_buffer, torch_dtype
from .parallel import RankSpec, rank_specs, slice_source, to_kernel
from .writer import CheckpointJob, Progress, ProgressFn, check_destination, write_checkpoint

DEFAULT_MAX_SHARD_SIZE = "50GB"  # transformers' save_pretrained default


@dataclass
class ConvertResult:
    source: Path
    destination: Path
    source_format: str
    architecture: str
    num_moe_layers: int
    files: list[dict] = field(default_factory=list)
    bytes_written: int = 0
    seconds: float = 0.0
    descriptor: dict = field(default_factory=dict)
    reused: list[str] = field(default_factory=list)  # shards kept from an interrupted run (--resume)

    def to_dict(self) -> dict:
        return {
            "source": str(self.source),
            "destination": str(self.destination),
            "source_format": self.source_format,
            "architecture": self.architecture,
            "num_moe_layers": self.num_moe_layers,
            "bytes_written": self.bytes_written,
            "seconds": round(self.seconds, 3),
            "shards_reused": len(self.reused),
            "files": self.files,
        }


HIDDEN_ALIGN = 128  # the kernel's need (block-scale rows of w2); vLLM pads H to 256 (convert --pad-hidden 256)


def convert_checkpoint(
    src: str | Path,
    dst: str | Path,
    *,
    overwrite: bool = False,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    device: str = "cpu",
    revision: str | None = None,
    progress: ProgressFn | None = None,
    workers: int | None = None,
    tp: int = 1,
    ep: int = 1,
    resume: bool = False,
    pad_hidden: int = HIDDEN_ALIGN,
) -> ConvertResult:
    """Write the kernel-ready version of ``src`` to ``dst``; see README "Output contract".

    ``workers`` threads read and transform MoE layers ahead of the writer (default: ``default_workers()``);
    the output bytes are the same for any value. ``tp``/``ep`` > 1 write one set of MoE files per rank
    (see ``nvfp4ckpt.parallel``); non-expert tensors stay whole at the top level. ``resume`` continues an
    interrupted run into the same DST, reusing its finished shards (see ``writer.write_checkpoint``). ``pad_hidden``:
    the hidden size is zero-padded to a multiple of it (128, the kernel's need; 256 for vLLM, which pads to 256)."""
    start = time.perf_counter()
    try:
        max_bytes = parse_size(max_shard_size)
    except ValueError as exc:
        raise InputError(f"--max-shard-size: {exc}") from None
    if pad_hidden < HIDDEN_ALIGN or pad_hidden % HIDDEN_ALIGN:
        raise InputError(f"--pad-hidden {pad_hidden}: use a multiple of {HIDDEN_ALIGN} (128; 256 for vLLM)")
    ckpt = open_checkpoint(src, revision)
    dst_path = Path(dst).expanduser()
    check_destination(ckpt.root, dst_path, overwrite)
    if not _on_cpu(device) and not (device.startswith("cuda") and torch.cuda.is_available()):
        raise InputError(f"--device {device}: no such device here; use --device cpu")

    ranks = {
        l.prefix: rank_specs(tp, ep, l.num_experts, l.intermediate_size, f"{ckpt.root}: {l.prefix}", l.gated)
        for l in ckpt.layers
    }
    sharded = tp * ep > 1
    descriptor = _descriptor(ckpt, ranks if sharded else None, tp, ep, pad_hidden)
    planned, layer_of = _plan_tensors(ckpt, ranks if sharded else None, pad_hidden)
    by_prefix = {layer.prefix: layer for layer in ckpt.layers}

    def compute(prefix: str) -> dict[str, Array]:
        layer = by_prefix[prefix]
        if sharded:
            return convert_layer_ranks(ckpt, layer, ranks[prefix], device, pad_hidden)
        return convert_layer(ckpt, layer, device, pad_hidden)

    job = CheckpointJob(
        source=ckpt.files,
        planned=planned,
        computed={key: layer.prefix for key, layer in layer_of.items()},
        compute=compute,
        metadata=header_metadata(descriptor),
        part_metadata={r.part: {"nvfp4ckpt_rank": json.dumps(r.to_dict(), sort_keys=True)} for r in next(iter(ranks.values()))} if sharded else {},
        config=_output_config(ckpt, descriptor),
        max_shard_bytes=max_bytes,
        manifest_fields={"tool": "nvfp4ckpt", "layout": descriptor["layout"], "layout_version": descriptor["layout_version"]},
    )
    if workers is not None and workers < 1:
        raise InputError("--workers must be at least 1")
    written = write_checkpoint(job, dst_path, progress, workers=workers or default_workers(), overwrite=overwrite, resume=resume)
    files = written.files
    return ConvertResult(
        source=ckpt.root,
        destination=dst_path,
        source_format=ckpt.format.name,
        architecture=ckpt.arch.name,
        num_moe_layers=len(ckpt.layers),
        files=files,
        bytes_written=sum(f["size"] for f in files),
        seconds=time.perf_counter() - start,
        descriptor=descriptor,
        reused=written.reused,
    )


# ----------------------------------------------------------------------------------------------
# Planning


def default_workers() -> int:
    """Layer threads: one per core left over by the writer's write and hash threads, 1 to 4. On 2 cores a
    second layer thread competes with those two and made runs slower and erratic (docs/benchmarks.md); beyond
    4 the copy is memory- and disk-bound."""
    return max(1, min(4, (os.cpu_count() or 1) - 2))


def padded_dims(layer: MoELayer, pad_hidden: int = HIDDEN_ALIGN) -> tuple[int, int]:
    """(H, I) as stored: padded to H % pad_hidden == 0 and I % 64 == 0 (non-gated: 128) where needed."""
    dims = layout.MoEDims(layer.num_experts, layer.hidden_size, layer.intermediate_size, layer.gated)
    return -(-layer.hidden_size // pad_hidden) * pad_hidden, dims.intermediate_padded


def _descriptor(
    ckpt: SourceCheckpoint, ranks: dict[str, list[RankSpec]] | None, tp: int, ep: int, pad_hidden: int = HIDDEN_ALIGN
) -> dict:
    infos = [
        LayerInfo(
            l.prefix, l.num_experts, l.hidden_size, l.intermediate_size, l.proj_names, l.scalar_dtype,
            tuple(l.scalar_shape), *padded_dims(l, pad_hidden), "bmm" if l.fused else None,
        )  # fmt: skip
        for l in ckpt.layers
    ]
    descriptor = build_descriptor(
        source_format=ckpt.format.name,
        architecture=ckpt.arch.name,
        routing=ckpt.routing.to_dict(),
        layers=infos,
        config_had_quantization_config=isinstance(ckpt.config.get("quantization_config"), dict),
        activation=ckpt.arch.activation,
    )
    if pad_hidden != HIDDEN_ALIGN:
        descriptor["padding"] = descriptor["padding"].replace("(H, to 128)", f"(H, to {pad_hidden})")
    if ranks:
        first = next(iter(ranks.values()))
        descriptor["parallel"] = {
            "tp": tp,
            "ep": ep,
            "rank_order": "rank = ep_rank * tp + tp_rank",
            "ranks": [{"rank": r.rank, "tp_rank": r.tp_rank, "ep_rank": r.ep_rank, "part": r.part} for r in first],
            "non_expert_tensors": "top-level files, whole (engines slice them as usual)",
        }
        for prefix, specs in ranks.items():
            descriptor["layers"][prefix]["ranks"] = [
                {
                    "rank": r.rank,
                    "experts": [r.expert_start, r.expert_end],
                    "intermediate": [r.inter_start, r.inter_end],
                    "intermediate_size_padded": r.intermediate_padded,
                }
                for r in specs
            ]
    return descriptor


def layer_output_specs(layer: MoELayer, source_format: str, pad_hidden: int = HIDDEN_ALIGN) -> list[PlannedTensor]:
    """Names, dtypes and shapes of one layer's output tensors, in write order."""
    h_pad, i_pad = padded_dims(layer, pad_hidden)
    specs = canonical_specs(layer.prefix, layer.num_experts, h_pad, i_pad, source_format, layer.scalar_dtype, layer.gated)
    return [PlannedTensor(name, dtype, shape) for name, dtype, shape in specs]


def _plan_tensors(
    ckpt: SourceCheckpoint, ranks: dict[str, list[RankSpec]] | None = None, pad_hidden: int = HIDDEN_ALIGN
) -> tuple[list[PlannedTensor], dict[str, MoELayer]]:
    """Every output tensor in a deterministic order: source names in natural order, each MoE
    layer's canonical tensors placed where its first expert tensor would have been."""
    expert_names = {}
    for layer in ckpt.layers:
        for n in layer.source_names():
            expert_names[n] = layer
    planned: list[PlannedTensor] = []
    layer_of: dict[str, MoELayer] = {}
    emitted: set[str] = set()
    for name in sorted(ckpt.files.tensors, key=_natural_key):
        layer = expert_names.get(name)
        if layer is None:
            info = ckpt.files.tensors[name]
            planned.append(PlannedTensor(name, info.dtype, info.shape))
        elif layer.prefix not in emitted:
            emitted.add(layer.prefix)
            if ranks is None:
                specs = layer_output_specs(layer, ckpt.format.name, pad_hidden)
            else:
                h_pad, _ = padded_dims(layer, pad_hidden)
                specs = [
                    PlannedTensor(n, dtype, shape, part=r.part)
                    for r in ranks[layer.prefix]
                    for n, dtype, shape in canonical_specs(
                        layer.prefix, r.num_experts, h_pad, r.intermediate_padded, ckpt.format.name, layer.scalar_dtype,
                        layer.gated,
                    )
                ]
            for spec in specs:
                if spec.name in ckpt.files.tensors:
                    raise InputError(
                        f"{ckpt.files.info(spec.name).file}: tensor {spec.name!r} already exists next to per-expert tensors; "
                        "the checkpoint mixes fused and per-expert experts"
                    )
                planned.append(spec)
                layer_of[spec.key] = layer
    return planned, layer_of


# ----------------------------------------------------------------------------------------------
# The transform of one layer


def read_layer_source(ckpt: SourceCheckpoint, layer: MoELayer) -> dict[str, torch.Tensor]:
    """Stacked source tensors of a layer: w31/s31 ``[up ; gate]`` (non-gated: ``[up]``), down/down_scale,
    raw scalars ``[E, roles, 2]`` (roles gate, up, down; non-gated up, down)."""
    e, h, i = layer.num_experts, layer.hidden_size, layer.intermediate_size
    files = ckpt.files
    w13_roles = ("up", "gate") if layer.gated else ("up",)  # row blocks of w31, in order
    n = len(w13_roles)
    w31 = torch.empty((e, n * i, h // 2), dtype=torch.uint8)
    s31 = torch.empty((e, n * i, h // 16), dtype=torch.uint8)
    down = torch.empty((e, h, i // 2), dtype=torch.uint8)
    down_s = torch.empty((e, h, i // 16), dtype=torch.uint8)
    scalar_dtype = torch_dtype(layer.scalar_dtype)
    # raw[e, role, 0] = weight global, raw[e, role, 1] = input global
    raw = torch.empty((e, len(layer.roles), 2), dtype=scalar_dtype)
    if layer.fused:
        return _read_fused_layer(ckpt, layer, raw)
    for x, names in enumerate(layer.experts):
        for k, role in enumerate(w13_roles):
            files.read_into(names[role].weight, w31[x, k * i : (k + 1) * i])
            files.read_into(names[role].weight_scale, s31[x, k * i : (k + 1) * i])
        files.read_into(names["down"].weight, down[x])
        files.read_into(names["down"].weight_scale, down_s[x])
        for r, role in enumerate(layer.roles):
            files.read_into(names[role].weight_global, raw[x, r, 0])
            files.read_into(names[role].input_global, raw[x, r, 1])
    return {"w31": w31, "s31": s31, "down": down, "down_scale": down_s, "raw_scalars": raw}


def _read_fused_layer(ckpt: SourceCheckpoint, layer: MoELayer, raw: torch.Tensor) -> dict[str, torch.Tensor]:
    """A fused (input-major) layer: gate_up ``[E, H/2, 2I]`` -> rows ``[up ; gate]``; down ``[E, I/2, H]`` -> ``[E, H, I/2]``.
    Transposing a byte matrix keeps each byte (two E2M1 codes along H, or I) whole, so this is exact."""
    files, i, f = ckpt.files, layer.intermediate_size, layer.fused
    gate_up = files.read(f["gate_up"].weight).transpose(1, 2)  # [E, 2I, H/2]: gate rows, then up rows
    gate_up_s = files.read(f["gate_up"].weight_scale).view(torch.uint8).transpose(1, 2)
    w31 = torch.cat([gate_up[:, i:], gate_up[:, :i]], 1)
    s31 = torch.cat([gate_up_s[:, i:], gate_up_s[:, :i]], 1)
    down = files.read(f["down"].weight).transpose(1, 2).contiguous()
    down_s = files.read(f["down"].weight_scale).view(torch.uint8).transpose(1, 2).contiguous()
    for r, role in enumerate(("gate_up", "gate_up", "down")):  # one global scale per fused tensor, for every expert
        raw[:, r, 0] = files.read(f[role].weight_global).reshape(())
        raw[:, r, 1] = files.read(f[role].input_global).reshape(())
    return {"w31": w31, "s31": s31, "down": down, "down_scale": down_s, "raw_scalars": raw}


def kernel_scalars(ws2: Array, input_scale: Array) -> dict[str, Array]:
    """Per-expert scalars from ModelOpt-convention scales ``[E, 3]`` (columns gate, up, down), or
    ``[E, 2]`` (up, down) for non-gated experts: torch tensors in, torch tensors out; numpy arrays in,
    numpy arrays out (the CPU fast path). Either way every operation is one IEEE float32 operation
    (correctly rounded), so both give the same bits.

    Operation order follows SGLang's ModelOpt path so the float32 bits match it.
    """
    ws2 = as_float32(ws2)
    input_scale = as_float32(input_scale)
    n = ws2.shape[1] - 1  # w13 columns
    a1 = input_scale[:, :n].max()
    a2 = input_scale[:, n].max()
    w2_input_scale_quant = 1.0 / a2  # float32: a Python float does not widen a float32 operand (numpy >= 2, torch)
    out = {
        "w13_weight_scale_2": ws2[:, :n],
        "w2_weight_scale_2": ws2[:, n],
        "w13_input_scale": input_scale[:, :n],
        "w2_input_scale": input_scale[:, n],
        "g1_alphas": a1 * ws2[:, 0],
        "g1_scale_c": w2_input_scale_quant * (a1 * ws2[:, n - 1]),
        "g2_alphas": a2 * ws2[:, n],
        "w13_input_scale_quant": (1.0 / a1).reshape(1),
    }
    return {name: _contiguous(value) for name, value in out.items()}


def _contiguous(x: Array) -> Array:
    return np.ascontiguousarray(x) if isinstance(x, (np.ndarray, np.generic)) else x.contiguous()


def _on_cpu(device: str) -> bool:
    return device.split(":")[0] == "cpu"


def convert_layer_ranks(
    ckpt: SourceCheckpoint, layer: MoELayer, ranks: list[RankSpec], device: str = "cpu", pad_hidden: int = HIDDEN_ALIGN
) -> dict[str, torch.Tensor]:
    """Every rank's output tensors of one MoE layer (the source layer is read once), keyed by
    ``part/name``. Scalars use the global a1/a2 and are sliced to each rank's experts."""
    src = read_layer_source(ckpt, layer)
    dev = torch.device(device)
    h_pad, _ = padded_dims(layer, pad_hidden)
    scalars = _layer_scalars(ckpt, layer, src["raw_scalars"])
    out: dict[str, torch.Tensor] = {}
    for r in ranks:
        pieces = (t.to(dev) for t in slice_source(src, r, layer.intermediate_size))
        w13, s13, w2, s2 = to_kernel(*pieces, h_pad, r.intermediate_padded, layer.gated)
        tensors = {"w13_weight": w13.cpu(), "w13_weight_scale": s13.cpu(), "w2_weight": w2.cpu(), "w2_weight_scale": s2.cpu()}
        for name, value in scalars.items():
            tensors[name] = value if name == "w13_input_scale_quant" else value[r.expert_start : r.expert_end].contiguous()
        for name, value in tensors.items():
            out[f"{r.part}/{layer.prefix}.{name}"] = value
    return out


def _layer_scalars(ckpt: SourceCheckpoint, layer: MoELayer, raw: Array) -> dict[str, Array]:
    """The layer's scalar tensors from its raw global scales ``[E, roles, 2]`` (numpy or torch, as given)."""
    to_mult = ckpt.format.to_dequant_multiplier
    scalars = kernel_scalars(to_mult(raw[:, :, 0]), to_mult(raw[:, :, 1]))
    for name, value in scalars.items():
        v = np.asarray(value)  # float32 on the CPU either way: no copy
        if not np.isfinite(v).all() or (v <= 0).any():
            raise InputError(
                f"{ckpt.root}: {layer.prefix}.{name} has non-finite or non-positive values; "
                "the checkpoint's global scales are broken"
            )
    if ckpt.format.name == "compressed-tensors":
        n = raw.shape[1] - 1
        scalars["w13_weight_global_scale"] = _contiguous(raw[:, :n, 0])
        scalars["w2_weight_global_scale"] = _contiguous(raw[:, n, 0])
        scalars["w13_input_global_scale"] = _contiguous(raw[:, :n, 1])
        scalars["w2_input_global_scale"] = _contiguous(raw[:, n, 1])
    return scalars


def convert_layer(ckpt: SourceCheckpoint, layer: MoELayer, device: str = "cpu", pad_hidden: int = HIDDEN_ALIGN) -> dict[str, Array]:
    """All output tensors of one MoE layer, keyed by full name: their bytes, as the writer takes them.
    On the CPU fast path these are numpy arrays (block scales as raw uint8; torch is not imported),
    otherwise CPU torch tensors of the output dtypes."""
    if _on_cpu(device) and _has_fast_path(layer, pad_hidden):
        return {f"{layer.prefix}.{k}": v for k, v in _convert_layer_fast(ckpt, layer).items()}
    src = read_layer_source(ckpt, layer)
    dev = torch.device(device)
    pieces = (src[k].to(dev) for k in ("w31", "s31", "down", "down_scale"))
    w13, s13, w2, s2 = to_kernel(*pieces, *padded_dims(layer, pad_hidden), gated=layer.gated)
    out = {
        "w13_weight": w13.cpu(),
        "w13_weight_scale": s13.cpu(),
        "w2_weight": w2.cpu(),
        "w2_weight_scale": s2.cpu(),
        **_layer_scalars(ckpt, layer, src["raw_scalars"]),
    }
    return {f"{layer.prefix}.{k}": v for k, v in out.items()}


# The CPU fast path: the same bytes as ``read_layer_source`` + ``parallel.to_kernel`` (tests check it), but one
# expert at a time: its six tensors are read into a small scratch buffer (cache-warm, reused) and permuted from there
# straight into the output buffers (pooled by the writer): no stacked per-layer source copy, no intermediate
# row-permuted copy. The copies go through numpy: single-threaded and without the GIL, so layer threads run them in
# parallel, whereas a torch copy this small is split over OpenMP threads, which stalls badly when the cores are busy.


def _has_fast_path(layer: MoELayer, pad_hidden: int = HIDDEN_ALIGN) -> bool:
    """Gated per-expert layers that need no padding (the kernel layout is then a pure per-expert permutation)
    and have float32 global scales (as ModelOpt and llm-compressor write them; numpy has no bfloat16)."""
    return (
        padded_dims(layer, pad_hidden) == (layer.hidden_size, layer.intermediate_size)
        and layer.scalar_dtype == "F32"
        and bool(layer.experts)
        and all(set(names) == {"gate", "up", "down"} for names in layer.experts)
    )


def _convert_layer_fast(ckpt: SourceCheckpoint, layer: MoELayer) -> dict[str, np.ndarray]:
    e, h, i = layer.num_experts, layer.hidden_size, layer.intermediate_size
    files = ckpt.files
    w13 = out_buffer((e, 2 * i, h // 2))
    s13 = out_buffer((e, 2 * i, h // 16))
    w2 = out_buffer((e, h, i // 2))
    s2 = out_buffer((e, h, i // 16))
    raw = np.empty((e, 3, 2), dtype=np.float32)
    w_bytes, s_bytes = i * h // 2, i * h // 16  # per expert and projection (up, gate and down alike)
    with scratch_buffer(3 * (w_bytes + s_bytes)) as scratch:  # one expert's source tensors, reused
        cuts = np.cumsum([w_bytes] * 3 + [s_bytes] * 2)
        up, gate, down, up_s, gate_s, down_s = np.split(scratch, cuts)
        up, gate, down = up.reshape(i, h // 2), gate.reshape(i, h // 2), down.reshape(h, i // 2)
        up_s, gate_s, down_s = up_s.reshape(i, h // 16), gate_s.reshape(i, h // 16), down_s.reshape(h, i // 16)
        for x, names in enumerate(layer.experts):
            for name, dst in ((names["up"].weight, up), (names["gate"].weight, gate), (names["down"].weight, down),
                              (names["up"].weight_scale, up_s), (names["gate"].weight_scale, gate_s),
                              (names["down"].weight_scale, down_s)):  # fmt: skip
                files.read_into(name, dst)
            for half, (rows, scales) in enumerate(((up, up_s), (gate, gate_s))):
                layout.w13_rows_into(w13[x], half, rows)
                layout.w13_scales_into(s13[x], half, scales)
            layout.w2_rows_into(w2[x], down)
            layout.w2_scales_into(s2[x], down_s)
            for r, role in enumerate(("gate", "up", "down")):
                files.read_into(names[role].weight_global, raw[x, r, 0:1])  # a slice: a view, not a copy
                files.read_into(names[role].input_global, raw[x, r, 1:2])
    return {"w13_weight": w13, "w13_weight_scale": s13, "w2_weight": w2, "w2_weight_scale": s2, **_layer_scalars(ckpt, layer, raw)}


# ----------------------------------------------------------------------------------------------
# Files


def _output_config(ckpt: SourceCheckpoint, descriptor: dict) -> dict:
    """config.json of the output: the source config with its quantization_config wrapped (see
    ``formats.base.KERNEL_QUANT_METHOD``): engines without the nvfp4ckpt plugin refuse it instead of shuffling twice."""
    config = json.loads(json.dumps(ckpt.config))
    qcfg = config.get("quantization_config")
    if not isinstance(qcfg, dict):
        # ModelOpt with only hf_quant_config.json: the plugins' dense layers need the flat form.
        qcfg = {"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": ckpt.format.group_size}
        if ckpt.format.exclude:
            qcfg["ignore"] = list(ckpt.format.exclude)
    config["quantization_config"] = {
        "quant_method": KERNEL_QUANT_METHOD,
        SOURCE_QUANT_KEY: qcfg,
        DESCRIPTOR_KEY: descriptor,
    }
    return config

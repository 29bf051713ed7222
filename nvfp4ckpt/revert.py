"""Kernel-ready checkpoint -> the source format it came from, byte-identical per tensor."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from ._args import Args
from ._lazy import torch

from .source.checkpoint import natural_key
from .layouts.trtllm_gen.converted import ConvertedCheckpoint, open_converted
from .layouts.trtllm_gen.descriptor import LayerInfo
from .errors import DamagedCheckpointError, InputError
from .source.formats import DESCRIPTOR_KEY, FORMATS, SOURCE_QUANT_KEY
from .io import PlannedTensor, format_size, torch_dtype
from .verify.descriptor import add_descriptor_check
from .verify.structure import check_structure
from .output.card import restore_plan
from .output import DEFAULT_MAX_SHARD_SIZE, CheckpointJob, check_destination, max_shard_bytes, write_checkpoint
from .progress import ProgressFn



@dataclass
class RevertResult:
    source: Path
    destination: Path
    source_format: str
    num_moe_layers: int
    files: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    reused: list[str] = field(default_factory=list)  # shards kept from an interrupted run (--resume)

    def to_dict(self) -> dict:
        return {
            "source": str(self.source),
            "destination": str(self.destination),
            "source_format": self.source_format,
            "num_moe_layers": self.num_moe_layers,
            "seconds": round(self.seconds, 3),
            "shards_reused": len(self.reused),
            "files": self.files,
        }


def revert_checkpoint(
    src: str | Path,
    dst: str | Path,
    *,
    overwrite: bool = False,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    progress: ProgressFn | None = None,
    resume: bool = False,
) -> RevertResult:
    """Write the source-format checkpoint of a converted one (per-expert names, original scalars)."""
    start = time.perf_counter()
    a = Args("revert_checkpoint")
    a.path("src", src)
    a.path("dst", dst)
    a.bool("overwrite", overwrite, "--overwrite")
    a.size("max_shard_size", max_shard_size, "--max-shard-size")
    a.callable("progress", progress)
    a.bool("resume", resume, "--resume")
    max_bytes = max_shard_bytes(max_shard_size)
    ckpt = open_converted(src)
    fmt = FORMATS.get(ckpt.source_format)
    if fmt is None:
        raise InputError(f"{ckpt.root}: unknown source_format {ckpt.source_format!r} in the descriptor")
    dst_path = Path(dst).expanduser()
    dst_path = check_destination(ckpt.root, dst_path, overwrite)
    _require_structure(ckpt)

    owned = {name for layer in ckpt.layers for name in layer.tensor_names(ckpt.source_format)}
    for layer in ckpt.layers:
        for rank in layer.ranks or (None,):
            for name in layer.tensor_names(ckpt.source_format):
                ckpt.files_for(rank).info(name)  # a missing canonical tensor is an input error, named
    planned: list[PlannedTensor] = []
    computed: dict[str, str] = {}
    for name, info in ckpt.files.tensors.items():
        if name not in owned:
            planned.append(PlannedTensor(name, info.dtype, info.shape))
    for layer in ckpt.layers:
        for spec in _expert_specs(layer, fmt):
            planned.append(spec)
            computed[spec.name] = layer.prefix
    planned.sort(key=lambda t: natural_key(t.name))
    by_prefix = {layer.prefix: layer for layer in ckpt.layers}
    restore = restore_plan(ckpt.root)  # the source's README.md and hf_quant_config.json, as they were
    job = CheckpointJob(
        source=ckpt.files,
        planned=planned,
        computed=computed,
        compute=lambda prefix: revert_layer(ckpt, by_prefix[prefix]),
        metadata={"format": "pt"},
        config=_source_config(ckpt),
        max_shard_bytes=max_bytes,
        manifest_fields=None,
        skip_files={"ranks"} | restore.skip,
        files=restore.listed,
        options={"--max-shard-size": format_size(max_bytes)},
    )
    written = write_checkpoint(job, dst_path, progress, overwrite=overwrite, resume=resume)
    return RevertResult(
        ckpt.root, dst_path, ckpt.source_format, len(ckpt.layers), written.files, time.perf_counter() - start, written.reused
    )


def _require_structure(ckpt: ConvertedCheckpoint) -> None:
    """Revert trusts the descriptor to name and shape every source tensor: a checkpoint that fails the structure
    check (manifest, canonical tensors, scalars, descriptor self-consistency) would give a wrong "source"
    (experts dropped, zero-sized weights, kernel-layout tensors written as source tensors), so it is refused."""
    result = check_structure(ckpt, hash_files=True)
    add_descriptor_check(result, ckpt, None)
    if result.status == "fail":
        more = f" (and {len(result.problems) - 1} more)" if len(result.problems) > 1 else ""
        raise DamagedCheckpointError(
            f"{ckpt.root}: fails the structure check: {result.problems[0]}{more}; run `nvfp4ckpt verify {ckpt.root}` "
            "for the list, and revert from an intact conversion"
        )


def _expert_specs(layer: LayerInfo, fmt) -> list[PlannedTensor]:
    e, h, i = layer.num_experts, layer.hidden_size, layer.intermediate_size
    if layer.source_fused:
        return [
            PlannedTensor(f"{layer.prefix}.{proj}{sfx}", dtype, shape)
            for proj, (k, n) in (("gate_up_proj", (h, 2 * i)), ("down_proj", (i, h)))
            for sfx, dtype, shape in (
                ("", "U8", (e, k // 2, n)),
                ("_weight_scale", "F8_E4M3", (e, k // 16, n)),
                ("_weight_scale_2", layer.scalar_dtype, layer.scalar_shape),
                ("_input_scale", layer.scalar_dtype, layer.scalar_shape),
            )
        ]
    shapes = {"gate": (i, h), "up": (i, h), "down": (h, i)}
    out = []
    for x in range(e):
        for role in layer.roles:
            n, k = shapes[role]
            base = f"{layer.prefix}.{x}.{layer.proj_names[role]}"
            out.append(PlannedTensor(f"{base}.{fmt.weight_suffix}", "U8", (n, k // 2)))
            out.append(PlannedTensor(f"{base}.{fmt.weight_scale_suffix}", "F8_E4M3", (n, k // 16)))
            out.append(PlannedTensor(f"{base}.{fmt.weight_global_suffix}", layer.scalar_dtype, layer.scalar_shape))
            out.append(PlannedTensor(f"{base}.{fmt.input_global_suffix}", layer.scalar_dtype, layer.scalar_shape))
    return out


def revert_layer(ckpt: ConvertedCheckpoint, layer: LayerInfo) -> dict[str, torch.Tensor]:
    """All per-expert source tensors of one layer (reassembled from every rank, padding dropped)."""
    fmt = FORMATS[ckpt.source_format]
    t = ckpt.reassemble_layer(layer)
    i = layer.intermediate_size
    e4m3 = torch.float8_e4m3fn
    # w31 rows: [up ; gate] (gated) or [up]; scalar columns: (gate, up, down) or (up, down)
    mats = {"up": (t["w31"][:, :i], t["s31"][:, :i].view(e4m3)), "down": (t["down"], t["down_scale"].view(e4m3))}
    if layer.gated:
        mats["gate"] = (t["w31"][:, i:], t["s31"][:, i:].view(e4m3))
    dtype = torch_dtype(layer.scalar_dtype)
    w13_w, w2_w, w13_i, w2_i = fmt.stored_scalar_names()  # the global scales in the source's own convention
    w_glob = torch.cat([t[w13_w], t[w2_w].unsqueeze(1)], 1).to(dtype)
    i_glob = torch.cat([t[w13_i], t[w2_i].unsqueeze(1)], 1).to(dtype)
    if layer.source_fused:
        return _fused_tensors(layer, mats, w_glob, i_glob)
    out: dict[str, torch.Tensor] = {}
    for x in range(layer.num_experts):
        for r, role in enumerate(layer.roles):
            base = f"{layer.prefix}.{x}.{layer.proj_names[role]}"
            w, s = mats[role]
            out[f"{base}.{fmt.weight_suffix}"] = w[x]
            out[f"{base}.{fmt.weight_scale_suffix}"] = s[x]
            out[f"{base}.{fmt.weight_global_suffix}"] = w_glob[x, r].reshape(layer.scalar_shape)
            out[f"{base}.{fmt.input_global_suffix}"] = i_glob[x, r].reshape(layer.scalar_shape)
    return out


def _fused_tensors(layer: LayerInfo, mats: dict, w_glob: torch.Tensor, i_glob: torch.Tensor) -> dict[str, torch.Tensor]:
    """The fused input-major tensors back: gate_up ``[E, H/2, 2I]`` (gate then up), down ``[E, I/2, H]``; the
    one global scale per fused tensor is the same for every expert (column gate for gate_up)."""
    (gate, gate_s), (up, up_s), (down, down_s) = mats["gate"], mats["up"], mats["down"]
    p, shape = layer.prefix, layer.scalar_shape
    return {
        f"{p}.gate_up_proj": torch.cat([gate, up], 1).transpose(1, 2).contiguous(),
        f"{p}.gate_up_proj_weight_scale": torch.cat([gate_s.view(torch.uint8), up_s.view(torch.uint8)], 1).transpose(1, 2).contiguous().view(torch.float8_e4m3fn),
        f"{p}.gate_up_proj_weight_scale_2": w_glob[0, 0].reshape(shape),
        f"{p}.gate_up_proj_input_scale": i_glob[0, 0].reshape(shape),
        f"{p}.down_proj": down.transpose(1, 2).contiguous(),
        f"{p}.down_proj_weight_scale": down_s.view(torch.uint8).transpose(1, 2).contiguous().view(torch.float8_e4m3fn),
        f"{p}.down_proj_weight_scale_2": w_glob[0, 2].reshape(shape),
        f"{p}.down_proj_input_scale": i_glob[0, 2].reshape(shape),
    }


def _source_config(ckpt: ConvertedCheckpoint) -> dict:
    config = json.loads(json.dumps(ckpt.config))
    qcfg = config.get("quantization_config", {})
    if SOURCE_QUANT_KEY in qcfg:  # the wrapped form (quant_method nvfp4_trtllm)
        config["quantization_config"] = qcfg[SOURCE_QUANT_KEY]
    else:  # written before the wrapped form: the source's own section with the descriptor added
        qcfg.pop(DESCRIPTOR_KEY, None)
    if not ckpt.descriptor.get("config_had_quantization_config", True):
        config.pop("quantization_config", None)
    return config

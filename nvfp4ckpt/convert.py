"""Source checkpoint -> kernel-ready checkpoint, streaming one MoE layer at a time.

The output is planned from headers alone (names, dtypes, shapes, shards), then written shard by
shard into a temporary folder next to DST that is renamed into place only when complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import layout
from .checkpoint import MoELayer, SourceCheckpoint, _natural_key, open_checkpoint
from .descriptor import (
    KERNEL_TENSORS,
    MANIFEST_NAME,
    RAW_CT_TENSORS,
    SCALAR_TENSORS,
    LayerInfo,
    build_descriptor,
    header_metadata,
)
from .errors import InputError, OutputExistsError, UnsupportedShapeError
from .formats import DESCRIPTOR_KEY
from .io import DTYPE_TO_TORCH, INDEX_NAME, PlannedTensor, ShardWriter, parse_size, plan_shards

DEFAULT_MAX_SHARD_SIZE = "50GB"  # transformers' save_pretrained default
_SKIP_FILES = {"config.json", INDEX_NAME, MANIFEST_NAME}


@dataclass
class Progress:
    """What the converter reports as it goes (the CLI draws bars from it)."""

    stage: str  # "plan" | "layer" | "bytes" | "done"
    layers_done: int = 0
    layers_total: int = 0
    bytes_done: int = 0
    bytes_total: int = 0


ProgressFn = Callable[[Progress], None]


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

    def to_dict(self) -> dict:
        return {
            "source": str(self.source),
            "destination": str(self.destination),
            "source_format": self.source_format,
            "architecture": self.architecture,
            "num_moe_layers": self.num_moe_layers,
            "bytes_written": self.bytes_written,
            "seconds": round(self.seconds, 3),
            "files": self.files,
        }


def convert_checkpoint(
    src: str | Path,
    dst: str | Path,
    *,
    overwrite: bool = False,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    device: str = "cpu",
    revision: str | None = None,
    progress: ProgressFn | None = None,
) -> ConvertResult:
    """Write the kernel-ready version of ``src`` to ``dst``; see README "Output contract"."""
    start = time.perf_counter()
    try:
        max_bytes = parse_size(max_shard_size)
    except ValueError as exc:
        raise InputError(f"--max-shard-size: {exc}") from None
    ckpt = open_checkpoint(src, revision)
    for layer in ckpt.layers:
        try:
            layout.MoEDims(layer.num_experts, layer.hidden_size, layer.intermediate_size).check_kernel_compatible()
        except layout.LayoutShapeError as exc:
            raise UnsupportedShapeError(f"{ckpt.root}: {layer.prefix}: {exc}") from None
    dst_path = Path(dst).expanduser()
    _check_destination(ckpt.root, dst_path, overwrite)
    if device != "cpu" and not (device.startswith("cuda") and torch.cuda.is_available()):
        raise InputError(f"--device {device}: no such device here; use --device cpu")

    descriptor = _descriptor(ckpt)
    meta = header_metadata(descriptor)
    planned, layer_of = _plan_tensors(ckpt)
    shards = plan_shards(planned, max_bytes)
    total_bytes = sum(s.nbytes for s in shards)
    report = progress or (lambda p: None)
    report(Progress("plan", 0, len(ckpt.layers), 0, total_bytes))

    dst_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst_path.parent / f".{dst_path.name}.nvfp4ckpt-partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    files: list[dict] = []
    try:
        cache = _LayerCache(ckpt, device)
        done_bytes = 0
        for shard in shards:
            writer = ShardWriter(tmp / shard.filename, shard, meta)
            try:
                for t in shard.tensors:
                    layer = layer_of.get(t.name)
                    if layer is None:
                        writer.copy_from(ckpt.files.info(t.name))
                    else:
                        tensors = cache.get(layer)
                        writer.write(t.name, tensors[t.name])
                        if cache.finished(layer, t.name):
                            report(Progress("layer", cache.layers_done, len(ckpt.layers), done_bytes, total_bytes))
                    done_bytes += t.nbytes
                    report(Progress("bytes", cache.layers_done, len(ckpt.layers), done_bytes, total_bytes))
                writer.close()
            except BaseException:
                writer.abort()
                raise
            files.append({"name": shard.filename, "size": (tmp / shard.filename).stat().st_size, "sha256": writer.sha256})
        if len(shards) > 1:
            index = {
                "metadata": {"total_size": total_bytes},
                "weight_map": {t.name: s.filename for s in shards for t in s.tensors},
            }
            files.append(_write_json(tmp / INDEX_NAME, index))
        files.append(_write_json(tmp / "config.json", _output_config(ckpt, descriptor)))
        files.extend(_copy_other_files(ckpt.root, tmp))
        files.sort(key=lambda f: f["name"])
        manifest = {"tool": "nvfp4ckpt", "layout": descriptor["layout"], "layout_version": descriptor["layout_version"], "files": files}
        _write_json(tmp / MANIFEST_NAME, manifest)
        _fsync_dir(tmp)
        _install(tmp, dst_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report(Progress("done", len(ckpt.layers), len(ckpt.layers), total_bytes, total_bytes))
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
    )


# ----------------------------------------------------------------------------------------------
# Planning


def _descriptor(ckpt: SourceCheckpoint) -> dict:
    infos = [
        LayerInfo(l.prefix, l.num_experts, l.hidden_size, l.intermediate_size, l.proj_names, l.scalar_dtype, list(l.scalar_shape))
        for l in ckpt.layers
    ]
    return build_descriptor(
        source_format=ckpt.format.name,
        architecture=ckpt.arch.name,
        routing=ckpt.routing.to_dict(),
        layers=infos,
        config_had_quantization_config=isinstance(ckpt.config.get("quantization_config"), dict),
    )


def layer_output_specs(layer: MoELayer, source_format: str) -> list[PlannedTensor]:
    """Names, dtypes and shapes of one layer's output tensors, in write order."""
    e, h, i = layer.num_experts, layer.hidden_size, layer.intermediate_size
    p = layer.prefix
    shapes = {
        "w13_weight": ("U8", (e, 2 * i, h // 2)),
        "w13_weight_scale": ("F8_E4M3", (e, 2 * i, h // 16)),
        "w2_weight": ("U8", (e, h, i // 2)),
        "w2_weight_scale": ("F8_E4M3", (e, h, i // 16)),
        "w13_weight_scale_2": ("F32", (e, 2)),
        "w2_weight_scale_2": ("F32", (e,)),
        "w13_input_scale": ("F32", (e, 2)),
        "w2_input_scale": ("F32", (e,)),
        "g1_alphas": ("F32", (e,)),
        "g1_scale_c": ("F32", (e,)),
        "g2_alphas": ("F32", (e,)),
        "w13_input_scale_quant": ("F32", (1,)),
    }
    names = list(KERNEL_TENSORS + SCALAR_TENSORS)
    if source_format == "compressed-tensors":
        for raw, (_, shape) in zip(RAW_CT_TENSORS, (shapes["w13_weight_scale_2"], shapes["w2_weight_scale_2"], shapes["w13_input_scale"], shapes["w2_input_scale"])):
            shapes[raw] = (layer.scalar_dtype, shape)
        names += list(RAW_CT_TENSORS)
    return [PlannedTensor(f"{p}.{n}", *shapes[n]) for n in names]


def _plan_tensors(ckpt: SourceCheckpoint) -> tuple[list[PlannedTensor], dict[str, MoELayer]]:
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
            for spec in layer_output_specs(layer, ckpt.format.name):
                if spec.name in ckpt.files.tensors:
                    raise InputError(
                        f"{ckpt.files.info(spec.name).file}: tensor {spec.name!r} already exists next to per-expert tensors; "
                        "the checkpoint mixes fused and per-expert experts"
                    )
                planned.append(spec)
                layer_of[spec.name] = layer
    return planned, layer_of


# ----------------------------------------------------------------------------------------------
# The transform of one layer


class _LayerCache:
    """Holds the current layer's outputs until all of them are written (one layer at a time)."""

    def __init__(self, ckpt: SourceCheckpoint, device: str) -> None:
        self.ckpt = ckpt
        self.device = device
        self.prefix: str | None = None
        self.tensors: dict[str, torch.Tensor] = {}
        self.remaining: set[str] = set()
        self.layers_done = 0

    def get(self, layer: MoELayer) -> dict[str, torch.Tensor]:
        if self.prefix != layer.prefix:
            self.tensors = {}  # drop the previous layer before building the next
            self.tensors = convert_layer(self.ckpt, layer, self.device)
            self.prefix = layer.prefix
            self.remaining = set(self.tensors)
        return self.tensors

    def finished(self, layer: MoELayer, name: str) -> bool:
        self.remaining.discard(name)
        if not self.remaining:
            self.tensors = {}
            self.layers_done += 1
            return True
        return False


def read_layer_source(ckpt: SourceCheckpoint, layer: MoELayer) -> dict[str, torch.Tensor]:
    """Stacked source tensors of a layer: w31/s31 ``[up ; gate]``, down/down_scale, raw scalars [E, 3, 2]."""
    e, h, i = layer.num_experts, layer.hidden_size, layer.intermediate_size
    files = ckpt.files
    w31 = torch.empty((e, 2 * i, h // 2), dtype=torch.uint8)
    s31 = torch.empty((e, 2 * i, h // 16), dtype=torch.uint8)
    down = torch.empty((e, h, i // 2), dtype=torch.uint8)
    down_s = torch.empty((e, h, i // 16), dtype=torch.uint8)
    scalar_dtype = DTYPE_TO_TORCH[layer.scalar_dtype]
    # raw[e, role, 0] = weight global, raw[e, role, 1] = input global; roles gate, up, down
    raw = torch.empty((e, 3, 2), dtype=scalar_dtype)
    for x, names in enumerate(layer.experts):
        files.read_into(names["up"].weight, w31[x, :i])
        files.read_into(names["gate"].weight, w31[x, i:])
        files.read_into(names["up"].weight_scale, s31[x, :i])
        files.read_into(names["gate"].weight_scale, s31[x, i:])
        files.read_into(names["down"].weight, down[x])
        files.read_into(names["down"].weight_scale, down_s[x])
        for r, role in enumerate(("gate", "up", "down")):
            files.read_into(names[role].weight_global, raw[x, r, 0])
            files.read_into(names[role].input_global, raw[x, r, 1])
    return {"w31": w31, "s31": s31, "down": down, "down_scale": down_s, "raw_scalars": raw}


def kernel_scalars(ws2: torch.Tensor, input_scale: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-expert scalars from ModelOpt-convention scales ``[E, 3]`` (columns gate, up, down).

    Operation order follows SGLang's ModelOpt path so the float32 bits match it.
    """
    ws2 = ws2.float()
    input_scale = input_scale.float()
    a1 = input_scale[:, :2].max()
    a2 = input_scale[:, 2].max()
    w2_input_scale_quant = 1.0 / a2
    return {
        "w13_weight_scale_2": ws2[:, :2].contiguous(),
        "w2_weight_scale_2": ws2[:, 2].contiguous(),
        "w13_input_scale": input_scale[:, :2].contiguous(),
        "w2_input_scale": input_scale[:, 2].contiguous(),
        "g1_alphas": (a1 * ws2[:, 0]).contiguous(),
        "g1_scale_c": (w2_input_scale_quant * (a1 * ws2[:, 1])).contiguous(),
        "g2_alphas": (a2 * ws2[:, 2]).contiguous(),
        "w13_input_scale_quant": (1.0 / a1).reshape(1),
    }


def convert_layer(ckpt: SourceCheckpoint, layer: MoELayer, device: str = "cpu") -> dict[str, torch.Tensor]:
    """All output tensors of one MoE layer, keyed by full name."""
    src = read_layer_source(ckpt, layer)
    dev = torch.device(device)
    w13, s13 = layout.w31_to_kernel(src["w31"].to(dev), src["s31"].to(dev))
    w2, s2 = layout.w2_to_kernel(src["down"].to(dev), src["down_scale"].to(dev))
    raw = src["raw_scalars"]
    to_mult = ckpt.format.to_dequant_multiplier
    scalars = kernel_scalars(to_mult(raw[:, :, 0]), to_mult(raw[:, :, 1]))
    for name, value in scalars.items():
        if not torch.isfinite(value).all() or (value <= 0).any():
            raise InputError(
                f"{ckpt.root}: {layer.prefix}.{name} has non-finite or non-positive values; "
                "the checkpoint's global scales are broken"
            )
    out = {
        "w13_weight": w13.cpu(),
        "w13_weight_scale": s13.cpu(),
        "w2_weight": w2.cpu(),
        "w2_weight_scale": s2.cpu(),
        **scalars,
    }
    if ckpt.format.name == "compressed-tensors":
        out["w13_weight_global_scale"] = raw[:, :2, 0].contiguous()
        out["w2_weight_global_scale"] = raw[:, 2, 0].contiguous()
        out["w13_input_global_scale"] = raw[:, :2, 1].contiguous()
        out["w2_input_global_scale"] = raw[:, 2, 1].contiguous()
    return {f"{layer.prefix}.{k}": v for k, v in out.items()}


# ----------------------------------------------------------------------------------------------
# Files


def _check_destination(src: Path, dst: Path, overwrite: bool) -> None:
    s, d = src.resolve(), dst.resolve()
    if d == s or s in d.parents or d in s.parents:
        raise InputError(f"{dst}: the destination overlaps the source {src}; choose a folder outside it")
    if d.exists():
        if not d.is_dir():
            raise OutputExistsError(f"{dst}: exists and is not a folder; choose another destination")
        if any(d.iterdir()) and not overwrite:
            raise OutputExistsError(f"{dst}: exists and is not empty; pass --overwrite to replace it")


def _install(tmp: Path, dst: Path) -> None:
    """Move the finished temporary folder into place (replacing an old DST only now)."""
    old = None
    if dst.exists():
        old = dst.parent / f".{dst.name}.nvfp4ckpt-old-{os.getpid()}"
        os.replace(dst, old)
    os.replace(tmp, dst)
    _fsync_dir(dst.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_json(path: Path, data: dict) -> dict:
    raw = (json.dumps(data, indent=2, sort_keys=False) + "\n").encode("utf-8")
    path.write_bytes(raw)
    return {"name": path.name, "size": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}


def _output_config(ckpt: SourceCheckpoint, descriptor: dict) -> dict:
    config = json.loads(json.dumps(ckpt.config))
    qcfg = config.get("quantization_config")
    if not isinstance(qcfg, dict):
        # ModelOpt with only hf_quant_config.json: give engines the flat form as well.
        section = {"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": ckpt.format.group_size}
        if ckpt.format.exclude:
            section["ignore"] = list(ckpt.format.exclude)
        qcfg = config["quantization_config"] = section
    qcfg[DESCRIPTOR_KEY] = descriptor
    return config


def _copy_other_files(src: Path, dst: Path) -> list[dict]:
    """Tokenizer, generation config, code, ...: everything that is not a weight shard."""
    out = []
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        if rel.name.endswith(".safetensors") or (len(rel.parts) == 1 and rel.name in _SKIP_FILES):
            continue
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        with open(path, "rb") as fi, open(target, "wb") as fo:
            while block := fi.read(16 * 1024 * 1024):
                digest.update(block)
                fo.write(block)
        shutil.copystat(path, target)
        out.append({"name": rel.as_posix(), "size": target.stat().st_size, "sha256": digest.hexdigest()})
    return out

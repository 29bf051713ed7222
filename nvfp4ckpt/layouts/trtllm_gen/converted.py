"""Reading a converted (kernel-layout) checkpoint: its descriptor, layers and tensors."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ..._lazy import torch

from ...source.checkpoint import resolve_source
from .descriptor import LayerInfo, descriptor_from_config
from ...errors import BadFieldError, CorruptFileError, DamagedCheckpointError, InputError, MissingTensorError
from ...io import CheckpointFiles, read_json
from ...io.json_input import Fields
from ...source.formats import DESCRIPTOR_KEY, FORMATS
from .transform import LAYOUT_NAME, LAYOUT_VERSION
from .ranks import RankSpec, from_kernel


@dataclass
class ConvertedCheckpoint:
    root: Path
    config: dict
    descriptor: dict
    files: CheckpointFiles
    layers: list[LayerInfo]

    rank_files: dict[str, CheckpointFiles] = field(default_factory=dict)  # part -> files (rank-sharded output)

    @property
    def source_format(self) -> str:
        return self.descriptor["source_format"]

    @property
    def sharded(self) -> bool:
        return bool(self.rank_files)

    def files_for(self, rank: RankSpec | None) -> CheckpointFiles:
        return self.files if rank is None else self.rank_files[rank.part]

    def layer(self, which: str | int) -> LayerInfo:
        """A layer by expert prefix, by index in the descriptor, or by decoder layer number."""
        if isinstance(which, int) or str(which).isdigit():
            n = int(which)
            for layer in self.layers:
                if f".layers.{n}." in f"{layer.prefix}.":
                    return layer
            raise InputError(f"{self.root}: no MoE layer {n}; MoE layers are {', '.join(l.prefix for l in self.layers)}")
        for layer in self.layers:
            if layer.prefix == which:
                return layer
        raise InputError(f"{self.root}: no MoE layer {which!r}; MoE layers are {', '.join(l.prefix for l in self.layers)}")

    def read_layer(
        self, layer: LayerInfo, device: str | torch.device = "cpu", rank: RankSpec | None = None
    ) -> dict[str, torch.Tensor]:
        """The layer's canonical tensors keyed by short name (``w13_weight``, ``g1_alphas``, ...); for
        rank-sharded output, those of one rank."""
        if self.sharded and rank is None:
            raise InputError(f"{self.root}: rank-sharded checkpoint; read one rank's tensors (rank=...)")
        files = self.files_for(rank)
        return {full[len(layer.prefix) + 1 :]: files.read_to(full, device) for full in layer.tensor_names(self.source_format)}

    def reassemble_layer(self, layer: LayerInfo) -> dict[str, torch.Tensor]:
        """The whole layer in source layout, from all ranks: ``w31`` ``[up; gate]`` (non-gated ``[up]``),
        ``s31``, ``down``, ``down_scale`` (uint8, padding dropped), every scalar over all experts, and
        ``padding_zero``."""
        e, h, i = layer.num_experts, layer.hidden_size, layer.intermediate_size
        halves = 2 if layer.gated else 1
        ranks: tuple[RankSpec | None, ...] = layer.ranks or (None,)
        w31 = torch.empty((e, halves * i, h // 2), dtype=torch.uint8)
        s31 = torch.empty((e, halves * i, h // 16), dtype=torch.uint8)
        down = torch.empty((e, h, i // 2), dtype=torch.uint8)
        down_s = torch.empty((e, h, i // 16), dtype=torch.uint8)
        scalars: dict[str, torch.Tensor] = {}
        zero = True
        for r in ranks:
            t = self.read_layer(layer, rank=r)
            e0, e1 = (r.expert_start, r.expert_end) if r else (0, e)
            i0, i1 = (r.inter_start, r.inter_end) if r else (0, i)
            lw31, ls31, ld, lds, ok = from_kernel(t, h, i1 - i0, layer.gated)
            zero &= ok
            n = i1 - i0
            for k in range(halves):
                w31[e0:e1, k * i + i0 : k * i + i1] = lw31[:, k * n : (k + 1) * n]
                s31[e0:e1, k * i + i0 : k * i + i1] = ls31[:, k * n : (k + 1) * n]
            down[e0:e1, :, i0 // 2 : i1 // 2] = ld
            down_s[e0:e1, :, i0 // 16 : i1 // 16] = lds
            for name, value in t.items():
                if name in ("w13_weight", "w13_weight_scale", "w2_weight", "w2_weight_scale"):
                    continue
                if name == "w13_input_scale_quant":
                    scalars[name] = value
                    continue
                full = scalars.setdefault(name, torch.empty((e, *value.shape[1:]), dtype=value.dtype))
                full[e0:e1] = value
        return {"w31": w31, "s31": s31, "down": down, "down_scale": down_s, "padding_zero": torch.tensor(zero), **scalars}


class ConvertedFiles(CheckpointFiles):
    """A converted checkpoint's files: a tensor missing or a shard found truncated while reading it is damage to
    nvfp4ckpt's own output (``DamagedCheckpointError``, exit 1), as the structure check reports it."""

    def info(self, name: str):
        try:
            return super().info(name)
        except MissingTensorError as exc:
            raise DamagedCheckpointError(f"{exc}; the converted checkpoint is damaged, convert again") from None

    def pread_into(self, info, buf: memoryview, offset: int = 0) -> None:
        try:
            super().pread_into(info, buf, offset)
        except DamagedCheckpointError:
            raise
        except CorruptFileError as exc:
            raise DamagedCheckpointError(str(exc)) from None


def open_converted(path: str | Path, revision: str | None = None) -> ConvertedCheckpoint:
    """A converted checkpoint. Not one at all (no descriptor, an unsupported layout): ``InputError`` (exit 2). One
    that is damaged (unreadable config or descriptor, a shard or rank folder missing, truncated or corrupt):
    ``DamagedCheckpointError`` (exit 1, what verify reports as a failed structure check)."""
    root = resolve_source(path, revision)
    try:
        return _open_converted(root)
    except DamagedCheckpointError:
        raise
    except CorruptFileError as exc:
        raise DamagedCheckpointError(str(exc)) from None


def _open_converted(root: Path) -> ConvertedCheckpoint:
    config_path = root / "config.json"
    if not config_path.is_file():
        raise InputError(f"{root}: no config.json; pass a folder written by `nvfp4ckpt convert`")
    config = read_json(config_path)
    descriptor = descriptor_from_config(config)
    if descriptor is None:
        raise InputError(
            f"{config_path}: no quantization_config.moe_kernel_layout descriptor; this is not a converted checkpoint "
            "(run `nvfp4ckpt convert` first)"
        )
    if descriptor.get("layout") != LAYOUT_NAME or type(descriptor.get("layout_version")) is not int:
        raise InputError(f"{config_path}: layout {descriptor.get('layout')!r} is not {LAYOUT_NAME!r}; unsupported descriptor")
    if descriptor["layout_version"] > LAYOUT_VERSION:
        raise InputError(
            f"{config_path}: layout version {descriptor['layout_version']} is newer than this nvfp4ckpt supports "
            f"({LAYOUT_VERSION}); upgrade nvfp4ckpt"
        )
    try:
        layers, parts = _read_descriptor(Fields(descriptor, str(config_path), f"quantization_config.{DESCRIPTOR_KEY}"))
    except BadFieldError as exc:  # a converted checkpoint whose descriptor is damaged: the structure check fails
        raise CorruptFileError(str(exc)) from None
    for part in parts:
        if not (root / part).is_dir() or (root / part).is_symlink():
            raise CorruptFileError(
                f"{root / part}: the rank folder the descriptor lists is missing (or not a folder); the converted "
                "checkpoint is incomplete, restore the folder or convert again"
            )
    rank_files = {part: ConvertedFiles(root / part) for part in parts}
    return ConvertedCheckpoint(root, config, descriptor, ConvertedFiles(root), layers, rank_files)


_RANK_PART = re.compile(r"ranks/rank-[0-9]{3,6}")


def _read_descriptor(d: Fields) -> tuple[list[LayerInfo], list[str]]:
    """The layers and the rank folders a descriptor lists, every field it is read by checked here first."""
    d.str("source_format", choices=tuple(FORMATS))
    gated = d.str("activation", "swiglu", choices=("swiglu", "relu2")) != "relu2"
    parallel = d.obj("parallel", {})
    tp = parallel.int("tp", 1, lo=1, hi=1 << 16)
    parts = []
    for i, value in enumerate(parallel.list("ranks", [])):
        part = Fields(value, d.where, f"{parallel.name('ranks')}[{i}]").str("part")
        if not _RANK_PART.fullmatch(part):  # only the folders convert writes: never a path out of the checkpoint
            parallel.fail("ranks", part, "rank folders named ranks/rank-NNN")
        parts.append(part)
    layers = [LayerInfo.from_dict(prefix, info, gated, tp) for prefix, info in d.objects("layers", {})]
    _check_routing(d.obj("routing", {}), max((l.num_experts for l in layers), default=1 << 16))
    return layers, parts


def _check_routing(r: Fields, num_experts: int) -> None:
    """The routing a converted checkpoint is run with (runtime.layer reads it as is)."""
    if not r.data:
        return
    r.str("method")
    experts = r.int("num_experts", lo=1, hi=1 << 16)
    r.int("top_k", lo=1, hi=experts)
    groups = r.int("n_group", None, lo=1, hi=experts)
    r.int("topk_group", None, lo=1, hi=groups or experts)
    r.num("routed_scaling_factor", 1.0, above=0.0, hi=1e6)
    r.bool("norm_topk_prob", True)
    r.str("bias_suffix", None)

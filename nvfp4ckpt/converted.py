"""Reading a converted (kernel-layout) checkpoint: its descriptor, layers and tensors."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import resolve_source
from .descriptor import KERNEL_TENSORS, RAW_CT_TENSORS, SCALAR_TENSORS, descriptor_from_config
from .errors import InputError
from .io import CheckpointFiles, read_json
from .layout import LAYOUT_NAME, LAYOUT_VERSION


@dataclass(frozen=True)
class KernelLayer:
    """One MoE layer as recorded in the descriptor."""

    prefix: str
    num_experts: int
    hidden_size: int
    intermediate_size: int
    proj_names: dict[str, str]
    scalar_dtype: str
    scalar_shape: tuple[int, ...]
    hidden_padded: int
    intermediate_padded: int

    @property
    def padded(self) -> bool:
        return (self.hidden_padded, self.intermediate_padded) != (self.hidden_size, self.intermediate_size)

    def tensor_names(self, source_format: str) -> list[str]:
        names = list(KERNEL_TENSORS + SCALAR_TENSORS)
        if source_format == "compressed-tensors":
            names += list(RAW_CT_TENSORS)
        return [f"{self.prefix}.{n}" for n in names]


@dataclass
class ConvertedCheckpoint:
    root: Path
    config: dict
    descriptor: dict
    files: CheckpointFiles
    layers: list[KernelLayer]

    @property
    def source_format(self) -> str:
        return self.descriptor["source_format"]

    def layer(self, which: str | int) -> KernelLayer:
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

    def read_layer(self, layer: KernelLayer, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """The layer's canonical tensors keyed by short name (``w13_weight``, ``g1_alphas``, ...)."""
        out = {}
        for full in layer.tensor_names(self.source_format):
            out[full[len(layer.prefix) + 1 :]] = self.files.read(full).to(device)
        return out


def open_converted(path: str | Path, revision: str | None = None) -> ConvertedCheckpoint:
    root = resolve_source(path, revision)
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
    if descriptor.get("layout") != LAYOUT_NAME or not isinstance(descriptor.get("layout_version"), int):
        raise InputError(f"{config_path}: layout {descriptor.get('layout')!r} is not {LAYOUT_NAME!r}; unsupported descriptor")
    if descriptor["layout_version"] > LAYOUT_VERSION:
        raise InputError(
            f"{config_path}: layout version {descriptor['layout_version']} is newer than this nvfp4ckpt supports "
            f"({LAYOUT_VERSION}); upgrade nvfp4ckpt"
        )
    layers = []
    for prefix, info in (descriptor.get("layers") or {}).items():
        layers.append(
            KernelLayer(
                prefix=prefix,
                num_experts=int(info["num_experts"]),
                hidden_size=int(info["hidden_size"]),
                intermediate_size=int(info["intermediate_size"]),
                proj_names=dict(info["source_projection_names"]),
                scalar_dtype=str(info["source_scalar_dtype"]),
                scalar_shape=tuple(info["source_scalar_shape"]),
                hidden_padded=int(info.get("hidden_size_padded", info["hidden_size"])),
                intermediate_padded=int(info.get("intermediate_size_padded", info["intermediate_size"])),
            )
        )
    return ConvertedCheckpoint(root, config, descriptor, CheckpointFiles(root), layers)

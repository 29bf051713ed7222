"""The ``structure`` check (no GPU, no source): descriptor, canonical tensors, scalars, manifest."""

from __future__ import annotations

from pathlib import Path

from .._lazy import torch

from ..source.formats import FORMATS
from ..layouts.trtllm_gen.scalars import kernel_scalars
from ..layouts.trtllm_gen.converted import ConvertedCheckpoint
from ..layouts.trtllm_gen.descriptor import METADATA_KEY, LayerInfo, canonical_specs
from ..output import MANIFEST_NAME
from ..output.card import CARD
from .report import CheckResult
from ..io import count, sha256_file
from ..io.json_input import Fields, load_json, parse_json
from ..errors import BadFieldError, CorruptFileError



def check_structure(ckpt: ConvertedCheckpoint, hash_files: bool = True, digests: dict[str, str] | None = None) -> CheckResult:
    """``digests``: sha256 of the manifest's files already computed (the single-pass scan), by manifest name."""
    problems: list[str] = []
    desc = ckpt.descriptor
    all_files = [(ckpt.files, f) for f in ckpt.files.files] + [(rf, f) for rf in ckpt.rank_files.values() for f in rf.files]
    for files, fname in all_files:
        meta = files.file_metadata[fname]
        try:
            header_desc = parse_json(meta.get(METADATA_KEY, "null"), f"{fname}: header metadata")
        except CorruptFileError:
            header_desc = None
        if header_desc != desc:
            problems.append(f"{fname}: header metadata '{METADATA_KEY}' differs from config.json's descriptor")
    for layer in ckpt.layers:
        problems.extend(layer_tensor_problems(ckpt, layer))
        if not problems:
            problems.extend(_scalar_problems(ckpt, layer))
    problems.extend(_manifest_problems(ckpt.root, hash_files, digests or {}))
    n_layers = len(ckpt.layers)
    what = f"{count(n_layers, 'MoE layer')}, {count(len(ckpt.files.files), 'shard')}" + ("" if hash_files else " (sha256 skipped)")
    return CheckResult("structure", "fail" if problems else "pass", what, problems)


def layer_tensor_problems(ckpt: ConvertedCheckpoint, layer: LayerInfo) -> list[str]:
    """Every canonical tensor of the layer present with its dtype and shape (headers only, nothing read)."""
    problems = []
    for rank in layer.ranks or (None,):
        experts = rank.num_experts if rank else layer.num_experts
        inter = rank.intermediate_padded if rank else layer.intermediate_padded
        where = f"{rank.part}: " if rank else ""
        files = ckpt.files_for(rank)
        for name, dtype, shape in canonical_specs(
            layer.prefix, experts, layer.hidden_padded, inter, ckpt.source_format, layer.scalar_dtype, layer.gated
        ):
            info = files.tensors.get(name)
            if info is None:
                problems.append(f"{where}{name}: missing")
            elif info.dtype != dtype or info.shape != shape:
                problems.append(f"{where}{name}: {info.dtype}{list(info.shape)}, expected {dtype}{list(shape)}")
    return problems


def tensors_damaged(ckpt: ConvertedCheckpoint) -> bool:
    """A canonical tensor missing or of the wrong dtype/shape: the checkpoint cannot be read as a layout at all
    (layout and numerics would fail on the shapes), only the structure check can report it."""
    return any(layer_tensor_problems(ckpt, layer) for layer in ckpt.layers)


def _scalar_problems(ckpt: ConvertedCheckpoint, layer: LayerInfo) -> list[str]:
    """Scalars are checked over all experts of the layer (a1/a2 are maxima over every rank's experts);
    each rank must hold the same values for its experts."""
    t: dict[str, torch.Tensor] = {}
    problems = []
    for rank in layer.ranks or (None,):
        files = ckpt.files_for(rank)
        local = {  # the scalars only: the weights and block scales are the single pass's to read
            full[len(layer.prefix) + 1 :]: files.read(full)
            for full in layer.tensor_names(ckpt.source_format)
            if files.info(full).dtype not in ("U8", "F8_E4M3")
        }
        e0, e1 = (rank.expert_start, rank.expert_end) if rank else (0, layer.num_experts)
        for name, value in local.items():
            if name == "w13_input_scale_quant":
                if name in t and not torch.equal(t[name], value):
                    problems.append(f"{rank.part}: {layer.prefix}.{name} differs between ranks")
                t[name] = value
                continue
            full = t.setdefault(name, torch.full((layer.num_experts, *value.shape[1:]), float("nan"), dtype=value.dtype))
            prev = full[e0:e1]
            if torch.isfinite(prev).all() and not torch.equal(prev, value):
                problems.append(f"{rank.part}: {layer.prefix}.{name} differs from another rank's copy")
            full[e0:e1] = value
    for name, value in t.items():
        v = value.float()
        if not torch.isfinite(v).all() or (v <= 0).any():
            problems.append(f"{layer.prefix}.{name}: non-finite or non-positive values")
    if problems:
        return problems
    # columns (gate, up, down), or (up, down) for non-gated layers
    ws2 = torch.cat([t["w13_weight_scale_2"], t["w2_weight_scale_2"].unsqueeze(1)], 1)
    inp = torch.cat([t["w13_input_scale"], t["w2_input_scale"].unsqueeze(1)], 1)
    expect = kernel_scalars(ws2, inp)
    for name in ("g1_alphas", "g1_scale_c", "g2_alphas", "w13_input_scale_quant"):
        if not torch.equal(t[name], expect[name]):
            problems.append(f"{layer.prefix}.{name}: does not match the formula applied to the stored input/weight scales")
    fmt = FORMATS[ckpt.source_format]
    modelopt_names = ("w13_weight_scale_2", "w2_weight_scale_2", "w13_input_scale", "w2_input_scale")
    for raw, mult in zip(fmt.raw_scalar_names, modelopt_names):  # formats that keep their stored scales raw
        if not torch.equal(fmt.to_dequant_multiplier(t[raw]), t[mult]):
            problems.append(f"{layer.prefix}.{mult}: is not {raw} in the ModelOpt convention (1/x for compressed-tensors)")
    return problems


def manifest_names(root: Path) -> list[str]:
    """The manifest's files that exist inside the checkpoint with the listed size (the files worth hashing); []
    without a readable manifest (the structure check reports that). A name is used only if it is a file found under
    ``root`` by listing it, so the manifest never sends a read outside the checkpoint."""
    try:
        manifest = Fields(load_json(root / MANIFEST_NAME, "manifest"), str(root / MANIFEST_NAME))
        entries = [Fields(v, str(root / MANIFEST_NAME), f"files[{i}]") for i, v in enumerate(manifest.list("files"))]
        listed = {e.str("name"): e.int("size", lo=0) for e in entries}
    except (OSError, CorruptFileError, BadFieldError):
        return []
    on_disk = {p.relative_to(root).as_posix(): p for p in root.rglob("*") if p.is_file() and not p.is_symlink()}
    return [n for n, size in listed.items() if n in on_disk and on_disk[n].stat().st_size == size]


def _manifest_problems(root: Path, hash_files: bool, digests: dict[str, str]) -> list[str]:
    path = root / MANIFEST_NAME
    if not path.is_file():
        return [f"{MANIFEST_NAME}: missing"]
    try:
        manifest = Fields(load_json(path, "manifest"), str(path))
        entries = {}
        for i, value in enumerate(manifest.list("files")):
            entry = Fields(value, str(path), f"files[{i}]")
            entries[entry.str("name")] = {"size": entry.int("size", lo=0), "sha256": entry.str("sha256")}
    except (CorruptFileError, BadFieldError) as exc:
        return [f"{MANIFEST_NAME}: not a valid manifest ({exc})"]
    problems = []
    on_disk = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")}
    on_disk.discard(MANIFEST_NAME)
    if CARD not in entries:  # the model card is left out of the manifest: verify --update-card edits it
        on_disk.discard(CARD)
    for extra in sorted(on_disk - set(entries)):
        problems.append(f"{extra}: not listed in the manifest")
    for name, entry in sorted(entries.items()):
        f = root / name
        if name not in on_disk:  # also a name with "..": the manifest never sends a read outside the checkpoint
            problems.append(f"{name}: listed in the manifest but missing")
            continue
        if not f.is_file():
            problems.append(f"{name}: listed in the manifest but missing")
            continue
        if f.stat().st_size != entry.get("size"):
            problems.append(f"{name}: size {f.stat().st_size} != manifest {entry.get('size')}")
            continue
        if hash_files and (digests.get(name) or sha256_file(f)) != entry.get("sha256"):
            problems.append(f"{name}: sha256 does not match the manifest")
    return problems



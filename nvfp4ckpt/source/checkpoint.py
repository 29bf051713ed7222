"""Opening a source checkpoint: where it is, what format and architecture, which MoE layers.

Nothing here reads tensor data; every check uses safetensors headers only.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from . import architectures
from .architectures import Architecture, Routing
from ..errors import BadFieldError, BadTensorError, HubError, InputError, MissingTensorError, NoMoELayersError, UnsupportedArchitectureError
from .formats import QuantFormat, detect_format
from ..io import CheckpointFiles, TensorInfo, read_json
from ..io.json_input import Fields

SCALAR_DTYPES = ("F32", "BF16", "F16")


def resolve_source(src: str | Path, revision: str | None = None) -> Path:
    """A local folder, or a Hugging Face Hub repo id downloaded with huggingface-hub."""
    path = Path(src).expanduser()
    if path.exists():
        if not path.is_dir():
            raise InputError(f"{path}: not a folder; pass the checkpoint folder (with config.json and *.safetensors)")
        if revision is not None:  # refused, not ignored: a pipeline that pins a revision expects it to hold
            raise InputError(
                f"{path}: a local folder, so revision {revision!r} cannot apply (it selects a Hub repo's branch, tag or "
                "commit); drop the revision, or pass the Hub repo id"
            )
        return Path(os.path.abspath(path))  # reports name sources by absolute path
    text = str(src)
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", text):
        raise InputError(f"{text}: no such folder, and not a Hugging Face Hub repo id (owner/name)")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(
            repo_id=text,
            revision=revision,
            allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.py", "*.tiktoken"],
        )
    except Exception as exc:  # huggingface-hub raises many types for offline/unknown repos
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise HubError(
            f"{text}: could not download from the Hugging Face Hub ({type(exc).__name__}: {reason}); "
            "check the network, HF_TOKEN and the repo id, or pass a local folder"
        ) from exc
    return Path(local)


@dataclass
class ExpertTensors:
    """Names of one projection's tensors for one expert."""

    weight: str
    weight_scale: str
    weight_global: str
    input_global: str


@dataclass
class SourceMoELayer:
    """One MoE layer's routed experts, as found in the source."""

    prefix: str  # e.g. model.layers.3.mlp.experts
    num_experts: int
    hidden_size: int
    intermediate_size: int
    experts: list[dict[str, ExpertTensors]]  # expert -> role -> names
    proj_names: dict[str, str]  # role -> on-disk projection name (gate_proj / w1 ...)
    scalar_dtype: str
    scalar_shape: tuple[int, ...]
    gated: bool = True  # SwiGLU gate+up; False: non-gated (relu2), up only
    fused: dict[str, ExpertTensors] | None = None  # fused experts: "gate_up" / "down" -> names; then experts == []

    @property
    def roles(self) -> tuple[str, ...]:
        return architectures.expert_roles(self.gated)

    @property
    def block(self) -> str:
        """The MoE block's module name (prefix without ``.experts``)."""
        return self.prefix.rsplit(".", 1)[0]

    def source_names(self) -> list[str]:
        experts = [self.fused] if self.fused else self.experts
        return [n for e in experts for t in e.values() for n in vars(t).values()]


@dataclass
class SourceCheckpoint:
    root: Path
    config: dict
    format: QuantFormat
    arch: Architecture
    files: CheckpointFiles
    layers: list[SourceMoELayer]
    routing: Routing
    excluded_expert_modules: list[str] = field(default_factory=list)

    @property
    def expert_tensor_names(self) -> set[str]:
        return {n for layer in self.layers for n in layer.source_names()}


def open_checkpoint(src: str | Path, revision: str | None = None) -> SourceCheckpoint:
    root = resolve_source(src, revision)
    config_path = root / "config.json"
    if not config_path.is_file():
        raise InputError(f"{root}: no config.json; pass a Hugging Face model folder")
    config = read_json(config_path)
    fmt = detect_format(root, config)
    files = CheckpointFiles(root)
    try:
        arch = architectures.for_config(config, str(config_path))
    except UnsupportedArchitectureError as exc:
        raise UnsupportedArchitectureError(f"{exc}; {architectures.diagnose(config.get('model_type'), list(files.tensors))}") from None
    if not files.tensors:
        raise InputError(f"{root}: no *.safetensors files; only safetensors checkpoints are supported")
    layers, excluded = find_moe_layers(files, fmt, arch)
    if not layers:
        hint = f" ({len(excluded)} expert modules are excluded from quantization)" if excluded else ""
        raise NoMoELayersError(
            f"{root}: no NVFP4 MoE expert tensors matching {arch.name} naming{hint}; nothing to convert"
        )
    text_cfg = Fields(config, str(config_path)).obj("text_config") if isinstance(config.get("text_config"), dict) else Fields(config, str(config_path))
    routing = arch.routing(text_cfg)  # typed reads: a bad field is a one-line BadFieldError naming it
    if routing.top_k > routing.num_experts:
        text_cfg.fail("num_experts_per_tok", routing.top_k, f"at most the number of experts ({routing.num_experts})")
    for layer in layers:
        if layer.num_experts != routing.num_experts:
            raise BadTensorError(
                f"{root}: {layer.prefix} has {layer.num_experts} experts but config.json says {routing.num_experts}"
            )
    problems = config_tensor_problems(
        arch, text_cfg, [(l.prefix, l.hidden_size, l.intermediate_size, _first_weight(l)) for l in layers]
    )
    if problems:
        raise BadFieldError(f"{problems[0]}; fix config.json or the tensors")
    return SourceCheckpoint(root, config, fmt, arch, files, layers, routing, excluded)


def _first_weight(layer: SourceMoELayer) -> str:
    entry = layer.fused or layer.experts[0]
    return entry["gate_up" if layer.fused else ("gate" if layer.gated else "up")].weight


_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.([^.]+)\.")


def decoder_layer_index(prefix: str) -> int | None:
    """The decoder layer number in an expert prefix (``model.layers.3.mlp.experts`` -> 3); None for a prefix with
    no ``layers.N`` (or a multi-token-prediction module, ``mtp.layers.N``, numbered apart from the decoder)."""
    m = _LAYER_INDEX.search(prefix)
    before = prefix[: m.start()] if m is not None else ""
    if m is None or before == "mtp" or before.endswith(".mtp"):
        return None
    text = m.group(1)
    return int(text) if re.fullmatch(r"0|[1-9][0-9]*", text, re.ASCII) else None


def check_layer_spelling(prefix: str, where: str, name: str) -> None:
    """A layer number with leading zeros (``layers.01``) or in non-ASCII digits is refused, as expert numbers are:
    engines, verify ``--layers`` and revert name layers by their plain number."""
    m = _LAYER_INDEX.search(prefix)
    if m is None:
        return
    text = m.group(1)
    if text.isdigit() and not re.fullmatch(r"0|[1-9][0-9]*", text, re.ASCII):
        raise BadTensorError(
            f"{where}: tensor {name!r} spells its decoder layer as {text!r}; nvfp4ckpt needs plain ASCII layer numbers "
            f"(layers.{int(text)}, not layers.{text}); rename the tensors"
        )


def config_tensor_problems(
    arch: Architecture, cfg: Fields, layers: list[tuple[str, int, int, str]]
) -> list[str]:
    """Where ``config.json`` disagrees with the expert tensors (each given as prefix, hidden size, intermediate size
    and a tensor to name): ``hidden_size``, the expert intermediate size, ``num_hidden_layers`` and the fields that
    say which layers are MoE. Only the fields present are checked; a layer is MoE if it has expert tensors."""
    problems: list[str] = []
    where = cfg.where + (f" ({cfg.at})" if cfg.at else "")
    for key, index in (("hidden_size", 1), (arch.expert_intermediate_key, 2)):
        if cfg.has(key):
            value = cfg.int(key, lo=1)
            for layer in layers:
                if layer[index] != value:
                    what = "hidden size" if index == 1 else "expert intermediate size"
                    problems.append(
                        f"{where}: field {key} is {value}, but tensor {layer[3]!r} gives a {what} of {layer[index]}"
                    )
                    break
    if not cfg.has("num_hidden_layers"):
        return problems
    n = cfg.int("num_hidden_layers", lo=1, hi=1 << 16)
    extra = cfg.int("num_nextn_predict_layers", 0, lo=0, hi=1 << 16)  # DeepSeek/GLM MTP layers follow the decoder's
    try:
        kinds = arch.layer_kinds(cfg)
    except BadFieldError as exc:
        if "is missing" not in str(exc):
            raise
        kinds = []
    fields = ", ".join(arch.layer_kind_fields) or "num_hidden_layers"
    for prefix, _, _, name in layers:
        i = decoder_layer_index(prefix)
        if i is None:
            continue
        if i >= n + extra:
            problems.append(
                f"{where}: field num_hidden_layers is {n}, but tensor {name!r} is an expert of decoder layer {i}"
            )
        elif i < len(kinds) and kinds[i] != "moe":
            problems.append(
                f"{where}: {fields} make decoder layer {i} {kinds[i]}, but tensor {name!r} is an expert of it"
            )
    return problems


def natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def find_moe_layers(
    files: CheckpointFiles, fmt: QuantFormat, arch: Architecture
) -> tuple[list[SourceMoELayer], list[str]]:
    """Group expert tensors by layer and validate names, dtypes and shapes from the headers."""
    suffix_roles = {v: k for k, v in fmt.suffixes.items()}
    found: dict[str, dict[int, dict[str, dict[str, str]]]] = defaultdict(lambda: defaultdict(dict))
    proj_names: dict[str, dict[str, str]] = defaultdict(dict)
    excluded: set[str] = set()
    fused: dict[str, dict[str, dict[str, str]]] = defaultdict(dict)  # prefix -> "gate_up"/"down" -> kind -> name
    fused_re = re.compile(arch.fused_prefix_pattern) if arch.fused_prefix_pattern and fmt.fused_suffixes else None
    for name in files.tensors:
        module, _, suffix = name.rpartition(".")
        fused_hit = _match_fused(fmt, fused_re, module, suffix)
        if fused_hit is not None:
            check_layer_spelling(module, str(files.info(name).file), name)
            proj, kind = fused_hit
            fused[module].setdefault(proj, {})[kind] = name
            continue
        hit = arch.match_expert(module)
        if hit is None:
            continue
        prefix, expert, role = hit
        check_layer_spelling(prefix, str(files.info(name).file), name)
        spelled = module[len(prefix) + 1 :].split(".", 1)[0]
        if spelled != str(expert):  # "07": revert writes "7", and "7" may be there too (one would be dropped)
            raise BadTensorError(
                f"{files.info(name).file}: tensor {name!r} spells expert {expert} as {spelled!r}; nvfp4ckpt needs "
                "plain indices (experts.7, not experts.07); rename the tensors"
            )
        if fmt.is_excluded(module):
            excluded.add(module)
            continue
        kind = suffix_roles.get(suffix)
        if kind is None:
            raise BadTensorError(
                f"{files.info(name).file}: tensor {name!r} is not an NVFP4 {fmt.name} expert tensor "
                f"(expected suffixes {', '.join(fmt.suffixes.values())}); is the expert excluded from quantization?"
            )
        found[prefix][expert].setdefault(role, {})[kind] = name
        proj = module.rsplit(".", 1)[1]
        prev = proj_names[prefix].setdefault(role, proj)
        if prev != proj:
            raise BadTensorError(f"{files.root}: {prefix} mixes projection names {prev!r} and {proj!r} for {role}")
    both = sorted(set(found) & set(fused))
    if both:
        raise BadTensorError(f"{files.root}: {both[0]} has both fused and per-expert tensors; the checkpoint is inconsistent")
    layers = [
        _build_layer(files, fmt, prefix, found[prefix], proj_names[prefix], arch.gated)
        for prefix in sorted(found, key=natural_key)
    ] + [_build_fused_layer(files, fmt, prefix, fused[prefix]) for prefix in fused]
    layers.sort(key=lambda l: natural_key(l.prefix))
    return layers, sorted(excluded, key=natural_key)


def _match_fused(fmt: QuantFormat, pattern: re.Pattern[str] | None, module: str, suffix: str) -> tuple[str, str] | None:
    if pattern is None or pattern.fullmatch(module) is None:
        return None
    for proj, role in fmt.fused_projections.items():
        if suffix.startswith(proj) and suffix[len(proj) :] in fmt.fused_suffixes:
            return role, fmt.fused_suffixes[suffix[len(proj) :]]
    return None


def _build_fused_layer(files: CheckpointFiles, fmt: QuantFormat, prefix: str, by_proj: dict[str, dict[str, str]]) -> SourceMoELayer:
    """A layer stored as fused tensors: gate_up ``[E, H/2, 2I]`` and down ``[E, I/2, H]`` (input-major)."""
    entry: dict[str, ExpertTensors] = {}
    for role, proj in (("gate_up", "gate_up_proj"), ("down", "down_proj")):
        kinds = by_proj.get(role, {})
        missing = [f"{prefix}.{proj}{sfx}" for sfx, k in fmt.fused_suffixes.items() if k not in kinds]
        if missing:
            raise MissingTensorError(f"{files.root}: missing tensor {', '.join(missing)}; the checkpoint is incomplete")
        entry[role] = ExpertTensors(**kinds)
    gu, down = files.info(entry["gate_up"].weight), files.info(entry["down"].weight)
    _expect(gu, "U8", 3)
    num_experts, hidden_half, two_i = gu.shape
    hidden, inter = hidden_half * 2, two_i // 2
    g = fmt.group_size
    _check_sizes(gu, hidden, inter, g)
    _expect(down, "U8", 3, (num_experts, inter // 2, hidden))
    _expect(files.info(entry["gate_up"].weight_scale), "F8_E4M3", 3, (num_experts, hidden // g, two_i))
    _expect(files.info(entry["down"].weight_scale), "F8_E4M3", 3, (num_experts, inter // g, hidden))
    scalar_dtype, scalar_shape = _scalar_kind(files, prefix, [n for t in entry.values() for n in (t.weight_global, t.input_global)])
    return SourceMoELayer(
        prefix=prefix,
        num_experts=num_experts,
        hidden_size=hidden,
        intermediate_size=inter,
        experts=[],
        proj_names={"gate": "gate_up_proj", "up": "gate_up_proj", "down": "down_proj"},
        scalar_dtype=scalar_dtype,
        scalar_shape=scalar_shape,
        fused=entry,
    )


def _build_layer(
    files: CheckpointFiles,
    fmt: QuantFormat,
    prefix: str,
    by_expert: dict[int, dict[str, dict[str, str]]],
    proj_names: dict[str, str],
    gated: bool = True,
) -> SourceMoELayer:
    num_experts = max(by_expert) + 1
    roles_wanted = architectures.expert_roles(gated)
    experts: list[dict[str, ExpertTensors]] = []
    for e in range(num_experts):
        roles = by_expert.get(e)
        if roles is None:
            raise MissingTensorError(f"{files.root}: {prefix}.{e} is missing (the layer has experts up to {num_experts - 1})")
        entry: dict[str, ExpertTensors] = {}
        for role in roles_wanted:
            kinds = roles.get(role, {})
            missing = [k for k in ("weight", "weight_scale", "weight_global", "input_global") if k not in kinds]
            if missing:
                proj = proj_names.get(role, role)
                want = ", ".join(f"{prefix}.{e}.{proj}.{fmt.suffixes[k]}" for k in missing)
                raise MissingTensorError(f"{files.root}: missing tensor {want}; the checkpoint is incomplete")
            entry[role] = ExpertTensors(**kinds)
        experts.append(entry)

    first = experts[0]
    gate_w = files.info(first["gate" if gated else "up"].weight)
    down_w = files.info(first["down"].weight)
    _expect(gate_w, "U8", 2)
    _expect(down_w, "U8", 2)
    inter, hidden_half = gate_w.shape
    hidden = hidden_half * 2
    if down_w.shape[0] != hidden:
        raise BadTensorError(
            f"{down_w.file}: tensor {down_w.name!r} has shape {list(down_w.shape)}; expected [{hidden}, {inter // 2}] "
            f"to match {gate_w.name} {list(gate_w.shape)}"
        )
    intermediate = down_w.shape[1] * 2
    if intermediate != inter:
        raise BadTensorError(
            f"{down_w.file}: tensor {down_w.name!r} has shape {list(down_w.shape)}; expected [{hidden}, {inter // 2}]"
        )
    g = fmt.group_size
    _check_sizes(gate_w, hidden, intermediate, g)
    want = {"gate": (inter, hidden), "up": (inter, hidden), "down": (hidden, intermediate)}
    for entry in experts:
        for role, t in entry.items():
            n, k = want[role]
            _expect(files.info(t.weight), "U8", 2, (n, k // 2))
            _expect(files.info(t.weight_scale), "F8_E4M3", 2, (n, k // g))
    scalar_dtype, scalar_shape = _scalar_kind(
        files, prefix, [n for entry in experts for t in entry.values() for n in (t.weight_global, t.input_global)]
    )
    return SourceMoELayer(
        prefix=prefix,
        num_experts=num_experts,
        hidden_size=hidden,
        intermediate_size=intermediate,
        experts=experts,
        proj_names=dict(proj_names),
        scalar_dtype=scalar_dtype,
        scalar_shape=scalar_shape,
        gated=gated,
    )


def _check_sizes(info: TensorInfo, hidden: int, inter: int, group: int) -> None:
    """Sizes NVFP4 can hold: non-zero, and whole 16-element blocks along both input dimensions (hidden for
    gate/up, intermediate for down). Otherwise the block scales cover fewer columns than the weight has,
    and the floor in ``k // group`` would make a short scale tensor look right."""
    for what, n in (("hidden size", hidden), ("intermediate size", inter)):
        if n <= 0 or n % group:
            raise BadTensorError(
                f"{info.file}: tensor {info.name!r} gives a {what} of {n}, which is not a positive multiple of the "
                f"{group}-element NVFP4 block; the checkpoint is not NVFP4 as written"
            )


def _scalar_kind(files: CheckpointFiles, prefix: str, names: list[str]) -> tuple[str, tuple[int, ...]]:
    """The (dtype, shape) all of a layer's global scales share; each must hold one float value."""
    dtypes: set[str] = set()
    shapes: set[tuple[int, ...]] = set()
    for name in names:
        info = files.info(name)
        if info.dtype not in SCALAR_DTYPES or _numel(info.shape) != 1:
            raise BadTensorError(f"{info.file}: tensor {name!r} is {info.dtype}{list(info.shape)}; expected one float32 value")
        dtypes.add(info.dtype)
        shapes.add(info.shape)
    if len(dtypes) > 1 or len(shapes) > 1:
        raise BadTensorError(f"{files.root}: {prefix} mixes scalar dtypes/shapes {sorted(dtypes)} {sorted(shapes)}")
    return dtypes.pop(), shapes.pop()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _expect(info: TensorInfo, dtype: str, ndim: int, shape: tuple[int, ...] | None = None) -> None:
    if info.dtype != dtype or len(info.shape) != ndim or (shape is not None and info.shape != shape):
        want = f"{dtype}{list(shape)}" if shape else f"{dtype} with {ndim} dims"
        raise BadTensorError(
            f"{info.file}: tensor {info.name!r} is {info.dtype}{list(info.shape)}; expected {want}"
        )

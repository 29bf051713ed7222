"""The ``descriptor`` check: does the converted checkpoint's descriptor say what its files and its source say?

Without a source it can only prove self-consistency: the fields this layout version fixes (tile, swizzle, order,
interleave, group size, scalar convention), the padded sizes, and that no kernel-layout tensor sits outside the
layers the descriptor lists (revert would write it out as a source tensor). Everything taken from the source
(routing, architecture, projection names, unpadded sizes, scalar dtype and shape) is listed as unchecked.
With ``--source`` the whole descriptor is derived again from the source, exactly as ``convert`` derives it, and
compared field by field (only ``tool_version`` may differ)."""

from __future__ import annotations

from typing import Any

from ..layouts import DEFAULT_LAYOUT, get as get_layout
from ..layouts.trtllm_gen.converted import ConvertedCheckpoint
from ..layouts.trtllm_gen.descriptor import KERNEL_TENSORS, SCALAR_TENSORS, canonical_names
from ..quant import GROUP_SIZE
from ..layouts.trtllm_gen.shapes import HIDDEN_ALIGN, PAD_HIDDEN_CHOICES, pad_hidden_of
from ..layouts.trtllm_gen.transform import EPILOGUE_TILE_M, MoEDims
from ..errors import InputError
from ..io.json_input import Fields
from ..output.card import hf_quant_root
from ..source import architectures
from ..source.checkpoint import SourceCheckpoint, config_tensor_problems
from ..source.formats import DESCRIPTOR_KEY, FORMATS, SOURCE_QUANT_KEY
from .report import CheckResult

# Fields only the source can confirm (shown in the report when there is no --source). Without it, routing and
# architecture are checked against the converted config.json (the source's, carried over) and projection names
# against the architecture registry: a tamperer who edits config.json as well is caught only with --source.
SOURCE_ONLY_FIELDS = (
    "config_had_quantization_config", "hidden_size", "intermediate_size", "layers.*.hidden_size",
    "layers.*.intermediate_size", "layers.*.source_scalar_dtype", "layers.*.source_scalar_shape",
    "layers.*.source_fused", "and routing/architecture beyond config.json",
)  # fmt: skip
IGNORED = ("tool_version",)  # a checkpoint converted by another release is still the same layout
_MAX_PROBLEMS = 20


def check_descriptor(ckpt: ConvertedCheckpoint, src: SourceCheckpoint | None) -> CheckResult:
    problems = self_consistency_problems(ckpt)
    if src is None:
        status = "fail" if problems else "pass"
        summary = (
            "self-consistency only (no --source): layout constants, padding and tensor ownership checked; "
            f"not checked: {', '.join(SOURCE_ONLY_FIELDS)}"
        )
        return CheckResult("descriptor", status, summary, problems)
    problems.extend(source_problems(ckpt, src))
    problems = problems[:_MAX_PROBLEMS]
    return CheckResult(
        "descriptor", "fail" if problems else "pass", "every field re-derived from the source and compared", problems
    )


def add_descriptor_check(result: CheckResult, ckpt: ConvertedCheckpoint, src: SourceCheckpoint | None) -> None:
    """Fold the descriptor check into the structure check's result (one row in the report)."""
    own = check_descriptor(ckpt, src)
    result.problems.extend(own.problems)
    if own.status == "fail":
        result.status = "fail"
    result.summary = f"{result.summary}; descriptor: {own.summary}"


def self_consistency_problems(ckpt: ConvertedCheckpoint) -> list[str]:
    d = ckpt.descriptor
    problems: list[str] = []
    gated = d.get("activation", "swiglu") != "relu2"
    fixed: dict[str, Any] = {
        "epilogue_tile_m": EPILOGUE_TILE_M,
        "scale_swizzle": "128x4",
        "scale_group_size": GROUP_SIZE,
        "scalar_convention": "modelopt_dequant",
        "w13_order": "up_gate" if gated else "up",
        "gated_act_row_interleave": gated,
        "w13_scalar_columns": ["gate", "up"] if gated else ["up"],
    }
    for key, want in fixed.items():
        if d.get(key) != want:
            problems.append(f"descriptor {key} is {d.get(key)!r}; layout version {d.get('layout_version')} writes {want!r}")
    align = pad_hidden_of(d)
    if align not in PAD_HIDDEN_CHOICES:
        problems.append(
            f"descriptor padding {_short(d.get('padding'))} names no hidden padding convert writes "
            f"((H, to N) with N one of {', '.join(map(str, PAD_HIDDEN_CHOICES))})"
        )
        align = HIDDEN_ALIGN
    for layer in ckpt.layers:
        dims = MoEDims(layer.num_experts, layer.hidden_size, layer.intermediate_size, layer.gated)
        for what, stored, size, want in (
            ("hidden", layer.hidden_padded, layer.hidden_size, -(-layer.hidden_size // align) * align),
            ("intermediate", layer.intermediate_padded, layer.intermediate_size, dims.intermediate_padded),
        ):
            if stored != want:
                problems.append(f"{layer.prefix}: {what}_size_padded {stored}, the layout pads {size} to {want}")
    problems.extend(_config_problems(ckpt))
    problems.extend(source_quantization_problems(ckpt))
    owned = {n for layer in ckpt.layers for n in layer.tensor_names(ckpt.source_format)}
    suffixes = tuple("." + n for n in (*KERNEL_TENSORS, *SCALAR_TENSORS, *canonical_names(ckpt.source_format)))
    for files in (ckpt.files, *ckpt.rank_files.values()):
        stray = sorted(n for n in files.tensors if n.endswith(suffixes) and n not in owned)
        if stray:
            problems.append(f"{stray[0]}: a kernel-layout tensor of no layer the descriptor lists ({len(stray)} such)")
    return problems


def _config_problems(ckpt: ConvertedCheckpoint) -> list[str]:
    """Routing, architecture and projection names against what the converted config.json itself implies."""
    d = ckpt.descriptor
    try:
        arch = architectures.for_config(ckpt.config)
        text = ckpt.config.get("text_config") if isinstance(ckpt.config.get("text_config"), dict) else ckpt.config
        routing = arch.routing(Fields(text, "config.json")).to_dict()
    except InputError as exc:
        return [f"config.json: cannot derive the routing ({exc})"]
    problems = []
    text_fields = Fields(text, "config.json", "text_config" if text is not ckpt.config else "")
    try:  # sizes and MoE layers config.json states, against the layers the descriptor and the tensors hold
        problems.extend(config_tensor_problems(
            arch, text_fields,
            [(l.prefix, l.hidden_size, l.intermediate_size, f"{l.prefix}.w13_weight") for l in ckpt.layers],
        ))  # fmt: skip
    except InputError as exc:
        problems.append(str(exc))
    if d.get("architecture") != arch.name:
        problems.append(f"descriptor architecture {d.get('architecture')!r}; config.json's model_type gives {arch.name!r}")
    problems.extend(f"descriptor {p.replace('the source gives', 'config.json gives')}" for p in _differences(d.get("routing"), routing, "routing"))
    for layer in ckpt.layers:
        if layer.source_fused:
            continue
        for role, name in layer.proj_names.items():
            if arch.projections.get(name) != role:
                problems.append(
                    f"{layer.prefix}: source_projection_names maps {role} to {name!r}, which {arch.name} names "
                    f"{arch.projections.get(name) or 'no projection'} (revert would write {role} under the wrong name)"
                )
    return problems


def source_quantization_section(config: dict) -> Any:
    """What revert writes back as the source's ``quantization_config``: the wrapped form's
    ``source_quantization_config``, or (written before the wrapped form) the section without the descriptor."""
    qcfg = config.get("quantization_config")
    if not isinstance(qcfg, dict):
        return None
    if SOURCE_QUANT_KEY in qcfg:
        return qcfg[SOURCE_QUANT_KEY]
    return {k: v for k, v in qcfg.items() if k != DESCRIPTOR_KEY}


def source_quantization_problems(ckpt: ConvertedCheckpoint) -> list[str]:
    """The source quantization config revert writes back must be an NVFP4 config of the descriptor's
    ``source_format`` (a tamperer's FP8, string or null section would be written into the "source")."""
    claimed = ckpt.descriptor.get("source_format")
    where = f"config.json quantization_config.{SOURCE_QUANT_KEY}"
    section = source_quantization_section(ckpt.config)
    if not isinstance(section, dict):
        return [
            f"{where} is {_short(section)}; the descriptor's source_format {claimed!r} needs its NVFP4 quantization "
            "config (revert writes it back into the source)"
        ]
    named = _format_named_by(section)
    if named is not None and named != claimed:
        return [f"{where} is a {named} config, but the descriptor's source_format is {claimed!r}"]
    found = None
    try:
        for name, fmt in FORMATS.items():
            # as convert detected it: ModelOpt's section may defer to hf_quant_config.json (copied alongside)
            # (the source's file is kept in nvfp4ckpt_source/; the folder's own one names the kernel layout)
            if fmt.detect(hf_quant_root(ckpt.root), {"quantization_config": section}) is not None:
                found = name
                break
    except InputError as exc:
        reason = str(exc).split(": ", 1)[-1]
        return [f"{where}: {reason} (the descriptor's source_format is {claimed!r})"]
    if found != claimed:
        what = f"a {found} config" if found else "no NVFP4 quantization config"
        return [f"{where} is {what}, but the descriptor's source_format is {claimed!r}"]
    return []


def _format_named_by(section: dict) -> str | None:
    """The source format a quantization section names by itself (ModelOpt may also say it in hf_quant_config.json)."""
    method = section.get("quant_method")
    if "quant_algo" in section or method == "modelopt":
        return "modelopt"
    return method if method in FORMATS else None


def source_problems(ckpt: ConvertedCheckpoint, src: SourceCheckpoint) -> list[str]:
    d = ckpt.descriptor
    layout = get_layout(DEFAULT_LAYOUT)
    parallel = d.get("parallel") or {}
    tp, ep = int(parallel.get("tp", 1)), int(parallel.get("ep", 1))  # validated when the checkpoint was opened
    try:
        ranks = {
            l.prefix: layout.rank_specs(tp, ep, l.num_experts, l.intermediate_size, f"{src.root}: {l.prefix}", l.gated)
            for l in src.layers
        }
    except Exception as exc:  # noqa: BLE001 - the split the descriptor claims does not fit the source
        return [f"parallel: tp={tp} ep={ep} does not fit the source ({exc})"]
    pad = pad_hidden_of(d)
    pad = pad if pad in PAD_HIDDEN_CHOICES else HIDDEN_ALIGN  # a bad one is reported by self_consistency_problems
    want = layout.checkpoint_descriptor(src, ranks if tp * ep > 1 else None, tp, ep, pad)
    problems = [f"descriptor {p}" for p in _differences(d, want, "")]
    # convert writes the source's own section (or, with only hf_quant_config.json, the flat form of it)
    qcfg = src.config.get("quantization_config")
    want_q = qcfg if isinstance(qcfg, dict) else src.format.flat_quantization_config()
    got_q = source_quantization_section(ckpt.config)
    problems.extend(f"config.json {p}" for p in _differences(got_q, want_q, f"quantization_config.{SOURCE_QUANT_KEY}"))
    return problems


def _differences(got: Any, want: Any, path: str) -> list[str]:
    if isinstance(got, dict) and isinstance(want, dict):
        out = []
        for key in sorted(set(got) | set(want), key=str):
            if key in IGNORED and not path:
                continue
            sub = f"{path}.{key}" if path else str(key)
            if key not in got:
                out.append(f"{sub}: missing (the source gives {_short(want[key])})")
            elif key not in want:
                out.append(f"{sub}: {_short(got[key])} is not a field convert writes for this source")
            else:
                out.extend(_differences(got[key], want[key], sub))
        return out
    if got != want or type(got) is not type(want):
        return [f"{path}: {_short(got)}, the source gives {_short(want)}"]
    return []


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."

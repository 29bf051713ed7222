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

import re
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Mapping

from .._lazy import torch
from ..errors import BadTensorError, InputError, LiveMismatchError, MissingTensorError, StaleScalarError, UnknownTensorError
from ..io import torch_dtype
from ..layouts.trtllm_gen import transform as kernel_layout
from ..layouts.trtllm_gen.descriptor import LayerInfo, canonical_specs
from ..layouts.trtllm_gen.ranks import RankSpec
from ..layouts.trtllm_gen.scalars import kernel_scalars
from ..quant import GROUP_SIZE
from ..source import architectures
from ..source.checkpoint import _match_fused, open_checkpoint
from ..source.formats import FORMATS, QuantFormat

KINDS = ("weight", "weight_scale", "weight_global", "input_global")  # a projection's four source tensors
SCALAR_KINDS = ("weight_global", "input_global")
DEPENDENT = ("g1_alphas", "g1_scale_c", "g2_alphas", "w13_input_scale_quant")  # functions of a1/a2 and weight_scale_2
_FUSED_ROLES = {"gate_up": ("gate", "up"), "down": ("down",)}


# ----------------------------------------------------------------------------------------------
# Results


@dataclass
class LayerUpdate:
    """What one layer's update did (on this rank)."""

    prefix: str
    experts: list[int]  # global expert ids whose weights were written on this rank
    other_rank_experts: list[int]  # experts in the update held by other ranks (their input scales still count)
    input_scale_maxima: tuple[float, float]  # (a1, a2) after the update
    scalars: dict[str, torch.Tensor]  # DEPENDENT scalars (float32, CPU) of the rows in ``scalar_rows`` (quant: [1])
    scalar_rows: list[int]  # local expert rows the scalars cover (all local experts whenever a1/a2 changed)
    stored: dict[str, torch.Tensor] = field(default_factory=dict)  # per-expert stored scalars of ``experts``, canonical names
    input_scales: dict[int, tuple[float, float]] = field(default_factory=dict)  # every supplied expert: (max w13, w2)
    written: list[str] = field(default_factory=list)  # live tensor names written


@dataclass
class UpdateReport:
    layers: dict[str, LayerUpdate]
    ignored: list[str]  # names skipped with ignore_unknown=True
    bytes_copied: int  # source bytes written into live tensors
    seconds: float


@dataclass
class LiveCheck:
    """Result of ``check_live``: ``ok``, or the first difference found."""

    ok: bool
    message: str
    tensor: str | None = None  # live tensor name
    expert: int | None = None  # global expert id
    row: int | None = None  # row of that expert in the live tensor (kernel order)
    source_tensor: str | None = None
    source_row: int | None = None
    checked_experts: int = 0
    unchecked: list[str] = field(default_factory=list)  # what could not be checked from the given tensors, and why

    def __bool__(self) -> bool:
        return self.ok


# ----------------------------------------------------------------------------------------------
# Public API


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
    return _update_live(_Context(layout, rank), live, named_tensors, input_scale_maxima, ignore_unknown)


def _update_live(
    ctx: "_Context", live: Mapping[str, torch.Tensor], named_tensors: Mapping[str, torch.Tensor],
    input_scale_maxima: Mapping[str, tuple[float, float]] | None, ignore_unknown: bool,
    known_inputs: Mapping[str, dict[int, tuple[float, float]]] | None = None,
) -> UpdateReport:  # fmt: skip
    """update_live_; ``known_inputs`` (prefix -> expert -> current (max w13, w2) input scale) adds what an
    UpdateStream has already applied to what live shows."""
    start = time.perf_counter()
    grouped, ignored = ctx.group(named_tensors, ignore_unknown)
    if ignore_unknown:  # e.g. pipeline parallelism: layers this process does not hold
        for prefix in [p for p in grouped if not any(k.startswith(p + ".") for k in live)]:
            ignored += sorted(grouped.pop(prefix)["names"].values())
    plans = [
        ctx.plan(prefix, entries, live, (input_scale_maxima or {}).get(prefix), known=(known_inputs or {}).get(prefix))
        for prefix, entries in grouped.items()
    ]
    copied = 0
    for plan in plans:  # nothing is written before every layer has been validated
        copied += _write(plan)
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
    ctx = _Context(layout, rank)
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
    grouped, _ = ctx.group(source, False)
    checked, unchecked = 0, []
    for prefix, entries in grouped.items():
        plan = ctx.plan(prefix, entries, live, (input_scale_maxima or {}).get(prefix), for_check=True)
        result = _compare(plan)
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


class UpdateStream:
    """In-place updates fed in any grouping: one tensor at a time (OpenRLHF's per-parameter broadcasts), buckets
    (slime, SGLang's custom loaders), several calls per layer. Tensors are held (referenced, not copied) until their
    expert is complete; a layer is applied once all its experts are (or every complete expert once ``max_pending_bytes``
    of source is held, or at :meth:`flush`). An application whose a1/a2 cannot be determined yet waits for more of
    its layer. Each application is an ``update_live_`` (all or nothing); between them the layer holds some updated
    and some old experts, as any streamed reload does: serve again after :meth:`finish`.

    Producers that reuse their buffers must pass copies: a held tensor is read when its expert is applied."""

    def __init__(
        self, live: Mapping[str, torch.Tensor], layout: dict, *, rank: int | None = None,
        input_scale_maxima: Mapping[str, tuple[float, float]] | None = None, ignore_unknown: bool = False,
        max_pending_bytes: int | None = None,
    ) -> None:  # fmt: skip
        self.live, self.layout, self.rank = live, layout, rank
        self.ctx = _Context(layout, rank)
        self.maxima = dict(input_scale_maxima or {})
        self.ignore_unknown = ignore_unknown
        self.max_pending_bytes = max_pending_bytes
        self.pending: dict[str, dict[str, torch.Tensor]] = {}  # layer prefix -> source name -> tensor
        self.applied: dict[str, set[int]] = {}  # layer prefix -> experts applied by this stream so far
        self.known: dict[str, dict[int, tuple[float, float]]] = {}  # their input scales: later a1/a2 decisions see them
        self.ignored: list[str] = []
        self.reports: list[UpdateReport] = []

    def add(self, named_tensors: Mapping[str, torch.Tensor]) -> list[UpdateReport]:
        """Hold these tensors; apply what is ready. Returns the updates applied by this call."""
        grouped, ignored = self.ctx.group(named_tensors, self.ignore_unknown)  # validates names now
        self.ignored += ignored
        for prefix, entries in grouped.items():
            held = self.pending.setdefault(prefix, {})
            held.update({name: named_tensors[name] for name in entries["names"].values()})
        done = []
        for prefix in list(grouped):
            ready = self._complete(prefix)
            if ready is not None and ready[0]:
                done += self._apply(prefix, ready[1], defer=False)  # the (rest of the) whole layer
        if self.max_pending_bytes is not None and self.pending_bytes > self.max_pending_bytes:
            done += self.flush()
        return done

    def flush(self) -> list[UpdateReport]:
        """Apply every complete expert now (those whose a1/a2 cannot be determined yet keep waiting)."""
        done = []
        for prefix in list(self.pending):
            ready = self._complete(prefix)
            if ready is not None and ready[1]:
                done += self._apply(prefix, ready[1], defer=True)
        return done

    def finish(self) -> list[UpdateReport]:
        """Apply everything held; anything left (an incomplete expert, undeterminable scalars) is refused."""
        done = []
        for prefix in list(self.pending):
            held = self.pending[prefix]
            done += self._apply(prefix, list(held), defer=False)  # raises with the missing names
        return done

    @property
    def pending_names(self) -> list[str]:
        return sorted(n for held in self.pending.values() for n in held)

    @property
    def pending_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for held in self.pending.values() for t in held.values())

    def _complete(self, prefix: str) -> tuple[bool, list[str]] | None:
        """(whether every expert of the layer not yet applied is held and complete, names of the complete experts'
        tensors)."""
        held = self.pending.get(prefix)
        if not held:
            return None
        entries = self.ctx.group(held, False)[0][prefix]
        info = self.ctx.targets[prefix].info
        if entries["fused"]:
            complete = all(k in entries["fused"].get(r, {}) for r in _FUSED_ROLES for k in KINDS)
            return (complete, list(held) if complete else [])
        names = entries["names"]
        full = [e for e, roles in entries["experts"].items() if all(k in roles.get(r, {}) for r in info.roles for k in KINDS)]
        ready = [names[(e, r, k)] for e in full for r in info.roles for k in KINDS]
        return len(set(full) | self.applied.get(prefix, set())) == info.num_experts, ready

    def _apply(self, prefix: str, names: list[str], defer: bool) -> list[UpdateReport]:
        held = self.pending[prefix]
        try:
            report = _update_live(self.ctx, self.live, {n: held[n] for n in names}, self.maxima, self.ignore_unknown,
                                  self.known)  # fmt: skip
        except StaleScalarError:
            if defer:
                return []
            raise
        for n in names:
            del held[n]
        if not held:
            del self.pending[prefix]
        done = report.layers.get(prefix)
        self.applied.setdefault(prefix, set()).update(_experts_named(self.ctx, names))
        if done is not None:
            self.known.setdefault(prefix, {}).update(done.input_scales)
        if done is not None and done.input_scale_maxima == done.input_scale_maxima:  # not NaN
            self.maxima[prefix] = done.input_scale_maxima  # later partial applications start from these
        self.reports.append(report)
        return [report]


def _experts_named(ctx: _Context, names: list[str]) -> set[int]:
    """Global experts the given source names cover (every expert for fused tensors)."""
    out: set[int] = set()
    for n in names:
        prefix, expert, _, _ = ctx.parse(n)
        out |= set(range(ctx.targets[prefix].info.num_experts)) if expert is None else {expert}
    return out


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


# ----------------------------------------------------------------------------------------------
# Names, shapes and the plan of one layer


@dataclass(frozen=True)
class _Target:
    """One MoE layer as this rank holds it."""

    info: LayerInfo
    rank: RankSpec | None

    @property
    def e0(self) -> int:
        return self.rank.expert_start if self.rank else 0

    @property
    def e1(self) -> int:
        return self.rank.expert_end if self.rank else self.info.num_experts

    @property
    def i0(self) -> int:
        return self.rank.inter_start if self.rank else 0

    @property
    def i1(self) -> int:
        return self.rank.inter_end if self.rank else self.info.intermediate_size

    @property
    def i_pad(self) -> int:
        return self.rank.intermediate_padded if self.rank else self.info.intermediate_padded

    @property
    def n_local(self) -> int:
        return self.e1 - self.e0


@dataclass
class _Plan:
    target: _Target
    fmt: QuantFormat
    live: dict[str, torch.Tensor]  # short canonical name -> live tensor (present ones)
    experts: dict[int, dict[str, dict[str, torch.Tensor]]]  # global expert -> role -> kind -> tensor (this rank's)
    fused: dict[str, dict[str, torch.Tensor]] | None  # "gate_up"/"down" -> kind -> tensor
    updated_rows: list[int]  # local rows whose weights and stored per-expert scalars are written
    raw: torch.Tensor  # [len(supplied), roles, 2] raw global scales (source dtype) of every supplied expert
    supplied: list[int]  # global ids of every expert in the update (other ranks' too)
    scalar_rows: list[int]  # local rows whose dependent scalars are written
    scalars: dict[str, torch.Tensor]  # kernel_scalars over scalar_rows (float32, CPU)
    report: LayerUpdate
    names: dict = field(default_factory=dict)  # (expert, role, kind) -> source name, as given
    unchecked: list[str] = field(default_factory=list)
    cache: dict = field(default_factory=dict)  # per-plan memo (source views of each expert)

    @property
    def maps(self) -> "_Maps":
        """Index maps for this shape (built on first use, then cached per shape)."""
        t, info = self.target, self.target.info
        return _maps(t.i1 - t.i0, t.i_pad, info.hidden_size, info.hidden_padded, info.gated)


class _Context:
    """The descriptor's view of source names: format, architecture, layers (and this rank's share of each)."""

    def __init__(self, layout: dict, rank: int | None) -> None:
        if not isinstance(layout, dict) or "layers" not in layout or "source_format" not in layout:
            raise InputError("layout: not a moe_kernel_layout descriptor (config['quantization_config']['moe_kernel_layout'])")
        fmt_cls = FORMATS.get(layout["source_format"])
        if fmt_cls is None:
            raise InputError(f"layout: unknown source_format {layout['source_format']!r}")
        self.fmt = fmt_cls(config_path=Path("config.json"), group_size=GROUP_SIZE)
        self.arch = architectures.get(layout["architecture"])
        parallel = layout.get("parallel") or {}
        gated = layout.get("activation", "swiglu") != "relu2"
        tp = int(parallel.get("tp", 1))
        self.targets: dict[str, _Target] = {}
        for prefix, entry in layout["layers"].items():
            info = LayerInfo.from_dict(prefix, entry, gated, tp)
            self.targets[prefix] = _Target(info, info.rank_spec(rank, "layout"))

    # -- names

    def parse(self, name: str) -> tuple[str, int | None, str, str] | None:
        """(layer prefix, expert or None for fused, role, kind), or None when ``name`` is no expert tensor."""
        hit = _parse_name(self.arch.name, self.fmt.name, name)
        if hit is None or hit[0] not in self.targets:
            return None
        if hit[1] is not None and hit[2] not in self.targets[hit[0]].info.roles:
            return None
        return hit

    def group(self, named: Mapping[str, torch.Tensor], ignore_unknown: bool) -> tuple[dict[str, dict], list[str]]:
        """Source tensors by layer: ``{"experts": {e: {role: {kind: t}}}, "fused": {role: {kind: t}}}``."""
        grouped: dict[str, dict] = {}
        ignored: list[str] = []
        for name, tensor in named.items():
            hit = self.parse(name)
            if hit is None:
                if ignore_unknown:
                    ignored.append(name)
                    continue
                suffixes = ", ".join(self.fmt.suffixes.values())
                raise UnknownTensorError(
                    f"{name}: not an expert tensor of any MoE layer in the layout ({self.arch.name} naming, "
                    f"{self.fmt.name} suffixes {suffixes}); pass only expert tensors (or ignore_unknown=True)"
                )
            if not isinstance(tensor, torch.Tensor):
                raise BadTensorError(f"{name}: is a {type(tensor).__name__}, not a torch.Tensor")
            if tensor.requires_grad:
                tensor = tensor.detach()  # a trainer's parameters: only their bytes are read
            prefix, expert, role, kind = hit
            layer = grouped.setdefault(prefix, {"experts": {}, "fused": {}, "names": {}})
            if expert is None:
                layer["fused"].setdefault(role, {})[kind] = tensor
            else:
                if expert >= self.targets[prefix].info.num_experts:
                    raise UnknownTensorError(f"{name}: expert {expert} but {prefix} has {self.targets[prefix].info.num_experts} experts")
                layer["experts"].setdefault(expert, {}).setdefault(role, {})[kind] = tensor
            layer["names"][(expert, role, kind)] = name
        return grouped, ignored

    def source_name(self, prefix: str, expert: int, role: str, kind: str) -> str:
        info = self.targets[prefix].info
        proj = info.proj_names.get(role, role) if not info.source_fused else _default_proj(self.arch, role)
        return f"{prefix}.{expert}.{proj}.{self.fmt.suffixes[kind]}"

    # -- validation and scalars

    def plan(
        self, prefix: str, entries: dict, live: Mapping[str, torch.Tensor], maxima: tuple[float, float] | None,
        for_check: bool = False, known: Mapping[int, tuple[float, float]] | None = None,
    ) -> _Plan:  # fmt: skip
        target = self.targets[prefix]
        info = target.info
        if entries["experts"] and entries["fused"]:
            raise InputError(f"{prefix}: the update mixes fused ({', '.join(entries['fused'])}) and per-expert tensors; send one form")
        live_t = self._live_tensors(target, live)
        roles = info.roles
        n13 = len(roles) - 1
        e_glob = info.num_experts
        fused = entries["fused"] or None
        if fused is not None:
            self._check_fused(target, fused)
            # one global scale per fused tensor: every expert gets it
            by_role = {r: fused[fr] for fr, rs in _FUSED_ROLES.items() for r in rs}
            raw_all = torch.stack([
                torch.stack([_scalar(by_role[r][k]) for k in SCALAR_KINDS]) for r in roles
            ]).unsqueeze(0).expand(e_glob, -1, -1)  # fmt: skip
            supplied = list(range(e_glob))
        else:
            self._check_experts(target, entries)
            supplied = sorted(entries["experts"])
            raw_all = _gather_scalars([[[entries["experts"][e][r][k] for k in SCALAR_KINDS] for r in roles] for e in supplied])
        self._check_scalar_values(prefix, raw_all, supplied, roles, entries["names"], fused is not None)
        ws2_sup = self.fmt.to_dequant_multiplier(raw_all[..., 0])  # [U, roles] float32, ModelOpt convention
        inp_sup = self.fmt.to_dequant_multiplier(raw_all[..., 1])

        # What the live tensors say about the experts this update does not touch.
        old_inp = _rows_of(live_t, "w13_input_scale", "w2_input_scale", target, e_glob)
        old_ws2 = _rows_of(live_t, "w13_weight_scale_2", "w2_weight_scale_2", target, e_glob)
        sup_idx = {e: k for k, e in enumerate(supplied)}
        unchecked: list[str] = []
        a_new: list[float] = []
        a_changed = False
        for which, cols in (("a1", slice(0, n13)), ("a2", slice(n13, n13 + 1))):
            sup_vals = dict(zip(supplied, inp_sup[:, cols].amax(1).tolist())) if supplied else {}
            old_vals = {}
            if old_inp is not None:
                rows, kind = old_inp
                base = 0 if kind == "global" else target.e0
                old_vals = {base + x: v for x, v in enumerate(rows[:, cols].amax(1).tolist())}
            old_vals |= {e: v[0 if which == "a1" else 1] for e, v in (known or {}).items()}  # applied earlier in a stream
            a_old = maxima[0 if which == "a1" else 1] if maxima else None
            if a_old is None and len(old_vals) == e_glob:
                a_old = max(old_vals.values())
            a, why = _new_maximum(sup_vals, old_vals, a_old, e_glob)
            if a is None:
                missing = [self.source_name(prefix, e, r, "input_global") for e in range(e_glob) if e not in sup_vals
                           for r in (roles[cols])]  # fmt: skip
                msg = (f"{prefix}: {which} (the layer maximum of the input scales over all {e_glob} experts) {why}; "
                       f"update the whole layer (every expert's tensors; missing {_few(missing)}) or pass input_scale_maxima")  # fmt: skip
                if for_check:
                    unchecked.append(msg)
                    a_new = []
                    break
                raise StaleScalarError(msg)
            a_new.append(a)
            a_changed |= a_old is None or a != a_old

        # Rows whose dependent scalars are recomputed: every local expert whose weight_scale_2 is known.
        local = range(target.e0, target.e1)
        updated_rows = [e - target.e0 for e in supplied if target.e0 <= e < target.e1]
        known = [x for x in range(target.n_local) if (x + target.e0) in sup_idx or old_ws2 is not None]
        if a_new and a_changed and len(known) < target.n_local and not for_check:
            # refused even when live holds none of them: an engine plugin writes its own forms from the report
            missing = [self.source_name(prefix, e, r, "weight_global") for e in local if e not in sup_idx for r in roles]
            raise StaleScalarError(
                f"{prefix}: the update changes a1/a2 to {a_new[0]!r}/{a_new[1]!r}, so g1_alphas, g1_scale_c and g2_alphas of "
                f"every expert change, but the weight_scale_2 of experts outside the update is neither live nor supplied "
                f"(missing {_few(missing)}); include live {prefix}.w13_weight_scale_2 and .w2_weight_scale_2, or supply those tensors"
            )  # fmt: skip
        scalars: dict[str, torch.Tensor] = {}
        scalar_rows: list[int] = []
        if a_new:
            scalar_rows = known if (a_changed or for_check) else sorted(set(updated_rows))
            ws2_rows, inp_rows = [], []
            for x in scalar_rows:
                e = x + target.e0
                if e in sup_idx:
                    ws2_rows.append(ws2_sup[sup_idx[e]])
                    inp_rows.append(inp_sup[sup_idx[e]])
                else:
                    ws2_rows.append(old_ws2[0][x])
                    inp_rows.append(None)
            # kernel_scalars takes a1/a2 as maxima over its rows: one extra row holding (a1, a1, a2) and weight scales
            # of 1 makes them the layer's (global) values; rows without a known input scale borrow that row's.
            extra = torch.tensor([a_new[0]] * n13 + [a_new[1]], dtype=torch.float32)
            ws2_m = torch.stack([r.float() for r in ws2_rows] + [torch.ones(n13 + 1)])
            inp_m = torch.stack([extra if r is None else r.float() for r in inp_rows] + [extra])
            full = kernel_scalars(ws2_m, inp_m)
            scalars = {k: (v if k == "w13_input_scale_quant" else v[:-1].contiguous()) for k, v in full.items() if k in DEPENDENT}
        report = LayerUpdate(
            prefix=prefix,
            experts=[x + target.e0 for x in updated_rows],
            other_rank_experts=[e for e in supplied if not target.e0 <= e < target.e1],
            input_scale_maxima=(a_new[0], a_new[1]) if a_new else (float("nan"), float("nan")),
            scalars=scalars,
            scalar_rows=scalar_rows,
        )
        experts = {e: entries["experts"][e] for e in supplied if target.e0 <= e < target.e1} if fused is None else {}
        plan = _Plan(target, self.fmt, live_t, experts, fused, updated_rows, raw_all, supplied, scalar_rows, scalars,
                     report, dict(entries["names"]), unchecked)  # fmt: skip
        local = [sup_idx[x + target.e0] for x in updated_rows]
        report.stored = {k: v[local].contiguous() for k, v in _stored_rows(plan).items()}
        report.input_scales = dict(zip(supplied, zip(inp_sup[:, :n13].amax(1).tolist(), inp_sup[:, n13].tolist()))) if supplied else {}
        return plan

    def _live_tensors(self, target: _Target, live: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        info = target.info
        specs = canonical_specs(info.prefix, target.n_local, info.hidden_padded, target.i_pad, self.fmt.name,
                                info.scalar_dtype, info.gated)  # fmt: skip
        out: dict[str, torch.Tensor] = {}
        for full, dtype, shape in specs:
            t = live.get(full)
            if t is None:
                continue
            short = full[len(info.prefix) + 1 :]
            shapes = [shape]
            if short in _INPUT_SCALE_NAMES:  # engines may keep every expert's input scales on each rank (SGLang)
                shapes.append((info.num_experts, *shape[1:]))
            want = torch_dtype(dtype)
            ok_dtype = t.dtype == want or (dtype == "F8_E4M3" and t.dtype == torch.uint8)
            if tuple(t.shape) not in shapes or not ok_dtype:
                raise BadTensorError(
                    f"live {full}: is {t.dtype} {list(t.shape)}; the layout says {want} {list(shape)} "
                    f"({'rank ' + str(target.rank.rank) if target.rank else 'unsharded'}); pass the matching live tensor"
                )
            if not t.is_contiguous():
                raise BadTensorError(f"live {full}: is not contiguous; in-place updates need the parameter's own storage")
            out[short] = t.detach()  # same storage; writes must not be recorded by autograd
        if not out:
            raise MissingTensorError(f"{info.prefix}: the update has tensors for this layer but live has none of its canonical tensors")
        return out

    def _check_experts(self, target: _Target, entries: dict) -> None:
        info = target.info
        h, i = info.hidden_size, info.intermediate_size
        want = {"gate": (i, h), "up": (i, h), "down": (h, i)}
        scalar_dtype = torch_dtype(info.scalar_dtype)
        for e in sorted(entries["experts"]):
            roles = entries["experts"][e]
            missing = [(r, k) for r in info.roles for k in KINDS if k not in roles.get(r, {})]
            if missing:
                names = [self.source_name(info.prefix, e, r, k) for r, k in missing]
                only_scalars = all(k in SCALAR_KINDS for _, k in missing)
                cls = StaleScalarError if only_scalars else MissingTensorError
                what = "its scalars would be stale" if only_scalars else "an expert is updated whole"
                raise cls(f"{info.prefix}: expert {e} is updated without {_few(names)} ({what}); send all four tensors of each projection")
            for r in info.roles:
                n, k = want[r]
                for kind, dtype, shape in (("weight", torch.uint8, (n, k // 2)), ("weight_scale", torch.float8_e4m3fn, (n, k // 16))):
                    _expect(entries["names"][(e, r, kind)], roles[r][kind], dtype, shape)
                for kind in SCALAR_KINDS:
                    _expect_scalar(entries["names"][(e, r, kind)], roles[r][kind], scalar_dtype)

    def _check_fused(self, target: _Target, fused: dict) -> None:
        info = target.info
        if not info.gated:
            raise InputError(f"{info.prefix}: fused experts are gated (gate_up_proj); this layer is not")
        e, h, i = info.num_experts, info.hidden_size, info.intermediate_size
        scalar_dtype = torch_dtype(info.scalar_dtype)
        shapes = {"gate_up": ((e, h // 2, 2 * i), (e, h // 16, 2 * i)), "down": ((e, i // 2, h), (e, i // 16, h))}
        for role, (w_shape, s_shape) in shapes.items():
            proj = "gate_up_proj" if role == "gate_up" else "down_proj"
            kinds = fused.get(role, {})
            missing = [f"{info.prefix}.{proj}{sfx}" for sfx, k in self.fmt.fused_suffixes.items() if k not in kinds]
            if missing:
                raise MissingTensorError(f"{info.prefix}: fused update without {_few(missing)}; send all eight fused tensors")
            _expect(f"{info.prefix}.{proj}", kinds["weight"], torch.uint8, w_shape)
            _expect(f"{info.prefix}.{proj}_weight_scale", kinds["weight_scale"], torch.float8_e4m3fn, s_shape)
            for kind, sfx in (("weight_global", "_weight_scale_2"), ("input_global", "_input_scale")):
                _expect_scalar(f"{info.prefix}.{proj}{sfx}", kinds[kind], scalar_dtype)

    def _check_scalar_values(self, prefix: str, raw: torch.Tensor, supplied: list[int], roles, names: dict, fused: bool) -> None:
        conv = self.fmt.to_dequant_multiplier(raw)
        bad = ~torch.isfinite(conv) | (conv <= 0)
        if bad.any():
            u, r, k = (int(v) for v in bad.nonzero()[0])
            name = (f"{prefix}.{'gate_up_proj' if roles[r] != 'down' else 'down_proj'}" if fused
                    else names[(supplied[u], roles[r], SCALAR_KINDS[k])])  # fmt: skip
            raise BadTensorError(f"{name}: global scale {float(raw[u, r, k])!r} is not finite and positive; the trainer's export is broken")


@lru_cache(maxsize=1 << 16)
def _parse_name(arch_name: str, fmt_name: str, name: str) -> tuple[str, int | None, str, str] | None:
    """A source name as (module prefix, expert or None for fused, role, kind) under an architecture's naming and a
    format's suffixes (cached: an RL run sends the same names every step)."""
    arch, fmt = architectures.get(arch_name), FORMATS[fmt_name]
    module, _, suffix = name.rpartition(".")
    if arch.fused_prefix_pattern and fmt.fused_projections:
        fused = _match_fused(fmt, re.compile(arch.fused_prefix_pattern), module, suffix)
        if fused is not None:
            return module, None, fused[0], fused[1]
    kind = {fmt.weight_suffix: "weight", fmt.weight_scale_suffix: "weight_scale", fmt.weight_global_suffix: "weight_global",
            fmt.input_global_suffix: "input_global"}.get(suffix)  # fmt: skip
    hit = arch.match_expert(module)
    if hit is None or kind is None:
        return None
    return hit[0], hit[1], hit[2], kind


_INPUT_SCALE_NAMES = ("w13_input_scale", "w2_input_scale", "w13_input_global_scale", "w2_input_global_scale")


def _default_proj(arch: architectures.Architecture, role: str) -> str:
    return next(p for p, r in arch.projections.items() if r == role)


def _few(names: list[str], limit: int = 3) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _expect(name: str, t: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    if t.dtype != dtype or tuple(t.shape) != shape:
        raise BadTensorError(f"{name}: is {t.dtype} {list(t.shape)}; the layout needs {dtype} {list(shape)}")


def _expect_scalar(name: str, t: torch.Tensor, dtype: torch.dtype) -> None:
    if t.dtype != dtype or t.numel() != 1:
        raise BadTensorError(f"{name}: is {t.dtype} {list(t.shape)}; the layout needs one {dtype} value (the source's scalar dtype)")


def _scalar(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(()).cpu()


def _gather_scalars(nested: list) -> torch.Tensor:
    """[U][roles][2] scalar tensors -> one CPU tensor [U, roles, 2] (one device->host transfer per device)."""
    flat = [t.reshape(()) for per_e in nested for per_r in per_e for t in per_r]  # detached by group()
    if not flat:
        return torch.empty((0, 0, 2))
    devices = {t.device for t in flat}
    stacked = torch.stack(flat).cpu() if len(devices) == 1 else torch.stack([t.cpu() for t in flat])
    return stacked.reshape(len(nested), len(nested[0]), 2)


def _rows_of(live_t: dict, w13: str, w2: str, target: _Target, e_glob: int) -> tuple[torch.Tensor, str] | None:
    """Live per-expert values [rows, roles] (w13 columns then w2) in the ModelOpt convention, and whether the rows are
    this rank's experts ("local") or every expert ("global"); None when live lacks them."""
    if w13 not in live_t or w2 not in live_t:
        return None
    a, b = live_t[w13].detach().float().cpu(), live_t[w2].detach().float().cpu()
    if a.shape[0] != b.shape[0]:
        return None
    return torch.cat([a, b.reshape(-1, 1)], 1), "global" if a.shape[0] == e_glob and e_glob != target.n_local else "local"


def _new_maximum(sup: dict[int, float], old: dict[int, float], a_old: float | None, n: int) -> tuple[float | None, str]:
    """The layer maximum after the update, or (None, why) when what is known does not determine it.

    ``sup``: expert -> max input scale in the update; ``old``: expert -> current value for experts live shows;
    ``a_old``: the current maximum over all experts, if known."""
    if len(set(sup) | set(old)) == n:
        return max(sup[e] if e in sup else old[e] for e in range(n)), ""
    if a_old is None:
        return None, "cannot be determined: neither every expert's input scale nor the current maximum is known"
    if not sup:
        return a_old, ""
    m = max(sup.values())
    if m >= a_old:
        return m, ""  # every other expert is <= a_old <= m
    if any(v == a_old for e, v in old.items() if e not in sup):
        return a_old, ""  # an untouched expert still holds the maximum
    if all(e in old and old[e] < a_old for e in sup):
        return a_old, ""  # none of the updated experts held it: an unseen expert does
    return None, "may drop: the update lowers input scales and the experts outside it are not all visible here"


# ----------------------------------------------------------------------------------------------
# Index maps (per shape, cached): where each source row / scale word lands in one expert's live slice


@dataclass(frozen=True, eq=False)  # identity: cached per shape, hashed by id
class _Maps:
    w13_rows: tuple[torch.Tensor, ...]  # per w13 half (up, gate): kernel row of each source row
    w13_scale: tuple[torch.Tensor, ...]  # per half: flat destination of each source scale word (or byte)
    w13_words: bool
    w2_rows: torch.Tensor
    w2_scale: torch.Tensor
    w2_words: bool

    def to(self, device: torch.device) -> "_Maps":
        return _maps_on(self, str(device))


@lru_cache(maxsize=32)
def _maps(i_loc: int, i_pad: int, h: int, h_pad: int, gated: bool) -> _Maps:
    halves = kernel_layout.w13_halves(gated)
    perm13 = kernel_layout.w13_row_permutation(halves * i_pad) if gated else kernel_layout.shuffle_row_permutation(i_pad)
    inv13 = _inverse(perm13)
    w13_rows = tuple(inv13[k * i_pad : k * i_pad + i_loc].contiguous() for k in range(halves))
    k13, k13_pad = h // 16, h_pad // 16
    w13_words = k13 % 4 == 0
    w13_scale = tuple(_scale_index(rows, k13, k13_pad, w13_words) for rows in w13_rows)
    w2_rows = _inverse(kernel_layout.shuffle_row_permutation(h_pad))[:h].contiguous()
    k2, k2_pad = i_loc // 16, i_pad // 16
    w2_words = k2 % 4 == 0
    return _Maps(w13_rows, w13_scale, w13_words, w2_rows, _scale_index(w2_rows, k2, k2_pad, w2_words), w2_words)


@lru_cache(maxsize=32)
def _maps_on(maps: _Maps, device: str) -> _Maps:
    if device == "cpu":
        return maps
    dev = torch.device(device)
    return _Maps(
        tuple(t.to(dev) for t in maps.w13_rows), tuple(t.to(dev) for t in maps.w13_scale), maps.w13_words,
        maps.w2_rows.to(dev), maps.w2_scale.to(dev), maps.w2_words,
    )  # fmt: skip


def _inverse(perm: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), dtype=perm.dtype)
    return inv


def _scale_index(kernel_rows: torch.Tensor, k: int, k_pad: int, words: bool) -> torch.Tensor:
    """Flat offsets, in one expert's swizzled scale matrix ``[rows_pad, k_pad]``, of source scale row r's words (4 bytes
    that stay together) or bytes: the 128x4 interleave of layout.swizzle_scales_128x4, applied after the row order."""
    r = kernel_rows.reshape(-1, 1)
    tile = (r // 128) * (k_pad // 4)
    inner = (r % 32) * 4 + (r % 128) // 32  # word index inside a 512-byte tile
    if words:
        w = torch.arange(k // 4).reshape(1, -1)
        return ((tile + w) * 128 + inner).reshape(-1)
    c = torch.arange(k).reshape(1, -1)
    return ((tile + c // 4) * 512 + inner * 4 + c % 4).reshape(-1)


# ----------------------------------------------------------------------------------------------
# One expert's source views (this rank's slice), whichever form the update came in


def _expert_views(plan: _Plan, e: int) -> dict[str, torch.Tensor]:
    """``up``/``gate``/``down`` weights and ``*_s`` scales (uint8 views) of global expert ``e``, sliced to this rank."""
    t = plan.target
    i0, i1, i = t.i0, t.i1, t.info.intermediate_size
    out: dict[str, torch.Tensor] = {}
    if plan.fused is not None:
        gu, gus = plan.fused["gate_up"]["weight"][e], plan.fused["gate_up"]["weight_scale"][e].view(torch.uint8)
        d, ds = plan.fused["down"]["weight"][e], plan.fused["down"]["weight_scale"][e].view(torch.uint8)
        out["gate"], out["gate_s"] = gu[:, i0:i1].T, gus[:, i0:i1].T  # [gate | up] along the last dim
        out["up"], out["up_s"] = gu[:, i + i0 : i + i1].T, gus[:, i + i0 : i + i1].T
        out["down"], out["down_s"] = d[i0 // 2 : i1 // 2].T, ds[i0 // 16 : i1 // 16].T
        return out
    roles = plan.experts[e]
    for r in t.info.roles:
        w, s = roles[r]["weight"], roles[r]["weight_scale"].view(torch.uint8)
        if r == "down":
            out["down"], out["down_s"] = w[:, i0 // 2 : i1 // 2], s[:, i0 // 16 : i1 // 16]
        else:
            out[r], out[r + "_s"] = w[i0:i1], s[i0:i1]
    return out


def _local_experts(plan: _Plan) -> list[int]:
    return list(range(plan.target.n_local)) if plan.fused is not None else plan.updated_rows


def _w13_halves(plan: _Plan) -> tuple[str, ...]:
    return ("up", "gate") if plan.target.info.gated else ("up",)


def _src_words(src: torch.Tensor, device: torch.device, words: bool) -> torch.Tensor:
    """A source scale matrix's bytes as a flat tensor on ``device``: int32 words when rows are whole words."""
    s = src.to(device)
    if not s.is_contiguous():
        s = s.contiguous()
    flat = s.reshape(-1)
    if words:
        try:
            return flat.view(torch.int32)
        except RuntimeError:  # misaligned storage offset
            return flat.clone().view(torch.int32)
    return flat


def _dst_flat(live_expert: torch.Tensor, words: bool) -> torch.Tensor:
    flat = live_expert.view(torch.uint8).reshape(-1)
    return flat.view(torch.int32) if words else flat


# ----------------------------------------------------------------------------------------------
# Writing


# Three ways to move one expert's bytes, the same bytes each way (tests/test_live_update.py checks all three):
# - "numpy": CPU, no padding: the converter's per-expert numpy copies (layout.w13_rows_into, ...), strided views on
#   both sides; single-threaded and without the GIL (torch's OpenMP split of copies this small stalls on busy cores).
# - "strided": other devices, no padding: the same views in torch, one copy kernel per source tensor.
# - "index": padded layers or sizes the views do not tile: the cached index maps, with index_copy_.
CPU_NUMPY = True  # tests switch it off to run the "strided" path on the CPU


def _path(plan: _Plan, device: torch.device) -> str:
    t, info = plan.target, plan.target.info
    if not info.gated or (info.hidden_padded, t.i_pad) != (info.hidden_size, t.i1 - t.i0):
        return "index"
    return "numpy" if device.type == "cpu" and CPU_NUMPY else "strided"


def _write(plan: _Plan) -> int:
    live, info = plan.live, plan.target.info
    copied = 0
    for name in (n for n in KERNEL_NAMES if n in live):
        tensor = live[name]
        path = _path(plan, tensor.device)
        maps = plan.maps.to(tensor.device) if path == "index" else None
        live_np = tensor.view(torch.uint8).numpy() if path == "numpy" else None
        dst_all: dict[int, torch.Tensor] = {}  # "strided": per w13 half, the destination view over every local expert
        for rows, src in _chunks(plan, name, path, tensor.device):
            if live_np is not None and isinstance(rows, int):  # one expert on the CPU: the converter's numpy copies
                for half, key in _sources_of(plan, name):
                    copied += _put_numpy(name, live_np[rows], half, src[key])
                continue
            if path == "strided" and isinstance(rows, int):  # one expert: index the prebuilt view (fewer host ops)
                for half, key in _sources_of(plan, name):
                    if half not in dst_all:
                        dst_all[half] = _dst_view(name, tensor.view(torch.uint8), half, *src[key].shape)
                    dst_all[half][rows].copy_(_src_view(name, src[key].to(tensor.device)))
                    copied += src[key].numel()
                continue
            dst = tensor[rows].view(torch.uint8)
            for half, key in _sources_of(plan, name):
                copied += _put(path, maps, name, dst, half, src[key])
    written = _write_scalars(plan) | ({n for n in KERNEL_NAMES if n in live} if _local_experts(plan) else set())
    plan.report.written = sorted(f"{info.prefix}.{n}" for n in written)
    return copied


def _chunks(plan: _Plan, name: str, path: str, device: torch.device):
    """(live rows, source views) to write for one kernel tensor: a run of consecutive experts at once (a slice, views
    ``[n, rows, cols]``) when every source of the run is an equally strided view of one buffer on the live device
    (a trainer's stacked experts, fused Llama-4 tensors) and the kernel views need no copy; else one expert at a
    time (an int, views ``[rows, cols]``)."""
    for run in _runs(_local_experts(plan)):
        stacked = _stacked_views(plan, name, run, device) if path != "index" and len(run) > 1 else None
        if stacked is not None:
            yield slice(run[0], run[-1] + 1), stacked
            continue
        for x in run:
            yield x, _views_of(plan, x)


def _views_of(plan: _Plan, x: int) -> dict[str, torch.Tensor]:
    """``_expert_views`` of local row ``x``, computed once per plan."""
    cache = plan.cache.setdefault("views", {})
    if x not in cache:
        cache[x] = _expert_views(plan, x + plan.target.e0)
    return cache[x]


def _runs(xs: list[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    for x in xs:
        if runs and runs[-1][-1] + 1 == x:
            runs[-1].append(x)
        else:
            runs.append([x])
    return runs


def _stacked_views(plan: _Plan, name: str, run: list[int], device: torch.device) -> dict[str, torch.Tensor] | None:
    out: dict[str, torch.Tensor] = {}
    for _, key in _sources_of(plan, name):
        first, second = _views_of(plan, run[0])[key], _views_of(plan, run[1])[key]
        if first.untyped_storage().data_ptr() != second.untyped_storage().data_ptr():
            return None  # separate tensors (the common per-expert case): no need to look further
        ts = [_views_of(plan, x)[key] for x in run]
        same = all(
            t.device == device and t.dtype == first.dtype and t.shape == first.shape and t.stride() == first.stride()
            and t.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
            for t in ts
        )  # fmt: skip
        step = second.data_ptr() - first.data_ptr()
        if not same or step % first.element_size() or any(t.data_ptr() - first.data_ptr() != k * step for k, t in enumerate(ts)):
            return None
        view = first.as_strided((len(ts), *first.shape), (step // first.element_size(), *first.stride()), first.storage_offset())
        try:
            _src_view(name, view, copy=False)
        except RuntimeError:  # the kernel view of these strides would need a copy of the run: go expert by expert
            return None
        out[key] = view
    return out


KERNEL_NAMES = ("w13_weight", "w13_weight_scale", "w2_weight", "w2_weight_scale")


def _sources_of(plan: _Plan, name: str) -> list[tuple[int, str]]:
    """(w13 half, key of _expert_views) of the source matrices that make up one expert of a kernel tensor."""
    sfx = "_s" if name.endswith("scale") else ""
    if name.startswith("w13"):
        return [(k, half + sfx) for k, half in enumerate(_w13_halves(plan))]
    return [(0, "down" + sfx)]


def _put_numpy(name: str, out, half: int, src: torch.Tensor) -> int:
    """One source matrix of one expert into its live slice ``out`` (a numpy view of a CPU tensor), with the per-expert
    copies of ``convert``'s CPU fast path (layout.w13_rows_into, ...): the same views as :func:`_views`."""
    rows = src.cpu().numpy()
    if name == "w13_weight":
        kernel_layout.w13_rows_into(out, half, rows)
    elif name == "w13_weight_scale":
        kernel_layout.w13_scales_into(out, half, rows)
    elif name == "w2_weight":
        kernel_layout.w2_rows_into(out, rows)
    else:
        kernel_layout.w2_scales_into(out, rows)
    return rows.size


def _put(path: str, maps: "_Maps | None", name: str, dst: torch.Tensor, half: int, src: torch.Tensor) -> int:
    """Write one source matrix (a w13 half, or down) of one expert into its live slice ``dst`` (uint8)."""
    if path == "numpy":
        d, s = _views(name, dst, half, src.cpu())
        d.numpy()[...] = s.numpy()
    elif path == "strided":
        d, s = _views(name, dst, half, src.to(dst.device))
        d.copy_(s)
    elif name.endswith("scale"):
        words = maps.w13_words if name.startswith("w13") else maps.w2_words
        index = maps.w13_scale[half] if name.startswith("w13") else maps.w2_scale
        _dst_flat(dst, words).index_copy_(0, index, _src_words(src, dst.device, words))
    else:
        rows = maps.w13_rows[half] if name.startswith("w13") else maps.w2_rows
        cols = src.shape[1]
        (dst if cols == dst.shape[1] else dst[:, :cols]).index_copy_(0, rows, src.to(dst.device))
    return src.numel()


def _views(name: str, out: torch.Tensor, half: int, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(view of the live slice ``out``, view of source ``rows``) of the same shape, element for element the kernel
    layout (unpadded, gated): the views of layout.w13_rows_into / w13_scales_into / w2_rows_into / w2_scales_into, in
    torch, with any leading (expert) dims. Scales move as int32 words (the 4 bytes of a column group stay together)."""
    *lead, n, c = rows.shape
    return _dst_view(name, out, half, n, c), _src_view(name, rows)


def _dst_view(name: str, out: torch.Tensor, half: int, n: int, c: int) -> torch.Tensor:
    """:func:`_views`' destination: ``out`` ``[..., rows, cols]`` (uint8) for source matrices of ``n`` x ``c``."""
    lead = out.shape[:-2]
    m = len(lead)
    if name == "w13_weight":  # kernel row 32b + 16a + 8h + r holds half h's row 16b + 2r + a: (b, a, h, r, c)
        return out.view(*lead, n // 16, 2, 2, 8, c).select(m + 2, half)
    if name == "w13_weight_scale":  # words (B1, w, a, h, r, B0), b = 4*B1 + B0
        return out.view(torch.int32).view(*lead, n // 64, c // 4, 2, 2, 8, 4).select(m + 3, half)
    if name == "w2_weight":  # row 32b + 8p + q holds row 32b + 4q + p: (b, p, q, c)
        return out.view(*lead, n // 32, 4, 8, c)
    return out.view(torch.int32).view(*lead, n // 128, c // 4, 4, 8, 4)  # words (B1, w, p, q, B0)


def _src_view(name: str, rows: torch.Tensor, copy: bool = True) -> torch.Tensor:
    """Source rows ``[..., n, c]`` arranged as :func:`_views`' destination; ``copy=False`` raises rather than copy."""
    *lead, n, c = rows.shape
    m = len(lead)
    keep = tuple(range(m))
    shape = (lambda t, *s: t.reshape(*s)) if copy else (lambda t, *s: t.view(*s))
    if name == "w13_weight":  # (b, r, a, c) -> (b, a, r, c)
        return shape(rows, *lead, n // 16, 8, 2, c).permute(*keep, m, m + 2, m + 1, m + 3)
    if name == "w2_weight":  # (b, q, p, c) -> (b, p, q, c)
        return shape(rows, *lead, n // 32, 8, 4, c).permute(*keep, m, m + 2, m + 1, m + 3)
    words = _int32_rows(rows) if copy else rows.view(torch.int32)
    if name == "w13_weight_scale":  # (B1, B0, r, a, w) -> (B1, w, a, r, B0)
        return shape(words, *lead, n // 64, 4, 8, 2, c // 4).permute(*keep, m, m + 4, m + 3, m + 2, m + 1)
    return shape(words, *lead, n // 128, 4, 8, 4, c // 4).permute(*keep, m, m + 4, m + 3, m + 2, m + 1)  # (B1, B0, q, p, w)


def _int32_rows(rows: torch.Tensor) -> torch.Tensor:
    """``[..., n, c]`` bytes as ``[..., n, c/4]`` int32 words (a copy only when the bytes cannot be reinterpreted)."""
    try:
        return rows.view(torch.int32)
    except RuntimeError:  # not contiguous along c, or a misaligned offset
        pass
    dense = rows.contiguous()
    try:
        return dense.view(torch.int32)
    except RuntimeError:
        return dense.clone().view(torch.int32)  # fresh storage is aligned


def _stored_rows(plan: _Plan) -> dict[str, torch.Tensor]:
    """Per-expert stored scalars of every supplied expert (rows in ``plan.supplied`` order), by canonical name."""
    n13 = len(plan.target.info.roles) - 1
    raw = plan.raw
    ws2 = plan.fmt.to_dequant_multiplier(raw[..., 0]) if raw.numel() else raw[..., 0].float()
    inp = plan.fmt.to_dequant_multiplier(raw[..., 1]) if raw.numel() else raw[..., 1].float()
    out = {
        "w13_weight_scale_2": ws2[:, :n13], "w2_weight_scale_2": ws2[:, n13],
        "w13_input_scale": inp[:, :n13], "w2_input_scale": inp[:, n13],
    }  # fmt: skip
    if plan.fmt.raw_scalar_names:  # the format keeps its stored global scales too (compressed-tensors)
        w13_w, w2_w, w13_i, w2_i = plan.fmt.raw_scalar_names
        out |= {w13_w: raw[:, :n13, 0], w2_w: raw[:, n13, 0], w13_i: raw[:, :n13, 1], w2_i: raw[:, n13, 1]}
    return out


def _stored_targets(plan: _Plan, name: str, t: torch.Tensor) -> tuple[list[int], list[int], list[int]]:
    """(live rows, rows of ``_stored_rows`` values, global experts) a stored scalar tensor takes from the update: this
    rank's experts, or every supplied expert when the live tensor holds every expert's rows (input scales)."""
    t0, info = plan.target, plan.target.info
    every = name in _INPUT_SCALE_NAMES and t.shape[0] == info.num_experts and info.num_experts != t0.n_local
    picked = [(k, e) for k, e in enumerate(plan.supplied) if every or t0.e0 <= e < t0.e1]
    return [e if every else e - t0.e0 for _, e in picked], [k for k, _ in picked], [e for _, e in picked]


def _write_scalars(plan: _Plan) -> set[str]:
    """Write the stored and dependent scalars; returns the names written."""
    live = plan.live
    written: set[str] = set()
    for name, values in _stored_rows(plan).items():
        if name in live:
            t = live[name]
            rows, picked, _ = _stored_targets(plan, name, t)
            if rows:
                src = values[picked].to(t.dtype).reshape(-1, *t.shape[1:]).to(t.device)
                t.index_copy_(0, torch.tensor(rows, dtype=torch.int64, device=t.device), src)
                written.add(name)
    if plan.scalar_rows:
        rows = torch.tensor(plan.scalar_rows, dtype=torch.int64)
        for name, values in plan.scalars.items():
            if name not in live:
                continue
            t = live[name]
            if name == "w13_input_scale_quant":
                t.copy_(values.to(t.device))
            else:
                t.index_copy_(0, rows.to(t.device), values.to(t.device))
            written.add(name)
    return written


# ----------------------------------------------------------------------------------------------
# Checking


def _compare(plan: _Plan) -> LiveCheck:
    live, t, info = plan.live, plan.target, plan.target.info
    padded = (info.hidden_padded, t.i_pad) != (info.hidden_size, t.i1 - t.i0)
    parts = [(name, live[name]) for name in KERNEL_NAMES if name in live]
    paths = {name: _path(plan, tensor.device) for name, tensor in parts}
    # Pass 1: a difference flag per (expert, source matrix) and, for padded layers, per (expert, tensor) for the
    # padding. On a GPU the flags stay on the device until one read-back (no synchronization per expert).
    checks: list[tuple] = []
    for x in _local_experts(plan):
        src = _views_of(plan, x)
        for name, tensor in parts:
            dst = tensor[x].view(torch.uint8)
            for half, key in _sources_of(plan, name):
                checks.append((x, name, half, key, _differs(paths[name], name, dst, half, src[key])))
        if padded:  # padding is zero iff the nonzero counts agree (the source bytes are compared above)
            for name, tensor in parts:
                want = sum(torch.count_nonzero(src[key].view(torch.uint8)).to(tensor.device) for _, key in _sources_of(plan, name))
                checks.append((x, name, None, None, torch.count_nonzero(tensor[x].view(torch.uint8)) != want))
    flags = _read_flags([c[-1] for c in checks])
    # Pass 2: the first flagged one, located with the index maps (one expert's gather).
    for (x, name, half, key, _), flagged in zip(checks, flags):
        if not flagged:
            continue
        e = x + t.e0
        if key is None:
            return LiveCheck(False, f"live {info.prefix}.{name}: expert {e} has nonzero padding (the kernel would read it)",
                             tensor=f"{info.prefix}.{name}", expert=e)  # fmt: skip
        dst = live[name][x].view(torch.uint8)
        diff = _locate(plan.maps.to(dst.device), name, dst, half, _expert_views(plan, e)[key])
        if diff is not None:
            kernel_row, source_row = diff
            return _diff(plan, name, e, kernel_row, key.removesuffix("_s"), "weight_scale" if key.endswith("_s") else "weight", source_row)
    for name, rows, experts, want in _expected_scalars(plan):
        t_live = live[name]
        got = t_live.detach().index_select(0, rows.to(t_live.device))
        want = want.to(t_live.dtype).to(t_live.device).reshape(got.shape)
        bad = (got.contiguous().view(torch.uint8).reshape(len(rows), -1) != want.contiguous().view(torch.uint8).reshape(len(rows), -1)).any(1)
        if bool(bad.any()):
            k = int(bad.nonzero()[0])
            row, expert = int(rows[k]), experts[k]
            return LiveCheck(
                False, f"live {info.prefix}.{name}: expert {expert} (row {row}) is {got[k].tolist()}, the source gives "
                f"{want[k].tolist()} (stale scalar)",
                tensor=f"{info.prefix}.{name}", expert=expert, row=row,
            )  # fmt: skip
    return LiveCheck(True, "equal", checked_experts=len(_local_experts(plan)), unchecked=plan.unchecked)


def _differs(path: str, name: str, dst: torch.Tensor, half: int, src: torch.Tensor) -> "bool | torch.Tensor":
    """Whether a source matrix differs from its place in live: a bool (CPU), a device flag (other devices), or True
    (padded layers: the index maps do the comparison in pass 2)."""
    if path == "index":
        return True
    if path == "numpy":
        import numpy as np

        d, s = _views(name, dst, half, src.cpu())
        return not np.array_equal(d.numpy(), s.numpy())
    d, s = _views(name, dst, half, src.to(dst.device))
    return (d != s).any()


def _read_flags(flags: list) -> list[bool]:
    tensors = [f for f in flags if isinstance(f, torch.Tensor)]
    if not tensors:
        return [bool(f) for f in flags]
    by_device: dict = {}
    for f in tensors:
        by_device.setdefault(f.device, []).append(f)
    values = {dev: iter(torch.stack(fs).cpu().tolist()) for dev, fs in by_device.items()}  # one read-back per device
    return [bool(next(values[f.device])) if isinstance(f, torch.Tensor) else bool(f) for f in flags]


def _expected_scalars(plan: _Plan):
    """(live name, live rows, their global experts, expected values) for every present scalar the source determines."""
    live, t = plan.live, plan.target
    for name, values in _stored_rows(plan).items():
        if name in live:
            rows, picked, experts = _stored_targets(plan, name, live[name])
            if rows:
                yield name, torch.tensor(rows, dtype=torch.int64), experts, values[picked]
    for name, values in plan.scalars.items():
        if name not in live or not plan.scalar_rows:
            continue
        if name == "w13_input_scale_quant":
            yield name, torch.zeros(1, dtype=torch.int64), [None], values
        else:
            yield name, torch.tensor(plan.scalar_rows, dtype=torch.int64), [x + t.e0 for x in plan.scalar_rows], values


def _locate(maps: _Maps, name: str, dst: torch.Tensor, half: int, src: torch.Tensor) -> tuple[int, int] | None:
    """(kernel row, source row) of the first source row whose bytes differ in live, or None; gathers one expert's
    matrix with the index maps."""
    rows = maps.w13_rows[half] if name.startswith("w13") else maps.w2_rows
    if name.endswith("scale"):
        words = maps.w13_words if name.startswith("w13") else maps.w2_words
        index = maps.w13_scale[half] if name.startswith("w13") else maps.w2_scale
        got = _dst_flat(dst, words).index_select(0, index)
        want = _src_words(src, dst.device, words)
        per_row = src.shape[1] // 4 if words else src.shape[1]
        if torch.equal(got, want):
            return None
        source_row = int((got != want).nonzero()[0]) // per_row
    else:
        got = dst.index_select(0, rows)[:, : src.shape[1]]
        want = src.to(dst.device)
        if torch.equal(got, want):
            return None
        source_row = int((got != want).any(1).nonzero()[0])
    return int(rows[source_row]), source_row


def _diff(plan: _Plan, name: str, expert: int, row: int, role: str, kind: str, source_row: int) -> LiveCheck:
    prefix = plan.target.info.prefix
    if plan.fused is not None:
        proj = "gate_up_proj" if role != "down" else "down_proj"
        source = f"{prefix}.{proj}" + ("" if kind == "weight" else "_weight_scale")
        where = f"expert {expert}, {role} row {source_row + (plan.target.i0 if role != 'down' else 0)}"
    else:
        source = plan.names.get((expert, role, kind), f"{prefix}.{expert}.{role}")
        where = f"row {source_row + (plan.target.i0 if role != 'down' else 0)}"
    return LiveCheck(
        False, f"live {prefix}.{name}: expert {expert}, row {row} differs from {source} {where}",
        tensor=f"{prefix}.{name}", expert=expert, row=row, source_tensor=source, source_row=source_row,
    )  # fmt: skip

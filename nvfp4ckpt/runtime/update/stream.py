"""Updates fed in any grouping (one tensor at a time, buckets): ``UpdateStream``."""

from __future__ import annotations

from typing import Mapping

from ..._lazy import torch
from ...errors import StaleScalarError
from . import stacked
from .names import _FUSED_ROLES, KINDS, Context
from .results import UpdateReport


def _update_live(*args, **kwargs) -> UpdateReport:
    from . import _update_live as apply  # the package root holds the one update entry point

    return apply(*args, **kwargs)


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
        self.ctx = Context(layout, rank)
        self.maxima = dict(input_scale_maxima or {})
        self.ignore_unknown = ignore_unknown
        self.max_pending_bytes = max_pending_bytes
        self.pending: dict[str, dict[str, torch.Tensor]] = {}  # layer prefix -> source name -> tensor
        # per layer, kept up to date by add() so that each call costs what it adds (not what is held):
        self.slots: dict[str, dict[int | None, dict[tuple[str, str], str]]] = {}  # expert (None: fused) -> (role, kind) -> name
        self.full: dict[str, set[int | None]] = {}  # held experts that are complete
        self.covered: dict[str, set[int]] = {}  # experts complete or applied
        self.applied: dict[str, set[int]] = {}  # layer prefix -> experts applied by this stream so far
        self.known: dict[str, dict[int, tuple[float, float]]] = {}  # their input scales: later a1/a2 decisions see them
        self.ignored: list[str] = []
        self.labels: dict[str, str] = {}  # per-expert view name -> the stacked tensor it came from (for messages)
        self.reports: list[UpdateReport] = []

    def add(self, named_tensors: Mapping[str, torch.Tensor]) -> list[UpdateReport]:
        """Hold these tensors; apply what is ready. Returns the updates applied by this call."""
        # transformers-5 stacked experts: per-expert views, held like per-expert tensors (in any grouping)
        named_tensors, ignored_stacked, labels = stacked.expand(self.ctx, named_tensors, self.ignore_unknown, complete=False)
        self.labels.update(labels)
        with stacked.named_as_sent(self.labels):
            grouped, ignored = self.ctx.group(named_tensors, self.ignore_unknown)  # validates names now
        self.ignored += ignored_stacked + ignored
        for prefix, entries in grouped.items():
            held = self.pending.setdefault(prefix, {})
            held.update({name: named_tensors[name] for name in entries["names"].values()})
            slots = self.slots.setdefault(prefix, {})
            touched = set()
            for (expert, role, kind), name in entries["names"].items():
                slots.setdefault(expert, {})[(role, kind)] = name
                touched.add(expert)
            for expert in touched:
                if self._is_full(prefix, slots[expert], expert):
                    self.full.setdefault(prefix, set()).add(expert)
                    self.covered.setdefault(prefix, set()).update(self._experts_of(prefix, expert))
        done = []
        for prefix in list(grouped):
            if len(self.covered.get(prefix, ())) == self.ctx.targets[prefix].info.num_experts and self.full.get(prefix):
                done += self._apply(prefix, self._full_names(prefix), defer=False)  # the (rest of the) whole layer
        if self.max_pending_bytes is not None and self.pending_bytes > self.max_pending_bytes:
            done += self.flush()
        return done

    def flush(self) -> list[UpdateReport]:
        """Apply every complete expert now (those whose a1/a2 cannot be determined yet keep waiting)."""
        done = []
        for prefix in list(self.pending):
            if self.full.get(prefix):
                done += self._apply(prefix, self._full_names(prefix), defer=True)
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

    def _is_full(self, prefix: str, slot: dict[tuple[str, str], str], expert: int | None) -> bool:
        """Whether one held expert (or the fused tensors) is complete: every kind of every projection, or every
        projection unquantized (their input scales are optional)."""
        roles = _FUSED_ROLES if expert is None else self.ctx.targets[prefix].info.roles
        return all((r, k) in slot for r in roles for k in KINDS) or all((r, "dense") in slot for r in roles)

    def _experts_of(self, prefix: str, expert: int | None) -> range | tuple[int]:
        return range(self.ctx.targets[prefix].info.num_experts) if expert is None else (expert,)

    def _full_names(self, prefix: str) -> list[str]:
        slots = self.slots[prefix]
        return [name for e in self.full[prefix] for name in slots[e].values()]

    def _apply(self, prefix: str, names: list[str], defer: bool) -> list[UpdateReport]:
        held = self.pending[prefix]
        try:
            with stacked.named_as_sent(self.labels):
                report = _update_live(self.ctx, self.live, {n: held[n] for n in names}, self.maxima, self.ignore_unknown,
                                      self.known)  # fmt: skip
        except StaleScalarError:
            if defer:
                return []
            raise
        for n in names:
            del held[n]
        applied_slots = {e for e in self.full.get(prefix, set()) if all(n not in held for n in self.slots[prefix][e].values())}
        for e in applied_slots:
            del self.slots[prefix][e]
        self.full[prefix] = self.full.get(prefix, set()) - applied_slots
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

def _experts_named(ctx: Context, names: list[str]) -> set[int]:
    """Global experts the given source names cover (every expert for fused tensors)."""
    out: set[int] = set()
    for n in names:
        prefix, expert, _, _ = ctx.parse(n)
        out |= set(range(ctx.targets[prefix].info.num_experts)) if expert is None else {expert}
    return out

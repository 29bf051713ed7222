"""Updates fed in any grouping (one tensor at a time, buckets): ``UpdateStream``."""

from __future__ import annotations

from typing import Mapping

from ..._lazy import torch
from ...errors import StaleScalarError
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
        full = [e for e, roles in entries["experts"].items()
                if all(k in roles.get(r, {}) for r in info.roles for k in KINDS)
                or all("dense" in roles.get(r, {}) for r in info.roles)]  # unquantized: input scales optional
        ready = [names[(e, r, k)] for e in full for r in info.roles for k in (*KINDS, "dense") if (e, r, k) in names]
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

def _experts_named(ctx: Context, names: list[str]) -> set[int]:
    """Global experts the given source names cover (every expert for fused tensors)."""
    out: set[int] = set()
    for n in names:
        prefix, expert, _, _ = ctx.parse(n)
        out |= set(range(ctx.targets[prefix].info.num_experts)) if expert is None else {expert}
    return out

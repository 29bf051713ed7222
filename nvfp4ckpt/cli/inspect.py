"""``nvfp4ckpt inspect SRC``: format, architecture, MoE layers, sizes, routing, issues."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from ..source import architectures
from ..errors import InputError
from ..inspect import inspect_checkpoint
from ._options import JsonOpt, QuietOpt, RevisionOpt
from ..io import count, format_size
from ._output import Output

INSPECT_EXAMPLES = (
    """Examples:\n\n  nvfp4ckpt inspect ./Qwen3-30B-A3B-NVFP4\n\n  nvfp4ckpt inspect nvidia/DeepSeek-R1-NVFP4 --json"""
    """\n\n  nvfp4ckpt inspect --families"""
)

OptionalSrcArg = Annotated[
    str | None, typer.Argument(help="Checkpoint folder, or a Hugging Face Hub repo id (owner/name).", show_default=False)
]
FamiliesOpt = Annotated[bool, typer.Option("--families", help="List the supported model families and exit.")]


def inspect(
    src: OptionalSrcArg = None, json: JsonOpt = False, revision: RevisionOpt = None, families: FamiliesOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Describe a source or converted checkpoint without reading its weights (or list supported families)."""
    out = Output(json_mode=json, quiet=quiet, command="inspect")
    if families and src is not None:
        raise InputError(f"inspect {src} --families: pass either a checkpoint or --families, not both")
    if families:
        rows = [architectures.describe(a) for a in architectures.registered()]
        out.result({"families": rows})
        table = Table("family", "model_type", "activation", "routing", "expert tensors", title_justify="left")
        for f in rows:
            table.add_row(f["name"], ", ".join(f["model_types"]), f["activation"], str(f["routing"]), f["experts"])
        out.table(table)
        return
    if src is None:
        raise InputError("inspect: pass a checkpoint folder or Hub repo id (or --families)")
    report = inspect_checkpoint(src, revision)
    out.result(report.to_dict())
    summary = Table(title=f"{report.path}", show_header=False, title_justify="left")
    summary.add_column(style="bold")
    summary.add_column()
    summary.add_row("state", report.state)
    summary.add_row("format", report.format)
    family = report.architecture if report.family_known else f"unknown (model_type {report.model_type!r})"
    summary.add_row("architecture", family)
    r = report.routing
    routing = f"{r.get('method')} top-{r.get('top_k')} of {r.get('num_experts')}" if r else "unknown"
    if r.get("n_group"):
        routing += f", {r.get('n_group')} groups keep {r.get('topk_group')}, scale {r.get('routed_scaling_factor')}"
    summary.add_row("routing", routing)
    summary.add_row("tensors", f"{report.num_tensors} in {count(report.num_files, 'file')}, {format_size(report.total_bytes)}")
    summary.add_row("MoE layers", f"{len(report.moe_layers)} ({format_size(report.expert_bytes)} of experts)")
    out.table(summary)
    ranked = any(layer.ranks for layer in report.moe_layers)
    layers = Table("MoE layer", "experts", "H", "I", "bytes", *(["ranks"] if ranked else []), title_justify="left")
    for layer in report.moe_layers:
        layers.add_row(
            layer.prefix, str(layer.num_experts), _size(layer.hidden_size, layer.hidden_stored),
            _size(layer.intermediate_size, layer.intermediate_stored), format_size(layer.bytes),
            *([str(layer.ranks)] if ranked else []),
        )  # fmt: skip
    out.table(layers)
    for issue in report.issues:
        out.text(f"[yellow]note:[/] {escape(issue)}")


def _size(logical: int, stored: int | None) -> str:
    """``192``, or ``192 (stored 256)`` where the converter zero-padded it."""
    return str(logical) if stored in (None, logical) else f"{logical} (stored {stored})"

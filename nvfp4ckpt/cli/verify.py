"""``nvfp4ckpt verify DST``: structure, exact layout (with --source) and fused-MoE numerics."""

from __future__ import annotations

import json as jsonlib
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..errors import EXIT_CHECK_FAILED
from ..verify import CHECKS, verify_checkpoint
from ._options import QuietOpt
from ._output import Output

VERIFY_EXAMPLES = """Examples:\n\n  nvfp4ckpt verify ./qwen3-trtllm --source ./Qwen3-30B-A3B-NVFP4\n\n  nvfp4ckpt verify ./r1-trtllm --no-hash --skip numerics --json report.json"""


def verify(
    path: Annotated[str, typer.Argument(help="Converted checkpoint folder (or Hub repo id).", show_default=False)],
    source: Annotated[str | None, typer.Option("--source", help="The source checkpoint it was converted from (enables the exact layout check).")] = None,
    check: Annotated[list[str] | None, typer.Option("--check", help=f"Run only these checks ({', '.join(CHECKS)}); repeatable.")] = None,
    skip: Annotated[list[str] | None, typer.Option("--skip", help="Skip these checks; repeatable.")] = None,
    backend: Annotated[str, typer.Option("--backend", help="Fused MoE backend: auto | trtllm | triton | torch.")] = "auto",
    act: Annotated[str, typer.Option("--act", help="Activations: nvfp4 (W4A4, as the kernel) or bf16 (W4A16).")] = "nvfp4",
    layers: Annotated[str | None, typer.Option("--layers", help="Comma-separated decoder layer numbers or expert prefixes (default: all).")] = None,
    tokens: Annotated[int, typer.Option("--tokens", min=1, help="Random tokens per layer.")] = 64,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random activations and router logits.")] = 0,
    no_hash: Annotated[bool, typer.Option("--no-hash", help="Skip sha256 of every file (huge checkpoints).")] = False,
    device: Annotated[str | None, typer.Option("--device", help="cuda or cpu (default: cuda when present).")] = None,
    json: Annotated[Path | None, typer.Option("--json", help="Write the full report as JSON to this file ('-' for stdout).")] = None,
    quiet: QuietOpt = False,
) -> None:
    """Prove a converted checkpoint is kernel-ready. Exit 0 pass, 1 a check failed, 2 usage or input error."""
    out = Output(json_mode=str(json) == "-", quiet=quiet)
    selected = tuple(check) if check else CHECKS
    selected = tuple(c for c in selected if c not in (skip or []))
    layer_list = [x.strip() for x in layers.split(",") if x.strip()] if layers else None
    with out.progress() as bar:
        tasks: dict[str, int] = {}

        def on_progress(stage: str, done: int, total: int) -> None:
            if bar is None:
                return
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done)

        report = verify_checkpoint(
            path, source=source, checks=selected, backend=backend, act=act, layers=layer_list, tokens=tokens,
            seed=seed, hash_files=not no_hash, device=device, progress=on_progress,
        )  # fmt: skip
    data = report.to_dict()
    if json is not None and str(json) != "-":
        Path(json).write_text(jsonlib.dumps(data, indent=2) + "\n")
    out.result(data)
    if report.numerics:
        table = Table("MoE layer", "backend", "rel-L2", "cosine", "max abs", "close", "ok", title="numerics", title_justify="left")
        for r in report.numerics:
            table.add_row(
                r.prefix, f"{r.backend}/{r.act}", f"{r.rel_l2:.3g}", f"{r.cosine:.6f}", f"{r.max_abs:.3g}",
                f"{r.frac_close:.4f}", "[green]yes[/]" if r.passed else "[red]NO[/]",
            )  # fmt: skip
        out.table(table)
    summary = Table("check", "status", "seconds", "details", title=f"verify {report.path}", title_justify="left")
    for c in report.checks:
        colour = {"pass": "green", "fail": "red", "skip": "yellow"}[c.status]
        summary.add_row(c.name, f"[{colour}]{c.status}[/]", f"{c.seconds:.2f}", c.summary)
    if report.numerics:
        read = sum(r.read_seconds for r in report.numerics)
        compute = sum(r.compute_seconds for r in report.numerics)
        out.text(f"numerics: {read:.2f} s reading tensors onto the device, {compute:.2f} s computing (backend + reference)")
    out.table(summary)
    for c in report.checks:
        for problem in c.problems[:20]:
            out.text(f"[red]{c.name}:[/] {problem}")
        if len(c.problems) > 20:
            out.text(f"[red]{c.name}:[/] ... and {len(c.problems) - 20} more (see --json)")
    out.text(f"{'[green]PASS' if report.passed else '[red]FAIL'}[/] in {report.seconds:.2f} s")
    if not report.passed:
        if quiet or out.json_mode:
            first = next(c for c in report.checks if c.status == "fail")
            out.error(f"{first.name} check failed: {first.problems[0] if first.problems else first.summary}")
        raise typer.Exit(EXIT_CHECK_FAILED)

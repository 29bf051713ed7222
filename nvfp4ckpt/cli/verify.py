"""``nvfp4ckpt verify DST``: structure, exact layout (with --source), fused-MoE numerics, and (--gsm8k) GSM8K."""

from __future__ import annotations

import json as jsonlib
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from ..errors import EXIT_CHECK_FAILED
from ..output.safe_paths import check_output_file, write_output_file
from ..runtime.backends import Act, Backend
from ..verify import CHECKS, Check, CheckResult, VerifyReport, verify_checkpoint
from ._options import JsonOpt, QuietOpt
from ._output import Output

GSM8K = Check.GSM8K.value

VERIFY_EXAMPLES = """Examples:\n\n  nvfp4ckpt verify ./qwen3-trtllm --source ./Qwen3-30B-A3B-NVFP4\n\n  nvfp4ckpt verify ./r1-trtllm --no-hash --skip numerics --json-out report.json\n\n  nvfp4ckpt verify ./qwen3-trtllm --check gsm8k --source ./Qwen3-30B-A3B-NVFP4 --gsm8k-data ./gsm8k --json-out gsm8k.json\n\n  nvfp4ckpt verify ./qwen3-trtllm --gsm8k --baseline-accuracy 89.5 --num-questions 200"""


def verify(
    dst: Annotated[str, typer.Argument(help="Converted checkpoint folder (or Hub repo id).", show_default=False)],
    source: Annotated[str | None, typer.Option("--source", help="The source checkpoint it was converted from (enables the exact layout check; with --gsm8k it is run too).")] = None,
    check: Annotated[list[Check] | None, typer.Option("--check", help="Run only these checks; repeatable.")] = None,
    skip: Annotated[list[Check] | None, typer.Option("--skip", help="Skip these checks; repeatable.")] = None,
    backend: Annotated[Backend, typer.Option("--backend", help="Fused MoE backend (auto: trtllm on SM100/SM103, triton on other GPUs from SM80, else torch).")] = Backend.AUTO,
    act: Annotated[Act, typer.Option("--act", help="Activations: nvfp4 (W4A4, as the kernel) or bf16 (W4A16).")] = Act.NVFP4,
    layers: Annotated[str | None, typer.Option("--layers", help="Comma-separated decoder layer numbers or expert prefixes (default: all).")] = None,
    tokens: Annotated[int, typer.Option("--tokens", min=1, max=65536, help="Random tokens per layer.")] = 64,
    seed: Annotated[int, typer.Option("--seed", min=0, max=2**63 - 1, help="Seed of the random activations and router logits. With --gsm8k, a non-zero seed also draws the few-shot examples and the questions at random (0: the first ones, as vLLM's harness).")] = 0,
    numerics_full: Annotated[bool, typer.Option("--numerics-full", help="Numerics on every MoE layer and every expert (the default on a GPU; on the CPU the default is a seeded sample: 2 MoE layers, a block of 8 experts each, listed in the report).")] = False,
    no_hash: Annotated[bool, typer.Option("--no-hash", help="Skip sha256 of every file (huge checkpoints).")] = False,
    device: Annotated[str | None, typer.Option("--device", help="cuda or cpu (default: cuda when present).")] = None,
    json: JsonOpt = False,
    json_out: Annotated[Path | None, typer.Option("--json-out", help="Also write the full report as JSON to this file (with --gsm8k it holds every question's answers and completions).")] = None,
    gsm8k: Annotated[bool, typer.Option("--gsm8k", help="Also run the whole model on GSM8K after the other checks (skipped if one of them fails): converted accuracy next to --source's (run with the torch reference) or --baseline-accuracy, and how often their answers agree. --check gsm8k runs only this.", rich_help_panel="GSM8K")] = False,
    gsm8k_data: Annotated[str | None, typer.Option("--gsm8k-data", help="Folder with GSM8K's test.jsonl and train.jsonl (or the test jsonl file). Default: download openai/gsm8k from the Hub (cached).", rich_help_panel="GSM8K")] = None,
    num_shots: Annotated[int, typer.Option("--num-shots", min=0, help="Few-shot examples from the train split.", rich_help_panel="GSM8K")] = 5,
    num_questions: Annotated[int | None, typer.Option("--num-questions", min=1, help="Questions from the test split (default: all 1319 on a GPU, 50 on the CPU).", rich_help_panel="GSM8K")] = None,
    max_new_tokens: Annotated[int | None, typer.Option("--max-new-tokens", min=1, help="Generated tokens per question at most (default: 512 on a GPU, 256 on the CPU).", rich_help_panel="GSM8K")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", min=1, help="Questions generated together (default 64 on a GPU, 8 on CPU).", rich_help_panel="GSM8K")] = None,
    tolerance: Annotated[float, typer.Option("--tolerance", min=0, help="Allowed accuracy difference to the source or baseline, in points.", rich_help_panel="GSM8K")] = 1.0,
    baseline_accuracy: Annotated[float | None, typer.Option("--baseline-accuracy", help="Known source accuracy (percent, or a fraction <= 1) instead of running --source; the agreement check is then skipped.", rich_help_panel="GSM8K")] = None,
    min_accuracy: Annotated[float | None, typer.Option("--min-accuracy", help="Pass when the converted accuracy is at least this (percent, or a fraction <= 1), whatever the reference.", rich_help_panel="GSM8K")] = None,
    min_agreement: Annotated[float | None, typer.Option("--min-agreement", help="With --backend torch: smallest fraction of completions token-identical to the source's (default 1.0). With a GPU kernel: smallest fraction of the questions with an answer whose answers agree with the source's (default 0.8).", rich_help_panel="GSM8K")] = None,
    tokenizer: Annotated[str | None, typer.Option("--tokenizer", help="Tokenizer folder or Hub id, when the checkpoint has none.", rich_help_panel="GSM8K")] = None,
    chat_template: Annotated[bool, typer.Option("--chat-template", help="Wrap each prompt in the tokenizer's chat template (off: plain completion, as lm-eval/vLLM).", rich_help_panel="GSM8K")] = False,
    update_card: Annotated[bool, typer.Option("--update-card", help="Write this run's summary (verdict, each check, GSM8K's numbers) into DST's model card, README.md, in the verification part convert left for it.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Prove a converted checkpoint is kernel-ready. Exit 0 pass, 1 a check failed, 2 usage or input error."""
    path = dst
    out = Output(json_mode=json, quiet=quiet, command="verify")
    if json_out is not None:  # checked before any work: a bad path fails now, not after the whole run
        protected = {"the checkpoint": Path(dst), **({"the source": Path(source)} if source else {})}
        json_out = check_output_file(json_out, "--json-out", {k: v for k, v in protected.items() if v.exists()})
    if update_card:  # checked before any work: a card without the section fails now, not after the run
        from ..layouts.trtllm_gen.converted import open_converted
        from ..output.card import check_card

        check_card(open_converted(dst).root)  # a source folder is refused as not converted, as verify does
    skipped = {c.value for c in skip or []}
    requested = [c.value for c in check or []]
    backend, act = backend.value, act.value  # plain strings from here on (reports, JSON)
    run_gsm8k_check = (gsm8k or GSM8K in requested) and GSM8K not in skipped
    base = [c for c in requested if c != GSM8K] if requested else list(CHECKS)
    selected = tuple(c for c in base if c not in skipped)
    layer_list = [x.strip() for x in layers.split(",") if x.strip()] if layers else None
    if run_gsm8k_check:
        from ..eval.gsm8k import validate_options

        validate_options(source, tolerance, baseline_accuracy, min_accuracy, min_agreement)
        if gsm8k_data is not None:  # read now (kilobytes to megabytes): a bad --gsm8k-data fails before the run
            from ..eval.gsm8k import load_gsm8k

            load_gsm8k(gsm8k_data, need_train=num_shots > 0)
    gsm8k_report = None
    with out.progress() as view:

        def on_progress(stage: str, done: int, total: int) -> None:
            view.update(stage, done, total, _unit(stage))

        if selected or not run_gsm8k_check:  # nothing selected and no GSM8K: verify_checkpoint refuses it
            report = verify_checkpoint(
                path, source=source, checks=selected, backend=backend, act=act, layers=layer_list, tokens=tokens,
                seed=seed, hash_files=not no_hash, device=device, progress=on_progress,
                numerics_full=True if numerics_full else None,
            )  # fmt: skip
        else:
            report = VerifyReport(path=str(path), source=str(source) if source else None)
        if run_gsm8k_check:
            if not report.passed:
                report.checks.append(CheckResult(GSM8K, "skip", "an earlier check failed"))
            else:
                from ..eval.gsm8k import run_gsm8k

                gsm8k_report = run_gsm8k(
                    path, source=source, data=gsm8k_data, num_shots=num_shots, num_questions=num_questions,
                    seed=seed or None, max_new_tokens=max_new_tokens, batch_size=batch_size, backend=backend, act=act,
                    device=device, tokenizer=tokenizer, chat_template=chat_template, tolerance=tolerance,
                    baseline_accuracy=baseline_accuracy, min_accuracy=min_accuracy, min_agreement=min_agreement,
                    progress=on_progress, notice=None if quiet else out.hint,
                )  # fmt: skip
                report.checks.extend(gsm8k_report.checks)
    data = report.to_dict()
    if gsm8k_report is not None:
        data["gsm8k"] = gsm8k_report.to_dict()
    code = 0 if report.passed else EXIT_CHECK_FAILED
    if update_card:
        from ..output.card import update_card as write_card, verify_summary

        written = write_card(Path(dst), verify_summary(report, gsm8k_report, _command(report, gsm8k_report)))
        data["card"] = str(written.resolve())
    if json_out is not None:
        write_output_file(json_out, (jsonlib.dumps(out.document(data, code), indent=2) + "\n").encode())
    out.result(data, code)
    if update_card:
        out.text(f"verification summary written to {data['card']}")
    if report.numerics:
        table = Table("MoE layer", "backend", "reference", "rel-L2", "worst token", "cosine", "max abs", "close", "ok", title="numerics", title_justify="left")
        for r in report.numerics:
            table.add_row(
                r.prefix, f"{r.backend}/{r.act}", r.reference, f"{r.rel_l2:.3g}", f"{r.token_rel_l2:.3g}", f"{r.cosine:.6f}", f"{r.max_abs:.3g}",
                f"{r.frac_close:.4f}", "[green]yes[/]" if r.passed else "[red]NO[/]",
            )  # fmt: skip
        sample = report.numerics_sample or {}
        if not sample.get("full", True):
            table.caption = "CPU sample (seeded): experts " + ", ".join(
                f"{p}: {'all' if r is None else f'{r[0]}-{r[1] - 1}'}" for p, r in sample["experts"].items()
            ) + "; --numerics-full runs every layer and expert"
        out.table(table)
    if gsm8k_report is not None:
        out.table(_gsm8k_table(gsm8k_report))
    summary = Table("check", "status", "details", title=f"verify {report.path}", title_justify="left")
    for c in report.checks:
        colour = {"pass": "green", "fail": "red", "skip": "yellow"}[c.status]
        summary.add_row(c.name, f"[{colour}]{c.status}[/]", _details(c))
    out.table(summary)
    seconds = report.seconds + (gsm8k_report.seconds if gsm8k_report is not None else 0.0)
    out.text(f"{'[green]PASS' if report.passed else '[red]FAIL'}[/] in {seconds:.2f} s")
    if not report.passed:
        if quiet or out.json_mode:
            first = next(c for c in report.checks if c.status == "fail")
            out.error(f"{first.name} check failed: {first.problems[0] if first.problems else first.summary}")
        raise typer.Exit(EXIT_CHECK_FAILED)


SHOWN_PROBLEMS = 20


def _details(c: CheckResult) -> str:
    """A check's summary with its problems under it, in its own row: a failure's reason sits with the failing check."""
    lines = [escape(c.summary)] + [f"[red]{escape(p)}[/]" for p in c.problems[:SHOWN_PROBLEMS]]
    if len(c.problems) > SHOWN_PROBLEMS:
        lines.append(f"[red]... and {len(c.problems) - SHOWN_PROBLEMS} more (see --json)[/]")
    return "\n".join(lines)


def _unit(stage: str) -> str:
    """What a verify stage counts: bytes read, questions answered, else MoE layers."""
    if stage == "read and hash":
        return "B"
    return "questions" if stage.startswith("gsm8k") else "layers"


def _gsm8k_table(g) -> Table:
    n = g.converted.num_questions
    title = (
        f"GSM8K: {n} questions, {g.settings['num_shots']}-shot, max {g.settings['max_new_tokens']} new tokens, "
        f"{g.settings['routing']} routing"
    )
    table = Table("side", "MoE", "accuracy", "strict", "invalid", "tokens/s", "s/question", title=title, title_justify="left")
    sides = [g.converted] + ([g.source_side] if g.source_side is not None else [])
    for s in sides:
        table.add_row(
            s.side, f"{s.backend}/{s.act}", f"{s.accuracy:.2f}%", f"{s.strict_accuracy:.2f}%",
            str(s.invalid), f"{s.tokens_per_second:.1f}", f"{s.seconds_per_question:.3f}",
        )  # fmt: skip
    if g.baseline_accuracy is not None:
        table.add_row("baseline", "", f"{g.baseline_accuracy:.2f}%", "", "", "", "")
    if g.source_side is not None:
        agree = f"{100 * g.agreement:.1f}%" if g.agreement is not None else "- (no answers)"
        table.caption = (
            f"completions identical on {100 * (g.identical or 0):.1f}%, answers agree on {agree} of the questions with "
            f"an answer ({g.no_answer} without one on either side); accuracy difference "
            f"{g.converted.accuracy - g.source_side.accuracy:+.2f} ± {g.difference_stderr:.2f} points (1 s.e.)"
        )
    return table


def _command(report, gsm8k_report) -> str:
    """The run as the card names it (paths left out: they are the publisher's machine's)."""
    return "nvfp4ckpt verify" + (" --source" if report.source else "") + (" --gsm8k" if gsm8k_report is not None else "")

"""Option aliases shared by every command (one spelling, one help text)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperCommand, TyperGroup

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout instead of tables: the result, or the error object of a failed run (docs/cli-output.md).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors; rely on the exit code.")]
RevisionOpt = Annotated[str | None, typer.Option("--revision", help="Hub revision (branch, tag or commit) when SRC is a repo id.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty destination folder.")]
SrcArg = Annotated[str, typer.Argument(help="Checkpoint folder, or a Hugging Face Hub repo id (owner/name).", show_default=False)]
OutArg = Annotated[Path, typer.Argument(help="Output folder (created; must be empty unless --overwrite).", show_default=False)]


def tidy_help(params: list) -> list:
    """typer's rich --help shows ``<bool>`` after every flag, and ``<list[structure|layout|...]>`` or
    ``<int range> [0<=x<=9223372036854775807]`` in a column so narrow that Rich folds them mid-word: flags get no
    placeholder, choices are spaced (``<auto | trtllm | ...>`` wraps between them), a huge range is said in words."""
    for p in params:
        if getattr(p, "is_flag", False):
            p.metavar = ""
            continue
        desc = getattr(p, "type_descriptor", None)
        if desc is None or p.metavar is not None or getattr(p, "param_type_name", "") != "option":
            continue
        if desc.is_choice:  # spaced, so a narrow column wraps between choices; a repeatable one without list[...]
            p.metavar = "<" + " | ".join(str(getattr(c, "value", c)) for c in desc.choices or ()) + ">"
        elif desc.is_ranged:
            kind = desc.ranged_type_name
            p.metavar = f"<{kind}>"
            lo, hi = getattr(p, "min", None), getattr(p, "max", None)
            if hi is not None and hi >= 2**31:  # "[0<=x<=9223372036854775807]": said in words, with no bracket
                p.metavar = f"<{kind} >= {lo}>" if lo is not None else f"<{kind}>"
                p._get_number_range_help_str = lambda: None  # typer appends the range from this (instance only)
    return params


class HelpCommand(TyperCommand):
    def get_params(self, ctx):  # type: ignore[no-untyped-def]
        return tidy_help(super().get_params(ctx))


class HelpGroup(TyperGroup):
    def get_params(self, ctx):  # type: ignore[no-untyped-def]
        return tidy_help(super().get_params(ctx))

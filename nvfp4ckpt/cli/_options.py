"""Option aliases shared by every command (one spelling, one help text)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout (no tables, no progress).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors; rely on the exit code.")]
RevisionOpt = Annotated[str | None, typer.Option("--revision", help="Hub revision (branch, tag or commit) when SRC is a repo id.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty destination folder.")]
SrcArg = Annotated[str, typer.Argument(help="Checkpoint folder, or a Hugging Face Hub repo id (owner/name).", show_default=False)]
OutArg = Annotated[Path, typer.Argument(help="Output folder (created; must be empty unless --overwrite).", show_default=False)]

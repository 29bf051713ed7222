"""The one output object: human tables on a terminal, ``--json`` for machines, ``--quiet`` for CI."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table


@dataclass
class Output:
    json_mode: bool = False
    quiet: bool = False
    console: Console = field(default_factory=lambda: Console(highlight=False))
    err: Console = field(default_factory=lambda: Console(stderr=True, highlight=False))

    def result(self, data: dict[str, Any]) -> None:
        """The machine-readable result (only in --json mode)."""
        if self.json_mode:
            sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
            sys.stdout.flush()

    def text(self, message: str) -> None:
        if not (self.json_mode or self.quiet):
            self.console.print(message)

    def table(self, table: Table) -> None:
        if not (self.json_mode or self.quiet):
            self.console.print(table)

    def error(self, message: str) -> None:
        # escape: messages name tensors and extras in brackets ("nvfp4ckpt[torch]"), which are not markup
        self.err.print(f"[bold red]Error:[/] {escape(message)}", soft_wrap=True)

    def hint(self, message: str) -> None:
        self.err.print(f"[dim]{escape(message)}[/]", soft_wrap=True)

    @property
    def show_progress(self) -> bool:
        return not (self.json_mode or self.quiet) and self.err.is_terminal

    @contextmanager
    def progress(self) -> Iterator[Progress | None]:
        if not self.show_progress:
            yield None
            return
        bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}", style="dim"),
            TimeRemainingColumn(),
            console=self.err,
            transient=True,
        )
        with bar:
            yield bar

"""The one output object: human tables on a terminal, ``--json`` for machines, ``--quiet`` for CI."""

from __future__ import annotations

import json
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TextColumn, TimeRemainingColumn
from rich.text import Text
from rich.table import Table


# Piped output (CI logs) is never cut or wrapped: rich would fit tables and lines to 80 columns and cut names.
LOG_WIDTH = 10_000


def make_console(stderr: bool = False) -> Console:
    console = Console(stderr=stderr, highlight=False)
    if console.is_terminal:
        return console
    return Console(stderr=stderr, highlight=False, width=LOG_WIDTH, soft_wrap=True)


class CountColumn(ProgressColumn):
    """``done/total``; for a task added with ``unit="B"``, human sizes and the rate (``1.20 GB/3.40 GB 410.00 MB/s``)."""

    def render(self, task: Task) -> Text:
        if task.fields.get("unit") != "B":
            return Text(f"{task.completed:.0f}/{task.total or 0:.0f}", style="dim")
        from ..io import format_size

        rate = f" {format_size(task.speed)}/s" if task.speed else ""
        return Text(f"{format_size(task.completed)}/{format_size(task.total or 0)}{rate}", style="dim")


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def one_line(message: str) -> str:
    """A message as one line whatever the paths and names in it hold: a newline, tab or other control character
    (a folder named ``a<newline>b``) is shown escaped, as Python writes it in a string (``a\\nb``), so the message
    stays one line and says exactly which name it means."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], message)


@dataclass
class Output:
    json_mode: bool = False
    quiet: bool = False
    console: Console = field(default_factory=make_console)
    err: Console = field(default_factory=lambda: make_console(stderr=True))

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
        self.err.print(f"[bold red]Error:[/] {escape(one_line(message))}", soft_wrap=True)

    def hint(self, message: str) -> None:
        self.err.print(f"[dim]{escape(one_line(message))}[/]", soft_wrap=True)

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
            CountColumn(),
            TimeRemainingColumn(),
            console=self.err,
            transient=True,
        )
        with bar:
            yield bar

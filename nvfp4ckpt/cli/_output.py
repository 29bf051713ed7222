"""The one output object: human tables on a terminal, ``--json`` for machines, ``--quiet`` for CI.

Progress goes to stderr unless ``--quiet``: a Rich bar on a terminal, plain lines (``LogProgress``) in a log.
``--json`` changes stdout only: exactly one JSON document, the report or, on an error exit, an error object
(``json_document``; docs/cli-output.md has the schema).
"""

from __future__ import annotations

import json
import os
import re
import sys
import textwrap
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from .. import __version__
from ._errors import cli_words
from ..errors import InputError
from ..io import format_duration, format_size
from ..progress import Progress as WriterProgress, ProgressFn

# Piped output (CI logs) is never cut: rich would fit tables and lines to 80 columns and cut names. Tables wider
# than LOG_LINE are printed as plain wrapped lines instead (``plain_table``), so log lines stay short.
LOG_WIDTH = 10_000
LOG_LINE = 120

# The JSON documents' schema: bump on a change that breaks a reader (a key removed or its meaning changed).
SCHEMA_VERSION = 1

PROGRESS_INTERVAL_ENV = "NVFP4CKPT_PROGRESS_INTERVAL"
DEFAULT_PROGRESS_INTERVAL = 5.0  # seconds between progress lines in a log: often enough for "no output" timeouts

# Whether this run already printed its JSON document (the error object is printed only when it has not).
_printed = {"json": False}


def reset_run_state() -> None:
    _printed["json"] = False


def make_console(stderr: bool = False) -> Console:
    console = Console(stderr=stderr, highlight=False)
    if console.is_terminal:
        return console
    return Console(stderr=stderr, highlight=False, width=LOG_WIDTH, soft_wrap=True)


def json_document(command: str | None, data: dict[str, Any], exit_code: int = 0, error: dict | None = None) -> dict:
    """Every JSON document the CLI prints or writes: who wrote it, in which schema, how it ended, then the report."""
    head = {
        "schema_version": SCHEMA_VERSION,
        "tool": "nvfp4ckpt",
        "version": __version__,
        "command": command,
        "exit_code": exit_code,
        "error": error,
    }
    return {**head, **{k: v for k, v in data.items() if k not in head}}


class CountColumn(ProgressColumn):
    """``done/total``; for a task added with ``unit="B"``, human sizes and the rate (``1.20 GB/3.40 GB 410.00 MB/s``)."""

    def render(self, task: Task) -> Text:
        if task.fields.get("unit") != "B":
            return Text(f"{task.completed:.0f}/{task.total or 0:.0f}", style="dim")
        rate = f" {format_size(task.speed)}/s" if task.speed else ""
        return Text(f"{format_size(task.completed)}/{format_size(task.total or 0)}{rate}", style="dim")


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def one_line(message: str) -> str:
    """A message as one line whatever the paths and names in it hold: a newline, tab or other control character
    (a folder named ``a<newline>b``) is shown escaped, as Python writes it in a string (``a\\nb``), so the message
    stays one line and says exactly which name it means."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], message)


# ----------------------------------------------------------------------------------------------
# Progress


class NoProgress:
    """``--quiet``: progress updates go nowhere."""

    def update(self, label: str, done: float, total: float, unit: str = "") -> None:
        pass


class BarProgress:
    """A terminal: one Rich bar per label (transient: gone when the command prints its result)."""

    def __init__(self, bar: Progress) -> None:
        self.bar = bar
        self.tasks: dict[str, Any] = {}

    def update(self, label: str, done: float, total: float, unit: str = "") -> None:
        if label not in self.tasks:
            self.tasks[label] = self.bar.add_task(label, total=total, unit=unit)
        self.bar.update(self.tasks[label], completed=done, total=total)


@dataclass
class _Task:
    unit: str
    started: float  # clock at the first update, and what was done then (a resumed run starts part way)
    done0: float
    done: float = 0
    total: float = 0
    changed: bool = True


class LogProgress:
    """Plain progress lines for a log (stderr not a terminal): at most one line every ``interval`` seconds, with each
    running task's count, share, rate and ETA, and a last line when the work ends (if a line was printed at all: a
    run shorter than ``interval`` stays silent)."""

    def __init__(self, command: str, write: Callable[[str], None], interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.command, self.write, self.interval, self.clock = command, write, interval, clock
        self.start = self.last = clock()
        self.tasks: dict[str, _Task] = {}
        self.lines = 0
        self.lock = threading.Lock()  # verify's reader threads report bytes concurrently

    def update(self, label: str, done: float, total: float, unit: str = "") -> None:
        with self.lock:
            now = self.clock()
            task = self.tasks.get(label)
            if task is None:
                task = self.tasks[label] = _Task(unit, now, done)
            task.done, task.total, task.changed = done, total, True
            if now - self.last >= self.interval:
                # The tasks still running, and any that moved since the last line (so each one's end is shown once).
                parts = [self._describe(n, t, now) for n, t in self.tasks.items() if t.changed or t.done < t.total]
                self._line("; ".join(parts), now)

    def close(self) -> None:
        if self.lines and self.tasks:
            now = self.clock()
            summary = "; ".join(f"{n} {_amount(t)}" for n, t in self.tasks.items())
            self._line(f"done in {format_duration(now - self.start)}: {summary}", now)

    def _line(self, text: str, now: float) -> None:
        self.write(f"{self.command}: {text}")
        self.lines += 1
        self.last = now
        for t in self.tasks.values():
            t.changed = False

    @staticmethod
    def _describe(label: str, t: _Task, now: float) -> str:
        text = f"{label} {_amount(t)}"
        if t.total:
            text += f" ({100 * t.done / t.total:.0f}%)"
        elapsed = now - t.started
        if elapsed > 0 and t.done > t.done0:
            rate = (t.done - t.done0) / elapsed
            text += f", {format_size(rate)}/s" if t.unit == "B" else f", {_number(rate)} {t.unit or label}/s"
            if t.total and t.done < t.total:
                text += f", ETA {format_duration((t.total - t.done) / rate)}"
        return text


def _number(x: float) -> str:
    """A rate for people: '1234', '12.3', '0.42' (never '1.2e+04')."""
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def _amount(t: _Task) -> str:
    if t.unit == "B":
        return f"{format_size(t.done)}/{format_size(t.total)}"
    return f"{t.done:.0f}/{t.total:.0f}" + (f" {t.unit}" if t.unit else "")


def progress_interval() -> float:
    """Seconds between progress lines in a log: ``NVFP4CKPT_PROGRESS_INTERVAL`` (0: every update), else 5."""
    text = os.environ.get(PROGRESS_INTERVAL_ENV, "").strip()
    if not text:
        return DEFAULT_PROGRESS_INTERVAL
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise InputError(f"{PROGRESS_INTERVAL_ENV}={text!r}: not a number of seconds; set it to e.g. 5, or 0 for every update")
    return value


# ----------------------------------------------------------------------------------------------
# Tables in a log


def _plain(cell: Any) -> str:
    if isinstance(cell, Text):
        return cell.plain
    return Text.from_markup(str(cell)).plain if isinstance(cell, str) else str(cell)


def plain_table(table: Table, width: int = LOG_LINE) -> list[str]:
    """A table as plain lines of at most ``width`` characters (a single name longer than that is never cut): the
    columns aligned, the last one wrapped at spaces under itself; each extra line of a cell on a line of its own."""
    cols = [[_plain(c.header)] + [_plain(x) for x in c.cells] for c in table.columns]
    if not cols:
        return []
    rows = list(zip(*cols))[(0 if table.show_header else 1) :]
    firsts = [[" ".join(cell.split("\n")) for cell in col] for col in cols[:-1]]
    widths = [max(len(cell) for cell in col) for col in firsts]
    aligned = sum(widths) + 2 * len(widths)  # where the last column starts
    hanging = aligned <= width // 2  # else a last cell that does not fit beside goes below, indented by 4
    lines: list[str] = []
    if table.title:
        lines.append(_plain(table.title))
    for row in rows:
        lead = "  ".join(" ".join(cell.split("\n")).ljust(w) for cell, w in zip(row[:-1], widths))
        prefix = lead + "  " if lead else ""
        indent = aligned
        if not hanging and ("\n" in row[-1] or len(prefix) + len(row[-1]) > width):
            lines.append(lead.rstrip())
            prefix, indent = "", 4
        for i, part in enumerate(row[-1].split("\n") or [""]):
            first = prefix.ljust(indent) if i == 0 else " " * indent
            wrapped = textwrap.wrap(
                part, width=width, initial_indent=first, subsequent_indent=" " * indent,
                break_long_words=False, break_on_hyphens=False,
            ) or [first]  # fmt: skip
            lines.extend(w.rstrip() for w in wrapped)
    if table.caption:
        lines.extend(textwrap.wrap(_plain(table.caption), width=width, break_long_words=False, break_on_hyphens=False))
    return lines


def _table_width(table: Table) -> int:
    from io import StringIO

    probe = Console(file=StringIO(), width=LOG_WIDTH, highlight=False, color_system=None)
    probe.print(table)  # as Output.table prints it: the caption wrapped to the table's width
    return max((len(line.rstrip()) for line in probe.file.getvalue().splitlines()), default=0)  # type: ignore[attr-defined]


# ----------------------------------------------------------------------------------------------
# The output object


@dataclass
class Output:
    json_mode: bool = False
    quiet: bool = False
    command: str | None = None  # names the JSON documents and prefixes progress lines
    console: Console = field(default_factory=make_console)
    err: Console = field(default_factory=lambda: make_console(stderr=True))

    def document(self, data: dict[str, Any], exit_code: int = 0) -> dict[str, Any]:
        """``data`` as the JSON document ``--json`` prints (and ``--json-out`` writes)."""
        return json_document(self.command, data, exit_code)

    def result(self, data: dict[str, Any], exit_code: int = 0) -> None:
        """The machine-readable result (only in --json mode)."""
        if self.json_mode:
            self._emit(self.document(data, exit_code))

    def failure(self, message: str, exit_code: int, details: dict[str, Any] | None = None) -> None:
        """An error exit: the one-line message on stderr and, with --json, the error object on stdout (unless the
        report was printed already: stdout holds one JSON document)."""
        self.error(message)
        if self.json_mode and not _printed["json"]:
            error = {"message": one_line(message), "type": None, "file": None, "tensor": None, **(details or {})}
            self._emit(json_document(self.command, {}, exit_code, error))

    def _emit(self, document: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(document, indent=2, default=str) + "\n")
        sys.stdout.flush()
        _printed["json"] = True

    def text(self, message: str) -> None:
        if not (self.json_mode or self.quiet):
            self.console.print(message)

    def table(self, table: Table) -> None:
        if self.json_mode or self.quiet:
            return
        if self.console.is_terminal or _table_width(table) <= LOG_LINE:
            self.console.print(table, soft_wrap=False)  # a caption wraps to the table's width, not the log's
            return
        for line in plain_table(table):
            self.console.print(line, markup=False, highlight=False)

    def error(self, message: str) -> None:
        # escape: messages name tensors and extras in brackets ("nvfp4ckpt[torch]"), which are not markup
        self.err.print(f"[bold red]Error:[/] {escape(one_line(message))}", soft_wrap=True)

    def hint(self, message: str) -> None:
        self.err.print(f"[dim]{escape(one_line(message))}[/]", soft_wrap=True)

    @contextmanager
    def progress(self) -> Iterator[NoProgress | BarProgress | LogProgress]:
        """Where progress goes: nowhere with --quiet, a bar on a terminal, plain lines in a log (stdout stays for
        the result, so --json does not silence progress)."""
        if self.quiet:
            yield NoProgress()
            return
        if self.err.is_terminal:
            bar = Progress(
                TextColumn("{task.description}"), BarColumn(), CountColumn(), TimeRemainingColumn(),
                console=self.err, transient=True,
            )  # fmt: skip
            with bar:
                yield BarProgress(bar)
            return
        log = LogProgress(
            self.command or "nvfp4ckpt", lambda line: self.err.print(one_line(line), markup=False, highlight=False, soft_wrap=True),
            progress_interval(),
        )  # fmt: skip
        yield log
        log.close()

    def writer_progress(self, view: NoProgress | BarProgress | LogProgress) -> ProgressFn:
        """The callback convert and revert hand their checkpoint writer: notices as hints, layers and bytes as progress."""

        def on_progress(p: WriterProgress) -> None:
            if p.stage == "notice":
                if not self.quiet:
                    self.hint(cli_words(p.message))
                return
            view.update("MoE layers", p.layers_done, p.layers_total)
            view.update("written", p.bytes_done, p.bytes_total, "B")

        return on_progress

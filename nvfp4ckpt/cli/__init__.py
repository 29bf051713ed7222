"""The ``nvfp4ckpt`` command line: one thin module per command, all logic in the library."""

from __future__ import annotations

import functools
import os
import signal
import sys
import threading
import traceback
import warnings
from typing import Any, Callable

import typer

from .. import __version__
from ..errors import EXIT_USAGE, Interrupted, InterruptedRun
from ..io import count, format_size
from ._errors import debug_enabled, error_details, format_error, usage_message
from ._options import HelpCommand, HelpGroup
from ._output import Output, reset_run_state
from .convert import CONVERT_EXAMPLES, convert
from .example import EXAMPLE_EXAMPLES, example
from .inspect import INSPECT_EXAMPLES, inspect
from .revert import REVERT_EXAMPLES, revert
from .verify import VERIFY_EXAMPLES, verify

app = typer.Typer(
    name="nvfp4ckpt",
    help="Kernel-ready NVFP4 MoE checkpoints for FlashInfer's TRT-LLM-gen fused MoE.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion, as hf does
    pretty_exceptions_enable=False,
    cls=HelpGroup,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _naming_partial(command: Callable[..., None]) -> Callable[..., None]:
    """Typer turns Ctrl-C into exit code 130 and drops the exception; a writer's ``InterruptedRun`` names the
    partial folder it kept, so it becomes a one-line error (exit 130) before typer sees it."""

    @functools.wraps(command)
    def run_command(*args: Any, **kwargs: Any) -> None:
        try:
            command(*args, **kwargs)
        except InterruptedRun as exc:
            raise Interrupted(
                f"interrupted; the partial output {exc.partial} ({format_size(exc.size)}, {count(exc.shards, 'finished shard')}) "
                "is kept and never looks complete: rerun the same command with --resume to continue"
            ) from None

    return run_command


app.command(epilog=INSPECT_EXAMPLES, cls=HelpCommand)(inspect)
app.command(epilog=EXAMPLE_EXAMPLES, cls=HelpCommand)(example)
app.command(epilog=CONVERT_EXAMPLES, cls=HelpCommand)(_naming_partial(convert))
app.command(epilog=VERIFY_EXAMPLES, cls=HelpCommand)(verify)
app.command(epilog=REVERT_EXAMPLES, cls=HelpCommand)(_naming_partial(revert))
COMMANDS = tuple(c.name or c.callback.__name__ for c in app.registered_commands if c.callback)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"nvfp4ckpt {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version and exit."),
) -> None:
    """Kernel-ready NVFP4 MoE checkpoints for FlashInfer's TRT-LLM-gen fused MoE."""


# What Ctrl-C (or SIGTERM) leaves, per command. convert/revert keep their partial folder (next to DST, never
# complete-looking) for --resume; when they had one, _naming_partial's message names it instead.
_RESUMABLE = "interrupted; no output was left behind that looks complete: rerun the same command (with --resume to continue a kept partial folder)"
INTERRUPTED = {
    "convert": _RESUMABLE,
    "revert": _RESUMABLE,
    "example": "interrupted; no output was left behind that looks complete: rerun the same command",
    "verify": "interrupted; verify stopped before its report (nothing was passed or failed, no --json-out file written): rerun it",
    "inspect": "interrupted",
}


def _requested(argv: list[str]) -> tuple[str | None, bool]:
    """The command named on the line and whether --json was asked for, read before parsing: an error exit (a bad
    option included) prints its JSON error object too."""
    args = argv[: argv.index("--")] if "--" in argv else argv
    return next((a for a in args if a in COMMANDS), None), "--json" in args


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM (kill, CI timeouts) cleans up exactly as Ctrl-C does


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app, map known errors to one line and an exit code."""
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        with warnings.catch_warnings(record=True) as caught:
            # numpy/torch RuntimeWarnings (overflow, invalid value) from broken input are held back: a command
            # that then fails prints its one line only; one that succeeds shows each warning as one line after.
            warnings.simplefilter("always", RuntimeWarning)
            code = _main(argv)
        shown: set[str] = set()
        for w in caught:
            if not issubclass(w.category, RuntimeWarning) or debug_enabled():
                warnings.showwarning(w.message, w.category, w.filename, w.lineno)
            elif code == 0 and str(w.message) not in shown:
                shown.add(str(w.message))
                Output().hint(f"warning: {w.category.__name__}: {w.message}")
        return code
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str] | None) -> int:
    words = sys.argv[1:] if argv is None else list(argv)
    command, json_mode = _requested(words)
    out = Output(json_mode=json_mode, command=command)  # for the error exits: one line, and the --json object
    interrupted = INTERRUPTED.get(command or "", "interrupted")
    reset_run_state()
    try:
        # Non-standalone typer returns exit codes (130 after Ctrl-C) instead of raising them.
        code = app(args=argv, standalone_mode=False)
        if code == 130:
            out.failure(interrupted, 130, {"type": "KeyboardInterrupt"})
        if isinstance(code, int):
            return code
    except typer.Exit as exc:  # --help, --version, explicit exits
        return exc.exit_code
    except typer.Abort:
        out.failure("aborted", 130, {"type": "Abort"})
        return 130
    except KeyboardInterrupt:
        out.failure(interrupted, 130, {"type": "KeyboardInterrupt"})
        return 130
    except Exception as exc:  # noqa: BLE001 - the single place errors become messages
        if _is_usage_error(exc):  # bad flags or arguments, from typer's parser: one line, as every error
            message = usage_message(exc, COMMANDS, words)
            if "No such command 'version'" in str(exc):
                message += "; the version is printed by: nvfp4ckpt --version"
            out.failure(message, EXIT_USAGE, {"type": "UsageError"})
            return EXIT_USAGE
        known = format_error(exc)
        if known is None:
            raise
        if debug_enabled():  # the traceback, and still the command's exit code
            traceback.print_exc()
        message, code = known
        out.failure(message, code, error_details(exc, message))
        return code
    return 0


def _is_usage_error(exc: BaseException) -> bool:
    # typer vendors click, so match click's ClickException by its shape rather than its class.
    return any(c.__name__ in ("ClickException", "UsageError") for c in type(exc).__mro__) and hasattr(exc, "show")


def run() -> None:  # console script
    code = main()
    # Skip the interpreter's teardown once the command has finished (its files are written, fsynced and
    # renamed into place): torch deregisters every operator library at exit, which costs about a second.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

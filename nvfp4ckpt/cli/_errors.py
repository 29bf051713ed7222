"""One place that turns known exceptions into one-line messages and exit codes."""

from __future__ import annotations

import os
from typing import Callable

from ..errors import EXIT_USAGE, Nvfp4CkptError

DEBUG_ENV = "NVFP4CKPT_DEBUG"

ERROR_MAPPINGS: dict[type[BaseException], Callable[[BaseException], tuple[str, int]]] = {
    Nvfp4CkptError: lambda e: (str(e), e.exit_code),  # type: ignore[attr-defined]
    PermissionError: lambda e: (f"{e.filename}: permission denied; check the folder's permissions", EXIT_USAGE),  # type: ignore[attr-defined]
    FileNotFoundError: lambda e: (f"{e.filename}: no such file or folder", EXIT_USAGE),  # type: ignore[attr-defined]
    OSError: lambda e: (f"{getattr(e, 'filename', '') or 'I/O'}: {e.strerror or e}; check free space and permissions", EXIT_USAGE),  # type: ignore[attr-defined]
}


def format_error(exc: BaseException) -> tuple[str, int] | None:
    """(message, exit code) for a known exception, else None (a bug: show the traceback)."""
    for cls in type(exc).__mro__:
        mapper = ERROR_MAPPINGS.get(cls)
        if mapper is not None:
            return mapper(exc)
    return None


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def usage_message(exc: BaseException, commands: tuple[str, ...] = (), argv: list[str] | None = None) -> str:
    """A usage error from typer's parser (bad flag, value or argument) as the one line every error is: the option,
    the value given and what it takes, in the tool's words (never pydantic's "Input should be greater than or equal
    to 1" or "Value error, ..."), and where the help is."""
    ctx = getattr(exc, "ctx", None)
    command = "nvfp4ckpt"
    if ctx is not None and ctx.parent is not None and ctx.command is not None and ctx.command.name:
        command += f" {ctx.command.name}"
    else:  # an error raised before the command's context exists: the command named on the line, if any
        named = next((a for a in argv or [] if a in commands), None)
        command += f" {named}" if named else ""
    hint = f"see `{command} --help`"
    param = getattr(exc, "param", None)
    errors = getattr(exc.__cause__, "errors", None)
    if param is not None and callable(errors) and type(exc).__name__ == "BadParameter":
        try:
            first = errors(include_url=False)[0]
        except Exception:  # noqa: BLE001 - any shape: fall back to the parser's own words
            first = {}
        name = param.opts[0] if getattr(param, "param_type_name", "") == "option" and param.opts else str(param.name).upper()
        value = first.get("input", "")
        return f"{name} {str(value)!r} is not {_expected(param)}; {hint}"
    message = " ".join(str(exc.format_message()).split()).rstrip(".")  # type: ignore[attr-defined]
    return f"{message} ({hint})" if message.endswith("?") else f"{message}; {hint}"


def _expected(param: object) -> str:
    import enum
    import typing

    descriptor = getattr(param, "type_descriptor", None)
    kind = getattr(descriptor, "annotation", None)
    if typing.get_origin(kind) in (list, tuple):
        kind = typing.get_args(kind)[0]
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in kind)
    lo, hi = getattr(param, "min", None), getattr(param, "max", None)
    what = {int: "a whole number", float: "a number", bool: "true or false"}.get(kind, "a valid value")  # type: ignore[call-overload]
    if lo is not None and hi is not None:
        return f"{what} from {lo:g} to {hi:g}"
    if lo is not None:
        return f"{what} >= {lo:g}"
    if hi is not None:
        return f"{what} <= {hi:g}"
    return what

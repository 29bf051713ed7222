"""One place that turns known exceptions into one-line messages and exit codes."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable

from ..errors import EXIT_USAGE, Nvfp4CkptError

DEBUG_ENV = "NVFP4CKPT_DEBUG"

# Library messages name the library's arguments ("pass overwrite=True to replace it"); on the command line the
# same hint names the option.
CLI_WORDS = {"overwrite=True": "--overwrite", "resume=True": "--resume"}


def cli_words(message: str) -> str:
    for library, option in CLI_WORDS.items():
        message = message.replace(library, option)
    return message


ERROR_MAPPINGS: dict[type[BaseException], Callable[[BaseException], tuple[str, int]]] = {
    Nvfp4CkptError: lambda e: (cli_words(str(e)), e.exit_code),  # type: ignore[attr-defined]
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


_FILE_SUFFIXES = (".json", ".jsonl", ".safetensors", ".parquet", ".txt", ".model", ".py", ".jinja")
_TENSOR = re.compile(r"[A-Za-z_][\w]*(\.[\w]+)+")
_QUOTED_TENSOR = re.compile(r"tensor '([^']+)'")


def error_details(exc: BaseException, message: str) -> dict[str, Any]:
    """The JSON error object's fields beside the message: the exception type, and the file and tensor the message
    names. Messages start with what they are about ("<file or tensor>: what is wrong; what to do"), so that subject
    is read from the message; a path is made absolute."""
    details: dict[str, Any] = {"type": type(exc).__name__, "file": None, "tensor": None}
    filename = getattr(exc, "filename", None)
    if isinstance(exc, OSError) and filename:
        details["file"] = os.path.abspath(os.fsdecode(filename))
        return details
    for subject in message.split(": ")[:2]:  # "<file>: <tensor>: ..." names both
        if " " in subject.strip() or not subject:
            break
        if _looks_like_path(subject):
            details["file"] = details["file"] or os.path.abspath(subject)
        elif _TENSOR.fullmatch(subject) and details["tensor"] is None:
            details["tensor"] = subject
        else:
            break
    quoted = _QUOTED_TENSOR.search(message)
    if details["tensor"] is None and quoted:
        details["tensor"] = quoted.group(1)
    return details


def _looks_like_path(text: str) -> bool:
    return "/" in text or os.sep in text or text.endswith(_FILE_SUFFIXES) or Path(text).exists()


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

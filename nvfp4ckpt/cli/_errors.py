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

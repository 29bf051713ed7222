"""Arguments of the public library functions, checked as the CLI checks its options: a wrong type or range is a
one-line ``InputError`` naming the function, the argument and the CLI option, raised before any work (no partial
folder, no raw ``AttributeError`` from deep inside). ``"no"`` is not ``False`` and ``1.5`` workers is not a count."""

from __future__ import annotations

import math
import os
from typing import Any

from .errors import InputError

_MISSING = object()


class Args:
    """``Args("convert_checkpoint")`` then ``.bool("overwrite", value, "--overwrite")`` and so on."""

    def __init__(self, function: str) -> None:
        self.function = function

    def fail(self, name: str, value: Any, want: str, option: str | None) -> None:
        shown = repr(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        flag = f" ({option})" if option else ""
        raise InputError(f"{self.function}: {name}={shown}{flag}; expected {want}")

    def bool(self, name: str, value: Any, option: str | None = None, optional: bool = False) -> None:
        if type(value) is bool or (optional and value is None):
            return
        self.fail(name, value, "True or False" + (" or None" if optional else ""), option)

    def int(self, name: str, value: Any, option: str | None = None, lo: int | None = None, hi: int | None = None,
            optional: bool = False) -> None:  # fmt: skip
        if optional and value is None:
            return
        ok = type(value) is int or (hasattr(value, "__index__") and not isinstance(value, (bool, float)))
        if ok:
            value = value.__index__()
        if not ok or (lo is not None and value < lo) or (hi is not None and value > hi):
            rng = "" if lo is None and hi is None else f" from {lo if lo is not None else '-inf'} to {hi if hi is not None else 'inf'}"
            self.fail(name, value, f"a whole number{rng}" + (" or None" if optional else ""), option)

    def str(self, name: str, value: Any, option: str | None = None, optional: bool = False) -> None:
        if isinstance(value, str) or (optional and value is None):
            return
        self.fail(name, value, "a string" + (" or None" if optional else ""), option)

    def path(self, name: str, value: Any, option: str | None = None, optional: bool = False) -> None:
        if optional and value is None:
            return
        if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
            self.fail(name, value, "a path (str or os.PathLike)" + (" or None" if optional else ""), option)

    def size(self, name: str, value: Any, option: str | None = None) -> None:
        """A size: a string such as "5GB" or a whole number of bytes (parsed later, with its own message)."""
        if isinstance(value, str) or (type(value) is int) or (type(value) is float and math.isfinite(value) and value.is_integer()):
            return
        self.fail(name, value, 'a size such as "5GB" or a whole number of bytes', option)

    def callable(self, name: str, value: Any, optional: bool = True) -> None:
        if callable(value) or (optional and value is None):
            return
        self.fail(name, value, "a function" + (" or None" if optional else ""), None)

    def strings(self, name: str, value: Any, option: str | None = None, optional: bool = False) -> None:
        if optional and value is None:
            return
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            self.fail(name, value, "a list of strings" + (" or None" if optional else ""), option)

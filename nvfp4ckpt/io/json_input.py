"""Every JSON the tool reads, read one way: bounded in size and nesting, from regular files only, and its
fields read through typed accessors (``Fields``) that refuse a wrong type with one line naming the file and
the field. Nothing downstream calls ``int()``/``float()``/``bool()`` on a raw JSON value.

JSON from the input can hold anything: ``[[[...]]]`` a thousand deep (RecursionError), a list where an object
is expected, ``1e400`` (a float infinity), ``NaN``, ``"false"`` (truthy), a 1 GiB file. ``load_json`` bounds
the first and last; ``Fields`` turns the rest into ``BadFieldError``."""

from __future__ import annotations

import json
import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Mapping
from typing import Any, Iterator, NoReturn

from ..errors import BadFieldError, CorruptFileError

MAX_JSON_BYTES = 64 * 1024 * 1024  # config/index/quantization files are kilobytes to a few MiB
MAX_DEPTH = 64  # the deepest real config nests 4-5 levels
_MISSING: Any = object()


def open_regular(path: Path, what: str = "file") -> int:
    """A read-only descriptor of ``path`` when it is a regular file. ``O_NONBLOCK``: a FIFO (or a device)
    planted as a shard or config can never block the open; it is refused by the ``fstat`` that follows."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise CorruptFileError(f"{path}: cannot read the {what}: {exc.strerror}") from exc
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise CorruptFileError(f"{path}: the {what} is not a regular file (a FIFO, device or socket); replace it with the real file")
    return fd


def read_bounded(path: Path, limit: int, what: str = "file") -> bytes:
    """The whole file, refused before reading when larger than ``limit`` bytes (or not a regular file)."""
    fd = open_regular(path, what)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise CorruptFileError(f"{path}: the {what} is {size} bytes, more than the {limit} a {what} may have; it is not a real {what}")
        chunks, got = [], 0
        while got <= limit:
            block = os.read(fd, min(1 << 20, limit + 1 - got))
            if not block:
                break
            chunks.append(block)
            got += len(block)
        if got > limit:
            raise CorruptFileError(f"{path}: the {what} grew past {limit} bytes while being read")
        return b"".join(chunks)
    finally:
        os.close(fd)


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not valid JSON")


def parse_json(raw: bytes | str, where: str, *, strict_numbers: bool = False, check_depth: bool = True) -> Any:
    """JSON text to Python, with a one-line ``CorruptFileError`` for anything that is not JSON or nests deeper
    than ``MAX_DEPTH``. ``strict_numbers``: NaN/Infinity literals are refused too (safetensors headers).
    ``check_depth=False`` for a caller that type-checks every value it reads without recursing (a
    safetensors header of 40k tensors: the walk would be a third of the read)."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        data = json.loads(text, parse_constant=_no_constant if strict_numbers else None)
    except RecursionError:
        raise CorruptFileError(f"{where}: JSON nested too deeply; the file is corrupt") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise CorruptFileError(f"{where}: not valid JSON ({_short(str(exc))}); fix or re-download the file") from None
    if check_depth:
        _check_depth(data, where)
    return data


def _check_depth(data: Any, where: str) -> None:
    # Iterative: the check itself must not recurse on hostile input.
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise CorruptFileError(f"{where}: JSON nested more than {MAX_DEPTH} levels deep; the file is corrupt")
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)


def load_json(path: Path, what: str = "JSON file", limit: int = MAX_JSON_BYTES) -> dict:
    """A JSON object from a regular file of at most ``limit`` bytes, or a one-line ``CorruptFileError``."""
    data = parse_json(read_bounded(path, limit, what), str(path))
    if not isinstance(data, dict):
        raise CorruptFileError(f"{path}: expected a JSON object, found {_kind(data)}; fix or re-download the file")
    return data


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)  # fmt: skip


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True, eq=False)
class Fields(Mapping):
    """Typed, checked reads of one JSON object. ``where`` names the file, ``at`` the path of this object in it;
    every refusal is a ``BadFieldError`` naming both, the value found and what was expected. It is also a
    read-only mapping of the raw values, so code written against a plain dict (a registered family's
    ``routing``) keeps working."""

    data: Any
    where: str
    at: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.data, dict):
            self.fail(None, self.data, "an object")

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def __iter__(self):
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)

    def name(self, key: str | None) -> str:
        return ".".join(p for p in (self.at, key) if p) or "(top level)"

    def fail(self, key: str | None, value: Any, want: str) -> NoReturn:
        shown = _short(json.dumps(value, default=str)) if not isinstance(value, (dict, list)) else _kind(value)
        raise BadFieldError(f"{self.where}: field {self.name(key)} is {shown}; expected {want}; fix the file")

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None

    def raw(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def _get(self, key: str, default: Any) -> Any:
        value = self.data.get(key)
        if value is None:
            if default is _MISSING:
                raise BadFieldError(f"{self.where}: field {self.name(key)} is missing; add it")
            return default
        return value

    def obj(self, key: str, default: Any = _MISSING) -> "Fields":
        value = self._get(key, default)
        if value is default and default is not _MISSING:
            return Fields(value if isinstance(value, dict) else {}, self.where, self.name(key))
        if not isinstance(value, dict):
            self.fail(key, value, "an object")
        return Fields(value, self.where, self.name(key))

    def int(self, key: str, default: Any = _MISSING, lo: int | None = None, hi: int | None = None) -> int:
        value = self._get(key, default)
        if value is default:
            return value
        if type(value) is float and math.isfinite(value) and value.is_integer():
            value = int(value)  # 8.0 is what some writers make of 8
        if type(value) is not int:
            self.fail(key, value, "a whole number")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            self.fail(key, value, _range("a whole number", lo, hi))
        return value

    def num(self, key: str, default: Any = _MISSING, lo: float | None = None, hi: float | None = None,
            above: float | None = None) -> float:  # fmt: skip
        """A finite number (never a bool, a string or NaN/Infinity), within [lo, hi] and > ``above``."""
        value = self._get(key, default)
        if value is default:
            return value
        if type(value) not in (int, float) or not math.isfinite(value):
            self.fail(key, value, _range("a finite number", lo, hi, above))
        if (lo is not None and value < lo) or (hi is not None and value > hi) or (above is not None and value <= above):
            self.fail(key, value, _range("a finite number", lo, hi, above))
        return float(value)

    def bool(self, key: str, default: Any = _MISSING) -> bool:
        value = self._get(key, default)
        if value is not default and type(value) is not bool:
            self.fail(key, value, "true or false (a JSON boolean, not a string)")
        return value

    def str(self, key: str, default: Any = _MISSING, choices: tuple[str, ...] | None = None) -> str:
        value = self._get(key, default)
        if value is default:
            return value
        if not isinstance(value, str):
            self.fail(key, value, "a string")
        if choices is not None and value not in choices:
            self.fail(key, value, "one of " + ", ".join(choices))
        return value

    def list(self, key: str, default: Any = _MISSING) -> list:
        value = self._get(key, default)
        if value is not default and not isinstance(value, list):
            self.fail(key, value, "a list")
        return value

    def str_list(self, key: str, default: Any = _MISSING) -> list[str]:
        value = self.list(key, default)
        if value is not default and not all(isinstance(v, str) for v in value):
            self.fail(key, value, "a list of strings")
        return value

    def int_list(self, key: str, default: Any = _MISSING, length: int | None = None, lo: int | None = 0) -> list[int]:
        value = self.list(key, default)
        if value is default:
            return value
        ok = all(type(v) is int and (lo is None or v >= lo) for v in value) and (length is None or len(value) == length)
        if not ok:
            self.fail(key, value, f"a list of {length or ''} whole numbers{'' if lo is None else f' >= {lo}'}".replace("  ", " "))
        return value

    def str_map(self, key: str, default: Any = _MISSING) -> dict[str, str]:
        value = self.obj(key, default).data if self.has(key) or default is _MISSING else default
        if not all(isinstance(v, str) for v in value.values()):
            self.fail(key, value, "an object of strings")
        return dict(value)

    def objects(self, key: str, default: Any = _MISSING) -> Iterator[tuple[str, "Fields"]]:
        """(name, Fields) of each member of an object whose values are all objects."""
        parent = self.obj(key, default)
        for name, value in parent.data.items():
            yield name, Fields(value, self.where, parent.name(name)) if isinstance(value, dict) else parent.fail(name, value, "an object")


def _range(what: str, lo=None, hi=None, above=None) -> str:
    parts = [what]
    if above is not None:
        parts.append(f"> {above:g}")
    if lo is not None:
        parts.append(f">= {lo:g}")
    if hi is not None:
        parts.append(f"<= {hi:g}")
    return " ".join(parts)

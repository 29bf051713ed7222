"""Regular expressions taken from the input (compressed-tensors ``ignore: ["re:..."]``, ModelOpt exclusions):
compiled once, refused with one line when invalid or when they could backtrack catastrophically.

Decision (issue 14): Python's ``re`` has no match timeout, so the bound is on the pattern, not the clock.
A pattern is refused when it has
- a repeat (``*``, ``+``, ``{m,n}`` with n > 1) inside another repeat (``(a+)+``, ``(a*b?)*``),
- an alternation or a backreference inside a repeat (``(a|aa)*``, ``(a)\\1*``),
- more than ``MAX_UNBOUNDED`` unbounded repeats in all (``.*.*.*.*x`` is O(n^k) per name), or
- more than ``MAX_PATTERN`` characters.
Every pattern producers write (``re:.*mlp\\.gate$``, ``re:.*(q|k|v)_proj$``, ``re:model\\.layers\\.\\d+\\.x``)
passes. What remains is at most quadratic in the module name, and names are bounded by the header size.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

try:  # Python 3.11+
    import re._parser as _sre_parse  # type: ignore[import-not-found]
    from re._constants import BRANCH, GROUPREF, GROUPREF_EXISTS, MAX_REPEAT, MIN_REPEAT, MAXREPEAT, SUBPATTERN  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - Python 3.10
    import sre_parse as _sre_parse  # type: ignore[no-redef]
    from sre_constants import BRANCH, GROUPREF, GROUPREF_EXISTS, MAX_REPEAT, MIN_REPEAT, MAXREPEAT, SUBPATTERN  # type: ignore[no-redef]

from ...errors import BadFieldError

MAX_PATTERN = 500
MAX_UNBOUNDED = 3
_POSSESSIVE = getattr(_sre_parse, "POSSESSIVE_REPEAT", None)
_REPEATS = {MAX_REPEAT, MIN_REPEAT} | ({_POSSESSIVE} if _POSSESSIVE is not None else set())


@dataclass(frozen=True)
class InputPattern:
    text: str
    regex: re.Pattern[str]


def compile_input_pattern(text: str, where: str, field: str) -> InputPattern:
    """``text`` (without its ``re:``) compiled, or a one-line ``BadFieldError`` naming ``where`` and ``field``."""

    def refuse(why: str) -> BadFieldError:
        shown = text if len(text) <= 60 else text[:57] + "..."
        return BadFieldError(f"{where}: field {field} has the regular expression {shown!r}, which {why}; simplify it")

    if len(text) > MAX_PATTERN:
        raise refuse(f"is longer than {MAX_PATTERN} characters")
    try:
        parsed = _sre_parse.parse(text)
        regex = re.compile(text)
    except (re.error, RecursionError, OverflowError) as exc:
        raise refuse(f"is invalid ({exc})") from None
    why = _risk(parsed)
    if why:
        raise refuse(why)
    return InputPattern(text, regex)


def _risk(parsed) -> str | None:
    """Why the parsed pattern could backtrack catastrophically, or None (an iterative walk)."""
    unbounded = 0
    stack = [(parsed, False)]  # (subpattern items, inside a repeat)
    while stack:
        items, in_repeat = stack.pop()
        for op, av in items:
            if op in _REPEATS:
                lo, hi, sub = av
                if hi == MAXREPEAT:
                    unbounded += 1
                if hi > 1 and in_repeat:
                    return "nests one repeat inside another (catastrophic backtracking)"
                stack.append((sub, in_repeat or hi > 1))
            elif op is BRANCH:
                if in_repeat:
                    return "repeats an alternation (catastrophic backtracking)"
                stack.extend((b, in_repeat) for b in av[1])
            elif op in (GROUPREF, GROUPREF_EXISTS):
                return "uses a backreference"
            elif op is SUBPATTERN:
                stack.append((av[-1], in_repeat))
            elif isinstance(av, (list, tuple)) and av and hasattr(av[-1], "data"):
                stack.append((av[-1], in_repeat))  # lookarounds and the like
    if unbounded > MAX_UNBOUNDED:
        return f"has {unbounded} unbounded repeats (at most {MAX_UNBOUNDED})"
    return None

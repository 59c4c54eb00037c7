"""Parsing and formatting of human durations such as ``4h``, ``1h30m`` or ``90s``."""

from __future__ import annotations

import re

_UNITS = {"d": 86400, "h": 3600, "m": 60, "s": 1}
# ASCII digits only: ``\d`` would also match digits such as "²" that int() refuses.
_PART = re.compile(r"([0-9]+)([dhms])")
_FULL = re.compile(r"(?:[0-9]+[dhms])+")
_CLOCK = re.compile(r"([0-9]+):([0-5][0-9])(?::([0-5][0-9]))?")
_MAX_TEXT = 64
"""Longer inputs are refused before any number is converted (int() refuses over 4,300 digits)."""

#: Upper bound for any duration we accept (one year); protects arithmetic and SQLite.
MAX_SECONDS = 366 * 86400


class DurationError(ValueError):
    """Raised for a duration string that cannot be parsed."""


def parse_duration(text: str) -> int:
    """Return the number of seconds in ``text``.

    Accepted forms: plain seconds (``90``), unit groups (``4h``, ``1h30m``, ``2d``, ``45s``)
    and clock form ``H:MM`` or ``H:MM:SS``. The result must be positive.
    """
    s = text.strip().lower()
    if not s:
        raise DurationError("empty duration")
    if len(s) > _MAX_TEXT:
        raise DurationError(f"duration '{text[:20]}...' is longer than {_MAX_TEXT} characters")
    total: int
    if s.isascii() and s.isdigit():
        total = int(s)
    elif _FULL.fullmatch(s):
        total = 0
        seen: set[str] = set()
        for num, unit in _PART.findall(s):
            if unit in seen:
                raise DurationError(f"unit '{unit}' repeated in duration '{text}'")
            seen.add(unit)
            total += int(num) * _UNITS[unit]
    elif (m := _CLOCK.fullmatch(s)) is not None:
        total = int(m.group(1)) * 3600 + int(m.group(2)) * 60 + int(m.group(3) or 0)
    else:
        raise DurationError(f"invalid duration '{text}' (use e.g. 90s, 30m, 4h, 1h30m, 2d or H:MM)")
    if total <= 0:
        raise DurationError(f"duration '{text}' must be positive")
    if total > MAX_SECONDS:
        raise DurationError(f"duration '{text}' is longer than one year")
    return total


def format_duration(seconds: float) -> str:
    """Format seconds like squeue: ``M:SS``, ``H:MM:SS`` or ``D-HH:MM:SS``."""
    secs = max(0, int(seconds))
    days, rest = divmod(secs, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, sec = divmod(rest, 60)
    if days:
        return f"{days}-{hours:02d}:{minutes:02d}:{sec:02d}"
    if hours:
        return f"{hours}:{minutes:02d}:{sec:02d}"
    return f"{minutes}:{sec:02d}"


class SizeError(ValueError):
    """Raised for a memory size string that cannot be parsed."""


_SIZE = re.compile(r"([0-9]+)([kmgt]?)(i?b?)")
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def parse_size(text: str) -> int:
    """Parse a memory size such as ``16g``, ``512M`` or ``2GiB`` into bytes (binary units)."""
    s = text.strip().lower()
    if len(s) > _MAX_TEXT:
        raise SizeError(f"size '{text[:20]}...' is longer than {_MAX_TEXT} characters")
    m = _SIZE.fullmatch(s)
    if m is None:
        raise SizeError(f"invalid size '{text}' (use e.g. 512m, 16g)")
    value = int(m.group(1)) * _SIZE_UNITS[m.group(2)]
    if value <= 0:
        raise SizeError(f"size '{text}' must be positive")
    return value

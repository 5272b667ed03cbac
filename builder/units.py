"""Human units for counts: `90M`, `2.5B`, `94B`, `40K`, or a plain integer."""
from __future__ import annotations

import re

_SUFFIX = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMBGT]?)\s*$", re.IGNORECASE)


def parse_count(value: object) -> int:
    """`"90M"` -> 90_000_000. Raises ValueError that shows accepted forms."""
    if isinstance(value, bool):
        raise ValueError(f"expected a count such as 90M, 2.5B or 40000, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    match = _PATTERN.match(str(value))
    if not match:
        raise ValueError(
            f"{value!r} is not a count; write a number with an optional K, M, B or T suffix "
            "(e.g. 90M, 2.5B, 40K, 40000)"
        )
    number, suffix = match.groups()
    return int(round(float(number) * _SUFFIX[suffix.upper()]))


def format_count(value: int | float) -> str:
    """90_123_456 -> '90.1M' (for plans, reports and cards)."""
    for suffix, scale in (("T", 10**12), ("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}" if value / scale < 100 else f"{value / scale:.0f}{suffix}"
    return str(int(value))

"""Human units for counts: `90M`, `2.5B`, `94B`, `40K`, `1e9`, `40_000` or a plain integer;
for sizes in bytes: `8GiB`, `512MiB`, `16GB` or a plain integer."""
from __future__ import annotations

import re

_SUFFIX = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}
# The same grammar as `parse_count`, for the JSON schema (so editors accept "94B").
COUNT_PATTERN = r"^\s*\d[\d_]*(\.\d+)?([eE][+-]?\d+)?\s*[KkMmBbGgTt]?\s*$"
_PATTERN = re.compile(r"^\s*(\d[\d_]*(?:\.\d+)?(?:[eE][+-]?\d+)?)\s*([KMBGT]?)\s*$", re.IGNORECASE)
_FORMS = "a whole number with an optional K, M, B or T suffix (e.g. 90M, 2.5B, 40K, 40000)"


def _number_and_unit(value: object, pattern: re.Pattern, what: str, forms: str) -> int | tuple[float, str]:
    """An integer as is; else the number and (upper-cased) unit `pattern` reads from the text.
    Raises ValueError naming the value and the accepted `forms`."""
    if isinstance(value, bool):  # YAML's yes/no/true: almost surely a misplaced line
        raise ValueError(f"{value!r} is not a {what}; write {forms}")
    if isinstance(value, int):
        return value
    match = pattern.match(str(value))
    if not match:
        raise ValueError(f"{value!r} is not a {what}; write {forms}")
    number, unit = match.groups()
    return float(number.replace("_", "")), unit.upper()


def parse_count(value: object) -> int:
    """`"90M"` -> 90_000_000. Raises ValueError naming the value and the accepted forms."""
    parts = _number_and_unit(value, _PATTERN, "count", _FORMS)
    if isinstance(parts, int):
        return parts
    number, suffix = parts
    count = number * _SUFFIX[suffix]
    # "2.5" tokens cannot be meant; "2.5B" can, and a rounding error of one is harmless there.
    if not suffix and not count.is_integer():
        raise ValueError(f"{value!r} is not a whole count; write {_FORMS}")
    return int(round(count))


_BYTE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
# The same grammar as `parse_bytes`, for the JSON schema.
BYTES_PATTERN = r"^\s*\d[\d_]*(\.\d+)?\s*([KkMmGgTt][Ii]?)?[Bb]?\s*$"
_BYTES = re.compile(r"^\s*(\d[\d_]*(?:\.\d+)?)\s*((?:[KMGT]I?)?B?)\s*$", re.IGNORECASE)
_BYTE_FORMS = "a number of bytes with an optional unit: KiB, MiB, GiB, TiB (powers of 1024) or kB, MB, GB, TB (of 1000), e.g. 8GiB"


def parse_bytes(value: object) -> int:
    """`"8GiB"` -> 8 * 2**30, `"16GB"` -> 16 * 10**9. Raises ValueError naming the value and the forms."""
    parts = _number_and_unit(value, _BYTES, "size", _BYTE_FORMS)
    if isinstance(parts, int):
        return parts
    number, unit = parts
    return int(round(number * _BYTE_UNITS[unit if unit.endswith("B") or not unit else unit + "B"]))  # "8Gi", "8G" too


def format_binary_bytes(value: int | float) -> str:
    """8 * 2**30 -> '8 GiB', 3 * 2**20 -> '3 MiB' (memory budgets, which people write in GiB)."""
    for suffix, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= scale / 10 or scale == 2**10:
            return f"{_three_digits(value / scale)} {suffix}"
    return f"{value} bytes"


def format_count(value: int | float) -> str:
    """90_123_456 -> '90.1M', 94e9 -> '94B', 999_999 -> '1M' (for plans, reports and cards)."""
    for suffix, scale in (("T", 10**12), ("B", 10**9), ("M", 10**6), ("K", 10**3)):
        text = _three_digits(value / scale)
        if abs(float(text)) >= 1:  # decided after rounding, so 999_999 is 1M and not 1000K
            return text + suffix
    return str(int(round(value)))


def _three_digits(number: float) -> str:
    return f"{number:.3g}" if abs(number) < 100 else f"{number:.0f}"


def format_duration(seconds: float) -> str:
    """12.34 -> '12.3 s', 185 -> '3 min 05 s', 7500 -> '2 h 05 min' (consoles, reports, cards)."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def format_bytes(value: int | float) -> str:
    """1_234_567_890 -> '1.23 GB' (decimal units, as `df -H` and disk vendors count)."""
    for suffix, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        text = _three_digits(value / scale)
        if abs(float(text)) >= 1:
            return f"{text} {suffix}"
    return f"{int(round(value))} bytes"

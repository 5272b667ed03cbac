"""Human units for counts: what the spec accepts and how plans and cards print counts."""
from __future__ import annotations

import re

import pytest

from builder.units import COUNT_PATTERN, format_count, format_duration, parse_count


@pytest.mark.parametrize("text, expected", [
    ("90M", 90_000_000),
    ("2.5B", 2_500_000_000),
    ("94B", 94_000_000_000),
    ("40K", 40_000),
    ("1T", 10**12),
    ("2G", 2 * 10**9),            # G is an alias of B
    ("90m", 90_000_000),          # suffixes in either case
    (" 3 M ", 3_000_000),         # spaces around the number and the suffix
    ("40000", 40_000),
    ("40_000", 40_000),
    ("1e9", 10**9),               # PyYAML reads 1e9 as a string
    ("2.5e3", 2_500),
    ("1.5e3K", 1_500_000),
    ("0", 0),
    (40_000, 40_000),             # YAML integers pass through
    (1.0e9, 10**9),               # YAML floats that are whole numbers
    ("1.2345678901B", 1_234_567_890),  # rounding below one unit is harmless with a suffix
])
def test_parse_count_accepts(text, expected):
    assert parse_count(text) == expected


@pytest.mark.parametrize("text", [
    "90 megas", "", "M", "-5", "1.5.3", "1,000", "ten", "2.5", 2.5, True, False, None, [1],
])
def test_parse_count_rejects_with_the_value_and_the_accepted_forms(text):
    with pytest.raises(ValueError) as error:
        parse_count(text)
    message = str(error.value)
    assert repr(text) in message
    assert "K, M, B or T" in message and "90M" in message


@pytest.mark.parametrize("value, expected", [
    (0, "0"),
    (999, "999"),
    (1000, "1K"),
    (1500, "1.5K"),
    (99_960_000, "100M"),         # .3g rounding carries into the next digit
    (999_999, "1M"),              # not "1000K": the suffix is chosen after rounding
    (90_123_456, "90.1M"),
    (134_515_008, "135M"),
    (4_513_000_000, "4.51B"),
    (8_030_261_248, "8.03B"),
    (12_247_782_400, "12.2B"),
    (94e9, "94B"),
    (123_456_789_012, "123B"),
    (10**12, "1T"),
    (-1500, "-1.5K"),
])
def test_format_count(value, expected):
    assert format_count(value) == expected


@pytest.mark.parametrize("value", [1, 7, 999, 1001, 12_345, 999_999, 90_123_456, 4_513_000_000, 94 * 10**9])
def test_format_then_parse_is_within_half_a_percent(value):
    assert parse_count(format_count(value)) == pytest.approx(value, rel=0.005)


@pytest.mark.parametrize("text, accepted", [
    ("94B", True), ("2.5B", True), ("40_000", True), ("1e9", True), (" 3 m ", True),
    ("90 megas", False), ("-5", False), ("B", False), ("1,000", False),
])
def test_the_schema_pattern_agrees_with_parse_count(text, accepted):
    """Editors check counts with COUNT_PATTERN (families/spec.schema.json); it must accept
    what parse_count accepts, or valid specs would show errors in the editor."""
    assert bool(re.match(COUNT_PATTERN, text)) is accepted
    if accepted:
        parse_count(text)
    else:
        with pytest.raises(ValueError):
            parse_count(text)


@pytest.mark.parametrize("seconds, text", [(12.34, "12.3 s"), (59.94, "59.9 s"), (185, "3 min 05 s"),
                                           (7500, "2 h 05 min")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text

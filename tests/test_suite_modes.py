"""MINIZOO_REQUIRE_VLLM=1 (tests/conftest.py) fails vLLM skips and keeps every other skip."""
from __future__ import annotations

from pathlib import Path

import pytest

SUITE = """
import pytest

@pytest.mark.skipif(True, reason="vLLM is not installed")
def test_marked():
    pass

def test_skipped_inside():
    pytest.skip("vllm cannot be imported by python")

def test_other_skip():
    pytest.skip("root reads every file")

@pytest.mark.xfail(reason="a known vLLM bug", strict=False)
def test_expected_failure():
    assert False
"""


@pytest.fixture
def suite(pytester):
    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text())
    pytester.makepyfile(test_suite=SUITE)
    return pytester


def test_without_the_flag_vllm_skips_are_skips(suite, monkeypatch):
    monkeypatch.delenv("MINIZOO_REQUIRE_VLLM", raising=False)
    suite.runpytest("-p", "no:cacheprovider").assert_outcomes(skipped=3, xfailed=1)


def test_with_the_flag_every_vllm_skip_fails_and_others_stay_skipped(suite, monkeypatch):
    monkeypatch.setenv("MINIZOO_REQUIRE_VLLM", "1")
    result = suite.runpytest("-p", "no:cacheprovider", "-rs")
    # A skipif mark skips at setup, so pytest reports its failure as an error.
    result.assert_outcomes(failed=1, errors=1, skipped=1, xfailed=1)
    result.stdout.fnmatch_lines(["*MINIZOO_REQUIRE_VLLM=1 but this vLLM test was skipped*"])

"""MINIZOO_REQUIRE_VLLM=1 (tests/conftest.py) fails vLLM skips and keeps every other skip;
MINIZOO_REQUIRE_QUANTIZER=1 does the same for llm-compressor's."""
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

def test_quantizer_skip():
    pytest.skip("llm-compressor's environment .venv-quantize does not exist")

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
    monkeypatch.delenv("MINIZOO_REQUIRE_QUANTIZER", raising=False)
    suite.runpytest("-p", "no:cacheprovider").assert_outcomes(skipped=4, xfailed=1)


def test_with_the_flag_every_vllm_skip_fails_and_others_stay_skipped(suite, monkeypatch):
    monkeypatch.setenv("MINIZOO_REQUIRE_VLLM", "1")
    monkeypatch.delenv("MINIZOO_REQUIRE_QUANTIZER", raising=False)
    result = suite.runpytest("-p", "no:cacheprovider", "-rs")
    # A skipif mark skips at setup, so pytest reports its failure as an error.
    result.assert_outcomes(failed=1, errors=1, skipped=2, xfailed=1)
    result.stdout.fnmatch_lines(["*MINIZOO_REQUIRE_VLLM=1 but this vLLM test was skipped*"])


def test_with_the_quantizer_flag_only_its_skip_fails(suite, monkeypatch):
    monkeypatch.delenv("MINIZOO_REQUIRE_VLLM", raising=False)
    monkeypatch.setenv("MINIZOO_REQUIRE_QUANTIZER", "1")
    result = suite.runpytest("-p", "no:cacheprovider", "-rs")
    result.assert_outcomes(failed=1, skipped=3, xfailed=1)
    result.stdout.fnmatch_lines(["*MINIZOO_REQUIRE_QUANTIZER=1 but this llm-compressor test was skipped*"])

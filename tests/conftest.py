"""Suite-wide hooks.

MINIZOO_REQUIRE_VLLM=1 turns every vLLM-related skip into a failure, so a machine where vLLM
should work (the Makefile sets it wherever it installs vLLM) cannot quietly drop the vLLM
tests: a broken or missing install fails the suite instead of shrinking it. A skip is
vLLM-related when its reason names vLLM, so every such skip must say "vLLM" in its reason
(they all do: it is also what tells the reader what to install).
"""
from __future__ import annotations

import os

import pytest

pytest_plugins = ["pytester"]
# The slowest groups of tests, slowest first (from the durations `make test` prints). Under
# pytest-xdist (`make test` runs two workers with --dist loadgroup) they are queued first, so
# no long one starts last and ends the run alone; the rest follow in file order.
SLOWEST_FIRST = (
    "test_multinode.py",
    "test_e2e.py",
    "rehearse-llama-3.1-8b-minitron.yaml",
    "rehearse-qwen3-family.yaml",
    "test_first_family.py",
    "rehearse-mistral-nemo-12b-minitron.yaml",
    "test_build_trust.py",
    "test_throughput.py",
    "test_prune.py",
    "test_stage_failure.py",
)  # tests/test_suite_modes.py runs this hook on small suites of its own
REQUIRE_VLLM = "MINIZOO_REQUIRE_VLLM"


def vllm_required() -> bool:
    return os.environ.get(REQUIRE_VLLM, "0") not in ("", "0")


def skip_reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # (file, line, "Skipped: reason")
        return str(longrepr[2])
    return str(longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    expected_failure = hasattr(report, "wasxfail")
    if report.skipped and not expected_failure and vllm_required() and "vllm" in skip_reason(report).lower():
        report.outcome = "failed"
        report.longrepr = (f"{REQUIRE_VLLM}=1 but this vLLM test was skipped: {skip_reason(report)}\n"
                           f"Install vLLM (`make setup` does, with a CPU torch), or run with {REQUIRE_VLLM}=0 "
                           "on a machine meant to go without it.")


@pytest.fixture(scope="module")
def shared_ray():
    """One local Ray instance for a module's in-process builds, which run on it instead of
    each starting and stopping its own (tests/ray_instance.py); for builds that need no
    fresh instance."""
    from ray_instance import local_ray

    with local_ray():
        yield


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config, items):
    """Each test module runs whole on one xdist worker (its module-scoped builds and Ray
    instance are made once), unless a test names its own `xdist_group`; slowest groups first."""
    for item in items:
        if not any(item.iter_markers("xdist_group")):
            item.add_marker(pytest.mark.xdist_group(item.path.name))
    items.sort(key=lambda item: _queue_position(_group(item)))  # stable: file order within a group


def _group(item) -> str:
    return next(item.iter_markers("xdist_group")).args[0]


def _queue_position(group: str) -> int:
    return SLOWEST_FIRST.index(group) if group in SLOWEST_FIRST else len(SLOWEST_FIRST)

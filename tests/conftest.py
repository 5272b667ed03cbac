"""Suite-wide hooks.

MINIZOO_REQUIRE_VLLM=1 turns every vLLM-related skip into a failure, so a machine where vLLM
should work (the Makefile sets it wherever it installs vLLM) cannot quietly drop the vLLM
tests: a broken or missing install fails the suite instead of shrinking it. A skip is
vLLM-related when its reason names vLLM, so every such skip must say "vLLM" in its reason
(they all do: it is also what tells the reader what to install).

MINIZOO_REQUIRE_QUANTIZER=1 does the same for the quantizer's environment (.venv-quantize,
llm-compressor: builder.models.quantizer_env), for skips whose reason says "llm-compressor".
A variable of its own, not MINIZOO_REQUIRE_VLLM's: `make setup` creates that environment on
every machine (a CUDA torch one too), where it installs vLLM only beside a local CPU torch.
MINIZOO_REQUIRE_LLAMA_CPP=1 likewise for llama.cpp's tools (.llama.cpp, which `make setup` builds
everywhere: builder.models.llama_cpp), for skips whose reason says "llama.cpp".
"""
from __future__ import annotations

import os

import pytest

pytest_plugins = ["pytester"]  # tests/test_suite_modes.py runs this hook on small suites of its own
# The slowest scopes of tests, slowest first (from the durations `make test` prints). Under
# pytest-xdist (`make test` runs two workers with --dist loadscope) a scope is a test module,
# or a class of tests within one, and runs whole on one worker; these are queued first, so no
# long one starts last and ends the run alone; the rest follow in file order.
SLOWEST_FIRST = (  # the order of a whole run's seconds per scope: bench/results/suite.json at 59ab084
    "test_e2e.py",
    "test_rehearse.py::TestQwen3Rehearsal",
    "test_multinode.py",
    "test_first_family.py",
    "test_budgets.py",
    "test_rehearse.py::TestLlamaRehearsal",
    "test_build_trust.py",
    "test_variant_eval.py",
    "test_rehearse.py::TestMistralNemoRehearsal",
    "test_cluster_faults.py",
    "test_ray_train.py",
    "test_throughput.py",
    "test_stop.py",
    "test_sharded_load.py",
    "test_prune.py",
    "test_data.py",
    "test_memory.py",
    "test_gguf.py",
    "test_gpu_node_build.py",
    "test_process_tree.py",
)
REQUIRE_VLLM = "MINIZOO_REQUIRE_VLLM"
REQUIRE_QUANTIZER = "MINIZOO_REQUIRE_QUANTIZER"
REQUIRE_LLAMA_CPP = "MINIZOO_REQUIRE_LLAMA_CPP"
# variable -> (what a skip's reason names, what to install, the variable's name)
REQUIREMENTS = {REQUIRE_VLLM: ("vllm", "this vLLM test", "Install vLLM (`make setup` does, with a CPU torch)"),
                REQUIRE_QUANTIZER: ("llm-compressor", "this llm-compressor test",
                                    "Create .venv-quantize (`make setup` does)"),
                REQUIRE_LLAMA_CPP: ("llama.cpp", "this llama.cpp test", "Build .llama.cpp (`make setup` does)")}


def required(variable: str) -> bool:
    return os.environ.get(variable, "0") not in ("", "0")


def vllm_required() -> bool:
    return required(REQUIRE_VLLM)


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
    if not report.skipped or expected_failure:
        return
    for variable, (named, what, install) in REQUIREMENTS.items():
        if required(variable) and named in skip_reason(report).lower():
            report.outcome = "failed"
            report.longrepr = (f"{variable}=1 but {what} was skipped: {skip_reason(report)}\n"
                               f"{install}, or run with {variable}=0 on a machine meant to go without it.")
            return


@pytest.fixture(scope="module")
def shared_ray():
    """One local Ray instance for a module's in-process builds, which run on it instead of
    each starting and stopping its own (tests/ray_instance.py); for builds that need no
    fresh instance."""
    from ray_instance import local_ray

    with local_ray():
        yield


def pytest_collection_modifyitems(config, items):
    """The slowest scopes first (see SLOWEST_FIRST); a scope's own tests keep their order."""
    items.sort(key=lambda item: _queue_position(_scope(item)))  # a stable sort


def _scope(item) -> str:
    """What xdist's loadscope runs whole on one worker: the module, or the class in it."""
    return item.path.name + (f"::{item.cls.__name__}" if item.cls else "")


def _queue_position(scope: str) -> int:
    return SLOWEST_FIRST.index(scope) if scope in SLOWEST_FIRST else len(SLOWEST_FIRST)

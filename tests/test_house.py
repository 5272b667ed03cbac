"""The house rules of the code base (issue: a house a stranger can find their way in):
no import cycles, function-local imports only where they keep a heavy package out of a
module that does not load it already (each saying why), a CLI that starts without torch,
and one registered descriptor per stage kind."""
from __future__ import annotations

import subprocess
import sys

import pytest

from import_graph import PACKAGES, ROOT, ImportGraph, cycles

GRAPH = ImportGraph.read()


def test_no_import_cycles_between_modules():
    """Counting every import: top-level, function-local and TYPE_CHECKING-only."""
    assert cycles(GRAPH.edges()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _local_project_imports():
    return [item for item in GRAPH.imports
            if item.local and item.target.split(".")[0] in PACKAGES and item.target in GRAPH.files]


def test_function_local_imports_keep_a_heavy_package_out():
    needless = [f"{GRAPH.files[i.importer].relative_to(ROOT)}:{i.line} imports {i.target}"
                for i in _local_project_imports()
                if not GRAPH.heavy_packages(i.target) - GRAPH.heavy_packages(i.importer)]
    assert needless == [], "import these at the top of the module: they load nothing it does not load already"


def test_every_function_local_import_says_why():
    silent = []
    for item in _local_project_imports():
        lines = GRAPH.files[item.importer].read_text().splitlines()
        block_start = item.line - 1
        while block_start > 0 and lines[block_start - 1].strip().startswith(("from ", "import ")):
            block_start -= 1  # a block of imports shares one comment
        if "#" not in lines[item.line - 1] and not lines[block_start - 1].strip().startswith("#"):
            silent.append(f"{GRAPH.files[item.importer].relative_to(ROOT)}:{item.line}")
    assert silent == []


def test_the_cli_starts_without_heavy_packages():
    code = ("import sys, builder.cli; heavy = {'torch', 'transformers', 'ray', 'lm_eval', 'vllm'};"
            "print(sorted(heavy & set(sys.modules)))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert loaded.stdout.strip() == "[]"


# ----------------------------------------------------------------------------------------
# One stage kind, one module, one descriptor

from builder.report import records  # noqa: E402
from publish import card  # noqa: E402
from builder.stages.registry import STAGE_KINDS  # noqa: E402

SUPPORT_MODULES = {"__init__", "base", "registry", "execute", "training_run"}


def test_every_stage_module_is_registered_under_its_own_name():
    modules = {path.stem for path in (ROOT / "builder" / "stages").glob("*.py")} - SUPPORT_MODULES
    assert {name.replace("-", "_") for name in STAGE_KINDS} == modules
    for name, kind in STAGE_KINDS.items():
        assert kind.run.__module__ == f"builder.stages.{name.replace('-', '_')}"


@pytest.mark.parametrize("name", sorted(STAGE_KINDS))
def test_every_stage_kind_is_described(name):
    kind = STAGE_KINDS[name]
    assert kind.name == name and kind.version and kind.title
    assert kind.resources in ("light", "heavy", "coordinating", "training")
    assert isinstance(getattr(records, kind.record), type), f"{kind.record} is not a builder.report.records class"
    assert callable(getattr(card, kind.card_section)), f"{kind.card_section} is not a publish.card function"
    if kind.resources != "light":  # what holds CPUs or GPUs is priced by the estimate
        assert kind.estimate is not None

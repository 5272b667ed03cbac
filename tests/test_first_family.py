"""The guide's example (docs/writing-a-family.md), families/my-first-family.yaml, built end
to end through the CLI as a user runs it in CI: a separate process whose stdout is a pipe,
not a terminal. One build, shared by every assertion: `status` before and after, a quiet
console (a line budget, no escape codes, no traceback), the family table at the end, and
the paths it prints.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

# The build runs inside the first test's fixture: a few minutes on a quiet 2-core machine,
# over the suite's 900 s per-test limit when seven builds share those cores.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "families" / "my-first-family.yaml"
STAGES = 7  # acquire teacher and data, score, prune, distill, evaluate teacher and student
LINE_BUDGET = 40  # what a user reads after a successful build (issue 14: "at most about 40")


def build_family(*args) -> subprocess.CompletedProcess:
    """`build-family ARGS` in its own process, stdout and stderr captured (pipes)."""
    return subprocess.run([sys.executable, "-m", "builder.cli", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=1800)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("first-family") / "runs"
    before = build_family("status", SPEC, "--workdir", workdir)
    build = build_family(SPEC, "--workdir", workdir)
    after = build_family("status", SPEC, "--workdir", workdir)
    return workdir, before, build, after


def test_status_before_and_after_the_build(built):
    _, before, build, after = built
    assert before.returncode == 0 and before.stdout.splitlines()[0] == f"my-first-family: {STAGES} pending"
    assert build.returncode == 0, build.stdout + build.stderr
    lines = after.stdout.splitlines()
    assert lines[0] == f"my-first-family: {STAGES} done"
    assert all(line.split()[0] == "done" and "took" in line for line in lines[1:])


def test_a_successful_build_is_quiet(built):
    _, _, build, _ = built
    output = build.stdout + build.stderr
    assert build.returncode == 0, output
    assert len(output.splitlines()) <= LINE_BUDGET, output
    assert "Traceback" not in output and "\x1b[" not in output, output
    # one plain line per state change: each stage ran, then finished
    assert len(re.findall(r"^\d\d:\d\d:\d\d running ", build.stdout, re.M)) == STAGES
    assert len(re.findall(r"^\d\d:\d\d:\d\d done ", build.stdout, re.M)) == STAGES


def test_the_build_ends_with_the_family_table_and_where_things_are(built):
    workdir, _, build, _ = built
    lines = build.stdout.splitlines()
    teacher = next(line for line in lines if line.startswith("teacher "))
    student = next(line for line in lines if line.startswith("smollm2-108m-mlp ") and "±" in line)
    for row in (teacher, student):  # params, arc_easy ± its standard error, perplexity
        assert re.search(r"\d+(\.\d+)?M .*\d\.\d{3} ± \d\.\d{3} .*\d+\.\d", row), row
    where = next(line for line in lines if line.startswith("smollm2-108m-mlp ") and "weights" in line)
    weights, card = re.search(r"weights (\S+)\s+card (\S+)", where).groups()
    assert (ROOT / weights / "config.json").exists() and (ROOT / card).read_text().startswith("---")
    report_md = re.escape(str(workdir.resolve() / "my-first-family" / "report.md"))
    assert re.fullmatch(rf"report: wrote {report_md} \(complete\) of the (float32|bfloat16) build \(.+\), "
                        r"finished \d{4}-\d\d-\d\d \d\d:\d\d UTC", lines[-2]), lines[-2]
    assert lines[-1].startswith("build-family finished in ") and lines[-1].endswith("(exit code 0)")


def test_every_stage_kept_its_full_log(built):
    workdir, _, _, _ = built
    logs = sorted(workdir.glob("stages/*/stage.log"))
    assert len(logs) == STAGES
    distill_log = next(log for log in logs if log.parent.name.startswith("distill-")).read_text()
    assert "started  distill-" in distill_log  # the stage's own logging
    # One training worker trains in the stage's own task (builder.training.ray_train): the loop's
    # output (its final model's save) is in the stage's one section, none is left elsewhere
    assert distill_log.count("==== ") == 1 and "Writing model shards" in distill_log


def test_every_computing_stage_recorded_where_it_ran(built):
    """score, distill and both evaluations held no GPU: each records the CPU, its dtype and its
    node, and the report lists that hardware instead of describing the machine that wrote it."""
    import json

    workdir, _, _, _ = built
    manifests = [json.loads(file.read_text()) for file in workdir.glob("stages/*/manifest.json")]
    computing = [m for m in manifests if m["stage"] in ("score", "distill", "evaluate")]
    assert len(computing) == 4
    for manifest in computing:
        placement = manifest["summary"]["placement"]
        assert placement["device"] == "cpu" and placement["dtype"] in ("float32", "bfloat16") and placement["node"]
    report = json.loads((workdir / "my-first-family" / "report.json").read_text())
    assert report["hardware"].startswith("CPU, ")

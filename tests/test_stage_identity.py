"""Same hash = same result: what enters a stage's hash, and what must not.

Plan-level and fast (no Ray): run options against stage hashes (train workers, precision,
`auto`), execution-only spec fields, per-stage code versions, the global batch's layout on
the workers, and a resume under another precision. The last section checks, on tiny
models, that the execution-only fields really leave results unchanged.
"""
from __future__ import annotations

import dataclasses
import json

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import builder.options.precision as precision_module
from builder.models.teacher import config_from_json
from builder.spec.batching import BatchLayoutError, batch_layout
from builder.cli import main
from builder.report.dry_run import render_plan
from builder.training.loop import distill
from builder.training.settings import TrainSettings
from builder.training.data import BlockStream
from builder.training.parallel import World
from builder.family import load_and_plan
from builder.options.run_options import RunOptions
from builder.planning.dag import Plan, make_plan
from builder.options.precision import Precision, choose_precision, cpu_flags
from builder.spec.schema import DistillSpec, EvaluationSpec, FamilySpec
from builder.stages.base import StageContext
from builder.stages.registry import STAGE_KINDS
from builder.stages.training_run import train_settings
from builder.store.stage_store import StageStore
from tiny_models import TINY_VOCAB, one_thread, save_tiny_checkpoint  # noqa: F401 (autouse fixture)

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2_CONFIG = ROOT / "tests" / "data" / "configs" / "SmolLM2-135M-Instruct.json"
FLOAT32, BFLOAT16 = Precision("float32", "test"), Precision("bfloat16", "test")

SPEC = {
    "family": "tiny",
    "teacher": {"source": "embedded:smollm2-135m-instruct"},
    "distill": {"tokens": "48K", "global_batch_size": 12},
    "students": [{"name": "width", "shape": {"hidden_size": 504, "intermediate_size": 960}},
                 {"name": "depth", "shape": {"num_hidden_layers": 17}}],
    "evaluation": {"perplexity_tokens": "4K"},
}


def spec(**sections) -> FamilySpec:
    return FamilySpec.model_validate({**SPEC, **sections})


def plan_of(family: FamilySpec, precision: Precision = FLOAT32) -> Plan:
    return make_plan(family, config_from_json(SMOLLM2_CONFIG), precision)


def digests(plan: Plan) -> dict[tuple[str, str], str]:
    return {(stage.name, stage.key.label): stage.key.digest for stage in plan.stages.values()}


def changed(before: Plan, after: Plan) -> set[tuple[str, str]]:
    old, new = digests(before), digests(after)
    assert old.keys() == new.keys()
    return {name for name in old if old[name] != new[name]}


def with_downstream(plan: Plan, stage_names: set[str]) -> set[tuple[str, str]]:
    """The stages named, and every stage that reads one of them, directly or not."""
    reached = {stage_id for stage_id, stage in plan.stages.items() if stage.name in stage_names}
    for stage_id, stage in plan.stages.items():  # dependency order: one pass suffices
        if reached & set(stage.inputs.values()):
            reached.add(stage_id)
    return {(plan.stages[s].name, plan.stages[s].key.label) for s in reached}


def write_spec(tmp_path: Path, family: dict) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(family))
    return path


def options(tmp_path: Path, **flags) -> RunOptions:
    return RunOptions(workdir=tmp_path / "runs", teacher_config=SMOLLM2_CONFIG, **flags)


# ----------------------------------------------------------------------------------------
# Train workers: they split the global batch, so they change neither hash nor steps


def test_train_workers_change_neither_the_plan_nor_the_steps(tmp_path):
    path = write_spec(tmp_path, {**SPEC, "correction": {"tokens": "8K", "global_batch_size": 12}})
    one, two = (load_and_plan(path, options(tmp_path, train_workers=n, precision="float32")) for n in (1, 2))
    assert digests(one) == digests(two)
    section, seq_len = one.spec.distill, one.spec.data.seq_len
    alone, shared = train_settings(section, 1, "float32"), train_settings(section, 2, "float32")
    assert alone.steps(seq_len, world_size=1) == shared.steps(seq_len, world_size=2) == 16  # 48K / (12 x 256)
    assert (alone.batch_size, alone.grad_accum) == (4, 3)  # micro_batch_size 4 (the default) caps it
    assert (shared.batch_size, shared.grad_accum) == (3, 2)  # 6 per worker: 3 x 2, never a short step


def test_activation_checkpointing_changes_no_hash_and_reaches_the_loop(tmp_path, monkeypatch):
    """--activation-checkpointing is execution only: recomputing a layer gives the same
    gradients (tests/test_distill.py trains the same model with it), so every stage is reused."""
    import builder.training.ray_train
    from builder.training.settings import TrainResult
    from builder.stages.distill import run as distill_stage
    from builder.store.stage_store import Manifest

    path = write_spec(tmp_path, {**SPEC, "correction": {"tokens": "8K", "global_batch_size": 12}})
    off, on = (load_and_plan(path, options(tmp_path, precision="float32", activation_checkpointing=flag))
               for flag in (False, True))
    assert digests(off) == digests(on)
    calls = []
    monkeypatch.setattr(builder.training.ray_train, "run_training", lambda *args, **how: calls.append(args[5])
                        or TrainResult(1, 1, 1.0, 1.0, 1.0, 0, str(tmp_path / "model")))
    stage = next(s for s in on.stages.values() if s.name == "distill")
    inputs = {role: Manifest(role, "", "", 0.0, summary={"model_dir": str(tmp_path / role), "blocks": str(tmp_path),
                                                         "signal": str(tmp_path)})
              for role in stage.inputs}
    teacher_declares(tmp_path / "teacher", "bfloat16")  # the one file the stage itself reads
    for flag in (False, True):
        distill_stage(StageContext(stage, on.spec, RunOptions(activation_checkpointing=flag), tmp_path, inputs))
    assert [settings.activation_checkpointing for settings in calls] == [False, True]


def test_each_step_reads_the_same_sequences_on_any_number_of_workers():
    blocks = torch.arange(40).unsqueeze(1)  # block i holds the token i: rows name themselves
    section = DistillSpec(tokens=1, global_batch_size=12, micro_batch_size=4)

    def step_rows(workers: int, step: int) -> list[int]:
        settings = train_settings(section, workers, "float32")
        streams = [BlockStream(blocks, settings, World(rank, workers, workers > 1)) for rank in range(workers)]
        return sorted(int(row) for stream in streams for micro in range(settings.grad_accum)
                      for row in stream.micro_batch(step, micro).flatten())

    for step in (1, 2, 5):  # step 4 crosses into the second epoch (40 blocks)
        assert step_rows(1, step) == step_rows(2, step) == step_rows(3, step)
        assert len(step_rows(1, step)) == 12


def teacher_declares(folder: Path, dtype: str) -> None:
    """A teacher folder whose config.json declares `dtype`: what the training stages read to store
    their final model in the teacher's dtype (builder.stages.training_run.final_dtype)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"dtype": dtype}))


def test_the_training_stage_runs_the_planned_precision_and_the_derived_layout(tmp_path, monkeypatch):
    import builder.training.ray_train
    from builder.training.settings import TrainResult
    from builder.stages.distill import run as distill_stage
    from builder.store.stage_store import Manifest

    calls = []

    def fake_ray_train(kind, teacher_dir, student_dir, blocks, out_dir, settings, **how):
        calls.append((settings, how))
        return TrainResult(16 * 12 * 256, 16, 1.0, 1.0, 1.0, 0, str(out_dir / "model"))

    monkeypatch.setattr(builder.training.ray_train, "run_training", fake_ray_train)
    plan = plan_of(spec(distill={**SPEC["distill"], "checkpoint_every": 7}), BFLOAT16)
    stage = next(s for s in plan.stages.values() if s.name == "distill")
    inputs = {role: Manifest(role, "", "", 0.0, summary={"model_dir": str(tmp_path / role), "blocks": str(tmp_path),
                                                         "signal": str(tmp_path)})
              for role in stage.inputs}
    teacher_declares(tmp_path / "teacher", "float16")
    run = RunOptions(train_workers=2, precision="float32")  # the stage must not re-resolve this
    summary, _ = distill_stage(StageContext(stage, plan.spec, run, tmp_path, inputs))
    [(settings, how)] = calls
    assert (settings.dtype, settings.batch_size, settings.grad_accum, how["num_workers"]) == ("bfloat16", 3, 2, 2)
    assert settings.checkpoint_every == 7  # an execution-only field still reaches the loop
    assert summary["dtype"] == "bfloat16"  # recorded in the manifest
    # the student is stored in the teacher's declared dtype, whatever the training precision
    assert settings.stored_dtype == summary["stored_dtype"] == "float16"
    assert summary["batch"] == {"workers": 2, "micro_batch_size": 3, "grad_accum": 2, "global_batch_size": 12}


@pytest.mark.parametrize("total, workers, cap, layout", [
    (1152, 8, 4, (8, 4, 36)),  # the Llama-3.1-Minitron batch on 8 GPUs
    (1152, 6, 4, (6, 4, 48)),
    (6, 1, 4, (1, 3, 2)),  # the largest divisor under the cap: no step is short
    (7, 1, 4, (1, 1, 7)),
    (4, 4, 4, (4, 1, 1)),
])
def test_the_global_batch_is_split_exactly(total, workers, cap, layout):
    got = batch_layout(total, workers, cap)
    assert (got.workers, got.micro_batch_size, got.grad_accum) == layout
    assert got.global_batch_size == total


def test_a_global_batch_the_workers_cannot_split_fails_before_anything_runs(tmp_path, capsys):
    with pytest.raises(BatchLayoutError, match="multiple of 5"):
        batch_layout(12, 5, 4)
    path = write_spec(tmp_path, SPEC)
    code = main([str(path), "--dry-run", "--train-workers", "5", "--workdir", str(tmp_path / "runs"),
                 "--teacher-config", str(SMOLLM2_CONFIG)])
    err = capsys.readouterr().err
    assert code == 2 and "1 problem; nothing was run" in err
    assert ("distill.global_batch_size: global_batch_size 12 cannot be split equally over --train-workers 5; "
            "set global_batch_size to a multiple of 5 (e.g. 15), or run with --train-workers 1, 2, 3, 4, 6, 12") in err
    assert not (tmp_path / "runs").exists()


def test_the_old_per_worker_batch_fields_name_their_replacement(tmp_path, capsys):
    old = {**SPEC, "distill": {"tokens": "48K", "batch_size": 4, "grad_accum": 3}}
    code = main([str(write_spec(tmp_path, old)), "--dry-run", "--teacher-config", str(SMOLLM2_CONFIG)])
    err = capsys.readouterr().err
    assert code == 2
    assert "distill: `batch_size` and `grad_accum` (per worker) were replaced by `global_batch_size`" in err
    assert "global_batch_size: 4 x 3 x the train workers" in err


# ----------------------------------------------------------------------------------------
# Precision: hashed with the stages that run in it, and `auto` never reaches a hash


def test_precision_changes_the_stages_that_run_in_it_and_what_reads_them_only():
    family = spec()
    fp32, bf16 = plan_of(family, FLOAT32), plan_of(family, BFLOAT16)
    # The teach stage runs the teacher as an online distillation would: in the training
    # precision; the evaluate stages load their model in it, the teacher's included.
    in_precision = ("distill", "teach", "evaluate")
    assert changed(fp32, bf16) == with_downstream(fp32, set(in_precision))
    assert ("evaluate", "teacher") in changed(fp32, bf16)
    unchanged = set(digests(fp32)) - changed(fp32, bf16)
    assert {name for name, _ in unchanged} == {"acquire-teacher", "acquire-data", "score", "prune"}
    run_in_it = [s for s in bf16.stages.values() if s.name in in_precision]
    assert run_in_it and all(s.key.options == {"precision": "bfloat16"} for s in run_in_it)
    assert all(s.key.options == {} for s in bf16.stages.values() if s.name not in in_precision)


def test_precision_reaches_teacher_correction_and_search_candidates():
    family = spec(correction={"tokens": "8K"}, search={"tokens": "1K", "max_candidates": 2},
                  students=[{"name": "budget", "params": "90M"}])
    fp32, bf16 = plan_of(family, FLOAT32), plan_of(family, BFLOAT16)
    assert changed(fp32, bf16) == with_downstream(fp32, {"correct", "distill", "evaluate"})
    candidates = [s for s in bf16.stages.values() if s.name == "distill" and s.student is None]
    assert len(candidates) == 2 and all(s.key.options["precision"] == "bfloat16" for s in candidates)
    # and each is ranked (its held-out loss) in it
    ranked = [s for s in bf16.stages.values() if s.name == "evaluate" and s.key.label.startswith("budget.")]
    assert len(ranked) == 2 and all(s.key.options["precision"] == "bfloat16" for s in ranked)


def test_a_student_that_is_not_distilled_is_only_evaluated_in_the_precision():
    pruned_only = spec(distill={"tokens": 0})
    fp32, bf16 = plan_of(pruned_only, FLOAT32), plan_of(pruned_only, BFLOAT16)
    assert changed(fp32, bf16) == with_downstream(fp32, {"evaluate"})


def test_a_resume_under_another_precision_starts_its_own_stage(tmp_path):
    store, family = StageStore(tmp_path / "runs"), spec()
    fp32, bf16 = plan_of(family, FLOAT32), plan_of(family, BFLOAT16)
    killed = next(s for s in fp32.stages.values() if s.name == "distill")
    (store.prepare(killed.key) / "checkpoints").mkdir()  # a float32 run killed mid-way
    (store.path(killed.key) / "checkpoints" / "latest").write_text("step-000002")

    def state(plan: Plan, label: str) -> str:
        row = next(line for line in render_plan(plan, store, tmp_path).splitlines()
                   if f"distill ({label})" in line)
        return row.split()[0]

    assert state(fp32, killed.key.label) == "[resume]"
    assert state(bf16, killed.key.label) == "[todo]"  # never picks up the float32 checkpoint
    assert "Training precision: bfloat16 (test)" in render_plan(bf16, store, tmp_path)


@pytest.mark.parametrize("flags, expected", [
    (dict(gpus_per_stage=1), "bfloat16"),  # auto on a GPU
    (dict(), "float32"),  # auto on a CPU without native bf16 (injected below)
])
def test_auto_is_resolved_before_hashing(tmp_path, monkeypatch, flags, expected):
    monkeypatch.setattr(precision_module, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    path = write_spec(tmp_path, SPEC)
    auto = load_and_plan(path, options(tmp_path, precision="auto", **flags))
    explicit = load_and_plan(path, options(tmp_path, precision=expected))
    assert auto.precision.dtype == expected and auto.precision.reason.startswith("auto: ")
    assert digests(auto) == digests(explicit)


def test_report_plans_with_the_precision_the_build_resolved(tmp_path, monkeypatch):
    """A build on GPUs resolved auto to bf16; `report` on a CPU node must find its stages."""
    from builder.family import record_start

    path = write_spec(tmp_path, SPEC)
    monkeypatch.setattr(precision_module, "cpu_flags", lambda: frozenset())
    gpu_build = load_and_plan(path, options(tmp_path, precision="auto", gpus_per_stage=1))
    record_start(gpu_build, options(tmp_path))  # as `build` does before running
    reported = load_and_plan(path, options(tmp_path, precision="auto"), built=True)
    assert reported.precision == gpu_build.precision and digests(reported) == digests(gpu_build)
    pinned = load_and_plan(path, options(tmp_path, precision="float32"), built=True)
    assert pinned.precision.dtype == "float32"  # an explicit flag still wins


def test_a_build_keeps_the_precision_auto_chose_on_this_machine(tmp_path, monkeypatch):
    """The CPU probe times a matmul: on a loaded machine it may flip. The next build on the
    same machine keeps the recorded decision (else every training stage would be redone);
    another kind of machine decides afresh."""
    from builder.family import record_start

    path = write_spec(tmp_path, SPEC)
    monkeypatch.setattr(precision_module, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    monkeypatch.setattr(precision_module, "bf16_speedup", lambda: 2.0)
    first = load_and_plan(path, options(tmp_path, precision="auto"))
    record_start(first, options(tmp_path))
    monkeypatch.setattr(precision_module, "bf16_speedup", lambda: 0.8)  # a busy machine's probe
    again = load_and_plan(path, options(tmp_path, precision="auto"))
    assert again.precision.dtype == "bfloat16" and "earlier build on this machine" in again.precision.reason
    assert digests(again) == digests(first)
    monkeypatch.setattr(precision_module, "cpu_flags", lambda: frozenset({"amx_bf16", "avx512_bf16"}))
    elsewhere = load_and_plan(path, options(tmp_path, precision="auto"))
    assert elsewhere.precision.dtype == "float32"  # the other machine's own probe (0.8x) decides


def never_called():
    raise AssertionError("the decision did not need this")


@pytest.mark.parametrize("requested, use_gpu, flags, speedup, expected", [
    ("float32", True, never_called, never_called, "float32"),  # explicit wins, nothing probed
    ("bfloat16", False, never_called, never_called, "bfloat16"),
    ("auto", True, never_called, never_called, "bfloat16"),  # GPU: bf16 without looking at the CPU
    ("auto", False, lambda: frozenset({"avx2", "avx512f"}), never_called, "float32"),  # emulated bf16
    ("auto", False, lambda: frozenset({"avx512f", "avx512_bf16"}), lambda: 2.1, "bfloat16"),
    ("auto", False, lambda: frozenset({"amx_bf16", "amx_tile"}), lambda: 3.0, "bfloat16"),
    ("auto", False, lambda: frozenset({"avx512_bf16"}), lambda: 0.8, "float32"),  # native, yet slower here
])
def test_auto_precision_decision(requested, use_gpu, flags, speedup, expected):
    choice = choose_precision(requested, use_gpu, flags, speedup)
    assert choice.dtype == expected and choice.reason


def test_cpu_flags_read_the_cpuinfo_flags_line(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\nbugs\t\t: spectre_v1\n")
    assert cpu_flags(cpuinfo) == {"fpu", "avx2", "avx512_bf16"}
    assert cpu_flags(tmp_path / "missing") == frozenset()  # macOS, containers without /proc


def test_the_probe_runs_once_per_process():
    first = precision_module.bf16_speedup()
    assert first > 0 and precision_module.bf16_speedup() == first  # a second timing would differ


# ----------------------------------------------------------------------------------------
# Execution-only fields: outside the hash, still delivered to the stage


EXECUTION_ONLY = [  # (section, its other settings, the field, a new value, the stage that reads it)
    ("scoring", {}, "batch_size", 3, "score"),
    ("evaluation", {"perplexity_tokens": "4K"}, "batch_size", 3, "evaluate"),
    ("distill", SPEC["distill"], "checkpoint_every", 7, "distill"),
    ("distill", SPEC["distill"], "micro_batch_size", 2, "distill"),
    ("correction", {"tokens": "8K"}, "checkpoint_every", 7, "correct"),
]


@pytest.mark.parametrize("section, settings, field, value, stage_name", EXECUTION_ONLY)
def test_execution_only_fields_reuse_every_stage(section, settings, field, value, stage_name):
    base = plan_of(spec(**{section: settings}))
    other = plan_of(spec(**{section: {**settings, field: value}}))
    assert digests(base) == digests(other)
    stage = next(s for s in other.stages.values() if s.name == stage_name)
    assert stage.key.execution[field] == value  # it still reaches the stage


def test_a_stage_reads_its_section_with_the_execution_fields(tmp_path):
    family = spec(evaluation={"batch_size": 3}, distill={**SPEC["distill"], "checkpoint_every": 7})
    plan = plan_of(family)

    def section(stage_name: str, model):
        stage = next(s for s in plan.stages.values() if s.name == stage_name)
        return StageContext(stage, family, RunOptions(), tmp_path, {}).section(model)

    assert section("evaluate", EvaluationSpec).batch_size == 3
    assert section("distill", DistillSpec).checkpoint_every == 7
    assert section("distill", DistillSpec) == family.distill


def test_the_search_ranking_keeps_the_evaluation_batch_out_of_its_hash():
    budget = dict(search={"tokens": "1K", "max_candidates": 2}, students=[{"name": "budget", "params": "90M"}])
    base = plan_of(spec(**budget))
    other = plan_of(spec(**budget, evaluation={"perplexity_tokens": "4K", "batch_size": 3}))
    assert digests(base) == digests(other)
    ranked = [s for s in other.stages.values() if s.name == "evaluate" and "." in s.key.label]
    assert len(ranked) == 2 and all(s.key.execution == {"batch_size": 3} for s in ranked)


def test_the_throughput_engine_args_stay_in_its_hash():
    # Its result is a speed, which enforce_eager changes (see ThroughputSpec.engine_args).
    base, eager = plan_of(spec()), plan_of(spec(throughput={"engine_args": {"enforce_eager": True}}))
    assert changed(base, eager) == {("throughput", "")}


# ----------------------------------------------------------------------------------------
# Per-stage code versions


def test_every_stage_has_a_code_version():
    assert all(kind.version for kind in STAGE_KINDS.values())


@pytest.mark.parametrize("bumped", ["evaluate", "prune", "score", "distill", "throughput"])
def test_a_version_bump_recomputes_that_stage_and_its_downstream_only(monkeypatch, bumped):
    family = spec(correction={"tokens": "8K"})
    before = plan_of(family)
    monkeypatch.setitem(STAGE_KINDS, bumped, dataclasses.replace(STAGE_KINDS[bumped],
                                                                 version=STAGE_KINDS[bumped].version + "-bumped"))
    after = plan_of(family)
    assert changed(before, after) == with_downstream(before, {bumped})
    assert ("correct", "") not in changed(before, after)


# ----------------------------------------------------------------------------------------
# The execution-only fields leave results unchanged (batch sizes: tests/test_importance.py
# test_batching_does_not_change_the_scores; micro-batch: test_distill.py's gradient
# accumulation test; workers: test_ray_train.py)


def test_checkpoint_every_does_not_change_the_trained_weights(tmp_path):
    teacher = save_tiny_checkpoint(tmp_path / "teacher", seed=0)
    student = save_tiny_checkpoint(tmp_path / "student", seed=1, num_hidden_layers=2)
    blocks = torch.randint(3, TINY_VOCAB, (24, 16), generator=torch.Generator().manual_seed(0))
    for every in (1, 100):
        settings = TrainSettings(tokens=3 * 4 * 16, batch_size=4, checkpoint_every=every, learning_rate=3e-3,
                                 warmup_steps=1)
        distill(teacher, student, blocks, tmp_path / f"every-{every}", settings)
    often, never = (load_file(str(tmp_path / f"every-{n}" / "model" / "model.safetensors")) for n in (1, 100))
    # Saving a checkpoint reads state and draws no random numbers: bit-identical weights.
    assert often.keys() == never.keys() and all(torch.equal(often[k], never[k]) for k in often)


def test_perplexity_does_not_depend_on_the_evaluation_batch(tmp_path):
    from evaluators.perplexity import heldout_perplexity

    model = save_tiny_checkpoint(tmp_path / "model", seed=2)
    blocks = torch.randint(3, TINY_VOCAB, (5, 16), generator=torch.Generator().manual_seed(1))
    one, all_at_once = (heldout_perplexity(model, blocks, batch_size=size, progress=False) for size in (1, 5))
    # Per-token NLLs summed in float32 over 75 tokens in another grouping: reassociation
    # changes the sum by a few ulps (~1e-7 relative), far inside 1e-5.
    assert one["nll"] == pytest.approx(all_at_once["nll"], rel=1e-5)
    assert one["tokens"] == all_at_once["tokens"]

"""The build plan: the stage DAG as data, derived from the spec and the teacher's config.

Each stage is keyed by a hash of what its result depends on (see `builder.store.stage_store`), so the
plan alone says which stages are finished, which resume, and which run. The runner
executes it; the dry run prints it. Run options enter only as the resolved training
precision; how many workers share a step, and with which parallelism, changes only the order
of float sums (builder.spec.batching), so it does not change the plan: a result is defined up
to that order, and the report says which layout made it (builder.training.layouts says why).
"""
from __future__ import annotations

import dataclasses
import functools

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel

from builder.models.teacher import teacher_identity
from builder.models.arch import count_params, student_config
from builder.options.precision import Precision
from builder.pruning.budgets import ServingCost, budget_candidates, meets, serving_memory
from builder.pruning.search import Candidate, candidates
from builder.spec.chains import chain_order
from builder.spec.shape import Shape
from builder.spec.schema import (DistillSpec, EvaluationSpec, FamilySpec, SignalKey, StudentSpec, TrainingSpec,
                          split_execution)
from builder.stages.base import VLLM_ENGINE, Stage
from builder.stages.gguf import stage_config as gguf_config
from builder.stages.measure_serving import measured_config
from builder.stages.quantize import stage_config as variant_config
from builder.stages.registry import stage_kind
from builder.store.stage_store import StageKey, StageStore
from builder.training.settings import TrainSettings

TEACHER = "teacher"


@dataclass(frozen=True)
class ServingMeasurements:
    """What the planner knows of serving costs (students with a `budget`): the identity of the
    hardware the family is served on (builder.stages.measure_serving.hardware_identity), and
    each finished measure-serving stage's summary (the store's; None until it has run)."""

    hardware: dict
    summary: Callable[[StageKey], dict | None] = lambda key: None


@dataclass(frozen=True)
class BudgetPlan:
    """A serving-budget student's measurements: every candidate shape of its search and the
    teacher's shape, each one measure-serving stage; once all have run, their costs, and the
    search goes on with the candidates that meet the budget only."""

    measured: tuple[Candidate, ...]  # every candidate shape, in measure order
    stages: tuple[str, ...]  # their measure-serving stage ids
    teacher_stage: str  # the teacher shape's (the speed-ups' reference)
    costs: tuple[ServingCost, ...] | None  # None until every measurement has run
    teacher_cost: ServingCost | None
    hardware: dict
    memory: tuple[int, ...]  # bytes computed from each shape (the teacher's first) before vLLM says its dtype
    teacher_shape: Shape

    @property
    def measured_all(self) -> bool:
        return self.costs is not None

    @property
    def all_stages(self) -> tuple[str, ...]:
        return (self.teacher_stage, *self.stages)


@dataclass(frozen=True)
class PlannedStudent:
    spec: StudentSpec
    shape: Shape | None  # None for a student by budget: its search has not chosen yet
    params: int  # exact for a shape; the budget for a student by budget
    final_stage: str  # id of the stage holding the finished checkpoint (distill)
    candidates: tuple[Candidate, ...] = ()  # the architecture search's, in the select stage's order
    select_stage: str | None = None  # the stage that picks the candidate
    budget: BudgetPlan | None = None  # a serving budget's measurements (the search's candidates: those that meet it)

    @property
    def searched(self) -> bool:
        return self.select_stage is not None

    @property
    def parent(self) -> str | None:
        """The student it is pruned from and taught by (`from`); None: the family's teacher."""
        return self.spec.parent


@dataclass(frozen=True)
class Source:
    """What a student is pruned from and taught by: the family's teacher, or its parent student's
    distilled model (a chained member), with the importance scored on it and its stored signals."""

    name: str  # TEACHER or the parent student's name
    model: str  # the stage holding its weights
    scores: str  # the score stage on those weights
    config: object  # its transformers config
    signals: "Signals"


@dataclass
class Plan:
    spec: FamilySpec
    teacher_shape: Shape
    teacher_params: int
    students: list[PlannedStudent]
    stages: dict[str, Stage]  # in dependency order
    teacher_stage: str  # the teacher every student learns from (corrected or not)
    original_teacher_stage: str
    throughput_stage: str | None
    eval_stages: dict[str, str]  # model name -> evaluate stage id
    precision: Precision  # what the training stages run in (and are hashed with)
    teach_stages: tuple[str, ...] = ()  # the stored teacher signals (teacher_signal: topk), parents' too
    teacher_vocab_size: int = 0
    variant_stages: dict[tuple[str, str], str] = field(default_factory=dict)  # (model, scheme) -> quantize or gguf stage
    variant_eval_stages: dict[tuple[str, str], str] = field(default_factory=dict)  # (model, scheme) -> evaluate (vLLM)

    def stage_paths(self, store: StageStore) -> dict[str, Path]:
        return {stage_id: store.path(stage.key) for stage_id, stage in self.stages.items()}

    @functools.cached_property
    def _student_by_final_stage(self) -> dict[str, str]:
        return {student.final_stage: student.spec.name for student in self.students}

    def model_name(self, stage_id: str) -> str:
        """Which model a stage's output is: TEACHER (corrected or not) or a student's name."""
        return self._student_by_final_stage.get(stage_id, TEACHER)

    def taught_by(self, stage_id: str) -> str:
        """The model a stage reads as its teacher (a score, teach, prune or distill stage)."""
        return self.model_name(self.stages[stage_id].inputs[TEACHER])

    def student(self, name: str) -> PlannedStudent:
        return next(student for student in self.students if student.spec.name == name)

    def unmeasured(self) -> list[str]:
        """The measure-serving stages of budgets not yet measured: they run before anything else
        (builder.family.build), and the plan is made again from their numbers."""
        return list(dict.fromkeys(stage_id for student in self.students if student.budget
                                  and not student.budget.measured_all for stage_id in student.budget.all_stages))


def student_shape(source_config, student: StudentSpec) -> Shape:
    """`source_config`: what the student is pruned from (the teacher's, or its parent's: source_config)."""
    return Shape.of(source_config).replace(**student.shape.changes())


def source_config(spec: FamilySpec, teacher_config, student: StudentSpec):
    """The config of the model a student is pruned from: its parent's (along its chain of explicit
    shapes; the spec's validation refuses a parent by budget), or the teacher's."""
    if student.parent is None:
        return teacher_config
    parent = spec.student(student.parent)
    return student_config(teacher_config, student_shape(source_config(spec, teacher_config, parent), parent))


def student_params(teacher_config, shape: Shape) -> int:
    return count_params(student_config(teacher_config, shape))


class _Builder:
    """Accumulates stages in dependency order while the plan is made."""

    def __init__(self):
        self.stages: dict[str, Stage] = {}

    def add(self, stage_name: str, label: str, settings: BaseModel | dict, inputs: dict[str, str] | None = None,
            student: str | None = None, options: dict | None = None, execution: dict | None = None) -> str:
        """`settings`: a spec section (its execution-only fields stay outside the hash) or a dict
        (with `execution`: how it runs, outside the hash too)."""
        inputs = inputs or {}
        upstream = tuple(self.stages[i].key.digest for i in inputs.values())
        config, execution = split_execution(settings) if isinstance(settings, BaseModel) else (settings, execution or {})
        key = stage_key(stage_name, label, config, upstream, options, execution)
        return self.add_key(key, inputs, student)

    def add_key(self, key: StageKey, inputs: dict[str, str] | None = None, student: str | None = None) -> str:
        stage = Stage(key, inputs or {}, student)
        self.stages[stage.id] = stage
        return stage.id


def stage_key(stage_name: str, label: str, config: dict, upstream: tuple[str, ...] = (),
              options: dict | None = None, execution: dict | None = None) -> StageKey:
    """Every key is made here, so none lacks its stage's code version."""
    return StageKey(stage_name, label, config, upstream, stage_kind(stage_name).version, options or {}, execution or {})


def teacher_acquire_key(spec: FamilySpec) -> StageKey:
    """The first stage's key needs nothing but the spec: the planner reads the teacher's
    config from this stage's output when it exists."""
    return stage_key("acquire-teacher", "", teacher_identity(spec.teacher))


def training_options(precision: Precision) -> dict:
    """The run options a training stage's numerics depend on, hashed with it (and with the
    teach and evaluate stages, which hold their model in the training precision). Not the worker
    count or `--parallel`: DDP and FSDP2 compute the same gradients (averaged over the same
    global batch) and in float32 differ from one process only in float summation order
    (tests/test_ray_train.py). In bfloat16 the layout is visible: summation order, and FSDP2's
    mixed-precision policy computes from bf16 copies of the weights with a bf16 residual
    stream where DDP's autocast keeps fp32 weights and residual (builder.training.sharded);
    builder.training.layouts says why that stays out of the hash and is reported. Nor
    `--activation-checkpointing`: recomputing a layer gives the same gradients."""
    return {"precision": precision.dtype}


def _if_trained(section: TrainingSpec, trains: dict) -> dict | None:
    return trains if section.tokens > 0 else None  # 0 tokens passes the pruned checkpoint on as is


def make_plan(spec: FamilySpec, teacher_config, precision: Precision,
              serving: ServingMeasurements | None = None) -> Plan:
    """Lay out every stage of the family build (no work is done here). `precision` is
    already resolved (builder.options.precision): `auto` never reaches a hash. `serving`: the
    hardware and the stored measurements a family with serving budgets is planned from."""
    if serving is None and any(student.budget for student in spec.students):
        raise ValueError("students with a serving budget are planned for the hardware they are served on: "
                         "pass make_plan a ServingMeasurements")
    dag = _Builder()
    trains = training_options(precision)
    original_teacher = dag.add_key(teacher_acquire_key(spec))
    data = dag.add("acquire-data", "", spec.data, {TEACHER: original_teacher})
    teacher = original_teacher
    if spec.correction.tokens > 0:
        teacher = dag.add("correct", "", spec.correction, {TEACHER: original_teacher, "data": data},
                          options=trains)
    scores = dag.add("score", "", spec.scoring, {TEACHER: teacher, "data": data})
    root = Source(TEACHER, teacher, scores, teacher_config, _plan_teach(dag, spec, None, teacher, data, trains))
    students = _plan_students(dag, spec, root, data, trains, serving)

    models = {TEACHER: teacher} | {s.spec.name: s.final_stage for s in students}
    if teacher != original_teacher:
        models = {"teacher-original": original_teacher} | models
    eval_stages = {name: dag.add("evaluate", name, spec.evaluation, {"model": stage_id, "data": data},
                                 options=trains)  # it loads the model in the training precision
                   for name, stage_id in models.items()}
    # The family's members (the teacher the students learned from, and the students): what is
    # measured for speed and quantized; the original teacher is only evaluated beside them.
    members = {name: stage_id for name, stage_id in models.items() if name != "teacher-original"}
    variants = _plan_variants(dag, spec, members, data)
    # each compressed-tensors variant in the engine that serves it, vLLM, with the family's tasks
    # and held-out blocks (a GGUF variant's stage measures it in llama.cpp's server itself)
    in_vllm = {scheme for scheme in (variant.scheme for variant in spec.variants if not variant.is_gguf)}
    served = {(name, scheme): stage_id for (name, scheme), stage_id in variants.items() if scheme in in_vllm}
    variant_evals = {(name, scheme): dag.add("evaluate", variant_label(name, scheme), spec.evaluation,
                                             {"model": stage_id, "data": data}, options=trains | {"engine": VLLM_ENGINE})
                     for (name, scheme), stage_id in served.items()}
    throughput = None
    if spec.throughput.enabled:  # the corrected teacher has the original's shape: its speed stands for both
        # the vLLM variants in the same run, at the same workload: their speed-ups are ratios too
        measured = members | {variant_label(name, scheme): stage_id for (name, scheme), stage_id in served.items()}
        throughput = dag.add("throughput", "", spec.throughput, measured)
    shape = Shape.of(teacher_config)
    teach = tuple(stage_id for stage_id, stage in dag.stages.items() if stage.name == "teach")
    return Plan(spec, shape, count_params(teacher_config), students, dag.stages, teacher,
                original_teacher, throughput, eval_stages, precision, teach, teacher_config.vocab_size,
                variants, variant_evals)


def _plan_variants(dag: _Builder, spec: FamilySpec, models: dict[str, str], data: str) -> dict[tuple[str, str], str]:
    """One variant stage per (model, variant): the teacher the students learned from (the
    reference) and each student's finished model; a quantize stage for a compressed-tensors
    scheme, a gguf stage (hashed with the throughput workload it is measured at) for a GGUF one.
    Only a scheme that calibrates reads the data stage, so only its hash follows the split."""
    return {(name, variant.scheme): dag.add("gguf" if variant.is_gguf else "quantize",
                                            variant_label(name, variant.scheme),
                                            gguf_config(variant, spec.throughput) if variant.is_gguf
                                            else variant_config(variant),
                                            {"model": stage_id} | ({"data": data} if variant.calibrated else {}),
                                            student=None if name == TEACHER else name)
            for name, stage_id in models.items() for variant in spec.variants}


def variant_label(model: str, scheme: str) -> str:
    """A variant stage's label: its model's name, a dot, the scheme (builder.planning.cost_model.StageInputs
    reads the model back from it)."""
    return f"{model}.{scheme}"


def _plan_students(dag: _Builder, spec: FamilySpec, root: Source, data: str, trains: dict,
                   serving: ServingMeasurements | None) -> list[PlannedStudent]:
    """Every student, each after its parent (chained members); a parent becomes a Source (its
    own score stage and stored signals) once its distillation is planned. In spec order."""
    sources, planned = {TEACHER: root}, {}
    parents = set(spec.parents.values())
    for name in chain_order(spec.parents):
        student = spec.student(name)
        source = sources[student.parent or TEACHER]
        planned[name] = (_plan_budget(dag, spec, source, root.config, student, data, trains, serving) if student.budget
                         else _plan_student(dag, spec, source, student, data, trains))
        if name in parents:
            sources[name] = _parent_source(dag, spec, planned[name], root.config, data, trains)
    return [planned[student.name] for student in spec.students]


def _parent_source(dag: _Builder, spec: FamilySpec, parent: PlannedStudent, teacher_config, data: str,
                   trains: dict) -> Source:
    """A parent's distilled model as its children's source: scored on the same calibration
    data as the teacher (its children's cuts follow its own importance, as Minitron's 9B was
    scored again for the 4B), and taught once per signal its children read."""
    name, model = parent.spec.name, parent.final_stage
    scores = dag.add("score", name, spec.scoring, {TEACHER: model, "data": data})
    config = student_config(teacher_config, parent.shape)
    return Source(name, model, scores, config, _plan_teach(dag, spec, name, model, data, trains))


def _plan_student(dag: _Builder, spec: FamilySpec, source: Source, student: StudentSpec, data: str,
                  trains: dict) -> PlannedStudent:
    if student.params is not None:
        return _plan_search(dag, spec, source, student, data, trains)
    shape = student_shape(source.config, student)
    pruned = dag.add("prune", student.name, prune_config(shape, student.depth_method),
                     {TEACHER: source.model, "scores": source.scores}, student=student.name)
    distilled = _add_distill(dag, spec, student, source, pruned, data, trains)
    return PlannedStudent(student, shape, student_params(source.config, shape), distilled)


def prune_config(shape: Shape, depth_method: str) -> dict:
    return {"shape": shape.as_dict(), "depth_method": depth_method}


def _add_distill(dag: _Builder, spec: FamilySpec, student: StudentSpec, source: Source, pruned: str,
                 data: str, trains: dict) -> str:
    section = spec.distill_for(student)
    return dag.add("distill", student.name, section, _distill_inputs(section, source, pruned, data),
                   student=student.name, options=_if_trained(section, trains))


def _distill_inputs(section: DistillSpec, source: Source, pruned: str, data: str) -> dict[str, str]:
    inputs = {TEACHER: source.model, "student": pruned, "data": data}
    if section.stored_signal:  # it reads the teach stage's tokens and signal, not the data's
        inputs["signal"] = source.signals[section.signal_key]
    return inputs


# -- the teach stages: one per (top_k, temperature, tail_samples) that some distillation reads ---
Signals = dict[SignalKey, str]  # -> teach stage id


def _plan_teach(dag: _Builder, spec: FamilySpec, parent: str | None, teacher: str, data: str,
                trains: dict) -> Signals:
    """The signals of one model (`parent`: a student whose children read its signal; None: the
    teacher). A teach stage covers the most stream positions any of its readers reads (so every
    reader, whatever its seed, samples its steps from the same taught rows)."""
    positions: dict[SignalKey, int] = {}
    for reads_from, section in spec.distillations_by_model():
        if section.stored_signal and reads_from == parent:
            key = section.signal_key
            positions[key] = max(positions.get(key, 0), stream_positions(section, spec.data.seq_len))
    # forward passes only: the scoring section's batch size sizes them (execution only)
    return {key: dag.add("teach", _teach_label(key, parent), {**key._asdict(), "positions": count},
                         {TEACHER: teacher, "data": data}, options=trains,
                         execution={"batch_size": spec.scoring.batch_size})
            for key, count in positions.items()}


def _teach_label(key: SignalKey, parent: str | None = None) -> str:
    signal = f"k{key.top_k}" + (f"+{key.tail_samples}" if key.tail_samples else "")
    return f"{parent}.{signal}" if parent else signal


def stream_positions(section: TrainingSpec, seq_len: int) -> int:
    """Blocks a training run reads: its steps times the global batch (the training loop's
    own step count, for the whole global batch as one worker's)."""
    steps = TrainSettings(tokens=section.tokens, batch_size=section.global_batch_size).steps(seq_len, world_size=1)
    return steps * section.global_batch_size


def _plan_budget(dag: _Builder, spec: FamilySpec, source: Source, teacher_config, student: StudentSpec, data: str,
                 trains: dict, serving: ServingMeasurements) -> PlannedStudent:
    """A serving budget (builder.pruning.budgets): every candidate shape of the search, and the
    teacher's shape, measured by a measure-serving stage of its own (no inputs: its hash is the
    shape, the workload and the hardware, so every family shares it). Until all have run, the
    plan searches over every candidate (what the dry run shows, "not yet measured"), and the
    build runs the measurements first and plans again; then the search is over the candidates
    that meet the budget, and a budget none meets is a spec problem (builder.planning.validate)."""
    found = tuple(budget_candidates(source.config, student, spec.search))
    teacher_stage = _measure(dag, spec, teacher_config, serving)
    stages = tuple(_measure(dag, spec, student_config(source.config, c.shape), serving) for c in found)
    summaries = [serving.summary(dag.stages[stage_id].key) for stage_id in (teacher_stage, *stages)]
    costs, teacher_cost, feasible = None, None, found
    if None not in summaries:
        teacher_cost, *measured = (ServingCost.of(summary, summaries[0]) for summary in summaries)
        costs = tuple(measured)
        feasible = tuple(c for c, cost in zip(found, costs) if meets(student.budget, cost))
    configs = [teacher_config] + [student_config(source.config, c.shape) for c in found]
    memory = tuple(serving_memory(config, spec.serving)["total_bytes"] for config in configs)
    budget = BudgetPlan(found, stages, teacher_stage, costs, teacher_cost, serving.hardware, memory,
                        Shape.of(teacher_config))
    measurements = {"serving-teacher": teacher_stage} | {f"serving-{found.index(c)}": stages[found.index(c)]
                                                          for c in feasible}
    select = {"budget": student.budget.model_dump(mode="json"), "measured": [found.index(c) for c in feasible]}
    planned = _plan_search(dag, spec, source, student, data, trains, feasible, select, measurements)
    params = student.params or max((c.params for c in feasible), default=0)
    return dataclasses.replace(planned, params=params, budget=budget)


def _measure(dag: _Builder, spec: FamilySpec, config, serving: ServingMeasurements) -> str:
    """A shape's measure-serving stage, labelled by its shape alone (one folder for every family)."""
    label = Candidate(Shape.of(config), 0).tag
    return dag.add_key(stage_key("measure-serving", label, {"config": measured_config(config),
                                                            "serving": spec.serving.model_dump(mode="json")},
                                 options={"hardware": serving.hardware}))


def _plan_search(dag: _Builder, spec: FamilySpec, source: Source, student: StudentSpec, data: str,
                 trains: dict, found: tuple[Candidate, ...] | None = None, select: dict | None = None,
                 measurements: dict[str, str] | None = None) -> PlannedStudent:
    """Architecture search (builder.pruning.search): each candidate is pruned, lightly distilled and
    scored on held-out loss by stages of its own (so Ray runs candidates side by side and a
    killed search resumes per candidate); `select` keeps the best, which distills on. A serving
    budget gives its own `found` (those that meet it), the select stage's `select` settings and
    its `measurements` (role -> measure-serving stage), which select records beside each candidate."""
    found = tuple(candidates(source.config, student.params, spec.search)) if found is None else found
    light_training = spec.search_training(student)
    ranking = EvaluationSpec(perplexity_tokens=spec.search.heldout_tokens, batch_size=spec.evaluation.batch_size)
    roles: dict[str, str] = {}
    for index, candidate in enumerate(found):
        label = f"{student.name}.{candidate.tag}"
        pruned = dag.add("prune", label, prune_config(candidate.shape, student.depth_method),
                         {TEACHER: source.model, "scores": source.scores})
        trained = dag.add("distill", label, light_training, _distill_inputs(light_training, source, pruned, data),
                          options=_if_trained(light_training, trains))
        ranked = dag.add("evaluate", label, ranking, {"model": trained, "data": data}, options=trains)
        roles |= {f"pruned-{index}": pruned, f"trained-{index}": trained, f"ranked-{index}": ranked}
    select_config = {"params": student.params, "candidates": [c.tag for c in found]} | (select or {})
    chosen = dag.add("select", student.name, select_config, roles | (measurements or {}), student=student.name)
    distilled = _add_distill(dag, spec, student, source, chosen, data, trains)
    return PlannedStudent(student, None, student.params, distilled, found, chosen)

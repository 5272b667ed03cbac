"""The family report: report.json (one typed contract, builder/report/records.py), report.md
and one model card per student, all derived from finished stages' manifests (nothing
recomputed).

A report never replaces a better one: when the family folder holds a complete report, an
incomplete one (a failed or partial build, `report` on a spec never built here) is not
written over it, and no student's complete card is replaced by an incomplete one. With no
finished stage at all there is nothing to report (`NothingToReport`).
"""
from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from builder.options.precision import Precision
from builder.planning.dag import TEACHER, Plan, variant_label
from builder.planning.reuse import current_finishes
from builder.report.family_view import first_reason, record_view, view_precision, view_turn
from builder.report.gates import judged
from builder.spec.chains import chain
from builder.report.records import (BuildRecord, Candidate, Distillation, FamilyReport, Lineage, ModelRecord,
                                    Perplexity, Pruning, SearchRecord, StageCost, StageHardware, StudentRecord,
                                    TaskResult, TeacherRecord, Throughput, TrainingLayout, VariantRecord, difference,
                                    format_perplexity, format_score, format_speedup, hardware_text, layouts_text,
                                    perplexity_difference, precision_text, read_completeness)
from builder.spec.schema import FamilySpec, StudentSpec
from builder.store.stage_store import Manifest, StageStore, write_text_atomic
from builder.units import format_bytes, format_count
from builder.stages.measure_serving import describe_serving
from evaluators.throughput import add_ratios, describe_hardware
from publish.portable import portable_spec_yaml

log = logging.getLogger(__name__)
REPORT_JSON, REPORT_MD, PLOTS, STUDENTS = "report.json", "report.md", "plots", "students"


class NothingToReport(RuntimeError):
    """No stage of the plan has finished: a report would describe work that never happened."""


@dataclass(frozen=True)
class ReportOutcome:
    report: FamilyReport  # this build's report, written or not
    path: Path  # report.json in the family folder
    written: bool  # False: a complete report was there and this one is incomplete
    note: str  # one line for the user: what was written or kept, and why


def stage_cost(manifest: Manifest | None, flops_per_token: float = 0.0) -> StageCost | None:
    if manifest is None:
        return None
    return StageCost(tokens=manifest.tokens, wall_s=round(manifest.wall_s, 2),
                     flops=flops_per_token * manifest.tokens, path=manifest.path,
                     before_workers_s=_before_workers(manifest), hardware=_hardware(manifest))


def _hardware(manifest: Manifest | None) -> StageHardware | None:
    """Where the stage computed, as its manifest recorded it (never the machine writing the report)."""
    return StageHardware.from_placement(manifest.summary.get("placement")) if manifest else None


def _before_workers(manifest: Manifest) -> float | None:
    starts = [node["started_at"] for node in manifest.summary.get("train_nodes") or [] if "started_at" in node]
    if not starts:
        return None
    return round(min(starts) - (manifest.finished_at - manifest.wall_s), 2)


# -- evaluation and throughput, from the stages' summaries ----------------------------------------
def _tasks(manifest: Manifest | None) -> dict[str, TaskResult]:
    if manifest is None:
        return {}
    tasks = (manifest.summary.get("metrics") or {}).get("tasks", {})
    return {name: TaskResult.from_lm_eval(task) for name, task in tasks.items()}


def _perplexity(manifest: Manifest | None) -> Perplexity | None:
    found = manifest.summary.get("perplexity") if manifest else None
    if not found:
        return None
    return Perplexity(**{key: found.get(key) for key in ("perplexity", "nll", "nll_stderr", "tokens", "blocks")})


def throughput_record(result: dict) -> Throughput:
    """One model's result from `evaluators.throughput.measure_throughput`, made portable:
    the hardware in words, the engine arguments without the local model path."""
    load = result.get("load") or {}
    return Throughput(
        **{key: result.get(key) for key in ("output_tokens_per_s", "output_tokens_per_s_std", "passes", "num_prompts",
                                            "output_tokens", "ratio_to_teacher", "ratio_to_teacher_std", "ratio_note",
                                            "error")},
        cpu_per_wall=load.get("cpu_per_wall"), cores_given=load.get("cores_given"),
        load_avg_1m=load.get("load_avg_1m_max"), contended=load.get("contended"),
        contention_note=load.get("note"),
        hardware=describe_hardware(result["hardware"]) if result.get("hardware") else None,
        engine=result.get("vllm_version"),
        engine_args={k: v for k, v in (result.get("engine_args") or {}).items() if k != "model"},
    )


def _throughput(plan: Plan, manifests: dict, failures: dict, name: str) -> Throughput | None:
    if plan.throughput_stage is None:
        return None
    if plan.throughput_stage in failures:
        return Throughput(error=failures[plan.throughput_stage].strip().splitlines()[-1])
    manifest = manifests.get(plan.throughput_stage)
    found = manifest.summary["results"].get(name) if manifest else None
    return throughput_record(found) if found else None


def variant_record(plan: Plan, manifests: dict, failures: dict, member: str, scheme: str) -> VariantRecord:
    """A variant beside its member: its quantize stage's files and sizes, its evaluate stage's
    scores (in vLLM), its speed from the family's throughput run as a ratio to its member's."""
    label, made_id = variant_label(member, scheme), plan.variant_stages[(member, scheme)]
    eval_id = plan.variant_eval_stages[(member, scheme)]
    made, evaluation = manifests.get(made_id), manifests.get(eval_id)
    summary = made.summary if made else {}
    engine = (evaluation.summary.get("engine") or {}).get("vllm_version") if evaluation else None
    return VariantRecord(name=label, member=member, scheme=scheme, path=summary.get("model_dir"),
                         params=_params_of(plan, member), settings=summary.get("settings") or {},
                         bytes=summary.get("bytes"), member_bytes=summary.get("source_bytes"),
                         tasks=_tasks(evaluation), perplexity=_perplexity(evaluation),
                         evaluation_error=failures.get(eval_id), engine=engine, serving=summary.get("serving"),
                         error=failures.get(made_id), throughput=_variant_throughput(plan, manifests, failures,
                                                                                     member, label))


def _variant_throughput(plan: Plan, manifests: dict, failures: dict, member: str, label: str) -> Throughput | None:
    """The variant's measurement, its ratios to its member's (the same run, the same prompts)."""
    found = _throughput(plan, manifests, failures, label)
    if found is None or found.error:
        return found
    results = manifests[plan.throughput_stage].summary["results"]
    unratioed = {name: {key: value for key, value in results.get(name, {}).items() if not key.startswith("ratio")}
                 for name in (member, label)}
    return throughput_record(add_ratios(unratioed, teacher=member)[label])


def _model_fields(plan: Plan, manifests: dict, failures: dict, name: str, model_stage: str) -> dict:
    model, evaluation = manifests.get(model_stage), manifests.get(plan.eval_stages[name])
    return {"name": name, "path": model.summary.get("model_dir") if model else None,
            "tasks": _tasks(evaluation), "perplexity": _perplexity(evaluation),
            "evaluation_error": failures.get(plan.eval_stages[name]),
            "throughput": _throughput(plan, manifests, failures, name)}


def _find(plan: Plan, manifests: dict, stage_name: str, student: str | None = None) -> Manifest | None:
    for stage_id, stage in plan.stages.items():
        if stage.name == stage_name and stage.student == student:
            return manifests.get(stage_id)
    return None


# -- the teacher ----------------------------------------------------------------------------------
def teacher_record(plan: Plan, manifests: dict, failures: dict) -> TeacherRecord:
    spec, n = plan.spec.teacher, plan.teacher_params
    acquired = manifests.get(plan.original_teacher_stage)
    corrected = plan.teacher_stage != plan.original_teacher_stage
    scores = _find(plan, manifests, "score")
    return TeacherRecord(
        **_model_fields(plan, manifests, failures, TEACHER, plan.teacher_stage),
        source=spec.source, local_source=spec.reference.kind == "path",
        repo_id=(acquired.summary.get("repo_id") if acquired else None) or spec.repo_id,
        license=(acquired.summary.get("license") if acquired else None) or spec.license,
        params=n, shape=plan.teacher_shape.as_dict(), corrected=corrected,
        stages={"acquire-teacher": stage_cost(acquired),
                "correct": stage_cost(manifests.get(plan.teacher_stage), 6 * n) if corrected else None,
                "score": stage_cost(scores, 2 * n)} | _parent_score_costs(plan, manifests) | _teach_costs(plan, manifests),
        block_importance=scores.summary.get("block_importance") if scores else None,
    )


def _parent_score_costs(plan: Plan, manifests: dict) -> dict[str, StageCost | None]:
    """Each chained members' parent scored once more, for the cuts of its children."""
    scored = {stage_id: plan.taught_by(stage_id) for stage_id, stage in plan.stages.items() if stage.name == "score"}
    return {f"score {parent}": stage_cost(manifests.get(stage_id), 2 * _params_of(plan, parent))
            for stage_id, parent in scored.items() if parent != TEACHER}


def _teach_costs(plan: Plan, manifests: dict) -> dict[str, StageCost | None]:
    """Each stored teacher signal: the teacher's forward pass once, shared by its readers."""
    return {_teach_title(plan, stage_id): stage_cost(manifests.get(stage_id), 2 * _params_of(plan, plan.taught_by(stage_id)))
            for stage_id in plan.teach_stages}


def _teach_title(plan: Plan, stage_id: str) -> str:
    """`teach (top-32, 8 draws)`; a chained member's parent's pass names the parent."""
    config, model = plan.stages[stage_id].key.config, plan.taught_by(stage_id)
    drawn = f", {config['tail_samples']} draws" if config["tail_samples"] else ""
    return f"teach{'' if model == TEACHER else ' ' + model} (top-{config['top_k']}{drawn})"


# -- the students -----------------------------------------------------------------------------------
def student_repo_id(spec: FamilySpec, student: StudentSpec) -> str | None:
    """The student's Hub repo: its own repo_id, else publish.org/NAME; None without an owner."""
    if student.repo_id:
        return student.repo_id
    return f"{spec.publish.org}/{student.name}" if spec.publish.org else None


def student_record(plan: Plan, manifests: dict, failures: dict, planned, teacher: TeacherRecord) -> StudentRecord:
    name = planned.spec.name
    # A searched student's shape is the one its `select` stage chose (unknown until then).
    pruned = manifests.get(planned.select_stage) if planned.searched else _find(plan, manifests, "prune", name)
    shape = planned.shape.as_dict() if planned.shape else (pruned.summary["shape"] if pruned else None)
    params = pruned.summary["params"] if planned.searched and pruned else planned.params
    distilled = manifests.get(planned.final_stage)
    return StudentRecord(
        **_model_fields(plan, manifests, failures, name, planned.final_stage),
        params=params, shape=shape, repo_id=student_repo_id(plan.spec, planned.spec),
        why=_why(plan, planned, manifests),
        lineage=Lineage(parent=planned.parent, chain=chain(plan.spec.parents, name)[:-1],
                        correction=teacher.stages["correct"], pruning=_pruning(plan, manifests, planned, pruned, shape),
                        distillation=_distillation(plan, planned, distilled)),
        stages={"prune": stage_cost(pruned), "distill": stage_cost(distilled, _distill_flops(plan, planned, params)),
                "evaluate": stage_cost(manifests.get(plan.eval_stages[name]), 2 * params)},
        complete=all(manifests.get(stage_id) for stage_id in _student_stages(plan, planned)),
    )


def _student_stages(plan: Plan, planned) -> list[str]:
    stages = [planned.final_stage, plan.eval_stages[planned.spec.name], planned.select_stage, plan.throughput_stage]
    return [stage_id for stage_id in stages if stage_id]


def _pruning(plan: Plan, manifests: dict, planned, pruned: Manifest | None, shape: dict | None) -> Pruning:
    source = plan.student(planned.parent).shape if planned.parent else plan.teacher_shape  # what it was cut from
    source_shape = source.as_dict()
    axes = {axis: (source_shape[axis], value) for axis, value in (shape or {}).items() if value != source_shape[axis]}
    return Pruning(axes=axes, depth_method=planned.spec.depth_method if "num_hidden_layers" in axes else None,
                   layers_kept=pruned.summary.get("layers_kept") if pruned else None,
                   calibration_samples=plan.spec.scoring.samples if axes else None,
                   search=search_record(plan, manifests, planned) if planned.searched else None)


def _distill_flops(plan: Plan, planned, params: int) -> float:
    """Per token: the student's forward and backward, plus the teacher's forward unless a
    teach stage ran it (then it is in that shared stage)."""
    stored = plan.spec.distill_for(planned.spec).stored_signal
    return 6 * params + (0 if stored else 2 * _params_of(plan, planned.parent))


def _params_of(plan: Plan, name: str | None) -> int:
    """The teacher's parameters, or (a chained member's parent) a student's."""
    return plan.student(name).params if name and name != TEACHER else plan.teacher_params


def _distillation(plan: Plan, planned, distilled: Manifest | None) -> Distillation:
    section = plan.spec.distill_for(planned.spec)
    summary = distilled.summary if distilled else {}
    return Distillation(tokens=distilled.tokens if distilled else None, steps=summary.get("steps"),
                        loss=section.loss, temperature=section.temperature, final_loss=summary.get("final_loss"),
                        loss_curve=summary.get("metrics_file"),
                        teacher_signal="topk" if section.stored_signal else "online",
                        top_k=section.top_k if section.stored_signal else None,
                        tail_samples=section.tail_samples if section.stored_signal else None,
                        layouts=[TrainingLayout(**layout) for layout in summary.get("layouts", [])],
                        stored_dtype=summary.get("stored_dtype"))


def _why(plan: Plan, planned, manifests: dict) -> str | None:
    """The spec's reason for the shape; for a searched student, also how the search chose it."""
    selected = manifests.get(planned.select_stage) if planned.searched else None
    why = " ".join(planned.spec.why.split()) if planned.spec.why else None
    if selected is None:
        return why
    found = len(selected.summary["candidates"])
    chosen = selected.summary["candidates"][selected.summary["chosen"]]
    near = f"near {format_count(planned.params)} parameters"
    if planned.spec.budget is not None:  # a serving budget: the candidates that met it (docs/serving-budgets.md)
        budget = f"that met its serving budget ({planned.spec.budget.describe()})"
        near = f"{near} {budget}" if planned.spec.params else budget
    search = (f"Chosen by architecture search: of {found} candidate shapes {near}, each pruned and distilled on "
              f"{format_count(chosen['tokens'])} tokens, this one had the lowest held-out loss "
              f"({chosen['heldout_loss']:.3f}).")
    if "serving" in chosen:
        search += " " + _budget_met(plan, planned, chosen["serving"]["margins"])
    return f"{why} {search}" if why else search


def _budget_met(plan: Plan, planned, margins: dict[str, float]) -> str:
    """The workload and hardware the serving budget holds for, and the chosen shape's margin on
    each limit, as measured (0.12: 12% better than the limit)."""
    room = ", ".join(f"{name} by {margin:+.0%}" for name, margin in margins.items())
    return (f"The budget holds for {describe_serving(plan.spec.serving, planned.budget.hardware)}; "
            f"measured, this shape meets it with a margin of {room}.")


def search_record(plan: Plan, manifests: dict, planned) -> SearchRecord:
    """The architecture search as run: every candidate, its held-out loss, the choice."""
    search = plan.spec.search
    selected = manifests.get(planned.select_stage)
    results = selected.summary["candidates"] if selected else [{} for _ in planned.candidates]
    candidates = [Candidate(tag=c.tag, shape=c.shape.as_dict(), params=c.params,
                            heldout_loss=result.get("heldout_loss"), train_loss=result.get("train_loss"))
                  for c, result in zip(planned.candidates, results)]
    return SearchRecord(budget=planned.params, tolerance=search.tolerance, tokens_per_candidate=search.tokens,
                        heldout_tokens=search.heldout_tokens, candidates=candidates,
                        chosen=selected.summary["chosen"] if selected else None)


# -- the family ----------------------------------------------------------------------------------
def _local_references(spec: FamilySpec, spec_text: str) -> dict[str, str]:
    """The spec's local paths and what each is, for the portable spec: as written in the
    text (often relative) and as resolved (absolute), so either spelling is replaced."""
    import yaml

    written = yaml.safe_load(spec_text) or {}
    found = {}
    for section, what in (("teacher", "the teacher checkpoint"), ("data", "the training data")):
        if getattr(spec, section).reference.kind == "path":
            raw = (written.get(section) or {}).get("source")
            found |= {path: what for path in (raw, getattr(spec, section).source) if isinstance(path, str)}
    return found


def collect_report(plan: Plan, store: StageStore, spec_text: str, failures: dict[str, str],
                   skipped: dict[str, str] | None = None) -> FamilyReport:
    manifests = current_finishes(plan, store)  # never a result of weights that are gone or were redone since
    teacher = teacher_record(plan, manifests, failures)
    original = None
    if plan.teacher_stage != plan.original_teacher_stage:
        original = ModelRecord(**_model_fields(plan, manifests, failures, "teacher-original",
                                               plan.original_teacher_stage))
    spec = plan.spec
    report = FamilyReport(
        family=spec.family, build=build_record(plan, manifests), description=spec.description, teacher=teacher,
        teacher_original=original,
        students=[student_record(plan, manifests, failures, planned, teacher) for planned in plan.students],
        # the compressed-tensors variants (evaluated in vLLM); GGUF files are in their own
        # stages' manifests, not yet in the report (issue 24)
        variants=[variant_record(plan, manifests, failures, *key) for key in plan.variant_eval_stages],
        hardware=hardware_text([_hardware(manifest) for manifest in manifests.values()]), spec_yaml=spec_text,
        portable_spec_yaml=portable_spec_yaml(spec_text, _local_references(spec, spec_text)),
        data_source="a local corpus" if spec.data.reference.kind == "path" else spec.data.source,
        license=spec.publish.license or teacher.license, publish=spec.publish,
        failures=failures, skipped=skipped or {},
        missing=[stage_id for stage_id, manifest in manifests.items() if manifest is None],
        complete=all(manifests.values()),
    )
    return judged(report, spec)  # from the same records report.md, the cards and `publish` read


def build_record(plan: Plan, manifests: dict[str, Manifest | None]) -> BuildRecord:
    finished = [manifest.finished_at for manifest in manifests.values() if manifest and manifest.finished_at]
    return BuildRecord(precision=plan.precision.dtype, precision_reason=first_reason(plan.precision),
                       finished_at=max(finished, default=None))


# -- writing, never over a better report ---------------------------------------------------------
def write_report_files(plan: Plan, store: StageStore, family_dir: Path, spec_text: str,
                       failures: dict[str, str], skipped: dict[str, str] | None = None,
                       estimate: dict | None = None) -> ReportOutcome:
    """Write report.json, report.md, plots and cards unless that would replace a complete
    report with an incomplete one; raises NothingToReport when no stage has finished.
    `estimate`: the dry run's cost estimate (builder.planning.estimate), kept beside the measurements."""
    report = collect_report(plan, store, spec_text, failures, skipped).model_copy(update={"estimate": estimate})
    if len(report.missing) == len(plan.stages):
        raise NothingToReport(f"nothing to report for {plan.spec.family!r}: none of its {len(plan.stages)} stages "
                              f"has finished in {store.root}; build it first (build-family SPEC), or pass the "
                              "--workdir it was built in")
    # One build at a time writes the view, so all of it describes one build (builder.report.family_view).
    with view_turn(family_dir):
        return _write_view(report, family_dir)


def _write_view(report: FamilyReport, family_dir: Path) -> ReportOutcome:
    path = family_dir / REPORT_JSON
    was_complete, complete_students = read_completeness(path)
    previous = view_precision(family_dir)
    if was_complete and not report.complete:
        note = _kept_note(report, path, previous)
        log.warning("%s", note)
        return ReportOutcome(report, path, False, note)
    family_dir.mkdir(parents=True, exist_ok=True)
    switched = previous is not None and previous.dtype != report.build.precision
    if switched:  # the other build's cards and plots: none may stay beside this build's report
        for folder in (family_dir / STUDENTS, family_dir / PLOTS):
            shutil.rmtree(folder, ignore_errors=True)
    # precision.json first, report.json last: a view whose two records disagree was interrupted
    # while being written, and `publish` refuses it (builder.family).
    record_view(family_dir, report.build)
    report = _write_cards(report, family_dir, keep=set() if switched else complete_students)
    report = report.model_copy(update={"plots": draw_plots(report, family_dir / PLOTS)})
    report.save(path)
    write_text_atomic(family_dir / REPORT_MD, render_markdown(report, family_dir))
    state = "complete" if report.complete else f"incomplete, {len(report.missing)} stage(s) missing"
    replaced = f"; it replaces the view of the {previous.dtype} build" if switched else ""
    return ReportOutcome(report, path, True,
                         f"wrote {family_dir / REPORT_MD} ({state}) of {report.build.describe()}{replaced}")


def _kept_note(report: FamilyReport, path: Path, previous: Precision | None) -> str:
    kept = f" of the {previous.dtype} build" if previous else ""
    return (f"kept the complete report {path}{kept}: this one, of {report.build.describe()}, is incomplete "
            f"({len(report.missing)} stage(s) missing: {', '.join(report.missing)}), so it was not written")


def _write_cards(report: FamilyReport, family_dir: Path, keep: set[str]) -> FamilyReport:
    """A card for each student with a checkpoint, except where a complete card would be
    replaced by an incomplete one; a student never built gets none (it has no story yet)."""
    students = []
    for student in report.students:
        folder = family_dir / STUDENTS / student.name
        if student.path and (student.complete or student.name not in keep):
            write_card(report, student, folder)
        card = folder / "README.md"
        students.append(student.model_copy(update={"card": str(card) if card.is_file() else None}))
    return report.model_copy(update={"students": students})


def write_card(report: FamilyReport, student: StudentRecord, folder: Path) -> Path:
    # huggingface_hub (through publish.card): only when cards are written
    from publish.card import render_card

    # atomic: a full disk leaves the card before or none, never half a card
    write_text_atomic(folder / "README.md", render_card(report, student.name))
    write_text_atomic(folder / "spec.yaml", report.spec_yaml)
    return folder / "README.md"


def draw_plots(report: FamilyReport, folder: Path) -> dict[str, str]:
    # matplotlib: only when plots are drawn
    from builder.report import plots

    drawn = {
        "accuracy vs parameters": plots.accuracy_vs(report, plots.params_of, "parameters",
                                                    folder / "accuracy_vs_params.png"),
        "accuracy vs throughput": plots.accuracy_vs(report, plots.throughput_of, "vLLM output tokens/s",
                                                    folder / "accuracy_vs_throughput.png", variants=True),
        "accuracy vs size on disk": plots.accuracy_vs(report, plots.bytes_on_disk(report), "bytes on disk",
                                                      folder / "accuracy_vs_size.png", variants=True),
        "distillation loss": plots.loss_curves(report, folder / "distillation_loss.png"),
        "layer importance": plots.importance_profile(report.teacher.block_importance,
                                                     folder / "layer_importance.png"),
    }
    return {title: str(path) for title, path in drawn.items() if path is not None}


# -- report.md ---------------------------------------------------------------------------------------
def _task_names(report: FamilyReport) -> list[str]:
    names: list[str] = []
    for record in [report.teacher, *report.students]:
        names += [n for n in record.tasks if n not in names]
    return names


def _where_stages_ran(report: FamilyReport) -> list[str]:
    """Each computing stage's hardware, dtype, peak GPU memory and node, from its manifest."""
    rows = [(f"{name} ({model.name})", cost.hardware) for model in [report.teacher, *report.students]
            for name, cost in model.stages.items() if cost and cost.hardware]
    if not rows:
        return []
    lines = ["", "## Where the stages ran", "", "| stage | hardware, dtype, peak GPU memory | node |", "|---|---|---|"]
    return lines + [f"| {stage} | {hardware.text(with_node=False)} | {hardware.where() or '?'} |"
                    for stage, hardware in rows]


def render_markdown(report: FamilyReport, family_dir: Path) -> str:
    tasks = _task_names(report)
    teacher = report.teacher
    models = [m for m in (report.teacher_original, teacher, *report.students) if m]
    header = ["model", "params", *tasks, "perplexity", "output tok/s", "speed-up"]
    description = [report.description.strip(), ""] if report.description.strip() else []
    lines = [f"# {report.family}", "", *_incomplete_notice(report), *description, *_build_line(report),
             f"Teacher `{teacher.source}`; measured on {report.hardware}. Scores are lm-eval's (acc_norm where the "
             "task has it, else acc) ± one standard error; a student's Δ is against the teacher it was distilled "
             "from, and a Δ within two standard errors is marked *noise*.", "",
             *_examples_line(report, tasks),
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_row(model, teacher, tasks)) + " |" for model in models]
    lines += _gate_section(report)
    lines += _variant_section(report, tasks)
    lines += _throughput_notes(models)
    lines += _layout_notes(report)
    lines += _chain_notes(report)
    lines += _where_stages_ran(report)
    lines += _search_sections(report)
    lines += _problems(report)
    if report.plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{title}]({Path(path).relative_to(family_dir)})" for title, path in report.plots.items()]
    lines += ["", "Machine-readable: `report.json`. Model cards: `students/<name>/README.md`.", ""]
    return "\n".join(lines)


def _build_line(report: FamilyReport) -> list[str]:
    return [f"This report is of {report.build.describe()}; training precision: "
            f"{precision_text(report.build.precision)}.", ""]


def _incomplete_notice(report: FamilyReport) -> list[str]:
    if report.complete:
        return []
    why = [f"`{stage}` ({_missing_reason(report, stage)})" for stage in report.missing]
    return [f"> **Incomplete:** {len(report.missing)} stage(s) have no result, so the numbers below are partial: "
            + ", ".join(why) + ". Rerun the build to finish them.", ""]


def _missing_reason(report: FamilyReport, stage: str) -> str:
    if stage in report.failures:
        return "failed: " + report.failures[stage].strip().splitlines()[-1]
    if stage in report.skipped:
        return "skipped: " + report.skipped[stage]
    return "not run"


def _examples_line(report: FamilyReport, tasks: list[str]) -> list[str]:
    counts = {}
    for task in tasks:
        found = next((m.tasks[task] for m in (report.teacher, *report.students) if task in m.tasks), None)
        counts[task] = found.examples if found else "?"
    perplexity = next((m.perplexity for m in (report.teacher, *report.students) if m.perplexity), None)
    if perplexity and perplexity.tokens:
        counts["perplexity"] = f"{format_count(perplexity.tokens)} held-out tokens in {perplexity.blocks} blocks"
    if not counts:
        return []
    return ["Examples: " + "; ".join(f"{task} {text}" for task, text in counts.items()) + ".", ""]


def _row(model: ModelRecord, teacher: TeacherRecord, tasks: list[str]) -> list[str]:
    cells = [model.name, format_count(model.params or teacher.params)]
    is_student = isinstance(model, StudentRecord)
    cells += _score_cells(model, teacher if is_student else None, tasks)
    throughput = model.throughput
    rate = throughput.rate if throughput else None
    speedup = format_speedup(throughput) if is_student else "1.00× (reference)"
    cells += [f"{rate.value:.0f} ± {rate.stderr or 0:.0f}" if rate else "-",
              speedup if throughput and throughput.speedup else "-"]
    return cells


def _score_cells(model: ModelRecord, base: ModelRecord | None, tasks: list[str]) -> list[str]:
    """Each task's headline score ± SE, then the perplexity with its interval; with `base`, each
    with its Δ against base's (*noise* within two standard errors)."""
    cells = []
    for task in tasks:
        result, reference = model.tasks.get(task), base.tasks.get(task) if base else None
        score = result.score(result.headline) if result and result.headline else None
        cell = format_score(score)
        base_score = reference.score(reference.headline) if reference and reference.headline else None
        if score and base_score:
            diff = difference(score, base_score)
            cell += " (Δ noise)" if diff.noise else (f" (Δ {diff.value:+.3f})" if diff.noise is False else "")
        cells.append(cell if score else "-")
    perplexity = format_perplexity(model.perplexity) if model.perplexity else "-"
    if base and model.perplexity and base.perplexity:
        delta = perplexity_difference(model.perplexity, base.perplexity)
        perplexity += " (Δ noise)" if delta.startswith("noise") else f" (Δ {delta})"
    return cells + [perplexity]


def _variant_section(report: FamilyReport, tasks: list[str]) -> list[str]:
    """Each quantized variant beside its member: size on disk, scores and perplexity with their
    Δ against the member's, and the speed-up over the member in the same throughput run."""
    if not report.variants:
        return []
    members = {model.name: model for model in (report.teacher, *report.students)}
    engines = sorted({variant.engine for variant in report.variants if variant.engine})
    header = ["variant", "size on disk", *tasks, "perplexity", "speed-up over its member"]
    lines = ["", "## Quantized variants", "",
             f"Each variant is evaluated in the engine that serves it ({', '.join(engines) or 'vLLM'}) on the same "
             "tasks and held-out blocks as its member, the model it was made from (evaluated in transformers); each "
             "Δ is against that member, *noise* within two standard errors. Its speed-up is its output tokens/s "
             "over its member's in the same throughput run, at the same workload.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for variant in report.variants:
        member = members.get(variant.member)
        size = (f"{format_bytes(variant.bytes)} ({variant.size_ratio:.2f}× of {format_bytes(variant.member_bytes)})"
                if variant.size_ratio else "-")
        throughput = variant.throughput
        speedup = format_speedup(throughput) if throughput and throughput.speedup else (
            "failed" if throughput and throughput.error else "-")
        cells = [f"{variant.member} {variant.scheme}", size, *_score_cells(variant, member, tasks), speedup]
        lines.append("| " + " | ".join(cells) + " |")
    for variant in report.variants:
        for what, error in (("made", variant.error), ("evaluated", variant.evaluation_error)):
            if error:
                lines.append(f"\n{variant.member} {variant.scheme} could not be {what}: "
                             f"{error.strip().splitlines()[-1]}")
        if variant.serving:
            lines.append(f"\n{variant.member} {variant.scheme}: {variant.serving}")
    return lines


def _gate_section(report: FamilyReport) -> list[str]:
    """Each gated student's verdict with its numbers: a failed one is not published."""
    gated = [student for student in report.students if student.gates]
    if not gated:
        return []
    lines = ["", "## Quality gates", "", "Each ratio is the student's over the family's teacher's (a chained member's too). "
             "A student that fails a gate is not published.", ""]
    for student in gated:
        verdict = "**FAILED**" if student.gated_out else "passed"
        lines.append(f"- `{student.name}` {verdict}: " + "; ".join(check.text() for check in student.gates))
    return lines


def _throughput_notes(models: list[ModelRecord]) -> list[str]:
    measured = [m for m in models if m.throughput and m.throughput.rate]
    if not measured:
        return []
    first = measured[0].throughput
    lines = ["", f"Throughput: mean ± standard deviation over {first.passes or 1} timed pass(es) after a warm-up, "
                 f"{first.hardware or 'hardware not recorded'}."]
    contended = [f"{m.name} ({m.throughput.contention_note or 'contended'})" for m in measured if m.throughput.contended]
    if contended:
        lines.append("**Contended:** other work competed for the cores while measuring " + "; ".join(contended)
                     + ". Treat those numbers and their speed-ups as lower bounds; measure again on a quiet machine.")
    return lines


def _layout_notes(report: FamilyReport) -> list[str]:
    """Which batch layout distilled each student: another layout gives weights equal only up to
    the order of float sums (builder.training.layouts), so the report says which made these."""
    trained = [(s.name, s.lineage.distillation.layouts) for s in report.students if s.lineage.distillation.layouts]
    if not trained:
        return []
    return ["", "Distilled " + "; ".join(f"`{name}` {layouts_text(layouts)}" for name, layouts in trained)
            + ". Another worker count or micro-batch takes the same steps over the same data but sums in another "
            "order, whose rounding stays small in float32 and shows in bfloat16 weights."]


def _chain_notes(report: FamilyReport) -> list[str]:
    """Chained members: a Δ in the table is against the family's teacher, not the parent."""
    notes = [f"- `{s.name}` is a chained member: pruned from `{s.lineage.parent}`'s distilled weights and taught by "
             f"it ({' -> '.join(['teacher', *s.lineage.chain, s.name])})" for s in report.students if s.lineage.parent]
    return ["", *notes] if notes else []


def _problems(report: FamilyReport) -> list[str]:
    if not report.failures and not report.skipped:
        return []
    lines = ["", "## Problems", ""]
    lines += [f"- `{stage}`: {error.strip().splitlines()[-1]}" for stage, error in report.failures.items()]
    lines += [f"- `{stage}` skipped: {why}" for stage, why in report.skipped.items()]
    return lines


def _search_sections(report: FamilyReport) -> list[str]:
    lines = []
    for student in report.students:
        search = student.lineage.pruning.search
        if not search:
            continue
        lines += ["", f"## Architecture search: {student.name}", "",
                  f"{len(search.candidates)} candidates within {search.tolerance:.0%} of "
                  f"{format_count(search.budget)} parameters, each distilled "
                  f"{format_count(search.tokens_per_candidate)} tokens, ranked on "
                  f"{format_count(search.heldout_tokens)} held-out tokens; the lowest loss continues.", "",
                  "| # | params | layers | hidden | heads/kv | MLP | held-out loss | |", "|---" * 8 + "|"]
        for index, candidate in enumerate(search.candidates):
            shape, loss = candidate.shape, candidate.heldout_loss
            lines.append(
                f"| {index} | {format_count(candidate.params)} | {shape['num_hidden_layers']} | "
                f"{shape['hidden_size']} | {shape['num_attention_heads']}/{shape['num_key_value_heads']} | "
                f"{shape['intermediate_size']} | {'-' if loss is None else f'{loss:.4f}'} | "
                f"{'chosen' if search.chosen == index else ''} |")
    return lines


# -- the end-of-build table (the console prints it) -------------------------------------------------
def family_table(report: FamilyReport) -> tuple[list[str], list[list[str]]]:
    """(header, rows): each model's params, headline scores ± SE, perplexity, speed-up, and
    where its weights and card are; the same wording as report.md and the cards."""
    tasks = _task_names(report)
    header = ["model", "params", *tasks, "perplexity", "speed-up", "weights", "card"]
    rows = []
    for model in (report.teacher, *report.students):
        scores = [format_score(model.tasks[t].score(model.tasks[t].headline))
                  if t in model.tasks and model.tasks[t].headline else "-" for t in tasks]
        speedup = format_speedup(model.throughput) if isinstance(model, StudentRecord) else "1.00×"
        rows.append([model.name, format_count(model.params or 0), *scores, format_perplexity(model.perplexity),
                     speedup if model.throughput and model.throughput.speedup else "-", model.path or "-",
                     getattr(model, "card", None) or "-"])
    return header, rows

"""The user-facing verbs: plan, build, report and publish one family.

    spec file --load/validate--> FamilySpec --make_plan--> Plan --run_plan (Ray)--> stages
    on disk --write_family_view--> runs/<family>/{report.json, report.md, precision.json, students/*/README.md}
"""
from __future__ import annotations

import dataclasses
import logging
import shutil
import sys
from pathlib import Path

from builder.models.teacher import read_teacher_config
from builder.spec.batching import batch_problems
from builder.options.run_options import RunOptions
from builder.planning.dag import Plan, ServingMeasurements, make_plan, teacher_acquire_key
from builder.options.precision import Precision, machine_signature
from builder.planning.reuse import decide, stages_to_rebuild
from builder.planning.verify import verify_stages, verify_summary
from builder.spec.schema import FamilySpec
from builder.store.stage_store import StageStore
from builder.planning.validate import (budget_problems, check_against_teacher, load_spec, local_source_problems,
                                       quantizer_problems)
from builder.errors import Problem, SpecError
from builder.planning.estimate import FamilyEstimate, estimate_plan, render_estimate
from builder.report.dry_run import disk_check, render_models, render_plan
from builder.report.family_report import REPORT_JSON, NothingToReport, write_report_files
from builder.report.family_view import started_precision, started_serving_hardware, view_precision, write_started
from builder.report.gates import GATE_FAILED_EXIT_CODE, gated_out, judged
from builder.report.records import FamilyReport, ReportFileError
from builder.report.summary import print_summary
from builder.running.console import BuildConsole, build_header, make_console, render_status
from builder.stages.measure_serving import hardware_identity
from builder.store.disk_space import as_disk_full

log = logging.getLogger(__name__)


def family_dir(spec: FamilySpec, options: RunOptions) -> Path:
    return Path(options.workdir) / spec.family


def load_and_plan(spec_path: Path, options: RunOptions, built: bool = False, measured: bool = True) -> Plan:
    """Phase 1 and 2 validation, then the plan; raises SpecError with every problem.
    `built`: plan the build the family view describes (report, status, publish), not what this
    machine would build. `measured`: a serving budget that no measured candidate meets is a
    problem (False: the build plans its measurements first, builder.family.build).

    Local teacher and data paths are checked first (the dry run, the build and the report
    all come here), so a missing or empty one is a spec problem before anything runs."""
    spec = load_spec(spec_path)
    problems = local_source_problems(spec)
    if any(problem.field == "teacher.source" for problem in problems):
        raise SpecError(str(spec_path), problems)  # without a teacher there is no config to check
    try:
        teacher_config = planned_teacher_config(spec, spec_path, options)
    except SpecError as error:
        raise SpecError(str(spec_path), problems + error.problems) from error
    problems += check_against_teacher(spec, teacher_config) + batch_problems(spec, options.train_workers)
    problems += [] if built else quantizer_problems(spec)  # report, status, publish make no variant
    if problems:
        raise SpecError(str(spec_path), problems)
    precision = _built_precision(spec, options) if built else _build_precision(spec, options)
    plan = make_plan(spec, teacher_config, precision, serving_measurements(spec, options, built))
    problems = budget_problems(plan) if measured else []  # no measured candidate meets a budget: before any training
    if problems:
        raise SpecError(str(spec_path), problems)
    return plan


def serving_measurements(spec: FamilySpec, options: RunOptions, built: bool = False) -> ServingMeasurements | None:
    """The hardware the family is served on and the store's measurements, for serving budgets:
    this machine's, or (`built`: report, status, publish) the last build's, as the precision."""
    if not any(student.budget for student in spec.students):
        return None
    store = StageStore(options.workdir)
    hardware = (started_serving_hardware(family_dir(spec, options)) if built else None) or hardware_identity(
        options.use_gpu, options.gpus_per_stage)
    return ServingMeasurements(hardware, lambda key: manifest.summary if (manifest := store.manifest(key)) else None)


def _built_precision(spec: FamilySpec, options: RunOptions) -> Precision:
    """For `report`, `status` and `publish`: --precision when given, else the build the family
    view describes, else the last build started here (builder.report.family_view). `auto`
    resolves per machine and training stages are hashed with the result, so `report` on a
    login node must not re-resolve: it would look for stages no GPU build made."""
    if options.precision != "auto":
        return options.resolved_precision()
    folder = family_dir(spec, options)
    return view_precision(folder) or started_precision(folder) or options.resolved_precision()


def _build_precision(spec: FamilySpec, options: RunOptions) -> Precision:
    """`auto` for a build: what the last build decided on this same kind of machine, else a
    fresh decision. The CPU probe times a matmul, and on a loaded machine its answer can flip;
    a flip would change every training stage's hash and redo finished work for nothing."""
    if options.precision != "auto":
        return options.resolved_precision()
    kept = started_precision(family_dir(spec, options), machine_signature(options.use_gpu))
    return kept or options.resolved_precision()


def record_start(plan: Plan, options: RunOptions) -> None:
    """Before any stage runs: a killed build resumes with this precision, and `report` before
    the first view finds its stages."""
    serving = next((student.budget.hardware for student in plan.students if student.budget), None)
    write_started(family_dir(plan.spec, options), plan.precision, machine_signature(options.use_gpu), serving)


def planned_teacher_config(spec: FamilySpec, spec_path: Path, options: RunOptions):
    """The teacher's config a plan and its estimate are made from: the acquired teacher's when
    its stage has run, else --teacher-config, else the spec's source (the Hub); a SpecError
    saying how to plan without it when none can be read."""
    manifest = StageStore(options.workdir).manifest(teacher_acquire_key(spec))
    acquired = Path(manifest.summary["model_dir"]) if manifest else None
    try:
        return read_teacher_config(spec.teacher, acquired, options.teacher_config)
    except (OSError, ValueError, KeyError) as error:  # unreachable Hub, gated repo, missing file
        fix = ("log in to the Hub for gated repos (`hf auth login`), check the path, or pass "
               "--teacher-config PATH/config.json to plan without the teacher")
        raise SpecError(str(spec_path), [Problem("teacher.source", spec.teacher.source,
                                                 f"cannot read the teacher's config ({error}); {fix}")]) from error


def describe_plan(spec_path: Path, options: RunOptions, rebuild: tuple[str, ...] = ()) -> str:
    plan = load_and_plan(spec_path, options)
    estimate = estimate_plan(plan, planned_teacher_config(plan.spec, spec_path, options), options)
    store, redo = StageStore(options.workdir), stages_to_rebuild(plan, list(rebuild))
    return "\n".join([render_plan(plan, store, family_dir(plan.spec, options), redo), "", *render_estimate(estimate),
                      "", disk_check(estimate, decide(plan, store, redo), options.workdir).line()])


def build(spec_path: Path, options: RunOptions, publish: bool = False, rebuild: tuple[str, ...] = ()) -> int:
    """Build what is not finished; `rebuild` names stages to redo (see reuse.stages_to_rebuild)."""
    # Ray: only when a build runs
    from builder.running.runner import run_plan

    plan = load_and_plan(spec_path, options, measured=False)
    console = make_console()
    remeasure: set[str] = set()
    if any(student.budget for student in plan.students):
        remeasure = {stage_id for stage_id in stages_to_rebuild(plan, list(rebuild))
                     if plan.stages[stage_id].name == "measure-serving"}
        plan = _plan_from_measurements(console, plan, spec_path, options, remeasure)
        if plan is None:
            return 1
    redo = stages_to_rebuild(plan, list(rebuild)) - remeasure  # measured again already
    store = StageStore(options.workdir)
    # The estimate's disk figures: each stage checks its own is free before it writes.
    estimate = estimate_plan(plan, planned_teacher_config(plan.spec, spec_path, options), options)
    _announce(console, plan, store, options, redo, estimate)
    _save_spec(spec_path, family_dir(plan.spec, options))
    record_start(plan, options)
    with BuildConsole(plan, store, console, ray_log=family_dir(plan.spec, options) / "ray.log",
                      live=not options.verbose) as view:
        result = run_plan(plan, options, redo, observer=view, disk_bytes=estimate.disk_peaks())
    outcome = _family_view_after(console, plan, spec_path, options, result)
    _conclude(console, plan, options, result, outcome)
    if not result.ok:
        return 1
    # a gated-out student is refused by publishing while the others go up; the build still says so
    published = _publish_plan(plan, spec_path, options, dry_run=False, force=False) if publish else 0
    return (_gate_code(outcome.report) if outcome else 0) or published


def _plan_from_measurements(console, plan: Plan, spec_path: Path, options: RunOptions,
                            remeasure: set[str]) -> Plan | None:
    """The serving budgets' measurements first (those missing, and those --rebuild names), then
    the plan again from their numbers; a budget none meets stops here (SpecError, exit 2). None:
    a measurement failed (its error is printed)."""
    measuring = set(plan.unmeasured()) | remeasure
    if measuring and not _measure_serving(console, plan, options, measuring, remeasure).ok:
        return None
    try:
        return load_and_plan(spec_path, options)
    except SpecError:
        if measuring:
            console.print("The serving measurements are stored (the next build reuses them); no training ran.",
                          highlight=False)
        raise


def _measure_serving(console, plan: Plan, options: RunOptions, stage_ids: set[str], rebuild: set[str]):
    """The serving budgets' measurements, before anything else runs: which candidates meet a
    budget decides which are trained, and a budget none meets must fail before any training."""
    # Ray: only when a build runs
    from builder.running.runner import run_plan

    stages = {stage_id: stage for stage_id, stage in plan.stages.items() if stage_id in stage_ids}
    console.print(f"Measuring the serving cost of {len(stages)} shape(s) for the serving budgets first "
                  "(vLLM, dummy weights; builder/stages/measure_serving.py)", highlight=False)
    result = run_plan(dataclasses.replace(plan, stages=stages), options, rebuild)
    for stage_id, error in result.failures.items():
        console.print(f"{stage_id} failed:\n{error}", highlight=False)
    if not result.ok:
        console.print("Build failed before any training: a serving measurement failed (see above). Fix the cause "
                      "and run the same command again: finished measurements are reused.", highlight=False)
    return result


def _gate_code(report: FamilyReport) -> int:
    """GATE_FAILED_EXIT_CODE when a student failed its quality gate (report.md and the console say which)."""
    failed = gated_out(report)
    if not failed:
        return 0
    print(f"{len(failed)} student(s) failed a quality gate ({', '.join(s.name for s in failed)}) and will not be "
          f"published; see the report (exit code {GATE_FAILED_EXIT_CODE})", file=sys.stderr)
    return GATE_FAILED_EXIT_CODE


def _announce(console, plan: Plan, store: StageStore, options: RunOptions, redo: set[str],
              estimate: FamilyEstimate) -> None:
    """The models to build and how much is already done, and the disk they need when it is
    short; `--verbose` prints the whole plan and the disk line always."""
    decisions = decide(plan, store, redo)
    disk = disk_check(estimate, decisions, options.workdir)
    if options.verbose:
        console.print(render_plan(plan, store, family_dir(plan.spec, options), redo), highlight=False)
    else:
        console.print(build_header(plan.spec.family, decisions, options.workdir), highlight=False)
        console.print("\n".join(render_models(plan)[1:]), highlight=False)
    if options.verbose or not disk.fits:
        console.print(disk.line(), highlight=False)


def _family_view_after(console, plan: Plan, spec_path: Path, options: RunOptions, result):
    """The family view after the build. A failed build's view is a courtesy: whatever stops it
    (a full disk above all) is one line, and the build's own failure stays the message and the
    exit code. A finished build's goes up: a full disk is then the CLI's one message, exit 1."""
    try:
        return write_family_view(plan, spec_path, options, result.failures | result.optional_failures,
                                 result.skipped)
    except Exception as error:
        if result.ok:
            raise
        log.info("the family view was not written", exc_info=True)  # its traceback with --verbose
        full = as_disk_full(error, family_dir(plan.spec, options), 0, "the family view")
        reason = str(full) if full else f"{type(error).__name__}: {error}".strip().splitlines()[-1]
        console.print(f"report: not written: {reason}", highlight=False)
        return None


def _conclude(console, plan: Plan, options: RunOptions, result, outcome) -> None:
    """The family table and where things are; after a failure, what did not run."""
    if outcome is not None:
        print_summary(console, outcome.report, outcome.note)
    if result.optional_failures:
        console.print(f"{len(result.optional_failures)} optional stage(s) failed (see above); the report "
                      "leaves their numbers out", highlight=False)
    if not result.ok:
        console.print(f"Build failed: {len(result.failures)} stage(s) failed (see above), {len(result.skipped)} "
                      "skipped because an input failed. Fix the cause and run the same command again: "
                      "finished stages are reused.", highlight=False)


def status(spec_path: Path, options: RunOptions) -> str:
    """Which stages are done, running or pending, from the store alone (no Ray)."""
    plan = load_and_plan(spec_path, options, built=True)
    return render_status(plan, StageStore(options.workdir))


def verify(spec_path: Path, options: RunOptions) -> int:
    """The `verify` verb: every finished stage's files read whole against their recorded
    content digests (builder.planning.verify); 1 when any is damaged."""
    plan = load_and_plan(spec_path, options, built=True)
    results = []
    for result in verify_stages(plan, StageStore(options.workdir)):
        print(result.line(), flush=True)  # one line per stage as it is read: a large one takes minutes
        results.append(result)
    print(verify_summary(results))
    return 1 if any(result.damage for result in results) else 0


def _save_spec(spec_path: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(spec_path, out / "spec.yaml")


def write_family_view(plan: Plan, spec_path: Path, options: RunOptions, failures: dict[str, str],
                      skipped: dict[str, str] | None = None):
    """Cards and the family report, from finished stages only (cheap), never over a complete
    report with an incomplete one. Returns builder.report.family_report.ReportOutcome (its `report` is the
    typed FamilyReport, its `note` one line for the user), or None when no stage finished."""
    try:
        return _write_report_files(plan, spec_path, options, failures, skipped)
    except NothingToReport as error:
        log.warning("no report written: %s", error)
        return None


def _write_report_files(plan: Plan, spec_path: Path, options: RunOptions, failures: dict[str, str],
                        skipped: dict[str, str] | None = None):

    # The dry run's estimate goes into report.json, so a build compares predicted with measured time.
    estimate = estimate_plan(plan, planned_teacher_config(plan.spec, spec_path, options), options).to_json()
    return write_report_files(plan, StageStore(options.workdir), family_dir(plan.spec, options),
                              spec_path.read_text(), failures, skipped, estimate)


def write_report(spec_path: Path, options: RunOptions) -> int:
    """The `report` verb: rewrite the family view from the store; 1 when nothing has finished."""
    plan = load_and_plan(spec_path, options, built=True)
    try:
        outcome = _write_report_files(plan, spec_path, options, failures={})
    except NothingToReport as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(outcome.note)
    return _gate_code(outcome.report)


def publish(spec_path: Path, options: RunOptions, dry_run: bool, force: bool) -> int:
    plan = load_and_plan(spec_path, options, built=True)
    return _publish_plan(plan, spec_path, options, dry_run, force)


def _publish_plan(plan: Plan, spec_path: Path, options: RunOptions, dry_run: bool, force: bool) -> int:
    """Publish the family's report, if it is of the build `plan` resolved; every refusal is a
    message with its cause and fix and exit code 1, a student without a Hub owner a spec
    problem (SpecError, exit 2)."""
    # huggingface_hub: only when publishing
    from publish.hub import publish_report

    owner_problems = _owner_problems(plan.spec)
    if owner_problems:
        raise SpecError(str(spec_path), owner_problems)
    path = family_dir(plan.spec, options) / REPORT_JSON
    try:
        report = FamilyReport.load(path)
    except ReportFileError as error:
        print(f"error: cannot publish {plan.spec.family!r}: {error}", file=sys.stderr)
        return 1
    if report.build.precision != plan.precision.dtype:
        print(_other_build(report, path, plan, spec_path), file=sys.stderr)
        return 1
    # judged by the spec's gates as they are now: a gate changed since the report still counts
    return publish_report(judged(report, plan.spec), dry_run=dry_run, force=force)


def _other_build(report: FamilyReport, path: Path, plan: Plan, spec_path: Path) -> str:
    """Publishing reads the view, and the view is of another build than the one resolved:
    another build wrote it since, writing it was interrupted, or --precision names another."""
    dtype = plan.precision.dtype
    return (f"error: cannot publish {plan.spec.family!r}: {path} is of {report.build.describe()}, not of the "
            f"{dtype} build this command resolved ({plan.precision.reason}); another build of the family wrote "
            f"the view since, or writing it was interrupted. Write the view of the {dtype} build with "
            f"`build-family report {spec_path} --precision {dtype}`, then publish with --precision {dtype}")


def _owner_problems(spec: FamilySpec) -> list[Problem]:
    """Students whose repo has no owner: neither their repo_id nor publish.org names one."""
    if spec.publish.org:
        return []
    return [Problem("publish.org", None,
                    f"students[{index}] ({student.name!r}) has no Hub owner for its repo; set publish.org to "
                    f"your Hub user or organization (e.g. publish: {{org: my-org}}), or students[{index}].repo_id "
                    f"to OWNER/{student.name}")
            for index, student in enumerate(spec.students) if not student.repo_id]

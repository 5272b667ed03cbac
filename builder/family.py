"""The user-facing verbs: plan, build, report and publish one family.

    spec file --load/validate--> FamilySpec --make_plan--> Plan --run_plan (Ray)--> stages
    on disk --write_family_view--> runs/<family>/{report.json, report.md, students/*/README.md}
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

from builder.acquire import read_teacher_config
from builder.options import RunOptions
from builder.plan import Plan, make_plan, teacher_acquire_key
from builder.spec import FamilySpec
from builder.store import StageStore
from builder.validate import check_against_teacher, load_spec
from builder.errors import Problem, SpecError

log = logging.getLogger(__name__)


def family_dir(spec: FamilySpec, options: RunOptions) -> Path:
    return Path(options.workdir) / spec.family


def load_and_plan(spec_path: Path, options: RunOptions) -> Plan:
    """Phase 1 and 2 validation, then the plan; raises SpecError with every problem."""
    spec = load_spec(spec_path)
    teacher_config = _teacher_config(spec, spec_path, options)
    problems = check_against_teacher(spec, teacher_config)
    if problems:
        raise SpecError(str(spec_path), problems)
    return make_plan(spec, teacher_config)


def _teacher_config(spec: FamilySpec, spec_path: Path, options: RunOptions):
    manifest = StageStore(options.workdir).manifest(teacher_acquire_key(spec))
    acquired = Path(manifest.summary["model_dir"]) if manifest else None
    try:
        return read_teacher_config(spec.teacher, acquired, options.teacher_config, spec_path.parent)
    except (OSError, ValueError, KeyError) as error:  # unreachable Hub, gated repo, missing file
        fix = ("log in to the Hub for gated repos (`hf auth login`), check the path, or pass "
               "--teacher-config PATH/config.json to plan without the teacher")
        raise SpecError(str(spec_path), [Problem("teacher.source", spec.teacher.source,
                                                 f"cannot read the teacher's config ({error}); {fix}")]) from error


def describe_plan(spec_path: Path, options: RunOptions) -> str:
    from builder.describe import render_plan

    plan = load_and_plan(spec_path, options)
    return render_plan(plan, StageStore(options.workdir), family_dir(plan.spec, options))


def build(spec_path: Path, options: RunOptions, publish: bool = False) -> int:
    from builder.console import BuildConsole, make_console
    from builder.runner import run_plan

    plan = load_and_plan(spec_path, options)
    store = StageStore(options.workdir)
    console = make_console()
    _announce(console, plan, store, options)
    _save_spec(spec_path, family_dir(plan.spec, options))
    with BuildConsole(plan, store, console, ray_log=family_dir(plan.spec, options) / "ray.log",
                      live=not options.verbose) as view:
        result = run_plan(plan, options, spec_path.resolve().parent, observer=view)
    write_family_view(plan, spec_path, options, result.failures | result.optional_failures)
    _conclude(console, plan, options, result, view.skipped())
    if publish and result.ok:
        return _publish_plan(plan, spec_path, options, dry_run=False, force=False)
    return 0 if result.ok else 1


def _announce(console, plan: Plan, store: StageStore, options: RunOptions) -> None:
    """The models to build and how much is already done; `--verbose` prints the whole plan."""
    from builder.describe import render_models, render_plan

    if options.verbose:
        console.print(render_plan(plan, store, family_dir(plan.spec, options)), highlight=False)
        return
    finished = sum(store.manifest(stage.key) is not None for stage in plan.stages.values())
    console.print(f"Building {plan.spec.family}: {len(plan.stages) - finished} stages to run, {finished} "
                  f"finished earlier (reused); work dir {options.workdir}", highlight=False)
    console.print("\n".join(render_models(plan)[1:]), highlight=False)


def _conclude(console, plan: Plan, options: RunOptions, result, skipped: list[str]) -> None:
    """The family table and where things are; after a failure, what did not run."""
    from builder.summary import print_summary

    print_summary(console, family_dir(plan.spec, options))
    optional = [stage_id for stage_id in result.optional_failures if stage_id not in skipped]
    if optional:
        console.print(f"{len(optional)} optional stage(s) failed (see above); the report leaves their "
                      "numbers out", highlight=False)
    if not result.ok:
        failed = [stage_id for stage_id in result.failures if stage_id not in skipped]
        console.print(f"Build failed: {len(failed)} stage(s) failed (see above), {len(skipped)} skipped "
                      "because an input failed. Fix the cause and run the same command again: finished "
                      "stages are reused.", highlight=False)


def status(spec_path: Path, options: RunOptions) -> str:
    from builder.console import render_status

    plan = load_and_plan(spec_path, options)
    return render_status(plan, StageStore(options.workdir))


def _save_spec(spec_path: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(spec_path, out / "spec.yaml")


def write_family_view(plan: Plan, spec_path: Path, options: RunOptions, failures: dict[str, str]) -> Path:
    """Cards and the family report, from finished stages only (cheap; always rewritten)."""
    from builder.report import write_report_files

    return write_report_files(plan, StageStore(options.workdir), family_dir(plan.spec, options),
                              spec_path.read_text(), failures)


def write_report(spec_path: Path, options: RunOptions) -> str:
    plan = load_and_plan(spec_path, options)
    path = write_family_view(plan, spec_path, options, failures={})
    return f"wrote {path}"


def publish(spec_path: Path, options: RunOptions, dry_run: bool, force: bool) -> int:
    plan = load_and_plan(spec_path, options)
    return _publish_plan(plan, spec_path, options, dry_run, force)


def _publish_plan(plan: Plan, spec_path: Path, options: RunOptions, dry_run: bool, force: bool) -> int:
    from builder.report import publish_family

    return publish_family(plan, family_dir(plan.spec, options), dry_run=dry_run, force=force)

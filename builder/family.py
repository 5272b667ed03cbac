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
    from builder.estimate import estimate_plan, render_estimate

    plan = load_and_plan(spec_path, options)
    estimate = estimate_plan(plan, _teacher_config(plan.spec, spec_path, options), options)
    return "\n".join([render_plan(plan, StageStore(options.workdir), family_dir(plan.spec, options)), "",
                      *render_estimate(estimate)])


def build(spec_path: Path, options: RunOptions, publish: bool = False) -> int:
    from builder.describe import render_plan
    from builder.runner import run_plan

    plan = load_and_plan(spec_path, options)
    store = StageStore(options.workdir)
    log.info("\n%s", render_plan(plan, store, family_dir(plan.spec, options)))
    _save_spec(spec_path, family_dir(plan.spec, options))
    result = run_plan(plan, options, spec_path.resolve().parent)
    for stage_id, error in {**result.failures, **result.optional_failures}.items():
        log.error("stage %s failed: %s", stage_id, error)
    write_family_view(plan, spec_path, options, result.failures | result.optional_failures)
    if publish and result.ok:
        return _publish_plan(plan, spec_path, options, dry_run=False, force=False)
    return 0 if result.ok else 1


def _save_spec(spec_path: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(spec_path, out / "spec.yaml")


def write_family_view(plan: Plan, spec_path: Path, options: RunOptions, failures: dict[str, str]) -> Path:
    """Cards and the family report, from finished stages only (cheap; always rewritten)."""
    from builder.estimate import add_to_report
    from builder.report import write_report_files

    path = write_report_files(plan, StageStore(options.workdir), family_dir(plan.spec, options),
                              spec_path.read_text(), failures)
    add_to_report(path, plan, _teacher_config(plan.spec, spec_path, options), options)
    return path


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

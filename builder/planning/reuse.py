"""Which stages a build reuses and which it (re)runs: one decision, for the build and its dry run.

A finished stage is reused only when its recorded outputs are intact and nothing it reads
runs again: a stage that runs (damaged, asked for by `--rebuild`, or never finished) makes
every stage downstream of it run too, since their inputs change.

Package versions do not decide reuse: a stage's hash does, and its code part is its kind's
`version` (builder/stages/__init__.py's bump rule). A finished stage made with another torch
build, transformers, ray, lm-eval or vLLM than the running one is reused as is, and reported
by `status` and the dry run (builder.store.provenance says why).
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path

from builder.errors import Problem, SpecError
from builder.store.integrity import DamagedFile
from builder.planning.dag import Plan
from builder.stages.base import Stage
from builder.stages.registry import stage_kind
from builder.store.stage_store import Manifest, StageStore

@dataclass(frozen=True)
class Decision:
    state: str  # "done" (reuse), "damaged", "resume" or "todo": the dry run's labels
    manifest: Manifest | None = None  # the finish found on disk, if any
    fresh: bool = False  # start from an empty folder (what is on disk is stale)
    reason: str = ""  # why a finished stage runs again, for the build's log

    @property
    def reuse(self) -> bool:
        return self.state == "done"

    @property
    def replaces(self) -> float | None:
        """The finish this build redoes; a different finish found later is another build's."""
        return self.manifest.finished_at if self.manifest is not None and not self.reuse else None


def decide(plan: Plan, store: StageStore, rebuild: set[str] = frozenset()) -> dict[str, Decision]:
    """Stage id -> Decision, in plan (dependency) order; `rebuild` holds stage ids to redo."""
    decisions: dict[str, Decision] = {}
    for stage_id, stage in plan.stages.items():
        decisions[stage_id] = _decide(stage, store, stage_id in rebuild, decisions)
    return decisions


def _decide(stage: Stage, store: StageStore, rebuild: bool, earlier: dict[str, Decision]) -> Decision:
    manifest = store.manifest(stage.key)
    rerun = [upstream for upstream in stage.inputs.values() if not earlier[upstream].reuse]
    fresh_upstream = any(earlier[upstream].fresh for upstream in rerun)
    if rebuild:
        return Decision("todo", manifest, fresh=True, reason="asked for by --rebuild")
    if manifest is not None:
        damage = manifest.damage()
        if damage is not None:
            return Decision("damaged", manifest, fresh=True, reason=f"{damage[0]} is damaged ({damage[1]})")
        if rerun:
            return Decision("todo", manifest, fresh=True, reason=f"its input {rerun[0]} runs again")
        newer = _newer_inputs(manifest, {upstream: earlier[upstream].manifest for upstream in stage.inputs.values()})
        if newer:  # a --rebuild stopped after redoing its input, before this stage ran again
            return Decision("todo", manifest, fresh=True, reason=f"its input {newer[0]} finished after it")
        return Decision("done", manifest)
    if not fresh_upstream and stage_kind(stage.name).resumable and _has_checkpoint(store.path(stage.key)):
        return Decision("resume")
    return Decision("todo", fresh=fresh_upstream)


def _has_checkpoint(stage_dir: Path) -> bool:
    return (stage_dir / "checkpoints" / "latest").is_file()


def current_finishes(plan: Plan, store: StageStore) -> dict[str, Manifest | None]:
    """Stage id -> its manifest if the stage finished on the finishes it reads now, else None.

    A stage whose input was redone after it finished, or is gone (a `--rebuild distill` that
    failed: its folder was cleared, its evaluation never ran again), holds results of weights
    that no longer exist; the report shows none of them. A stage starts only once its inputs
    have finished, and it records the finish of each it read (Manifest.inputs), so no clock is
    compared."""
    current: dict[str, Manifest | None] = {}
    for stage_id, stage in plan.stages.items():  # dependency order: inputs first
        manifest = store.manifest(stage.key)
        inputs = {upstream: current[upstream] for upstream in stage.inputs.values()}
        stale = manifest is not None and (None in inputs.values() or _newer_inputs(manifest, inputs))
        current[stage_id] = None if stale else manifest
    return current


def _newer_inputs(manifest: Manifest, inputs: dict[str, Manifest | None]) -> list[str]:
    """The inputs finished again since the stage read them: the finish it recorded for each,
    or, in manifests from before those were recorded, any that finished after it did."""
    def read_another(stage_id: str, found: Manifest) -> bool:
        if manifest.inputs is not None:
            return manifest.inputs.get(stage_id) != found.finished_at
        return found.finished_at > manifest.finished_at

    return [stage_id for stage_id, found in inputs.items() if found is not None and read_another(stage_id, found)]


def check_inputs(stage_id: str, inputs: dict[str, Manifest]) -> None:
    """Refuse to start on a damaged input, naming the file and the stage that made it."""
    for manifest in inputs.values():
        damage = manifest.damage()
        if damage is not None:
            path, fault = damage
            raise DamagedFile(path, f"{fault}; made by stage {manifest.stage_id}, read by {stage_id}. "
                                    f"Run the build again (it checks and recomputes damaged stages) or "
                                    f"pass --rebuild {manifest.stage_id}")


# --- --rebuild STAGE -----------------------------------------------------------------------


def short_name(stage: Stage) -> str:
    """`distill-tiny-width`: the stage id without its hash."""
    return f"{stage.name}-{stage.key.label}" if stage.key.label else stage.name


def stages_to_rebuild(plan: Plan, names: list[str]) -> set[str]:
    """The stage ids that `--rebuild NAME` names: a full id, an id without its hash
    (`distill-tiny-width`) or a stage kind (`distill`: all of them). Raises SpecError (exit 2)
    listing the stages when a name matches none."""
    chosen: set[str] = set()
    problems = []
    for name in names:
        matched = {stage_id for stage_id, stage in plan.stages.items()
                   if name in (stage_id, stage.name, short_name(stage))}
        if not matched:
            problems.append(Problem("--rebuild", name, _unknown_stage(plan, name)))
        chosen |= matched
    if problems:
        raise SpecError("build-family --rebuild", problems)
    return chosen


def _unknown_stage(plan: Plan, name: str) -> str:
    known = sorted({short_name(stage) for stage in plan.stages.values()}
                   | {stage.name for stage in plan.stages.values()})
    guess = difflib.get_close_matches(name, known + list(plan.stages), n=1)
    hint = f"did you mean {guess[0]!r}? " if guess else ""
    return (f"no stage {name!r} in this family's plan; {hint}give a stage kind, a stage without its "
            f"hash or a full stage id: {', '.join(plan.stages)}")

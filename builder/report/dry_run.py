"""The dry run: the plan as a human reads it (stages, shapes, parameters, outputs)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from builder.planning.dag import Plan, PlannedStudent
from builder.pruning.budgets import meets
from builder.stages.measure_serving import describe_serving
from builder.report.gates import GATE_FAILED_EXIT_CODE, describe_gates
from builder.report.records import signal_name
from builder.spec.chains import chain
from builder.planning.reuse import Decision, decide
from builder.spec.shape import Shape
from builder.stages.base import Stage
from builder.stages.registry import stage_kind
from builder.store.provenance import REUSED, running_provenance, version_changes
from builder.planning.estimate import FamilyEstimate
from builder.store.disk_space import free_bytes
from builder.store.stage_store import StageStore
from builder.teaching.signal import bytes_per_token, stored_bytes
from builder.units import format_bytes, format_count, format_binary_bytes

SHAPE_COLUMNS = ("hidden", "mlp", "heads", "kv", "head_dim", "layers")


def _shape_cells(shape: Shape) -> list[str]:
    return [str(v) for v in (shape.hidden_size, shape.intermediate_size, shape.num_attention_heads,
                             shape.num_key_value_heads, shape.head_dim, shape.num_hidden_layers)]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    line = lambda cells: "  " + "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return [line(header)] + [line(row) for row in rows]


def render_plan(plan: Plan, store: StageStore, family_dir: Path, rebuild: set[str] = frozenset()) -> str:
    spec = plan.spec
    lines = [f"Family {spec.family}: teacher {spec.teacher.source}, data {spec.data.source}", ""]
    lines += render_models(plan) + [""]
    for student in plan.students:
        if student.budget:
            lines += budget_lines(plan, student) + [""]
        if student.searched:
            lines += _candidate_lines(plan, student, store) + [""]
    lines += [f"Training precision: {plan.precision}"] + signal_lines(plan) + [""] + gate_lines(plan)
    lines += ["Stages in run order ([done] = finished earlier, reused as is; [resume] = continues from "
              "its last checkpoint; [damaged] = finished but its outputs fail the check, runs again; "
              "[todo] = runs)"]
    decisions = decide(plan, store, rebuild)
    lines += _table(["state", "stage", "tokens", "output"],
                    [_stage_row(plan, stage_id, store, decisions[stage_id]) for stage_id in plan.stages])
    lines += _provenance_notes(plan, decisions)
    lines += ["", "What each kind of stage does (light: a share of a CPU; heavy: the per-stage CPUs and GPUs; "
              "coordinating: its actors hold them; training: its Ray Train workers do, "
              "or with one worker the stage itself, as a heavy one)"]
    lines += _table(["stage", "resources", "does"], _kind_rows(plan))
    lines += ["", f"Family outputs: {family_dir}/report.json, report.md, students/<name>/README.md"]
    return "\n".join(lines)


def _kind_rows(plan: Plan) -> list[list[str]]:
    kinds = dict.fromkeys(stage.name for stage in plan.stages.values())  # in run order, once each
    return [[kind.name, kind.resources + (", optional" if kind.optional else ""), kind.title]
            for kind in map(stage_kind, kinds)]


def gate_lines(plan: Plan) -> list[str]:
    """Each student's quality gates in words; none when the family sets none."""
    gates = {student.name: plan.spec.gates_for(student) for student in plan.spec.students}
    if all(section.is_empty for section in gates.values()):
        return []
    lines = ["Quality gates (judged after evaluation against the teacher the students are distilled from; a "
             f"student that fails one is not published and the build exits with code {GATE_FAILED_EXIT_CODE}):"]
    return lines + [f"  {name}: {describe_gates(section)}" for name, section in gates.items()] + [""]


def signal_lines(plan: Plan) -> list[str]:
    """What each student learns from: the online teacher or a stored top-k signal, and why a
    student with the hidden-state loss stays online."""
    lines = []
    for student in plan.students:
        section = plan.spec.distill_for(student.spec)
        if not section.tokens:
            continue
        teacher = f"its parent {student.parent}" if student.parent else "the teacher"
        online = f"{teacher}, online" if student.parent else "the online teacher"
        if section.stored_signal:
            size = bytes_per_token(section.top_k, plan.teacher_vocab_size, section.tail_samples)
            how = (f"{teacher}'s stored {signal_name(section.top_k, section.tail_samples)} ({size} bytes per token, "
                   "one teach pass)")
        elif section.hidden_loss_weight > 0:
            how = f"{online} (its hidden-state loss needs the teacher's hidden states, which no signal stores)"
        else:
            how = f"{online} (teacher_signal online, or auto with no other distillation to share a signal with)"
        lines.append(f"Teacher signal for {student.spec.name}: {how}")
    return lines + [_signal_disk_line(plan, stage_id) for stage_id in plan.teach_stages]


def _signal_disk_line(plan: Plan, stage_id: str) -> str:
    """A stored signal's disk: at the papers' budgets it is terabytes, worth seeing before a run."""
    key = plan.stages[stage_id].key
    tokens = key.config["positions"] * plan.spec.data.seq_len  # at most: the split may hold fewer blocks
    size = stored_bytes(tokens, key.config["top_k"], plan.teacher_vocab_size, key.config["tail_samples"])
    return (f"Stored signal teach ({key.label}): up to {format_count(size)}B on disk for {format_count(tokens)} "
            "tokens (the signal and the tokens beside it), shared by every student and search candidate that reads it")


def render_models(plan: Plan) -> list[str]:
    """The teacher and every student: parameters and shape (the build prints this too)."""
    header = ["model", "params", "x teacher", *SHAPE_COLUMNS, "depth method"]
    rows = [["teacher", format_count(plan.teacher_params), "1.00", *_shape_cells(plan.teacher_shape), "-"]]
    rows += [_student_row(plan, student) for student in plan.students]
    title = "Models (shapes in config.json names; head_dim is kept and written explicitly)"
    return [title] + _table(header, rows) + chain_lines(plan)


def chain_lines(plan: Plan) -> list[str]:
    """Each chained member's lineage: what it is pruned from, scored on and taught by."""
    return [f"  {' -> '.join(['teacher', *chain(plan.spec.parents, s.spec.name)])}: {s.spec.name} is pruned from "
            f"{s.parent}'s distilled model (importance scored on it) and taught by it"
            for s in plan.students if s.parent]


def _student_row(plan: Plan, student: PlannedStudent) -> list[str]:
    share = f"{student.params / plan.teacher_params:.2f}"
    if student.searched:  # the shape is the search's to choose: see the candidate table
        return [student.spec.name, f"~{format_count(student.params)}", share,
                *["search"] + ["-"] * (len(SHAPE_COLUMNS) - 1), student.spec.depth_method]
    layers_cut = student.shape.num_hidden_layers < plan.teacher_shape.num_hidden_layers
    return [student.spec.name, format_count(student.params), share, *_shape_cells(student.shape),
            student.spec.depth_method if layers_cut else "-"]


def _candidate_lines(plan: Plan, student: PlannedStudent, store: StageStore) -> list[str]:
    """The search's candidates; once `select` has run, their held-out losses and the choice."""
    search = plan.spec.search
    selected = store.manifest(plan.stages[student.select_stage].key)
    results = selected.summary["candidates"] if selected else [None] * len(student.candidates)
    rows = []
    for index, (candidate, result) in enumerate(zip(student.candidates, results)):
        loss = f"{result['heldout_loss']:.4f}" if result else "-"
        chosen = "<- chosen" if selected and selected.summary["chosen"] == index else ""
        rows.append([str(index), format_count(candidate.params), f"{candidate.params / student.params:.3f}",
                     *_shape_cells(candidate.shape), loss, chosen])
    near = f"within {search.tolerance:.0%} of {format_count(student.params)}"
    if student.budget:
        near = f"{near} " if student.spec.params else ""
        near += ("that meet its serving budget" if student.budget.measured_all else
                 "(all of them until the measurements decide which meet the budget)")
    title = (f"Architecture search for {student.spec.name}: {len(rows)} candidates {near}, each distilled "
             f"{format_count(search.tokens)} tokens, ranked on held-out loss")
    return [title] + _table(["#", "params", "x budget" if student.spec.params else "x largest",
                             *SHAPE_COLUMNS, "held-out loss", ""], rows)


def budget_lines(plan: Plan, student: PlannedStudent) -> list[str]:
    """A serving budget in words, the workload and hardware it holds for, and every candidate
    shape's measured cost (mean ± spread of the repeats), or "not yet measured" with the memory
    computed from the shape; which meet it."""
    serving, budget = plan.spec.serving, student.budget
    lines = [f"Serving budget for {student.spec.name}: {student.spec.budget.describe()}, with "
             f"{describe_serving(serving, budget.hardware)}; each shape measured once "
             f"({serving.repeats} timed passes, vLLM's dummy weights), before any training"]
    if not budget.measured_all:
        lines.append("  not yet measured: the build measures these shapes first, then trains only the candidates "
                     "that meet the budget (memory below: computed from the shape)")
    costs = budget.costs or [None] * len(budget.measured)
    rows = [_budget_row("teacher", budget.teacher_shape, plan.teacher_params, budget.teacher_cost, budget.memory[0], "")]
    for index, (candidate, cost, memory) in enumerate(zip(budget.measured, costs, budget.memory[1:])):
        verdict = "" if cost is None else ("meets" if meets(student.spec.budget, cost) else "misses")
        rows.append(_budget_row(str(index), candidate.shape, candidate.params, cost, memory, verdict))
    if any(cost.contended for cost in [budget.teacher_cost, *(budget.costs or ())] if cost):
        lines.append("  (busy: other work competed for the machine during that measurement, so its spread is wide; "
                     "rerun it on a quiet machine with --rebuild measure-serving)")
    return lines + _table(["#", "params", *SHAPE_COLUMNS, "tokens/s", "x teacher", "ms/token", "memory", ""], rows)


def _budget_row(name: str, shape: Shape, params: int, cost, memory: int, verdict: str | None) -> list[str]:
    if cost is None:
        measured = ["not yet measured", "-", "-", format_binary_bytes(memory) + " (computed)"]
    else:
        measured = [cost.describe("tokens_per_s"), cost.describe("speedup"), cost.describe("ms_per_token"),
                    cost.describe("memory")]
        verdict = " ".join(filter(None, [verdict, "(busy)" if cost.contended else ""]))
    return [name, format_count(params), *_shape_cells(shape), *measured, verdict or ""]


def _stage_row(plan: Plan, stage_id: str, store: StageStore, decision: Decision) -> list[str]:
    stage = plan.stages[stage_id]
    return [f"[{decision.state}]", _stage_name(stage), _planned_tokens(plan, stage), str(store.path(stage.key))]


def _stage_name(stage: Stage) -> str:
    return stage.name + (f" ({stage.key.label})" if stage.key.label else "")


def _provenance_notes(plan: Plan, decisions: dict[str, Decision]) -> list[str]:
    """One note per reused stage made with other package versions than this build runs (or
    before they were recorded): reported, never deciding reuse (builder.store.provenance)."""
    running = running_provenance()
    changes = {stage_id: version_changes(decision.manifest.provenance, running)
               for stage_id, decision in decisions.items() if decision.reuse}
    notes = [f"{_stage_name(plan.stages[stage_id])}: {change}; {REUSED}"
             for stage_id, change in changes.items() if change]
    return ["", *notes] if notes else []


def _planned_tokens(plan: Plan, stage) -> str:
    tokens = stage_kind(stage.name).planned_tokens(plan.spec, stage)
    return "-" if tokens is None else format_count(tokens)



@dataclass(frozen=True)
class DiskCheck:
    """What the stages to run need on disk at most (every one at its peak at once,
    builder.planning.estimate), against what is free where they write."""

    needed: float
    free: float
    workdir: Path

    @property
    def fits(self) -> bool:
        return self.needed <= self.free

    def line(self) -> str:
        line = (f"Disk: the stages to run need at most {format_bytes(self.needed)}, {format_bytes(self.free)} is free "
                f"at {self.workdir}")
        if self.fits:
            return line
        return (f"{line}: free {format_bytes(self.needed - self.free)} there or use a --workdir on a larger disk "
                "(each stage checks its own need before it writes, and stops naming it when the disk cannot hold it)")


def disk_check(estimate: FamilyEstimate, decisions: dict[str, Decision], workdir: Path) -> DiskCheck:
    needed = sum(stage.disk_peak for stage in estimate.stages if not decisions[stage.stage].reuse)
    return DiskCheck(needed, free_bytes(workdir), Path(workdir))

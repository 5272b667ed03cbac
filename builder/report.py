"""The family report: report.json (the machine-readable contract), report.md and one
model card per student, all derived from finished stages' manifests (nothing recomputed).
"""
from __future__ import annotations

import json
import logging
import platform
from pathlib import Path

from builder.plan import TEACHER, Plan
from builder.store import Manifest, StageStore, write_json_atomic
from builder.units import format_count

log = logging.getLogger(__name__)


def _manifests(plan: Plan, store: StageStore) -> dict[str, Manifest | None]:
    return {stage_id: store.manifest(stage.key) for stage_id, stage in plan.stages.items()}


def stage_record(manifest: Manifest | None, flops_per_token: float = 0.0) -> dict | None:
    if manifest is None:
        return None
    return {"tokens": manifest.tokens, "wall_s": round(manifest.wall_s, 2),
            "flops": flops_per_token * manifest.tokens, "path": manifest.path}


def _metrics(manifest: Manifest | None) -> dict:
    if manifest is None:
        return {}
    tasks = (manifest.summary.get("metrics") or {}).get("tasks", {})
    metrics = {name: _task_metrics(task) for name, task in tasks.items()}
    if "perplexity" in manifest.summary:
        metrics["perplexity"] = manifest.summary["perplexity"]["perplexity"]
    return metrics


def _task_metrics(task: dict) -> dict:
    """lm-eval's numbers for one task, flat, with the settings that produced them."""
    settings = {key: task.get(key) for key in ("num_fewshot", "limit", "samples", "source", "version")}
    return {**task.get("metrics", {}), **settings}


def _throughput(plan: Plan, manifests: dict, failures: dict, name: str) -> dict | None:
    if plan.throughput_stage is None:
        return None
    if plan.throughput_stage in failures:
        return {"error": failures[plan.throughput_stage]}
    manifest = manifests.get(plan.throughput_stage)
    return manifest.summary["results"].get(name) if manifest else None


def _model_record(plan: Plan, manifests: dict, failures: dict, name: str, model_stage: str) -> dict:
    model = manifests.get(model_stage)
    evaluation = manifests.get(plan.eval_stages[name])
    return {
        "name": name,
        "path": model.summary.get("model_dir") if model else None,
        "metrics": _metrics(evaluation),
        "evaluation_error": failures.get(plan.eval_stages[name]),
        "throughput": _throughput(plan, manifests, failures, name),
    }


def teacher_record(plan: Plan, manifests: dict, failures: dict) -> dict:
    acquired = manifests.get(plan.original_teacher_stage)
    record = _model_record(plan, manifests, failures, TEACHER, plan.teacher_stage)
    n = plan.teacher_params
    record.update({
        "source": plan.spec.teacher.source,
        "repo_id": acquired.summary.get("repo_id") if acquired else plan.spec.teacher.repo_id,
        "license": (acquired.summary.get("license") if acquired else None) or plan.spec.teacher.license,
        "params": n,
        "shape": plan.teacher_shape.as_dict(),
        "corrected": plan.teacher_stage != plan.original_teacher_stage,
        "stages": {
            "acquire-teacher": stage_record(acquired),
            "correct": stage_record(manifests.get(plan.teacher_stage), 6 * n) if plan.teacher_stage != plan.original_teacher_stage else None,
            "score": stage_record(_find(plan, manifests, "score"), 2 * n),
        },
    })
    scores = _find(plan, manifests, "score")
    record["block_importance"] = scores.summary.get("block_importance") if scores else None
    return record


def _find(plan: Plan, manifests: dict, stage_name: str, student: str | None = None) -> Manifest | None:
    for stage_id, stage in plan.stages.items():
        if stage.name == stage_name and stage.student == student:
            return manifests.get(stage_id)
    return None


def student_record(plan: Plan, manifests: dict, failures: dict, planned, teacher: dict) -> dict:
    name = planned.spec.name
    record = _model_record(plan, manifests, failures, name, planned.final_stage)
    # A searched student's shape is the one its `select` stage chose (unknown until then).
    pruned = manifests.get(planned.select_stage) if planned.searched else _find(plan, manifests, "prune", name)
    shape = planned.shape.as_dict() if planned.shape else (pruned.summary["shape"] if pruned else None)
    params = pruned.summary["params"] if planned.searched and pruned else planned.params
    distilled = manifests.get(planned.final_stage)
    section = plan.spec.distill_for(planned.spec)
    teacher_shape = plan.teacher_shape.as_dict()
    record.update({
        "params": params,
        "shape": shape,
        "repo_id": planned.spec.repo_id or (f"{plan.spec.publish.org}/{name}" if plan.spec.publish.org else name),
        "why": _why(planned, manifests),
        "lineage": {
            "correction": teacher["stages"]["correct"],
            "pruning": {
                "axes": {axis: [teacher_shape[axis], value] for axis, value in (shape or {}).items()
                         if value != teacher_shape[axis]},
                "depth_method": planned.spec.depth_method,
                "layers_kept": pruned.summary.get("layers_kept") if pruned else None,
                "calibration_samples": plan.spec.scoring.samples,
                "search": search_record(plan, manifests, planned) if planned.searched else None,
            },
            "distillation": {
                "tokens": distilled.tokens if distilled else None,
                "steps": distilled.summary.get("steps") if distilled else None,
                "loss": section.loss, "temperature": section.temperature,
                "final_loss": distilled.summary.get("final_loss") if distilled else None,
                "loss_curve": distilled.summary.get("metrics_file") if distilled else None,
            },
        },
        "stages": {
            "prune": stage_record(pruned),
            "distill": stage_record(distilled, 6 * params + 2 * plan.teacher_params),
            "evaluate": stage_record(manifests.get(plan.eval_stages[name]), 2 * params),
        },
    })
    return record


def _why(planned, manifests: dict) -> str | None:
    """The spec's reason for the shape; for a searched student, also how the search chose it."""
    selected = manifests.get(planned.select_stage) if planned.searched else None
    if selected is None:
        return planned.spec.why
    found = len(selected.summary["candidates"])
    chosen = selected.summary["candidates"][selected.summary["chosen"]]
    search = (f"Chosen by architecture search: of {found} candidate shapes near {format_count(planned.params)} "
              f"parameters, each pruned and distilled on {format_count(chosen['tokens'])} tokens, this one had the "
              f"lowest held-out loss ({chosen['heldout_loss']:.3f}).")
    return f"{planned.spec.why.strip()} {search}" if planned.spec.why else search


def search_record(plan: Plan, manifests: dict, planned) -> dict:
    """The architecture search as run: every candidate, its held-out loss, the choice."""
    search = plan.spec.search
    selected = manifests.get(planned.select_stage)
    results = selected.summary["candidates"] if selected else [{} for _ in planned.candidates]
    candidates = [{"tag": c.tag, "shape": c.shape.as_dict(), "params": c.params,
                   "heldout_loss": result.get("heldout_loss"), "train_loss": result.get("train_loss")}
                  for c, result in zip(planned.candidates, results)]
    return {"budget": planned.params, "tolerance": search.tolerance, "tokens_per_candidate": search.tokens,
            "heldout_tokens": search.heldout_tokens, "candidates": candidates,
            "chosen": selected.summary["chosen"] if selected else None}


def hardware() -> str:
    import os

    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"


def collect_report(plan: Plan, store: StageStore, spec_text: str, failures: dict[str, str]) -> dict:
    manifests = _manifests(plan, store)
    teacher = teacher_record(plan, manifests, failures)
    students = [student_record(plan, manifests, failures, planned, teacher) for planned in plan.students]
    report = {"family": plan.spec.family, "description": plan.spec.description, "teacher": teacher,
              "students": students, "hardware": hardware(), "spec_yaml": spec_text,
              "license": plan.spec.publish.license or teacher["license"],
              "failures": failures,
              "complete": all(manifests.values())}
    if plan.teacher_stage != plan.original_teacher_stage:
        report["teacher_original"] = _model_record(plan, manifests, failures, "teacher-original",
                                                   plan.original_teacher_stage)
    return report


def write_report_files(plan: Plan, store: StageStore, family_dir: Path, spec_text: str,
                       failures: dict[str, str]) -> Path:
    family_dir.mkdir(parents=True, exist_ok=True)
    report = collect_report(plan, store, spec_text, failures)
    for student in report["students"]:
        student["card"] = str(write_card(report, student, family_dir))
    report["plots"] = draw_plots(report, family_dir / "plots")
    write_json_atomic(family_dir / "report.json", report)
    (family_dir / "report.md").write_text(render_markdown(report, family_dir))
    log.info("report: %s", family_dir / "report.md")
    return family_dir / "report.json"


def draw_plots(report: dict, folder: Path) -> dict[str, str]:
    from builder import plots

    def throughput_of(model: dict) -> float | None:
        return (model.get("throughput") or {}).get("output_tokens_per_s")

    drawn = {
        "accuracy vs parameters": plots.accuracy_vs(report, headline, lambda m: m["params"], "parameters",
                                                    folder / "accuracy_vs_params.png"),
        "accuracy vs throughput": plots.accuracy_vs(report, headline, throughput_of, "vLLM output tokens/s",
                                                    folder / "accuracy_vs_throughput.png"),
        "distillation loss": plots.loss_curves(report, folder / "distillation_loss.png"),
        "layer importance": plots.importance_profile(report["teacher"].get("block_importance"),
                                                     folder / "layer_importance.png"),
    }
    return {title: str(path) for title, path in drawn.items() if path is not None}


def write_card(report: dict, student: dict, family_dir: Path) -> Path:
    from publish.card import render_card_from_report

    folder = family_dir / "students" / student["name"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "README.md").write_text(render_card_from_report(report, student["name"]))
    (folder / "spec.yaml").write_text(report["spec_yaml"])
    return folder / "README.md"


def _task_names(report: dict) -> list[str]:
    names: list[str] = []
    for record in [report["teacher"], *report["students"]]:
        names += [n for n in record["metrics"] if n != "perplexity" and n not in names]
    return names


def headline(metrics: dict, task: str) -> float | None:
    """The number a table shows for a task: acc_norm where lm-eval reports it, else acc."""
    result = metrics.get(task)
    if not isinstance(result, dict):
        return None
    for key in ("acc_norm", "acc", "exact_match"):
        if key in result:
            return result[key]
    return None


def render_markdown(report: dict, family_dir: Path) -> str:
    tasks = _task_names(report)
    teacher = report["teacher"]
    models = [m for m in (report.get("teacher_original"), teacher, *report["students"]) if m]
    header = ["model", "params", *tasks, "perplexity", "output tok/s", "speed-up"]
    lines = [f"# {report['family']}", "", report.get("description", "").strip(), "",
             f"Teacher `{teacher['source']}`; measured on {report['hardware']}. Deltas are against the teacher "
             "the students were distilled from (accuracy: acc_norm where the task has it, else acc).", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model in models:
        lines.append("| " + " | ".join(_row(model, teacher, tasks)) + " |")
    lines += _search_sections(report)
    if report["failures"]:
        lines += ["", "## Problems", ""] + [f"- `{stage}`: {error.strip().splitlines()[-1]}"
                                            for stage, error in report["failures"].items()]
    if report.get("plots"):
        lines += ["", "## Plots", ""]
        lines += [f"![{title}]({Path(path).relative_to(family_dir)})" for title, path in report["plots"].items()]
    lines += ["", "Machine-readable: `report.json`. Model cards: `students/<name>/README.md`.", ""]
    return "\n".join(lines)


def _search_sections(report: dict) -> list[str]:
    lines = []
    for student in report["students"]:
        search = student["lineage"]["pruning"].get("search")
        if not search:
            continue
        lines += ["", f"## Architecture search: {student['name']}", "",
                  f"{len(search['candidates'])} candidates within {search['tolerance']:.0%} of "
                  f"{format_count(search['budget'])} parameters, each distilled "
                  f"{format_count(search['tokens_per_candidate'])} tokens, ranked on "
                  f"{format_count(search['heldout_tokens'])} held-out tokens; the lowest loss continues.", "",
                  "| # | params | layers | hidden | heads/kv | MLP | held-out loss | |", "|---" * 8 + "|"]
        for index, candidate in enumerate(search["candidates"]):
            shape, loss = candidate["shape"], candidate["heldout_loss"]
            lines.append(
                f"| {index} | {format_count(candidate['params'])} | {shape['num_hidden_layers']} | "
                f"{shape['hidden_size']} | {shape['num_attention_heads']}/{shape['num_key_value_heads']} | "
                f"{shape['intermediate_size']} | {'-' if loss is None else f'{loss:.4f}'} | "
                f"{'chosen' if search['chosen'] == index else ''} |")
    return lines


def _row(model: dict, teacher: dict, tasks: list[str]) -> list[str]:
    cells = [model["name"], format_count(model.get("params") or teacher["params"])]
    for task in tasks:
        value, base = headline(model["metrics"], task), headline(teacher["metrics"], task)
        cells.append("-" if value is None else f"{value:.3f}" + (f" ({value - base:+.3f})" if model is not teacher and base is not None else ""))
    perplexity = model["metrics"].get("perplexity")
    cells.append("-" if perplexity is None else f"{perplexity:.2f}")
    throughput = model.get("throughput") or {}
    cells.append(f"{throughput['output_tokens_per_s']:.0f}" if "output_tokens_per_s" in throughput else "-")
    cells.append(f"{throughput['ratio_to_teacher']:.2f}x" if "ratio_to_teacher" in throughput else "-")
    return cells


def publish_family(plan: Plan, family_dir: Path, dry_run: bool, force: bool) -> int:
    """Publish every student of a finished build (see publish.hub); 0 when all went up."""
    from publish.hub import publish_report

    report = json.loads((family_dir / "report.json").read_text())
    return publish_report(report, plan.spec.publish, dry_run=dry_run, force=force)

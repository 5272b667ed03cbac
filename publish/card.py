"""Model cards: one README.md per student, rendered offline from the family report.

The card is the student's whole story: where it came from (teacher, correction, pruning,
distillation), what it cost (tokens, FLOPs, wall time), how it scores and runs against its
teacher (every number with its standard error or spread, differences within two standard
errors called noise), how to load it, what it can't do, and the spec that built it. Front
matter comes from `huggingface_hub.ModelCardData` so the Hub reads `base_model`, the
license, tags and the eval results (`model-index`).

    text = render_card(FamilyReport.load(Path("runs/F/report.json")), "S")

Rendering is a pure function of the typed report (builder/report/records.py): no network, no
clock, so a golden file pins it. A card names no path of the machine that built it.
"""
from __future__ import annotations

import json
import math
import re

from huggingface_hub import EvalResult, ModelCardData

from builder.report.records import (FamilyReport, ModelRecord, StageCost, StudentRecord, TaskResult, Throughput,
                                  difference, format_difference, format_perplexity, format_rate, format_score,
                                  format_speedup, hardware_text, layouts_text, perplexity_difference, precision_text,
                                  signal_name)
from builder.units import format_count, format_duration
from publish.portable import find_local_paths

TAGS = ("minitron", "pruned", "distilled", "minizoo")
# Hub dataset ids (and configs) behind lm-eval task names, so model-index links to real data
# sets; a task not listed keeps its lm-eval name.
HUB_DATASETS = {
    "hellaswag": ("Rowan/hellaswag", None),
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy"),
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge"),
    "piqa": ("ybisk/piqa", None),
    "winogrande": ("allenai/winogrande", "winogrande_xl"),
    "mmlu": ("cais/mmlu", "all"),
    "lambada_openai": ("EleutherAI/lambada_openai", None),
    "boolq": ("google/boolq", None),
    "openbookqa": ("allenai/openbookqa", "main"),
    "sciq": ("allenai/sciq", None),
    "copa": ("super_glue", "copa"),
}
# Accuracy of random guessing, to say plainly when a score is indistinguishable from it.
CHANCE = {
    "hellaswag": 0.25, "arc_easy": 0.25, "arc_challenge": 0.25, "piqa": 0.5, "winogrande": 0.5,
    "mmlu": 0.25, "openbookqa": 0.25, "sciq": 0.25, "copa": 0.5, "boolq": 0.5,
}
PAPER_DISTILL_TOKENS = 94 * 10**9  # Minitron's distillation budget, the yardstick for "small"


def render_card(report: FamilyReport, student: str) -> str:
    """The README.md text of `student` (its name): YAML front matter, then the body."""
    s = report.student(student)
    sections = [
        _intro(report, s), _lineage_section(report, s), _eval_section(report, s), _throughput_section(report, s),
        _compute_section(report, s), _usage_section(report, s), _limitations_section(report, s),
        _spec_section(report),
    ]
    return f"---\n{card_data(report, s).to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n"


def repo_or_placeholder(student: StudentRecord) -> str:
    """The student's Hub id; without an owner in the spec, a placeholder a reader sees as one."""
    return student.repo_id or f"OWNER/{student.name}"


def card_data(report: FamilyReport, student: StudentRecord) -> ModelCardData:
    results = eval_results(student)
    return ModelCardData(
        base_model=_base_model(report, student),
        library_name="transformers",
        license=report.license,
        tags=list(TAGS),
        datasets=list(_hub_datasets(report.data_source)) or None,
        pipeline_tag="text-generation",
        model_name=student.repo_id if results and student.repo_id else None,
        eval_results=results or None,
    )


def _base_model(report: FamilyReport, student: StudentRecord) -> str | None:
    """What the Hub shows it was made from: the teacher, or a chained member's parent (its repo;
    None when the parent has no Hub owner, rather than a repo that does not exist)."""
    if student.lineage.parent is None:
        return report.teacher.repo_id
    return report.student(student.lineage.parent).repo_id


def eval_results(model: ModelRecord) -> list[EvalResult]:
    """model-index entries, one per (task, score). Held-out perplexity stays in the body only:
    it is measured on a slice of the training corpus, which is not a Hub data set."""
    results = []
    for name, task in model.tasks.items():
        dataset, config = HUB_DATASETS.get(name, (name, None))
        results += [EvalResult(task_type="text-generation", dataset_type=dataset, dataset_name=name,
                               dataset_config=config, metric_type=metric, metric_value=round(value, 4),
                               metric_name=f"{metric} ({_run_note(task)})")
                    for metric, value in task.scores.items()]
    return results


def _run_note(task: TaskResult) -> str:
    shots = task.num_fewshot if isinstance(task.num_fewshot, int) else 0
    return f"{shots}-shot, {task.examples}"


def _hub_datasets(source: str | None) -> tuple[str, ...]:
    """Only `hf:` data is a Hub data set; embedded and local corpora get named in the prose."""
    if source and source.startswith("hf:"):
        return (source.removeprefix("hf:").split("@")[0],)
    return ()


# -- intro and lineage ---------------------------------------------------------------------------
def _intro(report: FamilyReport, s: StudentRecord) -> str:
    t = report.teacher
    share = s.params / t.params if s.params and t.params else float("nan")
    lines = [
        f"# {s.name}",
        "",
        f"`{repo_or_placeholder(s)}` is a student of {_teacher_link(report)} with "
        f"{format_count(s.params or 0)} parameters ({share:.0%} of the teacher's {format_count(t.params or 0)}), "
        "made by [Minitron](https://arxiv.org/abs/2407.14679)-style structured pruning and knowledge distillation "
        f"with minizoo, as part of the `{report.family}` family.",
    ]
    if s.why:
        lines += ["", f"**Why this shape:** {s.why}"]
    if s.gated_out:  # such a card is never published (publish.hub); it tells whoever reads it locally why
        lines += ["", f"**Not publishable:** this student {s.gate_failure_text()}."]
    return "\n".join(lines)


def _teacher_link(report: FamilyReport) -> str:
    t = report.teacher
    if t.repo_id:
        return f"[{t.repo_id}](https://huggingface.co/{t.repo_id})"
    return f"`{t.portable_source}`" if not t.local_source else t.portable_source


def _lineage_section(report: FamilyReport, s: StudentRecord) -> str:
    lin = s.lineage
    lines = ["## Lineage", "", f"1. **Teacher:** {_teacher_link(report)}."]
    if lin.correction and lin.correction.tokens:
        lines.append(
            f"2. **Teacher correction:** fine-tuned on {format_count(lin.correction.tokens)} tokens of the "
            f"distillation data first ({_duration(lin.correction.wall_s)}), so it teaches on that data's distribution."
        )
    else:
        lines.append("2. **Teacher correction:** none; the teacher was used as published.")
    lines.append(f"3. **Pruning:** {_pruning_text(s)}")
    lines += _chain_lines(report, s)
    lines += [f"   - `{axis}`: {before} -> {after}" for axis, (before, after) in lin.pruning.axes.items()]
    lines.append(f"4. **Distillation:** {_distill_text(s)}")
    return "\n".join(lines)


def _chain_lines(report: FamilyReport, s: StudentRecord) -> list[str]:
    """A chained member: pruned from its parent's distilled weights and taught by it."""
    if s.lineage.parent is None:
        return []
    parent = report.student(s.lineage.parent)
    chain = " -> ".join(["teacher", *s.lineage.chain, s.name])
    return [f"   - **Chained:** pruned from the distilled weights of its parent `{repo_or_placeholder(parent)}` "
            f"(`{parent.name}`, importance scored again on them) and distilled from it: {chain}."]


def _pruning_text(s: StudentRecord) -> str:
    """Only what happened to this student: no depth method for one that kept every layer."""
    pruning = s.lineage.pruning
    if not pruning.axes:
        return "none; the student keeps the teacher's shape."
    parts = ["one-shot, activation-based importance"]
    if pruning.calibration_samples:
        parts[0] += f" from {pruning.calibration_samples} calibration samples"
    if pruning.removed_layers:
        before = pruning.axes["num_hidden_layers"][0]
        if pruning.depth_method:
            parts.append(f"layers chosen by `{pruning.depth_method}`")
        if pruning.layers_kept is not None:
            removed = sorted(set(range(before)) - set(pruning.layers_kept))
            parts.append(f"layers removed (0-based): {', '.join(map(str, removed))}")
    return "; ".join(parts) + "."


def _signal_text(d, teacher: str = "the teacher") -> str:
    """`teacher`: who taught, in words (a chained member's parent)."""
    if d.teacher_signal == "topk":
        return (f"{teacher}'s stored {signal_name(d.top_k, d.tail_samples or 0)} per token (one pass of {teacher} "
                "shared by its students, the *teach* stage below)")
    return f"{teacher}'s logits (run online, alongside the student)"


def _distill_text(s: StudentRecord) -> str:
    d = s.lineage.distillation
    if not d.tokens:
        return "not run; this is the pruned teacher as is."
    text = f"{format_count(d.tokens)} tokens"
    if d.steps:
        text += f" over {d.steps} steps"
    teacher = f"its parent `{s.lineage.parent}`" if s.lineage.parent else "the teacher"
    text += f", loss `{d.loss}` on {_signal_text(d, teacher)}"
    if d.temperature is not None:
        text += f" at temperature {d.temperature:g}"
    if d.final_loss is not None:
        text += f"; final loss {d.final_loss:.4f}"
    if d.layouts:  # another layout sums in another order: these weights are this layout's
        text += f"; trained {layouts_text(d.layouts)}"
    return text + "."


# -- evaluation --------------------------------------------------------------------------------------
def _eval_section(report: FamilyReport, s: StudentRecord) -> str:
    t, c = report.published_teacher, report.teacher if report.teacher_original else None
    text = ("All models were evaluated in the same run with lm-eval; every score is ± one standard error. "
            "Teacher is the published teacher")
    if c:
        text += "; Corrected teacher is the same model after correction, the one the student learned from"
    text += (". Δ is student minus teacher ± its standard error; a Δ within two standard errors is *noise*: "
             "the benchmark cannot tell the two models apart on these examples.")
    d = s.lineage.distillation
    if d.stored_dtype:  # what was scored: the files a reader downloads, not the float32 weights training held
        masters = "; training kept float32 master weights" if d.tokens else ""
        text += (f" The student was evaluated as published, its weights stored in {d.stored_dtype} (the teacher's "
                 f"dtype{masters}), computing in {report.build.precision}.")
    header = ["Task", "Metric", "Examples", "Teacher", *(["Corrected teacher"] if c else []), "Student", "Δ"]
    rows = [row for name, task in s.tasks.items() for row in _task_rows(name, task, t, c)]
    if s.perplexity is not None:
        p = s.perplexity
        setting = f"{format_count(p.tokens)} held-out tokens" if p.tokens else "held-out tokens"
        rows.append(["held-out perplexity", "perplexity ↓", setting, format_perplexity(t.perplexity),
                     *([format_perplexity(c.perplexity)] if c else []), format_perplexity(p),
                     perplexity_difference(p, t.perplexity)])
    lines = ["## Evaluation", "", text, ""]
    if s.evaluation_error:
        lines += [f"**Evaluation failed:** {_cell(s.evaluation_error.strip().splitlines()[-1])}", ""]
    return "\n".join(lines + (_table(header, rows) if rows else ["The student has no evaluation results."]))


def _task_rows(name: str, task: TaskResult, teacher: ModelRecord, corrected: ModelRecord | None) -> list[list[str]]:
    pad = [""] if corrected else []
    if task.error:
        return [[name, "", "", "", *pad, f"failed: {_cell(task.error)}", ""]]
    rows = []
    for metric in task.scores:
        mine, theirs = task.score(metric), _score(teacher, name, metric)
        rows.append([name, metric, task.examples, format_score(theirs),
                     *([format_score(_score(corrected, name, metric))] if corrected else []),
                     format_score(mine), format_difference(difference(mine, theirs)) if theirs else "n/a"])
    return rows


def _score(model: ModelRecord, task: str, metric: str):
    found = model.tasks.get(task)
    return found.score(metric) if found else None


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Markdown table lines; the first three columns (names) align left, numbers right."""
    align = ["---" if i < 3 else "---:" for i in range(len(header))]
    return ["| " + " | ".join(cells) + " |" for cells in (header, align, *rows)]


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|")


# -- throughput and compute ------------------------------------------------------------------------
def _throughput_section(report: FamilyReport, s: StudentRecord) -> str:
    mine, theirs = s.throughput, report.published_teacher.throughput
    lines = ["## Throughput", ""]
    if mine is None or mine.error or mine.rate is None:
        reason = mine.error if mine and mine.error else "no measurement in the report"
        return "\n".join(lines + [f"Not measured: {_cell(reason)}."])
    workload = (f" (each pass: {mine.num_prompts} prompts, {mine.output_tokens} output tokens)"
                if mine.num_prompts and mine.output_tokens else "")
    lines += [
        f"Output tokens per second in vLLM's offline engine: mean ± standard deviation over {mine.passes or 1} "
        f"timed pass(es){workload} after a warm-up, teacher and student measured the same way in the same run.",
        "",
        "| | Teacher | Student |",
        "| --- | ---: | ---: |",
        f"| output tokens/s | {format_rate(theirs)} | {format_rate(mine)} |",
        f"| speed-up | 1.00× | {format_speedup(mine)} |",
        "",
        _measured_on(mine),
    ]
    if mine.contended:
        lines += ["", f"**Contended:** {mine.contention_note or 'other work competed for the cores'}; the "
                  "numbers are lower bounds, measure again on a quiet machine."]
    return "\n".join(lines)


def _measured_on(t: Throughput) -> str:
    text = f"Hardware: {t.hardware or 'not recorded'}"
    if t.engine:
        text += f"; {t.engine}"
    args = {k: v for k, v in sorted(t.engine_args.items()) if not find_local_paths(str(v))}
    if args:
        text += ". Engine arguments: " + ", ".join(f"`{k}={v}`" for k, v in args.items())
    return text + "."


def _compute_section(report: FamilyReport, s: StudentRecord) -> str:
    stages = _costs(report.teacher.stages, shared=True) + _costs(s.stages, shared=False)
    lines = ["## Compute", "", "| Stage | Tokens | FLOPs | Wall time | Ran on |", "| --- | ---: | ---: | ---: | --- |"]
    lines += [f"| {name} | {format_count(c.tokens)} | {_flops(c.flops)} | {_duration(c.wall_s)} | {_ran_on(c)} |"
              for name, c in stages]
    lines.append(f"| **total** | {format_count(sum(c.tokens for _, c in stages))} | "
                 f"{_flops(sum(c.flops for _, c in stages))} | {_duration(sum(c.wall_s for _, c in stages))} | |")
    # Each stage's own record (its manifest's), never the machine writing the card; no node
    # names: a card names nothing of the builder's machines.
    hardware = hardware_text([c.hardware for _, c in stages], with_node=False)
    lines += ["", f"Hardware: {hardware}. Training precision: {precision_text(report.build.precision)}; "
                  f"chosen by {report.build.precision_reason}."]
    if report.teacher.stages:
        lines[-1] += (" Stages marked *shared* prepared the teacher once for the whole family; every "
                      "student's card lists them, and its total counts them in full.")
    return "\n".join(lines)


def _ran_on(cost: StageCost) -> str:
    return cost.hardware.text(with_node=False) if cost.hardware else "file work" if not cost.flops else "not recorded"


def _costs(stages: dict[str, StageCost | None], shared: bool) -> list[tuple[str, StageCost]]:
    """Per-stage compute; a stage that did not run (None, or a skipped correction) is left out."""
    return [(f"{name} (shared)" if shared else name, cost) for name, cost in stages.items() if cost]


def _flops(value: float) -> str:
    if not value:
        return "0"
    exponent = math.floor(math.log10(abs(value)))
    return f"{value / 10**exponent:.2f}e{exponent}"


def _duration(seconds: float | None) -> str:
    return "time not recorded" if seconds is None else format_duration(seconds)


# -- usage, limitations, recipe ------------------------------------------------------------------------
def _usage_section(report: FamilyReport, s: StudentRecord) -> str:
    repo, prompt = repo_or_placeholder(s), json.dumps(report.publish.usage_prompt)  # a Python string literal
    return "\n".join([
        "## How to use",
        "",
        "With transformers:",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'tokenizer = AutoTokenizer.from_pretrained("{repo}")',
        f'model = AutoModelForCausalLM.from_pretrained("{repo}")',
        f'inputs = tokenizer({prompt}, return_tensors="pt")',
        "output = model.generate(**inputs, max_new_tokens=32)",
        "print(tokenizer.decode(output[0], skip_special_tokens=True))",
        "```",
        "",
        "With vLLM:",
        "",
        "```python",
        "from vllm import LLM, SamplingParams",
        "",
        f'llm = LLM(model="{repo}")',
        f"outputs = llm.generate([{prompt}], SamplingParams(max_tokens=32))",
        "print(outputs[0].outputs[0].text)",
        "```",
        "",
        f"or as a server: `vllm serve {repo}`.",
    ])


def _limitations_section(report: FamilyReport, s: StudentRecord) -> str:
    items = [_budget_limitation(s)]
    if not (s.lineage.correction and s.lineage.correction.tokens):
        items.append(
            "The teacher was not corrected on the distillation data first; when that data differs from "
            "the teacher's training data, the Minitron papers find distillation works less well."
        )
    items += _eval_limitations(s)
    items.append(
        f"Distillation data: {_data_name(report.data_source)}. The student learned only from the "
        "teacher's outputs on this data, so it drifts toward its domain and style, and nothing outside "
        "the benchmarks above was checked."
    )
    if s.throughput is None or s.throughput.error:
        items.append("Throughput was not measured, so the speed-up over the teacher is unknown.")
    items.append(
        "It inherits the teacher's limitations and biases and was not evaluated for safety; "
        "do not use it where mistakes cause harm without your own evaluation."
    )
    return "\n".join(["## Limitations", ""] + [f"- {item}" for item in items])


def _data_name(source: str) -> str:
    return source if source.startswith("a local") else f"`{source}`"


def _budget_limitation(s: StudentRecord) -> str:
    tokens = s.lineage.distillation.tokens
    if not tokens:
        return "The student was not distilled: pruned but untrained models usually score far below their teacher."
    if tokens < PAPER_DISTILL_TOKENS / 100:
        return (
            f"The distillation budget is small: {format_count(tokens)} tokens, against the ~94B of the Minitron "
            "papers. Expect the student to trail its teacher by more than the papers' students do."
        )
    return f"Distilled on {format_count(tokens)} tokens; longer distillation usually narrows the gap to the teacher."


def _eval_limitations(model: ModelRecord) -> list[str]:
    if not model.evaluated:
        return ["The student has not been evaluated, so its quality is unknown."]
    items = []
    partial = [f"{name} {task.examples}" for name, task in model.tasks.items() if task.limit]
    if partial:
        items.append(f"Benchmarks ran on part of each task ({', '.join(partial)}), not the full sets: differences "
                     "under two standard errors are noise, and the table marks them so.")
    for name, task in model.tasks.items():
        acc, chance = task.score("acc"), CHANCE.get(name)
        if acc and chance is not None and acc.stderr is not None and abs(acc.value - chance) <= 2 * acc.stderr:
            items.append(f"{name} accuracy ({format_score(acc)}) is within two standard errors of chance "
                         f"({chance:.2f}): the score says little about the student on this task.")
    failed = [name for name, task in model.tasks.items() if task.error]
    if failed:
        items.append(f"Evaluation failed for: {', '.join(failed)}.")
    return items


def _spec_section(report: FamilyReport) -> str:
    spec = report.portable_spec_yaml.rstrip("\n")
    longest = max((len(run) for run in re.findall(r"`+", spec)), default=0)
    fence = "`" * max(3, longest + 1)  # a fence longer than any backtick run inside the spec
    return "\n".join([
        "## Recipe",
        "",
        "The minizoo spec that built this family, also saved in this repo as `minizoo.yaml`: "
        "`build-family minizoo.yaml` rebuilds it. Local paths of the builder's machine are replaced by "
        "`<local path ...>` placeholders: put your own copies there.",
        "",
        f"{fence}yaml",
        spec,
        fence,
    ])

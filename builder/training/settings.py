"""What one training run is asked to do (TrainSettings) and what it reports (TrainResult).

A spec training section (builder.spec.schema.TrainingSpec, strict pydantic) becomes the
loop's TrainSettings in one place, `TrainSettings.from_spec`, and in one step: every field
of the section is either a TrainSettings field of the same name or named in PLANNING_ONLY
with what reads it instead; a section field that is neither is refused, naming the field,
never dropped (a new spec field would otherwise change the stage hash and nothing else).

TrainSettings stays a frozen dataclass rather than a second pydantic model: the section
already validated the user's YAML, and the loop's own checks (`_settings_problems`) list
every problem at once in the loop's words, also for settings the benches and tests build
directly, without pydantic's wording around them; `dataclasses.replace` derives the
correction run's settings. The one thing a pydantic model would add here, refusing unknown
fields, the explicit mapping does.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from builder.models.loading import MAX_SHARD_SIZE

if TYPE_CHECKING:
    from builder.spec.schema import TrainingSpec

Loss = Literal["forward_kl", "reverse_kl", "jsd", "cross_entropy"]
Dtype = Literal["float32", "bfloat16"]
LOSSES: tuple[str, ...] = ("forward_kl", "reverse_kl", "jsd", "cross_entropy")
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# What a final model may be stored in: a teacher's dtype (float16 for some Hub checkpoints).
STORED_DTYPES: dict[str, torch.dtype] = {**DTYPES, "float16": torch.float16}
_FILE_SIZE = re.compile(r"[0-9]+(KB|MB|GB|KIB|MIB|GIB)", re.IGNORECASE)  # what save_pretrained parses


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm became NaN or infinite, or the loss exploded (grew past
    EXPLODED_LOSS_FACTOR times its starting value, builder.training.step); `step` says when."""

    def __init__(self, step: int, what: str, value: float, settings_hint: str = ""):
        self.step, self.what, self.value, self.settings_hint = step, what, value, settings_hint
        super().__init__(
            f"training diverged at step {step}: {what} is {value}; {settings_hint}".rstrip("; ")
        )

    def __reduce__(self):  # keeps the fields when Ray pickles it back to the driver
        return (type(self), (self.step, self.what, self.value, self.settings_hint))


@dataclass(frozen=True)
class TrainSettings:
    """How one training run goes. Field defaults mirror `builder.spec.schema.TrainingSpec`."""

    tokens: int  # budget; steps = ceil(tokens / (batch_size * grad_accum * seq_len * world_size))
    batch_size: int = 4  # sequences per micro-batch per worker
    grad_accum: int = 1
    learning_rate: float = 1e-4
    min_lr_ratio: float = 0.1  # cosine decays to learning_rate * min_lr_ratio
    warmup_steps: int | float = 10  # an int counts steps; a float in [0, 1) is a fraction of them
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # gradient clipping; 0 turns it off
    loss: Loss = "forward_kl"  # cross_entropy = plain LM fine-tuning (teacher correction)
    temperature: float = 1.0  # KD losses soften both distributions and scale by T^2
    lm_loss_weight: float = 0.0  # total = divergence + lm_loss_weight * next-token CE
    # + hidden_loss_weight * the intermediate-state loss (see HiddenStateAligner)
    hidden_loss_weight: float = 0.0
    checkpoint_every: int = 25  # steps
    seed: int = 0
    dtype: Dtype = "float32"  # bfloat16 = autocast (fp32 master weights and optimizer)
    activation_checkpointing: bool = False
    log_every: int = 1  # steps between metrics.jsonl lines
    # Not in the spec (how the output is written, not what is built): the final model's
    # largest safetensors file, as transformers' save_pretrained reads it ("500MB", "5GB").
    max_shard_size: str = MAX_SHARD_SIZE
    # Nor this: the dtype the final model is stored in. The training stages pass the teacher's
    # (builder.stages.training_run.final_dtype); checkpoints keep the float32 master weights.
    stored_dtype: str = "float32"

    def __post_init__(self) -> None:
        problems = [p for p in _settings_problems(self) if p]
        if problems:
            raise ValueError("invalid TrainSettings: " + "; ".join(problems))

    @classmethod
    def from_spec(cls, section: TrainingSpec, **run_values: object) -> "TrainSettings":
        """From a spec training section plus what the run decides, which the section does not
        hold: dtype (the planned precision), batch_size and grad_accum (its global batch split
        over the workers: builder.spec.batching); a run value never replaces a section's
        (TypeError). Raises ValueError naming any section field that is neither a
        TrainSettings field nor in PLANNING_ONLY."""
        values = section.model_dump()
        unknown = {name: values[name] for name in sorted(values.keys() - _FIELDS - PLANNING_ONLY.keys())}
        if unknown:
            raise ValueError(_unknown_fields_message(type(section).__name__, unknown))
        return cls(**{name: value for name, value in values.items() if name in _FIELDS}, **run_values)

    def steps(self, seq_len: int, world_size: int) -> int:
        per_step = self.batch_size * self.grad_accum * seq_len * world_size
        return max(1, math.ceil(self.tokens / per_step))

    def warmup(self, total_steps: int) -> int:
        if isinstance(self.warmup_steps, float):
            return int(self.warmup_steps * total_steps)
        return self.warmup_steps


def _settings_problems(s: TrainSettings) -> list[str]:
    def need(ok: bool, name: str, rule: str) -> str:
        return "" if ok else f"{name}={getattr(s, name)!r} {rule}"

    warmup = s.warmup_steps
    return [
        need(s.tokens > 0, "tokens", "must be positive (the token budget, e.g. 10_000_000)"),
        need(s.batch_size > 0, "batch_size", "must be a positive number of sequences"),
        need(s.grad_accum > 0, "grad_accum", "must be a positive number of micro-batches"),
        need(0 < s.learning_rate < 1, "learning_rate", "must be in (0, 1), e.g. 1e-4"),
        need(0 <= s.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1], e.g. 0.1"),
        need(
            (isinstance(warmup, int) and warmup >= 0) or (isinstance(warmup, float) and 0 <= warmup < 1),
            "warmup_steps", "must be a step count >= 0 or a fraction in [0, 1) of the steps",
        ),
        need(s.weight_decay >= 0, "weight_decay", "must be >= 0"),
        need(s.max_grad_norm >= 0, "max_grad_norm", "must be >= 0 (0 turns clipping off)"),
        need(s.loss in LOSSES, "loss", f"must be one of {', '.join(LOSSES)}"),
        need(s.temperature > 0, "temperature", "must be positive (1 is the Minitron default)"),
        need(s.lm_loss_weight >= 0, "lm_loss_weight", "must be >= 0"),
        need(s.hidden_loss_weight >= 0, "hidden_loss_weight", "must be >= 0"),
        need(s.checkpoint_every > 0, "checkpoint_every", "must be a positive step count"),
        need(s.dtype in DTYPES, "dtype", f"must be one of {', '.join(DTYPES)}"),
        need(s.stored_dtype in STORED_DTYPES, "stored_dtype", f"must be one of {', '.join(STORED_DTYPES)}"),
        need(s.log_every > 0, "log_every", "must be a positive step count"),
        need(bool(_FILE_SIZE.fullmatch(s.max_shard_size)), "max_shard_size", 'must be a size such as "5GB" or "500MB"'),
    ]


_FIELDS = {field.name for field in dataclasses.fields(TrainSettings)}

# The spec training fields the loop does not read, and what does: `from_spec` skips these
# and refuses any other section field that is not a TrainSettings field.
PLANNING_ONLY: dict[str, str] = {
    "global_batch_size": "split over the workers into batch_size x grad_accum (builder.spec.batching)",
    "micro_batch_size": "caps batch_size in that split (builder.spec.batching)",
    "teacher_signal": "the planner's choice of the online teacher or a teach stage's stored signal, "
                      "which the loop is handed as its train_blocks",
    "top_k": "the teach stage's; the loop reads the stored signal's own layout",
    "tail_samples": "the teach stage's; the loop reads the stored signal's own layout",
}


def _unknown_fields_message(section: str, unknown: dict[str, object]) -> str:
    fields = ", ".join(f"{name}={value!r}" for name, value in unknown.items())
    return (f"{section} {fields} would not reach the training loop: TrainSettings has no such field; add it "
            "to TrainSettings (builder/training/settings.py) and read it in the loop, or, if the loop is not "
            "meant to read it, add it to PLANNING_ONLY there with what reads it instead")


@dataclass(frozen=True)
class TrainResult:
    tokens_seen: int  # over the whole run, resumed parts included
    steps: int
    final_loss: float
    wall_seconds: float  # this invocation only
    tokens_per_second: float  # tokens trained by this invocation / its loop time
    start_step: int  # 0, or the checkpoint step this invocation resumed from
    model_dir: str
    # the step ranges and the batch layout that took each (builder.training.layouts); empty in
    # results written before layouts were recorded
    layouts: list[dict] = dataclasses.field(default_factory=list)

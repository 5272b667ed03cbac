"""What one training run is asked to do (TrainSettings) and what it reports (TrainResult)."""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Literal

import torch

from builder.models.loading import MAX_SHARD_SIZE

Loss = Literal["forward_kl", "reverse_kl", "jsd", "cross_entropy"]
Dtype = Literal["float32", "bfloat16"]
Parallel = Literal["ddp", "fsdp"]
LOSSES: tuple[str, ...] = ("forward_kl", "reverse_kl", "jsd", "cross_entropy")
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}
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

    def __post_init__(self) -> None:
        problems = [p for p in _settings_problems(self) if p]
        if problems:
            raise ValueError("invalid TrainSettings: " + "; ".join(problems))

    @classmethod
    def from_spec(cls, spec: object, **overrides: object) -> "TrainSettings":
        """From a `builder.spec.schema` TrainingSpec (pydantic) plus run options (dtype, ...)."""
        values = {name: value for name, value in spec.model_dump().items() if name in _FIELDS}
        return cls(**{**values, **overrides})

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
        need(s.log_every > 0, "log_every", "must be a positive step count"),
        need(bool(_FILE_SIZE.fullmatch(s.max_shard_size)), "max_shard_size", 'must be a size such as "5GB" or "500MB"'),
    ]


_FIELDS = {field.name for field in dataclasses.fields(TrainSettings)}


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

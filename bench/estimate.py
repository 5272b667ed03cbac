"""How good is the dry run's estimate? Predicted vs measured time per stage of the demo family.

    .venv/bin/python -m bench.estimate          # seconds: reads recorded results, times this disk
    .venv/bin/python -m bench.estimate --tasks  # minutes: lm-eval's tokens per bundled task, the
                                                # numbers of builder.planning.cost_model.LM_EVAL_TASKS
    .venv/bin/python -m bench.estimate --longest  # minutes: each task's longest request among
                                                  # its first N documents (cost_model.LM_EVAL_LONGEST)

The measured side is one real build: bench/results/demo.json (`bench.demo`, the exact `make
demo` spec on this 2-core CPU; its stages' wall times as each manifest recorded them). The
predicted side is `builder.planning.estimate` for the same plan with this CPU as the accelerator:
its fp32 matmul peak and the distillation step's MFU, both measured by `bench.distill`
(bench/results/distill.json), and this disk's bandwidth (timed here: an fsync'd write and a
cold read of 256 MiB). Everything else is builder.planning.estimate's stated constants (`Costs`: stage,
Ray Train, lm-eval and vLLM start-up; checkpoint bytes; lm-eval's tokens per task). The ratio
measured / predicted per stage is the estimate's error; goal: within 2x for every heavy stage
(correct, score, distill, evaluate).

What the estimate models: per stage, start-up + reading its checkpoints + compute + writing
(training checkpoints every checkpoint_every steps, the final model, a teacher signal), and
lm-eval's own tokens. What it leaves out: contention (demo.json's build ran on a shared
machine, and its students side by side), the first steps' warm-up (allocator, thread pools:
a large share of a 4-step run), and the page cache (a model written by the previous stage is
usually read from memory, not disk). Peak memory per stage is not compared: the build
records only the whole process tree's peak (demo.json: peak_pss_gib).

Calibrating on GPUs needs: the bf16 matmul peak and the KD step's MFU from a GPU (`bench.gpu`
measures them), the start-up constants on GPUs (Ray Train with NCCL and a CUDA context,
vLLM with CUDA graphs: `Costs.train_start_s`, `vllm_start_s`), the cluster's file system
bandwidth per worker (`--disk-gbps`), and one real GPU build's stage times to compare with.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import replace

from bench.common import RESULTS, ROOT, print_table, write_result
from builder import family
from builder.planning.cost_model import COSTS, Accelerator
from builder.planning.estimate import estimate_plan
from builder.options.run_options import RunOptions

HEAVY = ("correct", "score", "distill", "evaluate")
DISK_TEST_BYTES = 256 * 2**20


def main() -> None:
    demo = json.loads((RESULTS / "demo.json").read_text())
    speed = json.loads((RESULTS / "distill.json").read_text())
    mfu = speed["loops"]["minizoo"]["mfu"]
    cpu = Accelerator(f"{speed['machine']['cpu']} CPU, {speed['threads']} threads, {speed['dtype']}",
                      speed["peak_gflops"] / 1000, 24)
    disk = measure_disk()
    costs = replace(COSTS, **disk)
    spec = ROOT / "families" / demo["spec"]
    options = RunOptions(workdir=ROOT / "runs", mfu=mfu)
    plan = family.load_and_plan(spec, options)
    estimate = estimate_plan(plan, family.planned_teacher_config(plan.spec, spec, options), options, cpu, costs)
    rows = [_compare(estimate, *stage) for stage in demo["stages"]]
    rows = [row for row in rows if row is not None]
    print(f"predicted on {cpu.name}: peak {cpu.bf16_tflops * 1000:.1f} GFLOP/s, MFU {mfu:.0%} (bench.distill); "
          f"disk {disk['read_gbps']:.2f} GB/s read, {disk['write_gbps']:.2f} GB/s written (timed here)")
    print_table(["model", "stage", "tokens", "start s", "read s", "compute s", "write s", "predicted s", "measured s",
                 "measured / predicted", "before workers s", "after: measured / predicted"],
                [[r["model"], r["stage"], r["tokens"], *r["predicted_parts_s"].values(), r["predicted_s"],
                  r["measured_s"], r["ratio"], r.get("before_workers_s", "-"), r.get("own_ratio", "-")] for r in rows])
    heavy = [row for row in rows if row["stage"] in HEAVY]
    within = all(0.5 <= row.get("own_ratio", row["ratio"]) <= 2 for row in heavy)
    print(f"heavy stages within 2x: {within} (training stages: from their first worker's start, against the "
          "estimate's read + compute + write; before it, Ray Train's start-up and waiting for CPUs that sibling "
          "stages held, which a per-stage estimate does not model)")
    mismatch = _precision_mismatch(plan.precision.dtype, speed["dtype"])
    if mismatch:
        print(f"WARNING: {mismatch}")
    write_result("estimate", {"demo_finished": demo["finished"], "peak_gflops": speed["peak_gflops"], "mfu": mfu,
                              "costs": estimate.costs, "stages": rows, "heavy_within_2x": within,
                              "precision_mismatch": mismatch,
                              "measured_whole_build_peak_pss_gib": demo["peak_pss_gib"]})


def _precision_mismatch(build: str, measured: str) -> str | None:
    """The peak and MFU must be those of the precision the demo's training ran in: on a CPU
    with native bf16, `--precision auto` trains in bfloat16, while bench.distill times float32."""
    if build == measured:
        return None
    return (f"the demo plans its training in {build} on this machine but bench.distill measured {measured}: the "
            f"predicted compute of correct and distill is off; build the demo with --precision {measured}, or "
            f"measure the KD step in {build}")


def measure_disk() -> dict[str, float]:
    """GB/s of an fsync'd write and a cold read (its pages dropped from the page cache with
    posix_fadvise, which touches only this file) in the build's work directory."""
    (ROOT / "runs").mkdir(exist_ok=True)
    block = os.urandom(16 * 2**20)
    with tempfile.NamedTemporaryFile(dir=ROOT / "runs") as file:
        started = time.perf_counter()
        for _ in range(DISK_TEST_BYTES // len(block)):
            file.write(block)
        file.flush()
        os.fsync(file.fileno())
        write_s = time.perf_counter() - started
        os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        started = time.perf_counter()
        with open(file.name, "rb") as again:
            while again.read(len(block)):
                pass
        read_s = time.perf_counter() - started
    return {"read_gbps": DISK_TEST_BYTES / read_s / 1e9, "write_gbps": DISK_TEST_BYTES / write_s / 1e9}


# (task, few-shot count): zero shots and the counts the Minitron families use (or 5 / 25).
TASK_SHOTS = [("hellaswag", 0), ("hellaswag", 10), ("arc_easy", 0), ("arc_easy", 25), ("arc_challenge", 0),
              ("arc_challenge", 25), ("piqa", 0), ("piqa", 5), ("winogrande", 0), ("winogrande", 5), ("mmlu", 0),
              ("mmlu", 5), ("boolq", 0), ("lambada_openai", 0)]
TASK_SAMPLE = 40  # documents per task (per subtask of a group) whose requests are tokenized


def measure_task_tokens() -> dict:
    """Per bundled task and few-shot count: documents, forward passes per document and tokens
    per forward, from lm-eval's own request building (a model that only records requests)
    with the demo teacher's tokenizer."""
    tokenizer, manager = _tokenizer_and_tasks()
    found = {}
    for name, shots in TASK_SHOTS:
        result, requests = _requests_of(name, shots, TASK_SAMPLE, manager)
        lengths = _forward_lengths(requests, lambda text: len(tokenizer(text)["input_ids"]))
        counts = result["n-samples"].values()
        used = sum(count["effective"] for count in counts)
        found[f"{name}:{shots}"] = {"docs": sum(count["original"] for count in counts),
                                    "requests": round(len(lengths) / used, 2),
                                    "tokens": round(sum(lengths) / len(lengths), 1)}
        print(name, shots, found[f"{name}:{shots}"], flush=True)
    return found


def _tokenizer_and_tasks():
    """The demo teacher's tokenizer and the bundled tasks' manager."""
    from transformers import AutoTokenizer

    from bench.common import teacher_dir
    from evaluators.lm_eval_runner import task_manager

    return AutoTokenizer.from_pretrained(teacher_dir()), task_manager("bundled", ROOT / "runs" / "cache")


def _requests_of(name: str, shots: int, limit: int | None, manager) -> tuple[dict, list]:
    """simple_evaluate's result and every request lm-eval built for one task, answered by nobody."""
    from lm_eval import simple_evaluate

    from evaluators.lm_eval_runner import SEEDS

    recorder = _request_recorder()
    result = simple_evaluate(model=recorder, tasks=[name], num_fewshot=shots, limit=limit, task_manager=manager,
                             bootstrap_iters=0, **SEEDS)
    return result, recorder.requests


def _forward_lengths(requests: list, length) -> list[int]:
    """Each forward pass's length. Like lm-eval's HF model, one-token continuations of the same
    context share one forward."""
    scored = [r for r in requests if r.request_type == "loglikelihood"]
    shared = {(r.args[0], r.args[1]) for r in scored if length(r.args[1]) == 1}
    lengths = [length(r.args[0]) + length(r.args[1]) for r in scored if (r.args[0], r.args[1]) not in shared]
    lengths += [length(context) + 1 for context in {context for context, _ in shared}]
    return lengths + [length(r.args[0]) for r in requests if r.request_type != "loglikelihood"]


def _request_recorder():
    """An lm-eval model that answers nothing and keeps every request it is given."""
    from lm_eval.api.model import LM

    class Recorder(LM):
        requests: list = []

        def loglikelihood(self, requests):
            self.requests += requests
            return [(0.0, False)] * len(requests)

        def loglikelihood_rolling(self, requests):
            self.requests += requests
            return [0.0] * len(requests)

        def generate_until(self, requests):
            self.requests += requests
            return [""] * len(requests)

    recorder = Recorder()
    recorder.requests = []
    return recorder


def _compare(estimate, model: str, name: str, tokens: int, wall_s: float, before_workers_s: float | None = None
             ) -> dict | None:
    """One stage: predicted vs measured; a training stage also from its first worker's start."""
    label = "" if model == "teacher" and name in ("correct", "score") else model
    matches = [s for s in estimate.stages if s.name == name and s.label == label]
    if not matches or not matches[0].wall_hours:
        return None
    predicted, parts = matches[0].wall_hours * 3600, matches[0].seconds
    row = {"model": model, "stage": name, "tokens": tokens,
           "predicted_parts_s": {part: round(s, 1) for part, s in parts.items()},
           "predicted_s": round(predicted, 1), "measured_s": wall_s, "ratio": round(wall_s / predicted, 2)}
    if before_workers_s is not None:
        own = predicted - parts.get("start", 0.0)
        row |= {"before_workers_s": before_workers_s,
                "own_ratio": round((wall_s - before_workers_s) / own, 2)}
    return row


# The tasks whose longest request cost_model.LM_EVAL_LONGEST holds, at zero shots, and the
# document counts (lm-eval's `limit`: its first N documents, of every subject in a group) it
# gives the longest at; None: the whole split.
LONGEST_TASKS = ("hellaswag", "arc_easy", "arc_challenge", "piqa", "winogrande", "mmlu", "boolq", "lambada_openai")
LONGEST_AT_DOCS = (10, 16, 20, 50, 100, 200, 500, 1000, 2000, 5000, None)


def measure_longest_requests() -> dict:
    """Per task: its documents, and the longest request among its first N documents for each
    N of LONGEST_AT_DOCS, in tokens as HFLM forwards it (context and continuation encoded
    together, less the last token: `_loglikelihood_tokens`' `(context_enc + continuation_enc)[:-1]`),
    from lm-eval's own request building with the demo teacher's tokenizer."""
    tokenizer, manager = _tokenizer_and_tasks()
    found = {}
    for name in LONGEST_TASKS:
        _, requests = _requests_of(name, 0, None, manager)
        if any(r.request_type != "loglikelihood" for r in requests):
            raise ValueError(f"{name}: LONGEST_TASKS holds loglikelihood tasks only")
        lengths = [(r.doc_id, len(tokenizer(r.args[0] + r.args[1])["input_ids"]) - 1) for r in requests]
        docs = 1 + max(doc_id for doc_id, _ in lengths)
        found[name] = {"docs": docs, "longest": [[n or docs, max(length for doc_id, length in lengths
                                                                 if n is None or doc_id < n)]
                                                 for n in LONGEST_AT_DOCS if n is None or n < docs]}
        print(name, found[name], flush=True)
    return found


if __name__ == "__main__":
    import sys

    if "--tasks" in sys.argv[1:]:
        write_result("estimate_tasks", {"sample": TASK_SAMPLE, "tasks": measure_task_tokens()})
    elif "--longest" in sys.argv[1:]:
        write_result("estimate_longest", {"tasks": measure_longest_requests()})
    else:
        main()

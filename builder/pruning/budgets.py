"""Students by serving budget: which of the search's candidate shapes meet a speed, memory or
latency budget at the family's `serving:` workload, on the hardware the family is served on.

People deploy "1.4x the teacher's speed" or "fits in 8 GiB with 16 requests in flight", not a
parameter count, and parameters predict neither: at small batch a depth-pruned and a
width-pruned student of equal size run at very different speeds. So every candidate shape is
*measured* (builder.stages.measure_serving: vLLM on an initialised checkpoint of that shape,
with repeats), and this module decides from those measurements, before any training:

- `budget_candidates`: the shapes to measure, from the architecture search's grid
  (builder.pruning.search): near `params` when the student gives it too, else spread over the
  grid at several fractions of the teacher's size;
- `serving_memory`: weights plus KV cache at the workload, from the shape alone (vLLM's own
  KV cache sizing checks the formula in the measure stage);
- `ServingCost` and `judge`: a candidate's measured numbers, its margin on each limit of the
  budget, and whether it meets them all;
- `infeasible_message`: when none does, the nearest candidates with their numbers and what to change.

Everything here is arithmetic on configs and stored summaries, so the dry run can show it.
"""
from __future__ import annotations

from dataclasses import dataclass

from builder.models.arch import count_params
from builder.planning.cost_model import DTYPE_BYTES, config_dtype_bytes
from builder.pruning.search import GRID_FRACTIONS, Candidate, candidates, candidates_across
from builder.spec.schema import BudgetSpec, SearchSpec, ServingSpec, StudentSpec
from builder.units import format_binary_bytes

METRICS = ("speedup", "tokens_per_s", "memory", "ms_per_token")
# The budget's metrics that must stay at or below their limit (the others at or above).
_AT_MOST = ("memory", "ms_per_token")


def budget_candidates(source_config, student: StudentSpec, search: SearchSpec) -> list[Candidate]:
    """The shapes whose serving cost decides a budget student: the parameter search's candidates
    when it gives `params` too, else the grid at each of GRID_FRACTIONS (below 1) of the source's
    parameters, spread over sizes (at most search.max_candidates)."""
    if student.params is not None:
        return candidates(source_config, student.params, search)
    total = count_params(source_config)
    return candidates_across(source_config, [round(total * f) for f in GRID_FRACTIONS if f < 1], search)


def serving_dtype_bytes(config, serving: ServingSpec, measured_dtype: str | None = None) -> int:
    """Bytes per weight and KV cache element as vLLM holds them: the dtype it reported when
    measured, else serving.dtype, else (auto) the checkpoint's own."""
    dtype = measured_dtype or (serving.dtype if serving.dtype != "auto" else None)
    return DTYPE_BYTES[dtype.removeprefix("torch.")] if dtype else config_dtype_bytes(config)


def kv_bytes_per_token(config, dtype_bytes: int) -> int:
    """A key and a value vector per layer and key/value head (vLLM's full-attention KV cache)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * dtype_bytes


def serving_memory(config, serving: ServingSpec, measured_dtype: str | None = None) -> dict[str, int]:
    """Weights plus the KV cache of every request in flight at its full length (prompt and
    output), in bytes; what a `memory` budget limits. Activations and the engine's own buffers
    are left out: they depend on the engine's settings more than on the shape."""
    per = serving_dtype_bytes(config, serving, measured_dtype)
    weights = count_params(config) * per
    kv = kv_bytes_per_token(config, per) * serving.requests * (serving.input_len + serving.output_len)
    return {"weights_bytes": weights, "kv_cache_bytes": kv, "total_bytes": weights + kv,
            "kv_bytes_per_token": kv_bytes_per_token(config, per), "dtype_bytes": per}


@dataclass(frozen=True)
class ServingCost:
    """One shape's measured serving cost (means over the repeats, with their spread)."""

    tokens_per_s: float
    tokens_per_s_std: float | None
    speedup: float
    speedup_std: float | None
    ms_per_token: float
    ms_per_token_std: float | None
    memory: int  # bytes: weights plus KV cache at the workload
    contended: bool = False  # other work competed for the machine while it was measured (the worker's load note)

    @classmethod
    def of(cls, summary: dict, teacher: dict) -> "ServingCost":
        """From a measure-serving summary and the teacher shape's (same workload and hardware)."""
        speedup = summary["tokens_per_s"] / teacher["tokens_per_s"]
        spreads = [s["tokens_per_s_std"] for s in (summary, teacher)]
        # relative spreads of two independent means add in quadrature (as evaluators.throughput.add_ratios)
        speedup_std = (None if None in spreads else 0.0 if summary is teacher else
                       speedup * _hypot(spreads[0] / summary["tokens_per_s"], spreads[1] / teacher["tokens_per_s"]))
        return cls(summary["tokens_per_s"], summary["tokens_per_s_std"], speedup, speedup_std,
                   summary["ms_per_token"], summary["ms_per_token_std"], summary["memory"]["total_bytes"],
                   bool(summary.get("load", {}).get("contended")))

    def value(self, metric: str) -> float:
        return getattr(self, metric)

    def describe(self, metric: str) -> str:
        if metric == "memory":
            return format_binary_bytes(self.memory)
        spread = getattr(self, f"{metric}_std")
        unit = {"speedup": "x", "tokens_per_s": " tok/s", "ms_per_token": " ms"}[metric]
        return f"{self.value(metric):.3g}{unit}" + (f" ± {spread:.2g}" if spread else "")


def _hypot(a: float, b: float) -> float:
    return (a * a + b * b) ** 0.5


def margins(budget: BudgetSpec, cost: ServingCost) -> dict[str, float]:
    """Each limit's relative margin: > 0 met with room (0.1: 10% better than the limit), < 0 missed."""
    return {metric: (1 - cost.value(metric) / limit) if metric in _AT_MOST else (cost.value(metric) / limit - 1)
            for metric, limit in budget.limits().items()}


def meets(budget: BudgetSpec, cost: ServingCost) -> bool:
    """Every limit met by the mean of the repeats (the spread is reported beside it, not subtracted)."""
    return all(margin >= 0 for margin in margins(budget, cost).values())


def shortfall(budget: BudgetSpec, cost: ServingCost) -> float:
    """How far a candidate is from meeting the budget: its worst missed margin (0 when it meets it)."""
    return max([-margin for margin in margins(budget, cost).values()] + [0.0])


def infeasible_message(student: StudentSpec, costs: list[tuple[Candidate, ServingCost]], serving: ServingSpec,
                       hardware: str) -> str:
    """No candidate meets the budget: the nearest three with their numbers, and what to change."""
    budget = student.budget
    nearest = sorted(costs, key=lambda pair: shortfall(budget, pair[1]))[:3]
    rows = "; ".join(f"{c.tag} ({', '.join(f'{m} {cost.describe(m)}' for m in budget.limits())})" for c, cost in nearest)
    best = {metric: max(costs, key=lambda pair: pair[1].value(metric) * (-1 if metric in _AT_MOST else 1))[1]
            for metric in budget.limits()}
    reach = ", ".join(f"{metric} {best[metric].describe(metric)}" for metric in budget.limits())
    return (f"no candidate of {len(costs)} meets {budget.describe()} at the serving workload "
            f"({serving.requests} requests of {serving.input_len}+{serving.output_len} tokens) on {hardware}; the "
            f"nearest are {rows}; the best any candidate reaches is {reach}. Relax the budget to what a candidate "
            "reaches, give search more room (search.axes, search.tolerance, or `params` nearer the size that fits), "
            "or change the `serving:` workload")

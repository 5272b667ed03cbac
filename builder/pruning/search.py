"""Students by parameter budget: the candidate shapes of Minitron's architecture search.

The first paper (2407.14679, section 2.3) turns a budget such as "8B" into fewer than 20
candidate shapes, prunes each, retrains each lightly (~400 steps) and keeps the one with
the lowest loss: ranking the pruned candidates untrained (ModelOpt's shortcut) picks the
wrong one, because the ranking changes in the first steps of retraining.

This module only decides *which* shapes: a grid over depth, key/value groups and
embedding channels, each at a few fractions of the teacher's size, with the MLP width
solved for the budget. The plan (`builder.planning.dag`) turns every candidate into a small branch
of stages (prune -> light distillation -> held-out loss), the runner fans those out as Ray
tasks like any other stages, and the `select` stage (`builder.stages.select`) keeps the best.
Everything here is pure arithmetic on the teacher's config, so the dry run can show the
candidates before anything runs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from builder.models.arch import arch_for, count_params, shape_problems, student_config
from builder.spec.shape import Shape
from builder.spec.schema import SearchSpec
from builder.units import format_count

# The sizes each searched axis may take, as fractions of the teacher's. The papers' own
# candidates sit in this range (e.g. Llama-3.1-8B -> 4B keeps 50-100% of every axis);
# below half of an axis the pruned model loses too much to be worth ranking.
GRID_FRACTIONS = (1.0, 0.875, 0.75, 0.625, 0.5)


@dataclass(frozen=True)
class Candidate:
    shape: Shape
    params: int

    @property
    def tag(self) -> str:
        """Names the candidate's stage directories, e.g. `l24-h504-a9-m1024`."""
        s = self.shape
        return f"l{s.num_hidden_layers}-h{s.hidden_size}-a{s.num_attention_heads}-m{s.intermediate_size}"


def candidates(teacher_config, budget: int, search: SearchSpec) -> list[Candidate]:
    """The shapes to try for `budget` parameters, at most `search.max_candidates` of them."""
    return _spread(_within_tolerance(_grid(teacher_config, budget, search), budget, search),
                   search.max_candidates)


def candidates_across(teacher_config, budgets: list[int], search: SearchSpec) -> list[Candidate]:
    """The shapes to try for any of several budgets (a student by serving budget alone:
    builder.pruning.budgets), largest first, at most `search.max_candidates` spread over them."""
    found: dict[Shape, Candidate] = {}
    for budget in budgets:
        for candidate in _within_tolerance(_grid(teacher_config, budget, search), budget, search):
            found.setdefault(candidate.shape, candidate)
    return _spread(sorted(found.values(), key=lambda c: -c.params), search.max_candidates)


def _within_tolerance(grid: list[Candidate], budget: int, search: SearchSpec) -> list[Candidate]:
    return [c for c in grid if abs(c.params - budget) <= search.tolerance * budget]


def search_problem(teacher_config, budget: int, search: SearchSpec) -> str | None:
    """Why no search can run for `budget`, with a fix; None when candidates exist."""
    teacher_params = count_params(teacher_config)
    if budget >= teacher_params:
        return (f"params={format_count(budget)} is not below the teacher's {format_count(teacher_params)}; "
                f"choose a budget smaller than {teacher_params:,}")
    grid = _grid(teacher_config, budget, search)
    if _within_tolerance(grid, budget, search):
        return None
    nearest = sorted(grid, key=lambda c: abs(c.params - budget))[:3]
    near = ", ".join(f"{format_count(c.params)} ({c.tag})" for c in nearest) or "none"
    return (f"no candidate shape lies within {search.tolerance:.0%} of {format_count(budget)} on the search grid "
            f"(axes {', '.join(search.axes)}, width_multiple {search.width_multiple}); the nearest are {near}. "
            "Raise search.tolerance, add axes to search.axes, lower search.width_multiple, or change params")


# ---------------------------------------------------------------------------------------------
# The grid


def _grid(teacher_config, budget: int, search: SearchSpec) -> list[Candidate]:
    """One candidate per (layers, key/value groups, hidden size), its MLP fitted to the budget.

    Ordered widest-and-deepest first, so `_spread` samples the grid evenly.
    """
    teacher = Shape.of(teacher_config)
    group_size = teacher.num_attention_heads // teacher.num_key_value_heads
    found: dict[Shape, Candidate] = {}
    for layers in _fractions_of(teacher.num_hidden_layers, "num_hidden_layers" in search.axes):
        for groups in _fractions_of(teacher.num_key_value_heads, "num_attention_heads" in search.axes):
            heads = groups * group_size
            for hidden in _hidden_sizes(teacher_config, heads, search):
                shape = teacher.replace(num_hidden_layers=layers, num_key_value_heads=groups,
                                        num_attention_heads=heads, hidden_size=hidden)
                candidate = _fit_mlp(teacher_config, shape, budget, search)
                if candidate is not None and candidate.shape != teacher:
                    found.setdefault(candidate.shape, candidate)
    return list(found.values())


def _fractions_of(size: int, searched: bool, multiple: int = 1) -> list[int]:
    """`size` at each grid fraction, rounded to `multiple`, largest first; [size] if not searched."""
    if not searched:
        return [size]
    values = {size} | {max(1, round(size * f / multiple)) * multiple for f in GRID_FRACTIONS}
    return sorted((v for v in values if v <= size), reverse=True)


def _hidden_sizes(teacher_config, heads: int, search: SearchSpec) -> list[int]:
    """Embedding widths that are hardware-friendly and loadable with `heads` query heads."""
    teacher = Shape.of(teacher_config)
    if arch_for(teacher_config).derives_head_dim:  # vLLM derives head_dim = hidden / heads
        return [heads * teacher.head_dim]
    # transformers requires hidden_size % num_attention_heads == 0 even with head_dim set.
    step = math.lcm(search.width_multiple, heads)
    return _fractions_of(teacher.hidden_size, "hidden_size" in search.axes, step)


def _fit_mlp(teacher_config, shape: Shape, budget: int, search: SearchSpec) -> Candidate | None:
    """`shape` with the MLP width (a multiple of width_multiple) whose parameter count is
    closest to the budget; None if the shape is not prunable from this teacher."""
    teacher_mlp, multiple = Shape.of(teacher_config).intermediate_size, search.width_multiple
    if "intermediate_size" in search.axes:
        # Parameters grow linearly with the MLP width: solve for the budget, then round.
        low, high = (_params(teacher_config, shape.replace(intermediate_size=m)) for m in (multiple, teacher_mlp))
        if low is None or high is None:
            return None
        per_neuron = (high - low) / max(teacher_mlp - multiple, 1)
        width = multiple * round((multiple + (budget - low) / per_neuron) / multiple)
        shape = shape.replace(intermediate_size=min(max(width, multiple), teacher_mlp))
    params = _params(teacher_config, shape)
    return None if params is None else Candidate(shape, params)


def _params(teacher_config, shape: Shape) -> int | None:
    if shape_problems(teacher_config, shape):
        return None
    return count_params(student_config(teacher_config, shape))


def _spread(found: list[Candidate], limit: int) -> list[Candidate]:
    """At most `limit` candidates, evenly spaced over the grid order (not the `limit` closest to
    the budget: MLP rounding makes that closeness noise, and would favour one region)."""
    if len(found) <= limit:
        return found
    if limit == 1:
        return found[:1]
    picks = sorted({round(i * (len(found) - 1) / (limit - 1)) for i in range(limit)})
    return [found[i] for i in picks]

"""Every stage kind, by name: the one list the planner, runner, estimate, console and report
read (each kind's facts are in its own module's `KIND`). Adding a stage kind adds one line here."""
from __future__ import annotations

from builder.stages import (acquire_data, acquire_teacher, correct, distill, evaluate, gguf, measure_serving, prune,
                            quantize, score, select, teach, throughput)
from builder.stages.base import StageKind

STAGE_KINDS: dict[str, StageKind] = {kind.name: kind for kind in (
    acquire_teacher.KIND,
    acquire_data.KIND,
    correct.KIND,
    score.KIND,
    teach.KIND,
    measure_serving.KIND,
    prune.KIND,
    distill.KIND,
    select.KIND,
    evaluate.KIND,
    throughput.KIND,
    quantize.KIND,
    gguf.KIND,
)}


def stage_kind(name: str) -> StageKind:
    try:
        return STAGE_KINDS[name]
    except KeyError:
        raise KeyError(f"unknown stage kind {name!r}; known: {', '.join(STAGE_KINDS)} "
                       "(a new kind is registered in builder/stages/registry.py)") from None

"""How a training stage's global batch is laid out on its workers: the one place where the
spec's `global_batch_size` meets `--train-workers`.

The spec fixes the sequences per optimizer step (what the result depends on); the workers
split each step equally, and each worker runs its share in micro-batches of at most
`micro_batch_size` sequences, accumulating gradients. Every layout reads the same
sequences per step (builder.training.data.BlockStream) and averages the same per-sequence
losses, so the worker count and the micro-batch change only float summation order, never
the step count or the data: they are outside the stage hash, and the result is defined up to
that order (builder.training.layouts: visible in bfloat16, recorded and reported).
"""
from __future__ import annotations

from dataclasses import dataclass

from builder.errors import Problem
from builder.spec.schema import FamilySpec, TrainingSpec


@dataclass(frozen=True)
class BatchLayout:
    workers: int
    micro_batch_size: int  # sequences per forward/backward on one worker
    grad_accum: int  # micro-batches per worker per optimizer step

    @property
    def global_batch_size(self) -> int:
        return self.workers * self.micro_batch_size * self.grad_accum


class BatchLayoutError(ValueError):
    pass


def batch_layout(global_batch_size: int, workers: int, micro_batch_size: int) -> BatchLayout:
    """Split `global_batch_size` over `workers` exactly; the micro-batch is the largest
    divisor of a worker's share that is at most `micro_batch_size` (so no step is short)."""
    if workers < 1 or global_batch_size % workers:
        raise BatchLayoutError(_indivisible_message(global_batch_size, workers))
    share = global_batch_size // workers
    micro = max(size for size in range(1, min(share, micro_batch_size) + 1) if share % size == 0)
    return BatchLayout(workers, micro, share // micro)


def section_layout(section: TrainingSpec, workers: int) -> BatchLayout:
    return batch_layout(section.global_batch_size, workers, section.micro_batch_size)


def _indivisible_message(global_batch_size: int, workers: int) -> str:
    divisors = [d for d in range(1, global_batch_size + 1) if global_batch_size % d == 0][:12]
    multiple = -(-global_batch_size // max(workers, 1)) * max(workers, 1)
    return (f"global_batch_size {global_batch_size} cannot be split equally over --train-workers {workers}; "
            f"set global_batch_size to a multiple of {workers} (e.g. {multiple}), or run with --train-workers "
            f"{', '.join(map(str, divisors))} (its divisors)")


def batch_problems(spec: FamilySpec, workers: int) -> list[Problem]:
    """Every training section whose global batch `workers` cannot split, before anything runs."""
    problems = []
    for field, section in _trained_sections(spec):
        try:
            section_layout(section, workers)
        except BatchLayoutError as error:
            problems.append(Problem(f"{field}.global_batch_size", section.global_batch_size, str(error)))
    return problems


def _trained_sections(spec: FamilySpec) -> list[tuple[str, TrainingSpec]]:
    searching = spec.search is not None and spec.search.tokens > 0  # candidates train with distill's batch
    sections = [("correction", spec.correction), ("distill", spec.distill)]
    sections += [(f"students[{i}].distill", s.distill) for i, s in enumerate(spec.students) if s.distill]
    return [(field, section) for field, section in sections
            if section.tokens > 0 or (field != "correction" and searching)]

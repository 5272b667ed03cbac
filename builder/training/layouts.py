"""Which batch layout made which steps of a training run: what the report and the model card
say about how the weights were made.

A training stage's hash leaves its layout out (the worker count, FSDP or DDP, the micro-batch):
every layout takes the same steps over the same sequences with the same global batch
(builder.spec.batching), so a finished stage is reused, and a killed one resumed, under any
layout. What the layout changes is the order in which the gradient's float sums are taken,
and so their rounding: bit for bit, a stage is only reproduced by the same layout on the same
kind of machine (tests/test_build_trust.py redoes a stage and gets the same bits;
tests/test_multinode.py gets them from two nodes); with another layout, float32 gradients agree
to float32 rounding and bfloat16 ones only to bfloat16's 8 bits (tests/test_distill.py), which
after training is visible (2 workers against 1 moved bf16 weights by up to 3.4e-3, issue 22).
In bfloat16, FSDP2 also rounds differently from DDP: its mixed-precision policy computes from
bf16 copies of the weights with a bf16 residual stream, where DDP's autocast keeps fp32
weights and residual (builder.training.sharded) - a rounding difference of the same kind, not
measured on a GPU yet. Putting the layout in the hash instead would give up reusing and resuming across layouts (a
cluster that loses a node could not resume with fewer workers) for a difference of the same
kind as another GPU model's or kernel's, which no hash covers either. So the result is defined
up to the order of its sums, and this module records the layout of every step range, resumes
across layouts included, for the report and the card to say.
"""
from __future__ import annotations

from builder.training.parallel import World
from builder.options.run_options import Parallel
from builder.training.settings import TrainSettings


def layout_of(settings: TrainSettings, world: World, parallel: Parallel) -> dict:
    """This run's layout: what decides the order of its float sums."""
    return {"workers": world.size, "parallel": parallel, "micro_batch_size": settings.batch_size,
            "grad_accum": settings.grad_accum, "dtype": settings.dtype}


def layouts_until(earlier: list[dict], layout: dict, first_step: int, last_step: int) -> list[dict]:
    """The step ranges and their layouts up to `last_step`: `earlier` ones (from the checkpoint
    this run resumed), then this run's from `first_step`, one range with the last if it is alike."""
    if earlier and {key: earlier[-1].get(key) for key in layout} == layout:
        return [*earlier[:-1], earlier[-1] | {"last_step": last_step}]
    return [*earlier, {"first_step": first_step, "last_step": last_step, **layout}]


def resumed_layouts(resumed: dict) -> list[dict]:
    """The ranges a checkpoint recorded; for one saved before they were, its world size only."""
    if not resumed:
        return []
    if "layouts" in resumed:
        return list(resumed["layouts"])
    return [{"first_step": 1, "last_step": resumed["step"], "workers": resumed["world_size"]}]

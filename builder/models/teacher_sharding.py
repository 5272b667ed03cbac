"""Where the frozen teacher lives during a distillation under FSDP: one rule, read by the
training loop (builder.training.parallel) and by the estimate (builder.planning.cost_model).
torch-free, so planning imports it without torch.

A replicated teacher costs no communication: each rank runs its forward on its own copy.
Sharding it with FSDP all-gathers every teacher layer on every micro-batch (the teacher's
whole weight crosses the network once per forward) to save (workers - 1) / workers of its
memory. So the teacher is replicated while it takes at most REPLICATED_TEACHER_FRACTION of one
device's memory, which leaves the rest to the student's sharded state, activations and logits,
and sharded otherwise: an 8B teacher in bf16 (16 GB) is 20% of an 80 GB H100 and replicated;
a 12B (24.5 GB) is 31% and sharded. DDP has no sharding: its teacher is always replicated.
"""
from __future__ import annotations

REPLICATED_TEACHER_FRACTION = 0.25


def teacher_is_sharded(teacher_bytes: float, device_bytes: float, parallel: str, workers: int) -> bool:
    """True when FSDP should shard the frozen teacher over `workers` ranks."""
    return parallel == "fsdp" and workers > 1 and teacher_bytes > REPLICATED_TEACHER_FRACTION * device_bytes

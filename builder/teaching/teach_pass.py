"""The teach pass: the teacher runs once over the rows students will read and stores its
top-k signal, and its draws from the rest (builder.teaching.signal), for all of them.

    job = TeachJob(teacher_dir, data_dir, out_dir, layout, dtype="bfloat16", batch_size=8)
    teach_locally(job)                  # or builder.teaching.ray_pool.teach_on_ray(job, workers)
    finish(job)                         # index.json: the signal is complete

A `ShardTeacher` holds the teacher once and teaches whole shards; builder/teaching/ray_pool.py runs
one per worker, `teach_locally` one in this process. Each shard is independent (its rows,
its files), so the pass is data-parallel with no communication and resumes per shard.

The teacher runs as an online distillation runs it (builder.training.loop: its weights in
the training precision, under the same autocast), without gradients and in batches of its
own size: a student reading the signal sees the logits it would have computed itself, up to
the float16 storage of the log-probabilities (tests/test_teach.py bounds that).
"""
from __future__ import annotations

import dataclasses
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from builder.teaching.signal import LOGPROB_DTYPE, SignalLayout, shard_complete, write_index, write_shard
from builder.data.tokens import TokenBlocks
from builder.models.loading import load_model
from builder.planning.cost_model import DTYPE_BYTES, ForwardMemory, forward_memory
from builder.running.placement import place
from builder.teaching.target import LOSS_CHUNK_TOKENS, topk_target
from builder.training.settings import DTYPES


@dataclass(frozen=True)
class TeachJob:
    teacher_dir: str
    data_dir: str  # the acquire-data stage: its train split
    out_dir: str
    layout: SignalLayout
    dtype: str = "float32"  # the training precision (builder.options.precision), as the online teacher runs
    batch_size: int = 8  # sequences per teacher forward pass (no gradients: larger than training's)
    use_gpu: bool = False  # each worker then holds one GPU (and finds it: see ShardTeacher)

    def pending(self) -> list[int]:
        """Shards not written yet, in order: what a (resumed) pass still has to do."""
        return [shard for shard in range(self.layout.shards) if not shard_complete(Path(self.out_dir), shard)]


class ShardTeacher:
    """Loads the teacher once; `teach(shard)` computes and writes one shard. A plain class:
    builder/teaching/ray_pool.py makes it a Ray actor, `teach_locally` calls it in-process."""

    def __init__(self, job: TeachJob, threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        # Decided here, in the worker: Ray shows a process only the GPUs it reserved, so the
        # stage task that planned the job (holding none) could not see one.
        self.job = job
        self.placement = place(job.use_gpu, job.dtype)
        self.device = torch.device(self.placement.device)
        self.model = load_model(job.teacher_dir, self.device, DTYPES[job.dtype], trainable=False)
        self.blocks = TokenBlocks.open(job.data_dir, "train")

    def teach(self, shard: int) -> dict:
        started = time.perf_counter()
        layout = self.job.layout
        rows = np.arange(layout.shard_range(shard).start, layout.shard_range(shard).stop)
        tokens = self.blocks[torch.from_numpy(layout.taught_blocks(rows))]
        draws = layout.draws(shard)
        parts = [self._signal(tokens[start:start + self.job.batch_size], draws)
                 for start in range(0, len(tokens), self.job.batch_size)]
        arrays = {name: np.concatenate([part[name] for part in parts])
                  for name in ("indices", "logprobs", "tail", "samples")}  # fmt: skip
        arrays["tokens"] = tokens.numpy().astype(self.blocks.dtype)
        write_shard(Path(self.job.out_dir), shard, arrays)
        return {"shard": shard, "rows": len(rows), "seconds": time.perf_counter() - started,
                "worker": f"{socket.gethostname()}:{os.getpid()}", "placement": self.placement.facts()}

    def _signal(self, input_ids: torch.Tensor, draws: torch.Generator) -> dict[str, np.ndarray]:
        return batch_signal(self.model, input_ids, self.job.layout, self.job.dtype, draws)


@torch.no_grad()
def batch_signal(model: torch.nn.Module, input_ids: torch.Tensor, layout: SignalLayout, dtype: str,
                 draws: torch.Generator) -> dict[str, np.ndarray]:
    """One batch's stored signal from the teacher `model` (on its device, in `dtype`)."""
    device = next(model.parameters()).device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    with autocast:
        logits = model(input_ids=input_ids.to(device), use_cache=False).logits
    target = topk_target(logits.flatten(0, 1), layout.top_k, layout.temperature, layout.tail_samples, draws)
    drawn = target.tail_ids if layout.tail_samples else target.indices[:, :0]

    def stored(values: torch.Tensor, dtype: np.dtype) -> np.ndarray:
        return values.cpu().numpy().astype(dtype).reshape(*input_ids.shape, *values.shape[1:])

    return {"indices": stored(target.indices, layout.index_dtype), "logprobs": stored(target.logprobs, LOGPROB_DTYPE),
            "tail": stored(target.tail_logprob, LOGPROB_DTYPE), "samples": stored(drawn, layout.index_dtype)}


def teach_memory(config, dtype: str, batch_size: int, seq_len: int, top_k: int, tail_samples: int,
                 temperature: float = 1.0) -> ForwardMemory:
    """Bytes on one actor's device of `batch_signal` over `batch_size` blocks: the teacher in
    `dtype` (ShardTeacher loads it so) and one layer's tensors (cost_model.forward_memory), the
    batch's whole logits, and after the forward topk_target's chunk temporaries and outputs."""
    tokens, compute = batch_size * seq_len, DTYPE_BYTES[dtype]
    # batch_signal's `logits`: the LM head's output for the whole batch, in the weights' dtype,
    # held until topk_target returns
    logits = compute * tokens * config.vocab_size
    return forward_memory(config, dtype, tokens, logits,  # topk_target runs once the forward's layers are freed
                          after=_topk_bytes(config.vocab_size, tokens, compute, top_k, tail_samples, temperature))


def _topk_bytes(vocab_size: int, tokens: int, compute: int, top_k: int, tail_samples: int,
                temperature: float) -> float:
    """What topk_target holds beside the logits (builder.teaching.target), chunk by chunk of
    LOSS_CHUNK_TOKENS positions."""
    chunk = min(LOSS_CHUNK_TOKENS, tokens) * vocab_size
    # softened: a float32 copy of the chunk, unless the logits are float32 at temperature 1
    copy = 0 if compute == 4 and temperature == 1 else 4
    # _topk_chunk: log_softmax's float32 `log_q` beside that copy (exp_ and scatter_ reuse it);
    # _draw_tail: `tail_probs.double()` (cumsum_ in place), float64, beside log_q once the copy is freed
    temporaries = chunk * max(copy + 4, 4 + 8 * (tail_samples > 0))
    # topk_target: every chunk's indices (int64), values and tail (float32) and draws (int64),
    # kept for torch.cat, which copies them once more
    outputs = 2 * tokens * (top_k * (8 + 4) + 4 + tail_samples * 8)
    return temporaries + outputs


def teach_locally(job: TeachJob) -> list[dict]:
    """Every pending shard, in this process (benchmarks, tests; the build uses Ray)."""
    pending = job.pending()
    if not pending:
        return []
    teacher = ShardTeacher(job)
    return [teacher.teach(shard) for shard in pending]


def finish(job: TeachJob) -> dict:
    """Write index.json once every shard is there; the stage's summary."""
    missing = job.pending()
    if missing:
        raise RuntimeError(f"the teach pass left shards {missing[:5]} of {job.out_dir} unwritten; rerun the build "
                           "(it resumes at the first missing shard)")
    write_index(Path(job.out_dir), job.layout)
    layout = job.layout
    return {"signal": job.out_dir, "rows": layout.rows, "tokens": layout.rows * layout.seq_len,
            "top_k": layout.top_k, "tail_samples": layout.tail_samples, "temperature": layout.temperature, "bytes_per_token": layout.bytes_per_token,
            "stored_bytes": layout.rows * layout.seq_len * layout.bytes_per_token, "shards": layout.shards,
            "layout": dataclasses.asdict(layout)}

"""Data: a deterministic stream of token blocks, read from memory-mapped shards.

Training reads blocks from a `builder.data.tokens.TokenBlocks` (the acquire-data stage's
sharded .npy files) or from an in-memory tensor [N, seq_len] (tests, benchmarks): both
answer `len()` and `[index_tensor] -> [k, seq_len]`, and a worker reads only the blocks of
its own micro-batches, so its memory does not grow with the corpus.
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol, Union

import numpy as np
import torch

from builder.teaching.signal import TeacherSignal, is_teacher_signal
from builder.data.tokens import TokenBlocks
from builder.training.parallel import World
from builder.training.settings import TrainSettings
from builder.data.shuffle import Permutation

TRAIN_SPLIT = "train"  # the split a stage dir given as train_blocks is trained on


class Blocks(Protocol):
    """What the stream reads: N blocks of seq_len token ids, gathered by index."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: torch.Tensor) -> torch.Tensor: ...


TrainBlocks = Union[torch.Tensor, str, Path, Blocks]  # a tensor, a stage dir, or opened blocks


class BlockStream:
    """Position p of the stream is block perm_e(p % N) of epoch e = p // N.

    Each epoch has its own permutation keyed by (seed, epoch), so the order depends only on
    the seed and a position in the stream. Step s reads positions [(s-1)G, sG) with
    G = batch_size * grad_accum * world_size, micro-batches interleaved over ranks: rank r
    reads positions offset + (m * world_size + r) * batch_size + [0, batch_size) for its
    micro-batch m. So every rank reads a disjoint slice, a run resumed after step s reads
    from position sG exactly what an uninterrupted run would have read, and a resume on
    another world size (with the same G) trains on the same sequences per step.
    """

    def __init__(self, blocks: Blocks, settings: TrainSettings, world: World, vocab_size: int | None = None):
        self.blocks, self.seed, self.world, self.vocab_size = blocks, settings.seed, world, vocab_size
        self.batch_size, self.grad_accum = settings.batch_size, settings.grad_accum

    @property
    def samples_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.world.size

    def samples_before(self, step: int) -> int:
        """The stream position where step `step` (counted from 1) starts reading."""
        return (step - 1) * self.samples_per_step

    def micro_batch(self, step: int, micro: int) -> torch.Tensor:
        return self.read(self.micro_rows(step, micro))

    def micro_rows(self, step: int, micro: int) -> torch.Tensor:
        """The block indices of this rank's micro-batch `micro` of step `step` (a stored
        teacher signal is read at the same rows as the tokens)."""
        offset = (micro * self.world.size + self.world.rank) * self.batch_size
        return self.rows_at(self.samples_before(step) + offset, self.batch_size)

    def take(self, first: int, count: int) -> torch.Tensor:
        """Blocks at stream positions [first, first + count), as int64 [count, seq_len]."""
        return self.read(self.rows_at(first, count))

    def rows_at(self, first: int, count: int) -> torch.Tensor:
        """The block indices at stream positions [first, first + count)."""
        epochs, within = np.divmod(np.arange(first, first + count, dtype=np.int64), len(self.blocks))
        rows = np.empty(count, dtype=np.int64)
        for epoch in np.unique(epochs):  # a batch may straddle an epoch boundary
            here = epochs == epoch
            # Built per call: a few microseconds, and nothing kept that grows with N.
            rows[here] = Permutation(len(self.blocks), (self.seed, int(epoch)))(within[here])
        return torch.from_numpy(rows)

    def read(self, rows: torch.Tensor) -> torch.Tensor:
        batch = self.blocks[rows].long()
        if self.vocab_size is not None:
            check_token_ids(batch, self.vocab_size)
        return batch


def open_blocks(train_blocks: TrainBlocks) -> Blocks:
    """The blocks to train on: a tensor as it is, a stage dir memory-mapped: an acquire-data
    stage's train split, or a teach stage's taught rows (a TeacherSignal: the blocks with the
    teacher's stored top-k signal for each)."""
    if isinstance(train_blocks, (str, Path)) and is_teacher_signal(Path(train_blocks)):
        blocks = TeacherSignal.open(train_blocks)
    elif isinstance(train_blocks, (str, Path)):
        blocks = TokenBlocks.open(train_blocks, TRAIN_SPLIT)
    else:
        blocks = train_blocks
    if isinstance(blocks, torch.Tensor):
        _check_tensor(blocks)
    if len(blocks) == 0 or seq_len_of(blocks) < 2:
        raise ValueError(
            f"train_blocks has {len(blocks)} blocks of {seq_len_of(blocks)} tokens; it needs at least one "
            "block of at least 2 tokens (the acquire stage's packed blocks)"
        )
    return blocks


def verify_share(blocks: Blocks, world: World) -> None:
    """Before the first step, each worker checks its share of the stored shards whole against
    the digests their stage recorded (builder.store.content): the world reads each shard once
    to check it, instead of every worker reading all of them (a teacher signal runs to TB)."""
    if isinstance(blocks, (TokenBlocks, TeacherSignal)):
        blocks.verify_share(world.rank, world.size)


def seq_len_of(blocks: Blocks) -> int:
    return blocks.shape[1] if isinstance(blocks, torch.Tensor) else blocks.seq_len


def _check_tensor(blocks: torch.Tensor) -> None:
    if blocks.ndim != 2:
        raise ValueError(
            f"train_blocks has shape {tuple(blocks.shape)}; it must be [blocks, seq_len] with "
            "at least one block of at least 2 tokens (the acquire stage's packed blocks)"
        )
    if blocks.dtype.is_floating_point or blocks.dtype == torch.bool:
        raise ValueError(f"train_blocks has dtype {blocks.dtype}; token ids must be integers")


def check_token_ids(blocks: torch.Tensor, vocab_size: int) -> None:
    low, high = int(blocks.min()), int(blocks.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(
            f"train_blocks holds token ids in [{low}, {high}] but the model's vocab_size is "
            f"{vocab_size}; tokenize the data with the teacher's tokenizer"
        )

"""Data: a deterministic stream of token blocks."""
from __future__ import annotations

from pathlib import Path

import torch

from builder.training.parallel import World
from builder.training.settings import TrainSettings

BLOCKS_KEY = "input_ids"  # tensor name in a blocks .safetensors file with several tensors


def load_blocks(path: str | Path) -> torch.Tensor:
    """Token blocks [N, seq_len] from a .safetensors file (its only tensor, or `input_ids`)."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    if len(tensors) != 1 and BLOCKS_KEY not in tensors:
        raise ValueError(
            f"{path} holds tensors {sorted(tensors)}; a blocks file needs a single tensor or "
            f"one named {BLOCKS_KEY!r}"
        )
    return tensors[BLOCKS_KEY] if BLOCKS_KEY in tensors else next(iter(tensors.values()))


class BlockStream:
    """Block i of the stream is block perm_e[i % N] of epoch e = i // N.

    Each epoch has its own permutation drawn from (seed, epoch), so the order depends only
    on the seed and a position in the stream. Step s reads positions [(s-1)G, sG) with
    G = batch_size * grad_accum * world_size, micro-batches interleaved over ranks, so a
    run resumed at step s reads exactly what an uninterrupted run would have read.
    """

    def __init__(self, blocks: torch.Tensor, settings: TrainSettings, world: World):
        self.blocks, self.seed, self.world = blocks, settings.seed, world
        self.batch_size, self.grad_accum = settings.batch_size, settings.grad_accum
        self._perms: dict[int, torch.Tensor] = {}

    def micro_batch(self, step: int, micro: int) -> torch.Tensor:
        per_step = self.batch_size * self.grad_accum * self.world.size
        offset = (micro * self.world.size + self.world.rank) * self.batch_size
        return self.take((step - 1) * per_step + offset, self.batch_size)

    def take(self, first: int, count: int) -> torch.Tensor:
        n = self.blocks.shape[0]
        rows = [self._perm(i // n)[i % n] for i in range(first, first + count)]
        return self.blocks[torch.stack(rows)]

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            # Keep two epochs: a batch may straddle an epoch boundary.
            self._perms = {e: p for e, p in self._perms.items() if e == epoch - 1}
            self._perms[epoch] = torch.randperm(self.blocks.shape[0], generator=generator)
        return self._perms[epoch]


def checked_blocks(train_blocks: torch.Tensor | str | Path) -> torch.Tensor:
    blocks = train_blocks if isinstance(train_blocks, torch.Tensor) else load_blocks(train_blocks)
    if blocks.ndim != 2 or blocks.shape[0] == 0 or blocks.shape[1] < 2:
        raise ValueError(
            f"train_blocks has shape {tuple(blocks.shape)}; it must be [blocks, seq_len] with "
            "at least one block of at least 2 tokens (the acquire stage's packed blocks)"
        )
    if blocks.dtype.is_floating_point or blocks.dtype == torch.bool:
        raise ValueError(f"train_blocks has dtype {blocks.dtype}; token ids must be integers")
    return blocks.long()


def check_token_ids(blocks: torch.Tensor, vocab_size: int) -> None:
    low, high = int(blocks.min()), int(blocks.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(
            f"train_blocks holds token ids in [{low}, {high}] but the model's vocab_size is "
            f"{vocab_size}; tokenize the data with the teacher's tokenizer"
        )

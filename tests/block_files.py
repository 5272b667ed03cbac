"""Token blocks written as an acquire-data stage dir (builder.data.tokens), the format training reads."""
from __future__ import annotations

from pathlib import Path

import torch

from builder.data.tokens import BlocksIndex, ShardWriter, token_dtype


def write_blocks(stage_dir: Path, blocks: torch.Tensor, split: str = "train", shard_blocks: int = 7,
                 vocab_size: int = 1000) -> Path:
    """`blocks` [N, seq_len] as `split` of a stage dir, in shards of `shard_blocks` blocks."""
    dtype = token_dtype(vocab_size)
    writer = ShardWriter(stage_dir, split, blocks.shape[1], dtype, shard_blocks=shard_blocks)
    writer.add(blocks.flatten().numpy())
    BlocksIndex(blocks.shape[1], dtype.name, vocab_size, {split: writer.close()}).write(stage_dir)
    return Path(stage_dir)

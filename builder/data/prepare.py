"""The acquire-data stage's work: the source's documents, tokenized (on Ray Data) and packed
into the sharded token blocks of builder/data/tokens.py, per split."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from builder.data.documents import BATCH_CHARS, SPLITS, Document, document_batches, tokenize_batch
from builder.data.token_ids import TokenizedBatch
from builder.data.tokens import BlocksIndex, ShardWriter, TokenBlocks, token_dtype
from builder.spec.schema import DataSpec


class SplitPacker:
    """Packs tokenized batches, in document order, into the shards of every split.

    Tokens are counted over all splits in document order, and the document that reaches
    `data.max_tokens` is the last one kept: the cut depends on the corpus alone, never on
    how batches were formed or scheduled. Memory: one shard buffer per split.
    """

    def __init__(self, data: DataSpec, out_dir: Path, vocab_size: int, shard_blocks: int | None = None):
        self.data, self.out_dir, self.total = data, Path(out_dir), 0
        self.index = BlocksIndex(data.seq_len, token_dtype(vocab_size).name, vocab_size)
        self.writers = {split: ShardWriter(out_dir, split, data.seq_len, np.dtype(self.index.dtype),
                                           shard_blocks) for split in SPLITS}

    def pack(self, batches: Iterator[TokenizedBatch]) -> BlocksIndex:
        """Pack batches until they end or max_tokens is reached, then finish."""
        for batch in batches:
            self.add(batch)
            if self.data.max_tokens and self.total >= self.data.max_tokens:
                break
        if hasattr(batches, "close"):
            batches.close()  # a generator: stops the Ray Data pipeline now, not when collected
        return self.finish()

    def add(self, batch: TokenizedBatch) -> None:
        """Append the batch's documents (up to the max_tokens cut) to their splits."""
        documents = self._documents_within_budget(batch)
        for code, split in enumerate(SPLITS):
            for doc in np.nonzero(batch.splits[:documents] == code)[0]:
                self.writers[split].add(batch.ids[batch.offsets[doc]:batch.offsets[doc + 1]])
        self.total += int(batch.offsets[documents])

    def _documents_within_budget(self, batch: TokenizedBatch) -> int:
        if not self.data.max_tokens:
            return len(batch.splits)
        reached = np.nonzero(self.total + batch.offsets[1:] >= self.data.max_tokens)[0]
        return int(reached[0]) + 1 if len(reached) else len(batch.splits)

    def finish(self) -> BlocksIndex:
        """Write the last shards and the index (last: it marks the data complete)."""
        for split, writer in self.writers.items():
            self.index.splits[split] = writer.close()
        for split in SPLITS:
            if self.index.splits[split].blocks == 0:
                raise ValueError(
                    f"data: the {split} split is empty (seq_len {self.data.seq_len}); give more documents, "
                    f"or raise data.split.{split if split != 'train' else 'calibration'} / lower data.seq_len"
                )
        self.index.write(self.out_dir)
        return self.index


def acquire_data(data: DataSpec, tokenizer_dir: Path, out_dir: Path, cpus: int = 0,
                 batch_chars: int = BATCH_CHARS, shard_blocks: int | None = None) -> dict:
    """Tokenize the source on Ray Data over `cpus` CPUs (0: every CPU of the cluster) into
    the sharded token blocks of builder/data/tokens.py. `batch_chars` and `shard_blocks` change
    how the work is cut, never the tokens (tests shrink them to cross batch and shard edges)."""
    # Ray Data: only when tokenizing a source
    from builder.data.ray_data import tokenized_batches, tokenizer_args

    tokenizer = tokenizer_args(tokenizer_dir)  # loaded once: for the actors and the shards' dtype
    packer = SplitPacker(data, out_dir, tokenizer.vocab_size, shard_blocks)
    index = packer.pack(tokenized_batches(data, tokenizer, cpus, batch_chars))
    counts = {split: s.tokens for split, s in index.splits.items()}
    return {"blocks": str(out_dir), "tokens": counts, "seq_len": data.seq_len}


def tokenize_splits(documents: Iterable[Document], tokenizer, data: DataSpec) -> dict[str, torch.Tensor]:
    """The blocks acquire_data writes, packed the same way but tokenized in this process
    and returned in memory: for benchmarks on small corpora (the SOTU's few million tokens)."""
    batches = (tokenize_batch(tokenizer, [d.doc_id for d in batch], [d.text for d in batch], data)
               for batch in document_batches(documents))
    with tempfile.TemporaryDirectory(prefix="mz-blocks-") as folder:
        SplitPacker(data, Path(folder), len(tokenizer)).pack(batches)
        return {split: load_blocks(folder, split) for split in SPLITS}


def load_blocks(blocks_dir: Path | str, split: str, limit: int | None = None) -> torch.Tensor:
    """Token blocks of one split as int64 [N, seq_len], at most `limit` of them (the first)."""
    return TokenBlocks.open(blocks_dir, split).head(limit)


"""The data runner: tokenization on Ray Data (with runner.py and ray_train.py, the only
modules that import Ray).

    tokenizer = tokenizer_args(tokenizer_dir)      # read once, here
    for batch in tokenized_batches(data_spec, tokenizer, cpus=0):
        packer.add(batch)          # builder.data.prepare.SplitPacker: blocks into shards

The pipeline is read -> map_batches(tokenize) -> this process, streaming:

- one read task walks `acquire.iter_documents` (every source kind) and emits blocks of
  consecutive documents of about `acquire.BATCH_CHARS` characters. One reader, because
  document ids (a jsonl line number, an hf: stream's row number) and the order they are
  numbered in must not depend on the cluster; reading is two orders of magnitude faster
  than tokenizing, so it is not the bottleneck. It also assigns each document its split
  (`acquire.split_codes`, a hash of the id), so actors see only texts;
- a pool of actors, one per CPU the stage gets (`cpus`, or every CPU of the cluster), each
  holding the fast tokenizer and tokenizing one block per call on one thread. The actor
  (`builder.data.token_ids.BatchTokenizer`) imports neither torch nor transformers: it gets the
  driver's Rust tokenizer serialized and the EOS id read here (`tokenizer_args`), so it
  starts without the torch import (seconds, ~400 MB) each actor used to pay;
- the caller packs what comes back.

Why the shards are identical on 1 or N CPUs: `preserve_order` makes Ray Data hand batches
back in document order, and packing concatenates documents in that order, so neither how
Ray groups blocks nor which actor finished first can change a byte; `data.max_tokens` is cut
by the packer at the same document (see SplitPacker). Why memory stays flat: Ray Data's
streaming executor keeps at most `OBJECT_STORE_BUDGET` of blocks in flight and pauses the
reader when the tokenizers or the packer fall behind, and the packer holds one shard per
split, so neither grows with the corpus.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import ray
import ray.data
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from builder.data.documents import BATCH_CHARS, document_batches, iter_documents, split_codes
from builder.data.token_ids import TokenizedBatch
from builder.spec.schema import DataSpec
from builder.data.token_ids import FIELDS, BatchTokenizer, TokenizerArgs
from builder.options.run_options import RunOptions
from builder.running.ray_session import init_ray

# Blocks in flight between reader, tokenizers and packer (Ray Data backpressure).
OBJECT_STORE_BUDGET = 256 << 20


def tokenized_batches(data: DataSpec, tokenizer: TokenizerArgs, cpus: int = 0,
                      batch_chars: int = BATCH_CHARS) -> Iterator[TokenizedBatch]:
    """Tokenized document batches in document order. Runs inside the cluster this process
    is connected to (the acquire-data stage's Ray task), or starts a local one on loopback."""
    connected = _connect(cpus)
    try:
        cpus = cpus or int(ray.cluster_resources().get("CPU", 1))
        source = DocumentSource(data, batch_chars)
        dataset = _pipeline(source, tokenizer, cpus)
        for table in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
            yield from _from_table(table)
    finally:
        if connected:
            ray.shutdown()


def _connect(cpus: int) -> bool:
    if ray.is_initialized():
        return False

    return init_ray(RunOptions(local_cpus=cpus))


def tokenizer_args(tokenizer_dir: Path | str) -> TokenizerArgs:
    """What the actors and the packer need of a tokenizer, read with transformers once: its
    Rust backend serialized (None if it has none: a slow-only tokenizer), its folder, the EOS
    id, the split_special_tokens setting its __call__ applies, and its size."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    backend = tokenizer.backend_tokenizer.to_str() if tokenizer.is_fast else None
    return TokenizerArgs(backend, str(tokenizer_dir), tokenizer.eos_token_id,
                         bool(getattr(tokenizer, "split_special_tokens", False)), len(tokenizer))


def _pipeline(source: "DocumentSource", tokenizer: TokenizerArgs, cpus: int) -> ray.data.Dataset:
    # The reader takes no CPU slot: with every slot given to a tokenizer it could not start.
    # One output block per document batch (Ray Data would otherwise cut them into ~200).
    documents = ray.data.read_datasource(source, num_cpus=0, override_num_blocks=1)
    tokens = documents.map_batches(BatchTokenizer, fn_constructor_args=(tokenizer,), batch_size=None,
                                   batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=cpus), num_cpus=1)
    context = tokens.context
    context.enable_progress_bars = False
    # A row is a whole document batch; a block of one row lets every batch go to whichever
    # tokenizer is free (Ray Data would otherwise concatenate rows into 128 MiB blocks).
    context.target_max_block_size = 1
    context.execution_options.preserve_order = True
    context.execution_options.resource_limits = context.execution_options.resource_limits.copy(
        object_store_memory=OBJECT_STORE_BUDGET)
    return tokens


class DocumentSource(Datasource):
    """The documents of a DataSpec as one streaming read task (see the module docstring)."""

    def __init__(self, data: DataSpec, batch_chars: int = BATCH_CHARS):
        super().__init__()
        self.data, self.batch_chars = data, batch_chars

    def estimate_inmemory_data_size(self) -> int | None:
        return None  # a stream: unknown until read

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context=None) -> list[ReadTask]:
        metadata = BlockMetadata(num_rows=None, size_bytes=None, input_files=None, exec_stats=None)
        return [ReadTask(self._read, metadata)]

    def _read(self) -> Iterator[pa.Table]:
        for batch in document_batches(iter_documents(self.data), self.batch_chars):
            splits = split_codes([d.doc_id for d in batch], self.data).tobytes()
            yield pa.table({"splits": pa.array([splits], pa.large_binary()), "texts": [[d.text for d in batch]]})


def _from_table(table: pa.Table) -> Iterator[TokenizedBatch]:
    columns = {name: table.column(name).to_pylist() for name in FIELDS}
    for row in range(table.num_rows):
        yield TokenizedBatch(**{name: np.frombuffer(columns[name][row], dtype) for name, dtype in FIELDS.items()})

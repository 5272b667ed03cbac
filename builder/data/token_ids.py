"""Token ids of document batches, and the Ray Data actor that computes them
(builder/data/ray_data.py runs a pool of `BatchTokenizer`s).

A module of its own so that an actor imports only numpy, pyarrow and tokenizers: the actor
class used to live beside the old acquire module's imports, so every actor imported torch (through
builder.data.tokens) and transformers (AutoTokenizer pulls in torch too): seconds to start and
~400 MB of memory per actor, for a job that needs the Rust tokenizer alone. Nothing here
imports Ray: the actor is a plain callable that Ray Data constructs once per worker.
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pyarrow as pa

FIELDS = {"splits": np.uint8, "offsets": np.int64, "ids": np.int32}  # TokenizedBatch's arrays


class TokenizerArgs(NamedTuple):
    """What the driver reads from a tokenizer folder once (builder.data.ray_data.tokenizer_args),
    for the actors and the packer: no actor has to load it with transformers."""

    backend_json: str | None  # the transformers tokenizer's Rust backend, serialized; None if slow-only
    tokenizer_dir: str
    eos_id: int
    split_special_tokens: bool  # what transformers' __call__ sets on the backend
    vocab_size: int  # len(tokenizer): with added tokens, so the shards' dtype fits every id


@dataclass(frozen=True)
class TokenizedBatch:
    """A batch of documents, tokenized: document i is split SPLITS[splits[i]]
    (builder.data.documents) and holds ids[offsets[i]:offsets[i + 1]] (its tokens, then EOS)."""

    splits: np.ndarray  # uint8 [documents]
    offsets: np.ndarray  # int64 [documents + 1]
    ids: np.ndarray  # int32 [tokens]


def ids_with_eos(encoded: list[list[int]], eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Offsets [documents + 1] and ids of documents' tokens, each document followed by EOS
    (so packed blocks mark document boundaries): document i is ids[offsets[i]:offsets[i + 1]]."""
    ends = np.cumsum([len(ids) for ids in encoded], dtype=np.int64)
    tokens = np.fromiter(itertools.chain.from_iterable(encoded), dtype=np.int32, count=int(ends[-1]) if len(ends) else 0)
    ids = np.insert(tokens, ends, eos_id)
    return np.concatenate([[0], ends + np.arange(1, len(ends) + 1)]), ids


class BatchTokenizer:
    """A Ray Data actor: rows of document batches (`splits`, `texts`) to rows of raw numpy
    buffers (FIELDS), on one thread.

    `tokenizer.backend_json` is the driver's transformers tokenizer's own Rust backend,
    serialized (`backend_tokenizer.to_str()`): the very object transformers encodes with,
    after tokenizer_config.json's overrides and added tokens, so the ids are the driver's by
    construction; reading <dir>/tokenizer.json again could miss those overrides. None for a
    slow-only tokenizer (no Rust backend): then, and only then, the actor loads it with
    transformers from `tokenizer_dir`, as before (paying the torch import).
    """

    def __init__(self, tokenizer: TokenizerArgs):
        # Batch encoding would otherwise fan out over every core, on top of the other actors.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        self.eos_id = tokenizer.eos_id
        if tokenizer.backend_json is not None:
            self.encode = _rust_encoder(tokenizer.backend_json, tokenizer.split_special_tokens)
        else:
            self.encode = _transformers_encoder(tokenizer.tokenizer_dir)

    def __call__(self, batches: pa.Table) -> pa.Table:
        rows = [ids_with_eos(self.encode(texts), self.eos_id) for texts in batches.column("texts").to_pylist()]
        return pa.table({"splits": batches.column("splits"),
                         "offsets": pa.array([offsets.tobytes() for offsets, _ in rows], pa.large_binary()),
                         "ids": pa.array([ids.tobytes() for _, ids in rows], pa.large_binary())})


def _rust_encoder(tokenizer_json: str, split_special_tokens: bool):
    import tokenizers

    backend = tokenizers.Tokenizer.from_str(tokenizer_json)
    # What transformers' __call__ sets on its backend before encoding without truncation or
    # padding: a tokenizer.json may carry a truncation or padding setting of its own.
    backend.no_truncation()
    backend.no_padding()
    backend.encode_special_tokens = split_special_tokens
    # encode_batch_fast: the same ids as encode_batch (tests/test_data.py compares them with
    # transformers' call byte for byte), without the character offsets it would also compute
    # for every token: the actors' time is nearly all encoding (bench.data records it).
    return lambda texts: [encoding.ids for encoding in backend.encode_batch_fast(texts, add_special_tokens=False)]


def _transformers_encoder(tokenizer_dir: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"]

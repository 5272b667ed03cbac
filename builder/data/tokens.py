"""Token blocks on disk: sharded `.npy` files plus an index, read by memory-mapping.

The acquire-data stage dir holds

    index.json                         format, version, seq_len, dtype, vocab_size, and per
                                       split: blocks, tokens, shards [{file, blocks}]
    <split>/shard-00000.npy ...        [blocks, seq_len] of uint16 (vocab_size <= 65536)
                                       or uint32, one split per folder

    blocks = TokenBlocks.open(stage_dir, "train")
    len(blocks), blocks.seq_len        # from index.json; no shard is read
    blocks[np.array([7, 123456])]      # torch.LongTensor [2, seq_len], read from the shards' pages
    blocks[10:20], blocks.head(1024)

Why plain `.npy` shards: `numpy.load(path, mmap_mode="r")` reads them in every library and
language that reads numpy's format, without copying (the page cache is shared by every
training worker on a host), with no service, no schema and no extra dependency; a worker
touches only the pages of the blocks it samples, so its memory does not grow with the corpus.
Arrow IPC would memory-map just as well but adds a columnar schema we do not need for one
fixed-width integer matrix, and streaming formats (MDS, litdata) pay off for object stores
we do not use here, at the cost of their own writer, index and cache directory.

Writes are atomic: each shard is written to a temporary name and renamed, and index.json is
written last, so a stage dir whose index exists is complete (and a crashed writer leaves no
half shard under a final name).

Reads are checked: a shard is hashed whole the first time a process maps it and compared with
the content digest its stage recorded (builder.store.content), since a run reads all of it
over time anyway; the training workers instead split the shards between them and check their
share before the first step (`verify_share`), so the world reads each shard once to check it.
"""
from __future__ import annotations

import json
import os
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from builder.store.content import verify_file, verify_files
from builder.store.disk_space import removed_on_failure
from builder.store.integrity import array_record
from builder.store.stage_store import write_bytes_atomic

FORMAT = "minizoo-token-blocks"
VERSION = 1
INDEX_FILE = "index.json"
# Tokens per shard: 64 MiB of uint16. Bounds the writer's buffer (one shard) and keeps the
# file count small (a 100B-token corpus is ~3000 shards).
SHARD_TOKENS = 1 << 25


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every token id fits (ids < 65536), else uint32: half the disk and page cache."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


@dataclass(frozen=True)
class Shard:
    file: str  # relative to the stage dir
    blocks: int


@dataclass(frozen=True)
class SplitIndex:
    blocks: int
    tokens: int
    shards: tuple[Shard, ...]


@dataclass(frozen=True)
class BlocksIndex:
    seq_len: int
    dtype: str
    vocab_size: int
    splits: dict[str, SplitIndex] = field(default_factory=dict)
    format: str = FORMAT
    version: int = VERSION

    def to_json(self) -> str:
        # format and version first: what a reader checks before anything else
        return json.dumps({"format": self.format, "version": self.version, **asdict(self)}, indent=2) + "\n"

    @classmethod
    def read(cls, stage_dir: Path | str) -> "BlocksIndex":
        path = Path(stage_dir) / INDEX_FILE
        if not path.exists():
            raise FileNotFoundError(
                f"{path} does not exist; {stage_dir} is not a finished acquire-data stage "
                "(rerun the build to prepare the data)")
        values = json.loads(path.read_text())
        if values.get("format") != FORMAT or values.get("version") != VERSION:
            raise ValueError(
                f"{path} is format {values.get('format')!r} version {values.get('version')!r}; "
                f"this minizoo reads {FORMAT!r} version {VERSION}: rerun acquire-data")
        splits = {name: SplitIndex(s["blocks"], s["tokens"], tuple(Shard(**x) for x in s["shards"]))
                  for name, s in values.pop("splits").items()}
        return cls(splits=splits, **values)

    def write(self, stage_dir: Path | str) -> None:
        write_bytes_atomic(Path(stage_dir) / INDEX_FILE, self.to_json().encode())


def save_shard(path: Path, blocks: np.ndarray) -> dict:
    """One shard as a .npy file, under its final name only once complete; returns its
    integrity record, hashed from the array in memory (builder.store.integrity.array_record)."""
    blocks = np.ascontiguousarray(blocks)
    temporary = path.with_name(path.name + ".tmp")
    with removed_on_failure(temporary), open(temporary, "wb") as file:
        np.lib.format.write_array(file, blocks, allow_pickle=False)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
    return array_record(path, blocks)


def shard_name(split: str, number: int) -> str:
    return f"{split}/shard-{number:05d}.npy"


class ShardWriter:
    """Appends token ids of one split and writes them as full seq_len blocks, one shard at a
    time: memory is one shard's buffer whatever the corpus size. Leftover tokens that do
    not fill a last block are dropped (as packing always did)."""

    def __init__(self, stage_dir: Path | str, split: str, seq_len: int, dtype: np.dtype,
                 shard_blocks: int | None = None):
        self.stage_dir, self.split, self.seq_len, self.dtype = Path(stage_dir), split, seq_len, dtype
        self.shard_blocks = shard_blocks or max(1, SHARD_TOKENS // seq_len)
        self._buffer = np.empty(self.shard_blocks * seq_len, dtype=dtype)
        self._filled = 0  # tokens in the buffer
        self._shards: list[Shard] = []
        (self.stage_dir / split).mkdir(parents=True, exist_ok=True)

    def add(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids)
        while len(ids):
            take = min(len(ids), len(self._buffer) - self._filled)
            self._buffer[self._filled:self._filled + take] = ids[:take]
            self._filled, ids = self._filled + take, ids[take:]
            if self._filled == len(self._buffer):
                self._flush(self._filled)

    def close(self) -> SplitIndex:
        self._flush(self._filled // self.seq_len * self.seq_len)
        self._buffer = np.empty(0, dtype=self.dtype)
        blocks = sum(shard.blocks for shard in self._shards)
        return SplitIndex(blocks, blocks * self.seq_len, tuple(self._shards))

    def _flush(self, tokens: int) -> None:
        if tokens:
            name = shard_name(self.split, len(self._shards))
            save_shard(self.stage_dir / name, self._buffer[:tokens].reshape(-1, self.seq_len))
            self._shards.append(Shard(name, tokens // self.seq_len))
        self._filled = 0


class TokenBlocks:
    """The blocks of one split, indexed globally across its shards, read by memory-mapping.

    Shards are opened lazily and only the pages of the requested blocks are read. Pickling
    keeps the paths and drops the open maps, so a TokenBlocks is cheap to send to a worker.
    """

    def __init__(self, stage_dir: Path | str, split: str, index: BlocksIndex):
        if split not in index.splits:
            raise KeyError(f"{stage_dir} has no split {split!r}; it has {sorted(index.splits)}")
        self.stage_dir, self.split = Path(stage_dir), split
        self.seq_len, self.dtype = index.seq_len, np.dtype(index.dtype)
        self.shards = index.splits[split].shards
        # starts[i] is the global index of shard i's first block; starts[-1] the total.
        self.starts = np.cumsum([0] + [shard.blocks for shard in self.shards])
        self._maps = MappedFiles()

    @classmethod
    def open(cls, stage_dir: Path | str, split: str) -> "TokenBlocks":
        return cls(stage_dir, split, BlocksIndex.read(stage_dir))

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, index: slice | Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
        """Blocks at global indices (a slice or an integer array) as int64 [k, seq_len]."""
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step == 1:
                return self._range(start, max(start, stop))
            index = np.arange(start, stop, step)
        return self._gather(self._checked(index))

    def head(self, limit: int | None = None) -> torch.Tensor:
        """The first `limit` blocks (all of them when None)."""
        return self[:limit]

    def verify_share(self, rank: int, size: int) -> None:
        """Check shards rank, rank + size, ... whole now, and no shard when it is mapped later:
        `size` readers of the same blocks (training workers) each check their share once."""
        verify_files(self.stage_dir / shard.file for shard in self.shards[rank::size])
        self._maps = MappedFiles(verify=False)

    def _range(self, start: int, stop: int) -> torch.Tensor:
        # Contiguous runs copy whole slices of each shard instead of gathering row by row.
        out = np.empty((stop - start, self.seq_len), dtype=np.int64)
        for shard in self._shards_between(start, stop):
            first, last = max(start, self.starts[shard]), min(stop, self.starts[shard + 1])
            local = self._map(shard)[first - self.starts[shard]:last - self.starts[shard]]
            out[first - start:last - start] = local
        return torch.from_numpy(out)

    def _shards_between(self, start: int, stop: int) -> range:
        if start >= stop:
            return range(0)
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        last = int(np.searchsorted(self.starts, stop - 1, side="right")) - 1
        return range(first, last + 1)

    def _checked(self, index) -> np.ndarray:
        index = np.asarray(index.cpu() if isinstance(index, torch.Tensor) else index)
        if index.ndim != 1 or not np.issubdtype(index.dtype, np.integer) and index.size:
            raise IndexError(f"index blocks by a slice or a 1-D integer array, not {index.dtype} "
                             f"of shape {index.shape}")
        index = index.astype(np.int64)
        index = np.where(index < 0, index + len(self), index)
        if index.size and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError(f"block index out of range for {len(self)} blocks of split {self.split!r}")
        return index

    def _gather(self, index: np.ndarray) -> torch.Tensor:
        out = np.empty((len(index), self.seq_len), dtype=np.int64)
        shard_of = np.searchsorted(self.starts, index, side="right") - 1
        for shard in np.unique(shard_of):
            rows = np.nonzero(shard_of == shard)[0]
            out[rows] = self._map(int(shard))[index[rows] - self.starts[shard]]
        return torch.from_numpy(out)

    def _map(self, shard: int) -> np.ndarray:
        return self._maps.open(self.stage_dir / self.shards[shard].file)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": self._maps.emptied()}


class MappedFiles:
    """Memory-mapped .npy files, the most recently used `capacity` kept open.

    Each open map holds a file descriptor: a reader that kept every shard of a 100B-token
    corpus open (~3000 shards, four files each for a teacher signal) would pass the usual
    limit of 1024 open files. A step samples rows from few shards at a time, and reopening
    an evicted one costs a header read, so a small cache loses nothing.

    With `verify`, a file is checked against its stage's content digest before it is first
    mapped in this process (builder.store.content.verify_file remembers what it checked).
    """

    def __init__(self, capacity: int = 64, verify: bool = True):
        self.capacity, self.verify = capacity, verify
        self._open: OrderedDict[Path, np.ndarray] = OrderedDict()

    def emptied(self) -> "MappedFiles":
        """The same settings, no open maps: what a reader sends to another process."""
        return MappedFiles(self.capacity, self.verify)

    def open(self, path: Path) -> np.ndarray:
        if path in self._open:
            self._open.move_to_end(path)
        else:
            if self.verify:
                verify_file(path)
            self._open[path] = np.load(path, mmap_mode="r")
            if len(self._open) > self.capacity:
                self._open.popitem(last=False)
        return self._open[path]

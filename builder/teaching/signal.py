"""The stored teacher signal: what the teach stage writes and every top-k student reads.

The teach stage dir holds

    index.json                          format, version, rows, seq_len, top_k, tail_samples,
                                        temperature, vocab_size, dtypes, shards, bytes per token
    shard-00000/tokens.npy              [rows, seq_len]        token ids (the data's dtype)
    shard-00000/indices.npy             [rows, seq_len, top_k] the teacher's top-k ids, uint16/uint32
    shard-00000/logprobs.npy            [rows, seq_len, top_k] their log-probabilities, float16
    shard-00000/tail.npy                [rows, seq_len]        log of the mass outside the top k, float16
    shard-00000/samples.npy             [rows, seq_len, m]     m ids drawn from the teacher within
                                                               that tail, uint16/uint32 (m may be 0)

    signal = TeacherSignal.open(stage_dir)
    signal[rows]                         # tokens, int64 [len(rows), seq_len]
    signal.targets(rows)                 # the TopKTarget of those rows' tokens (losses.py)

Row i holds train block `taught_block(i)`: the first `rows` positions of a seeded permutation
of the train split (a uniform sample of it, unlike its prefix, which is the corpus's first
documents). The tokens are stored beside the signal, so a student reads one place and the
two can never drift apart; at 2 bytes a token they add <1% to the signal.

Bytes per token: top_k x (2 or 4 for the id + 2 for the log-probability) + 2 for the tail
+ tail_samples x (2 or 4) for the drawn ids: k = 64 with no samples is 258 bytes with a
vocabulary of up to 65536 ids, 386 above; k = 32 with 64 samples is 258 and 386. The draws
carry no values (each is tail mass / m: builder.training.losses says why that is unbiased). Log-probabilities in
float16, not bfloat16: they lie in about [-30, 0], where float16's 11-bit mantissa keeps a
relative error of the probability below 0.1% for the log-probabilities that matter (> -8),
and bfloat16's 8 bits would not. The same plain .npy files as the token blocks
(builder/data/tokens.py says why): memory-mapped, only the pages of the sampled rows are read.

A shard is complete when its five files and its `written.json` exist: the integrity records of
the five (builder.store.integrity.WRITTEN), hashed from the arrays in memory as they were
written, and written after them (each file goes under a temporary name and is renamed). So a
killed teach pass resumes at the first incomplete shard, and the stage's manifest takes these
records instead of reading many TB back. index.json is written last, once every shard is
there. Readers check each shard's files against the records (builder.store.content; in
training, each worker its share of the shards: `verify_share`).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from builder.data.shuffle import Permutation
from builder.data.tokens import MappedFiles, save_shard, token_dtype
from builder.store.content import verify_files
from builder.store.integrity import WRITTEN
from builder.store.stage_store import write_bytes_atomic, write_json_atomic
from builder.teaching.target import TopKTarget

FORMAT = "minizoo-teacher-signal"
VERSION = 2  # 2: samples.npy, the drawn tail ids
INDEX_FILE = "index.json"
ARRAYS = ("indices", "logprobs", "tail", "samples", "tokens")  # tokens last: written after the signal
LOGPROB_DTYPE = np.dtype(np.float16)
# The permutation key of the taught rows: any fixed value; the data's own split seed is
# already in the data stage's hash.
TAUGHT_ROWS_KEY = (0x7EAC4, 0)
TAIL_DRAWS_SEED = 0x7A11_0000  # plus the shard: the tail draws' seed (any fixed value)
# About this many bytes per shard: small enough to rewrite on resume, few files at scale
# (94B tokens x 386 bytes is ~36 TB: ~140k shards of 256 MiB).
SHARD_BYTES = 256 << 20


@dataclass(frozen=True)
class SignalLayout:
    """Everything the teach pass and the readers agree on, fixed before any shard is written."""

    rows: int  # taught blocks
    train_blocks: int  # blocks of the train split they are drawn from
    seq_len: int
    top_k: int
    temperature: float
    vocab_size: int
    shard_rows: int
    tail_samples: int = 0

    @classmethod
    def plan(cls, positions: int, train_blocks: int, seq_len: int, top_k: int, temperature: float,
             vocab_size: int, tail_samples: int = 0) -> "SignalLayout":
        """`positions`: the most stream positions any student reads; more than the split is
        every block once (students then loop over the taught blocks, as over the split)."""
        rows = max(1, min(positions, train_blocks))
        per_row = seq_len * bytes_per_token(top_k, vocab_size, tail_samples)
        return cls(rows, train_blocks, seq_len, top_k, temperature, vocab_size, max(1, SHARD_BYTES // per_row),
                   tail_samples)

    @property
    def shards(self) -> int:
        return -(-self.rows // self.shard_rows)

    def shard_range(self, shard: int) -> range:
        return range(shard * self.shard_rows, min(self.rows, (shard + 1) * self.shard_rows))

    def taught_blocks(self, rows: np.ndarray) -> np.ndarray:
        """The train-split block each taught row holds."""

        return Permutation(self.train_blocks, TAUGHT_ROWS_KEY)(rows)

    @property
    def index_dtype(self) -> np.dtype:
        return token_dtype(self.vocab_size)

    @property
    def bytes_per_token(self) -> int:
        return bytes_per_token(self.top_k, self.vocab_size, self.tail_samples)

    def draws(self, shard: int) -> torch.Generator:
        """The random source of a shard's tail draws: seeded by the shard alone, so a resumed
        pass (or any worker) rewrites a shard with the very same draws. On the CPU wherever the
        teacher runs: a CUDA generator with the same seed draws other numbers, so a signal
        taught on a GPU would differ from one taught on a CPU (builder.teaching.target draws
        on it and moves the draws to the logits' device)."""
        return torch.Generator().manual_seed(TAIL_DRAWS_SEED + shard)


def bytes_per_token(top_k: int, vocab_size: int, tail_samples: int = 0) -> int:
    """The signal's stored bytes per token (tokens themselves not counted)."""
    id_bytes = token_dtype(vocab_size).itemsize
    return top_k * (id_bytes + LOGPROB_DTYPE.itemsize) + LOGPROB_DTYPE.itemsize + tail_samples * id_bytes


def stored_bytes(tokens: int, top_k: int, vocab_size: int, tail_samples: int) -> int:
    """What a teach stage writes for `tokens` taught tokens: the signal and the tokens beside it."""
    return tokens * (bytes_per_token(top_k, vocab_size, tail_samples) + token_dtype(vocab_size).itemsize)


def shard_dir(stage_dir: Path, shard: int) -> Path:
    return Path(stage_dir) / f"shard-{shard:05d}"


def shard_files(stage_dir: Path, shard: int) -> list[Path]:
    return [shard_dir(stage_dir, shard) / f"{name}.npy" for name in ARRAYS]


def shard_complete(stage_dir: Path, shard: int) -> bool:
    """Its records were written (after its files), and none of its files was lost since."""
    files = shard_files(stage_dir, shard)
    return (shard_dir(stage_dir, shard) / WRITTEN).exists() and all(path.exists() for path in files)


def write_shard(stage_dir: Path, shard: int, arrays: dict[str, np.ndarray]) -> None:
    """One shard's five arrays, each renamed into place when complete, then their records."""
    folder = shard_dir(stage_dir, shard)
    folder.mkdir(parents=True, exist_ok=True)
    records = {f"{name}.npy": save_shard(folder / f"{name}.npy", arrays[name]) for name in ARRAYS}
    write_json_atomic(folder / WRITTEN, records)  # last: the shard is complete


def write_index(stage_dir: Path, layout: SignalLayout) -> None:

    values = {"format": FORMAT, "version": VERSION, **asdict(layout),
              "index_dtype": layout.index_dtype.name, "logprob_dtype": LOGPROB_DTYPE.name,
              "bytes_per_token": layout.bytes_per_token}
    write_bytes_atomic(Path(stage_dir) / INDEX_FILE, (json.dumps(values, indent=2) + "\n").encode())


def is_teacher_signal(stage_dir: Path) -> bool:
    """Whether `stage_dir` is a teach stage's output (else: an acquire-data stage's)."""
    index = Path(stage_dir) / INDEX_FILE
    return index.exists() and json.loads(index.read_text()).get("format") == FORMAT


def read_layout(stage_dir: Path) -> SignalLayout:
    path = Path(stage_dir) / INDEX_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; {stage_dir} is not a finished teach stage "
                                "(rerun the build: the teach pass resumes at its first missing shard)")
    values = json.loads(path.read_text())
    if values.get("format") != FORMAT or values.get("version") != VERSION:
        raise ValueError(f"{path} is format {values.get('format')!r} version {values.get('version')!r}; "
                         f"this minizoo reads {FORMAT!r} version {VERSION}: rerun the teach stage")
    return SignalLayout(**{name: values[name] for name in SignalLayout.__dataclass_fields__})


class TeacherSignal:
    """The taught rows, read by memory-mapping: `signal[rows]` gives their tokens (so it is a
    `builder.training.data.Blocks`), `targets(rows)` the teacher's top-k signal for them."""

    def __init__(self, stage_dir: Path | str, layout: SignalLayout):
        self.stage_dir, self.layout = Path(stage_dir), layout
        self.seq_len, self.top_k = layout.seq_len, layout.top_k
        self._maps = MappedFiles()

    @classmethod
    def open(cls, stage_dir: Path | str) -> "TeacherSignal":
        return cls(stage_dir, read_layout(Path(stage_dir)))

    def __len__(self) -> int:
        return self.layout.rows

    def verify_share(self, rank: int, size: int) -> None:
        """Check the files of shards rank, rank + size, ... whole now, and no file when it is
        mapped later: `size` training workers each check their share of a signal of many TB once."""
        verify_files(path for shard in range(rank, self.layout.shards, size)
                     for path in shard_files(self.stage_dir, shard))
        self._maps = MappedFiles(verify=False)

    def __getitem__(self, rows: torch.Tensor | np.ndarray) -> torch.Tensor:
        return torch.from_numpy(self._gather(rows, "tokens").astype(np.int64))

    def targets(self, rows: torch.Tensor | np.ndarray) -> TopKTarget:
        """The signal of every token of `rows`, one row per token as the losses take it
        (indices [B * seq_len, k], log-probabilities in float16, tail, drawn tail ids)."""
        def read(name: str, dtype=None) -> torch.Tensor:
            values = self._gather(rows, name)
            return torch.from_numpy(values if dtype is None else values.astype(dtype)).flatten(0, 1)

        drawn = read("samples", np.int64) if self.layout.tail_samples else None
        return TopKTarget(read("indices", np.int64), read("logprobs"), read("tail"), drawn)

    def _gather(self, rows, name: str) -> np.ndarray:
        rows = np.asarray(rows.cpu() if isinstance(rows, torch.Tensor) else rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"signal rows must lie in [0, {len(self)})")
        shard_of, within = np.divmod(rows, self.layout.shard_rows)
        first = self._map(int(shard_of[0]) if rows.size else 0, name)
        out = np.empty((len(rows), *first.shape[1:]), dtype=first.dtype)
        for shard in np.unique(shard_of):
            here = shard_of == shard
            out[here] = self._map(int(shard), name)[within[here]]
        return out

    def _map(self, shard: int, name: str) -> np.ndarray:
        return self._maps.open(shard_dir(self.stage_dir, shard) / f"{name}.npy")

    def __getstate__(self) -> dict:  # cheap to send to a Ray worker: paths, no open maps
        return {**self.__dict__, "_maps": self._maps.emptied()}

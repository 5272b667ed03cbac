"""The on-disk token block format (builder.data.tokens): writer, index and memory-mapped reader.

Run: .venv/bin/pytest tests/test_tokens.py -q   (about a second)
"""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from builder.data.tokens import BlocksIndex, ShardWriter, TokenBlocks, token_dtype

SEQ_LEN = 5


def write_split(stage_dir, tokens: np.ndarray, shard_blocks: int, vocab_size: int = 1000,
                split: str = "train") -> TokenBlocks:
    index = BlocksIndex(SEQ_LEN, token_dtype(vocab_size).name, vocab_size)
    writer = ShardWriter(stage_dir, split, SEQ_LEN, token_dtype(vocab_size), shard_blocks=shard_blocks)
    for piece in np.array_split(tokens, 7):  # uneven appends: packing must not depend on them
        writer.add(piece)
    index.splits[split] = writer.close()
    index.write(stage_dir)
    return TokenBlocks.open(stage_dir, split)


@pytest.fixture
def stream() -> np.ndarray:
    return np.arange(10 * SEQ_LEN + 3) % 1000  # 10 full blocks and 3 leftover tokens


def test_blocks_across_shard_boundaries(tmp_path, stream):
    blocks = write_split(tmp_path, stream, shard_blocks=3)
    expected = torch.from_numpy(stream[:10 * SEQ_LEN].reshape(10, SEQ_LEN).astype(np.int64))
    assert len(blocks) == 10 and blocks.seq_len == SEQ_LEN
    assert [s.blocks for s in blocks.shards] == [3, 3, 3, 1]
    order = np.array([9, 0, 3, 2, 5, 5, -1])  # every shard, repeats, a negative index
    assert torch.equal(blocks[order], expected[order])
    assert torch.equal(blocks[torch.tensor(order)], expected[order])
    assert torch.equal(blocks[2:8], expected[2:8])
    assert torch.equal(blocks[1:9:3], expected[1:9:3])
    assert torch.equal(blocks.head(4), expected[:4])
    assert torch.equal(blocks.head(None), expected)
    assert torch.equal(blocks.head(99), expected)
    assert blocks[np.array([], dtype=np.int64)].shape == (0, SEQ_LEN)
    assert blocks[:].dtype == torch.int64


def test_out_of_range_index_is_refused(tmp_path, stream):
    blocks = write_split(tmp_path, stream, shard_blocks=4)
    with pytest.raises(IndexError):
        blocks[np.array([10])]
    with pytest.raises(IndexError):
        blocks[np.array([0.5])]


def test_shards_are_plain_npy_files(tmp_path, stream):
    write_split(tmp_path, stream, shard_blocks=4)
    index = BlocksIndex.read(tmp_path)
    shard = np.load(tmp_path / index.splits["train"].shards[0].file, mmap_mode="r")
    assert isinstance(shard, np.memmap) and shard.shape == (4, SEQ_LEN)
    assert index.splits["train"].tokens == 10 * SEQ_LEN
    assert not list(tmp_path.rglob("*.tmp"))


@pytest.mark.parametrize("vocab_size, dtype", [(65536, np.uint16), (65537, np.uint32), (151_936, np.uint32)])
def test_dtype_fits_the_vocabulary(tmp_path, vocab_size, dtype):
    top = np.array([vocab_size - 1] * SEQ_LEN)  # the largest id survives the round trip
    blocks = write_split(tmp_path, top, shard_blocks=2, vocab_size=vocab_size)
    assert token_dtype(vocab_size) == dtype
    assert np.load(tmp_path / blocks.shards[0].file).dtype == dtype
    assert int(blocks[:1].max()) == vocab_size - 1


def test_pickling_drops_the_maps(tmp_path, stream):
    blocks = write_split(tmp_path, stream, shard_blocks=3)
    blocks[np.arange(10)]  # opens every shard
    copy = pickle.loads(pickle.dumps(blocks))
    assert len(pickle.dumps(blocks)) < 2000  # paths and offsets, not shard contents
    assert torch.equal(copy[:], blocks[:])


def test_missing_index_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="rerun the build"):
        TokenBlocks.open(tmp_path, "train")

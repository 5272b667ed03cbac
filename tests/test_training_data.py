"""The training data path: seeded permutations, the block stream over memory-mapped shards,
per-rank slices and resume by stream offset.

Run: .venv/bin/pytest tests/test_training_data.py -q   (a few seconds)
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from builder.data.tokens import TokenBlocks
from builder.training.data import BlockStream, open_blocks
from builder.training.parallel import World
from builder.training.settings import TrainSettings
from builder.data.shuffle import Permutation
from block_files import write_blocks

SEQ_LEN = 8


def corpus(n: int = 50) -> torch.Tensor:
    """Block i holds i in every position, so a batch says which blocks it read."""
    return torch.arange(n).repeat_interleave(SEQ_LEN).reshape(n, SEQ_LEN)


@pytest.mark.parametrize("n", [1, 2, 3, 17, 64, 1000, 4097])
def test_a_permutation_is_a_bijection_for_any_size(n):
    perm = Permutation(n, (0, 0))
    assert sorted(perm(np.arange(n)).tolist()) == list(range(n))


def test_a_permutation_depends_on_its_key_only_and_mixes():
    n, positions = 10_000, np.arange(10_000)
    order = Permutation(n, (3, 1))(positions)
    assert np.array_equal(order, Permutation(n, (3, 1))(positions))  # deterministic
    assert np.array_equal(order[1234:1300], Permutation(n, (3, 1))(positions[1234:1300]))  # any slice
    others = [Permutation(n, key)(positions) for key in [(3, 2), (4, 1)]]  # next epoch, other seed
    assert all(np.mean(order == other) < 0.01 for other in others)
    # A random permutation has about one fixed point and no correlation with the identity;
    # |r| < 0.05 is 5 standard deviations (1/sqrt(n) = 0.01).
    assert np.sum(order == positions) < 10
    assert abs(np.corrcoef(order, positions)[0, 1]) < 0.05
    assert abs(np.corrcoef(order[:-1], order[1:])[0, 1]) < 0.05  # neighbours land far apart


def test_memory_mapped_blocks_stream_exactly_as_the_same_tensor(tmp_path):
    blocks = corpus()
    write_blocks(tmp_path, blocks)
    settings, world = TrainSettings(tokens=1, batch_size=3, grad_accum=2, seed=5), World(0, 1, False)
    on_disk = BlockStream(open_blocks(tmp_path), settings, world)
    in_memory = BlockStream(open_blocks(blocks), settings, world)
    assert isinstance(on_disk.blocks, TokenBlocks)
    for step in range(1, 30):  # several epochs of 50 blocks
        for micro in range(2):
            assert torch.equal(on_disk.micro_batch(step, micro), in_memory.micro_batch(step, micro))


def test_each_epoch_reads_every_block_once_in_a_new_order():
    n = 48
    stream = BlockStream(corpus(n), TrainSettings(tokens=1, batch_size=4, seed=1), World(0, 1, False))
    epochs = [stream.take(e * n, n)[:, 0].tolist() for e in range(3)]
    assert all(sorted(epoch) == list(range(n)) for epoch in epochs)
    assert epochs[0] != epochs[1] != epochs[2] and epochs[0] != list(range(n))
    straddling = stream.take(n - 2, 4)[:, 0].tolist()  # a batch across an epoch boundary
    assert straddling == epochs[0][-2:] + epochs[1][:2]


def step_rows(world_size: int, step: int) -> list[list[int]]:
    """Each rank's block ids of one step, for a global batch of 8 sequences."""
    settings = TrainSettings(tokens=1, batch_size=8 // (2 * world_size), grad_accum=2, seed=2)
    streams = [BlockStream(corpus(), settings, World(rank, world_size, True)) for rank in range(world_size)]
    return [sum((s.micro_batch(step, m)[:, 0].tolist() for m in range(2)), []) for s in streams]


@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_read_disjoint_slices_of_the_same_global_batch(world_size):
    for step in (1, 3, 7, 10):  # 8 blocks a step of 50: step 7 straddles two epochs
        single = step_rows(1, step)[0]
        ranks = step_rows(world_size, step)
        assert sorted(sum(ranks, [])) == sorted(single)  # the same sequences on any world size
        if step != 7:  # (across epochs one block may come twice, once from each)
            assert all(set(a).isdisjoint(b) for i, a in enumerate(ranks) for b in ranks[i + 1:])


def test_a_resumed_stream_continues_from_the_checkpoints_sample_offset():
    settings = TrainSettings(tokens=1, batch_size=3, grad_accum=2, seed=4)
    uninterrupted = BlockStream(corpus(), settings, World(0, 1, False))
    expected = [uninterrupted.micro_batch(step, m) for step in range(1, 21) for m in range(2)]
    # A new stream (a new process) resumed after step 8: its next read starts at the
    # checkpoint's offset, 8 steps * 6 sequences, and continues as if never interrupted.
    resumed = BlockStream(corpus(), settings, World(0, 1, False))
    assert resumed.samples_before(9) == 8 * 6
    assert torch.equal(resumed.take(8 * 6, 3), expected[16])
    got = [resumed.micro_batch(step, m) for step in range(9, 21) for m in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(got, expected[16:], strict=True))


def test_token_ids_are_checked_as_they_are_read(tmp_path):
    blocks = corpus(10)
    blocks[7, 3] = 999
    stream = BlockStream(blocks, TrainSettings(tokens=1, batch_size=10), World(0, 1, False), vocab_size=384)
    with pytest.raises(ValueError, match=r"token ids in \[0, 999\] but the model's vocab_size is 384"):
        stream.micro_batch(1, 0)


def test_empty_or_too_short_blocks_are_refused(tmp_path):
    with pytest.raises(ValueError, match="at least one block"):
        open_blocks(torch.zeros((0, SEQ_LEN), dtype=torch.long))
    write_blocks(tmp_path, torch.zeros((3, 1), dtype=torch.long))
    with pytest.raises(ValueError, match="3 blocks of 1 tokens"):
        open_blocks(tmp_path)

"""The teach pass and its stored signal (builder.teaching.teach_pass, builder.teaching.signal): what it
stores, that it resumes per shard, and that a student learning from it learns what it
would have learned from the online teacher."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from builder.teaching.teach_pass import TeachJob, finish, teach_locally
from builder.teaching.signal import SignalLayout, TeacherSignal, bytes_per_token, shard_dir
from builder.data.tokens import ShardWriter, BlocksIndex, TokenBlocks, token_dtype
from builder.training.loop import distill
from builder.training.settings import TrainSettings
from builder.teaching.target import topk_target
from builder.store.integrity import WRITTEN
from tests.tiny_models import TINY_VOCAB, one_thread, save_tiny_checkpoint, tiny_model  # noqa: F401

SEQ_LEN = 16
TRAIN_BLOCKS = 23


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """An acquire-data stage dir with TRAIN_BLOCKS random train blocks in shards of 5."""
    folder = tmp_path_factory.mktemp("data")
    dtype = token_dtype(TINY_VOCAB)
    writer = ShardWriter(folder, "train", SEQ_LEN, dtype, shard_blocks=5)
    writer.add(np.random.default_rng(0).integers(3, TINY_VOCAB, TRAIN_BLOCKS * SEQ_LEN).astype(dtype))
    BlocksIndex(SEQ_LEN, dtype.name, TINY_VOCAB, {"train": writer.close()}).write(folder)
    return folder


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("teacher") / "model", seed=5)


def _job(teacher_dir, data_dir, out_dir, positions=12, top_k=8, shard_rows=5, tail_samples=6) -> TeachJob:
    layout = SignalLayout.plan(positions, TRAIN_BLOCKS, SEQ_LEN, top_k, 1.0, TINY_VOCAB, tail_samples)
    layout = dataclasses.replace(layout, shard_rows=shard_rows)  # several shards of a tiny signal
    return TeachJob(str(teacher_dir), str(data_dir), str(out_dir), layout, batch_size=4)


def test_the_taught_rows_are_a_sample_of_the_split_not_its_prefix():
    layout = SignalLayout.plan(positions=40, train_blocks=1000, seq_len=8, top_k=4, temperature=1.0, vocab_size=50)
    blocks = layout.taught_blocks(np.arange(layout.rows))
    assert layout.rows == 40 and len(set(blocks.tolist())) == 40 and blocks.min() >= 0 and blocks.max() < 1000
    assert blocks.max() > 100  # a prefix would be 0..39; a uniform sample of 40 of 1000 reaches past 100
    # More positions than blocks: every block once (students then loop over them).
    every = SignalLayout.plan(positions=5000, train_blocks=1000, seq_len=8, top_k=4, temperature=1.0, vocab_size=50)
    assert every.rows == 1000 and sorted(every.taught_blocks(np.arange(1000)).tolist()) == list(range(1000))


def test_bytes_per_token_is_under_400_at_k64_for_any_vocabulary():
    assert bytes_per_token(64, 49152) == 64 * (2 + 2) + 2  # uint16 ids, fp16 log-probs, fp16 tail
    assert bytes_per_token(64, 151936) == 64 * (4 + 2) + 2 < 400  # Qwen3's vocabulary needs uint32 ids
    assert bytes_per_token(32, 49152, 64) == 32 * (2 + 2) + 2 + 64 * 2  # the draws: an id each, no value


def test_the_stored_signal_is_the_teachers_top_k_of_the_taught_rows(teacher_dir, data_dir, tmp_path):
    job = _job(teacher_dir, data_dir, tmp_path / "signal")
    done = teach_locally(job)
    summary = finish(job)
    assert [d["shard"] for d in done] == [0, 1, 2] and summary["rows"] == 12
    signal = TeacherSignal.open(tmp_path / "signal")
    rows = np.array([0, 4, 5, 11])  # across all three shards
    train = TokenBlocks.open(data_dir, "train")
    tokens = signal[torch.from_numpy(rows)]
    assert torch.equal(tokens, train[torch.from_numpy(job.layout.taught_blocks(rows))])
    with torch.no_grad():
        logits = tiny_model(seed=5)(input_ids=tokens).logits.flatten(0, 1)
    expected = topk_target(logits, 8)
    target = signal.targets(rows)
    assert target.logprobs.dtype == torch.float16 and target.indices.shape == (4 * SEQ_LEN, 8)
    assert torch.equal(target.indices, expected.indices)
    # float16 keeps 11 significant bits: a log-probability of magnitude m is stored within m * 2^-11.
    bound = expected.logprobs.abs() * 2**-11 + 1e-6
    assert (target.logprobs.float() - expected.logprobs).abs().le(bound).all()
    stored = target.tail_logprob.float()
    assert (stored - expected.tail_logprob).abs().le(expected.tail_logprob.abs() * 2**-11 + 1e-6).all()
    # The draws come from the tail: never one of the token's top-k ids (tests/test_topk_losses.py
    # checks that they follow the teacher's distribution there).
    assert target.tail_ids.shape == (4 * SEQ_LEN, 6)
    assert not (target.tail_ids.unsqueeze(-1) == target.indices.unsqueeze(-2)).any()
    size = sum(f.stat().st_size for f in (tmp_path / "signal").glob("shard-*/*.npy") if f.stem != "tokens")
    header_bytes = 3 * 4 * 128  # each .npy header is at most 128 bytes here
    assert abs(size - 12 * SEQ_LEN * summary["bytes_per_token"]) <= header_bytes


def test_a_killed_pass_resumes_at_the_missing_shard_only(teacher_dir, data_dir, tmp_path):
    job = _job(teacher_dir, data_dir, tmp_path / "signal")
    teach_locally(job)
    kept = shard_dir(tmp_path / "signal", 0) / "logprobs.npy"
    before = (kept.stat().st_mtime_ns, kept.read_bytes())
    lost = shard_dir(tmp_path / "signal", 1) / "tokens.npy"
    drawn = shard_dir(tmp_path / "signal", 1) / "samples.npy"
    reference = lost.read_bytes(), drawn.read_bytes()
    lost.unlink()  # the pass died before this shard's last file was renamed into place
    assert job.pending() == [1]
    lost.write_bytes(reference[0])
    (shard_dir(tmp_path / "signal", 1) / WRITTEN).unlink()  # or died before writing its records
    assert job.pending() == [1]
    assert [d["shard"] for d in teach_locally(job)] == [1]
    assert (kept.stat().st_mtime_ns, kept.read_bytes()) == before
    assert (lost.read_bytes(), drawn.read_bytes()) == reference  # the same rows, the same tail draws
    with pytest.raises(FileNotFoundError, match="not a finished teach stage"):
        TeacherSignal.open(tmp_path / "signal")  # index.json comes with finish(), after every shard
    finish(job)
    assert len(TeacherSignal.open(tmp_path / "signal")) == 12


def test_the_pass_runs_data_parallel_on_ray_actors(teacher_dir, data_dir, tmp_path, monkeypatch):
    """Two 1-CPU actors on a 2-CPU local Ray instance teach the shards, and the signal is the
    one a single process writes. A shard goes only to an actor that has started, so on a
    loaded machine the first can teach all ten tiny shards before the second has loaded
    torch: how started actors share the work is tested in tests/test_gpu_node.py."""
    from builder.options.run_options import RunOptions
    from builder.teaching.ray_pool import teach_on_ray
    from builder.running.ray_session import init_ray, shutdown_ray

    for name in ("RAY_ADDRESS", "RAY_TMPDIR"):
        monkeypatch.delenv(name, raising=False)
    options = RunOptions(local_cpus=2, cpus_per_stage=2, train_workers=2)
    job = _job(teacher_dir, data_dir, tmp_path / "ray", positions=20, shard_rows=2)
    init_ray(options)
    try:
        taught = teach_on_ray(job, options)
    finally:
        shutdown_ray()
    assert sorted(done["shard"] for done in taught) == list(range(10))
    assert len({done["worker"] for done in taught}) in (1, 2)
    assert {(done["placement"]["device"], done["placement"]["dtype"]) for done in taught} == {("cpu", "float32")}
    alone = _job(teacher_dir, data_dir, tmp_path / "alone", positions=20, shard_rows=2)
    teach_locally(alone)
    for name in ("tokens", "indices", "logprobs", "tail", "samples"):
        for shard in range(10):
            assert np.array_equal(np.load(shard_dir(tmp_path / "ray", shard) / f"{name}.npy"),
                                  np.load(shard_dir(tmp_path / "alone", shard) / f"{name}.npy"))


def test_a_student_learns_from_the_full_stored_signal_what_it_learns_online(teacher_dir, data_dir, tmp_path):
    """With k = the whole vocabulary the stored signal is the teacher's distribution, up to
    float16: the same steps on the same rows give the same losses as the online teacher."""
    job = _job(teacher_dir, data_dir, tmp_path / "signal", positions=8, top_k=TINY_VOCAB, shard_rows=8)
    teach_locally(job)
    finish(job)
    student = save_tiny_checkpoint(tmp_path / "student", seed=6)
    settings = TrainSettings(tokens=4 * 2 * SEQ_LEN, batch_size=2, learning_rate=1e-3, warmup_steps=0, seed=3)
    stored = distill(teacher_dir, student, tmp_path / "signal", tmp_path / "stored", settings)
    # Online, on a tensor of the very rows the signal holds, in its order: the stream then
    # reads the same tokens at every step.
    train = TokenBlocks.open(data_dir, "train")
    taught = train[torch.from_numpy(job.layout.taught_blocks(np.arange(job.layout.rows)))]
    online = distill(teacher_dir, student, taught, tmp_path / "online", settings)
    losses = [_losses(tmp_path / name) for name in ("stored", "online")]
    # float16 log-probabilities (relative error 2^-11, |log q| <= log(vocab) + a few) move each
    # token's KL by about that much times the log-probabilities' size; over 4 steps of Adam
    # the trajectories stay within a few times that.
    tolerance = 8 * 2**-11 * (math.log(TINY_VOCAB) + 4)
    assert stored.steps == online.steps == 4
    assert np.allclose(losses[0], losses[1], atol=tolerance, rtol=0), losses


def _losses(out_dir) -> list[float]:
    import json

    return [json.loads(line)["loss"] for line in (out_dir / "metrics.jsonl").read_text().splitlines()]

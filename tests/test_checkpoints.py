"""Sharded checkpoints (torch.distributed.checkpoint) and the final Hugging Face export.

Run: .venv/bin/pytest tests/test_checkpoints.py -q   (about a minute on 2 busy cores)
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
from transformers import AutoModelForCausalLM

from builder.models.loading import load_model
from builder.training.loop import distill
from builder.training.settings import TrainSettings
from builder.training.checkpoints import resume_from_checkpoint, save_checkpoint
from builder.training.optim import make_optimizer, warmup_cosine_schedule
from builder.training.parallel import World, wrap_for_distributed
from tiny_models import TINY_VOCAB, save_tiny_checkpoint, one_thread  # noqa: F401 (autouse fixture)

SEQ_LEN = 16
SETTINGS = TrainSettings(tokens=4 * SEQ_LEN * 10, batch_size=2, learning_rate=1e-2, warmup_steps=0,
                         weight_decay=0.1)
PLAN = {"total_steps": 10, "tokens_per_step": 4 * SEQ_LEN, "seed": 0, "blocks": 8}
CPU = torch.device("cpu")


def trainee(model_dir: Path, world: World, parallel: str = "fsdp"):
    model = wrap_for_distributed(load_model(model_dir, trainable=True), CPU, world, parallel)
    optimizer = make_optimizer(model, SETTINGS)
    return model, optimizer, warmup_cosine_schedule(optimizer, SETTINGS, PLAN["total_steps"])


def train_two_steps_and_save(rank: int, world_size: int, rendezvous: str, model_dir: str, out_dir: str) -> None:
    """One FSDP2 rank: two optimizer steps on its own half of the batch, then a sharded
    checkpoint; rank 0 also keeps the gathered full state to compare with."""
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        world = World.current()
        model, optimizer, scheduler = trainee(Path(model_dir), world)
        ids = torch.randint(3, TINY_VOCAB, (world_size * 2, SEQ_LEN), generator=torch.Generator().manual_seed(0))
        for _ in range(2):
            optimizer.zero_grad()
            model(input_ids=ids[rank * 2:rank * 2 + 2], labels=ids[rank * 2:rank * 2 + 2]).loss.backward()
            optimizer.step()
            scheduler.step()
        save_checkpoint(Path(out_dir), model, optimizer, scheduler, world, PLAN, {"step": 2, "loss": 1.0, "samples": 8})
        full = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if world.is_main:
            torch.save(full, Path(out_dir) / "gathered.pt")
    finally:
        dist.destroy_process_group()


def load_on_two_ranks(rank: int, world_size: int, rendezvous: str, model_dir: str, out_dir: str) -> None:
    """One FSDP2 rank resuming the checkpoint; rank 0 keeps the gathered full state."""
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        world = World.current()
        model, optimizer, scheduler = trainee(Path(model_dir), world)
        resume_from_checkpoint(Path(out_dir), model, optimizer, scheduler, world, PLAN)
        full = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if world.is_main:
            torch.save(full, Path(out_dir) / "reloaded.pt")
    finally:
        dist.destroy_process_group()


def assert_same_state(got: tuple[dict, dict], expected: tuple[dict, dict]) -> None:
    """Model tensors and optimizer moments by name, bit-identical (re-sharding only copies)."""
    (got_model, got_optimizer), (expected_model, expected_optimizer) = got, expected
    assert got_model.keys() == expected_model.keys()
    for name, tensor in expected_model.items():
        assert torch.equal(got_model[name], tensor), name
    assert got_optimizer["state"].keys() == expected_optimizer["state"].keys()
    for name, moments in expected_optimizer["state"].items():
        for key, tensor in moments.items():
            assert torch.equal(got_optimizer["state"][name][key], tensor), (name, key)


def test_fsdp_shards_saved_on_two_ranks_load_on_two_ranks_and_on_one(tmp_path):
    model_dir = save_tiny_checkpoint(tmp_path / "model", num_hidden_layers=2)
    paths = (str(model_dir), str(tmp_path / "run"))
    mp.spawn(train_two_steps_and_save, args=(2, str(tmp_path / "save"), *paths), nprocs=2)
    step_dir = tmp_path / "run" / "checkpoints" / "step-000002"
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step-000002"
    assert {"rng-00000.pt", "rng-00001.pt", "trainer_state.pt", ".metadata"} <= {p.name for p in step_dir.iterdir()}
    assert len(list(step_dir.glob("*.distcp"))) == 2  # each rank wrote its own shards

    expected = torch.load(tmp_path / "run" / "gathered.pt", weights_only=False)

    mp.spawn(load_on_two_ranks, args=(2, str(tmp_path / "load"), *paths), nprocs=2)  # the same world
    assert_same_state(torch.load(tmp_path / "run" / "reloaded.pt", weights_only=False), expected)

    model, optimizer, scheduler = trainee(model_dir, World(0, 1, False))  # one process: re-sharded
    state = resume_from_checkpoint(tmp_path / "run", model, optimizer, scheduler, World(0, 1, False), PLAN)
    assert (state["step"], state["samples"], state["world_size"]) == (2, 8, 2)
    assert_same_state(get_state_dict(model, optimizer), expected)
    assert scheduler.last_epoch == 2 and optimizer.param_groups[0]["lr"] == scheduler.get_last_lr()[0]


def test_a_checkpoint_resumes_only_its_own_plan(tmp_path):
    model_dir = save_tiny_checkpoint(tmp_path / "model", num_hidden_layers=2)
    model, optimizer, scheduler = trainee(model_dir, World(0, 1, False))
    save_checkpoint(tmp_path, model, optimizer, scheduler, World(0, 1, False), PLAN, {"step": 3, "loss": 1.0,
                                                                                        "samples": 12})
    other = {**PLAN, "blocks": 9}  # the same steps over other data
    with pytest.raises(ValueError, match="step-000003.*same tokens, seed, data"):
        resume_from_checkpoint(tmp_path, model, optimizer, scheduler, World(0, 1, False), other)


def test_the_final_model_is_written_in_shards_that_load_with_identical_logits(tmp_path):
    teacher = save_tiny_checkpoint(tmp_path / "teacher")
    student = save_tiny_checkpoint(tmp_path / "student", seed=1, num_hidden_layers=2)
    blocks = torch.randint(3, TINY_VOCAB, (8, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    settings = TrainSettings(tokens=2 * 4 * SEQ_LEN, learning_rate=1e-2, warmup_steps=0)
    distill(teacher, student, blocks, tmp_path / "whole", settings)  # one 5GB shard: one file
    distill(teacher, student, blocks, tmp_path / "sharded", TrainSettings(**{**vars(settings), "max_shard_size": "100KB"}))

    shards = sorted((tmp_path / "sharded" / "model").glob("model-*-of-*.safetensors"))
    index = json.loads((tmp_path / "sharded" / "model" / "model.safetensors.index.json").read_text())
    assert len(shards) > 1 and {p.name for p in shards} == set(index["weight_map"].values())
    assert all(p.stat().st_size < 100_000 + 10_000 for p in shards)  # 100KB plus a header
    whole = AutoModelForCausalLM.from_pretrained(tmp_path / "whole" / "model")
    sharded = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded" / "model")
    with torch.no_grad():  # same run, same weights: bit-identical logits
        assert torch.equal(sharded(blocks).logits, whole(blocks).logits)


def test_max_shard_size_must_be_a_size():
    with pytest.raises(ValueError, match="max_shard_size='5 gigs'.*such as \"5GB\""):
        TrainSettings(tokens=1, max_shard_size="5 gigs")


def test_cpu_training_on_a_gpu_machine_keeps_no_cuda_rng_state(monkeypatch):
    """A CPU run on a machine with GPUs: asking for every GPU's RNG state would open a CUDA
    context on each at the first checkpoint; a process that never used CUDA has none to keep."""
    from builder.training import checkpoints

    def opens_cuda():
        raise AssertionError("CPU training touched CUDA at a checkpoint")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # GPUs on the machine...
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)  # ...that this process never used
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", opens_cuda)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda state: opens_cuda())
    state = checkpoints._rng_state()
    assert "cuda" not in state
    checkpoints._set_rng_state(state | {"cuda": [torch.zeros(1)]})  # a GPU run's checkpoint, resumed on a CPU

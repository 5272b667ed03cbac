"""FSDP2 from the meta device (builder.training.sharded) on two gloo ranks: each rank reads only
its own rows, the gathered weights are the checkpoint's, a sharded bf16 teacher computes what
the whole one does, and training from a sharded load matches one process, with the frozen
teacher replicated and sharded (builder.models.teacher_sharding's rule, forced here); the
gathered student is stored in the teacher's dtype.

Run: .venv/bin/pytest tests/test_sharded_load.py -q
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from builder.models.loading import load_model
from builder.training.loop import distill
from builder.training.parallel import is_fsdp
from builder.training.settings import TrainSettings
from builder.training.sharded import load_sharded
from tiny_models import TINY_VOCAB, save_tiny_checkpoint

SEQ_LEN = 32


def _in_group(rank: int, world_size: int, rendezvous: str, work) -> None:
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        work(rank)
    finally:
        dist.destroy_process_group()


def load_both_ways(rank: int, world_size: int, rendezvous: str, model_dir: str, out: str) -> None:
    def work(rank: int) -> None:
        student = load_sharded(model_dir, torch.device("cpu"), torch.float32, trainable=True)
        local_rows = {name: p.to_local().shape[0] for name, p in student.named_parameters()}
        full = get_model_state_dict(student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        teacher = load_sharded(model_dir, torch.device("cpu"), torch.bfloat16, trainable=False,
                               compute_dtype=torch.bfloat16)
        tokens = torch.arange(3, 3 + SEQ_LEN).unsqueeze(0)
        with torch.no_grad():
            logits = teacher(input_ids=tokens, use_cache=False).logits
        torch.save({"full": full, "rows": local_rows, "logits": logits, "training": student.training,
                    "teacher_trains": any(p.requires_grad for p in teacher.parameters())},
                   Path(out) / f"rank-{rank}.pt")

    _in_group(rank, world_size, rendezvous, work)


def test_each_rank_reads_its_own_rows_and_together_they_hold_the_checkpoint(tmp_path):
    model_dir = save_tiny_checkpoint(tmp_path / "model", num_hidden_layers=2)
    mp.spawn(load_both_ways, args=(2, str(tmp_path / "rendezvous"), str(model_dir), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank-{r}.pt", weights_only=False) for r in (0, 1)]
    saved = load_file(str(model_dir / "model.safetensors"))
    embed = "model.embed_tokens.weight"
    assert ranks[0]["rows"][embed] == ranks[1]["rows"][embed] == TINY_VOCAB // 2  # half the rows each
    for name, tensor in saved.items():
        torch.testing.assert_close(ranks[0]["full"][name], tensor, rtol=0, atol=0)
    assert ranks[0]["training"] and not ranks[0]["teacher_trains"]
    # The sharded bf16 teacher computes what the whole bf16 model does (rotary buffers included).
    whole = load_model(model_dir, "cpu", torch.bfloat16)
    with torch.no_grad():
        expected = whole(input_ids=torch.arange(3, 3 + SEQ_LEN).unsqueeze(0), use_cache=False).logits
    for rank in ranks:
        torch.testing.assert_close(rank["logits"], expected)


def train_on_two_ranks(rank: int, world_size: int, rendezvous: str, teacher: str, student: str, blocks: str,
                       out: str, dtype: str, shard_teacher: bool = False, stored_dtype: str = "float32") -> None:
    import builder.models.teacher_sharding as teacher_sharding
    import builder.training.loop as loop

    settings = TrainSettings(tokens=4 * 2 * 2 * SEQ_LEN, batch_size=2, learning_rate=3e-3, warmup_steps=1,
                             dtype=dtype, activation_checkpointing=True, stored_dtype=stored_dtype)
    if shard_teacher:  # any teacher is then over the fraction of this machine's memory it may take whole
        teacher_sharding.REPLICATED_TEACHER_FRACTION = 0.0
    load_teacher = loop._load_teacher

    def recorded(*args):  # which placement the loop chose
        model = load_teacher(*args)
        (Path(out).parent / f"teacher-sharded-{rank}").write_text(str(is_fsdp(model)))
        return model

    loop._load_teacher = recorded
    _in_group(rank, world_size, rendezvous, lambda _: distill(teacher, student, torch.load(blocks), out, settings,
                                                              parallel="fsdp"))


@pytest.mark.parametrize("shard_teacher", [False, True], ids=["replicated-teacher", "sharded-teacher"])
def test_fsdp_training_from_a_sharded_load_matches_one_process(tmp_path, shard_teacher):
    teacher = save_tiny_checkpoint(tmp_path / "teacher", seed=0)
    student = save_tiny_checkpoint(tmp_path / "student", seed=1, num_hidden_layers=2)
    blocks = torch.randint(3, TINY_VOCAB, (32, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    torch.save(blocks, tmp_path / "blocks.pt")
    paths = (str(teacher), str(student), str(tmp_path / "blocks.pt"))
    mp.spawn(train_on_two_ranks, args=(2, str(tmp_path / "r1"), *paths, str(tmp_path / "fsdp"), "float32",
                                       shard_teacher), nprocs=2)
    assert {(tmp_path / f"teacher-sharded-{rank}").read_text() for rank in (0, 1)} == {str(shard_teacher)}
    settings = TrainSettings(tokens=4 * 4 * SEQ_LEN, batch_size=4, learning_rate=3e-3, warmup_steps=1)
    torch.set_num_threads(1)
    distill(teacher, student, blocks, tmp_path / "one", settings)
    expected = load_file(str(tmp_path / "one" / "model" / "model.safetensors"))
    got = load_file(str(tmp_path / "fsdp" / "model" / "model.safetensors"))
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-4, atol=1e-5)


def test_bf16_mixed_precision_trains_on_two_ranks(tmp_path):
    """MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32): bf16 all-gathers over gloo,
    fp32 master weights saved. Only that it runs and learns: bf16 rounding differs by layout."""
    teacher = save_tiny_checkpoint(tmp_path / "teacher", seed=0)
    student = save_tiny_checkpoint(tmp_path / "student", seed=1, num_hidden_layers=2)
    torch.save(torch.randint(3, TINY_VOCAB, (32, SEQ_LEN), generator=torch.Generator().manual_seed(0)),
               tmp_path / "blocks.pt")
    paths = (str(teacher), str(student), str(tmp_path / "blocks.pt"))
    mp.spawn(train_on_two_ranks, args=(2, str(tmp_path / "r"), *paths, str(tmp_path / "bf16"), "bfloat16"), nprocs=2)
    got = load_file(str(tmp_path / "bf16" / "model" / "model.safetensors"))
    before = load_file(str(student / "model.safetensors"))
    assert all(t.dtype == torch.float32 for t in got.values())
    assert any(not torch.equal(got[name], before[name]) for name in before)


def test_fsdp_stores_the_gathered_student_in_the_teachers_dtype(tmp_path):
    """Issue 24: under FSDP2 the final model is the gathered float32 masters, stored in bf16 by rank 0."""
    teacher = save_tiny_checkpoint(tmp_path / "teacher", seed=0)
    student = save_tiny_checkpoint(tmp_path / "student", seed=1, num_hidden_layers=2)
    blocks = torch.randint(3, TINY_VOCAB, (32, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    torch.save(blocks, tmp_path / "blocks.pt")
    paths = (str(teacher), str(student), str(tmp_path / "blocks.pt"))
    mp.spawn(train_on_two_ranks, args=(2, str(tmp_path / "r"), *paths, str(tmp_path / "fsdp"), "float32", False,
                                       "bfloat16"), nprocs=2)
    torch.set_num_threads(1)
    distill(teacher, student, blocks, tmp_path / "one",
            TrainSettings(tokens=4 * 4 * SEQ_LEN, batch_size=4, learning_rate=3e-3, warmup_steps=1))
    expected = load_file(str(tmp_path / "one" / "model" / "model.safetensors"))
    got = load_file(str(tmp_path / "fsdp" / "model" / "model.safetensors"))
    assert got.keys() == expected.keys() and {t.dtype for t in got.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "fsdp" / "model" / "config.json").read_text())["dtype"] == "bfloat16"
    # float32 masters that agree to 1e-4 (the layout's summation order, as above), then rounded to
    # bf16's 8 bits: within one bf16 step (2**-8 relative) of the one-process run's
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name].float(), tensor, rtol=2**-8, atol=1e-5)

"""A byte changed inside a finished stage's file (same size, same header: what the reuse check
cannot see) is found by the stage that reads it. Real stage functions run through
builder.stages.execute.execute_stage (no Ray) on a real plan, with the upstream stages' outputs
written as those stages write them: the reading stage fails naming the file and the stage that
made it, and the next build's decisions (builder.planning.reuse) redo that stage and all it feeds.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from builder.data.tokens import BlocksIndex, ShardWriter, token_dtype
from builder.options.precision import Precision
from builder.options.run_options import RunOptions
from builder.planning.dag import Plan, make_plan
from builder.planning.reuse import decide
from builder.spec.schema import FamilySpec
from builder.stages.base import Stage
from builder.stages.execute import execute_stage
from builder.store.integrity import DamagedFile
from builder.store.stage_store import Manifest, StageKey, StageStore
from test_integrity import flip_a_byte_inside_the_tensors
from test_spec import fast_lm_eval_index  # noqa: F401 (a fixture)
from tiny_models import TINY_VOCAB, one_thread, save_tiny_checkpoint, tiny_config  # noqa: F401 (autouse fixture)

SEQ_LEN = 16


@pytest.fixture
def plan() -> Plan:
    spec = FamilySpec.model_validate({
        "family": "tiny", "teacher": {"source": "embedded:smollm2-135m-instruct"},
        "data": {"seq_len": SEQ_LEN}, "scoring": {"samples": 4, "batch_size": 4}, "distill": {"tokens": "4K"},
        "students": [{"name": "w", "shape": {"hidden_size": 48}}, {"name": "d", "shape": {"num_hidden_layers": 2}}],
    })
    return make_plan(spec, tiny_config(), Precision("float32", "requested"))


def stage(plan: Plan, name: str, label: str = "") -> Stage:
    (found,) = [s for s in plan.stages.values() if s.name == name and s.key.label == label]
    return found


def finish_teacher(plan: Plan, store: StageStore) -> Manifest:
    """The acquire-teacher stage as it leaves a converted teacher: a checkpoint in model/."""
    key = stage(plan, "acquire-teacher").key
    model_dir = save_tiny_checkpoint(store.prepare(key) / "model", seed=0)
    return store.finish(key, 1.0, 0, {"model_dir": str(model_dir)})


def finish_data(plan: Plan, store: StageStore) -> Manifest:
    """The acquire-data stage's token shards (two per split) and index, of random token ids."""
    key = stage(plan, "acquire-data").key
    out, dtype = store.prepare(key), token_dtype(TINY_VOCAB)
    rng = np.random.default_rng(0)
    splits = {}
    for split in ("train", "calibration", "heldout"):
        writer = ShardWriter(out, split, SEQ_LEN, dtype, shard_blocks=4)
        writer.add(rng.integers(3, TINY_VOCAB, 8 * SEQ_LEN))
        splits[split] = writer.close()
    BlocksIndex(SEQ_LEN, dtype.name, TINY_VOCAB, splits).write(out)
    return store.finish(key, 1.0, 0, {"blocks": str(out)})


def flip_a_byte_in_a_shard(path: Path) -> None:
    """The low byte of the last token id (little-endian uint16): same size, same header."""
    with open(path, "r+b") as handle:
        handle.seek(-2, os.SEEK_END)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0x01]))


def redone(plan: Plan, store: StageStore) -> dict[str, str]:
    """The next build's decision for every stage it would not reuse."""
    return {stage_id: decision.state for stage_id, decision in decide(plan, store).items() if not decision.reuse}


def test_scoring_on_a_changed_token_shard_fails_naming_it_and_the_data_stage_is_redone(plan, tmp_path):
    store, options = StageStore(tmp_path), RunOptions(workdir=tmp_path, cpus_per_stage=1)
    inputs = {"teacher": finish_teacher(plan, store), "data": finish_data(plan, store)}
    data_id = stage(plan, "acquire-data").id
    shard = store.root / data_id / "calibration" / "shard-00000.npy"
    flip_a_byte_in_a_shard(shard)
    assert "acquire-data" not in {plan.stages[i].name for i in redone(plan, store)}  # unseen before the read
    score = stage(plan, "score")
    with pytest.raises(DamagedFile) as caught:
        execute_stage(score, plan.spec, options, inputs)
    assert caught.value.path == shard and f"made by stage {data_id}" in str(caught.value)
    assert store.manifest(score.key) is None  # the scores were never finished
    states = redone(plan, store)
    assert states[data_id] == "damaged" and states[score.id] == "todo"
    assert stage(plan, "acquire-teacher").id not in states  # what the data did not feed is kept


def test_pruning_from_a_changed_teacher_weight_fails_naming_it_and_the_teacher_is_redone(plan, tmp_path):
    store, options = StageStore(tmp_path), RunOptions(workdir=tmp_path, cpus_per_stage=1)
    teacher, data = finish_teacher(plan, store), finish_data(plan, store)
    scores = execute_stage(stage(plan, "score"), plan.spec, options, {"teacher": teacher, "data": data})
    inputs = {"teacher": teacher, "scores": scores}
    execute_stage(stage(plan, "prune", "d"), plan.spec, options, inputs)  # intact: it prunes
    weights, teacher_id = Path(teacher.summary["model_dir"]) / "model.safetensors", stage(plan, "acquire-teacher").id
    size = weights.stat().st_size
    flip_a_byte_inside_the_tensors(weights)
    assert weights.stat().st_size == size and teacher_id not in redone(plan, store)  # unseen before the read
    with pytest.raises(DamagedFile) as caught:
        execute_stage(stage(plan, "prune", "w"), plan.spec, options, inputs)
    assert caught.value.path == weights and f"made by stage {teacher_id}" in str(caught.value)
    states = redone(plan, store)
    assert states[teacher_id] == "damaged"
    assert states.keys() == set(plan.stages)  # every stage reads the teacher, directly or not


def finish_signal(store: StageStore, shards: int = 3, rows: int = 2, seq_len: int = 4, top_k: int = 2) -> Path:
    """A finished teach stage whose shards are written as the teach pass writes them."""
    from builder.teaching.signal import SignalLayout, write_index, write_shard

    key = StageKey("teach", "k2", {"positions": shards * rows})
    out = store.prepare(key)
    layout = SignalLayout(shards * rows, shards * rows, seq_len, top_k, 1.0, TINY_VOCAB, shard_rows=rows)
    rng = np.random.default_rng(1)
    for shard in range(shards):
        ids = rng.integers(3, TINY_VOCAB, (rows, seq_len, top_k)).astype(np.uint16)
        write_shard(out, shard, {"indices": ids, "logprobs": -rng.random((rows, seq_len, top_k)).astype(np.float16),
                                 "tail": -rng.random((rows, seq_len)).astype(np.float16) - 3,
                                 "samples": ids[..., :0], "tokens": ids[..., 0]})
    write_index(out, layout)
    store.finish(key, 1.0, 0, {"signal": str(out)})
    return out


def test_training_workers_split_the_signal_check_between_them(tmp_path, monkeypatch):
    import builder.store.integrity as integrity
    from builder.teaching.signal import TeacherSignal, shard_dir

    signal_dir = finish_signal(StageStore(tmp_path))
    damaged = shard_dir(signal_dir, 1) / "logprobs.npy"
    flip_a_byte_in_a_shard(damaged)
    hashed = []
    real_digest = integrity.content_digest
    monkeypatch.setattr(integrity, "content_digest", lambda path: hashed.append(Path(path)) or real_digest(path))
    first = TeacherSignal.open(signal_dir)
    first.verify_share(rank=0, size=2)  # shards 0 and 2: intact
    assert {path.parent.name for path in hashed if path.suffix == ".npy"} == {"shard-00000", "shard-00002"}
    hashed.clear()
    first.targets(np.array([2, 3]))  # rows of shard 1, read by rank 0 as a training step would
    assert hashed == []  # its check is rank 1's, not repeated here
    with pytest.raises(DamagedFile) as caught:
        TeacherSignal.open(signal_dir).verify_share(rank=1, size=2)
    assert caught.value.path == damaged and f"made by stage {signal_dir.name}" in str(caught.value)


def test_verify_reads_every_finished_stage_whole_and_marks_a_damaged_one(tmp_path, capsys, fast_lm_eval_index):
    import torch
    from safetensors.torch import save_file

    from builder.cli import main
    from builder.family import load_and_plan
    from test_cli_plan import GOOD, SMOLLM2_CONFIG

    spec = tmp_path / "tiny.yaml"
    spec.write_text(GOOD)
    flags = ["--workdir", str(tmp_path / "runs"), "--teacher-config", str(SMOLLM2_CONFIG), "--precision", "float32"]
    plan = load_and_plan(spec, RunOptions(workdir=tmp_path / "runs", teacher_config=SMOLLM2_CONFIG,
                                          precision="float32"))
    store = StageStore(tmp_path / "runs")
    for planned in plan.stages.values():
        out = store.prepare(planned.key)
        save_file({"w": torch.arange(64, dtype=torch.float32)}, out / "model.safetensors")
        (out / "config.json").write_text(SMOLLM2_CONFIG.read_text())  # what planning reads of the teacher
        store.finish(planned.key, 1.0, 0, {"model_dir": str(out)})
    assert main(["verify", str(spec), *flags]) == 0
    assert f"all {len(plan.stages)} finished stages are intact" in capsys.readouterr().out

    distill = stage(plan, "distill", "width")
    weights = store.path(distill.key) / "model.safetensors"
    flip_a_byte_inside_the_tensors(weights)
    assert redone(plan, store) == {}  # the reuse check reads no tensor
    assert main(["verify", str(spec), *flags]) == 1
    out = capsys.readouterr().out
    assert f"damaged   {distill.id}: {weights}: its bytes differ" in out
    assert f"1 of {len(plan.stages)} finished stages are damaged" in out
    states = redone(plan, store)  # the mark: the next build redoes it and what reads it
    assert states.pop(distill.id) == "damaged"
    assert set(states) == {stage(plan, "evaluate", "width").id, plan.throughput_stage}  # its readers

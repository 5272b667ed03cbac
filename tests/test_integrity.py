"""Integrity checks (builder.store.integrity) and the stage store's use of them: recorded outputs,
verification before reuse, content digests made as files are written, one holder of a stage's
lock at a time, discarding a stage.
"""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

import builder.store.integrity as integrity
from builder.models.teacher import acquire_teacher
from builder.store.integrity import (CONTENT, WRITTEN, DamagedFile, check_checkpoint, file_record, find_damage,
                                     record_outputs)
from builder.spec.schema import TeacherSpec
from builder.store.stage_store import StageKey, StageStore
from tiny_models import save_tiny_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("teacher") / "model")


def copy_of(checkpoint: Path, to: Path) -> Path:
    to.mkdir(parents=True)
    for file in checkpoint.iterdir():
        (to / file.name).write_bytes(file.read_bytes())
    return to


def truncate(path: Path, keep: float = 0.5) -> None:
    os.truncate(path, int(path.stat().st_size * keep))


# --- a checkpoint folder -------------------------------------------------------------------


def test_a_good_checkpoint_passes(checkpoint):
    check_checkpoint(checkpoint)


def test_a_truncated_teacher_is_rejected_at_acquisition_naming_the_file(checkpoint, tmp_path):
    teacher = copy_of(checkpoint, tmp_path / "teacher")
    truncate(teacher / "model.safetensors")
    started = time.perf_counter()
    with pytest.raises(DamagedFile) as caught:
        acquire_teacher(TeacherSpec(source=str(teacher)), tmp_path / "stage")
    assert caught.value.path == teacher / "model.safetensors"
    assert "model.safetensors" in str(caught.value) and "teacher.source" in str(caught.value)
    # At once: only the header is read (the bound is loose for a shared, busy machine).
    assert time.perf_counter() - started < 10


@pytest.mark.parametrize("fault", ["config", "index", "tokenizer", "header"])
def test_each_damaged_part_of_a_checkpoint_is_named(checkpoint, tmp_path, fault):
    model = copy_of(checkpoint, tmp_path / "model")
    if fault == "config":
        (model / "config.json").write_text("{not json")
        bad = model / "config.json"
    elif fault == "index":
        bad = model / "model.safetensors.index.json"
        bad.write_text(json.dumps({"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}))
    elif fault == "tokenizer":
        (model / "tokenizer.json").write_text("{broken")
        bad = model
    else:  # a header that claims more bytes than the file has
        path = bad = model / "model.safetensors"
        path.write_bytes((2**40).to_bytes(8, "little") + path.read_bytes()[8:])
    with pytest.raises(DamagedFile) as caught:
        check_checkpoint(model)
    assert caught.value.path == bad
    if fault == "index":
        assert "model-00002-of-00002.safetensors" in str(caught.value)


# --- recorded outputs ------------------------------------------------------------------------


def test_safetensors_are_fingerprinted_by_header_and_other_files_by_content_and_all_get_a_digest(checkpoint):
    weights, config = file_record(checkpoint / "model.safetensors"), file_record(checkpoint / "config.json")
    assert set(weights) == {"size", "header_sha256", CONTENT} and set(config) == {"size", "sha256", CONTENT}
    assert weights[CONTENT] != config[CONTENT] and len(weights[CONTENT]) == 32  # 128 bits in hex


@pytest.mark.parametrize("change", ["truncate", "remove", "rewrite"])
def test_a_changed_output_is_found_by_name(checkpoint, tmp_path, change):
    stage = copy_of(checkpoint, tmp_path / "stage" / "model").parent
    outputs = record_outputs(stage)
    assert find_damage(stage, outputs) is None
    if change == "truncate":
        truncate(stage / "model" / "model.safetensors")
        name = "model/model.safetensors"
    elif change == "remove":
        (stage / "model" / "tokenizer.json").unlink()
        name = "model/tokenizer.json"
    else:  # same size, other content
        text = (stage / "model" / "config.json").read_text()
        (stage / "model" / "config.json").write_text(text.replace('"llama"', '"LLAMA"'))
        name = "model/config.json"
    assert find_damage(stage, outputs)[0] == name


def test_token_shards_are_checked_by_their_npy_header(tmp_path):
    import numpy as np

    shard = tmp_path / "train" / "shard-00000.npy"
    shard.parent.mkdir()
    np.save(shard, np.arange(64 * 100, dtype=np.uint16).reshape(100, 64))
    outputs = record_outputs(tmp_path)
    assert set(outputs["train/shard-00000.npy"]) == {"size", "header_sha256", CONTENT}
    truncate(shard)
    assert find_damage(tmp_path, outputs)[0] == "train/shard-00000.npy"
    with pytest.raises(DamagedFile, match="shard-00000.npy"):
        file_record(shard)


def test_a_large_file_of_another_format_is_fingerprinted_by_its_ends(tmp_path, monkeypatch):
    monkeypatch.setattr("builder.store.integrity.FULL_HASH_LIMIT", 3 * 2**20)
    blob = tmp_path / "state.bin"
    blob.write_bytes(bytes(4 * 2**20))
    outputs = record_outputs(tmp_path)
    assert set(outputs["state.bin"]) == {"size", "ends_sha256", CONTENT}
    with open(blob, "r+b") as handle:  # the last byte changes, the size does not
        handle.seek(-1, os.SEEK_END)
        handle.write(b"\x01")
    assert find_damage(tmp_path, outputs) == ("state.bin", "content differs from the recorded digest")


def test_a_linked_file_is_recorded_once_under_the_links_name(checkpoint, tmp_path):
    # The Hub cache: snapshots/<rev>/model.safetensors -> ../../blobs/<sha> (no suffix).
    blob = tmp_path / "blobs" / "0123abcd"
    blob.parent.mkdir()
    blob.write_bytes((checkpoint / "model.safetensors").read_bytes())
    (tmp_path / "snapshot").mkdir()
    (tmp_path / "snapshot" / "model.safetensors").symlink_to(blob)
    outputs = record_outputs(tmp_path)
    assert list(outputs) == ["snapshot/model.safetensors"] and "header_sha256" in outputs["snapshot/model.safetensors"]


def flip_a_byte_inside_the_tensors(path: Path) -> None:
    """Change one byte in the middle of a safetensors file's tensor data: same size, same header."""
    header_length = int.from_bytes(path.read_bytes()[:8], "little")
    data_start, size = 8 + header_length, path.stat().st_size
    with open(path, "r+b") as handle:
        handle.seek((data_start + size) // 2)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0x10]))


def test_a_flipped_byte_inside_a_tensor_passes_the_cheap_check_and_fails_the_full_one(checkpoint, tmp_path):
    stage = copy_of(checkpoint, tmp_path / "stage" / "model").parent
    outputs = record_outputs(stage)
    weights = stage / "model" / "model.safetensors"
    size = weights.stat().st_size
    flip_a_byte_inside_the_tensors(weights)
    assert weights.stat().st_size == size
    assert find_damage(stage, outputs) is None  # sizes and headers: what a reuse reads, nothing more
    name, fault = find_damage(stage, outputs, full=True)
    assert name == "model/model.safetensors" and "bytes inside it changed" in fault


def test_a_shard_records_its_digest_as_it_is_written(tmp_path):
    import numpy as np

    from builder.data.tokens import save_shard

    for name, array in {"tokens": np.arange(6000, dtype=np.uint16).reshape(60, 100),
                        "logprobs": -np.random.default_rng(0).random((3, 5, 7), dtype=np.float32).astype(np.float16),
                        "empty": np.zeros((0, 4), dtype=np.uint32)}.items():
        path = tmp_path / f"{name}.npy"
        assert save_shard(path, array) == file_record(path)  # hashed from memory, equal to a read-back


def test_records_left_by_the_writer_are_taken_instead_of_reading_the_files(tmp_path, monkeypatch):
    import numpy as np

    from builder.teaching.signal import ARRAYS, write_shard

    write_shard(tmp_path, 0, {name: np.full((4, 8), index, dtype=np.uint16) for index, name in enumerate(ARRAYS)})
    expected = {path.relative_to(tmp_path).as_posix(): file_record(path) for path in tmp_path.rglob("*.npy")}
    read = []
    real_digest = integrity.content_digest
    monkeypatch.setattr(integrity, "content_digest", lambda path: read.append(Path(path).name) or real_digest(path))
    outputs = record_outputs(tmp_path)
    assert read == [WRITTEN]  # the small listing itself, no shard
    assert {name: outputs[name] for name in expected} == expected


def test_records_made_before_content_digests_are_still_checked_by_fingerprint(checkpoint, tmp_path):
    stage = copy_of(checkpoint, tmp_path / "stage")
    old = {name: {key: value for key, value in record.items() if key != CONTENT}
           for name, record in record_outputs(stage).items()}
    assert find_damage(stage, old, full=True) is None  # no digest to compare: not damaged for lack of one
    truncate(stage / "model.safetensors")
    assert find_damage(stage, old)[0] == "model.safetensors"


# --- the stage store ---------------------------------------------------------------------------


def finished_stage(store: StageStore, checkpoint: Path, label: str = "x") -> StageKey:
    key = StageKey("prune", label, {"n": 1})
    copy_of(checkpoint, store.prepare(key) / "model")
    (store.path(key) / "checkpoints").mkdir()
    (store.path(key) / "checkpoints" / "latest").write_text("step-1")
    store.finish(key, 1.0, 0, {"model_dir": str(store.path(key) / "model")})
    return key


def test_a_manifest_records_outputs_but_not_resume_state(checkpoint, tmp_path):
    store = StageStore(tmp_path)
    key = finished_stage(store, checkpoint)
    manifest = store.manifest(key)
    assert "model/model.safetensors" in manifest.outputs and "model/config.json" in manifest.outputs
    assert not any(name.startswith("checkpoints/") or name == "manifest.json" for name in manifest.outputs)
    assert manifest.damage() is None and store.reusable(key) is not None
    truncate(store.path(key) / "model" / "model.safetensors")
    path, fault = manifest.damage()
    assert path == str(store.path(key) / "model" / "model.safetensors") and "bytes" in fault
    assert store.reusable(key) is None


def test_a_reader_that_finds_a_changed_byte_names_the_file_and_its_maker_and_marks_the_stage(checkpoint, tmp_path):
    from builder.models.loading import load_model

    store = StageStore(tmp_path)
    key = finished_stage(store, checkpoint)
    weights = store.path(key) / "model" / "model.safetensors"
    load_model(weights.parent)  # intact: it loads
    flip_a_byte_inside_the_tensors(weights)
    assert store.reusable(key) is not None  # the cheap check before a reuse reads no tensor
    with pytest.raises(DamagedFile) as caught:
        load_model(weights.parent)
    assert caught.value.path == weights and f"made by stage {key.dirname}" in str(caught.value)
    assert "bytes inside it changed" in str(caught.value) and "run the same command again" in str(caught.value)
    assert store.reusable(key) is None  # the mark: the next build redoes the stage
    path, fault = store.manifest(key).damage()
    assert path == str(weights) and fault.endswith("(found by a stage that read it)")
    store.discard(key)  # redoing it starts from an empty folder: no mark is left
    assert not store.path(key).exists()


def test_a_damaged_file_error_crosses_process_boundaries_whole():
    import pickle

    sent = pickle.loads(pickle.dumps(DamagedFile("/runs/stages/prune-x/model.safetensors", "bytes changed")))
    assert (sent.path, sent.fault) == (Path("/runs/stages/prune-x/model.safetensors"), "bytes changed")
    assert str(sent) == "/runs/stages/prune-x/model.safetensors: bytes changed"


def test_a_reader_hashes_a_file_once_per_process_until_it_changes(checkpoint, tmp_path, monkeypatch):
    from builder.store.content import verify_file

    store = StageStore(tmp_path)
    key = finished_stage(store, checkpoint)
    weights = store.path(key) / "model" / "model.safetensors"
    read = []
    real_digest = integrity.content_digest
    monkeypatch.setattr(integrity, "content_digest", lambda path: read.append(Path(path)) or real_digest(path))
    verify_file(weights)
    verify_file(weights)
    assert read == [weights]
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # rewritten since: checked again
    verify_file(weights)
    verify_file(checkpoint / "model.safetensors")  # not a stage's output: nothing recorded to compare
    assert read == [weights, weights]


def test_the_finish_a_build_replaces_is_not_reused_but_a_newer_one_is(checkpoint, tmp_path):
    store = StageStore(tmp_path)
    key = finished_stage(store, checkpoint)
    seen = store.manifest(key).finished_at
    assert store.reusable(key, replaces=seen) is None
    store.finish(key, 1.0, 0, {})  # another build redid it meanwhile
    assert store.reusable(key, replaces=seen) is not None


def test_discard_removes_the_stage_folder_and_leaves_no_trash(checkpoint, tmp_path):
    store = StageStore(tmp_path)
    key = finished_stage(store, checkpoint)
    store.discard(key)
    assert not store.path(key).exists() and store.manifest(key) is None
    assert list((store.root / ".trash").iterdir()) == []


def test_a_second_holder_of_a_stage_lock_waits_for_the_first(tmp_path):
    store = StageStore(tmp_path)
    events = []

    def hold(name: str, seconds: float, shared: bool = False) -> None:
        with store.locked("prune-x-0123", shared=shared):
            events.append(f"{name} in")
            time.sleep(seconds)
            events.append(f"{name} out")

    first = threading.Thread(target=hold, args=("first", 0.5))
    first.start()
    time.sleep(0.1)  # the first holds the lock by now
    hold("second", 0.0, shared=True)
    first.join()
    assert events == ["first in", "first out", "second in", "second out"]


def test_an_unreadable_manifest_counts_as_unfinished(checkpoint, tmp_path):
    store = StageStore(tmp_path)
    key = finished_stage(store, checkpoint)
    (store.path(key) / "manifest.json").write_text('{"stage": "pru')
    assert store.manifest(key) is None and store.reusable(key) is None

"""Checkpoints: every rank saves and loads its own shard through torch.distributed.checkpoint.

    checkpoints/step-000050/.metadata, __*_*.distcp   model + optimizer in DCP's format: under
                                                      FSDP2 each rank writes its own shards
                                                      (nothing is gathered); under DDP a
                                                      replicated tensor is written once
    checkpoints/step-000050/trainer_state.pt          rank 0: step, loss, stream offset, plan,
                                                      world size, scheduler
    checkpoints/step-000050/rng-00000.pt              each rank's RNG states
    checkpoints/latest                                names the newest complete checkpoint

A checkpoint is written into `.tmp-step-*` and renamed once every rank has finished, and
`latest` is rewritten last, so `latest` only ever names a complete checkpoint. DCP
re-shards on load, so a run resumes on another world size (and from DDP to FSDP2) as long
as its plan (steps, global batch, seed, data) is the same.
"""
from __future__ import annotations

import contextlib
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_state_dict, set_state_dict,
)  # fmt: skip

from builder.models.loading import save_model
from builder.pruning.cuts import copy_pruning_map
from builder.store.disk_space import removed_on_failure
from builder.store.stage_store import fsync_dir, write_text_atomic
from builder.training.aligner import HiddenStateAligner
from builder.training.parallel import World, is_fsdp, student_of, unwrap

STATE_FILE = "trainer_state.pt"
LATEST = "latest"


def save_checkpoint(out_dir: Path, model, optimizer, scheduler, world: World, plan: dict, progress: dict) -> None:
    """A collective: every rank writes its shards. `progress` holds step, loss and samples
    (the stream position the next step reads from)."""
    root, name = out_dir / "checkpoints", f"step-{progress['step']:06d}"
    tmp = root / f".tmp-{name}"
    if world.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    world.barrier()  # the folder exists before any rank writes into it
    # A failed write (a full disk) removes the partial checkpoint at once: it would keep the
    # disk full. DCP's save is a collective that fails on every rank when one rank's write
    # fails, so no rank still writes into it; a rank killed meanwhile leaves it to the
    # stage (builder.store.disk_space.space_checked) or the next save.
    with removed_on_failure(tmp):
        with _single_process_is_intended(world):
            dcp.save(_training_state(model, optimizer), checkpoint_id=tmp, no_dist=not world.distributed)
        _save(tmp / _rng_file(world.rank), _rng_state())
    world.barrier()  # every rank's files are on disk before rank 0 publishes them
    if not world.is_main:
        return
    with removed_on_failure(tmp):
        _save(tmp / STATE_FILE, {**progress, "plan": plan, "world_size": world.size,
                                 "scheduler": scheduler.state_dict()})
    shutil.rmtree(root / name, ignore_errors=True)
    tmp.rename(root / name)
    fsync_dir(root)
    write_text_atomic(root / LATEST, name)  # last: `latest` only names complete checkpoints
    _remove_old_checkpoints(root, keep={name})


def resume_from_checkpoint(out_dir: Path, model, optimizer, scheduler, world: World, plan: dict) -> dict:
    """Load `latest` into the model, optimizer and scheduler (every rank its own shards);
    returns the checkpoint's progress and plan, or {} when there is none."""
    pointer = out_dir / "checkpoints" / LATEST
    if not pointer.exists():
        return {}
    path = out_dir / "checkpoints" / pointer.read_text().strip()
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    if state["plan"] != plan:
        raise ValueError(
            f"the checkpoint {path} belongs to a run with {state['plan']}, not {plan}; resume "
            "with the same tokens, seed, data and batch_size * grad_accum * world_size, or use a new out_dir"
        )
    training = _training_state(model, optimizer)
    # Each rank reads its own part, re-sharded to this world size.
    with _single_process_is_intended(world):
        dcp.load(training, checkpoint_id=path, no_dist=not world.distributed)
    set_state_dict(model, optimizer, model_state_dict=training["model"], optim_state_dict=training["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if state["world_size"] == world.size:  # RNG streams are per rank; reuse them when they fit
        _set_rng_state(torch.load(path / _rng_file(world.rank), weights_only=True))
    return state


def _training_state(model, optimizer) -> dict:
    """Model and optimizer state keyed by parameter name: sharded DTensors under FSDP2 (each
    rank holds its part), plain tensors otherwise. The optimizer's state is created first if
    no step has run yet (a zero-gradient step at lr 0), so a fresh optimizer can be loaded."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optimizer_state}


@contextlib.contextmanager
def _single_process_is_intended(world: World) -> Iterator[None]:
    """DCP warns whenever it runs without a process group; one process is a mode we support."""
    with warnings.catch_warnings():
        if not world.distributed:
            warnings.filterwarnings("ignore", "torch.distributed is disabled, unavailable or uninitialized")
        yield


def _save(path: Path, obj: object) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _rng_file(rank: int) -> str:
    return f"rng-{rank:05d}.pt"


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    # Only a process that computes on CUDA has a CUDA state to keep; asking any other (CPU
    # training on a GPU machine) would open a CUDA context on every GPU at its first checkpoint.
    if torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_initialized():  # resumed on CUDA: the models are there already
        torch.cuda.set_rng_state_all(state["cuda"])


def _remove_old_checkpoints(root: Path, keep: set[str]) -> None:
    for path in root.iterdir():
        if path.is_dir() and path.name not in keep:
            shutil.rmtree(path, ignore_errors=True)  # older steps and .tmp-* left by a kill


# ----------------------------------------------------------------------------------------
# The final model: one Hugging Face checkpoint, written once


def save_final_model(out_dir: Path, model, source_dir: str | Path, world: World, max_shard_size: str,
                     dtype: torch.dtype) -> Path:
    """`out_dir/model`: a plain HF checkpoint (safetensors shards of at most `max_shard_size`,
    with their index) plus the source's tokenizer files and pruning map, its weights stored in
    `dtype` (the teacher's: what the student is published, evaluated and served as). The
    float32 master weights live on only in the checkpoints above, where training resumes.

    Under FSDP2 the model's weights alone (not the optimizer) are gathered to rank 0's CPU,
    once, and written by `save_pretrained`: transformers then writes the shards, the index,
    the config and the tied weights exactly as `from_pretrained` reads them. DCP's
    HuggingFaceStorageWriter would write the shards from every rank without the gather, but
    the names (the aligner's `student.` prefix, tied embeddings), the index and the config
    would then be ours to get right; one copy of the student's weights in host memory is a
    cost paid once per run, where checkpoints are paid every `checkpoint_every` steps.
    """
    state = _gathered_student_weights(model) if is_fsdp(model) else None  # a collective
    final = out_dir / "model"
    if not world.is_main:
        return final
    tmp = out_dir / ".tmp-model"
    shutil.rmtree(tmp, ignore_errors=True)
    with removed_on_failure(tmp):  # a full disk leaves no partial model behind
        save_model(student_of(model), source_dir, tmp, state_dict=state, max_shard_size=max_shard_size, dtype=dtype)
        copy_pruning_map(source_dir, tmp)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    fsync_dir(out_dir)
    return final


def _gathered_student_weights(model) -> dict:
    """Full tensors on rank 0's CPU (an empty dict on the other ranks), named as the student's."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    # The gathered dict repeats tied tensors (lm_head = embed_tokens); save_pretrained
    # expects them once, as it writes them from an unsharded model.
    seen: set[int] = set()
    tied: set[str] = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            tied.add(name)
        seen.add(id(param))
    state = {name: tensor for name, tensor in state.items() if name not in tied}
    if isinstance(unwrap(model), HiddenStateAligner):  # the student's part only
        state = {name.removeprefix("student."): t for name, t in state.items() if name.startswith("student.")}
    return state

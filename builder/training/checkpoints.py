"""Checkpoints: written by rank 0, atomically; read by every rank from shared disk."""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import torch

from builder.model_io import save_model
from builder.prune import PRUNING_MAP
from builder.store import fsync_dir, write_text_atomic
from builder.training.aligner import HiddenStateAligner
from builder.training.parallel import World, is_fsdp, student_of, unwrap

STATE_FILE = "trainer_state.pt"


def save_checkpoint(
    out_dir: Path, model, optimizer, scheduler, world: World, plan: dict, step: int, loss: float
) -> None:
    model_state, optim_state = _full_state_dicts(model, optimizer)
    rng = world.gather(_rng_state())  # a collective: every rank takes part
    if not world.is_main:
        return
    state = {
        "step": step, "loss": loss, "plan": plan, "world_size": world.size, "model": model_state,
        "optimizer": optim_state, "scheduler": scheduler.state_dict(), "rng": rng,
    }  # fmt: skip
    root = out_dir / "checkpoints"
    name = f"step-{step:06d}"
    tmp = root / f".tmp-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with open(tmp / STATE_FILE, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    shutil.rmtree(root / name, ignore_errors=True)
    tmp.rename(root / name)
    fsync_dir(root)
    write_text_atomic(root / "latest", name)  # last: `latest` only names complete checkpoints
    _remove_old_checkpoints(root, keep={name})


def resume_from_checkpoint(out_dir: Path, model, optimizer, scheduler, world: World, plan: dict) -> dict:
    """Load `latest` into the model, optimizer and scheduler; {} when there is none."""
    pointer = out_dir / "checkpoints" / "latest"
    if not pointer.exists():
        return {}
    path = out_dir / "checkpoints" / pointer.read_text().strip() / STATE_FILE
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state["plan"] != plan:
        raise ValueError(
            f"the checkpoint {path} belongs to a run with {state['plan']}, not {plan}; resume "
            "with the same tokens, seed and batch_size * grad_accum * world_size, or use a new out_dir"
        )
    _load_full_state_dicts(model, optimizer, state["model"], state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if state["world_size"] == world.size:  # RNG streams are per rank; reuse them when they fit
        _set_rng_state(state["rng"][world.rank])
    return state


def _full_state_dicts(model, optimizer) -> tuple[dict, dict]:
    if is_fsdp(model):  # gather the shards into full tensors on rank 0's CPU
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_state_dict(model, optimizer, options=options)
    return unwrap(model).state_dict(), optimizer.state_dict()


def _full_model_state_dict(model) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

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
    return {name: tensor for name, tensor in state.items() if name not in tied}


def _load_full_state_dicts(model, optimizer, model_state: dict, optim_state: dict) -> None:
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        options = StateDictOptions(full_state_dict=True)
        set_state_dict(model, optimizer, model_state_dict=model_state,
                       optim_state_dict=optim_state, options=options)  # fmt: skip
        return
    unwrap(model).load_state_dict(model_state)
    optimizer.load_state_dict(optim_state)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _remove_old_checkpoints(root: Path, keep: set[str]) -> None:
    for path in root.iterdir():
        if path.is_dir() and path.name not in keep:
            shutil.rmtree(path, ignore_errors=True)  # older steps and .tmp-* left by a kill


def save_final_model(out_dir: Path, model, source_dir: str | Path, world: World) -> Path:
    """`out_dir/model`: a plain HF checkpoint (safetensors) with the source's tokenizer."""
    state = _full_model_state_dict(model) if is_fsdp(model) else None  # a collective
    final = out_dir / "model"
    if not world.is_main:
        return final
    tmp = out_dir / ".tmp-model"
    shutil.rmtree(tmp, ignore_errors=True)
    if state is not None and isinstance(unwrap(model), HiddenStateAligner):  # the student's part only
        state = {name.removeprefix("student."): t for name, t in state.items() if name.startswith("student.")}
    save_model(student_of(model), source_dir, tmp, state_dict=state)
    if (Path(source_dir) / PRUNING_MAP).exists():  # lineage, and the layer map for a later distillation
        shutil.copy2(Path(source_dir) / PRUNING_MAP, tmp / PRUNING_MAP)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    fsync_dir(out_dir)
    return final

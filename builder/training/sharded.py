"""FSDP2 without a whole model on any rank: build on the meta device, shard, then read each
rank's own rows from the safetensors checkpoint.

    model = load_sharded(model_dir, device, torch.float32, trainable=True, param_dtype=torch.bfloat16)

Why not `set_model_state_dict(..., StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))`,
torch's documented way to fill a meta-initialised FSDP2 model: it needs the full state dict in
rank 0's memory and broadcasts every whole tensor to every rank, which then keeps its slice; on
a node of 8 ranks training an 8B student that is 32 GB of host memory on rank 0 and every
tensor whole, once, on every GPU. FSDP2's layout is documented and simple instead: each
parameter is a DTensor sharded on dim 0 over a 1-D mesh (`Shard(0)`, chunks as `torch.chunk`
makes them), so each rank reads rows [rank * chunk, rank * chunk + its rows) of every tensor
with safetensors' `get_slice` (a memory-mapped read of just those bytes) and copies them into
its local shard. `_check_layout` refuses any other placement rather than guess.

Non-persistent buffers (the rotary embedding's inv_freq) are not in a checkpoint: the model is
built with its parameters on the meta device but its buffers real (accelerate's
init_empty_weights(include_buffers=False)), and the buffers are put back after `to_empty`.

Tested on CPU with gloo (tests/test_sharded_load.py: the same weights as a whole load, and
training matches); untested on CUDA/NCCL (no GPU was lent): `to_empty(device=cuda)` and the
bf16 all-gathers of the MixedPrecisionPolicy are torch's, used as documented.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open

from builder.store.content import verify_folder

SAFETENSORS_INDEX = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def mixed_precision(dtype: torch.dtype):
    """FSDP2's policy for training in `dtype`: bf16 all-gathers and compute over fp32 master
    shards, gradients reduced in fp32 (summing many bf16 gradients loses their low bits);
    None (fp32 throughout) otherwise."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if dtype != torch.bfloat16:
        return None
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def fully_shard_model(model: torch.nn.Module, device: torch.device, layers: torch.nn.ModuleList,
                      compute_dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """One shard group per decoder layer; the root holds embeddings and the LM head (tied
    embeddings stay one tensor: both live in the root group, sharded once)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = mixed_precision(compute_dtype)
    options = {"mesh": mesh} | ({"mp_policy": policy} if policy is not None else {})
    for layer in layers:
        fully_shard(layer, **options)
    return fully_shard(model, **options)


def load_sharded(model_dir: str | Path, device: torch.device, dtype: torch.dtype, *, trainable: bool,
                 compute_dtype: torch.dtype = torch.float32, activation_checkpointing: bool = False) -> torch.nn.Module:
    """`model_dir`'s model, FSDP2-sharded over the current process group, each rank holding only
    its shards (in `dtype`: fp32 master weights to train, bf16 for a frozen teacher).
    `compute_dtype` bf16 adds the mixed-precision policy. Frozen: eval mode, no gradients."""
    verify_folder(model_dir)  # as load_model does: a stage's output is checked before use
    model = _on_meta(model_dir, dtype)
    if trainable and activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not trainable:
        model.eval().requires_grad_(False)
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    fully_shard_model(model, device, model.model.layers, compute_dtype)
    model.to_empty(device=device)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            buffer.copy_(buffers[name])
        _read_own_rows(Path(model_dir), model)
    return model


def _on_meta(model_dir: str | Path, dtype: torch.dtype) -> torch.nn.Module:
    from accelerate import init_empty_weights  # with transformers: only when a model is built
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_dir))
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # from_config leaves tying to from_pretrained's load; one tensor, as the checkpoint has
    return model


def _read_own_rows(model_dir: Path, model: torch.nn.Module) -> None:
    files = _weight_files(model_dir)
    handles = {file: safe_open(str(model_dir / file), framework="pt") for file in set(files.values())}
    # named_parameters() names a tied tensor once, by its first name (embed_tokens, not lm_head)
    for name, param in model.named_parameters():
        if name not in files:
            raise ValueError(f"{model_dir} has no tensor {name!r}; it was not saved by this model class "
                             "(load it without --parallel fsdp to see transformers' own message)")
        local = param.to_local()
        start = _check_layout(name, param, local)
        if local.shape[0]:
            rows = handles[files[name]].get_slice(name)[start:start + local.shape[0]]
            local.copy_(rows.to(local.dtype))


def _check_layout(name: str, param, local: torch.Tensor) -> int:
    """The first global row of this rank's shard: dim-0 chunks of ceil(rows / world) each."""
    from torch.distributed.tensor import Shard

    rows, world, rank = param.shape[0], dist.get_world_size(), dist.get_rank()
    chunk = math.ceil(rows / world)
    start = min(rank * chunk, rows)
    expected = min(chunk, rows - start)
    if tuple(param.placements) != (Shard(0),) or local.shape[0] != expected or local.shape[1:] != param.shape[1:]:
        raise RuntimeError(f"{name}: FSDP2 sharded it as {param.placements} with local shape {tuple(local.shape)}, "
                           f"not dim-0 chunks of {chunk} rows; builder.training.sharded reads only that layout")
    return start


def _weight_files(model_dir: Path) -> dict[str, str]:
    """Tensor name -> the safetensors file holding it."""
    index = model_dir / SAFETENSORS_INDEX
    if index.exists():
        return json.loads(index.read_text())["weight_map"]
    with safe_open(str(model_dir / SINGLE_FILE), framework="pt") as handle:
        return {name: SINGLE_FILE for name in handle.keys()}

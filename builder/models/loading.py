"""Hugging Face checkpoints in and out: the project's one `load_model` and one list of
tokenizer files, so a pruned, corrected or distilled checkpoint always carries the same
tokenizer as its source."""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import torch

from builder.store.content import verify_folder

# Every file a tokenizer may need: fast (tokenizer.json), slow BPE (vocab.json + merges.txt),
# WordPiece (vocab.txt), SentencePiece (tokenizer.model), and the chat templates.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt", "chat_template.json",
    "chat_template.jinja",
)  # fmt: skip
# Sampling defaults (eos ids, temperature, ...): a pruned student is built from a config, so
# save_pretrained alone would write generic ones instead of the source's.
GENERATION_CONFIG = "generation_config.json"
# Largest safetensors file a saved checkpoint is split into (transformers writes the index).
# 5GB, transformers' long-time default: small enough for Hub uploads and partial downloads.
MAX_SHARD_SIZE = "5GB"


def load_model(
    model_dir: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    trainable: bool = False,
    activation_checkpointing: bool = False,
) -> torch.nn.Module:
    """A local checkpoint; frozen in eval mode (no autograd, no dropout) unless `trainable`.
    A stage's output is first checked against the content digests its stage recorded
    (builder.store.content): loading reads every byte anyway."""
    from transformers import AutoModelForCausalLM  # heavy import, only when a model is loaded

    verify_folder(model_dir)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(device)
    if not trainable:
        return model.eval().requires_grad_(False)
    if activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def declared_dtype(model_dir: str | Path) -> str:
    """The dtype a checkpoint's config.json declares for its weights ("bfloat16"): `dtype`
    (transformers 5) or `torch_dtype` (older ones); float32 where it declares none, as
    from_pretrained assumes."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    name = str(config.get("dtype") or config.get("torch_dtype") or "float32").removeprefix("torch.")
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"{model_dir}/config.json declares dtype {name!r}, not a floating-point torch dtype")
    return name


def save_model(
    model: torch.nn.Module,
    source_dir: str | Path,
    out: str | Path,
    state_dict: dict | None = None,
    max_shard_size: str | int = MAX_SHARD_SIZE,
    dtype: torch.dtype | None = None,
) -> None:
    """Weights as safetensors shards plus `source_dir`'s tokenizer files: loadable with plain
    from_pretrained. `state_dict` replaces the model's own tensors (gathered FSDP weights);
    `dtype` stores the floating-point weights in it (a copy: the model keeps its own) and
    declares it in config.json."""
    if dtype is None or dtype == model.dtype:  # as the model holds them: nothing to cast or declare
        model.save_pretrained(out, state_dict=state_dict, max_shard_size=max_shard_size)
    else:
        stored = _cast(model.state_dict() if state_dict is None else state_dict, dtype)
        model.save_pretrained(out, state_dict=stored, max_shard_size=max_shard_size)
        _declare_dtype(model, out, dtype)
    copy_tokenizer_files(source_dir, out)


def _cast(state_dict: dict, dtype: torch.dtype) -> dict:
    """Floating-point tensors in `dtype` (integer buffers as they are); a tensor shared by two
    names (tied embeddings) is cast once and stays shared, as save_pretrained expects."""
    cast: dict[tuple, torch.Tensor] = {}
    out = {}
    for name, tensor in state_dict.items():
        if not tensor.is_floating_point():
            out[name] = tensor
            continue
        key = (tensor.data_ptr(), tensor.shape, tensor.stride())  # state_dict() detaches: same memory, new objects
        if key not in cast:
            cast[key] = tensor.detach().to(dtype)
        out[name] = cast[key]
    return out


def _declare_dtype(model: torch.nn.Module, out: str | Path, dtype: torch.dtype) -> None:
    """save_pretrained writes the in-memory model's dtype (the float32 masters) into
    config.json; the files hold `dtype`, so the config must say so (from_pretrained's
    dtype="auto", vLLM's and the Hub's size all read it)."""
    config = copy.deepcopy(model.config)
    config.dtype = str(dtype).removeprefix("torch.")
    config.save_pretrained(out)


def copy_tokenizer_files(source_dir: str | Path, out: str | Path) -> None:
    for name in (*TOKENIZER_FILES, GENERATION_CONFIG):
        if (Path(source_dir) / name).is_file():
            shutil.copy2(Path(source_dir) / name, Path(out) / name)

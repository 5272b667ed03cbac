"""Hugging Face checkpoints in and out: the project's one `load_model` and one list of
tokenizer files, so a pruned, corrected or distilled checkpoint always carries the same
tokenizer as its source."""
from __future__ import annotations

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


def save_model(
    model: torch.nn.Module,
    source_dir: str | Path,
    out: str | Path,
    state_dict: dict | None = None,
    max_shard_size: str | int = MAX_SHARD_SIZE,
) -> None:
    """Weights as safetensors shards plus `source_dir`'s tokenizer files: loadable with plain
    from_pretrained. `state_dict` replaces the model's own tensors (gathered FSDP weights)."""
    model.save_pretrained(out, state_dict=state_dict, max_shard_size=max_shard_size)
    copy_tokenizer_files(source_dir, out)


def copy_tokenizer_files(source_dir: str | Path, out: str | Path) -> None:
    for name in (*TOKENIZER_FILES, GENERATION_CONFIG):
        if (Path(source_dir) / name).is_file():
            shutil.copy2(Path(source_dir) / name, Path(out) / name)

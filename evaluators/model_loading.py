"""Load a local Hugging Face checkpoint for evaluation (no Hub access, eval mode)."""
from __future__ import annotations

from pathlib import Path

import torch

from builder.models import loading

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"Unknown dtype {name!r}. Use one of: {', '.join(DTYPES)}.")
    return DTYPES[name]


def checkpoint_dir(model_dir: str | Path) -> Path:
    path = Path(model_dir).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"model_dir {str(path)!r} has no config.json. Pass a Hugging Face checkpoint "
            "folder (what `save_pretrained` writes), not a Hub id or a file."
        )
    return path


def load_model(model_dir: str | Path, device: str = "cpu", dtype: str = "float32"):
    return loading.load_model(checkpoint_dir(model_dir), device, torch_dtype(dtype))


def load_tokenizer(model_dir: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(checkpoint_dir(model_dir))

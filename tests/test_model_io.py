"""builder.models.loading: the one loader and the one list of tokenizer files.

Run: .venv/bin/pytest tests/test_model_io.py -q   (a few seconds)
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer, GPT2Tokenizer

from builder.pruning.importance import score_importance
from builder.models.loading import TOKENIZER_FILES, load_model, save_model
from builder.pruning.cuts import prune_model
from builder.spec.shape import Shape
from tiny_models import TINY_VOCAB, save_tiny_checkpoint, tiny_tokenizer, one_thread  # noqa: F401 (autouse fixture)


def bpe_teacher(directory: Path) -> Path:
    """A tiny checkpoint whose tokenizer also ships as slow-BPE vocab.json + merges.txt, as
    GPT-2-style Hub repositories do."""
    save_tiny_checkpoint(directory)
    tiny_tokenizer().backend_tokenizer.model.save(str(directory))  # writes vocab.json, merges.txt
    return directory


def test_pruned_checkpoint_keeps_every_tokenizer_file_of_a_bpe_teacher(tmp_path):
    teacher_dir = bpe_teacher(tmp_path / "teacher")
    teacher = load_model(teacher_dir)
    calibration = torch.randint(3, TINY_VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    importance = score_importance(teacher, calibration, batch_size=2, progress=False)
    student = prune_model(teacher, importance, Shape.of(teacher.config).replace(intermediate_size=64))
    save_model(student, teacher_dir, tmp_path / "student")

    for name in ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "student" / name).read_bytes() == (teacher_dir / name).read_bytes(), name
    slow = GPT2Tokenizer(str(tmp_path / "student" / "vocab.json"), str(tmp_path / "student" / "merges.txt"))
    fast = AutoTokenizer.from_pretrained(tmp_path / "student")
    text = "The state of the union is strong."
    assert slow(text)["input_ids"] == fast(text)["input_ids"]


def test_every_tokenizer_file_in_the_source_is_listed(tmp_path):
    """A new file type saved by transformers' tokenizers must join TOKENIZER_FILES."""
    teacher_dir = bpe_teacher(tmp_path / "teacher")
    written = {path.name for path in teacher_dir.iterdir()}
    model_files = {"config.json", "model.safetensors", "generation_config.json"}
    assert written - model_files <= set(TOKENIZER_FILES)


def test_load_model_freezes_unless_trainable(tmp_path):
    save_tiny_checkpoint(tmp_path)
    frozen, trained = load_model(tmp_path), load_model(tmp_path, trainable=True)
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
    assert all(p.requires_grad for p in trained.parameters())
    assert next(load_model(tmp_path, dtype=torch.bfloat16).parameters()).dtype == torch.bfloat16

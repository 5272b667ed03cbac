"""Data preparation: every source kind, tokenization on Ray Data, packing into shards.

Run: tests/loopback_only.sh .venv/bin/pytest tests/test_data.py -q   (about a minute on 2 cores)

The expected blocks come from the plainest possible loop (one document at a time, one
tokenizer call each, concatenate per split, cut into blocks), not from the code under test.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import random
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch

from builder.data.documents import SPLITS, _hf_documents, document_batches, iter_documents, split_of, tokenize_batch
from builder.data.prepare import acquire_data, load_blocks, tokenize_splits
from builder.embedded import package_dir
from builder.models.teacher import EMBEDDED_TEACHER_FILES  # fmt: skip
from builder.options.run_options import RunOptions
from builder.spec.schema import DataSpec, Reference
from builder.data.token_ids import BatchTokenizer, TokenizerArgs
from builder.data.tokens import BlocksIndex
from ray_instance import local_ray
from tiny_models import tiny_tokenizer

SEQ_LEN = 16
# Small batches and shards, so a tiny corpus still crosses many batch and shard edges.
SMALL = dict(batch_chars=3000, shard_blocks=40)
WORDS = "state union congress people nation commerce army treaty senate house law year".split()
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def cluster():
    """One local Ray instance for the module, on loopback, started the way builds start it."""
    with local_ray(RunOptions(local_cpus=2)):
        yield


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    tiny_tokenizer().save_pretrained(folder)
    return folder


def texts(count: int = 60, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 400))) + "." for _ in range(count)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    """The same documents as every local source kind (a path per kind)."""
    import datasets

    root, documents = tmp_path_factory.mktemp("corpus"), texts()
    (root / "txt").mkdir()
    for number, text in enumerate(documents):
        (root / "txt" / f"doc{number:03d}.txt").write_text(text)
    (root / "jsonl").mkdir()
    lines = [json.dumps({"body": text}) for text in documents]
    (root / "jsonl" / "part.jsonl").write_text("\n".join(lines[:30] + [""] + lines[30:]) + "\n")  # a blank line
    (root / "parquet").mkdir()
    pq.write_table(pa.table({"body": documents}), root / "parquet" / "part.parquet", row_group_size=7)
    datasets.Dataset.from_dict({"body": documents}).save_to_disk(str(root / "saved"))
    return {"texts": documents, "root": root}


def spec(source: str, **fields) -> DataSpec:
    # a fifth of the documents each for calibration and held-out: no split of 60 is empty
    return DataSpec(source=source, text_field="body", seq_len=SEQ_LEN,
                    split={"calibration": 0.2, "heldout": 0.2}, **fields)


def expected_blocks(data: DataSpec, tokenizer) -> dict[str, torch.Tensor]:
    streams, total = {split: [] for split in SPLITS}, 0
    for document in iter_documents(data):
        if data.max_tokens and total >= data.max_tokens:
            break
        ids = tokenizer(document.text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        streams[split_of(document.doc_id, data)] += ids
        total += len(ids)
    return {split: torch.tensor(ids[:len(ids) // SEQ_LEN * SEQ_LEN]).view(-1, SEQ_LEN)
            for split, ids in streams.items()}


def shard_digests(stage_dir) -> dict[str, str]:
    files = sorted(p for p in stage_dir.rglob("*") if p.is_file())
    return {str(p.relative_to(stage_dir)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


# --- sources (no Ray) --------------------------------------------------------------------


@pytest.mark.parametrize("kind, ids", [
    ("txt", [f"doc{n:03d}.txt" for n in range(60)]),
    ("jsonl", [f"part.jsonl:{n}" for n in range(30)] + [f"part.jsonl:{n}" for n in range(31, 61)]),
    ("parquet", [f"part.parquet:{n}" for n in range(60)]),
    ("saved", [str(n) for n in range(60)]),  # a datasets.save_to_disk folder
])
def test_every_local_source_kind_reads_the_same_documents(corpus, kind, ids):
    documents = list(iter_documents(spec(str(corpus["root"] / kind))))
    assert [d.text for d in documents] == corpus["texts"]
    assert [d.doc_id for d in documents] == ids  # ids decide splits: they must stay stable


def test_hf_source_streams_a_local_dataset_through_datasets(corpus):
    """A local parquet folder through datasets.load_dataset(streaming=True) stands in for
    hf:ORG/NAME (the same call; nothing touches the Hub)."""
    local = Reference(kind="hf", name=str(corpus["root"] / "parquet"))
    documents = list(_hf_documents(local, spec("hf:org/name")))
    assert [d.text for d in documents] == corpus["texts"]
    assert [d.doc_id for d in documents] == [str(n) for n in range(60)]


def test_embedded_sotu_is_read_in_place():
    documents = iter_documents(DataSpec())
    first = next(documents)
    assert first.doc_id and len(first.text) > 1000
    assert sum(1 for _ in documents) > 200


def test_a_folder_without_documents_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no \.txt, \.jsonl or \.parquet files"):
        list(iter_documents(spec(str(tmp_path))))


@pytest.mark.parametrize("max_tokens", [None, 9000])
def test_in_process_packing_equals_the_plain_loop(corpus, max_tokens):
    """tokenize_splits (benchmarks) packs with the same SplitPacker, without Ray."""
    data, tokenizer = spec(str(corpus["root"] / "txt"), max_tokens=max_tokens), tiny_tokenizer()
    blocks = tokenize_splits(iter_documents(data), tokenizer, data)
    expected = expected_blocks(data, tokenizer)
    assert all(torch.equal(blocks[split], expected[split]) for split in SPLITS)


# --- the tokenizer actor's code path (no Ray) ---------------------------------------------


def smollm2_tokenizer():
    """The shipped teacher's tokenizer (SmolLM2, a 49152-entry byte-level BPE), read from its GGUF."""
    from transformers import AutoTokenizer

    package, filename = EMBEDDED_TEACHER_FILES["smollm2-135m-instruct"]
    return AutoTokenizer.from_pretrained(package_dir(package), gguf_file=filename)


def actor_rows(actor: BatchTokenizer, batch, splits: np.ndarray) -> pa.Table:
    return actor(pa.table({"splits": pa.array([splits.tobytes()], pa.large_binary()),
                           "texts": [[d.text for d in batch]]}))


@pytest.mark.parametrize("make_tokenizer", [tiny_tokenizer, smollm2_tokenizer])
def test_the_actor_gives_the_in_process_ids_on_sotu(make_tokenizer):
    """The actor's Rust tokenizer (the driver's backend, serialized) against tokenize_batch's
    transformers call, byte for byte, on the first ~1M characters of the SOTU speeches."""
    tokenizer, data = make_tokenizer(), DataSpec()
    backend = tokenizer.backend_tokenizer.to_str()
    actor = BatchTokenizer(TokenizerArgs(backend, "", tokenizer.eos_token_id, False, len(tokenizer)))
    for batch in itertools.islice(document_batches(iter_documents(data)), 4):
        expected = tokenize_batch(tokenizer, [d.doc_id for d in batch], [d.text for d in batch], data)
        row = actor_rows(actor, batch, expected.splits)
        assert row.column("ids")[0].as_py() == expected.ids.tobytes()
        assert row.column("offsets")[0].as_py() == expected.offsets.tobytes()
        assert row.column("splits")[0].as_py() == expected.splits.tobytes()


def test_without_a_rust_backend_the_actor_loads_the_tokenizer_with_transformers(corpus, tokenizer_dir):
    """The slow-only fallback (no serialized backend): the same ids from the folder."""
    tokenizer, data = tiny_tokenizer(), spec(str(corpus["root"] / "txt"))
    batch = list(iter_documents(data))
    expected = tokenize_batch(tokenizer, [d.doc_id for d in batch], [d.text for d in batch], data)
    slow_only = TokenizerArgs(None, str(tokenizer_dir), tokenizer.eos_token_id, False, len(tokenizer))
    row = actor_rows(BatchTokenizer(slow_only), batch, expected.splits)
    assert row.column("ids")[0].as_py() == expected.ids.tobytes()


def test_the_actor_imports_neither_torch_nor_transformers(tokenizer_dir):
    """What an actor process runs (import the actor's module, construct it, tokenize a
    batch), in a fresh interpreter: torch or transformers there cost seconds and ~400 MB per actor."""
    backend = tiny_tokenizer().backend_tokenizer.to_str()
    script = (
        "import sys, pyarrow as pa\n"
        "from builder.data.token_ids import BatchTokenizer, TokenizerArgs\n"
        "actor = BatchTokenizer(TokenizerArgs(sys.stdin.read(), '', 2, False, 100))\n"
        "out = actor(pa.table({'splits': pa.array([b'\\x00'], pa.large_binary()), 'texts': [['state of the union']]}))\n"
        "assert len(out.column('ids')[0].as_py()) > 4\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], input=backend, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_sotu_shards_on_ray_data_equal_the_in_process_path(cluster, tokenizer_dir, tmp_path):
    """The SOTU (its first 600K tokens, ~20 speeches) through the actors on 2 CPUs: the
    blocks tokenize_splits packs in this process with the transformers tokenizer."""
    data = DataSpec(seq_len=SEQ_LEN, max_tokens=600_000, split={"calibration": 0.2, "heldout": 0.2})
    acquire_data(data, tokenizer_dir, tmp_path, cpus=2, batch_chars=50_000)
    expected = tokenize_splits(iter_documents(data), tiny_tokenizer(), data)
    for split in SPLITS:
        assert torch.equal(load_blocks(tmp_path, split), expected[split]), split


# --- Ray Data --------------------------------------------------------------------------


def test_shards_equal_the_plain_loop_and_are_identical_on_1_and_2_cpus(cluster, corpus, tokenizer_dir, tmp_path):
    """On 2 CPUs inside a Ray task holding no CPU, as the acquire-data stage runs; on 1 CPU
    from this process: byte-identical shards, equal to the plain loop's blocks."""
    data = spec(str(corpus["root"] / "parquet"))
    task = ray.remote(num_cpus=0)(acquire_data)
    summary = ray.get(task.remote(data, tokenizer_dir, tmp_path / "two", cpus=2, **SMALL))
    acquire_data(data, tokenizer_dir, tmp_path / "one", cpus=1, **SMALL)
    assert shard_digests(tmp_path / "one") == shard_digests(tmp_path / "two")
    expected = expected_blocks(data, tiny_tokenizer())
    for split in SPLITS:
        assert torch.equal(load_blocks(tmp_path / "one", split), expected[split]), split
        assert summary["tokens"][split] == expected[split].numel()
    index = BlocksIndex.read(tmp_path / "one")
    assert len(index.splits["train"].shards) > 1  # the corpus crossed shard edges
    assert index.dtype == "uint16"


def test_a_saved_hf_dataset_through_ray_data(cluster, corpus, tokenizer_dir, tmp_path):
    data = spec(str(corpus["root"] / "saved"))
    acquire_data(data, tokenizer_dir, tmp_path, cpus=2, **SMALL)
    expected = expected_blocks(data, tiny_tokenizer())
    assert all(torch.equal(load_blocks(tmp_path, split), expected[split]) for split in SPLITS)


def test_max_tokens_stops_at_the_document_that_reaches_it(cluster, corpus, tokenizer_dir, tmp_path):
    """The cut is the plain loop's although 2 CPUs tokenize batches of a few documents."""
    data = spec(str(corpus["root"] / "txt"), max_tokens=9000)
    acquire_data(data, tokenizer_dir, tmp_path, cpus=2, batch_chars=1500, shard_blocks=40)
    expected = expected_blocks(data, tiny_tokenizer())
    assert all(torch.equal(load_blocks(tmp_path, split), expected[split]) for split in SPLITS)
    everything = expected_blocks(spec(str(corpus["root"] / "txt")), tiny_tokenizer())
    assert sum(b.numel() for b in expected.values()) < sum(b.numel() for b in everything.values()) / 2


def test_a_split_too_small_for_one_block_names_the_fix(cluster, corpus, tokenizer_dir, tmp_path):
    data = DataSpec(source=str(corpus["root"] / "txt"), seq_len=4096)
    with pytest.raises(ValueError, match=r"the (calibration|heldout) split is empty .*lower data.seq_len"):
        acquire_data(data, tokenizer_dir, tmp_path, cpus=2)
    assert not (tmp_path / "index.json").exists()  # no index: the stage is not complete


def test_an_empty_source_names_the_fix(cluster, tokenizer_dir, tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="the calibration split is empty.*give more documents"):
        acquire_data(spec(str(tmp_path / "empty.jsonl")), tokenizer_dir, tmp_path / "out", cpus=1)


def test_large_vocabularies_are_stored_as_uint32(tmp_path):
    from builder.data.prepare import SplitPacker
    from builder.data.token_ids import TokenizedBatch

    packer = SplitPacker(DataSpec(seq_len=2), tmp_path, vocab_size=100_000)
    ids = np.array([99_999, 70_000, 5, 65_536, 1, 2], dtype=np.int32)  # a document per split
    packer.add(TokenizedBatch(np.array([0, 1, 2], np.uint8), np.array([0, 2, 4, 6]), ids))
    assert packer.finish().dtype == "uint32"
    assert load_blocks(tmp_path, SPLITS[0]).tolist() == [[99_999, 70_000]]
    assert load_blocks(tmp_path, SPLITS[1]).tolist() == [[5, 65_536]]

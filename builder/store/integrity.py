"""Is a file, or a checkpoint folder, what it claims to be? Checks that name the file.

Three users: the stage store records each finished stage's output files (`record_outputs`)
and checks them cheaply before reusing the stage (`find_damage`); readers check the full
content of what they read (builder.store.content, `full=True`); teacher acquisition checks the
checkpoint it was given before calling it done (`check_checkpoint`).

Each output's record holds two things:
- a *fingerprint*, cheap to check on every reuse: the size plus a digest of the 8-byte header
  length and JSON header of a *.safetensors file, of numpy's header of a *.npy shard (shape
  and dtype give the size), of the whole of any other file up to FULL_HASH_LIMIT and of the
  first and last MiB above it. It never reads a tensor's data: weights and a teacher signal
  run to GB and TB, and reading them on every reuse would cost minutes to hours. A truncated
  file or a changed header fails it; a flipped byte inside the data does not.
- a *content digest* (xxh3-128 of every byte, CONTENT), made when the file is written and
  checked by whoever reads the file whole anyway (builder.store.content) and by
  `build-family verify`. xxh3 because it runs at memory speed (bench/integrity.py): it guards
  against the disk and against people, not against an attacker, so it need not be
  cryptographic. Records made before content digests existed lack the key; they still get the
  fingerprint check.

A writer that has the bytes in memory records them as it writes (`array_record` for .npy
shards) and leaves the records in a WRITTEN file beside them, which `record_outputs` takes
instead of reading the files again (a teacher signal of many TB is never read back to hash it).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from pathlib import Path

import xxhash

SAFETENSORS = ".safetensors"
NPY = ".npy"
FULL_HASH_LIMIT = 64 * 2**20  # larger files of other formats: size + first and last MiB
INDEX_FILE = "model.safetensors.index.json"
MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header (100 MB)
_CHUNK = 2**20
_HASH_CHUNK = 8 * 2**20  # bytes read per update of the content digest: large reads, little memory
CONTENT = "xxh3_128"  # the record's key for the content digest
WRITTEN = "written.json"  # records a writer made from the bytes it wrote, for the files beside it


class DamagedFile(ValueError):
    """A file that is not what it claims to be; the message names the file and the fault."""

    def __init__(self, path: Path | str, fault: str):
        self.path, self.fault = Path(path), fault
        super().__init__(f"{path}: {fault}")

    def __reduce__(self):  # keeps both fields when Ray sends it from a stage's worker to the driver
        return (type(self), (self.path, self.fault))


# --- single files ----------------------------------------------------------------------


def safetensors_header(path: Path) -> tuple[dict, bytes]:
    """The parsed JSON header and the raw bytes it came from (length prefix included);
    raises DamagedFile when the header is unreadable or the file is shorter than the
    tensors it lists (a truncated download or copy)."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise DamagedFile(path, f"{size} bytes, too short for a safetensors header")
        (length,) = struct.unpack("<Q", prefix)
        if length > min(MAX_HEADER, size - 8):
            raise DamagedFile(path, f"header length {length} exceeds the file's {size} bytes (truncated?)")
        raw = handle.read(length)
    try:
        header = json.loads(raw)
    except ValueError as error:
        raise DamagedFile(path, f"unreadable safetensors header ({error})") from error
    expected = 8 + length + _data_end(path, header)
    if size != expected:
        raise DamagedFile(path, f"{size} bytes, but its header lists tensors up to byte {expected} "
                                "(truncated or padded)")
    return header, prefix + raw


def _data_end(path: Path, header: dict) -> int:
    try:
        return max((entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"),
                   default=0)
    except (TypeError, KeyError, IndexError) as error:
        raise DamagedFile(path, f"safetensors header without valid data_offsets ({error!r})") from error


def npy_header(path: Path) -> bytes:
    """The raw bytes of a .npy file's header; raises DamagedFile when it is unreadable or the
    file's size disagrees with the shape and dtype it declares."""
    import numpy as np

    size = path.stat().st_size
    try:  # maps the file without reading its data; numpy parses every header version
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError, SyntaxError) as error:
        raise DamagedFile(path, f"unreadable .npy file ({error})") from error
    offset, shape, dtype = array.offset, array.shape, array.dtype
    del array
    expected = offset + math.prod(shape) * dtype.itemsize
    if size != expected:
        raise DamagedFile(path, f"{size} bytes, but its header declares {shape} {dtype} ({expected} bytes)")
    with open(path, "rb") as handle:
        return handle.read(offset)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sampled_sha256(path: Path) -> str:
    """A digest of the first and last MiB: bounded work for a large file of unknown format."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        digest.update(handle.read(_CHUNK))
        handle.seek(-_CHUNK, os.SEEK_END)
        digest.update(handle.read(_CHUNK))
    return digest.hexdigest()


def content_digest(path: Path) -> str:
    """xxh3-128 of every byte of the file, as hex."""
    digest, buffer = xxhash.xxh3_128(), bytearray(_HASH_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb") as handle:
        while read := handle.readinto(buffer):
            digest.update(view[:read])
    return digest.hexdigest()


def fingerprint(path: Path) -> dict:
    """What identifies a file cheaply: its size plus a digest of its header (safetensors,
    npy), of its content, or of its ends (other files over FULL_HASH_LIMIT). sha256, as
    before content digests: the manifests of finished stages hold these."""
    path = Path(path)
    size = path.stat().st_size
    if path.name.endswith(SAFETENSORS):
        return {"size": size, "header_sha256": hashlib.sha256(safetensors_header(path)[1]).hexdigest()}
    if path.name.endswith(NPY):
        return {"size": size, "header_sha256": hashlib.sha256(npy_header(path)).hexdigest()}
    if size > FULL_HASH_LIMIT:
        return {"size": size, "ends_sha256": sampled_sha256(path)}
    return {"size": size, "sha256": sha256_file(path)}


def file_record(path: Path) -> dict:
    """A file's fingerprint and content digest, reading it whole."""
    return fingerprint(path) | {CONTENT: content_digest(path)}


def array_record(path: Path, array) -> dict:
    """The record of the .npy file just written at `path` from the C-contiguous `array`, made
    from the array in memory: only the header is read back, never the data."""
    size = Path(path).stat().st_size
    with open(path, "rb") as handle:
        header = handle.read(size - array.nbytes)
    digest = xxhash.xxh3_128(header)
    digest.update(array.data)
    return {"size": size, "header_sha256": hashlib.sha256(header).hexdigest(), CONTENT: digest.hexdigest()}


def file_damage(path: Path, record: dict, full: bool = False) -> str | None:
    """Why `path` no longer matches `record`, or None when it does: its fingerprint, and with
    `full` its content digest too (when the record has one)."""
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if size != record["size"]:
        return f"{size} bytes, recorded {record['size']}"
    try:
        now = fingerprint(path)
    except DamagedFile as error:
        return error.fault
    if now != {key: value for key, value in record.items() if key != CONTENT}:
        return "content differs from the recorded digest"
    if full and CONTENT in record and content_digest(path) != record[CONTENT]:
        return ("its bytes differ from the xxh3-128 digest recorded when it was written (same size and "
                "header: bytes inside it changed on disk)")
    return None


# --- a folder of outputs ------------------------------------------------------------------


def record_outputs(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, dict]:
    """Every file under `folder` (relative name -> record), except names in `skip` and
    folders named in `skip`. A file listed in a WRITTEN file beside it with its current size
    takes the record its writer made; any other is read whole. A symlink is recorded under its
    own name and the file it points to inside `folder` is not recorded again (the Hub cache's
    snapshot links name their blobs `model.safetensors`; the blobs themselves have no suffix)."""
    folder = Path(folder)
    files = _files(folder, skip)
    linked = {path.resolve() for path in files if path.is_symlink()}
    written = _written_records(files)
    return {path.relative_to(folder).as_posix(): written.get(path) or file_record(path)
            for path in files if path.is_symlink() or path.resolve() not in linked}


def _written_records(files: list[Path]) -> dict[Path, dict]:
    found = {}
    for listing in (path for path in files if path.name == WRITTEN):
        for name, record in json.loads(listing.read_text()).items():
            path = listing.parent / name
            if path.is_file() and path.stat().st_size == record["size"]:
                found[path] = record
    return found


def _files(folder: Path, skip: tuple[str, ...]) -> list[Path]:
    found = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if d not in skip)
        found += [Path(root) / name for name in sorted(names) if name not in skip]
    return [path for path in found if path.is_file()]  # drops dangling links


def find_damage(folder: Path, outputs: dict[str, dict], full: bool = False) -> tuple[str, str] | None:
    """The first recorded output that is missing or changed, as (relative name, fault); `full`
    reads each file whole to check its content digest."""
    for name, record in outputs.items():
        fault = file_damage(Path(folder) / name, record, full)
        if fault is not None:
            return name, fault
    return None


# --- a Hugging Face checkpoint folder -------------------------------------------------------


def check_checkpoint(model_dir: Path) -> None:
    """config.json parses, every *.safetensors header is readable and matches the file's
    size, the shard index names shards that exist, and the tokenizer loads. Raises
    DamagedFile naming the first bad file; the weights themselves are not read."""
    model_dir = Path(model_dir)
    _check_json(model_dir / "config.json")
    weights = sorted(model_dir.glob(f"*{SAFETENSORS}"))
    if not weights:
        raise DamagedFile(model_dir, "no *.safetensors weights")
    for path in weights:
        safetensors_header(path)
    if (model_dir / INDEX_FILE).exists():
        _check_index(model_dir / INDEX_FILE)
    _check_tokenizer(model_dir)


def _check_json(path: Path) -> dict:
    if not path.is_file():
        raise DamagedFile(path, "missing")
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise DamagedFile(path, f"not valid JSON ({error})") from error


def _check_index(path: Path) -> None:
    weight_map = _check_json(path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise DamagedFile(path, "has no weight_map")
    missing = sorted({shard for shard in weight_map.values() if not (path.parent / shard).is_file()})
    if missing:
        raise DamagedFile(path, f"names shards that do not exist: {', '.join(missing)}")


def _check_tokenizer(model_dir: Path) -> None:
    from transformers import AutoTokenizer

    try:
        AutoTokenizer.from_pretrained(model_dir)
    except Exception as error:  # tokenizers/transformers raise many types for one bad file
        raise DamagedFile(model_dir, f"the tokenizer does not load ({type(error).__name__}: {error})") from error

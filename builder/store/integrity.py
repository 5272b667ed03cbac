"""Is a file, or a checkpoint folder, what it claims to be? Cheap checks that name the file.

Two users: the stage store records each finished stage's output files (`record_outputs`)
and checks them before reusing the stage (`find_damage`); teacher acquisition checks the
checkpoint it was given before calling it done (`check_checkpoint`).

A *.safetensors file is fingerprinted by its size plus a digest of its 8-byte header
length and JSON header, never by hashing its data: weights run to many GB, and reading
them all on every reuse would cost minutes. The header lists every tensor's byte range,
so a truncated or overwritten-header file fails the check; a flipped byte inside the data
does not (that would need the full read this check exists to avoid). Token shards (*.npy)
get the same treatment from numpy's header (shape and dtype give the size). Any other file
is hashed whole up to FULL_HASH_LIMIT; above it only its first and last MiB are.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from pathlib import Path

SAFETENSORS = ".safetensors"
NPY = ".npy"
FULL_HASH_LIMIT = 64 * 2**20  # larger files of other formats: size + first and last MiB
INDEX_FILE = "model.safetensors.index.json"
MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header (100 MB)
_CHUNK = 2**20


class DamagedFile(ValueError):
    """A file that is not what it claims to be; the message names the file and the fault."""

    def __init__(self, path: Path | str, fault: str):
        self.path, self.fault = Path(path), fault
        super().__init__(f"{path}: {fault}")


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


def file_record(path: Path) -> dict:
    """What identifies a file cheaply: its size plus a digest of its header (safetensors,
    npy), of its content, or of its ends (other files over FULL_HASH_LIMIT)."""
    path = Path(path)
    size = path.stat().st_size
    if path.name.endswith(SAFETENSORS):
        return {"size": size, "header_sha256": hashlib.sha256(safetensors_header(path)[1]).hexdigest()}
    if path.name.endswith(NPY):
        return {"size": size, "header_sha256": hashlib.sha256(npy_header(path)).hexdigest()}
    if size > FULL_HASH_LIMIT:
        return {"size": size, "ends_sha256": sampled_sha256(path)}
    return {"size": size, "sha256": sha256_file(path)}


def file_damage(path: Path, record: dict) -> str | None:
    """Why `path` no longer matches `record`, or None when it does."""
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if size != record["size"]:
        return f"{size} bytes, recorded {record['size']}"
    try:
        now = file_record(path)
    except DamagedFile as error:
        return error.fault
    return None if now == record else "content differs from the recorded digest"


# --- a folder of outputs ------------------------------------------------------------------


def record_outputs(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, dict]:
    """Every file under `folder` (relative name -> record), except names in `skip` and
    folders named in `skip`. A symlink is recorded under its own name and the file it points
    to inside `folder` is not recorded again (the Hub cache's snapshot links name their
    blobs `model.safetensors`; the blobs themselves have no suffix and would be hashed whole)."""
    folder = Path(folder)
    files = _files(folder, skip)
    linked = {path.resolve() for path in files if path.is_symlink()}
    return {path.relative_to(folder).as_posix(): file_record(path)
            for path in files if path.is_symlink() or path.resolve() not in linked}


def _files(folder: Path, skip: tuple[str, ...]) -> list[Path]:
    found = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if d not in skip)
        found += [Path(root) / name for name in sorted(names) if name not in skip]
    return [path for path in found if path.is_file()]  # drops dangling links


def find_damage(folder: Path, outputs: dict[str, dict]) -> tuple[str, str] | None:
    """The first recorded output that is missing or changed, as (relative name, fault)."""
    for name, record in outputs.items():
        fault = file_damage(Path(folder) / name, record)
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

"""What content digests cost (builder/store/integrity.py, builder/store/content.py): the xxh3-128
of every byte a stage writes and of every byte a stage reads, next to that write or read.

    .venv/bin/python -m bench.integrity           # a 256 MiB signal shard, a 135M-parameter checkpoint
    .venv/bin/python -m bench.integrity --quick   # 64 MiB and a 30M-parameter checkpoint: < 1 min on 2 cores

Measured, each as the extra time over the I/O it goes with (the stage does that I/O anyway, and
computes besides, so the extra time is an upper bound on its share of the stage):

- read: reading a file whole from the page cache vs hashing the bytes read (xxh3-128, what
  `content_digest` adds to a read); from a disk the read is slower and the hash's share smaller;
- signal shard: the teach pass writing one shard's five arrays (`write_shard`) vs the part of
  it that hashes them from memory (`array_record`);
- checkpoint: `save_model` of a random SmolLM2-architecture model vs the stage store recording
  its files whole at the stage's end (`record_outputs`, reading from the page cache);
- load: loading that checkpoint vs the check a stage makes first (`verify_folder`: every file
  hashed whole against its manifest);
- a stage: the prune stage's work (load the teacher, score a little calibration data, cut the
  demo's width student out, save it) vs its checks (the teacher read, the student recorded):
  the lightest stage that reads and writes checkpoints, so the largest share checks take.

Each is timed `repeats` times and the median kept. The page cache is warm throughout: that
makes the I/O as fast as it gets, so the percentages are the hash's worst case.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from bench.common import ROOT, print_table, write_result

SMOLLM2_CONFIG = ROOT / "tests" / "data" / "configs" / "SmolLM2-135M-Instruct.json"


@dataclass(frozen=True)
class Settings:
    shard_mib: int  # one signal shard (the teach pass writes 256 MiB shards: SHARD_BYTES)
    layers: int  # of the SmolLM2-135M architecture: 30 is the real model (135M parameters)
    repeats: int


FULL = Settings(shard_mib=256, layers=30, repeats=5)
QUICK = Settings(shard_mib=64, layers=4, repeats=3)


def median_time(action, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def read_whole(path: Path) -> None:
    buffer = bytearray(8 * 2**20)
    with open(path, "rb") as handle:
        while handle.readinto(buffer):
            pass


def signal_arrays(mib: int) -> dict[str, np.ndarray]:
    """One shard of a top-64 signal (258 bytes per token with SmolLM2's vocabulary), ~`mib` MiB."""
    seq_len, top_k = 2048, 64
    rows = max(1, mib * 2**20 // (seq_len * (top_k * 4 + 4)))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 49152, (rows, seq_len, top_k), dtype=np.uint16)
    return {"indices": ids, "logprobs": -rng.random((rows, seq_len, top_k), dtype=np.float32).astype(np.float16),
            "tail": -rng.random((rows, seq_len), dtype=np.float32).astype(np.float16),
            "samples": ids[..., :0], "tokens": ids[..., 0].copy()}


def bench_read(folder: Path, settings: Settings) -> dict:
    import xxhash

    data = np.random.default_rng(1).bytes(settings.shard_mib * 2**20)
    path = folder / "blob.bin"
    path.write_bytes(data)
    read_whole(path)  # into the page cache
    read_s = median_time(lambda: read_whole(path), settings.repeats)
    hash_s = median_time(lambda: xxhash.xxh3_128(data).hexdigest(), settings.repeats)
    return row("read a file whole vs hash the bytes read", len(data), read_s, hash_s)


def bench_shard(folder: Path, settings: Settings) -> dict:
    from builder.store.integrity import array_record
    from builder.teaching.signal import shard_dir, write_shard

    arrays = signal_arrays(settings.shard_mib)
    write_s = median_time(lambda: write_shard(folder, 0, arrays), settings.repeats)
    files = {name: shard_dir(folder, 0) / f"{name}.npy" for name in arrays}
    records_s = median_time(lambda: [array_record(files[name], array) for name, array in arrays.items()],
                            settings.repeats)
    size = sum(array.nbytes for array in arrays.values())
    return row("write a signal shard vs record it from memory", size, write_s - records_s, records_s)


def bench_checkpoint(folder: Path, settings: Settings) -> list[dict]:
    import torch
    import transformers

    from builder.store.integrity import record_outputs
    from builder.store.stage_store import StageKey, StageStore

    transformers.utils.logging.disable_progress_bar()
    config = transformers.LlamaConfig.from_json_file(SMOLLM2_CONFIG)
    config.num_hidden_layers = settings.layers
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    store = StageStore(folder / "runs")
    key = StageKey("acquire-teacher", "bench", {"layers": settings.layers})
    model_dir = store.prepare(key) / "model"
    save_s = median_time(lambda: model.save_pretrained(model_dir), settings.repeats)
    record_s = median_time(lambda: record_outputs(model_dir), settings.repeats)
    size = sum(path.stat().st_size for path in model_dir.iterdir())
    manifest = store.finish(key, 1.0, 0, {"model_dir": str(model_dir)})
    # What a reading stage adds before its first load: every recorded file hashed whole.
    load_s = median_time(lambda: transformers.AutoModelForCausalLM.from_pretrained(str(model_dir)), settings.repeats)
    check_s = median_time(lambda: manifest.damage(full=True), settings.repeats)
    prune_s = median_time(lambda: prune_stage(model, model_dir, folder / "pruned"), settings.repeats)
    return [row("save a checkpoint vs record it at the stage's end", size, save_s, record_s),
            row("load a checkpoint vs check it first", size, load_s, check_s),
            row("a prune stage vs its checks (teacher read, student recorded)", size, prune_s - check_s - record_s,
                check_s + record_s)]


def prune_stage(teacher, teacher_dir: Path, out: Path) -> None:
    """The prune stage's work without its checks: load the teacher, cut it, save the student.
    The lightest stage that reads and writes a checkpoint: the checks' largest share of a stage."""
    import torch
    import transformers

    from builder.models.loading import save_model
    from builder.pruning.cuts import prune_model
    from builder.pruning.importance import score_importance
    from builder.spec.shape import Shape

    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(teacher_dir))
    calibration = torch.randint(0, teacher.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    importance = score_importance(loaded, calibration, batch_size=2, progress=False)
    shape = Shape.of(teacher.config).replace(hidden_size=504, intermediate_size=960)  # the demo's width student
    save_model(prune_model(loaded, importance, shape), teacher_dir, out)


def row(what: str, size: int, io_s: float, hash_s: float) -> dict:
    return {"what": what, "bytes": size, "io_s": io_s, "hash_s": hash_s, "hash_gb_s": size / max(hash_s, 1e-9) / 1e9,
            "extra_percent": 100 * hash_s / io_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller files, 3 repeats: under a minute")
    args = parser.parse_args()
    settings = QUICK if args.quick else FULL
    started, load_before = time.perf_counter(), os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="mz-integrity-") as scratch:
        folder = Path(scratch)
        rows = [bench_read(folder, settings), bench_shard(folder, settings), *bench_checkpoint(folder, settings)]
    print_table(["what", "MB", "I/O s", "hash s", "hash GB/s", "extra %"],
                [[r["what"], r["bytes"] / 1e6, r["io_s"], r["hash_s"], r["hash_gb_s"], r["extra_percent"]]
                 for r in rows])
    # The load averages say how busy the (shared) machine was: every timing is a median, not a floor.
    path = write_result("integrity", {"quick": args.quick, "settings": asdict(settings), "rows": rows,
                                      "wall_s": time.perf_counter() - started, "load_before": load_before,
                                      "load_after": os.getloadavg()})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

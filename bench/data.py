"""Data preparation on Ray Data and the training data loader: speed, and memory against corpus size.

    .venv/bin/python -m bench.data           # corpora of 1x, 8x and 32x the SOTU text
    .venv/bin/python -m bench.data --quick   # the same on an eighth of the speeches: < 10 min on 2 cores

Tokenizer: the embedded teacher's (SmolLM2, vocab 49152, so shards hold uint16), the fast
tokenizer on one thread per worker. Corpora: the `sotu` speeches written as .txt files k
times under new names (so new document ids, split by hash as builds split them), on disk in
a temp dir, one document in memory at a time. Everything the benchmark writes stays in
that temp dir, removed at the end.

Measures, in one run, and writes bench/results/data.json:

1. For each corpus (1x, 8x, 32x): `builder.data.prepare.acquire_data` on Ray Data with 2 CPUs,
   as the acquire-data stage runs it: wall time, tokens/s, and the peak memory of the whole
   process tree (this process, Ray's raylet/GCS/dashboard and every Ray worker), sampled
   from /proc every 0.2 s as the sum of PSS (proportional set size: a page shared by n
   processes counts 1/n in each, so the shared object store and libraries count once) and
   as the sum of RSS (shared pages counted in every process: an upper bound). The tree's
   idle baseline before the run is recorded too. Goal: peak at 32x within 1.2x of 1x.
2. For each corpus, one training worker's data path in a fresh process: open the train
   split with `builder.data.tokens.TokenBlocks` (memory-mapped), draw a seeded permutation of
   block indices, and read 200 batches of 4 x 256 tokens in that order; time per batch
   and the process's peak RSS (VmHWM). Goal: a batch costs under 2% of a distillation step
   (bench/results/distill.json's minizoo step time).
3. On the 32x corpus (with --quick: 32 x an eighth, four times the SOTU): Ray Data on 1 and
   on 2 CPUs, each in a fresh process pinned with everything it starts to that many cores
   (a 1-CPU and a 2-CPU machine; also, unpinned, one tokenizing actor with the second core
   spare for the rest), against two baselines that tokenize the same documents the same
   way: a plain single-process `tokenizer(...)` loop, and
   `datasets.Dataset.map(batched=True, num_proc=2)`, timed from loading the tokenizer
   through `from_generator` (reading the documents) and the map, as Ray Data's time counts
   its reading (the map alone is recorded too). Goals: 2 CPUs at least 1.7x the 1-CPU
   rate, and at least the datasets.map rate. Memory is not sampled in these runs. Each
   contender runs `repeats` times, interleaved (1 CPU, 2 CPUs, spare core, loop, map, then
   again); the table and the goals take each one's median, and give the rate's min-max.
   One more contender, Ray Data on 2 CPUs with the former 256K-character batches, measures
   what the batch size (builder.data.documents.BATCH_CHARS) buys.

Tokens/s counts every token tokenized (EOS included), the same for every contender. Ray Data
times include starting the reader and the tokenizer actors (each actor loads the Rust
tokenizer the driver serialized, without importing torch or transformers): that is what a
build pays; the rate after the first batch came back (the
actors running) is recorded too. One unmeasured Ray Data run comes first (in every fresh
process too), so that every measured run finds Ray's worker pool and the file cache in the
same state.

The JSON records the git commit (and whether the tree was dirty), package versions, the
CPU's flags, and the machine's load average before and after each Ray Data run: this
machine is shared, and contended numbers say so.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.common import ROOT, TEACHER_CACHE, PeriodicSampler, print_table, speed_cpu_flags, write_result

LOADER_BATCHES, LOADER_BATCH_SIZE, SEQ_LEN = 200, 4, 256


@dataclass(frozen=True)
class Settings:
    scales: tuple[int, ...]
    speeches_every: int  # 1: every SOTU speech; 8: every eighth (--quick)
    comparison_scale: int  # the corpus the 1-vs-2 CPU comparison and the baselines run on
    repeats: int  # of every speed contender, interleaved


# The speed comparison runs on the largest corpus: Ray Data's start-up (a second or two to
# the first batch) is a fixed cost that a build's corpus amortizes, and at 8x (--quick: the
# SOTU's own size, 2.8M tokens, seconds of one core's tokenizing) it was most of the time measured.
FULL = Settings(scales=(1, 8, 32), speeches_every=1, comparison_scale=32, repeats=3)
QUICK = Settings(scales=(1, 8, 32), speeches_every=8, comparison_scale=32, repeats=3)


# --- corpora and tokenizer -----------------------------------------------------------


def write_corpus(folder: Path, scale: int, every: int) -> int:
    """`scale` copies of the speeches as .txt files with new names; returns characters written."""
    from builder.embedded import package_dir

    folder.mkdir(parents=True)
    speeches = sorted((package_dir("sotu") / "data" / "speeches").glob("*.txt"))[::every]
    chars = 0
    for copy in range(scale):
        for speech in speeches:  # one document in memory at a time
            text = speech.read_text(encoding="utf-8")
            (folder / f"copy{copy:02d}-{speech.name}").write_text(text, encoding="utf-8")
            chars += len(text)
    return chars


def tokenizer_dir(scratch: Path) -> Path:
    """The teacher's tokenizer: from the benchmarks' converted teacher if there is one, else
    read from the shipped GGUF into the temp dir (no model weights converted)."""
    if (TEACHER_CACHE / "tokenizer.json").exists():
        return TEACHER_CACHE
    from transformers import AutoTokenizer

    from builder.embedded import package_dir
    from builder.models.teacher import EMBEDDED_TEACHER_FILES
    from bench.common import TEACHER

    package, filename = EMBEDDED_TEACHER_FILES[TEACHER]
    AutoTokenizer.from_pretrained(package_dir(package), gguf_file=filename).save_pretrained(scratch / "tokenizer")
    return scratch / "tokenizer"


def data_spec(corpus: Path):
    from builder.spec.schema import DataSpec

    return DataSpec(source=str(corpus), seq_len=SEQ_LEN)


# --- memory of a process tree --------------------------------------------------------


def tree_memory(root: int) -> tuple[int, int]:
    """(sum of PSS, sum of RSS) in bytes over `root` and all its descendants."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    pss = rss = 0
    stack = [root]
    while stack:
        pid = stack.pop()
        stack.extend(children.get(pid, []))
        pss_kib, rss_kib = _rollup(pid)
        pss, rss = pss + pss_kib * 1024, rss + rss_kib * 1024
    return pss, rss


def _rollup(pid: int) -> tuple[int, int]:
    values = {}
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
            name, _, rest = line.partition(":")
            values[name] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        return 0, 0
    return values.get("Pss", 0), values.get("Rss", 0)


class PeakSampler(PeriodicSampler):
    """Samples the tree's memory while a block runs; keeps the peaks."""

    def __init__(self, interval_s: float = 0.2):
        super().__init__(every_s=interval_s)
        self.peak_pss, self.peak_rss = 0, 0

    def sample(self) -> None:
        pss, rss = tree_memory(os.getpid())
        self.peak_pss, self.peak_rss = max(self.peak_pss, pss), max(self.peak_rss, rss)


def gib(value: int) -> float:
    return value / 2**30


# --- the measurements ----------------------------------------------------------------


def prepare(corpus: Path, tokenizer: Path, out: Path, cpus: int, sample_memory: bool = True,
            batch_chars: int | None = None) -> dict:
    """What acquire_data does (Ray Data, then SplitPacker), timed from the start and from
    the first batch back (after the actors started), with the tree's idle and peak memory
    when `sample_memory`. The speed runs do not sample: reading every process's smaps_rollup
    five times a second takes CPU from the tokenizers and stalls processes starting up, so
    the memory runs' rates are not speed results."""
    from builder.data.documents import BATCH_CHARS
    from builder.data.prepare import SplitPacker
    from builder.data.ray_data import tokenized_batches, tokenizer_args

    spec, load = data_spec(corpus), os.getloadavg()[0]
    idle_pss, idle_rss = tree_memory(os.getpid()) if sample_memory else (0, 0)
    with PeakSampler() if sample_memory else contextlib.nullcontext() as memory:
        started = time.perf_counter()
        tokenizer_read = tokenizer_args(tokenizer)
        packer = SplitPacker(spec, out, tokenizer_read.vocab_size)
        batches = tokenized_batches(spec, tokenizer_read, cpus=cpus, batch_chars=batch_chars or BATCH_CHARS)
        packer.add(next(batches))
        first_batch, first_tokens = time.perf_counter(), packer.total
        index = packer.pack(batches)
        ended = time.perf_counter()
    tokens = packer.total  # tokenized, packed or not (blocks drop each split's last partial block)
    measured = {"cpus": cpus, "batch_chars": batch_chars or BATCH_CHARS, "wall_s": ended - started, "tokens": tokens,
                "tokens_per_s": tokens / (ended - started),
                "first_batch_s": first_batch - started,
                "steady_tokens_per_s": (tokens - first_tokens) / max(ended - first_batch, 1e-9),
                "packed_tokens": sum(s.tokens for s in index.splits.values()),
                "load_before": load, "load_after": os.getloadavg()[0]}
    if sample_memory:
        measured.update({"idle_pss_gib": gib(idle_pss), "peak_pss_gib": gib(memory.peak_pss),
                         "idle_rss_gib": gib(idle_rss), "peak_rss_gib": gib(memory.peak_rss)})
    return measured


def ray_data_on_cores(cores: int, cpus: int, corpus: Path, warm_corpus: Path, tokenizer: Path, out: Path,
                      batch_chars: int | None = None) -> dict:
    """`prepare` in a fresh process pinned, with every process it starts (Ray's GCS, raylet
    and workers inherit the affinity), to the first `cores` cores: a machine of that size.
    Pinning is what makes "1 CPU" mean one: unpinned, a 1-actor run still had the second
    core for its driver, reader and raylet, and its rate overstated one CPU's (both are
    recorded). A warm-up run on `warm_corpus` first, unmeasured, as in the main process."""
    call = (f"b.prepare_pinned({cpus}, {str(corpus)!r}, {str(warm_corpus)!r}, {str(tokenizer)!r}, {str(out)!r}, "
            f"{batch_chars})")
    measured = {"cores": cores, **in_fresh_process(call, cores=set(range(cores)))}
    shutil.rmtree(out, ignore_errors=True)
    return measured


def prepare_pinned(cpus: int, corpus: str, warm_corpus: str, tokenizer: str, out: str,
                   batch_chars: int | None = None) -> dict:
    from builder.options.run_options import RunOptions
    from builder.running.ray_session import init_ray

    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    init_ray(RunOptions(local_cpus=cpus))
    try:
        prepare(Path(warm_corpus), Path(tokenizer), Path(out) / "warm-up", cpus, False, batch_chars)
        return prepare(Path(corpus), Path(tokenizer), Path(out) / "measured", cpus, False, batch_chars)
    finally:
        shut_down_ray()


def in_fresh_process(call: str, cores: set[int] | None = None) -> dict:
    """`call` (an expression on this module, as `b`) in a new interpreter; its JSON result."""
    code = f"import json, bench.data as b; print(json.dumps({call}))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores else None,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])})
    return json.loads(done.stdout.strip().splitlines()[-1])


def loader(stage_dir: Path) -> dict:
    """One training worker's data path, in a fresh process (its own peak RSS)."""
    return in_fresh_process(f"b.loader_steps({str(stage_dir)!r})")


def loader_steps(stage_dir: str, seed: int = 0) -> dict:
    import numpy as np

    from builder.data.tokens import TokenBlocks

    blocks = TokenBlocks.open(stage_dir, "train")
    order = np.random.default_rng(seed).permutation(len(blocks))  # an epoch's order, never the data
    times = []
    for step in range(LOADER_BATCHES):
        rows = order[np.arange(step * LOADER_BATCH_SIZE, (step + 1) * LOADER_BATCH_SIZE) % len(order)]
        started = time.perf_counter()
        batch = blocks[rows]
        times.append(time.perf_counter() - started)
    assert batch.shape == (LOADER_BATCH_SIZE, SEQ_LEN)
    return {"batches": LOADER_BATCHES, "blocks": len(blocks), "mean_batch_s": sum(times) / len(times),
            "max_batch_s": max(times), "peak_rss_gib": _vm_hwm() / 2**30}


def _vm_hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def plain_loop(corpus: Path, tokenizer_path: Path) -> dict:
    """The baseline: this process, one thread, the same batches and tokenizer call."""
    from transformers import AutoTokenizer

    from builder.data.documents import document_batches, iter_documents

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    started, tokens = time.perf_counter(), 0
    for batch in document_batches(iter_documents(data_spec(corpus))):
        tokens += sum(len(ids) + 1 for ids in tokenizer([d.text for d in batch], add_special_tokens=False)["input_ids"])
    wall = time.perf_counter() - started
    return {"wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall}


def datasets_map(corpus: Path, tokenizer_path: Path, scratch: Path, num_proc: int = 2) -> dict:
    """The baseline: datasets.map(batched=True, num_proc=2) over the same documents."""
    import datasets
    from transformers import AutoTokenizer

    spec, started = data_spec(corpus), time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    rows = datasets.Dataset.from_generator(
        _rows, gen_kwargs={"spec": spec}, cache_dir=str(scratch / "hf-cache"))
    mapping = time.perf_counter()
    tokenized = rows.map(_tokenize_rows, batched=True, num_proc=num_proc, fn_kwargs={"tokenizer": tokenizer},
                         remove_columns=["text"], cache_file_name=str(scratch / "hf-cache" / "map.arrow"))
    ended = time.perf_counter()
    tokens = sum(tokenized["length"])
    shutil.rmtree(scratch / "hf-cache", ignore_errors=True)  # a cache found again would skip the next map
    # The rate counts loading the tokenizer and reading the documents into the dataset, as
    # Ray Data's time counts both (and packing and writing shards besides); the map alone
    # is recorded too.
    return {"num_proc": num_proc, "wall_s": ended - started, "read_s": mapping - started, "map_s": ended - mapping,
            "tokens": tokens, "tokens_per_s": tokens / (ended - started), "map_tokens_per_s": tokens / (ended - mapping)}


def _rows(spec):
    from builder.data.documents import iter_documents

    for document in iter_documents(spec):
        yield {"text": document.text}


def _tokenize_rows(rows, tokenizer):
    ids = tokenizer(rows["text"], add_special_tokens=False)["input_ids"]
    return {"length": [len(x) + 1 for x in ids]}


# --- provenance ----------------------------------------------------------------------


def provenance() -> dict:
    from importlib.metadata import version

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    packages = ("ray", "datasets", "pyarrow", "numpy", "tokenizers", "transformers", "torch")
    return {"git_commit": git("rev-parse", "HEAD"), "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
            "packages": {name: version(name) for name in packages},
            "cpu_flags": speed_cpu_flags()}


# --- the run -------------------------------------------------------------------------


def run(settings: Settings, scratch: Path) -> dict:
    from builder.options.run_options import RunOptions
    from builder.running.ray_session import init_ray

    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # every side tokenizes on one thread per process
    tokenizer = tokenizer_dir(scratch)
    corpora = {scale: scratch / f"corpus-{scale}x" for scale in settings.scales}
    chars = {scale: write_corpus(folder, scale, settings.speeches_every) for scale, folder in corpora.items()}
    init_ray(RunOptions(local_cpus=2))
    # Unmeasured: the first Ray Data run also starts Ray's worker pool and fills caches.
    prepare(corpora[min(corpora)], tokenizer, scratch / "warm-up", cpus=2)
    scales = {}
    for scale, folder in corpora.items():
        stage = scratch / f"stage-{scale}x"
        scales[scale] = {"chars": chars[scale], "prepare": prepare(folder, tokenizer, stage, cpus=2),
                         "loader": loader(stage)}
        print(f"{scale}x: {scales[scale]}", flush=True)
    shut_down_ray()  # the speed runs start their own instances; two would share the cores
    corpus, warm = corpora[settings.comparison_scale], corpora[min(corpora)]
    contenders = {
        "ray_data_1cpu": lambda out: ray_data_on_cores(1, 1, corpus, warm, tokenizer, out),
        "ray_data_2cpu": lambda out: ray_data_on_cores(2, 2, corpus, warm, tokenizer, out),
        "ray_data_1cpu_spare_core": lambda out: ray_data_on_cores(2, 1, corpus, warm, tokenizer, out),
        # The batch size before this one (256K characters): what the larger batches buy.
        "ray_data_2cpu_256k_batches": lambda out: ray_data_on_cores(2, 2, corpus, warm, tokenizer, out, 1 << 18),
        "plain_loop": lambda out: plain_loop(corpus, tokenizer),
        "datasets_map_2proc": lambda out: datasets_map(corpus, tokenizer, out),
    }
    runs = {name: [] for name in contenders}
    for repeat in range(settings.repeats):  # interleaved: background load weighs on every contender alike
        for name, contender in contenders.items():
            runs[name].append(contender(scratch / f"speed-{name}-{repeat}"))
            print(f"{name} #{repeat}: {runs[name][-1]['tokens_per_s']:.0f} tokens/s", flush=True)
    speed = {name: medians(measured) for name, measured in runs.items()}
    return {"scales": scales, "comparison_scale": settings.comparison_scale, "speed": speed}


def medians(runs: list[dict]) -> dict:
    """Each number's median over the repeats (robust to one disturbed run), the rate's
    min-max, and every run."""
    numbers = [key for key, value in runs[0].items() if isinstance(value, (int, float)) and not isinstance(value, bool)]
    rates = [run["tokens_per_s"] for run in runs]
    return {**{key: statistics.median(run[key] for run in runs) for key in numbers},
            "tokens_per_s_min": min(rates), "tokens_per_s_max": max(rates), "runs": runs}


def goals(result: dict) -> dict:
    scales, speed = result["scales"], result["speed"]
    small, large = scales[min(scales)], scales[max(scales)]
    step_s = json.loads((Path(__file__).parent / "results" / "distill.json").read_text())["loops"]["minizoo"]["step_wall_s"]
    worst_batch = max(s["loader"]["mean_batch_s"] for s in scales.values())
    rate = {name: value["tokens_per_s"] for name, value in speed.items()}
    return {
        "memory_ratio_pss": large["prepare"]["peak_pss_gib"] / small["prepare"]["peak_pss_gib"],
        "memory_ratio_rss": large["prepare"]["peak_rss_gib"] / small["prepare"]["peak_rss_gib"],
        "loader_ratio_rss": large["loader"]["peak_rss_gib"] / small["loader"]["peak_rss_gib"],
        "speedup_2_vs_1_cpu": rate["ray_data_2cpu"] / rate["ray_data_1cpu"],
        "steady_speedup_2_vs_1_cpu": speed["ray_data_2cpu"]["steady_tokens_per_s"]
        / speed["ray_data_1cpu"]["steady_tokens_per_s"],
        "speedup_2_cpus_vs_1_actor_spare_core": rate["ray_data_2cpu"] / rate["ray_data_1cpu_spare_core"],
        "ray_2cpu_vs_datasets_map": rate["ray_data_2cpu"] / rate["datasets_map_2proc"],
        "batches_1m_vs_256k_chars": rate["ray_data_2cpu"] / rate["ray_data_2cpu_256k_batches"],
        "ray_2cpu_vs_datasets_map_alone": rate["ray_data_2cpu"] / speed["datasets_map_2proc"]["map_tokens_per_s"],
        "distill_step_s": step_s,
        "loader_overhead_of_step": worst_batch / step_s,
    }


def report(result: dict, checks: dict) -> None:
    rows = [[f"{scale}x", s["prepare"]["tokens"], s["prepare"]["wall_s"], s["prepare"]["tokens_per_s"],
             s["prepare"]["peak_pss_gib"], s["prepare"]["peak_rss_gib"], s["loader"]["mean_batch_s"] * 1e3,
             s["loader"]["peak_rss_gib"]] for scale, s in result["scales"].items()]
    # These runs sample memory, which slows them (see `prepare`): their rates are not the speed results.
    print_table(["corpus", "tokens", "prep s (memory sampled)", "tokens/s (sampled)", "peak PSS GiB",
                 "peak RSS GiB", "batch ms", "loader RSS GiB"], rows)
    print()
    print_table([f"tokenizer at {result['comparison_scale']}x (median of repeats)", "tokens/s [min, max]", "wall s",
                 "1st batch s", "tokens/s after"],
                [[name, f"{v['tokens_per_s']:.4g} [{v['tokens_per_s_min']:.4g}, {v['tokens_per_s_max']:.4g}]",
                  v["wall_s"], v.get("first_batch_s", "-"), v.get("steady_tokens_per_s", "-")]
                 for name, v in result["speed"].items()])
    print()
    print_table(["check", "value", "goal"], [
        ["peak PSS 32x / 1x", checks["memory_ratio_pss"], "<= 1.2"],
        ["peak RSS 32x / 1x", checks["memory_ratio_rss"], "<= 1.2"],
        ["Ray Data 2 CPUs / 1 CPU (pinned)", checks["speedup_2_vs_1_cpu"], ">= 1.7"],
        ["same, after the first batch", checks["steady_speedup_2_vs_1_cpu"], "(actors started)"],
        ["same, 1 actor with a spare core", checks["speedup_2_cpus_vs_1_actor_spare_core"], "(not pinned)"],
        ["Ray Data 2 CPUs / datasets.map", checks["ray_2cpu_vs_datasets_map"], ">= 1"],
        ["same, against the map alone", checks["ray_2cpu_vs_datasets_map_alone"], "(read not timed)"],
        ["2 CPUs, 1M- / 256K-character batches", checks["batches_1m_vs_256k_chars"], "(the batch size)"],
        ["loader batch / distill step", checks["loader_overhead_of_step"], "< 0.02"],
    ])


def shut_down_ray() -> None:
    """Stop the local instance and remove the temp dir builder.running.runner made for it."""
    import ray

    ray.shutdown()
    if os.environ.get("RAY_TMPDIR", "").startswith(tempfile.gettempdir() + "/mz-ray-"):
        shutil.rmtree(os.environ["RAY_TMPDIR"], ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="an eighth of the speeches")
    args = parser.parse_args()
    settings = QUICK if args.quick else FULL
    with tempfile.TemporaryDirectory(prefix="mz-bench-data-") as scratch:
        try:
            result = run(settings, Path(scratch))
        finally:
            shut_down_ray()
    checks = goals(result)
    report(result, checks)
    path = write_result("data", {"quick": args.quick, "settings": settings.__dict__, **provenance(),
                                 **result, "goals": checks})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()

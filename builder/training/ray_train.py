"""Run `builder.training`'s loop on Ray Train workers (TorchTrainer, DDP or FSDP2), or with one
worker in the calling process.

    result = run_training("distill", teacher_dir, student_dir, blocks_path, out_dir,
                          TrainSettings(tokens=...), num_workers=2, use_gpu=False)

One worker runs the loop in the caller: the stage's own Ray task, which then holds that
worker's CPUs and GPU (builder.running.runner). A Ray Train group of one would start its
controller, a placement-group cleaner, a dataset manager, a synchronization actor and the
worker itself, each a Ray worker process, to synchronise nobody: about 16 CPU-seconds a run
besides the worker's own (bench/results/suite-quick.json: 111 CPU-s for seven such runs). The loop is the same either way: it reads the world from torch.distributed
(one process without a group trains alone) and its checkpoints load across the two
(test_ray_train: one process resumes a Ray Train run).

The caller (the runner) has already connected to a Ray cluster. Ray Train starts
`num_workers` actors, sets up torch.distributed (gloo on CPU, NCCL on GPU) and runs the same
loop as a single process; the loop reads rank and world size from torch.distributed. Every
worker reads the models from shared disk and memory-maps the token shards of `blocks_path`
(the acquire-data stage dir), reading only its own slice of each step's batch; every rank
writes its checkpoint shards into `out_dir` and rank 0 the metrics and the final model, so
resuming works exactly as in one process: run again with the same `out_dir`. Ray Train's own checkpoint storage is not used;
its run records go to `out_dir/ray_train/`. Each worker is handed one TrainJob (a frozen
dataclass, like builder.teaching.teach_pass.TeachJob), never an untyped config dict.
"""
from __future__ import annotations

import functools
import json
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import ray.train
import torch
import ray.train.torch

from builder.options.cluster import trains_in_its_task
from builder.options.run_options import Parallel
from builder.running.placement import DeviceUnusable, place
from builder.store.stage_log import captured_output, stage_log_path
from builder.training.loop import correct_teacher, distill, load_result
from builder.training.settings import TrainResult, TrainSettings, TrainingDiverged

Kind = Literal["distill", "correct"]


@dataclass(frozen=True)
class TrainJob:
    """One training run, as every Ray Train worker runs it: handed to the worker function
    whole (Ray pickles it), so the worker reads typed fields, never a config dict."""

    kind: Kind
    teacher_dir: str
    student_dir: str | None  # the pruned student (distill); None for a teacher correction
    blocks_path: str  # the acquire-data stage dir, or a teach stage's (a stored teacher signal)
    out_dir: str
    settings: TrainSettings  # a small frozen dataclass: cheap to pickle
    parallel: Parallel = "ddp"
    threads: int = 1  # torch threads per worker: the CPUs it reserved
    tee_output: bool = False  # the worker's output also where Ray sends it (the driver), not only stage.log

    def __post_init__(self) -> None:
        if self.kind not in ("distill", "correct"):
            raise ValueError(f"kind={self.kind!r} is not a training kind; use 'distill' or 'correct'")
        if self.kind == "distill" and self.student_dir is None:
            raise ValueError("kind='distill' needs student_dir (the pruned student's checkpoint)")
        if self.parallel not in ("ddp", "fsdp"):
            raise ValueError(f"parallel={self.parallel!r} is not supported; use 'ddp' or 'fsdp'")

    def run(self, device: torch.device) -> None:
        """The loop, on this worker, inside the process group Ray Train set up."""
        if self.kind == "distill":
            distill(self.teacher_dir, self.student_dir, self.blocks_path, self.out_dir, self.settings,
                    device=device, parallel=self.parallel)
        else:
            correct_teacher(self.teacher_dir, self.blocks_path, self.out_dir, self.settings, device=device,
                            parallel=self.parallel)


def run_training(kind: Kind, teacher_dir: str | Path, student_dir: str | Path | None, blocks_path: str | Path,
                 out_dir: str | Path, settings: TrainSettings, *, num_workers: int, use_gpu: bool = False,
                 parallel: Parallel = "ddp", cpus_per_worker: float = 1, tee_output: bool = False) -> TrainResult:
    """The loop on `num_workers` Ray Train workers, or with one worker here (module docstring)."""
    if not trains_in_its_task(num_workers):
        return run_on_ray_train(kind, teacher_dir, student_dir, blocks_path, out_dir, settings,
                                num_workers=num_workers, use_gpu=use_gpu, parallel=parallel,
                                cpus_per_worker=cpus_per_worker, tee_output=tee_output)
    job = _job(kind, teacher_dir, student_dir, blocks_path, out_dir, settings, parallel, cpus_per_worker, tee_output)
    _prepare(job)
    _run_loop(job, rank=0, asks_gpu=use_gpu)  # the task's output already goes to stage.log (the runner)
    return load_result(job.out_dir)


def run_on_ray_train(
    kind: Kind,
    teacher_dir: str | Path,
    student_dir: str | Path | None,
    blocks_path: str | Path,
    out_dir: str | Path,
    settings: TrainSettings,
    *,
    num_workers: int = 2,
    use_gpu: bool = False,
    parallel: Parallel = "ddp",
    cpus_per_worker: float = 1,
    max_failures: int = 0,
    tee_output: bool = False,
) -> TrainResult:
    """Train on `num_workers` Ray Train workers; returns what rank 0 wrote to out_dir.

    `max_failures` > 0 lets Ray Train restart a failed worker group; the restarted loop
    resumes from the newest checkpoint in out_dir. Every worker's output goes to
    out_dir/stage.log (and, with `tee_output`, also where Ray sends it: the driver).
    """
    if num_workers < 1:
        raise ValueError(f"num_workers={num_workers} must be at least 1")
    job = _job(kind, teacher_dir, student_dir, blocks_path, out_dir, settings, parallel, cpus_per_worker, tee_output)
    if use_gpu:
        _check_a_gpu_worker(cpus_per_worker, settings.dtype)
    _prepare(job)
    trainer = ray.train.torch.TorchTrainer(
        functools.partial(_train_worker, job),  # no train_loop_config: the job is the whole config
        scaling_config=ray.train.ScalingConfig(
            num_workers=num_workers, use_gpu=use_gpu, resources_per_worker={"CPU": cpus_per_worker}
        ),
        run_config=ray.train.RunConfig(
            name=kind,
            storage_path=str(Path(job.out_dir) / "ray_train"),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
        ),
    )
    _fit(trainer)
    return load_result(job.out_dir)


def _job(kind: Kind, teacher_dir: str | Path, student_dir: str | Path | None, blocks_path: str | Path,
         out_dir: str | Path, settings: TrainSettings, parallel: Parallel, cpus_per_worker: float,
         tee_output: bool) -> TrainJob:
    return TrainJob(kind, _absolute(teacher_dir), None if student_dir is None else _absolute(student_dir),
                    _absolute(blocks_path), _absolute(out_dir), settings, parallel,
                    threads=max(1, int(cpus_per_worker)), tee_output=tee_output)


def _prepare(job: TrainJob) -> None:
    Path(job.out_dir).mkdir(parents=True, exist_ok=True)
    shutil.rmtree(Path(job.out_dir) / "ray_train" / "nodes", ignore_errors=True)  # a resumed run records anew


def _check_a_gpu_worker(cpus: float, dtype: str) -> None:
    """DeviceUnusable, naming the node and the cause, when a task holding what one training
    worker holds cannot use its GPU. Ray Train sets its NCCL process group up before the
    loop places itself (`_train_worker`), and on a node whose CUDA is unusable that fails
    with torch's own "Distributed package doesn't have NCCL built in", which names neither."""
    probe = ray.remote(num_gpus=1, num_cpus=cpus)(_place_on_a_gpu)
    try:
        ray.get(probe.remote(dtype))
    except ray.exceptions.RayTaskError as error:
        if isinstance(error.cause, DeviceUnusable):
            raise error.cause from None
        raise


def _place_on_a_gpu(dtype: str) -> None:
    place(asks_gpu=True, dtype=dtype, computes_here=False)


def _absolute(path: str | Path) -> str:
    return str(Path(path).absolute())  # every worker, on any node, reads the same shared path


def _train_worker(job: TrainJob) -> None:
    """Runs on every Ray Train worker, inside the process group Ray Train set up."""
    with captured_output(stage_log_path(job.out_dir), tee=job.tee_output):
        # The GPU Ray assigned (ScalingConfig use_gpu): ray.train.torch.get_device() would hand
        # a worker whose CUDA is unusable the CPU without a word; `place` says why instead.
        _run_loop(job, rank=ray.train.get_context().get_world_rank(), asks_gpu=False)


def _run_loop(job: TrainJob, rank: int, asks_gpu: bool) -> None:
    """The loop in this process, placed by the one rule (builder.running.placement): on the
    GPU Ray assigned, or DeviceUnusable saying why there is none usable."""
    # Ray sets OMP_NUM_THREADS inside the already running worker, after torch may have
    # sized its thread pool; say it explicitly so a worker uses exactly the CPUs it reserved.
    torch.set_num_threads(job.threads)
    placement = place(asks_gpu=asks_gpu, dtype=job.settings.dtype)
    started_at = time.time()  # the stage's time before this is start-up and waiting for CPUs
    _record_node(Path(job.out_dir), rank, started_at, placement.facts())
    job.run(torch.device(placement.device))
    _record_node(Path(job.out_dir), rank, started_at, placement.facts())  # again, with its peak memory


def _record_node(out_dir: Path, rank: int, started_at: float, placement: dict) -> None:
    """Each worker notes where it runs (hostname, Ray node id, device, dtype), for the stage's manifest."""
    record = {"rank": rank, "hostname": socket.gethostname(), "node_id": ray.get_runtime_context().get_node_id(),
              "started_at": started_at, "placement": placement}
    folder = out_dir / "ray_train" / "nodes"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"rank-{rank}.json").write_text(json.dumps(record))


def worker_nodes(out_dir: Path) -> list[dict]:
    """Where the last run's Ray Train workers ran, by rank."""
    files = sorted((Path(out_dir) / "ray_train" / "nodes").glob("rank-*.json"), key=lambda f: int(f.stem[5:]))
    return [json.loads(file.read_text()) for file in files]


def _fit(trainer: ray.train.torch.TorchTrainer) -> None:
    """trainer.fit(), re-raising our own errors (divergence, bad input, a GPU it cannot use) as themselves."""
    try:
        trainer.fit()
    except ray.train.WorkerGroupError as error:
        ours = [e for _, e in sorted(error.worker_failures.items()) if _is_ours(e)]
        if ours:
            raise ours[0] from error
        raise


def _is_ours(error: BaseException) -> bool:
    return isinstance(error, (TrainingDiverged, ValueError, DeviceUnusable))

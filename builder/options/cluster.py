"""What the Ray cluster has, and whether a build fits it (no Ray here: the runner asks Ray).

A stage runs on one node, so its CPUs and GPUs are sized from the cluster's nodes, never
from the driver's machine: a driver with 64 cores asking each stage for 64 CPUs on a cluster
of 16-core nodes waits forever, without a word, for a node that does not exist. By default a
heavy stage takes the largest node's CPUs, or with GPUs one GPU's share of a GPU node's
CPUs, so that every GPU runs a stage at once. Requests that no node (or, for Ray Train's
workers, the whole cluster) can satisfy fail at once and name the flag to change. Before
anything is submitted, every node must see the work directory: stages hand checkpoints to
each other as paths in it.
"""
from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from pathlib import Path

from builder.errors import Problem, SpecError
from builder.options.run_options import RunOptions

PROBE_DIR = ".cluster-probe"


@dataclass(frozen=True)
class Node:
    node_id: str
    hostname: str
    address: str
    cpus: float
    gpus: float

    def __str__(self) -> str:
        return f"{self.hostname} ({self.address}, node {self.node_id[:8]}: {self.cpus:g} CPU, {self.gpus:g} GPU)"


def nodes_from_ray(entries: list[dict]) -> list[Node]:
    """The alive nodes of `ray.nodes()`."""
    return [Node(e["NodeID"], e.get("NodeManagerHostname", "?"), e.get("NodeManagerAddress", "?"),
                 e["Resources"].get("CPU", 0.0), e["Resources"].get("GPU", 0.0))
            for e in entries if e.get("Alive")]


def size_for_cluster(options: RunOptions, nodes: list[Node], where: str) -> RunOptions:
    """`options` with the per-stage CPUs resolved from the cluster (`default_stage_cpus` when
    --cpus-per-stage is 0); raises SpecError naming the flag when a request cannot fit."""
    cpus = options.cpus_per_stage or default_stage_cpus(options, nodes)
    problems = [*_stage_problems(options, nodes, cpus), *_worker_problems(options, nodes, cpus)]
    if problems:
        raise SpecError(where, problems + [Problem("(cluster)", None, describe_nodes(nodes))])
    return options.model_copy(update={"cpus_per_stage": cpus})


def default_stage_cpus(options: RunOptions, nodes: list[Node]) -> int:
    """A heavy stage's CPUs when --cpus-per-stage is 0. On CPUs, the largest node's: a stage
    computes on every core. With --gpus-per-stage, the CPUs that go with that many GPUs on
    the GPU node with the fewest CPUs per GPU, so every GPU of every node can run a stage at
    once (16 CPUs and 8 GPUs: 2 CPUs a stage, 8 stages side by side); taking the whole node
    would leave 7 of its GPUs idle while one stage runs."""
    holders = [node for node in nodes if options.use_gpu and node.gpus >= options.gpus_per_stage]
    if not holders:  # no GPUs asked for (or none to be had: _stage_problems says so)
        return int(max(node.cpus for node in nodes))
    return max(1, int(min(node.cpus / node.gpus for node in holders) * options.gpus_per_stage))


def fit_on_node(node: Node, cpus: float, gpus: float) -> int:
    """How many tasks or actors of `cpus` CPUs and `gpus` GPUs `node` holds at once: each
    lives on one node and needs both there (3 + 3 CPUs hold two 2-CPU actors, not three;
    16 CPUs and 8 GPUs hold one 16-CPU, 1-GPU actor, not eight)."""
    by_cpus = math.floor(node.cpus / cpus)  # every stage, worker and actor takes at least one CPU
    return min(by_cpus, math.floor(node.gpus / gpus)) if gpus else by_cpus


def fit_in_cluster(nodes: list[Node], cpus: float, gpus: float) -> int:
    """How many of them the whole cluster holds at once, node by node."""
    return sum(fit_on_node(node, cpus, gpus) for node in nodes)


def describe_nodes(nodes: list[Node]) -> str:
    return f"the cluster has {len(nodes)} node(s): " + "; ".join(str(node) for node in nodes)


def _stage_problems(options: RunOptions, nodes: list[Node], cpus: int) -> list[Problem]:
    problems = []
    largest_cpus = max(node.cpus for node in nodes)
    if cpus > largest_cpus:
        problems.append(Problem("--cpus-per-stage", cpus, (
            f"each heavy stage asks for {cpus} CPUs but the largest node has {largest_cpus:g}; "
            f"lower --cpus-per-stage to at most {largest_cpus:g} (or 0: the largest node's CPUs)")))
    largest_gpus = max(node.gpus for node in nodes)
    if options.gpus_per_stage > largest_gpus:
        problems.append(Problem("--gpus-per-stage", options.gpus_per_stage, (
            f"each heavy stage asks for {options.gpus_per_stage:g} GPUs but the largest node has "
            f"{largest_gpus:g}; lower --gpus-per-stage to at most {largest_gpus:g} "
            "(0 runs on CPUs), or add GPU nodes to the cluster")))
    elif not problems and fit_in_cluster(nodes, cpus, options.gpus_per_stage) == 0:
        most = max(node.cpus for node in nodes if node.gpus >= options.gpus_per_stage)
        problems.append(Problem("--cpus-per-stage", cpus, (
            f"each heavy stage asks for {cpus} CPUs and {options.gpus_per_stage:g} GPUs on one node, but no "
            f"node has both: the GPU nodes have at most {most:g} CPUs; lower --cpus-per-stage to at most "
            f"{most:g} (or 0: a GPU's share of its node's CPUs)")))
    return problems


def trains_in_its_task(workers: int) -> bool:
    """Whether a training stage runs its loop in its own task (one worker) rather than on a Ray
    Train group (builder.training.ray_train says why): the runner places it, the training runs
    it and the local instance sizes its dashboard by this one rule."""
    return workers == 1


def train_cpus_per_worker(options: RunOptions) -> int:
    """CPUs each Ray Train worker reserves: the stage's CPUs shared among its workers."""
    return max(1, options.stage_cpus() // options.train_workers)


def _worker_problems(options: RunOptions, nodes: list[Node], cpus: int) -> list[Problem]:
    """Ray Train places each worker on one node; all of them must fit at once."""
    per_worker = train_cpus_per_worker(options.model_copy(update={"cpus_per_stage": cpus}))
    gpus = 1 if options.use_gpu else 0  # Ray Train gives each worker one GPU
    slots = fit_in_cluster(nodes, per_worker, gpus)
    what = f"{per_worker} CPU" + (" and 1 GPU" if gpus else "")
    if options.train_workers <= slots:
        return []
    return [Problem("--train-workers", options.train_workers, (
        f"{options.train_workers} Ray Train workers of {what} each do not fit: the cluster holds at most "
        f"{slots}; lower --train-workers to at most {slots} (or lower --cpus-per-stage, which each "
        "training stage shares among its workers)"))]


# --- the work directory, seen by every node --------------------------------------------


def new_probe(workdir: Path) -> tuple[Path, str]:
    """A fresh probe file path inside the work dir and the text one node writes into it."""
    return Path(workdir).resolve() / PROBE_DIR / f"probe-{secrets.token_hex(8)}", secrets.token_hex(16)


def write_probe(path: str, text: str) -> str:
    """Runs on one node: writes the probe; returns an error text, or '' when it worked."""
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
        return ""
    except OSError as error:
        return f"cannot write it: {error}"


def read_probe(path: str, text: str) -> str:
    """Runs on every other node (and the driver): '' when it sees the probe as written."""
    try:
        found = Path(path).read_text()
    except OSError as error:
        return f"cannot read it: {error}"
    return "" if found == text else "it holds other content (a different directory under the same path?)"


def workdir_problems(workdir: Path, writer: Node, write_error: str, read_errors: dict[str, str]) -> list[Problem]:
    """One problem per node (or the driver) that did not see the probe the writer wrote."""
    fix = (f"put --workdir on storage that every node mounts at the same path (NFS, a cluster file "
           f"system, or a shared volume mounted at {Path(workdir).resolve()} on every node), then run again")
    if write_error:
        return [Problem("--workdir", str(workdir), f"node {writer} {write_error}; {fix}")]
    return [Problem("--workdir", str(workdir), f"{who} does not see the probe file that node {writer} wrote "
                    f"into the work dir ({error}); {fix}")
            for who, error in read_errors.items() if error]

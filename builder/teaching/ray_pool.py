"""The teach pass on Ray (with runner.py, ray_train.py and ray_data.py, the only modules
that import Ray): one `builder.teaching.teach_pass.ShardTeacher` actor per worker, each loading the
teacher once and taking the next unwritten shard until none is left.

Why actors and not Ray Train or Ray Data: the pass needs no process group (no gradients, no
collectives: each shard is independent), and each worker must keep a multi-GB teacher
loaded across many shards, which is what an actor is; `ray.util.ActorPool` hands shards to
whichever actor is free, so a slow node does not hold the others up. Ray Data's
map_batches over actors would do the same with a dataset of shard numbers, for no gain.
"""
from __future__ import annotations

import logging

import ray
from ray.util import ActorPool

from builder.options.cluster import nodes_from_ray, train_cpus_per_worker
from builder.options.run_options import RunOptions
from builder.teaching.teach_pass import ShardTeacher, TeachJob

log = logging.getLogger(__name__)


def teach_on_ray(job: TeachJob, options: RunOptions) -> list[dict]:
    """Teach every shard `job` still lacks on as many actors as the cluster has room for (one
    per GPU, or per `train_cpus_per_worker` CPUs, at most one per shard); returns what each
    shard's actor reported (shard, rows, seconds, worker)."""
    pending = job.pending()
    if not pending:
        return []
    cpus = train_cpus_per_worker(options)
    gpus = 1 if options.use_gpu else 0
    workers = min(len(pending), _room(cpus, gpus))
    actor = ray.remote(ShardTeacher).options(num_cpus=cpus, num_gpus=gpus)
    actors = [actor.remote(job, cpus) for _ in range(workers)]
    taught = []
    try:
        pool = ActorPool(actors)
        for done in pool.map_unordered(lambda teacher, shard: teacher.teach.remote(shard), pending):
            log.info("taught shard %d (%d rows) in %.1f s on %s", done["shard"], done["rows"], done["seconds"],
                     done["worker"])
            taught.append(done)
    finally:
        for teacher in actors:
            ray.kill(teacher)
    return taught


def _room(cpus: int, gpus: int) -> int:
    """Workers the cluster's nodes can hold at once, node by node (an actor lives on one
    node: 3 + 3 CPUs hold two 2-CPU actors, not three); at least one."""
    nodes = nodes_from_ray(ray.nodes())
    if gpus:
        return max(1, sum(int(node.gpus) for node in nodes))
    return max(1, sum(int(node.cpus // cpus) for node in nodes))

"""The teach pass on Ray (with runner.py, ray_train.py and ray_data.py, the only modules
that import Ray): one `builder.teaching.teach_pass.ShardTeacher` actor per worker, each loading the
teacher once and taking the next unwritten shard until none is left.

Why actors and not Ray Train or Ray Data: the pass needs no process group (no gradients, no
collectives: each shard is independent), and each worker must keep a multi-GB teacher
loaded across many shards, which is what an actor is; `map_on_started_actors` hands shards
to whichever actor has started and is free, so a slow node does not hold the others up.
Ray Data's map_batches over actors would do the same with a dataset of shard numbers, for
no gain.
"""
from __future__ import annotations

import logging
from typing import Callable, Iterable, Iterator

import ray

from builder.options.cluster import fit_in_cluster, nodes_from_ray, train_cpus_per_worker
from builder.options.run_options import RunOptions
from builder.teaching.teach_pass import ShardTeacher, TeachJob

log = logging.getLogger(__name__)


def teach_on_ray(job: TeachJob, options: RunOptions) -> list[dict]:
    """Teach every shard `job` still lacks on as many actors as the cluster's nodes hold at
    once (each `train_cpus_per_worker` CPUs, and one GPU with --gpus-per-stage; at most one
    per shard); returns what each shard's actor reported (shard, rows, seconds, worker)."""
    pending = job.pending()
    if not pending:
        return []
    cpus = train_cpus_per_worker(options)
    gpus = 1 if options.use_gpu else 0
    room = fit_in_cluster(nodes_from_ray(ray.nodes()), cpus, gpus)
    if room == 0:  # the runner's sizing (builder.options.cluster) refuses this before any stage runs
        raise RuntimeError(f"no node of the cluster holds a teacher actor of {cpus} CPU and {gpus} GPU")
    actor = ray.remote(ShardTeacher).options(num_cpus=cpus, num_gpus=gpus)
    actors = [actor.remote(job, cpus) for _ in range(min(len(pending), room))]
    taught = []
    try:
        for done in map_on_started_actors(actors, pending, lambda teacher, shard: teacher.teach.remote(shard)):
            log.info("taught shard %d (%d rows) in %.1f s on %s", done["shard"], done["rows"], done["seconds"],
                     done["worker"])
            taught.append(done)
    finally:
        for teacher in actors:  # those still waiting for room, too
            ray.kill(teacher)
    return taught


def map_on_started_actors(actors: list, items: Iterable, call: Callable) -> Iterator:
    """`call(actor, item)` (a remote call's ObjectRef) for every item, each handed to an actor
    that has started (its constructor returned) and is free; yields the results as they come.

    Why not ray.util.ActorPool: it hands items to every actor at once, so an actor that cannot
    start (no node has room for it while the others run) holds its items forever and the pass
    never ends. Here an actor gets work only once it is ready, one that never starts is left
    idle, and one whose constructor fails (a teacher that does not load) is dropped; the
    pass fails only when no actor is left to start."""
    todo = list(items)
    starting = {actor.__ray_ready__.remote(): actor for actor in actors}
    running: dict[ray.ObjectRef, object] = {}
    start_errors = []
    while todo or running:
        if not starting and not running:
            raise RuntimeError(f"none of the {len(actors)} actors started: {start_errors[0]}") from start_errors[0]
        [ready], _ = ray.wait([*starting, *running], num_returns=1)
        if ready in starting:
            actor, results = starting.pop(ready), []
            try:
                ray.get(ready)
            except ray.exceptions.RayActorError as error:
                start_errors.append(error)
                continue
        else:
            actor = running.pop(ready)
            results = [ray.get(ready)]  # a failed item fails the pass
        if todo:  # the actor's next item first, then its result to the caller
            running[call(actor, todo.pop(0))] = actor
        yield from results

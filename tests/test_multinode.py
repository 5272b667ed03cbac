"""A family built on a real two-node Ray cluster (head + worker, 1 CPU each, separate `ray
start` processes on 127.0.0.1) equals the same family built on a local instance.

With default flags the stages are sized from the nodes (1 CPU each), not from this machine's
CPU count, which no node has (the build used to wait forever for such a node). The stage
manifests record where each stage and each Ray Train worker ran: both nodes work, and the
distillation runs one Ray Train worker on each.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.tiny_models import save_tiny_checkpoint
from tests.two_nodes import TwoNodeCluster

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

SPEC = """
family: tiny-two-nodes
teacher: {{source: {teacher}}}
data:
  source: embedded:sotu
  seq_len: 32
  max_tokens: 60K
  split: {{calibration: 0.2, heldout: 0.2, seed: 1}}
scoring: {{samples: 8, batch_size: 4}}
distill: {{tokens: 512, global_batch_size: 2, learning_rate: 1.0e-3, warmup_steps: 1, checkpoint_every: 4}}
students:
  - name: tiny-width
    shape: {{hidden_size: 48, intermediate_size: 96}}
  - name: tiny-depth
    shape: {{num_hidden_layers: 2}}
    depth_method: contiguous
evaluation: {{tasks: [], batch_size: 4, perplexity_tokens: 256}}
throughput: {{enabled: false}}
"""


def build(spec: Path, workdir: Path, env: dict, *flags: str) -> subprocess.Popen:
    log = open(workdir.with_suffix(".log"), "wb")
    # One precision for both: `auto` times a bf16 matmul against float32 in each build, and
    # two builds contending for two cores can decide differently (then no hash matches).
    command = [sys.executable, "-m", "builder.cli", str(spec), "--workdir", str(workdir), "--train-workers", "2",
               "--precision", "float32", *flags]
    return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)


def finished(process: subprocess.Popen, workdir: Path) -> None:
    code = process.wait(timeout=1500)
    assert code == 0, workdir.with_suffix(".log").read_text(errors="replace")[-4000:]


@pytest.fixture(scope="module")
def two_builds(tmp_path_factory):
    root = tmp_path_factory.mktemp("two-nodes")
    teacher = save_tiny_checkpoint(root / "teacher", seed=3)
    spec = root / "tiny.yaml"
    spec.write_text(SPEC.format(teacher=teacher))
    with TwoNodeCluster(root / "cluster", cpus=(1, 1)) as cluster:
        on_cluster = build(spec, root / "cluster-runs", cluster.env(), "--address", cluster.address)
        # The local build runs meanwhile, with the cluster build's thread counts (one per
        # stage and per Ray Train worker), so both do the same arithmetic.
        local_env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
        local = build(spec, root / "local-runs", local_env, "--cpus-per-stage", "1")
        finished(on_cluster, root / "cluster-runs")
        finished(local, root / "local-runs")
    return root / "cluster-runs", root / "local-runs"


def manifests(workdir: Path) -> dict[str, dict]:
    return {file.parent.name: json.loads(file.read_text()) for file in workdir.glob("stages/*/manifest.json")}


def test_stages_ran_on_both_nodes_and_training_spans_them(two_builds):
    on_cluster = manifests(two_builds[0])
    stage_nodes = {m["summary"]["node"]["node_id"] for m in on_cluster.values()}
    assert len(stage_nodes) == 2
    distills = [m for name, m in on_cluster.items() if name.startswith("distill-")]
    assert len(distills) == 2
    for manifest in distills:  # one Ray Train worker per 1-CPU node
        workers = manifest["summary"]["train_nodes"]
        assert [w["rank"] for w in workers] == [0, 1]
        assert len({w["node_id"] for w in workers}) == 2
        # where the work ran, for the report: both workers (named by hostname and IP, which the two
        # nodes of this one-machine cluster share; the Ray node ids above tell them apart)
        assert manifest["summary"]["placement"]["workers"] == 2


def test_the_cluster_build_equals_the_local_build(two_builds):
    on_cluster, local = (manifests(workdir) for workdir in two_builds)
    assert sorted(on_cluster) == sorted(local)  # the same stages under the same hashes
    for name in sorted(on_cluster):
        if not name.startswith(("prune-", "distill-")):
            continue
        model_dir = Path(on_cluster[name]["summary"]["model_dir"])
        cluster_weights = load_file(model_dir / "model.safetensors")
        local_weights = load_file(Path(local[name]["summary"]["model_dir"]) / "model.safetensors")
        assert cluster_weights.keys() == local_weights.keys()
        for key, tensor in cluster_weights.items():
            # Exactly equal: the same ops on the same machine with the same thread counts, and
            # gloo's all-reduce of two workers' gradients is one addition, which commutes; only
            # the placement of the processes differs.
            assert torch.equal(tensor, local_weights[key]), f"{name}: {key} differs"

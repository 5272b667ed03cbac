"""SIGTERM, what schedulers send, stops a build in order: exit code 143, no traceback, no
report written, the build's Ray temp dir removed; the same command then resumes.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from builder.running import interrupt
from test_paths import make_sources

ROOT = Path(__file__).resolve().parents[1]

SPEC = """
family: tiny-stop
teacher: {source: ./teacher}
data: {source: ./corpus, seq_len: 16, split: {calibration: 0.2, heldout: 0.2}}
scoring: {samples: 4, batch_size: 4}
distill: {tokens: 64, global_batch_size: 2, warmup_steps: 1}
students:
  - name: narrow
    shape: {intermediate_size: 64}
evaluation: {perplexity_tokens: 256}
throughput: {enabled: false}
"""


def test_a_sigterm_is_noted_and_stops_the_build_where_it_checks():
    before = signal.getsignal(signal.SIGTERM)
    with interrupt.sigterm_noted():
        interrupt.raise_if_stopped()  # nothing asked yet
        os.kill(os.getpid(), signal.SIGTERM)  # the process lives on: the handler only notes it
        assert interrupt.stop_requested()
        with pytest.raises(interrupt.BuildStopped, match="SIGTERM"):
            interrupt.raise_if_stopped()
    assert signal.getsignal(signal.SIGTERM) is before  # an in-process caller keeps its handler
    assert not interrupt.stop_requested()  # the note ends with its window


def test_a_sigterm_noted_by_one_command_does_not_stop_the_next(tmp_path):
    """A request noted in one window (the previous in-process command) is spent: a command
    that notes none (`status` here) ends normally."""
    from builder.cli import main
    from test_cli_plan import GOOD, SMOLLM2_CONFIG

    spec = tmp_path / "tiny.yaml"
    spec.write_text(GOOD)
    with interrupt.sigterm_noted():
        os.kill(os.getpid(), signal.SIGTERM)
    assert main(["status", str(spec), "--workdir", str(tmp_path / "runs"), "--teacher-config", str(SMOLLM2_CONFIG)]) == 0


def start_build(spec: Path, workdir: Path, log: Path) -> subprocess.Popen:
    # --verbose: the driver's log lines (the Ray temp dir among them) reach the log too.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"),
                                                        os.environ.get("PYTHONPATH", "")])}
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "builder.cli", str(spec), "--workdir", str(workdir),
                                 "--cpus-per-stage", "1", "--verbose"], env=env, stdout=out, stderr=subprocess.STDOUT)


def wait_for(condition, timeout_s: float, what: str, build: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert build.poll() is None, f"the build ended ({build.returncode}) before {what}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"timed out waiting until {what}:\n{log.read_text()[-3000:]}"
        time.sleep(0.2)


@pytest.mark.slow
def test_sigterm_mid_build_stops_cleanly_and_the_rerun_resumes(tmp_path):
    make_sources(tmp_path)  # ./teacher and ./corpus
    spec = tmp_path / "tiny.yaml"
    spec.write_text(SPEC)
    workdir, log = tmp_path / "runs", tmp_path / "build.log"
    build = start_build(spec, workdir, log)
    finished = lambda: sorted(workdir.glob("stages/*/manifest.json"))  # noqa: E731
    wait_for(lambda: len(finished()) >= 2, 600, "the acquire stages finished", build, log)
    kept = {path: path.stat().st_mtime_ns for path in finished()}
    build.send_signal(signal.SIGTERM)
    code = build.wait(timeout=120)
    text = log.read_text()
    assert code == interrupt.STOPPED_EXIT_CODE, text[-3000:]
    assert "Traceback" not in text and "stopped by signal SIGTERM" in text, text[-3000:]
    temp_dir = re.search(r"Ray temp dir (\S+)", text).group(1)
    assert not Path(temp_dir).exists()
    assert not (workdir / "tiny-stop" / "report.json").exists()  # the build wrote no report

    rerun = start_build(spec, workdir, tmp_path / "rerun.log")
    assert rerun.wait(timeout=900) == 0, (tmp_path / "rerun.log").read_text()[-3000:]
    assert {path: path.stat().st_mtime_ns for path in kept} == kept  # reused, not redone
    assert (workdir / "tiny-stop" / "report.json").exists()

"""The console a build shows, without running a build: stage output captured into
stage.log (child processes included), "running" read from locks, training progress read
from metrics.jsonl, the plain (non-terminal) stage lines with one message per failure, the
end-of-build family table, `status`, `--help` and `--version`.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from builder.cli import main
from builder.running.console import BuildConsole, render_status
from builder.stages.base import Stage
from builder.running.progress import is_running, lock_path, stage_state, training_progress
from builder.store.stage_log import captured_output, stage_log_path
from builder.store.stage_store import Manifest, StageKey, StageStore
from builder.report.records import FamilyReport
from builder.report.summary import family_table, locations, print_summary


def test_captured_output_holds_python_c_level_and_child_process_output(tmp_path, capfd):
    log = tmp_path / "stage" / "stage.log"
    with captured_output(log):
        print("from print")
        os.write(2, b"from fd 2\n")
        subprocess.run([sys.executable, "-c", "print('from a child')"], check=True)
    print("after the stage")
    text = log.read_text()
    assert "from print" in text and "from fd 2" in text and "from a child" in text
    assert "after the stage" not in text
    out, err = capfd.readouterr()
    assert "from print" not in out + err and "after the stage" in out


def test_tee_writes_the_log_and_still_shows_the_output(tmp_path, capfd):
    log = tmp_path / "stage.log"
    with captured_output(log, tee=True):
        print("shown and kept", flush=True)
    assert "shown and kept" in log.read_text()
    assert "shown and kept" in capfd.readouterr().out


def _hold_lock(path: Path, mode: str = "LOCK_EX") -> subprocess.Popen:
    """Another process holding an flock on `path` until killed (as a running build does)."""
    path.parent.mkdir(parents=True, exist_ok=True)  # stages/.locks/, made by the store's first lock
    code = (f"import fcntl, sys, time; f = open({str(path)!r}, 'ab'); fcntl.flock(f, fcntl.{mode}); "
            "print('locked', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def _stage(name: str = "distill", label: str = "s", tokens: int = 1000, inputs: dict | None = None) -> Stage:
    return Stage(StageKey(name, label, {"tokens": tokens}), inputs or {})


def test_stage_state_done_running_partial_pending(tmp_path):
    store = StageStore(tmp_path)
    stage = _stage()
    assert stage_state(store, stage) == "pending"
    folder = store.prepare(stage.key)
    assert stage_state(store, stage) == "partial"
    reader = _hold_lock(lock_path(folder), "LOCK_SH")  # a build reading the stage as its input
    try:
        assert not is_running(lock_path(folder)) and stage_state(store, stage) == "partial"
    finally:
        reader.kill()
        reader.wait()
    runner = _hold_lock(lock_path(folder), "LOCK_EX")  # a build running the stage (StageStore.locked)
    try:
        assert is_running(lock_path(folder)) and stage_state(store, stage) == "running"
    finally:
        runner.kill()
        runner.wait()
    assert not is_running(lock_path(folder))  # the kernel dropped the dead process's lock
    store.finish(stage.key, 1.0, 0, {})
    assert stage_state(store, stage) == "done"


def test_training_progress_reads_the_last_complete_metrics_line(tmp_path):
    store = StageStore(tmp_path)
    stage = _stage(tokens=1000)
    assert training_progress(store, stage).done == 0
    metrics = store.prepare(stage.key) / "metrics.jsonl"
    metrics.write_text(json.dumps({"step": 1, "tokens": 256}) + "\n" + json.dumps({"step": 2, "tokens": 512})
                       + '\n{"step": 3, "tok')  # the line being written
    progress = training_progress(store, stage)
    assert (progress.done, progress.total, progress.fraction) == (512, 1000, 0.512)
    assert training_progress(store, _stage("evaluate")) is None  # no token budget to measure against


class _Plan:
    """The two attributes BuildConsole reads from a Plan."""

    def __init__(self, stages: list[Stage]):
        self.stages = {stage.id: stage for stage in stages}
        self.spec = type("Spec", (), {"family": "fam"})()


def _plain_console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=400, soft_wrap=True), out


def test_plain_lines_one_failure_message_and_skipped_downstream(tmp_path):
    store = StageStore(tmp_path)
    first, second = _stage("score", ""), _stage("prune", "a")
    broken = _stage("distill", "a", inputs={"student": second.id})
    after = _stage("evaluate", "a", inputs={"model": broken.id})
    console, out = _plain_console()
    with BuildConsole(_Plan([first, second, broken, after]), store, console) as view:
        assert not view.live_mode  # not a terminal: plain lines
        for stage in (first, second, broken, after):
            view.queued(stage.id)
        view.finished(first.id, Manifest("score", "x", "p", 2.5))
        view.finished(second.id, Manifest("prune", "x", "p", 0.5))
        error = "Traceback (most recent call last):\n  ...\nRuntimeError: the student diverged"
        view.failed(broken.id, error)
        view.failed(after.id, error)  # Ray hands the failed input's error to every stage after it
    text = out.getvalue()
    assert "\x1b[" not in text  # no escape codes off a terminal
    assert text.count("FAILED") == 1 and "RuntimeError: the student diverged" in text
    assert str(stage_log_path(store.path(broken.key))) in text or "stage.log" in text
    assert view.rows[after.id].state == "skipped"
    lines = text.splitlines()
    assert any("done" in line and "score" in line and "2.5 s" in line for line in lines)


def test_a_stage_is_shown_running_once_its_log_is_written(tmp_path):
    store = StageStore(tmp_path)
    stage = _stage(tokens=1000)
    console, out = _plain_console()
    with BuildConsole(_Plan([stage]), store, console) as view:
        view.queued(stage.id)
        view.tick()
        assert view.rows[stage.id].state == "queued"
        with captured_output(stage_log_path(store.prepare(stage.key))):
            (store.path(stage.key) / "metrics.jsonl").write_text(json.dumps({"step": 1, "tokens": 250}) + "\n")
            view.tick()
        row = view.rows[stage.id]
        assert row.state == "running" and row.progress.fraction == 0.25 and row.eta() is not None
    assert out.getvalue().count("running") == 1


def _report() -> FamilyReport:
    teacher = {"name": "teacher", "source": "embedded:smollm2-135m-instruct", "params": 135_000_000,
               "path": "/x/teacher",
               "tasks": {"arc_easy": {"scores": {"acc": 0.5, "acc_norm": 0.45}, "stderr": {"acc_norm": 0.111},
                                      "samples": 20}},
               "perplexity": {"perplexity": 42.61, "nll": 3.752, "nll_stderr": 0.03},
               "throughput": {"output_tokens_per_s": 20.0, "ratio_to_teacher": 1.0, "ratio_to_teacher_std": 0.02}}
    small = {"name": "small", "params": 91_600_000, "path": "/x/stages/distill-small-1/model",
             "card": "/x/fam/students/small/README.md",
             "tasks": {"arc_easy": {"scores": {"acc": 0.3}, "samples": 10}},  # binomial stderr
             "perplexity": {"perplexity": 103.7}}
    build = {"precision": "float32", "precision_reason": "--precision float32"}
    return FamilyReport.model_validate({"family": "fam", "build": build, "teacher": teacher, "students": [small],
                                        "hardware": "a CPU", "spec_yaml": "", "portable_spec_yaml": "",
                                        "data_source": "embedded:sotu"})


def test_family_table_shows_params_scores_with_standard_errors_perplexity_and_speed_up():
    console, out = _plain_console()
    console.print(family_table(_report()))
    lines = out.getvalue().splitlines()
    teacher = next(line for line in lines if line.startswith("teacher"))
    assert "135M" in teacher and "0.450 ± 0.111" in teacher and "42.61 (95% CI" in teacher and "1.00×" in teacher
    small = next(line for line in lines if line.startswith("small"))
    # acc 0.3 of 10 examples: lm-eval's stderr of a mean of 0/1 outcomes, sqrt(0.3 * 0.7 / 9) = 0.153
    assert "91.6M" in small and "0.300 ± 0.153" in small and "103.70 (SE unknown)" in small
    assert small.rstrip().endswith("n/a")  # no throughput measured


def test_locations_name_each_students_weights_and_card():
    (line,) = locations(_report())
    assert "weights /x/stages/distill-small-1/model" in line and "card /x/fam/students/small/README.md" in line


def test_print_summary_ends_with_the_reports_own_line():
    console, out = _plain_console()
    print_summary(console, _report(), "wrote /x/fam/report.md (complete)")
    text = out.getvalue()
    assert "0.300 ± 0.153" in text and "weights" in text
    assert text.splitlines()[-1] == "report: wrote /x/fam/report.md (complete)"


def test_render_status_counts_and_details(tmp_path):
    store = StageStore(tmp_path)
    done, partial, pending = _stage("score", ""), _stage("distill", "a", tokens=1000), _stage("evaluate", "a")
    store.prepare(done.key)
    store.finish(done.key, 61.0, 0, {})
    (store.prepare(partial.key) / "metrics.jsonl").write_text(json.dumps({"step": 2, "tokens": 500}) + "\n")
    text = render_status(_Plan([done, partial, pending]), store)
    lines = text.splitlines()
    assert lines[0] == "fam: 1 done, 1 partial, 1 pending"
    assert "took 1 min 01 s" in lines[1] and "50%" in lines[2] and "resumes" in lines[2]


def test_help_shows_examples_and_exit_codes(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "examples:" in text and "build-family status" in text
    assert "exit codes:" in text and "2  the spec or the flags have problems" in text


def test_version(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.startswith("build-family ")


def test_ray_messages_print_one_line_per_kind_and_keep_everything_in_ray_log(tmp_path):
    console, out = _plain_console()
    view = BuildConsole(_Plan([]), StageStore(tmp_path), console, ray_log=tmp_path / "fam" / "ray.log")
    oom = "Task _execute failed due to oom. {} worker(s) were killed.\nTop 10 memory users:\n" + "pid\n" * 40
    view.ray_message(oom.format(5))
    view.ray_message(oom.format(2))  # the same kind again: in the log only
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and "5 worker(s) were killed" in lines[0] and "ray.log" in lines[0]
    assert (tmp_path / "fam" / "ray.log").read_text().count("Top 10 memory users") == 2
    routine = ("Task MapWorker(MapBatches(Tokenizer)).submit failed. There are infinite retries remaining, so the "
               "task will be retried. Error: The actor is dead because it was killed by `ray.kill`.")
    view.ray_message(routine)  # Ray Data tearing down its tokenizer actors: ray.log only
    assert len(out.getvalue().splitlines()) == 1 and "MapWorker" in (tmp_path / "fam" / "ray.log").read_text()


def test_verbose_reaches_the_run_options():
    from builder.cli import options_from, parse_args

    assert options_from(parse_args(["spec.yaml", "--verbose"])).verbose
    assert not options_from(parse_args(["spec.yaml"])).verbose

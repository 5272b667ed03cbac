"""What a build says about its own work (issue 22, item 6): the header counts the stages
that will really run, damaged ones included, and a failed build's table never shows results
of weights it did not build. In process, on a store filled as the stages fill it
(tests/test_report.py); the runner is replaced by what a failed run leaves behind.
"""
from __future__ import annotations

import time

from builder.cli import main
from builder.planning.reuse import current_finishes, decide
from builder.report.family_report import collect_report
from builder.running.runner import BuildResult
from builder.store.stage_store import StageStore
from test_report import checkpoint, family, finish, summary  # noqa: F401 (fixtures)


def failed_rebuild_of(student: str):
    """run_plan for `--rebuild distill-<student>` whose distillation fails: the runner clears
    the stage's folder before it runs it again, and the evaluation reading it is skipped."""
    def run_plan(plan, options, rebuild, observer=None, disk_bytes=None):
        distill, evaluate = plan.students[[s.spec.name for s in plan.students].index(student)].final_stage, \
            plan.eval_stages[student]
        assert distill in rebuild  # what --rebuild asked for
        StageStore(options.workdir).discard(plan.stages[distill].key)
        return BuildResult(failures={distill: "RuntimeError: the loss is nan"},
                           skipped={evaluate: f"skipped: upstream {distill} failed"})

    return run_plan


def finished_build(plan, options):
    """A successful build's result: nothing ran (every stage was reused)."""
    def run_plan(*args, **kwargs):
        return BuildResult()

    return run_plan


def table_row(output: str, model: str) -> list[str]:
    """The cells of `model`'s row in the end-of-build table (after its title line)."""
    table = output.split("(± one standard error; perplexity with its 95% interval)")[1]
    (line,) = [line for line in table.splitlines() if line.split()[:1] == [model] and "weights" not in line]
    return line.split()


def test_the_header_counts_a_damaged_stage_and_what_reads_it_as_to_run(family, checkpoint, monkeypatch, capsys):
    spec, options, plan = family
    store = finish(plan, options, checkpoint)
    distill = plan.students[0].final_stage
    weights = store.path(plan.stages[distill].key) / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])  # a copy cut short
    monkeypatch.setattr("builder.running.runner.run_plan", finished_build(plan, options))
    assert main([str(spec), "--workdir", str(options.workdir)]) == 0
    to_run = [stage_id for stage_id, decision in decide(plan, store).items() if not decision.reuse]
    assert set(to_run) == {distill, plan.eval_stages["tiny-width"], plan.throughput_stage}
    header = capsys.readouterr().out.splitlines()[0]
    assert header == (f"Building tiny-report: 3 stages to run (1 damaged), {len(plan.stages) - 3} finished earlier "
                      f"(reused); work dir {options.workdir}")


def test_a_failed_rebuild_shows_no_score_of_the_weights_it_did_not_build(family, checkpoint, monkeypatch, capsys):
    spec, options, plan = family
    finish(plan, options, checkpoint)
    monkeypatch.setattr("builder.running.runner.run_plan", failed_rebuild_of("tiny-width"))
    assert main([str(spec), "--workdir", str(options.workdir), "--rebuild", "distill-tiny-width"]) == 1
    output = capsys.readouterr().out
    width, depth = table_row(output, "tiny-width"), table_row(output, "tiny-depth")
    assert width[2:] == ["-", "n/a", "n/a"]  # arc_easy, perplexity, speed-up: those were of the old weights
    assert depth[2:6] == ["0.500", "±", "0.189", "300.00"]  # the other student's results are its own: kept
    assert "tiny-width  weights (not built)" in output


def test_a_rebuild_stopped_before_the_evaluation_reran_neither_reuses_nor_reports_it(family, checkpoint):
    spec, options, plan = family
    store = StageStore(options.workdir)
    for stage in plan.stages.values():  # finished as execute_stage finishes them: with the finishes they read
        out = store.prepare(stage.key)
        result, tokens = summary(stage, plan, out, checkpoint)
        store.finish(stage.key, 1.5, tokens, result, [store.manifest(plan.stages[i].key) for i in stage.inputs.values()])
    distill, evaluate = plan.students[0].final_stage, plan.eval_stages["tiny-width"]
    time.sleep(0.01)  # a later finish
    store.discard(plan.stages[distill].key)  # --rebuild distill-tiny-width: it ran again, then the build stopped
    out = store.prepare(plan.stages[distill].key)
    result, tokens = summary(plan.stages[distill], plan, out, checkpoint)
    inputs = [store.manifest(plan.stages[i].key) for i in plan.stages[distill].inputs.values()]
    store.finish(plan.stages[distill].key, 1.5, tokens, result, inputs)

    decision = decide(plan, store)[evaluate]
    assert decision.state == "todo" and decision.reason == f"its input {distill} finished after it"
    current = current_finishes(plan, store)
    assert current[evaluate] is None and current[distill] is not None
    report = collect_report(plan, store, spec.read_text(), {})
    width = next(student for student in report.students if student.name == "tiny-width")
    assert width.path and not width.tasks and width.perplexity is None and not report.complete


def test_status_after_a_failed_rebuild_calls_the_old_evaluation_stale(family, checkpoint, monkeypatch, capsys):
    spec, options, plan = family
    finish(plan, options, checkpoint)
    monkeypatch.setattr("builder.running.runner.run_plan", failed_rebuild_of("tiny-width"))
    main([str(spec), "--workdir", str(options.workdir), "--rebuild", "distill-tiny-width"])
    capsys.readouterr()
    assert main(["status", str(spec), "--workdir", str(options.workdir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    stale = [line.split(" finished on ")[0].split()[1:] for line in lines[1:] if line.split()[0] == "stale"]
    # the evaluation of the weights that are gone, and the throughput run that measured them
    assert stale == [["evaluate", "tiny-width"], ["throughput"]], lines
    assert lines[0] == f"tiny-report: {len(plan.stages) - 3} done, 2 stale, 1 pending"

"""One family, one view at a time: a float32 and a bfloat16 build of one family on one work
dir take turns writing runs/<family>/, so report.json, precision.json, report.md and every
card describe the same build; `report` and `publish` resolve that build and name it.

    .venv/bin/python -m pytest tests/test_family_view.py -q

The store is filled with manifests as in tests/test_report.py (no Ray, no training).
"""
from __future__ import annotations

import json
import logging
import re
import threading
from pathlib import Path

import pytest

import builder.options.precision as precision_module
import builder.report.family_report as family_report
from builder.cli import main
from builder.family import load_and_plan
from builder.report.family_report import write_report_files
from builder.report.records import FamilyReport, format_utc
from test_report import checkpoint, family, finish  # noqa: F401 (fixtures)

PRECISIONS = ("float32", "bfloat16")
CARD_LINE = re.compile(r"Training precision: (float32|bfloat16)[ ;]")


def plans(family):  # noqa: F811 (the fixture's value)
    """The same spec planned as a float32 and as a bfloat16 build: their training stages differ."""
    spec, options, _ = family
    return {dtype: load_and_plan(spec, options.model_copy(update={"precision": dtype})) for dtype in PRECISIONS}


def write(family, plan, store):  # noqa: F811
    spec, options, _ = family
    return write_report_files(plan, store, options.workdir / plan.spec.family, spec.read_text(), {})


def what_the_view_says(folder: Path) -> dict[str, str]:
    """The build each file of the family view describes."""
    said = {"report.json": FamilyReport.load(folder / "report.json").build.precision,
            "precision.json": json.loads((folder / "precision.json").read_text())["dtype"],
            "report.md": re.search(r"This report is of the (\w+) build", (folder / "report.md").read_text())[1]}
    for card in sorted(folder.glob("students/*/README.md")):
        said[card.parent.name] = CARD_LINE.search(card.read_text())[1]
    return said


class Signal(logging.Handler):
    """Sets `event` when a log line contains `text`."""

    def __init__(self, text: str, event: threading.Event):
        super().__init__()
        self.text, self.event = text, event

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.event.set()


def test_two_builds_writing_at_once_take_turns_and_the_view_agrees_with_itself(family, checkpoint, monkeypatch,
                                                                                caplog):
    """The float32 build pauses in the middle of writing its view (cards written, report.json
    not yet) until the bfloat16 build has either written its own or is waiting for its turn:
    without turns, the float32 report.json would end up beside the bfloat16 cards."""
    spec, options, _ = family
    built = plans(family)
    store = finish(built["bfloat16"], options, checkpoint)
    finish(built["float32"], options, checkpoint)
    float32_writing, bf16_done_or_waiting = threading.Event(), threading.Event()
    caplog.set_level(logging.INFO, logger="builder.store.file_lock")
    signal = Signal("writing its view", bf16_done_or_waiting)
    logging.getLogger("builder.store.file_lock").addHandler(signal)
    draw = family_report.draw_plots

    def paused_float32_plots(report, folder):
        if report.build.precision == "float32":
            float32_writing.set()
            assert bf16_done_or_waiting.wait(60)
        return draw(report, folder)

    monkeypatch.setattr(family_report, "draw_plots", paused_float32_plots)
    notes = {}

    def write_float32():
        notes["float32"] = write(family, built["float32"], store).note

    def write_bf16():
        assert float32_writing.wait(60)
        notes["bfloat16"] = write(family, built["bfloat16"], store).note
        bf16_done_or_waiting.set()

    threads = [threading.Thread(target=write_float32), threading.Thread(target=write_bf16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    logging.getLogger("builder.store.file_lock").removeHandler(signal)

    folder = options.workdir / "tiny-report"
    assert set(what_the_view_says(folder).values()) == {"bfloat16"}, what_the_view_says(folder)
    assert "of the float32 build (--precision float32)" in notes["float32"]
    assert notes["bfloat16"].endswith("; it replaces the view of the float32 build")


def test_a_view_of_another_build_keeps_none_of_the_first_builds_cards(family, checkpoint):
    """float32: tiny-width complete (its card kept by later partial reports of that build).
    bfloat16: tiny-width not distilled. The bfloat16 view has no tiny-width card at all."""
    spec, options, _ = family
    built = plans(family)
    store = finish(built["float32"], options, checkpoint, skip=(built["float32"].eval_stages["tiny-depth"],))
    assert write(family, built["float32"], store).written
    folder = options.workdir / "tiny-report"
    assert (folder / "students" / "tiny-width" / "README.md").is_file()
    bf16_width = built["bfloat16"].students[0].final_stage
    finish(built["bfloat16"], options, checkpoint, skip=(bf16_width, built["bfloat16"].eval_stages["tiny-width"]))

    outcome = write(family, built["bfloat16"], store)

    assert outcome.written and outcome.report.student("tiny-width").card is None
    assert not (folder / "students" / "tiny-width").exists()
    assert set(what_the_view_says(folder).values()) == {"bfloat16"}


def test_an_incomplete_build_keeps_the_complete_view_of_another_and_says_whose(family, checkpoint):
    spec, options, _ = family
    built = plans(family)
    store = finish(built["float32"], options, checkpoint)
    write(family, built["float32"], store)
    finish(built["bfloat16"], options, checkpoint, skip=(built["bfloat16"].students[0].final_stage,))

    outcome = write(family, built["bfloat16"], store)

    assert not outcome.written
    assert "kept the complete report" in outcome.note and "of the float32 build: this one, of the bfloat16" in outcome.note
    assert set(what_the_view_says(options.workdir / "tiny-report").values()) == {"float32"}


def test_the_report_names_its_build_and_when_its_last_stage_finished(family, checkpoint):
    spec, options, _ = family
    plan = plans(family)["bfloat16"]
    store = finish(plan, options, checkpoint)
    last = max(store.manifest(stage.key).finished_at for stage in plan.stages.values())

    report = write(family, plan, store).report

    assert report.build.precision == "bfloat16" and report.build.finished_at == last
    assert report.build.describe() == f"the bfloat16 build (--precision bfloat16), finished {format_utc(last)}"
    card = Path(report.students[0].card).read_text()
    assert ("Training precision: bfloat16 autocast, with the student's weights and optimizer state in float32; "
            "chosen by --precision bfloat16.") in card


@pytest.fixture
def float32_here(monkeypatch):
    """`auto` resolves to float32 on this machine, whatever CPU runs the test."""
    monkeypatch.setattr(precision_module, "cpu_flags", lambda: frozenset())


def test_report_and_publish_use_the_build_the_view_describes_and_say_which(family, checkpoint, float32_here,
                                                                            capsys):
    spec, options, _ = family
    plan = plans(family)["bfloat16"]
    finish(plan, options, checkpoint)
    args = [str(spec), "--workdir", str(options.workdir)]
    assert main(["report", *args, "--precision", "bfloat16"]) == 0
    capsys.readouterr()

    assert main(["report", *args]) == 0  # auto here would be float32: the view's build wins
    assert "(complete) of the bfloat16 build (--precision bfloat16), finished 20" in capsys.readouterr().out
    assert main(["publish", *args, "--dry-run"]) == 0
    assert capsys.readouterr().out.startswith("would publish tiny-report: the bfloat16 build (--precision bfloat16)")

    assert main(["publish", *args, "--dry-run", "--precision", "float32"]) == 1
    err = capsys.readouterr().err
    assert "report.json is of the bfloat16 build" in err and "not of the float32 build" in err
    assert f"build-family report {spec} --precision float32`, then publish with --precision float32" in err


def test_publish_refuses_a_view_whose_writing_was_interrupted(family, checkpoint, float32_here, capsys):
    """precision.json is written first and report.json last: if they disagree, the view is half
    of one build and half of another."""
    spec, options, _ = family
    finish(plans(family)["bfloat16"], options, checkpoint)
    args = [str(spec), "--workdir", str(options.workdir)]
    assert main(["report", *args, "--precision", "bfloat16"]) == 0
    record = options.workdir / "tiny-report" / "precision.json"
    record.write_text(json.dumps({"dtype": "float32", "reason": "--precision float32"}))  # a switch, cut short

    assert main(["publish", *args, "--dry-run"]) == 1
    assert "or writing it was interrupted" in capsys.readouterr().err

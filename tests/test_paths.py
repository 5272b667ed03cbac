"""Relative paths in a spec mean the spec's folder, for every command, from any current
directory; a missing, unreadable or empty local source is a spec problem (exit 2) before
anything runs.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from builder.cli import main
from builder.family import load_and_plan
from builder.options.run_options import RunOptions
from builder.spec.schema import absolute_source
from builder.stages.execute import execute_stage
from builder.planning.validate import load_spec
from tiny_models import one_thread, save_tiny_checkpoint  # noqa: F401 (a fixture)

SPEC = """
family: tiny
teacher: {{source: "{teacher}"}}
data: {{source: "{data}", seq_len: 16, split: {{calibration: 0.2, heldout: 0.2}}}}
distill: {{tokens: 64}}
students:
  - name: narrow
    shape: {{intermediate_size: 64}}
throughput: {{enabled: false}}
"""


def write_family(folder: Path, teacher: str = "./teacher", data: str = "./corpus") -> Path:
    """A spec in `folder` whose teacher and data are given relative to it."""
    folder.mkdir(parents=True, exist_ok=True)
    spec = folder / "tiny.yaml"
    spec.write_text(SPEC.format(teacher=teacher, data=data))
    return spec


def make_sources(folder: Path) -> None:
    save_tiny_checkpoint(folder / "teacher")
    corpus = folder / "corpus"
    corpus.mkdir()
    for number in range(40):  # enough documents that every split gets some
        (corpus / f"{number:02d}.txt").write_text(f"Document {number}. The union is strong. " * 8)


@pytest.fixture(scope="module")
def family_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("family")
    make_sources(folder)
    write_family(folder)
    return folder


def dry_run(spec: Path, workdir: Path, capsys) -> tuple[int, str, str]:
    code = main([str(spec), "--dry-run", "--workdir", str(workdir)])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_relative_path_means_the_spec_folder_whatever_the_current_one():
    assert absolute_source("./teacher", Path("/specs/fam")) == "/specs/fam/teacher"
    assert absolute_source("../models/t", Path("/specs/fam")) == "/specs/models/t"
    assert absolute_source("/abs/t", Path("/specs/fam")) == "/abs/t"
    assert absolute_source("~/t", Path("/specs/fam")) == os.path.expanduser("~/t")
    assert absolute_source("embedded:sotu", Path("/specs/fam")) == "embedded:sotu"
    assert absolute_source("hf:org/name@main", Path("/specs/fam")) == "hf:org/name@main"


def test_the_loaded_spec_holds_absolute_paths_from_any_folder(family_folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = load_spec(Path(os.path.relpath(family_folder / "tiny.yaml")))
    assert spec.teacher.source == str(family_folder / "teacher")
    assert spec.data.source == str(family_folder / "corpus")


def test_dry_run_and_stage_hashes_are_the_same_from_another_folder(family_folder, tmp_path, monkeypatch, capsys):
    options = RunOptions(workdir=tmp_path / "runs")
    monkeypatch.chdir(family_folder)
    here = load_and_plan(Path("tiny.yaml"), options)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    there = load_and_plan(family_folder / "tiny.yaml", options)
    assert [stage.key.digest for stage in here.stages.values()] == \
        [stage.key.digest for stage in there.stages.values()]
    code, out, err = dry_run(family_folder / "tiny.yaml", tmp_path / "runs", capsys)
    assert code == 0, err
    assert str(family_folder / "teacher") in out


def test_the_build_acquires_a_relative_teacher_and_data_from_another_folder(
        family_folder, tmp_path, monkeypatch):
    """The build's own stage code (what a Ray worker runs, in whatever folder it starts) finds
    the teacher and the data; it used to look for ./teacher in the current folder."""
    options = RunOptions(workdir=tmp_path / "runs")
    plan = load_and_plan(family_folder / "tiny.yaml", options)
    monkeypatch.chdir(tmp_path)
    teacher_id, data_id = list(plan.stages)[:2]
    teacher = execute_stage(plan.stages[teacher_id], plan.spec, options, {})
    assert teacher.summary["model_dir"] == str(family_folder / "teacher")
    data = execute_stage(plan.stages[data_id], plan.spec, options, {"teacher": teacher})
    assert min(data.summary["tokens"].values()) > 0


@pytest.mark.parametrize("make_data, what", [
    (lambda folder: None, "does not exist"),
    (lambda folder: (folder / "corpus").mkdir(), "holds no .txt, .jsonl or .parquet file"),
    (lambda folder: (folder / "corpus").mkdir() or (folder / "corpus" / "a.txt").write_text(""), "is empty"),
    (lambda folder: (folder / "corpus").write_text("a text file without the suffix"), "is not a .txt, .jsonl or .parquet"),
])
def test_missing_or_empty_local_data_is_a_spec_problem_in_a_dry_run(
        family_folder, tmp_path, capsys, make_data, what):
    folder = tmp_path / "fam"
    spec = write_family(folder, teacher=str(family_folder / "teacher"))
    make_data(folder)
    code, out, err = dry_run(spec, tmp_path / "runs", capsys)
    assert code == 2 and out == ""
    problems = [line for line in err.splitlines() if line.startswith("  - ")]
    assert len(problems) == 1 and problems[0].startswith(f"  - data.source: {folder / 'corpus'} {what}"), err
    assert "spec file's folder" in problems[0] or "permissions" in problems[0]
    assert not (tmp_path / "runs").exists()


def test_a_missing_teacher_folder_is_one_spec_problem_with_the_data_problem(tmp_path, capsys):
    spec = write_family(tmp_path / "fam", teacher="./no-teacher", data="./no-corpus")
    code, out, err = dry_run(spec, tmp_path / "runs", capsys)
    assert code == 2
    fields = [line.removeprefix("  - ").split(":", 1)[0] for line in err.splitlines() if line.startswith("  - ")]
    assert fields == ["teacher.source", "data.source"], err
    assert f"{tmp_path / 'fam' / 'no-teacher'} does not exist" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file, whatever its permissions")
def test_an_unreadable_data_file_is_a_spec_problem(family_folder, tmp_path, capsys):
    folder = tmp_path / "fam"
    spec = write_family(folder, teacher=str(family_folder / "teacher"), data="./corpus.txt")
    (folder / "corpus.txt").write_text("words")
    (folder / "corpus.txt").chmod(0)
    code, _, err = dry_run(spec, tmp_path / "runs", capsys)
    assert code == 2 and "data.source" in err and "cannot be read" in err

"""The families in families/: each validates against its teacher's real config (committed in
tests/data/configs, so no Hub access is needed), its dry run prints the published parameter
counts, and the committed JSON schema is current and accepts every family.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from builder.cli import main
from builder.spec.schema import json_schema
from builder.units import parse_count
from test_spec import fast_lm_eval_index  # noqa: F401 (a fixture)

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ROOT / "families"
CONFIGS = ROOT / "tests" / "data" / "configs"
SCHEMA = FAMILIES / "spec.schema.json"

TEACHER_CONFIGS = {
    "llama-3.1-8b-minitron.yaml": "Llama-3.1-8B.json",
    "mistral-nemo-12b-minitron.yaml": "Mistral-Nemo-Base-2407.json",
    "my-first-family.yaml": "SmolLM2-135M-Instruct.json",
    "qwen3-family.yaml": "Qwen3-8B-Base.json",
    "smollm2-135m.yaml": "SmolLM2-135M-Instruct.json",
}

# Published sizes: the teachers' model cards, and Table 1 of arXiv 2408.11796 for the
# Minitron students. qwen3-4b-width has Qwen3-4B-Base's shape (4.02B, tied embeddings) plus
# the untied LM head it keeps from its teacher: 151,936 x 2,560 = 0.39B more.
PUBLISHED = {
    "llama-3.1-8b-minitron.yaml": {"teacher": 8.03e9, "llama-3.1-minitron-4b-width": 4.5e9,
                                   "llama-3.1-minitron-4b-depth": 4.5e9},
    "mistral-nemo-12b-minitron.yaml": {"teacher": 12.2e9, "mistral-nemo-minitron-8b": 8.4e9},
    "qwen3-family.yaml": {"teacher": 8.2e9, "qwen3-4b-width": 4.02e9 + 151_936 * 2_560},
    "smollm2-135m.yaml": {"teacher": 135e6},
    "my-first-family.yaml": {"teacher": 135e6},
}


def family_files() -> list[Path]:
    return sorted(FAMILIES.glob("*.yaml"))


def test_every_family_has_a_teacher_config_for_offline_validation():
    assert sorted(p.name for p in family_files()) == sorted(TEACHER_CONFIGS)


def dry_run(family: str, workdir: Path, capsys, *flags: str) -> tuple[int, str, str]:
    code = main([str(FAMILIES / family), "--dry-run", "--workdir", str(workdir),
                 "--teacher-config", str(CONFIGS / TEACHER_CONFIGS[family]), *flags])
    out, err = capsys.readouterr()
    return code, out, err


def models_table(plan_text: str) -> dict[str, int]:
    """{model name: parameter count} from the dry run's models table."""
    rows = {}
    for line in plan_text.splitlines():
        # A student by budget shows "~4B" (the search picks its exact size).
        match = re.match(r"^\s{2}(\S+)\s+~?(\d[\d.]*[KMBT]?)\s+\d\.\d\d\s", line)
        if match:
            rows[match.group(1)] = parse_count(match.group(2))
    return rows


@pytest.mark.parametrize("family", sorted(TEACHER_CONFIGS))
def test_family_validates_against_its_teacher_and_matches_published_sizes(
        family, tmp_path, capsys, monkeypatch, fast_lm_eval_index):  # noqa: F811
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a dry run with --teacher-config never needs the Hub
    code, out, err = dry_run(family, tmp_path / "runs", capsys)
    assert code == 0, err
    table = models_table(out)
    spec = yaml.safe_load((FAMILIES / family).read_text())
    assert set(table) == {"teacher"} | {s["name"] for s in spec["students"]}
    for name, published in PUBLISHED[family].items():
        assert table[name] == pytest.approx(published, rel=0.015), name
    assert all(table[name] < table["teacher"] for name in table if name != "teacher")
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing


FITS = re.compile(r"^  fits on 80 GB: (--train-workers .+?) \(every training stage", re.MULTILINE)
TRAINING_ADVICE = re.compile(r"^  (?:correct|distill)-\S+: (.*)$", re.MULTILINE)


@pytest.mark.parametrize("family", sorted(TEACHER_CONFIGS))
def test_the_dry_run_prints_flags_with_which_every_training_stage_fits_on_an_h100(
        family, tmp_path, capsys, monkeypatch, fast_lm_eval_index):  # noqa: F811
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, out, err = dry_run(family, tmp_path / "runs", capsys, "--gpu", "h100")
    assert code == 0, err
    flags = FITS.search(out)
    assert flags, out
    # Planned again with those flags, the memory model says each training stage fits.
    code, out, err = dry_run(family, tmp_path / "runs", capsys, "--gpu", "h100", *flags.group(1).split())
    advice = TRAINING_ADVICE.findall(out)
    assert code == 0 and advice and all(line.startswith("fits on 80 GB") for line in advice), out
    header = " ".join(line.lstrip("#").rstrip("\\") for line in (FAMILIES / family).read_text().splitlines()
                      if line.startswith("#"))
    if "--address" in header:  # the family's own cluster command is that combination
        assert f"--gpus-per-stage 1 {flags.group(1)}" in " ".join(header.split())
    if family == "llama-3.1-8b-minitron.yaml":  # and so is the README's
        assert f"--gpus-per-stage 1 {flags.group(1)}" in " ".join((ROOT / "README.md").read_text().split())


def test_the_committed_schema_is_current(capsys):
    """Regenerate with: build-family schema > families/spec.schema.json"""
    assert main(["schema"]) == 0
    assert SCHEMA.read_text() == capsys.readouterr().out
    assert json.loads(SCHEMA.read_text()) == json_schema()


@pytest.mark.parametrize("path", family_files(), ids=lambda p: p.name)
def test_the_schema_accepts_every_family(path):
    # Editors check with the schema alone; "94B" must pass there as it does in pydantic.
    jsonschema.validate(yaml.safe_load(path.read_text()), json.loads(SCHEMA.read_text()))


def test_the_schema_rejects_what_the_spec_rejects():
    spec = {"family": "x", "teacher": {"source": "hf:a/b"}, "distill": {"tokens": "90 megas"},
            "students": [{"name": "a", "shape": {"hiden_size": 3}}]}
    errors = list(jsonschema.Draft202012Validator(json.loads(SCHEMA.read_text())).iter_errors(spec))
    assert len(errors) == 2


@pytest.mark.parametrize("path", family_files(), ids=lambda p: p.name)
def test_family_header_points_editors_at_the_schema_and_shows_the_command(path):
    lines = path.read_text().splitlines()
    assert lines[0] == "# yaml-language-server: $schema=spec.schema.json"
    assert any(re.match(rf"#\s+build-family families/{re.escape(path.name)}(\s|$)", line) for line in lines)


@pytest.mark.parametrize("path", family_files(), ids=lambda p: p.name)
def test_every_student_says_why(path):
    for student in yaml.safe_load(path.read_text())["students"]:
        assert len(student.get("why", "").split()) >= 10, student["name"]

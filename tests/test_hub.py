"""Publishing: the real huggingface_hub client against a local fake Hub (tests/hub_server.py).

    .venv/bin/python -m pytest tests/test_hub.py -q

Nothing here reaches the network: the fake Hub listens on 127.0.0.1 and the fixture makes
huggingface_hub refuse any other host.
"""
from __future__ import annotations

import logging
import re
import shutil
import traceback
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, snapshot_download
from transformers import AutoModelForCausalLM

from builder.report.records import FamilyReport, GateCheck, StudentRecord, TaskResult
from hub_server import GOOD_TOKEN, READ_TOKEN, fake_hub  # noqa: F401 (fake_hub is a fixture)
from publish.hub import (PublishError, format_plan, local_paths_in, plan_family, publish_report, publish_student,
                         resolve_token)
from test_card import sample_report
from tiny_models import save_tiny_checkpoint

REPO = "my-org/tiny-student"
RECORD = StudentRecord(name="tiny-student", tasks={"hellaswag": TaskResult(scores={"acc": 0.3}, stderr={"acc": 0.05},
                                                                           num_fewshot=0, limit=50, samples=50)})
CARD = b"---\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct\nlibrary_name: transformers\n---\n\n# tiny\n"
SPEC = "family: tiny\n"


# huggingface_hub 2.4's own LFS upload passes `data=` to httpx2, which warns; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "model")


@pytest.fixture(scope="module")
def retrained_weights(tmp_path_factory) -> Path:
    """Other weights for the same architecture: a "new version" of the student."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt2") / "model", seed=1) / "model.safetensors"


@pytest.fixture
def student(checkpoint, tmp_path) -> Path:
    """A private copy of the tiny checkpoint, so a test may change its files."""
    return Path(shutil.copytree(checkpoint, tmp_path / "student"))


def publish(hub, folder: Path, **overrides):
    args = dict(private=True, record=RECORD, token=GOOD_TOKEN, card=CARD, spec_yaml=SPEC, endpoint=hub.url)
    return publish_student(folder, overrides.pop("repo_id", REPO), **{**args, **overrides})


def expected_files(folder: Path) -> dict[str, bytes]:
    files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    return {**files, "README.md": CARD, "minizoo.yaml": SPEC.encode()}


def test_published_student_downloads_and_gives_identical_logits(fake_hub, student, tmp_path):
    result = publish(fake_hub, student)

    assert result.changed and result.revision == fake_hub.head(REPO).oid
    stored = fake_hub.files(REPO)
    assert stored.pop(".gitattributes")  # the Hub's own file from the repo's creation
    assert stored == expected_files(student)
    assert fake_hub.commit_count(REPO) == 2  # the initial commit, then ours: one commit for every file
    assert fake_hub.head(REPO).files["model.safetensors"].lfs  # weights went through the LFS batch API
    assert ("POST", f"/{REPO}.git/info/lfs/objects/batch") in fake_hub.requests

    local = snapshot_download(REPO, token=GOOD_TOKEN, cache_dir=tmp_path / "cache", endpoint=fake_hub.url)
    ids = torch.tensor([[1, 5, 9, 42, 7, 3]])
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(student).eval()(ids).logits
        got = AutoModelForCausalLM.from_pretrained(local).eval()(ids).logits
    assert torch.equal(got, expected)


def test_republishing_unchanged_makes_no_commit(fake_hub, student, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    first = publish(fake_hub, student)
    commits = fake_hub.commit_count(REPO)
    fake_hub.requests.clear()

    again = publish(fake_hub, student)

    assert not again.changed and again.revision == first.revision
    assert fake_hub.commit_count(REPO) == commits
    assert not [path for _, path in fake_hub.requests if "/commit/" in path or "/preupload/" in path]
    shown = caplog.text + "".join(capsys.readouterr()) + repr(first) + repr(again)
    assert GOOD_TOKEN not in shown and not [p for p, data in fake_hub.files(REPO).items() if GOOD_TOKEN.encode() in data]


def test_republishing_uploads_only_changes_and_deletes_stale_files(fake_hub, student):
    (student / "notes.txt").write_text("an old file")
    publish(fake_hub, student)
    (student / "notes.txt").unlink()

    result = publish(fake_hub, student, card=CARD + b"\nNew results.\n")

    assert result.uploaded == ("README.md",) and result.deleted == ("notes.txt",)
    assert "notes.txt" not in fake_hub.files(REPO)
    assert fake_hub.files(REPO)["README.md"].endswith(b"New results.\n")


def assert_secret_free(error: BaseException, caplog, capsys, token: str) -> None:
    shown = "".join(traceback.format_exception(error)) + caplog.text + "".join(capsys.readouterr())
    assert token not in shown


def test_wrong_token_says_what_to_fix_and_never_shows_the_token(fake_hub, student, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    wrong = "hf_wrong_secret_value_that_must_not_leak"
    with pytest.raises(PublishError, match=r"401 Unauthorized.*HF_TOKEN") as caught:
        publish(fake_hub, student, token=wrong)
    assert_secret_free(caught.value, caplog, capsys, wrong)
    assert REPO not in fake_hub.repos


@pytest.mark.parametrize(
    ("token", "repo_id", "problem"),
    [(READ_TOKEN, REPO, "403 Forbidden.*write access"),  # a read-only token
     (GOOD_TOKEN, "other-org/tiny-student", "403 Forbidden.*member with write rights")],  # not a member
)
def test_missing_write_access_names_the_fix(fake_hub, student, caplog, capsys, token, repo_id, problem):
    caplog.set_level(logging.DEBUG)
    with pytest.raises(PublishError, match=problem) as caught:
        publish(fake_hub, student, token=token, repo_id=repo_id)
    assert_secret_free(caught.value, caplog, capsys, token)


def test_no_token_anywhere_says_how_to_log_in(fake_hub):
    with pytest.raises(PublishError, match=r"HF_TOKEN.*hf auth login"):
        resolve_token()


@pytest.mark.parametrize(
    ("route", "status"),
    [("lfs_upload", 403),  # the storage rejects the weights' upload (e.g. an expired URL)
     ("commit", None),  # the connection drops during the commit request
     ("commit", 500)],  # the Hub fails the commit
)
def test_failed_upload_leaves_no_half_commit_and_a_retry_succeeds(fake_hub, student, retrained_weights, route, status):
    publish(fake_hub, student)
    before, commits = fake_hub.files(REPO), fake_hub.commit_count(REPO)
    shutil.copyfile(retrained_weights, student / "model.safetensors")
    new_card = CARD + b"\nRetrained.\n"
    fake_hub.fail(route, status=status)

    with pytest.raises(PublishError, match="never a mix; run the same command again"):
        publish(fake_hub, student, card=new_card)

    assert fake_hub.files(REPO) == before and fake_hub.commit_count(REPO) == commits
    retried = publish(fake_hub, student, card=new_card)
    assert retried.changed and fake_hub.commit_count(REPO) == commits + 1
    assert fake_hub.files(REPO)["model.safetensors"] == (student / "model.safetensors").read_bytes()
    assert fake_hub.files(REPO)["README.md"] == new_card


def test_a_concurrent_push_makes_ours_fail_instead_of_mixing_versions(fake_hub, student, monkeypatch):
    publish(fake_hub, student)
    create_commit = HfApi.create_commit

    def someone_pushes_first(self, *args, **kwargs):  # between our diff and our commit
        fake_hub.push(REPO, "someone else", {"theirs.txt": b"x"})
        return create_commit(self, *args, **kwargs)

    monkeypatch.setattr(HfApi, "create_commit", someone_pushes_first)
    with pytest.raises(PublishError, match="changed while publishing.*run the same command again"):
        publish(fake_hub, student, card=CARD + b"\nv2\n")
    assert fake_hub.files(REPO)["README.md"] == CARD and "theirs.txt" in fake_hub.files(REPO)


@pytest.mark.parametrize(
    ("record", "problem"),
    [(None, "no evaluation results"),
     (StudentRecord(name="s", tasks={"hellaswag": TaskResult(error="lm-eval crashed")}),
      "evaluation failed for task.*hellaswag"),
     (StudentRecord(name="s", evaluation_error="out of memory"), "evaluation failed: out of memory")],
)
def test_student_without_good_evaluation_is_refused_unless_forced(fake_hub, student, record, problem):
    with pytest.raises(PublishError, match=f"refusing to publish {REPO}: .*{problem}.*force"):
        publish(fake_hub, student, record=record)
    assert fake_hub.requests == []  # refused before any request

    assert publish(fake_hub, student, record=record, force=True).changed


def test_a_file_naming_a_local_path_is_refused_even_when_forced(fake_hub, student):
    config = student / "config.json"
    config.write_text(config.read_text().replace("{", f'{{"_name_or_path": "{student}",', 1))
    with pytest.raises(PublishError, match=r"local paths of this machine \(config\.json: /"):
        publish(fake_hub, student, force=True)
    assert fake_hub.requests == []


def family_report(student: Path) -> FamilyReport:
    """The sample report pointed at a real checkpoint, plus a student whose evaluation crashed
    and one whose checkpoint was never made."""
    report = sample_report()
    ready = report.students[0].model_copy(update={"path": str(student)})
    crashed = ready.model_copy(update={
        "name": "smollm2-60m", "repo_id": "my-org/smollm2-60m", "tasks": {}, "perplexity": None,
        "evaluation_error": "Traceback (most recent call last):\n  ...\nRuntimeError: lm-eval crashed\n"})
    unbuilt = ready.model_copy(update={"name": "smollm2-30m", "repo_id": "my-org/smollm2-30m", "path": None})
    return report.model_copy(update={"students": [ready, crashed, unbuilt],
                                     "publish": report.publish.model_copy(update={"collection": True})})


def test_dry_run_lists_every_repo_and_file_with_sizes_and_refusals(student, capsys):
    report = family_report(student)

    assert publish_report(report, dry_run=True) == 1  # two repos would be refused

    captured = capsys.readouterr()
    assert "error: 2 of 3 repo(s) would be refused" in captured.err
    first, text = captured.out.split("\n", 1)
    assert first == ("would publish smollm2-135m-sotu: the bfloat16 build (auto: training on GPUs), "
                     "finished 2025-12-07 07:00 UTC")
    plans = plan_family(report)
    assert text.strip() == format_plan(plans)
    assert [p.repo_id for p in plans] == ["my-org/smollm2-90m-depth", "my-org/smollm2-60m", "my-org/smollm2-30m"]
    names = {f.path_in_repo for f in plans[0].files}
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md", "minizoo.yaml"} <= names
    weights = (student / "model.safetensors").stat().st_size
    assert re.search(rf"^ +model\.safetensors +{weights / 1e3:.1f} kB$", text, re.M)
    assert f"my-org/smollm2-90m-depth  (private, {len(names)} files" in text
    assert "REFUSED: its evaluation failed: RuntimeError: lm-eval crashed; fix it or pass --force" in text
    assert "my-org/smollm2-30m  (private, 0 files, 0 B)  REFUSED: student 'smollm2-30m' has no checkpoint" in text
    assert not plans[2].forceable and text.rstrip().endswith("then publish")


def test_dry_run_exit_code_follows_the_refusals(student, capsys):
    report = family_report(student)
    ready = report.model_copy(update={"students": report.students[:1]})
    assert publish_report(ready, dry_run=True) == 0
    crashed = report.model_copy(update={"students": report.students[:2]})
    assert publish_report(crashed, dry_run=True) == 1
    assert publish_report(crashed, dry_run=True, force=True) == 0  # --force lifts an evaluation refusal
    assert publish_report(report, dry_run=True, force=True) == 1  # but never a missing checkpoint
    assert "error: 1 of 3 repo(s) would be refused" in capsys.readouterr().err


def test_a_student_without_owner_is_refused_with_the_fields_to_set(student, capsys):
    report = family_report(student)
    ownerless = report.students[0].model_copy(update={"repo_id": None})
    assert publish_report(report.model_copy(update={"students": [ownerless]}), dry_run=True) == 1
    out = capsys.readouterr().out
    assert "OWNER/smollm2-90m-depth" in out and "set publish.org" in out and "students[].repo_id" in out


def test_no_file_of_a_dry_run_upload_names_a_local_path(student):
    """Every file that would go up: the card, minizoo.yaml and the checkpoint's files."""
    [plan] = plan_family(family_report(student), students=["smollm2-90m-depth"])
    assert {"README.md", "minizoo.yaml", "config.json", "model.safetensors"} <= {f.path_in_repo for f in plan.files}
    assert {f.path_in_repo: local_paths_in(f, [str(student), str(student.parent)]) for f in plan.files} == {
        f.path_in_repo: [] for f in plan.files}


def test_publish_report_publishes_the_ready_students_and_names_the_rest(fake_hub, student, capsys):
    report = family_report(student)

    assert publish_report(report, token=GOOD_TOKEN, endpoint=fake_hub.url) == 1

    out, err = capsys.readouterr()
    assert out.startswith("publishing smollm2-135m-sotu: the bfloat16 build (auto: training on GPUs)")
    assert "2 problem(s) while publishing (published: my-org/smollm2-90m-depth)" in err
    assert "- smollm2-60m: refusing to publish my-org/smollm2-60m: its evaluation failed" in err
    assert "- smollm2-30m: student 'smollm2-30m' has no checkpoint" in err
    stored = fake_hub.files("my-org/smollm2-90m-depth")
    assert stored["minizoo.yaml"].decode() == report.portable_spec_yaml
    assert b"base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in stored["README.md"]
    assert set(fake_hub.repos) == {"my-org/smollm2-90m-depth"}
    [collection] = fake_hub.collections.values()  # the spec asks for one
    assert collection["title"] == "smollm2-135m-sotu"
    assert [item["id"] for item in collection["items"]] == ["my-org/smollm2-90m-depth"]


def test_a_student_that_failed_its_quality_gate_is_refused_even_forced_while_the_others_go_up(
        fake_hub, student, capsys):
    report = family_report(student)
    ready = report.students[0]
    below = GateCheck(gate="max_perplexity_ratio", measure="held-out perplexity", limit=1.2, student=30.0, teacher=20.0)
    gated = ready.model_copy(update={"name": "smollm2-80m", "repo_id": "my-org/smollm2-80m", "gates": [below]})
    report = report.model_copy(update={"students": [ready, gated]})

    assert publish_report(report, token=GOOD_TOKEN, endpoint=fake_hub.url, force=True) == 1

    err = capsys.readouterr().err
    assert ("- smollm2-80m: refusing to publish my-org/smollm2-80m: it failed its quality gate: held-out perplexity "
            "30 / teacher's 20 = 1.500, above the maximum 1.2") in err
    assert set(fake_hub.repos) == {"my-org/smollm2-90m-depth"}

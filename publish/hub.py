"""Publish students to the Hugging Face Hub: one atomic commit per repo, none when unchanged.

    report = FamilyReport.load(Path("runs/F/report.json"))   # builder/report/records.py
    publish_report(report, dry_run=True)   # --dry-run: every repo and file; exit code 1 if any is refused
    publish_report(report)                 # publish; returns the exit code (0: all published)

How a student is published (`publish_student`):
1. Collect the files: everything in the checkpoint folder (weights, config, tokenizer), the
   card as README.md and the portable spec as minizoo.yaml. A student without evaluation
   results is refused unless forced: a card without scores would publish a model nobody can
   judge. A student that failed its quality gate (records.StudentRecord.gated_out) and a file
   that would publish a local path of this machine are refused, always.
2. `create_repo(exist_ok=True)`, then read the repo's head commit with file metadata.
3. Diff: a local file is unchanged when the remote one has the same LFS sha256 (LFS files)
   or the same git blob id (regular files); these are the ids the Hub itself stores, so the
   check costs one `model_info` call and local hashing, and no download. Remote files the
   folder no longer has (e.g. an old shard) are deleted, so the repo always mirrors the folder.
4. Nothing changed: no commit. Otherwise ONE `create_commit` with the changed files and the
   deletions, with `parent_commit` set to the head we diffed against, so a concurrent push
   makes ours fail instead of silently mixing two versions. The Hub applies a commit all at
   once, so a failure at any point (upload, commit) leaves the previous version intact, and
   rerunning uploads only what is missing.

The token comes from the argument, `HF_TOKEN`, or `hf auth login` (`huggingface_hub.get_token`),
and appears in no message, log line or card.
"""
from __future__ import annotations

import hashlib
import logging
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import httpx2
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError

from builder.report.records import FamilyReport, ModelRecord, StudentRecord
from publish.card import render_card
from publish.portable import find_local_paths

log = logging.getLogger(__name__)

CARD_FILENAME = "README.md"
SPEC_FILENAME = "minizoo.yaml"
HUB_MANAGED = frozenset({".gitattributes"})  # created by the Hub with the repo; never ours to delete
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
# Files whose whole text minizoo or transformers writes: any path-like string in them is a
# leak. Other files (a tokenizer's vocabulary holds tokens such as "./") are only checked
# for this machine's own folders.
WRITTEN_FILES = frozenset({CARD_FILENAME, SPEC_FILENAME, "config.json", "generation_config.json"})
DEFAULT_COMMIT_MESSAGE = "Publish with minizoo"


class PublishError(RuntimeError):
    """A student could not be published; the message says what to fix and never holds the token."""


@dataclass(frozen=True)
class LocalFile:
    """One file to upload: from disk or in memory (the card and spec can be either)."""

    path_in_repo: str
    source: Path | bytes

    @property
    def size(self) -> int:
        return len(self.source) if isinstance(self.source, bytes) else self.source.stat().st_size

    def sha256(self) -> str:
        return _hash(self.source, hashlib.sha256())

    def git_blob_id(self) -> str:
        """The id git gives this content: sha1 of a "blob <size>\\0" header and the bytes."""
        return _hash(self.source, hashlib.sha1(b"blob %d\0" % self.size))


def _hash(source: Path | bytes, hasher: Any) -> str:
    if isinstance(source, bytes):
        hasher.update(source)
    else:
        with open(source, "rb") as stream:
            while chunk := stream.read(1 << 20):
                hasher.update(chunk)
    return hasher.hexdigest()


@dataclass(frozen=True)
class RepoPlan:
    """What publishing one student would upload (the dry run prints these)."""

    name: str
    repo_id: str
    private: bool
    files: tuple[LocalFile, ...]
    refusal: str | None  # why publishing would be refused, if it would
    forceable: bool = True  # whether --force would publish it anyway

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


@dataclass(frozen=True)
class PublishResult:
    repo_id: str
    url: str
    revision: str  # the repo's head commit after publishing
    commit: str | None  # the new commit, None when nothing changed
    uploaded: tuple[str, ...] = ()
    deleted: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        return self.commit is not None


# -- files and checks ------------------------------------------------------------------------
def collect_files(folder: Path, *, card: Path | bytes | None = None, spec_yaml: str | None = None) -> list[LocalFile]:
    """Every file of the checkpoint folder, plus the card (README.md) and spec (minizoo.yaml).

    Hidden files and folders (.cache, .git, ...) are skipped: they are local state, not the model.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise PublishError(f"student folder {folder} does not exist; build the family first (build-family SPEC)")
    files = {
        path.relative_to(folder).as_posix(): LocalFile(path.relative_to(folder).as_posix(), path)
        for path in sorted(folder.rglob("*"))
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    }
    if card is not None:
        files[CARD_FILENAME] = LocalFile(CARD_FILENAME, card if isinstance(card, bytes) else Path(card))
    if spec_yaml is not None:
        files[SPEC_FILENAME] = LocalFile(SPEC_FILENAME, spec_yaml.encode())
    _check_checkpoint(folder, files)
    return [files[path] for path in sorted(files)]


def _check_checkpoint(folder: Path, files: Mapping[str, LocalFile]) -> None:
    if "config.json" not in files or not any(p.endswith(WEIGHT_SUFFIXES) for p in files):
        raise PublishError(
            f"{folder} is not a checkpoint (it needs config.json and weights such as model.safetensors); "
            "point at the student's model folder from report.json (`path`)"
        )


def evaluation_problem(record: ModelRecord | None) -> str | None:
    """Why a model's evaluation is unusable (missing or failed), or None when it is fine."""
    if record is not None and record.evaluation_error:
        return f"its evaluation failed: {record.evaluation_error.strip().splitlines()[-1]}"
    if record is None or not record.evaluated:
        return "it has no evaluation results (the evaluate stage did not run or did not finish)"
    failed = sorted(name for name, task in record.tasks.items() if task.error)
    if failed:
        return f"evaluation failed for task(s) {', '.join(failed)}"
    return None


def local_paths_in(file: LocalFile, known: Iterable[str] = ()) -> list[str]:
    """The local paths `file` would publish: any path in the files minizoo writes, this
    machine's `known` folders in every other text (binary weights are not text)."""
    if file.path_in_repo.endswith(WEIGHT_SUFFIXES):
        return []
    data = file.source if isinstance(file.source, bytes) else file.source.read_bytes()
    text = data.decode("utf-8", errors="replace")
    if file.path_in_repo in WRITTEN_FILES:
        return find_local_paths(text, known)
    return [path for path in known if path and path in text]


def _leak_problem(files: Sequence[LocalFile], known: Iterable[str]) -> str | None:
    known = [str(path) for path in known if path]
    leaks = {f.path_in_repo: found for f in files if (found := local_paths_in(f, known))}
    if not leaks:
        return None
    where = "; ".join(f"{name}: {', '.join(sorted(set(paths))[:3])}" for name, paths in leaks.items())
    return (f"it would publish local paths of this machine ({where}); remove them from those files "
            "(a card and minizoo.yaml never hold them: rewrite the report with `build-family report SPEC`)")


def gate_problem(record: ModelRecord | None) -> str | None:
    """A student below its quality floor (builder.report.gates) is never published."""
    if not isinstance(record, StudentRecord) or not record.gated_out:
        return None
    return (f"it {record.gate_failure_text()}; distill it further or change its shape, or change the spec's "
            "gates (`build-family publish` judges them again; nothing is rebuilt)")


def _refusal(record: ModelRecord | None, files: Sequence[LocalFile]) -> str | None:
    if CARD_FILENAME not in {f.path_in_repo for f in files}:
        return "it has no model card (README.md); rewrite the report with `build-family report SPEC`"
    return evaluation_problem(record)


# -- dry run ---------------------------------------------------------------------------------
def plan_upload(
    folder: Path, repo_id: str, *, private: bool, record: ModelRecord | None,
    card: Path | bytes | None = None, spec_yaml: str | None = None, name: str | None = None,
) -> RepoPlan:
    """What `publish_student` with the same arguments would upload; reads local files only."""
    files = collect_files(folder, card=card, spec_yaml=spec_yaml)
    final = _leak_problem(files, [folder]) or gate_problem(record)  # refusals --force never lifts
    return RepoPlan(name or repo_id.split("/")[-1], repo_id, private, tuple(files),
                    final or _refusal(record, files), forceable=final is None)


def plan_family(
    report: FamilyReport, *, private: bool | None = None, students: Sequence[str] | None = None,
) -> list[RepoPlan]:
    """One plan per student of the report (all of them, or those named); no network.

    `private` defaults to the spec's publish.private. A student that cannot be published at
    all (no checkpoint, no owner, local paths in a file) gets a refusal --force does not lift.
    """
    private = report.publish.private if private is None else private
    plans = []
    for record in _chosen(report, students):
        repo_id = record.repo_id or f"OWNER/{record.name}"
        try:
            _check_owner(record)
            plans.append(plan_upload(_folder(record), repo_id, private=private, record=record, name=record.name,
                                     card=render_card(report, record.name).encode(),
                                     spec_yaml=report.portable_spec_yaml))
        except PublishError as error:
            plans.append(RepoPlan(record.name, repo_id, private, (), str(error), forceable=False))
    return plans


def refused(plans: Sequence[RepoPlan], force: bool = False) -> list[RepoPlan]:
    """The plans publishing would refuse (with --force, only those it cannot lift)."""
    return [plan for plan in plans if plan.refusal and not (force and plan.forceable)]


def format_plan(plans: Sequence[RepoPlan]) -> str:
    """The dry run's text: every repo and file with its size, and what would be refused."""
    lines = []
    for plan in plans:
        visibility = "private" if plan.private else "public"
        head = f"{plan.repo_id}  ({visibility}, {len(plan.files)} files, {_size(plan.total_bytes)})"
        if plan.refusal:
            head += f"  REFUSED: {plan.refusal}" + ("; fix it or pass --force" if plan.forceable else "")
        lines.append(head)
        width = max((len(f.path_in_repo) for f in plan.files), default=0)
        lines += [f"    {f.path_in_repo:<{width}}  {_size(f.size):>10}" for f in plan.files]
    return "\n".join(lines)


def _size(n: int) -> str:
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


# -- publishing --------------------------------------------------------------------------------
def resolve_token(token: str | None = None) -> str:
    """The explicit token, else HF_TOKEN, else the one saved by `hf auth login`."""
    token = token or get_token()
    if not token:
        raise PublishError(
            "no Hugging Face token: set HF_TOKEN to a token with write access "
            "(https://huggingface.co/settings/tokens) or run `hf auth login`"
        )
    return token


def publish_student(
    folder: Path,
    repo_id: str,
    *,
    private: bool,
    record: ModelRecord | None,
    token: str | None = None,
    force: bool = False,
    card: Path | bytes | None = None,
    spec_yaml: str | None = None,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
    endpoint: str | None = None,
    delete_stale: bool = True,
) -> PublishResult:
    """Make `repo_id` hold exactly this student (folder + card + spec) in one commit, or none if unchanged.

    `private` applies when the repo is created; an existing repo keeps its visibility.
    `record` is the student's record in the report (its evaluation); a missing or failed
    evaluation refuses the upload unless `force`; a local path in a file refuses it always.
    `endpoint` overrides HF_ENDPOINT (tests use a local fake Hub).
    """
    plan = plan_upload(folder, repo_id, private=private, record=record, card=card, spec_yaml=spec_yaml)
    if refused([plan], force):
        lift = "; fix that and rebuild, or pass force=True (--force)" if plan.forceable else ""
        raise PublishError(f"refusing to publish {repo_id}: {plan.refusal}{lift}")
    files = plan.files
    token = resolve_token(token)
    api = HfApi(endpoint=endpoint, token=token, library_name="minizoo")
    with _hub_errors("creating the repo", repo_id, token):
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    with _hub_errors("reading the repo", repo_id, token):
        info = api.model_info(repo_id, files_metadata=True)
    if info.private is not None and info.private != private:
        log.warning("%s already exists and is %s; visibility is only set at creation (change it in the repo settings)",
                    repo_id, "private" if info.private else "public")
    operations = _operations(files, info.siblings or [], delete_stale)
    if not operations:
        log.info("%s is up to date at %s; no commit", repo_id, info.sha)
        return PublishResult(repo_id, str(url), info.sha, None)
    with _hub_errors("uploading and committing", repo_id, token):
        commit = api.create_commit(
            repo_id, operations, commit_message=commit_message, parent_commit=info.sha,
            commit_description=_description(operations),
        )
    result = PublishResult(
        repo_id, str(url), commit.oid, commit.oid,
        uploaded=tuple(op.path_in_repo for op in operations if isinstance(op, CommitOperationAdd)),
        deleted=tuple(op.path_in_repo for op in operations if isinstance(op, CommitOperationDelete)),
    )
    log.info("published %s at %s (%d files uploaded, %d deleted)", repo_id, commit.oid, len(result.uploaded), len(result.deleted))
    return result


def _operations(files: Sequence[LocalFile], remote: Sequence[Any], delete_stale: bool) -> list[Any]:
    """Adds for new or changed files, deletes for remote files the student no longer has."""
    by_path = {sibling.rfilename: sibling for sibling in remote}
    operations: list[Any] = [
        CommitOperationAdd(f.path_in_repo, f.source) for f in files if not _unchanged(f, by_path.get(f.path_in_repo))
    ]
    if delete_stale:
        local = {f.path_in_repo for f in files}
        operations += [CommitOperationDelete(p) for p in sorted(by_path) if p not in local and p not in HUB_MANAGED]
    return operations


def _unchanged(local: LocalFile, remote: Any | None) -> bool:
    """Same content as the remote file, judged by the ids the Hub stores (no download)."""
    if remote is None or (remote.size is not None and remote.size != local.size):
        return False
    if remote.lfs is not None:
        return remote.lfs.sha256 == local.sha256()
    return remote.blob_id is not None and remote.blob_id == local.git_blob_id()


def _description(operations: Sequence[Any]) -> str:
    added = [op.path_in_repo for op in operations if isinstance(op, CommitOperationAdd)]
    deleted = [op.path_in_repo for op in operations if isinstance(op, CommitOperationDelete)]
    text = f"Uploaded: {', '.join(added) or 'nothing'}."
    return text + (f" Deleted (no longer in the student): {', '.join(deleted)}." if deleted else "")


def publish_report(
    report: FamilyReport, *, dry_run: bool = False, force: bool = False, token: str | None = None,
    endpoint: str | None = None, students: Sequence[str] | None = None,
) -> int:
    """The `publish` command: print the plan (dry run) or publish; the exit code.

    0: every repo was (or, in a dry run, would be) published; 1: some were refused or
    failed, each named on stderr with its cause and fix. The first line names the build.
    """
    print(f"{'would publish' if dry_run else 'publishing'} {report.family}: {report.build.describe()}")
    if dry_run:
        plans = plan_family(report, students=students)
        print(format_plan(plans))
        blocked = refused(plans, force)
        if blocked:
            print(f"error: {len(blocked)} of {len(plans)} repo(s) would be refused (see REFUSED above); "
                  "fix the causes and rebuild, or pass --force where it is allowed", file=sys.stderr)
        return 1 if blocked else 0
    try:
        publish_family(report, token=token, force=force, students=students, endpoint=endpoint)
    except PublishError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def publish_family(
    report: FamilyReport,
    *,
    private: bool | None = None,
    collection: bool | None = None,
    token: str | None = None,
    force: bool = False,
    students: Sequence[str] | None = None,
    endpoint: str | None = None,
) -> list[PublishResult]:
    """Publish every student of the report (or those named); one commit per repo.

    Each student is tried even when another fails; the failures are raised together at the end.
    `private` and `collection` default to the spec's publish section; `collection` also adds
    the published repos to a Hub collection named after the family.
    """
    private = report.publish.private if private is None else private
    collection = report.publish.collection if collection is None else collection
    token = resolve_token(token)
    results, failures = [], []
    for record in _chosen(report, students):
        try:
            _check_owner(record)
            results.append(publish_student(
                _folder(record), record.repo_id, private=private, record=record, token=token, force=force,
                card=render_card(report, record.name).encode(), spec_yaml=report.portable_spec_yaml,
                endpoint=endpoint, commit_message=f"Publish {record.name} ({report.family} family) with minizoo",
            ))
        except PublishError as error:
            failures.append(f"- {record.name}: {error}")
    if results and collection:
        try:
            add_to_collection(report.family, [r.repo_id for r in results], private=private,
                              token=token, endpoint=endpoint)
        except PublishError as error:  # the repos are up; only the grouping failed
            failures.append(f"- collection {report.family!r}: {error}")
    if failures:
        done = ", ".join(r.repo_id for r in results) or "none"
        raise PublishError(f"{len(failures)} problem(s) while publishing (published: {done}):\n" + "\n".join(failures))
    return results


def add_to_collection(
    title: str, repo_ids: Sequence[str], *, private: bool, token: str | None = None, endpoint: str | None = None,
) -> str:
    """Create (or reuse) the collection `title` in the repos' namespace and add the repos; its slug."""
    if not repo_ids:
        raise PublishError(f"no repos to add to collection {title!r}; publish at least one student first")
    namespace = repo_ids[0].split("/")[0]
    token = resolve_token(token)
    api = HfApi(endpoint=endpoint, token=token, library_name="minizoo")
    with _hub_errors(f"creating collection {title!r}", f"{namespace}/{title}", token):
        slug = api.create_collection(title, namespace=namespace, private=private, exists_ok=True,
                                     description=f"Minitron students built by minizoo ({title}).").slug
        for repo_id in repo_ids:
            api.add_collection_item(slug, repo_id, "model", exists_ok=True)
    return slug


# -- report helpers -----------------------------------------------------------------------------
def _check_owner(record: StudentRecord) -> None:
    if not record.repo_id:
        raise PublishError(f"student {record.name!r} has no Hub owner: set publish.org (your user or organization) "
                           f"or students[].repo_id: OWNER/{record.name} in the spec, then run publish again")


def _folder(record: StudentRecord) -> Path:
    if not record.path:
        raise PublishError(f"student {record.name!r} has no checkpoint (its distill stage did not finish); "
                           "rebuild the family, then publish")
    return Path(record.path)


def _chosen(report: FamilyReport, students: Sequence[str] | None) -> list[StudentRecord]:
    if students is None:
        return list(report.students)
    known = {r.name for r in report.students}
    unknown = sorted(set(students) - known)
    if unknown:
        raise PublishError(f"unknown student(s) {unknown}; the report has {sorted(known)}")
    return [r for r in report.students if r.name in students]


# -- errors ------------------------------------------------------------------------------------
@contextmanager
def _hub_errors(action: str, repo_id: str, token: str) -> Iterator[None]:
    """Turn the client's HTTP and network errors into PublishErrors that say what to fix."""
    try:
        yield
    except (HfHubHTTPError, httpx2.HTTPError, RuntimeError) as error:
        if isinstance(error, RuntimeError) and not _is_transfer_error(error):
            raise
        message = _explain(error, action, repo_id).replace(token, "***")
        raise PublishError(message) from error


def _is_transfer_error(error: BaseException) -> bool:
    """The client wraps a failed file upload in a RuntimeError; anything else is a bug, not the network."""
    return any(isinstance(e, (HfHubHTTPError, httpx2.HTTPError)) for e in _chain(error))


def _chain(error: BaseException | None) -> Iterator[BaseException]:
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__


def _explain(error: BaseException, action: str, repo_id: str) -> str:
    namespace = repo_id.split("/")[0]
    status = error.response.status_code if isinstance(error, HfHubHTTPError) and error.response is not None else None
    if status == 401:
        return (f"the Hub rejected the token (401 Unauthorized) while {action} for {repo_id}: it is invalid, expired "
                "or revoked; set HF_TOKEN to a valid token (https://huggingface.co/settings/tokens) or run `hf auth login`")
    if status == 403:
        return (f"the token may not write to {namespace!r} (403 Forbidden) while {action} for {repo_id}; use a token "
                f"with write access (a 'write' token, or a fine-grained token with write permission on {namespace!r}), "
                f"and if {namespace!r} is an organization, make sure you are a member with write rights")
    if status == 404:
        return (f"{repo_id} was not found (404) while {action}; check the repo id (ORG/NAME) and that the namespace "
                f"{namespace!r} exists, and note that a private repo looks missing to a token without access to it")
    if status in (409, 412) and "commit" in action:  # the Hub answers 412 when parent_commit is no longer the head
        return (f"{repo_id} changed while publishing (someone else committed to it); run the same command again "
                "to publish on top of the new version")
    return (f"publishing {repo_id} failed while {action}: {_describe(error)}. The Hub applies a commit all at once, "
            f"so {repo_id} holds either its previous version or the complete new one, never a mix; run the same "
            "command again to retry (files already uploaded are not sent twice)")


def _describe(error: BaseException) -> str:
    http = next((e for e in _chain(error) if isinstance(e, HfHubHTTPError)), None)
    if http is not None and http.response is not None:
        return f"HTTP {http.response.status_code} {http.server_message or str(http).splitlines()[0]}".strip()
    network = next((e for e in _chain(error) if isinstance(e, httpx2.HTTPError)), error)
    return f"{type(network).__name__}: {network}"

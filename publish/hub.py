"""Publish students to the Hugging Face Hub: one atomic commit per repo, none when unchanged.

    report = json.loads(Path("runs/F/report.json").read_text())
    publish_report(report, dry_run=True)   # --dry-run: every repo and file with sizes; no network
    publish_report(report)                 # publish; returns the exit code (0: all published)

How a student is published (`publish_student`):
1. Collect the files: everything in the checkpoint folder (weights, config, tokenizer), the
   card as README.md and the spec as minizoo.yaml. A student without evaluation results is
   refused unless forced: a card without scores would publish a model nobody can judge.
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
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Protocol, Sequence

import httpx2
import yaml
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError

from publish.card import CardInputError, render_card_from_report

log = logging.getLogger(__name__)

CARD_FILENAME = "README.md"
SPEC_FILENAME = "minizoo.yaml"
HUB_MANAGED = frozenset({".gitattributes"})  # created by the Hub with the repo; never ours to delete
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
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


def evaluation_problem(metrics: Mapping[str, Any] | None) -> str | None:
    """Why a student's evaluation is unusable (missing or failed), or None when it is fine."""
    if not metrics:
        return "it has no evaluation results (the evaluate stage did not run or did not finish)"
    if metrics.get("error"):
        return f"its evaluation failed: {metrics['error']}"
    failed = sorted(task for task, value in metrics.items() if isinstance(value, Mapping) and value.get("error"))
    if failed:
        return f"evaluation failed for task(s) {', '.join(failed)}"
    return None


def _refusal(metrics: Mapping[str, Any] | None, files: Sequence[LocalFile]) -> str | None:
    if CARD_FILENAME not in {f.path_in_repo for f in files}:
        return "it has no model card (README.md); render one with publish.card.render_card_from_report"
    return evaluation_problem(metrics)


# -- dry run ---------------------------------------------------------------------------------
def plan_upload(
    folder: Path, repo_id: str, *, private: bool, metrics: Mapping[str, Any] | None,
    card: Path | bytes | None = None, spec_yaml: str | None = None, name: str | None = None,
) -> RepoPlan:
    """What `publish_student` with the same arguments would upload; reads local files only."""
    files = collect_files(folder, card=card, spec_yaml=spec_yaml)
    return RepoPlan(name or repo_id.split("/")[-1], repo_id, private, tuple(files), _refusal(metrics, files))


def plan_family(
    report: Mapping[str, Any], *, private: bool | None = None, students: Sequence[str] | None = None,
) -> list[RepoPlan]:
    """One plan per student of a report.json dict (all of them, or those named); no network.

    `private` defaults to the spec's publish.private. A student that cannot be published at
    all (no checkpoint) gets a plan with no files and a refusal that --force does not lift.
    """
    private = _settings(report, None)[0] if private is None else private
    plans = []
    for record in _chosen(report, students):
        try:
            files = tuple(collect_files(_folder(record), card=_card(report, record), spec_yaml=report.get("spec_yaml")))
        except PublishError as error:
            plans.append(RepoPlan(record["name"], record["repo_id"], private, (), str(error), forceable=False))
            continue
        plans.append(RepoPlan(record["name"], record["repo_id"], private, files, _refusal(_eval_metrics(record), files)))
    return plans


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
    metrics: Mapping[str, Any] | None,
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
    `metrics` are the student's eval results from report.json (an "error" key, or a task with
    one, marks a failure); missing or failed ones refuse the upload unless `force`.
    `endpoint` overrides HF_ENDPOINT (tests use a local fake Hub).
    """
    files = collect_files(folder, card=card, spec_yaml=spec_yaml)
    refusal = _refusal(metrics, files)
    if refusal and not force:
        raise PublishError(f"refusing to publish {repo_id}: {refusal}; fix that and rebuild, or pass force=True (--force)")
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


class PublishSettings(Protocol):
    """The spec's `publish:` section as publishing needs it (builder.spec.PublishSpec fits)."""

    private: bool
    collection: bool


def publish_report(
    report: Mapping[str, Any], settings: PublishSettings | None = None, *, dry_run: bool = False,
    force: bool = False, token: str | None = None, endpoint: str | None = None,
    students: Sequence[str] | None = None,
) -> int:
    """The `publish` command: print the plan (dry run) or publish; the exit code (0: all published).

    `settings` default to the publish section of the report's spec.
    """
    private, collection = _settings(report, settings)
    if dry_run:
        print(format_plan(plan_family(report, private=private, students=students)))
        return 0
    try:
        publish_family(report, private=private, collection=collection, token=token, force=force,
                       students=students, endpoint=endpoint)
    except PublishError as error:
        log.error("%s", error)
        return 1
    return 0


def publish_family(
    report: Mapping[str, Any],
    *,
    private: bool | None = None,
    collection: bool | None = None,
    token: str | None = None,
    force: bool = False,
    students: Sequence[str] | None = None,
    endpoint: str | None = None,
) -> list[PublishResult]:
    """Publish every student of a report.json dict (or those named); one commit per repo.

    Each student is tried even when another fails; the failures are raised together at the end.
    `private` and `collection` default to the spec's publish section; `collection` also adds
    the published repos to a Hub collection named after the family.
    """
    spec_private, spec_collection = _settings(report, None)
    private = spec_private if private is None else private
    token = resolve_token(token)
    results, failures = [], []
    for record in _chosen(report, students):
        try:
            results.append(publish_student(
                _folder(record), record["repo_id"], private=private, metrics=_eval_metrics(record), token=token,
                force=force, card=_card(report, record), spec_yaml=report.get("spec_yaml"), endpoint=endpoint,
                commit_message=f"Publish {record['name']} ({report['family']} family) with minizoo",
            ))
        except PublishError as error:
            failures.append(f"- {record['name']}: {error}")
    if results and (spec_collection if collection is None else collection):
        try:
            add_to_collection(report["family"], [r.repo_id for r in results], private=private,
                              token=token, endpoint=endpoint)
        except PublishError as error:  # the repos are up; only the grouping failed
            failures.append(f"- collection {report['family']!r}: {error}")
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


# -- report.json helpers -----------------------------------------------------------------------
def _settings(report: Mapping[str, Any], settings: PublishSettings | None) -> tuple[bool, bool]:
    """(private, collection): from the given settings, else the report's spec (private by default)."""
    if settings is not None:
        return settings.private, settings.collection
    section = (yaml.safe_load(report.get("spec_yaml") or "") or {}).get("publish") or {}
    return bool(section.get("private", True)), bool(section.get("collection", False))


def _folder(record: Mapping[str, Any]) -> Path:
    if not record.get("path"):
        raise PublishError(f"student {record['name']!r} has no checkpoint (its distill stage did not finish); "
                           "rebuild the family, then publish")
    return Path(record["path"])


def _eval_metrics(record: Mapping[str, Any]) -> dict[str, Any]:
    """The record's metrics, with the evaluate stage's failure (if any) as their "error"."""
    metrics = dict(record.get("metrics") or {})
    failure = (record.get("evaluation_error") or "").strip()
    if failure:
        metrics["error"] = failure.splitlines()[-1]  # a traceback's last line says what went wrong
    return metrics


def _chosen(report: Mapping[str, Any], students: Sequence[str] | None) -> list[Mapping[str, Any]]:
    records = list(report.get("students") or [])
    if students is None:
        return records
    known = {r["name"] for r in records}
    unknown = sorted(set(students) - known)
    if unknown:
        raise PublishError(f"unknown student(s) {unknown}; the report has {sorted(known)}")
    return [r for r in records if r["name"] in students]


def _card(report: Mapping[str, Any], record: Mapping[str, Any]) -> Path | bytes:
    """The card the build wrote, or one rendered now from the report if it is missing."""
    written = record.get("card")
    if written and Path(written).is_file():
        return Path(written)
    try:
        return render_card_from_report(report, record["name"]).encode()
    except CardInputError as error:
        raise PublishError(f"cannot render the card of {record['name']!r}: {error}") from None


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

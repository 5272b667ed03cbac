"""A small Hugging Face Hub look-alike for tests: the real `huggingface_hub` client talks to it.

It implements the endpoints that `HfApi.create_repo`, `create_commit` (preupload, the LFS
batch API with the "basic" transfer, LFS verify, the NDJSON commit), `model_info`,
`list_repo_tree`, `hf_hub_download`/`snapshot_download` (HEAD/GET `resolve`) and the
collection calls use, with the headers the client reads (`X-Repo-Commit`, `ETag`,
`X-Linked-Etag`, `X-Linked-Size`, `X-Error-Code`, `X-Error-Message`). It was written
against huggingface_hub 2.4.0's source; Xet storage is not implemented, so the fixture
turns it off and uploads take the LFS path.

Like the Hub, a commit is applied all at once or not at all: the branch moves only after
every operation has been checked. Tests inject faults (`hub.fail(...)`) to check that a
failed upload leaves no half-commit.

Only stdlib: `http.server` in a daemon thread, bound to 127.0.0.1 on a free port.
"""
from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import os
import re
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import yaml

# The patterns a new Hub repo's .gitattributes sends to LFS (a subset of the real list).
DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.gguf", "*.h5", "*.onnx", "*.zip")
)
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024  # the Hub stores any file over 10 MB with LFS
INVALID_TOKEN_MESSAGE = "Invalid credentials in Authorization header"  # the client keys on this text


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass(frozen=True)
class StoredFile:
    """One file at one commit; LFS files are stored as a pointer plus the object's content."""

    data: bytes
    lfs: bool

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def pointer(self) -> bytes:
        return lfs_pointer(self.sha256, self.size)

    @property
    def blob_id(self) -> str:
        """The git object id: of the content, or of the pointer for an LFS file (as git stores it)."""
        return git_blob_id(self.pointer if self.lfs else self.data)


@dataclass
class Commit:
    oid: str
    parent: str | None
    message: str
    files: dict[str, StoredFile]
    date: str


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)
    lfs_objects: dict[str, bytes] = field(default_factory=dict)  # sha256 -> content, once uploaded

    @property
    def head(self) -> Commit:
        return self.commits[self.refs["main"]]


@dataclass(frozen=True)
class Account:
    """Who a token belongs to and what it may do."""

    user: str
    orgs: tuple[str, ...] = ()
    write: bool = True

    def may_write(self, namespace: str) -> bool:
        return self.write and namespace in (self.user, *self.orgs)


@dataclass
class Fault:
    """Fail the next `times` requests to one route: with an HTTP status, or by hanging up."""

    status: int | None = None  # None: close the connection without answering
    message: str = "injected fault"
    times: int = 1


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, extra: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra or {}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


class FakeHub:
    """The Hub's state (repos, LFS objects, tokens, collections) plus the HTTP server in front."""

    def __init__(self, tokens: dict[str, Account]):
        self.tokens = tokens
        self.repos: dict[str, Repo] = {}
        self.collections: dict[str, dict[str, Any]] = {}
        self.faults: dict[str, Fault] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, for assertions
        self._upload_tickets: dict[str, tuple[str, str, int]] = {}  # ticket -> (repo, sha256, size)
        self._lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None
        self.url = ""

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> str:
        handler = type("Handler", (_Handler,), {"hub": self})
        self._server = _QuietServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, args=(0.05,), name="fake-hub", daemon=True).start()
        return self.url

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    # -- helpers for tests -----------------------------------------------------------------
    def fail(self, route: str, status: int | None = None, message: str = "injected fault", times: int = 1) -> None:
        """Make the next `times` calls to `route` fail ("commit", "lfs_upload", "lfs_batch", "preupload")."""
        self.faults[route] = Fault(status, message, times)

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        with self._lock:
            repo = self.repos[repo_id]
            return {path: f.data for path, f in repo.commits[self._resolve(repo, revision)].files.items()}

    def commit_count(self, repo_id: str) -> int:
        """Commits on main, the repo's initial commit included."""
        with self._lock:
            repo, count, oid = self.repos[repo_id], 0, self.repos[repo_id].refs["main"]
            while oid is not None:
                count, oid = count + 1, repo.commits[oid].parent
            return count

    def push(self, repo_id: str, message: str, changes: dict[str, bytes]) -> Commit:
        """Commit as another client would (e.g. to race one under test); regular files only."""
        with self._lock:
            repo = self.repos[repo_id]
            files = {**repo.head.files, **{p: StoredFile(d, lfs=False) for p, d in changes.items()}}
            return self._add_commit(repo, message, files)

    def head(self, repo_id: str) -> Commit:
        with self._lock:
            return self.repos[repo_id].head

    # -- auth ------------------------------------------------------------------------------
    def account(self, headers: dict[str, str], required: bool) -> Account | None:
        auth = headers.get("authorization", "")
        if not auth:
            if required:
                raise HubError(401, "You must be authenticated to do this; pass a token")
            return None
        token = auth.removeprefix("Bearer ").strip()
        if token not in self.tokens:
            raise HubError(401, INVALID_TOKEN_MESSAGE)
        return self.tokens[token]

    def readable_repo(self, repo_id: str, headers: dict[str, str]) -> Repo:
        account = self.account(headers, required=False)
        repo = self.repos.get(repo_id)
        namespace = repo_id.split("/")[0]
        visible = repo is not None and (not repo.private or (account and namespace in (account.user, *account.orgs)))
        if not visible:
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def writable_repo(self, repo_id: str, headers: dict[str, str]) -> Repo:
        account = self.account(headers, required=True)
        repo = self.readable_repo(repo_id, headers)
        if not account.may_write(repo_id.split("/")[0]):
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    def _resolve(self, repo: Repo, revision: str) -> str:
        revision = unquote(revision)
        if revision in repo.refs:
            return repo.refs[revision]
        if revision in repo.commits:
            return revision
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def _take_fault(self, route: str) -> Fault | None:
        with self._lock:
            fault = self.faults.get(route)
            if fault is None:
                return None
            fault.times -= 1
            if fault.times <= 0:
                del self.faults[route]
            return fault

    # -- repos -----------------------------------------------------------------------------
    def create_repo(self, body: dict, headers: dict[str, str]) -> dict:
        account = self.account(headers, required=True)
        namespace = body.get("organization") or account.user
        repo_id = f"{namespace}/{body['name']}"
        if not account.may_write(namespace):
            raise HubError(403, f"You don't have the rights to create a model under the namespace \"{namespace}\"")
        with self._lock:
            if repo_id in self.repos:
                # The client reads "url" from this 409 body when exist_ok=True.
                raise HubError(409, "You already created this model repo", extra={"url": f"{self.url}/{repo_id}"})
            repo = Repo(repo_id, private=body.get("visibility") == "private" or bool(body.get("private")))
            initial = {".gitattributes": StoredFile(DEFAULT_GITATTRIBUTES.encode(), lfs=False)}
            self._add_commit(repo, "initial commit", initial)
            self.repos[repo_id] = repo
        return {"url": f"{self.url}/{repo_id}", "name": repo_id, "id": repo_id}

    def _add_commit(self, repo: Repo, message: str, files: dict[str, StoredFile]) -> Commit:
        parent = repo.refs.get("main")
        oid = hashlib.sha1(os.urandom(20)).hexdigest()
        commit = Commit(oid, parent, message, files, _now())
        repo.commits[oid] = commit
        repo.refs["main"] = oid  # the one step that makes the commit visible
        return commit

    def model_info(self, repo_id: str, revision: str, query: dict, headers: dict[str, str]) -> dict:
        with self._lock:
            repo = self.readable_repo(repo_id, headers)
            commit = repo.commits[self._resolve(repo, revision)]
            blobs = query.get("blobs", ["false"])[0].lower() == "true"
            siblings = [self._sibling(path, f, blobs) for path, f in sorted(commit.files.items())]
            return {
                "_id": hashlib.md5(repo_id.encode()).hexdigest()[:24],
                "id": repo_id,
                "modelId": repo_id,
                "author": repo_id.split("/")[0],
                "sha": commit.oid,
                "lastModified": commit.date,
                "createdAt": repo.commits[next(iter(repo.commits))].date,
                "private": repo.private,
                "disabled": False,
                "gated": False,
                "tags": self._card_data(commit).get("tags", []),
                "cardData": self._card_data(commit),
                "siblings": siblings,
            }

    @staticmethod
    def _sibling(path: str, f: StoredFile, blobs: bool) -> dict:
        if not blobs:
            return {"rfilename": path}
        sibling: dict[str, Any] = {"rfilename": path, "size": f.size, "blobId": f.blob_id}
        if f.lfs:
            sibling["lfs"] = {"size": f.size, "sha256": f.sha256, "pointerSize": len(f.pointer)}
        return sibling

    @staticmethod
    def _card_data(commit: Commit) -> dict:
        readme = commit.files.get("README.md")
        match = readme and re.match(rb"^---\s*\n(.*?)\n---\s*\n", readme.data, re.S)
        return (yaml.safe_load(match.group(1)) or {}) if match else {}

    def tree(self, repo_id: str, revision: str, prefix: str, headers: dict[str, str]) -> list[dict]:
        with self._lock:
            repo = self.readable_repo(repo_id, headers)
            commit = repo.commits[self._resolve(repo, revision)]
            entries, folders = [], set()
            for path, f in sorted(commit.files.items()):
                if prefix and not path.startswith(prefix.rstrip("/") + "/"):
                    continue
                folders.update("/".join(path.split("/")[:i]) for i in range(1, path.count("/") + 1))
                entry: dict[str, Any] = {"type": "file", "oid": f.blob_id, "size": f.size, "path": path}
                if f.lfs:
                    entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": len(f.pointer)}
                entries.append(entry)
            dirs = [{"type": "directory", "oid": git_blob_id(d.encode()), "size": 0, "path": d} for d in sorted(folders)]
            return dirs + entries

    # -- uploads ---------------------------------------------------------------------------
    def preupload(self, repo_id: str, revision: str, body: dict, headers: dict[str, str]) -> dict:
        with self._lock:
            repo = self.writable_repo(repo_id, headers)
            commit = repo.commits[self._resolve(repo, revision)]
            lfs_patterns = self._lfs_patterns(commit)
            answers = []
            for item in body["files"]:
                sample = base64.b64decode(item["sample"])
                lfs = self._wants_lfs(item["path"], item["size"], sample, lfs_patterns)
                existing = commit.files.get(item["path"])
                # The client compares this oid with its own: sha256 for LFS, git blob id otherwise.
                oid = (existing.sha256 if existing.lfs else existing.blob_id) if existing else None
                answers.append(
                    {"path": item["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid}
                )
            return {"files": answers}

    @staticmethod
    def _lfs_patterns(commit: Commit) -> list[str]:
        attributes = commit.files.get(".gitattributes")
        text = attributes.data.decode() if attributes else ""
        return [line.split()[0] for line in text.splitlines() if "filter=lfs" in line]

    @staticmethod
    def _wants_lfs(path: str, size: int, sample: bytes, patterns: list[str]) -> bool:
        name = path.rsplit("/", 1)[-1]
        matched = any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(path, p) for p in patterns)
        return matched or size > LFS_SIZE_THRESHOLD or b"\0" in sample

    def lfs_batch(self, repo_id: str, body: dict, headers: dict[str, str]) -> dict:
        with self._lock:
            repo = self.writable_repo(repo_id, headers)
            if body.get("operation") != "upload":
                raise HubError(400, "only uploads are supported")
            objects = []
            for obj in body["objects"]:
                answer: dict[str, Any] = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
                if obj["oid"] not in repo.lfs_objects:  # already stored: no actions, the client skips it
                    ticket = hashlib.sha1(os.urandom(20)).hexdigest()
                    self._upload_tickets[ticket] = (repo_id, obj["oid"], obj["size"])
                    answer["actions"] = {
                        # Like a presigned S3 URL: the ticket is the credential, no auth header is sent.
                        "upload": {"href": f"{self.url}/_lfs/upload/{ticket}", "header": {}},
                        "verify": {"href": f"{self.url}/_lfs/verify/{repo_id}", "header": {}},
                    }
                objects.append(answer)
            return {"transfer": "basic", "objects": objects, "hash_algo": "sha256"}

    def lfs_upload(self, ticket: str, data: bytes) -> None:
        with self._lock:
            if ticket not in self._upload_tickets:
                raise HubError(403, "Request has expired")
            repo_id, oid, size = self._upload_tickets[ticket]
            if len(data) != size or hashlib.sha256(data).hexdigest() != oid:
                raise HubError(400, f"uploaded content does not match oid {oid} and size {size}")
            self.repos[repo_id].lfs_objects[oid] = data
            del self._upload_tickets[ticket]

    def lfs_verify(self, repo_id: str, body: dict, headers: dict[str, str]) -> dict:
        with self._lock:
            repo = self.writable_repo(repo_id, headers)
            stored = repo.lfs_objects.get(body["oid"])
            if stored is None or len(stored) != body["size"]:
                raise HubError(404, f"LFS object {body['oid']} was not uploaded")
            return {"success": True}

    def commit(self, repo_id: str, revision: str, lines: list[dict], headers: dict[str, str]) -> dict:
        with self._lock:
            repo = self.writable_repo(repo_id, headers)
            if unquote(revision) not in repo.refs:
                raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            header = next((line["value"] for line in lines if line["key"] == "header"), None)
            if header is None or not header.get("summary"):
                raise HubError(400, "the commit has no header line with a summary")
            parent = header.get("parentCommit")
            if parent and not repo.head.oid.startswith(parent):
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            files = dict(repo.head.files)
            for line in lines:  # check and apply every operation to a copy: all or nothing
                self._apply(repo, files, line["key"], line["value"])
            commit = self._add_commit(repo, header["summary"], files)
            return {"commitUrl": f"{self.url}/{repo_id}/commit/{commit.oid}", "commitOid": commit.oid, "success": True}

    @staticmethod
    def _apply(repo: Repo, files: dict[str, StoredFile], key: str, value: dict) -> None:
        if key == "header":
            return
        if key == "file":
            if value.get("encoding") != "base64":
                raise HubError(400, "only base64 file content is supported")
            files[value["path"]] = StoredFile(base64.b64decode(value["content"]), lfs=False)
        elif key == "lfsFile":
            data = repo.lfs_objects.get(value["oid"])
            if data is None:
                raise HubError(
                    400, f"Your push was rejected because an LFS pointer pointed to a file that does not exist "
                    f"({value['path']})"
                )
            files[value["path"]] = StoredFile(data, lfs=True)
        elif key == "deletedFile":
            if files.pop(value["path"], None) is None:
                raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
        elif key == "deletedFolder":
            prefix = value["path"].rstrip("/") + "/"
            for path in [p for p in files if p.startswith(prefix)]:
                del files[path]
        else:
            raise HubError(400, f"unknown commit operation {key!r}")

    # -- downloads -------------------------------------------------------------------------
    def resolve(self, repo_id: str, revision: str, path: str, headers: dict[str, str]) -> tuple[dict, bytes]:
        with self._lock:
            repo = self.readable_repo(repo_id, headers)
            commit = repo.commits[self._resolve(repo, revision)]
            f = commit.files.get(path)
            if f is None:
                raise _EntryMissing(commit.oid)
            out = {"X-Repo-Commit": commit.oid, "ETag": f'"{f.blob_id}"', "Content-Length": str(f.size)}
            if f.lfs:  # the client prefers the linked etag (the sha256) and size for LFS files
                out.update({"X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": str(f.size)})
            return out, f.data

    # -- collections -----------------------------------------------------------------------
    def create_collection(self, body: dict, headers: dict[str, str]) -> tuple[int, dict]:
        account = self.account(headers, required=True)
        namespace = body["namespace"]
        if not account.may_write(namespace):
            raise HubError(403, f"You don't have the rights to create a collection under {namespace}")
        with self._lock:
            for slug, found in self.collections.items():
                if found["owner"]["name"] == namespace and found["title"] == body["title"]:
                    return 409, {"error": "Collection already exists", "slug": slug}
            slug = f"{namespace}/{re.sub(r'[^a-z0-9]+', '-', body['title'].lower()).strip('-')}-{len(self.collections):024x}"
            self.collections[slug] = {
                "slug": slug, "title": body["title"], "description": body.get("description"),
                "owner": {"name": namespace}, "items": [], "lastUpdated": _now(), "position": 0,
                "private": bool(body.get("private")), "theme": "indigo", "upvotes": 0,
            }
            return 200, self.collections[slug]

    def get_collection(self, slug: str, headers: dict[str, str]) -> dict:
        self.account(headers, required=False)
        with self._lock:
            if slug not in self.collections:
                raise HubError(404, "Collection not found")
            return self.collections[slug]

    def add_collection_item(self, slug: str, body: dict, headers: dict[str, str]) -> tuple[int, dict]:
        account = self.account(headers, required=True)
        with self._lock:
            collection = self.get_collection(slug, headers)
            if not account.may_write(collection["owner"]["name"]):
                raise HubError(403, "You don't have the rights to edit this collection")
            item = body["item"]
            if any(existing["id"] == item["id"] for existing in collection["items"]):
                return 409, {"error": "Item already exists in the collection"}
            collection["items"].append(
                {"_id": hashlib.md5(item["id"].encode()).hexdigest()[:24], "id": item["id"],
                 "type": item["type"], "position": len(collection["items"]), "note": None}
            )
            collection["lastUpdated"] = _now()
            return 200, collection


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # an injected hang-up makes the socket fail afterwards; that is the point, not news


class _EntryMissing(HubError):
    """A missing file: the Hub still says which commit it looked at, and the client caches that."""

    def __init__(self, commit: str):
        super().__init__(404, "Entry not found", "EntryNotFound")
        self.commit = commit


_REPO = r"(?P<repo>[^/]+/[^/]+)"
_REV = r"(?P<rev>[^/]+)"


class _Handler(BaseHTTPRequestHandler):
    """Routes requests to the FakeHub; every response has a Content-Length (HTTP/1.1 keep-alive)."""

    hub: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet: pytest shows failures anyway
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def _routes(self) -> list[tuple[str, str, Callable[..., Any]]]:
        return [
            ("POST", r"/api/repos/create", self._create_repo),
            ("POST", r"/api/validate-yaml", self._validate_yaml),
            ("GET", r"/api/agent-harnesses", self._agent_harnesses),
            ("GET", rf"/api/models/{_REPO}", self._model_info),
            ("GET", rf"/api/models/{_REPO}/revision/{_REV}", self._model_info),
            ("GET", rf"/api/models/{_REPO}/tree/{_REV}(?:/(?P<path>.*))?", self._tree),
            ("POST", rf"/api/models/{_REPO}/preupload/{_REV}", self._preupload),
            ("POST", rf"/api/models/{_REPO}/commit/{_REV}", self._commit),
            ("POST", rf"/{_REPO}\.git/info/lfs/objects/batch", self._lfs_batch),
            ("PUT", r"/_lfs/upload/(?P<ticket>[0-9a-f]+)", self._lfs_upload),
            ("POST", rf"/_lfs/verify/{_REPO}", self._lfs_verify),
            ("POST", r"/api/collections", self._create_collection),
            ("GET", r"/api/collections/(?P<slug>.+)", self._get_collection),
            ("POST", r"/api/collections/(?P<slug>.+)/items", self._add_collection_item),
            ("GET", rf"/{_REPO}/resolve/{_REV}/(?P<path>.+)", self._resolve),
            ("HEAD", rf"/{_REPO}/resolve/{_REV}/(?P<path>.+)", self._resolve),
        ]

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        self.query = parse_qs(url.query)
        self.lower_headers = {k.lower(): v for k, v in self.headers.items()}
        self.hub.requests.append((method, url.path))
        body = self._read_body()
        for route_method, pattern, handler in self._routes():
            match = re.fullmatch(pattern, url.path)
            if route_method == method and match:
                try:
                    handler(body, **{k: unquote(v) for k, v in match.groupdict().items() if v is not None})
                except _EntryMissing as error:
                    self._error(error, {"X-Repo-Commit": error.commit})
                except HubError as error:
                    self._error(error)
                return
        self._error(HubError(404, f"no route for {method} {url.path}"))

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, payload: bytes, headers: dict[str, str] | None = None, content_type: str = "application/json") -> None:
        self.send_response(status)
        headers = {"Content-Type": content_type, "Content-Length": str(len(payload)), **(headers or {})}
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _json(self, data: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(data).encode(), headers)

    def _error(self, error: HubError, headers: dict[str, str] | None = None) -> None:
        extra = {"X-Error-Message": error.message, **(headers or {})}
        if error.code:
            extra["X-Error-Code"] = error.code
        self._json({"error": error.message, **error.extra}, error.status, extra)

    def _fault(self, route: str) -> bool:
        """Answer with an injected fault, if one is armed for this route; True if it was."""
        fault = self.hub._take_fault(route)
        if fault is None:
            return False
        if fault.status is None:  # hang up mid-request, as a dropped connection would
            self.close_connection = True
            self.connection.shutdown(2)
        else:
            self._error(HubError(fault.status, fault.message))
        return True

    # -- handlers ------------------------------------------------------------------------------
    def _create_repo(self, body: bytes) -> None:
        self._json(self.hub.create_repo(json.loads(body), self.lower_headers))

    def _validate_yaml(self, body: bytes) -> None:
        content = json.loads(body)["content"]
        match = re.match(r"^---\s*\n(.*?)\n---\s*\n", content, re.S)
        try:
            data = yaml.safe_load(match.group(1)) if match else {}
        except yaml.YAMLError as error:
            self._json({"errors": [{"message": f"invalid YAML: {error}"}], "warnings": []}, 400)
            return
        if not isinstance(data, dict):
            self._json({"errors": [{"message": "metadata must be a YAML mapping"}], "warnings": []}, 400)
            return
        self._json({"errors": [], "warnings": []})

    def _agent_harnesses(self, body: bytes) -> None:
        self._json({"standardEnvVars": [], "harnesses": {}})  # the client's agent detection asks once

    def _model_info(self, body: bytes, repo: str, rev: str = "main") -> None:
        self._json(self.hub.model_info(repo, rev, self.query, self.lower_headers))

    def _tree(self, body: bytes, repo: str, rev: str, path: str = "") -> None:
        self._json(self.hub.tree(repo, rev, path, self.lower_headers))

    def _preupload(self, body: bytes, repo: str, rev: str) -> None:
        if not self._fault("preupload"):
            self._json(self.hub.preupload(repo, rev, json.loads(body), self.lower_headers))

    def _commit(self, body: bytes, repo: str, rev: str) -> None:
        if self.lower_headers.get("content-type") != "application/x-ndjson":
            raise HubError(400, "the commit payload must be application/x-ndjson")
        if not self._fault("commit"):
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            self._json(self.hub.commit(repo, rev, lines, self.lower_headers))

    def _lfs_batch(self, body: bytes, repo: str) -> None:
        if not self._fault("lfs_batch"):
            answer = self.hub.lfs_batch(repo, json.loads(body), self.lower_headers)
            self._send(200, json.dumps(answer).encode(), content_type="application/vnd.git-lfs+json")

    def _lfs_upload(self, body: bytes, ticket: str) -> None:
        if not self._fault("lfs_upload"):
            self.hub.lfs_upload(ticket, body)
            self._send(200, b"", {"ETag": '"ok"'})

    def _lfs_verify(self, body: bytes, repo: str) -> None:
        self._json(self.hub.lfs_verify(repo, json.loads(body), self.lower_headers))

    def _create_collection(self, body: bytes) -> None:
        status, data = self.hub.create_collection(json.loads(body), self.lower_headers)
        self._json(data, status)

    def _get_collection(self, body: bytes, slug: str) -> None:
        self._json(self.hub.get_collection(slug, self.lower_headers))

    def _add_collection_item(self, body: bytes, slug: str) -> None:
        status, data = self.hub.add_collection_item(slug, json.loads(body), self.lower_headers)
        self._json(data, status)

    def _resolve(self, body: bytes, repo: str, rev: str, path: str) -> None:
        headers, data = self.hub.resolve(repo, rev, path, self.lower_headers)
        self._send(200, data, headers, content_type="application/octet-stream")


# -- pytest fixture ------------------------------------------------------------------------------
GOOD_TOKEN = "hf_fake_write_token_0123456789"
READ_TOKEN = "hf_fake_read_only_token_98765"


def _local_only(request: Any) -> None:
    """Refuse any request that would leave this machine: tests must never reach the real Hub."""
    if request.url.host not in ("127.0.0.1", "localhost"):
        raise RuntimeError(f"test tried to reach {request.url.host}; only the local fake Hub is allowed")


def _guarded_client_factory() -> Any:
    import httpx2
    from huggingface_hub.utils._http import hf_request_event_hook

    return httpx2.Client(event_hooks={"request": [_local_only, hf_request_event_hook]}, follow_redirects=True, timeout=30)


@pytest.fixture
def fake_hub(monkeypatch: Any, tmp_path_factory: Any) -> Any:
    """A running FakeHub; huggingface_hub is pointed at it (HF_ENDPOINT) with Xet off and no saved login.

    User "alice" (member of "my-org") owns GOOD_TOKEN (write) and READ_TOKEN (read only).
    """
    from huggingface_hub import constants
    from huggingface_hub.utils import _http

    hub = FakeHub({GOOD_TOKEN: Account("alice", ("my-org",)), READ_TOKEN: Account("alice", ("my-org",), write=False)})
    url = hub.start()
    home = tmp_path_factory.mktemp("hf_home")
    # huggingface_hub reads these environment variables once, at import: patch both.
    for name, value in {"HF_ENDPOINT": url, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1",
                        "HF_HOME": str(home)}.items():
        monkeypatch.setenv(name, value)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):  # no token but the test's own
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))  # no real login is read
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    _http.set_client_factory(_guarded_client_factory)
    try:
        yield hub
    finally:
        _http.set_client_factory(_http.default_client_factory)
        hub.stop()

"""A loopback fake of the Hugging Face Hub HTTP API, enough for huggingface_hub 2.x uploads and downloads.

``fake_hub`` yields the server's base URL (a ``str`` subclass that also carries ``.requests``, ``.repos``,
``.unhandled``). ``hub_env`` additionally points huggingface_hub / transformers at it: HF_ENDPOINT set, offline mode
off, a fresh cache and no stored token, all restored at teardown.

Implemented (model repos only; every file is a regular git blob, never LFS / xet):
  GET  /api/whoami-v2
  GET  /api/agent-harnesses                        (huggingface_hub's user-agent "agent detection" registry; empty)
  POST /api/validate-yaml                          (parses the README front matter with yaml.safe_load)
  POST /api/repos/create                           (409 + url when it exists)
  POST /api/models/{repo}/preupload/{rev}          (uploadMode "regular" for every file, git oid of known files)
  POST /api/models/{repo}/commit/{rev}             (NDJSON: header, file (base64), deletedFile, deletedFolder)
  POST /api/models/{repo}/branch/{branch}
  GET  /api/models/{repo}[/revision/{rev}]         (id, sha, private, siblings)
  GET  /api/models/{repo}/tree/{rev}[/{path}]      (?recursive=)
  HEAD/GET /{repo}/resolve/{rev}/{path}            (X-Repo-Commit, ETag, Content-Length; X-Error-Code on 404)
Writes without an ``Authorization: Bearer …`` header get 401; anything else is a 404 recorded in ``.unhandled``.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

USER = "fake-user"
MAX_BODY = 64 * 1024 * 1024  # bounded: tiny test models only
_COUNTER = itertools.count()


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    repo_id: str
    private: bool = False
    branches: dict[str, str] = field(default_factory=dict)  # branch -> commit oid
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit oid -> {path: content}

    def new_commit(self, files: dict[str, bytes]) -> str:
        oid = hashlib.sha1(f"{self.repo_id}:{next(_COUNTER)}".encode()).hexdigest()
        self.commits[oid] = files
        return oid

    def resolve(self, revision: str) -> str | None:
        if revision in self.branches:
            return self.branches[revision]
        return revision if revision in self.commits else None


@dataclass
class Request:
    method: str
    path: str
    authorization: str | None


class FakeHub(str):
    """The base URL, with the server's state attached for assertions."""

    requests: list[Request]
    unhandled: list[str]
    repos: dict[str, Repo]

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return repo.commits[repo.resolve(revision)]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 30  # a stuck client cannot hold a handler thread forever
    hub: FakeHub  # set on the per-server subclass

    def log_message(self, format, *args):  # keep pytest output clean
        pass

    # ------------------------------------------------------------------ plumbing
    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            raise ValueError("body too large")
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, payload=None, *, headers: dict | None = None, body: bytes | None = None):
        if body is None:
            body = b"" if payload is None else json.dumps(payload).encode()
            content_type = "application/json"
        else:
            content_type = "application/octet-stream"
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, code: str | None, message: str, headers: dict | None = None):
        extra = dict(headers or {})
        if code:
            extra["X-Error-Code"] = code
        extra["X-Error-Message"] = message
        self._send(status, {"error": message}, headers=extra)

    def _authorized(self) -> bool:
        auth = self.headers.get("Authorization") or ""
        if auth.startswith("Bearer ") and len(auth) > len("Bearer "):
            return True
        self._error(401, None, "Invalid credentials in Authorization header")
        return False

    def _repo(self, repo_id: str) -> Repo | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None or (repo.private and not self.headers.get("Authorization")):
            self._error(404, "RepoNotFound", f"Repository not found: {repo_id}")
            return None
        return repo

    def _dispatch(self):
        url = urlsplit(self.path)
        path, query = unquote(url.path), parse_qs(url.query)
        self.hub.requests.append(Request(self.command, self.path, self.headers.get("Authorization")))
        try:
            body = self._body() if self.command in ("POST", "PUT") else b""
        except ValueError as error:
            self.close_connection = True
            return self._error(413, None, str(error))
        for method, pattern, handler in ROUTES:
            if method == self.command or (method == "GET" and self.command == "HEAD"):
                match = re.fullmatch(pattern, url.path)
                if match:
                    groups = [unquote(g) if g is not None else None for g in match.groups()]
                    return handler(self, *groups, query=query, body=body)
        self.hub.unhandled.append(f"{self.command} {path}")
        self._error(404, None, f"fake hub: not implemented: {self.command} {path}")

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch

    # ------------------------------------------------------------------ routes
    def whoami(self, *, query, body):
        if self._authorized():
            self._send(200, {"type": "user", "name": USER, "orgs": [], "auth": {"accessToken": {"role": "write"}}})

    def agent_harnesses(self, *, query, body):  # huggingface_hub fetches this once per process for its user agent
        self._send(200, {"standardEnvVars": [], "harnesses": {}})

    def validate_yaml(self, *, query, body):
        import yaml

        content = json.loads(body or b"{}").get("content", "")
        errors = []
        if content.startswith("---"):
            parts = content.split("---", 2)
            try:
                metadata = yaml.safe_load(parts[1]) if len(parts) == 3 else None
                if len(parts) != 3 or not isinstance(metadata, dict):
                    errors.append({"message": "front matter is not a YAML mapping"})
            except yaml.YAMLError as error:
                errors.append({"message": f"invalid YAML: {error}"})
        self._send(400 if errors else 200, {"errors": errors, "warnings": []})

    def create_repo(self, *, query, body):
        if not self._authorized():
            return
        payload = json.loads(body or b"{}")
        repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
        url = f"{self.hub}/{repo_id}"
        if repo_id in self.hub.repos:
            return self._send(409, {"error": "You already created this model repo", "url": url})
        repo = Repo(repo_id, private=payload.get("visibility") == "private" or bool(payload.get("private")))
        repo.branches["main"] = repo.new_commit({})
        self.hub.repos[repo_id] = repo
        self._send(200, {"url": url, "name": repo_id, "id": repo_id})

    def preupload(self, repo_id, revision, *, query, body):
        if not self._authorized() or (repo := self._repo(repo_id)) is None:
            return
        commit = repo.resolve(revision)
        existing = repo.commits[commit] if commit else {}
        files = [
            {
                "path": f["path"],
                "uploadMode": "regular",  # never LFS / xet: no storage backend to emulate
                "shouldIgnore": False,
                "oid": git_blob_oid(existing[f["path"]]) if f["path"] in existing else None,
            }
            for f in json.loads(body)["files"]
        ]
        self._send(200, {"files": files, "commitOid": commit})

    def commit(self, repo_id, revision, *, query, body):
        if not self._authorized() or (repo := self._repo(repo_id)) is None:
            return
        if query.get("create_pr"):
            return self._error(400, None, "fake hub: pull requests are not supported")
        if revision not in repo.branches:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        files = dict(repo.commits[repo.branches[revision]])
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                continue
            if key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {p: c for p, c in files.items() if not p.startswith(prefix)}
            else:  # lfsFile etc.: nothing was uploaded to any storage, refuse loudly
                return self._error(400, None, f"fake hub: unsupported commit operation {key!r}")
        oid = repo.new_commit(files)
        repo.branches[revision] = oid
        self._send(200, {"commitUrl": f"{self.hub}/{repo_id}/commit/{oid}", "commitOid": oid, "success": True})

    def create_branch(self, repo_id, branch, *, query, body):
        if not self._authorized() or (repo := self._repo(repo_id)) is None:
            return
        if branch in repo.branches:
            return self._error(409, None, f"Reference already exists: refs/heads/{branch}")
        start = (json.loads(body) if body else {}).get("startingPoint") or "main"
        repo.branches[branch] = repo.resolve(start) or repo.branches["main"]
        self._send(200, {})

    def repo_info(self, repo_id, revision, *, query, body):
        if (repo := self._repo(repo_id)) is None:
            return
        commit = repo.resolve(revision or "main")
        if commit is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        siblings = [{"rfilename": p} for p in sorted(repo.commits[commit])]
        self._send(200, {"id": repo_id, "modelId": repo_id, "sha": commit, "private": repo.private,
                         "siblings": siblings, "tags": [], "downloads": 0, "likes": 0})

    def tree(self, repo_id, revision, folder, *, query, body):
        if (repo := self._repo(repo_id)) is None:
            return
        commit = repo.resolve(revision)
        if commit is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        prefix = folder.strip("/") + "/" if folder else ""
        entries, folders = [], set()
        for path, content in sorted(repo.commits[commit].items()):
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix):]
            parts = rest.split("/")
            for depth in range(1, len(parts)):
                if recursive or depth == 1:
                    folders.add(prefix + "/".join(parts[:depth]))
            if recursive or len(parts) == 1:
                entries.append({"type": "file", "path": path, "size": len(content), "oid": git_blob_oid(content)})
        if folder and not entries and not folders:
            return self._error(404, "EntryNotFound", f"{folder} does not exist on {revision}")
        entries += [{"type": "directory", "path": p, "oid": hashlib.sha1(p.encode()).hexdigest()} for p in folders]
        self._send(200, sorted(entries, key=lambda e: e["path"]))

    def resolve(self, repo_id, revision, path, *, query, body):
        if (repo := self._repo(repo_id)) is None:
            return
        commit = repo.resolve(revision)
        if commit is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        files = repo.commits[commit]
        if path not in files:
            return self._error(404, "EntryNotFound", f"{path} does not exist on {revision}",
                               headers={"X-Repo-Commit": commit})
        content = files[path]
        self._send(200, body=content, headers={"X-Repo-Commit": commit, "ETag": f'"{git_blob_oid(content)}"'})


_REPO = r"([^/]+/[^/]+)"
ROUTES = [
    ("GET", r"/api/whoami-v2", Handler.whoami),
    ("GET", r"/api/agent-harnesses", Handler.agent_harnesses),
    ("POST", r"/api/validate-yaml", Handler.validate_yaml),
    ("POST", r"/api/repos/create", Handler.create_repo),
    ("POST", rf"/api/models/{_REPO}/preupload/([^/]+)", Handler.preupload),
    ("POST", rf"/api/models/{_REPO}/commit/([^/]+)", Handler.commit),
    ("POST", rf"/api/models/{_REPO}/branch/([^/]+)", Handler.create_branch),
    ("GET", rf"/api/models/{_REPO}(?:/revision/([^/]+))?", Handler.repo_info),
    ("GET", rf"/api/models/{_REPO}/tree/([^/]+)(?:/(.*))?", Handler.tree),
    ("GET", rf"/{_REPO}/resolve/([^/]+)/(.+)", Handler.resolve),
]


@pytest.fixture
def fake_hub():
    """Start the fake Hub on 127.0.0.1 (random port) in a daemon thread; yields its base URL."""
    handler = type("BoundHandler", (Handler,), {})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    hub = FakeHub(f"http://127.0.0.1:{server.server_address[1]}")
    hub.requests, hub.unhandled, hub.repos = [], [], {}
    handler.hub = hub
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def hub_env(fake_hub, monkeypatch, tmp_path):
    """Point huggingface_hub and transformers at ``fake_hub``: online, fresh cache, no stored token.

    huggingface_hub reads HF_ENDPOINT / HF_HUB_OFFLINE / HF_HOME into ``huggingface_hub.constants`` at import time
    (tests/conftest.py sets HF_HUB_OFFLINE=1 before that), so the constants are patched along with the env.
    """
    from huggingface_hub import constants

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_ENDPOINT", str(fake_hub))
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", str(fake_hub))
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", f"{fake_hub}/{{repo_id}}/resolve/{{revision}}/{{filename}}")
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    try:  # transformers keeps one shared HfApi, created with whatever endpoint was current then
        import transformers.utils.hub as transformers_hub

        monkeypatch.setattr(transformers_hub, "_hf_api", None, raising=False)
    except ImportError:
        pass
    return fake_hub

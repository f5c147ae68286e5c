"""A fake Hugging Face Hub on 127.0.0.1: a real HTTP server for the manifest and download tests.

It speaks the parts of the Hub the project uses (llmhost.hf and files/fetch_model.py):

- ``GET /api/models/{repo}/revision/{rev}?blobs=true``: sha and siblings with size and lfs.sha256
- ``HEAD``/``GET /{repo}/resolve/{rev}/{file}``: X-Repo-Commit, X-Linked-Etag, X-Linked-Size and
  a 302 to a "CDN" listener (a second port of the same server, so a client's Authorization header
  must be dropped on the redirect) that honours Range with 206 and Content-Range
- a gated repo (metadata public, downloads need ``Authorization: Bearer <token>``: 401 without,
  403 with a wrong one) and a private one (everything needs the token), with HF's X-Error-Code

Faults can be switched at run time (``fake.faults``) and bytes served are counted per file::

    with FakeHF() as hub:
        commit = hub.add_repo("org/model", {"model.gguf": path})
        hub.faults.drop_after = 1000
        ...  # point HF_ENDPOINT at hub.endpoint
        hub.served["model.gguf"]
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

BLOCK = 256 * 1024
_SHA_CACHE: dict[tuple[str, int, int], str] = {}


@dataclass
class FakeFile:
    name: str
    size: int
    sha256: str
    path: Path | None = None
    data: bytes | None = None
    lfs: bool = True

    def read(self, offset: int, length: int) -> bytes:
        if self.data is not None:
            return self.data[offset:offset + length]
        with open(self.path, "rb") as f:
            f.seek(offset)
            return f.read(length)


@dataclass
class FakeRepo:
    name: str
    commit: str
    files: dict[str, FakeFile]
    refs: dict[str, str]
    gated: bool = False
    private: bool = False
    token: str | None = None
    older: set[str] = field(default_factory=set)  # earlier commits, still resolvable by sha
    older_files: dict[str, dict[str, FakeFile]] = field(default_factory=dict)  # their files

    def knows(self, commit: str) -> bool:
        return commit == self.commit or commit in self.older

    def files_at(self, commit: str) -> dict[str, FakeFile]:
        return self.older_files.get(commit, self.files) if commit != self.commit else self.files


@dataclass
class Faults:
    """Switches read by every request; set attributes directly, ``reset()`` clears them all."""

    drop_after: int | None = None   # cut the connection once a file's served bytes reach this
    drop_always: bool = False       # keep cutting (every later request is cut at once)
    corrupt_offset: int | None = None  # flip the byte at this file offset when serving it
    corrupt_always: bool = False
    ignore_range: bool = False      # answer 200 with the whole file to ranged requests
    fail_next: int = 0              # answer fail_status to this many next requests (any path)
    fail_status: int = 503
    rate_limit: int | None = None   # bytes/s per connection for file bodies

    def reset(self) -> None:
        for key, value in Faults().__dict__.items():
            setattr(self, key, value)


@dataclass
class Log:
    method: str
    path: str
    range: str | None
    authorization: bool
    status: int = 0


def sha256_path(path: Path) -> str:
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(1 << 22):
                digest.update(block)
        _SHA_CACHE[key] = digest.hexdigest()
    return _SHA_CACHE[key]


def make_split_gguf(directory: Path, prefix: str, shards: int, shard_size: int,
                    seed: int = 0) -> list[Path]:
    """Small synthetic shards named like llama.cpp's gguf-split output (not loadable)."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(1, shards + 1):
        path = directory / f"{prefix}-{i:05d}-of-{shards:05d}.gguf"
        path.write_bytes(b"GGUF" + rng.randbytes(shard_size - 4))
        paths.append(path)
    return paths


class FakeHF:
    def __init__(self) -> None:
        self.repos: dict[str, FakeRepo] = {}
        self.faults = Faults()
        self.served: dict[str, int] = {}
        self.log: list[Log] = []
        self.lock = threading.Lock()
        self._servers: list[ThreadingHTTPServer] = []

    # ------------------------------------------------------------------ set-up
    def add_repo(self, repo: str, files: dict[str, Path | bytes], *, refs: tuple[str, ...] = (),
                 gated: bool = False, private: bool = False, token: str | None = None,
                 non_lfs: tuple[str, ...] = (), sha256: dict[str, str] | None = None) -> str:
        """Register a repo with one commit; ``refs`` are more branch/tag names for it (``main`` always).
        Returns the commit sha. ``sha256`` may give known hashes to skip hashing big files."""
        entries = self._entries(files, non_lfs, sha256)
        commit = hashlib.sha1("\0".join([repo] + [f"{n}:{f.sha256}" for n, f in sorted(entries.items())])
                              .encode()).hexdigest()
        names = {"main": commit, **{ref: commit for ref in refs}}
        self.repos[repo] = FakeRepo(repo, commit, entries, names, gated, private, token)
        return commit

    def new_commit(self, repo: str, files: dict[str, Path | bytes] | None = None,
                   sha256: dict[str, str] | None = None) -> str:
        """A new commit of ``repo``, ``main`` moved to it (a model repo's monthly update): the
        same files, or with ``files`` replacing (or adding) some of them (a GGUF re-uploaded
        with a fix). The earlier commits stay resolvable by sha, each with its own files.
        Returns the new sha."""
        r = self.repos[repo]
        r.older.add(r.commit)
        r.older_files[r.commit] = dict(r.files)
        if files:
            r.files = {**r.files, **self._entries(files, (), sha256)}
        r.commit = hashlib.sha1(f"{r.commit}:next".encode()).hexdigest()
        r.refs = {name: r.commit for name in r.refs}
        return r.commit

    @staticmethod
    def _entries(files: dict[str, Path | bytes], non_lfs: tuple[str, ...],
                 sha256: dict[str, str] | None) -> dict[str, FakeFile]:
        entries = {}
        for name, source in files.items():
            if isinstance(source, bytes):
                digest = hashlib.sha256(source).hexdigest()
                entries[name] = FakeFile(name, len(source), digest, data=source, lfs=name not in non_lfs)
            else:
                path = Path(source)
                digest = (sha256 or {}).get(name) or sha256_path(path)
                entries[name] = FakeFile(name, path.stat().st_size, digest, path=path,
                                         lfs=name not in non_lfs)
        return entries

    def api_requests(self) -> list[str]:
        """Paths of the requests that asked the Hub's API (what resolution costs)."""
        return [e.path for e in self.log if e.path.startswith("/api/")]

    def reset_counters(self) -> None:
        with self.lock:
            self.served.clear()
            self.log.clear()

    # ------------------------------------------------------------------ life cycle
    def __enter__(self) -> FakeHF:
        for _ in range(2):  # origin and "CDN"
            server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
            server.daemon_threads = True
            server.block_on_close = False  # an idle keep-alive client must not hold up teardown
            threading.Thread(target=server.serve_forever, daemon=True).start()
            self._servers.append(server)
        return self

    def __exit__(self, *exc) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._servers[0].server_address[1]}"

    @property
    def cdn(self) -> str:
        return f"http://127.0.0.1:{self._servers[1].server_address[1]}"

    def resolve_url(self, repo: str, rev: str, name: str) -> str:
        return f"{self.endpoint}/{repo}/resolve/{rev}/{urllib.parse.quote(name)}"

    def cdn_authorization_seen(self) -> int:
        """Requests to the CDN that carried an Authorization header (must stay 0)."""
        return sum(1 for e in self.log if e.path.startswith("/cdn/") and e.authorization)

    # ------------------------------------------------------------------ fault bookkeeping
    def take_fail(self) -> int | None:
        with self.lock:
            if self.faults.fail_next > 0:
                self.faults.fail_next -= 1
                return self.faults.fail_status
        return None


def _handler_for(hub: FakeHF) -> type[BaseHTTPRequestHandler]:
    class Handler(_Handler):
        pass
    Handler.hub = hub
    return Handler


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: FakeHF

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def do_HEAD(self) -> None:
        self._dispatch(head=True)

    def do_GET(self) -> None:
        self._dispatch(head=False)

    # ------------------------------------------------------------------ routing
    def _dispatch(self, head: bool) -> None:
        entry = Log(self.command, self.path, self.headers.get("Range"),
                    "Authorization" in self.headers)
        with self.hub.lock:
            self.hub.log.append(entry)
        self.entry = entry
        status = self.hub.take_fail()
        if status:
            return self._error(status, "Injected", "injected failure")
        url = urllib.parse.urlsplit(self.path)
        parts = [urllib.parse.unquote(p) for p in url.path.split("/")[1:]]
        if parts[:2] == ["api", "models"] and len(parts) == 6 and parts[4] == "revision":
            return self._api(f"{parts[2]}/{parts[3]}", parts[5])
        if len(parts) >= 5 and parts[2] == "resolve":
            return self._resolve(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]), head)
        if parts[0] == "cdn" and len(parts) >= 5:
            return self._cdn(f"{parts[1]}/{parts[2]}", parts[3], "/".join(parts[4:]), head)
        self._error(404, None, "no such route")

    def _repo(self, name: str, needs_token: bool) -> FakeRepo | None:
        """The repo if this request may see it; otherwise answers as the Hub does."""
        repo = self.hub.repos.get(name)
        auth = self.headers.get("Authorization")
        if repo is None:
            # The Hub does not tell anonymous callers whether a repo exists (it may be private).
            self._error(404 if auth else 401, "RepoNotFound", f"Repository Not Found for {name}")
            return None
        if needs_token or repo.private:
            code = "RepoNotFound" if repo.private else "GatedRepo"
            if not auth:
                self._error(401, code, f"Access to model {name} is restricted. You must be "
                                       f"authenticated to access it.")
                return None
            if auth != f"Bearer {repo.token}":
                self._error(403, code, f"Access to model {name} is restricted and you are not in "
                                       f"the authorized list.")
                return None
        return repo

    def _commit(self, repo: FakeRepo, rev: str) -> str | None:
        commit = repo.refs.get(rev) or (rev if repo.knows(rev) else None)
        if commit is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return commit

    # ------------------------------------------------------------------ endpoints
    def _api(self, name: str, rev: str) -> None:
        repo = self._repo(name, needs_token=False)
        if not repo or not (commit := self._commit(repo, rev)):
            return
        siblings = []
        for f in repo.files_at(commit).values():
            sibling = {"rfilename": f.name, "size": f.size,
                       "blobId": hashlib.sha1(f.sha256.encode()).hexdigest()}
            if f.lfs:
                sibling["lfs"] = {"sha256": f.sha256, "size": f.size, "pointerSize": 134}
            siblings.append(sibling)
        body = {"_id": "x", "id": name, "modelId": name, "sha": commit, "private": repo.private,
                "gated": "manual" if repo.gated else False, "siblings": siblings}
        self._send_json(200, body)

    def _resolve(self, name: str, rev: str, filename: str, head: bool) -> None:
        repo = self._repo(name, needs_token=True) if self._is_gated(name) else self._repo(name, False)
        if not repo or not (commit := self._commit(repo, rev)):
            return
        f = repo.files_at(commit).get(filename)
        if f is None:
            return self._error(404, "EntryNotFound", f"{filename} does not exist on {rev}")
        headers = {"X-Repo-Commit": commit, "ETag": f'"{f.sha256}"'}
        if not f.lfs:  # small git files are served directly, like the Hub does
            return self._send_file(f, head, headers)
        location = f"{self.hub.cdn}/cdn/{name}/{commit}/{urllib.parse.quote(filename)}?sig=s3cr3t-sig"
        headers.update({"X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": str(f.size),
                        "Location": location})
        self._send_empty(302, headers)

    def _is_gated(self, name: str) -> bool:
        repo = self.hub.repos.get(name)
        return bool(repo and repo.gated)

    def _cdn(self, name: str, commit: str, filename: str, head: bool) -> None:
        repo = self.hub.repos.get(name)
        f = repo.files_at(commit).get(filename) if repo and repo.knows(commit) else None
        if f is None:
            return self._error(404, None, "NoSuchKey")
        self._send_file(f, head, {"ETag": f'"{f.sha256}"'})

    # ------------------------------------------------------------------ responses
    def _send_file(self, f: FakeFile, head: bool, headers: dict[str, str]) -> None:
        start, end = 0, f.size  # end exclusive
        ranged = self._parse_range(f.size)
        if ranged == "invalid":
            return self._send_empty(416, {"Content-Range": f"bytes */{f.size}"})
        if ranged and not self.hub.faults.ignore_range:
            start, end = ranged
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{f.size}"
        status = 206 if "Content-Range" in headers else 200
        self.entry.status = status
        self.send_response(status)
        for key, value in {**headers, "Accept-Ranges": "bytes", "Content-Length": str(end - start),
                           "Content-Type": "application/octet-stream"}.items():
            self.send_header(key, value)
        self.end_headers()
        if not head:
            self._stream(f, start, end)

    def _parse_range(self, size: int):
        value = self.headers.get("Range")
        if not value or not value.startswith("bytes=") or "," in value:
            return None
        first, _, last = value[6:].partition("-")
        try:
            if first == "":
                start, end = max(0, size - int(last)), size
            else:
                start, end = int(first), (int(last) + 1 if last else size)
        except ValueError:
            return None
        end = min(end, size)
        return (start, end) if start < end else "invalid"

    def _stream(self, f: FakeFile, start: int, end: int) -> None:
        rate = self.hub.faults.rate_limit
        block = min(BLOCK, 64 * 1024) if rate else BLOCK
        began, sent, pos = time.monotonic(), 0, start
        while pos < end:
            chunk = f.read(pos, min(block, end - pos))
            chunk, cut = self._apply_faults(f, pos, chunk)
            if chunk:
                try:
                    self.wfile.write(chunk)
                except OSError:
                    return
                pos += len(chunk)
                sent += len(chunk)
            if cut:
                return self._drop()
            if rate:
                ahead = sent / rate - (time.monotonic() - began)
                if ahead > 0:
                    time.sleep(ahead)

    def _apply_faults(self, f: FakeFile, pos: int, chunk: bytes) -> tuple[bytes, bool]:
        """The bytes to send for this block, and whether to cut the connection after them."""
        hub, faults = self.hub, self.hub.faults
        with hub.lock:
            cut = False
            if faults.drop_after is not None:
                room = faults.drop_after - hub.served.get(f.name, 0)
                if room < len(chunk):
                    chunk, cut = chunk[:max(0, room)], True
                    if not faults.drop_always:
                        faults.drop_after = None
            k = faults.corrupt_offset
            if k is not None and pos <= k < pos + len(chunk):
                data = bytearray(chunk)
                data[k - pos] ^= 0xFF
                chunk = bytes(data)
                if not faults.corrupt_always:
                    faults.corrupt_offset = None
            # Counted here, under the lock, so parallel connections cannot overshoot drop_after.
            hub.served[f.name] = hub.served.get(f.name, 0) + len(chunk)
        return chunk, cut

    def _drop(self) -> None:
        self.close_connection = True
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _send_json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.entry.status = status
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _send_empty(self, status: int, headers: dict[str, str]) -> None:
        self.entry.status = status
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _error(self, status: int, code: str | None, message: str) -> None:
        data = json.dumps({"error": message}).encode()
        self.entry.status = status
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", message)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)


def free_port() -> int:
    """A port nothing listens on (for the 'endpoint unreachable' tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


__all__ = ["FakeHF", "Faults", "FakeFile", "make_split_gguf", "sha256_path", "free_port"]
os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")  # a proxy must never see test traffic

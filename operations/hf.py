"""The Hugging Face manifest, resolved on the controller before any host is touched.

A model setting (repo, revision, file, mmproj) becomes a ``ModelManifest``: the revision pinned to
its commit sha, and every file (all shards of a split GGUF, the mmproj) with its size, LFS sha256
and a download URL pinned to that commit. Hosts then download exactly those bytes and verify them
(files/fetch_model.py). The token is sent to the API only, and never appears in an error, a repr
or a log line.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import re
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import TYPE_CHECKING

from llmhost.settings import ModelSpec

if TYPE_CHECKING:  # imported where a request is made: a run with no Hub model skips its ~50 ms
    import requests

DEFAULT_ENDPOINT = "https://huggingface.co"
SPLIT_RE = re.compile(r"^(?P<prefix>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
ATTEMPTS = 3          # API calls per request, for 5xx and connection errors
BACKOFF = 1.0         # seconds before the second attempt, doubling
TIMEOUT = (10, 60)    # connect, read
USER_AGENT = "llmhost"


class ManifestError(Exception):
    """One line naming the repo (and file or revision), what went wrong and how to fix it."""


@dataclass(frozen=True)
class ManifestFile:
    name: str        # path inside the repo (may contain folders)
    size: int
    sha256: str
    url: str         # {endpoint}/{repo}/resolve/{commit}/{name}

    @property
    def basename(self) -> str:
        return self.name.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class ModelManifest:
    repo: str
    revision: str
    commit: str
    files: tuple[ManifestFile, ...]
    model: str = ""              # name of the file llama-server is given (first shard)
    mmproj: str | None = None    # name of the vision projector, if any

    @property
    def model_file(self) -> ManifestFile:
        return next(f for f in self.files if f.name == self.model)

    @property
    def mmproj_file(self) -> ManifestFile | None:
        return next((f for f in self.files if f.name == self.mmproj), None)

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)


# --------------------------------------------------------------------------- inputs

def endpoint_for(model: ModelSpec) -> str:
    """The Hub (or mirror) base URL: the model's endpoint, else HF_ENDPOINT, else huggingface.co."""
    endpoint = model.endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT
    return endpoint.rstrip("/")


def token_for(model: ModelSpec) -> str | None:
    """The model's token_file when set (it is the more specific setting), else HF_TOKEN."""
    return token_from(model.token_file, model.repo)


def token_from(token_file: str | None, repo: str | None = None) -> str | None:
    """The token in ``token_file`` when given, else HF_TOKEN from the environment, else None."""
    if token_file:
        try:
            with open(token_file) as f:
                token = f.read().strip()
        except OSError as error:
            raise ManifestError(f"model {repo}: cannot read token_file {token_file}: "
                                f"{error.strerror}") from None
        if not token:
            raise ManifestError(f"model {repo}: token_file {token_file} is empty")
        return token
    return os.environ.get("HF_TOKEN", "").strip() or None


# --------------------------------------------------------------------------- the manifest

_cache: dict[tuple, ModelManifest] = {}
_cache_lock = threading.Lock()


def clear_cache() -> None:
    with _cache_lock:
        _cache.clear()


def resolve_manifest(model: ModelSpec, token: str | None, endpoint: str) -> ModelManifest:
    """Resolve once per run (per repo, revision, files, endpoint and token)."""
    endpoint = endpoint.rstrip("/")
    # The token is part of the key only as a hash: the cache must not hold it in clear.
    token_key = hashlib.sha256(token.encode()).hexdigest() if token else None
    key = (endpoint, model.repo, model.revision, model.file, model.mmproj, token_key)
    with _cache_lock:
        if key in _cache:
            return _cache[key]
    manifest = _resolve(model, token, endpoint)
    with _cache_lock:
        _cache[key] = manifest
    return manifest


def _resolve(model: ModelSpec, token: str | None, endpoint: str) -> ModelManifest:
    if not model.repo or not model.file:
        raise ManifestError(f"model {model.repo or '?'}: repo and file are required to resolve "
                            f"a Hugging Face model")
    info = _revision_info(model, token, endpoint)
    commit = info.get("sha")
    if not isinstance(commit, str) or not re.match(r"^[0-9a-f]{40}$", commit):
        raise ManifestError(f"repo {model.repo} revision {model.revision!r}: {_safe(endpoint)} "
                            f"returned no commit sha (is it a Hugging Face compatible endpoint?)")
    siblings = {s.get("rfilename"): s for s in info.get("siblings") or [] if isinstance(s, dict)}
    names = _wanted_files(model, siblings, commit)
    files = tuple(_manifest_file(model, siblings[n], endpoint, commit) for n in names)
    if info.get("gated") not in (None, False):
        _check_access(model, token, files[0], info.get("gated"))
    return ModelManifest(repo=model.repo, revision=model.revision, commit=commit, files=files,
                         model=names[0], mmproj=model.mmproj)


def wanted_names(model: ModelSpec, where: str = "") -> list[str]:
    """The model file (all its shards when split) then the mmproj: what a host needs."""
    where = where or f"repo {model.repo} at revision {model.revision!r}"
    names = [model.file]
    split = SPLIT_RE.match(model.file)
    if split:
        if int(split["index"]) != 1:
            first = f"{split['prefix']}-00001-of-{split['count']}.gguf"
            raise ManifestError(f"{where}: file {model.file} is not the first shard of its split "
                                f"GGUF; set file to {first} (llama-server loads the rest beside it)")
        count = int(split["count"])
        names = [f"{split['prefix']}-{i:05d}-of-{split['count']}.gguf" for i in range(1, count + 1)]
    if model.mmproj:
        names.append(model.mmproj)
    return names


def _wanted_files(model: ModelSpec, siblings: dict, commit: str) -> list[str]:
    """wanted_names, each checked to exist."""
    where = f"repo {model.repo} at revision {model.revision!r} (commit {commit[:12]})"
    names = wanted_names(model, where)
    for name in names:
        if name not in siblings:
            raise ManifestError(f"{where}: file {name} not found{_did_you_mean(name, siblings)}")
    return names


def _did_you_mean(name: str, siblings: dict) -> str:
    close = difflib.get_close_matches(name, [n for n in siblings if n], n=3, cutoff=0.6)
    return f"; did you mean {', '.join(close)}?" if close else ""


def _manifest_file(model: ModelSpec, sibling: dict, endpoint: str, commit: str) -> ManifestFile:
    name = sibling["rfilename"]
    lfs = sibling.get("lfs") or {}
    sha256 = str(lfs.get("sha256", "")).lower()
    size = lfs.get("size", sibling.get("size"))
    if not SHA256_RE.match(sha256) or not isinstance(size, int) or size < 0:
        raise ManifestError(f"repo {model.repo} file {name}: the API lists no LFS sha256 and size "
                            f"for it, so a download could not be verified (is it an LFS file?)")
    return ManifestFile(name=name, size=size, sha256=sha256, url=file_url(endpoint, model.repo,
                                                                          commit, name))


def file_url(endpoint: str, repo: str, commit: str, name: str) -> str:
    """A file's download URL, pinned to a commit."""
    return f"{endpoint.rstrip('/')}/{repo}/resolve/{commit}/{urllib.parse.quote(name, safe='/')}"


# --------------------------------------------------------------------------- HTTP

def _revision_info(model: ModelSpec, token: str | None, endpoint: str) -> dict:
    rev = urllib.parse.quote(model.revision, safe="")
    url = f"{endpoint}/api/models/{model.repo}/revision/{rev}?blobs=true"
    response = _request("GET", url, token, model)
    if response.status_code != 200:
        raise _api_error(response, model, token, endpoint)
    try:
        info = response.json()
    except ValueError:
        info = None
    if not isinstance(info, dict):
        raise ManifestError(f"repo {model.repo} revision {model.revision!r}: {_safe(url)} did not "
                            f"answer JSON (is {_safe(endpoint)} a Hugging Face compatible endpoint?)")
    return info


def _check_access(model: ModelSpec, token: str | None, first: ManifestFile, gated) -> None:
    """Gated repos list their files to anyone but refuse downloads: ask now, not on the host."""
    response = _request("HEAD", first.url, token, model, allow_redirects=False)
    if response.status_code < 400:
        return
    if response.status_code in (401, 403):
        raise ManifestError(_token_problem(model, token, response.status_code, gated=True))
    raise ManifestError(f"repo {model.repo} file {first.name}: download check answered HTTP "
                        f"{response.status_code}")


def _request(method: str, url: str, token: str | None, model: ModelSpec,
             **kwargs) -> requests.Response:
    import requests

    headers = {"User-Agent": USER_AGENT}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    last = ""
    for attempt in range(ATTEMPTS):
        if attempt:
            time.sleep(BACKOFF * 2 ** (attempt - 1))
        try:
            response = requests.request(method, url, headers=headers, timeout=TIMEOUT, **kwargs)
        except requests.RequestException as error:
            last = f"cannot reach {_safe(url)}: {_short_reason(error)}"
            continue
        if response.status_code < 500 and response.status_code != 429:
            return response
        last = f"{_safe(url)} answered HTTP {response.status_code}"
    raise ManifestError(f"repo {model.repo} revision {model.revision!r}: {last} "
                        f"(after {ATTEMPTS} attempts)")


def _api_error(response: requests.Response, model: ModelSpec, token: str | None,
               endpoint: str) -> ManifestError:
    status = response.status_code
    code = response.headers.get("X-Error-Code", "")
    if code == "RevisionNotFound":
        return ManifestError(f"repo {model.repo}: revision {model.revision!r} not found (expected "
                             f"a branch, tag or commit of the repo)")
    if status in (401, 403) or code == "GatedRepo":
        return ManifestError(_token_problem(model, token, status, gated=code == "GatedRepo"))
    if status == 404:
        return ManifestError(f"repo {model.repo} not found on {_safe(endpoint)} (HTTP 404"
                             f"{', ' + code if code else ''}); check the repo name")
    return ManifestError(f"repo {model.repo} revision {model.revision!r}: {_safe(endpoint)} "
                         f"answered HTTP {status}")


def _token_problem(model: ModelSpec, token: str | None, status: int, gated: bool) -> str:
    kind = "gated repo" if gated else "repo"
    source = f"the token in {model.token_file}" if model.token_file else "HF_TOKEN"
    if not token:
        reason = ("needs a token: set HF_TOKEN in the controller's environment (or the model's "
                  "token_file)") if gated else (
                  "was not found, or is private and needs HF_TOKEN in the controller's environment "
                  "(or the model's token_file)")
        return f"{kind} {model.repo} {reason} (HTTP {status})"
    if status == 403:
        return (f"{kind} {model.repo}: {source} has no access (HTTP 403); request access on the "
                f"repo's page or use a token with read access (HF_TOKEN)")
    return (f"{kind} {model.repo}: {source} was rejected (HTTP {status}); set HF_TOKEN to a "
            f"valid token, or check the repo name")


def _safe(url: str) -> str:
    """The URL without credentials, query or fragment."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))


def _short_reason(error: requests.RequestException) -> str:
    """'connection refused', 'timed out', ... rather than urllib3's nested repr."""
    import requests

    text = str(error)
    match = re.search(r"\[Errno -?\d+\] ([^'\")]+)", text)
    if match:
        return match.group(1).strip().lower()
    if isinstance(error, requests.Timeout):
        return "timed out"
    if isinstance(error, requests.exceptions.SSLError):
        return "TLS error"
    return type(error).__name__

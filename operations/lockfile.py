"""The lock file: what the inventory's models and llama.cpp resolved to, kept beside the
inventory and committed with it, so that a later run and a new host get the same bytes.

JSON, written with sorted keys and two-space indents, so the same content is always the same
text and a change is a small diff (the way flake.lock and package-lock.json are JSON). Python
reads and writes it with the standard library alone (tomllib would read TOML, not write it)::

    {
      "llamacpp": {"build_number": 11312, "commit": "0c1e57098bba43ac29e6e3b677cdceebdd22334f"},
      "models": {
        "unsloth/Qwen3.5-35B-A3B-GGUF": {
          "commit": "<40 hex>",
          "files": {"Qwen3.5-35B-A3B-UD-Q4_K_XL.gguf": {"sha256": "<64 hex>", "size": 22016000000}},
          "revision": "main"
        }
      },
      "version": 1
    }

It holds content identities only: no endpoint, no URL, no token (where the bytes come from
stays a setting; what they are is locked).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

VERSION = 1
COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
REPO_RE = re.compile(r"^[\w.-]+/[\w.-]+$")


class LockError(Exception):
    """The lock file cannot be read or written; one line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass(frozen=True)
class LockedFile:
    sha256: str
    size: int


@dataclass(frozen=True)
class LockedModel:
    """One repo: the revision it was resolved from, the commit, and each file a host needs."""

    revision: str
    commit: str
    files: dict[str, LockedFile] = field(default_factory=dict)


@dataclass(frozen=True)
class LockedBuild:
    """The llama.cpp hosts build when their settings leave llm_llamacpp_commit unset."""

    commit: str
    build_number: int


@dataclass(frozen=True)
class Lock:
    models: dict[str, LockedModel] = field(default_factory=dict)
    llamacpp: LockedBuild | None = None

    def to_text(self) -> str:
        data: dict = {"version": VERSION, "models": {
            repo: {"revision": m.revision, "commit": m.commit,
                   "files": {name: {"sha256": f.sha256, "size": f.size}
                             for name, f in m.files.items()}}
            for repo, m in self.models.items()}}
        if self.llamacpp:
            data["llamacpp"] = {"commit": self.llamacpp.commit,
                                "build_number": self.llamacpp.build_number}
        return json.dumps(data, indent=2, sort_keys=True) + "\n"


def parse(text: str, where: str) -> Lock:
    """The lock in ``text``; every problem named with its place in the file."""
    try:
        data = json.loads(text)
    except ValueError as error:
        raise LockError([f"lock {where}: found text that is not JSON ({error}), expected the "
                         f"file llmhost wrote; fix: restore it from version control, or delete "
                         f"it to resolve everything again"]) from None
    if not isinstance(data, dict) or data.get("version") != VERSION:
        found = data.get("version") if isinstance(data, dict) else data
        raise LockError([f"lock {where}: version: found {found!r}, expected {VERSION}"])
    problems: list[str] = []
    models = {}
    raw_models = data.get("models", {})
    if not isinstance(raw_models, dict):
        raise LockError([f"lock {where}: models: found {raw_models!r}, expected a mapping"])
    for repo, raw in sorted(raw_models.items()):
        model = _model(f"lock {where}: models.{repo}", repo, raw, problems)
        if model:
            models[repo] = model
    llamacpp = None
    raw_build = data.get("llamacpp")
    if raw_build is not None:
        commit = raw_build.get("commit") if isinstance(raw_build, dict) else None
        number = raw_build.get("build_number") if isinstance(raw_build, dict) else None
        if not (isinstance(commit, str) and COMMIT_RE.match(commit)) or \
                not (isinstance(number, int) and not isinstance(number, bool) and number >= 0):
            problems.append(f"lock {where}: llamacpp: found {raw_build!r}, expected a commit (40 "
                            f"lowercase hex digits) and a build_number (a non-negative integer)")
        else:
            llamacpp = LockedBuild(commit, number)
    if problems:
        raise LockError(problems)
    return Lock(models, llamacpp)


def _model(where: str, repo: str, raw, problems: list[str]) -> LockedModel | None:
    before = len(problems)
    if not REPO_RE.match(repo) or not isinstance(raw, dict):
        problems.append(f"{where}: found {raw!r}, expected a repo owner/name with revision, "
                        f"commit and files")
        return None
    revision, commit, files = raw.get("revision"), raw.get("commit"), raw.get("files")
    if not isinstance(revision, str) or not revision:
        problems.append(f"{where}.revision: found {revision!r}, expected a branch, tag or commit")
    if not isinstance(commit, str) or not COMMIT_RE.match(commit):
        problems.append(f"{where}.commit: found {commit!r}, expected 40 lowercase hex digits")
    elif isinstance(revision, str) and COMMIT_RE.match(revision) and revision != commit:
        problems.append(f"{where}.commit: found {commit}, expected {revision}, the commit its "
                        f"revision names")
    if not isinstance(files, dict):
        problems.append(f"{where}.files: found {files!r}, expected a mapping of file name to "
                        f"sha256 and size")
        return None
    locked = {}
    for name, entry in sorted(files.items()):
        sha256 = entry.get("sha256") if isinstance(entry, dict) else None
        size = entry.get("size") if isinstance(entry, dict) else None
        # Names become paths on the host: inside the repo, never above it.
        if name.startswith("/") or ".." in name.split("/") or not name.strip():
            problems.append(f"{where}.files: found file name {name!r}, expected a path inside "
                            f"the repo")
        elif not (isinstance(sha256, str) and SHA256_RE.match(sha256)) or \
                not (isinstance(size, int) and not isinstance(size, bool) and size >= 0):
            problems.append(f"{where}.files.{name}: found {entry!r}, expected a sha256 (64 "
                            f"lowercase hex digits) and a size in bytes")
        else:
            locked[name] = LockedFile(sha256, size)
    if len(problems) > before:
        return None
    return LockedModel(revision, commit, locked)


def read(path: Path) -> Lock:
    """The lock at ``path``; an empty lock when there is none yet."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return Lock()
    except OSError as error:
        raise LockError([f"lock {path}: cannot read it: {error.strerror}"]) from None
    return parse(text, str(path))


def write(path: Path, lock: Lock) -> None:
    """Atomically: a temporary file in the same folder, flushed, then renamed over the lock."""
    text = lock.to_text()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)  # mkstemp makes it 0600; a lock is as readable as the inventory
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    except OSError as error:
        raise LockError([f"lock {path}: cannot write it: {error.strerror}"]) from None


def changes(old: Lock, new: Lock) -> list[str]:
    """What moves from ``old`` to ``new``, one line each: every repo whose commit changes (old ->
    new) and under it every file whose sha256 changes; repos and files added or dropped."""
    lines: list[str] = []
    for repo in sorted(set(old.models) | set(new.models)):
        a, b = old.models.get(repo), new.models.get(repo)
        if a == b:
            continue
        if a is None:
            lines.append(f"{repo}: added at {b.commit[:12]} (revision {b.revision!r})")
        elif b is None:
            lines.append(f"{repo}: dropped (was {a.commit[:12]}; no host uses it)")
        else:
            moved = f"{a.commit[:12]} -> {b.commit[:12]}" if a.commit != b.commit else \
                f"stays at {a.commit[:12]}"
            revision = repr(b.revision) if a.revision == b.revision else \
                f"{a.revision!r} -> {b.revision!r}"
            lines.append(f"{repo} (revision {revision}): {moved}")
        for name in sorted(set(a.files if a else {}) | set(b.files if b else {})):
            fa, fb = (a.files.get(name) if a else None), (b.files.get(name) if b else None)
            if fa == fb or (a is None and fb) or (b is None and fa):
                continue
            if fa is None:
                lines.append(f"  {name}: added, sha256 {fb.sha256[:12]}, {fb.size} bytes")
            elif fb is None:
                lines.append(f"  {name}: dropped")
            else:
                lines.append(f"  {name}: sha256 {fa.sha256[:12]} -> {fb.sha256[:12]}, "
                             f"{fa.size} -> {fb.size} bytes")
    if old.llamacpp != new.llamacpp and new.llamacpp:
        was = f"{old.llamacpp.commit[:12]} (build {old.llamacpp.build_number})" \
            if old.llamacpp else "none"
        lines.append(f"llama.cpp: {was} -> {new.llamacpp.commit[:12]} "
                     f"(build {new.llamacpp.build_number})")
    return lines

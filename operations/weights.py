"""Model files on the host: one folder per model version, every file sha256-verified before a
service may point at it, and a record beside each file so a rerun trusts size + record instead
of hashing gigabytes again.

    <llm_model_dir>/local-<sha12>/<file>                 pushed from the controller (source local)
    <llm_model_dir>/<owner>--<repo>/<commit12>/<file>    from Hugging Face or a mirror
Old versions stay on disk: a rollback points the unit back at them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
from dataclasses import dataclass
from pathlib import Path

from pyinfra import host
from pyinfra.api import FileUploadCommand, operation

from operations import remote
from operations.facts import ModelFile
from operations.settings import HostSettings, ModelSpec


@dataclass(frozen=True)
class ModelFileSpec:
    """One file to have on the host: where it comes from and what it must hash to."""

    dest: str
    sha256: str
    size: int
    local_path: str | None = None  # source local
    url: str | None = None  # source hf / mirror
    commit: str | None = None


@dataclass(frozen=True)
class PlacedModel:
    """What a service's unit points at."""

    model_path: str
    mmproj_path: str | None
    files: tuple[ModelFileSpec, ...]

    @property
    def fingerprint(self) -> str:
        """Changes whenever any file's content changes: written into the unit, so the service
        restarts on a new model even when the path stays the same."""
        return hashlib.sha256("".join(f.sha256 for f in self.files).encode()).hexdigest()[:16]


def _cache_file() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llmhost"
    base.mkdir(parents=True, exist_ok=True)
    return base / "sha256.json"


def controller_sha256(path: str) -> str:
    """sha256 of a controller file, remembered by path, size and mtime (a 20 GB file is hashed
    once, not on every run)."""
    stat = os.stat(path)
    key = f"{os.path.realpath(path)}:{stat.st_size}:{stat.st_mtime_ns}"
    cache_path = _cache_file()
    try:
        known = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known:
        return known[key]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            digest.update(block)
    known[key] = digest.hexdigest()
    tmp = cache_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(known))
    tmp.replace(cache_path)
    return known[key]


def plan_local(settings: HostSettings, model: ModelSpec) -> PlacedModel:
    sha256 = model.sha256 or controller_sha256(model.path)
    folder = f"{settings.model_dir}/local-{sha256[:12]}"
    files = [ModelFileSpec(dest=f"{folder}/{model.filename}", sha256=sha256,
                           size=os.path.getsize(model.path), local_path=model.path)]
    mmproj_path = None
    if model.mmproj:
        mmproj_path = f"{folder}/{os.path.basename(model.mmproj)}"
        files.append(ModelFileSpec(dest=mmproj_path, sha256=controller_sha256(model.mmproj),
                                   size=os.path.getsize(model.mmproj), local_path=model.mmproj))
    return PlacedModel(model_path=files[0].dest, mmproj_path=mmproj_path, files=tuple(files))


def is_in_place(spec: ModelFileSpec) -> bool:
    state = host.get_fact(ModelFile, path=spec.dest)
    record = state["record"] or {}
    return state["size"] == spec.size and record.get("sha256") == spec.sha256


@operation()
def pushed_file(spec: ModelFileSpec):
    """Upload a controller file next to its destination, verify it there, then move it in."""
    if is_in_place(spec):
        host.noop(f"{spec.dest} is in place and verified")
        return
    staged = spec.dest + ".partial"
    yield f"mkdir -p {shlex.quote(os.path.dirname(spec.dest))}"
    yield FileUploadCommand(spec.local_path, staged)
    yield remote.helper_command(
        "place_model.py", "--staged", staged, "--dest", spec.dest, "--sha256", spec.sha256,
        "--size", str(spec.size), "--record-json", json.dumps({"source": "local"}))

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

from llmhost import hf, lock, remote
from llmhost.facts import ModelFile
from llmhost.settings import HostSettings, ModelSpec


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


def plan_hf(settings: HostSettings, model: ModelSpec) -> PlacedModel:
    """Files pinned by the lock (the preflight resolved what it lacked, before any host was
    touched); a model not through the preflight (pyinfra's API) is resolved here."""
    manifest = lock.manifest(model) if model.locked_commit else \
        hf.resolve_manifest(model, hf.token_for(model), hf.endpoint_for(model))
    folder = f"{settings.model_dir}/{manifest.repo.replace('/', '--')}/{manifest.commit[:12]}"
    # All shards in one folder: llama-server finds the others beside the first.
    files = tuple(ModelFileSpec(dest=f"{folder}/{f.basename}", sha256=f.sha256, size=f.size,
                                url=f.url, commit=manifest.commit) for f in manifest.files)
    by_name = {f.name: spec for f, spec in zip(manifest.files, files)}
    mmproj = manifest.mmproj_file
    return PlacedModel(model_path=by_name[manifest.model_file.name].dest,
                       mmproj_path=by_name[mmproj.name].dest if mmproj else None, files=files)


def plan(settings: HostSettings, model: ModelSpec) -> PlacedModel:
    return plan_local(settings, model) if model.source == "local" else plan_hf(settings, model)


def in_place(dest: str, sha256: str, size: int) -> bool:
    """The file is there, of its size, and its record says it was verified as ``sha256`` and
    has not been written since (its mtime)."""
    state = host.get_fact(ModelFile, path=dest)
    record = state["record"] or {}
    return (state["size"] == size and record.get("sha256") == sha256
            and record.get("mtime_ns") == state["mtime_ns"])


def is_in_place(spec: ModelFileSpec) -> bool:
    return in_place(spec.dest, spec.sha256, spec.size)


def access_repair(dest: str) -> str | None:
    """The command that gives a verified file and its two folders back root:root 0644 / 0755
    when they drifted (a chmod by hand): the services' user must open it at its next start,
    though the running server, which has it mapped, keeps answering. None when in order."""
    if host.get_fact(ModelFile, path=dest)["access_ok"]:
        return None
    return f"{model_folder_command(dest)} && chown root:root {shlex.quote(dest)} && " \
           f"chmod 644 {shlex.quote(dest)}"


def model_folder_command(dest: str) -> str:
    """The file's folder, and the one above it, root:root 0755 whatever the login's umask."""
    folder = os.path.dirname(dest)
    dirs = " ".join(shlex.quote(d) for d in (folder, os.path.dirname(folder)))
    return f"mkdir -p {shlex.quote(folder)} && chown root:root {dirs} && chmod 755 {dirs}"


def _placed(dest: str):
    """Commands for a file already in place: nothing, or its access repaired."""
    repair = access_repair(dest)
    if repair:
        yield repair
    else:
        host.noop(f"{dest} is in place and verified")


@operation()
def pushed_file(src: str, dest: str, sha256: str, size: int):
    """A controller file on the host: uploaded beside ``dest``, its sha256 checked there, then
    moved into place with a record, so a rerun trusts it without hashing it again.

    + src: the file on the controller
    + dest: where it goes on the host
    + sha256: what it must hash to
    + size: its size in bytes

    **Example:**

    .. code:: python

        pushed_file(name="Model file", src="/models/m.gguf",
                    dest="/var/lib/llama-models/local-a5fd3b62230a/m.gguf",
                    sha256="a5fd3b...", size=253113024)
    """
    if in_place(dest, sha256, size):
        yield from _placed(dest)
        return
    staged = dest + ".partial"
    yield model_folder_command(dest)
    yield FileUploadCommand(src, staged)
    yield remote.helper_command(
        "place_model.py", "--staged", staged, "--dest", dest, "--sha256", sha256,
        "--size", str(size), "--record-json", json.dumps({"source": "local"}))


@operation()
def downloaded_file(url: str, dest: str, sha256: str, size: int, record: dict, connections: int,
                    token_file: str | None = None):
    """A file downloaded on the host from Hugging Face or a mirror: resumable, in parallel
    ranges, sha256 checked before the rename, its progress printed as it comes. The token
    (``token_file``, else HF_TOKEN on the controller) reaches the host on stdin only.

    + url: the file's URL, pinned to a commit
    + dest: where it goes on the host
    + sha256: what it must hash to (the Hub's LFS sha256)
    + size: its size in bytes
    + record: what to note beside it (commit, repo, revision)
    + connections: parallel ranged connections
    + token_file: a controller file holding the token (else HF_TOKEN, or none)

    **Example:**

    .. code:: python

        downloaded_file(name="Model file", url="https://huggingface.co/o/r/resolve/<sha>/m.gguf",
                        dest="/var/lib/llama-models/o--r/<sha12>/m.gguf", sha256="...",
                        size=1894532128, record={"commit": "<sha>"}, connections=8)
    """
    if in_place(dest, sha256, size):
        yield from _placed(dest)
        return
    token = hf.token_from(token_file)
    args = ["--url", url, "--dest", dest, "--sha256", sha256, "--size", str(size),
            "--record-json", json.dumps(record), "--connections", str(connections)]
    if token:
        args.append("--token-stdin")
    yield model_folder_command(dest)
    yield remote.streamed(remote.helper_command("fetch_model.py", *args),
                          f"download of {os.path.basename(dest)}",
                          stdin=token + "\n" if token else None)


def model_file(spec: ModelFileSpec, model: ModelSpec, connections: int) -> None:
    """Define the operation that puts one model file in place."""
    if spec.local_path:
        pushed_file(name=f"Model file {spec.dest}", src=spec.local_path, dest=spec.dest,
                    sha256=spec.sha256, size=spec.size)
    else:
        downloaded_file(name=f"Model file {spec.dest}", url=spec.url, dest=spec.dest,
                        sha256=spec.sha256, size=spec.size, connections=connections,
                        record={"commit": spec.commit, "repo": model.repo,
                                "revision": model.revision},
                        token_file=model.token_file)

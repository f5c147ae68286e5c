"""Build once, ship everywhere: a llama.cpp build's artefact kept on the controller.

A build's artefact is what the services need of its folder (bin/: the binaries and the libraries
beside them) and its record, with the sha256 of every file (files/build_llamacpp.py --pack). It
is keyed by everything that makes two builds differ (``key``): the commit, every cmake flag (CUDA
archs and K/V pairs included), the targets, the CPU baselines tried, the CUDA toolkit, the build
folder (the binaries find their libraries by its absolute path), the distribution release, the C
library, the machine and, where native code is tried, the CPU. The cache is a folder on the
controller (llm_build_cache), one folder per key:

    <cache>/<key>/build.tar.gz      the artefact
    <cache>/<key>/artefact.json     its sha256 and size, what the key holds, the host that built it

The first host of a run that needs a key builds it and its artefact comes back here; every other
host of the run with that key waits for it (``wait_for_earlier``), gets it pushed, and verifies it
as its own builds are verified before any unit uses it; a host that refuses it (the reason
printed) builds instead, and its build replaces the entry. Copy a key's folder into another
controller's cache to pre-seed it (an air-gapped fleet).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import gevent
from pyinfra import state
from pyinfra.context import ctx_state

from llmhost.buildplan import TARGETS, Build, cpu_candidates
from llmhost.settings import HostSettings

logger = logging.getLogger("llmhost")

TARBALL = "build.tar.gz"
RECORD = "artefact.json"
KEY_VERSION = 1  # bumped when the artefact's layout changes: older entries then never match
POLL_SECONDS = 0.5
# A host that waits gives up on an earlier host that is inside no operation for this long (it
# failed outside an operation's own error handling, e.g. under --no-wait).
IDLE_SECONDS = 30.0


def cache_dir(settings: HostSettings) -> str:
    """The controller folder of llm_build_cache, "" when sharing is off."""
    if settings.build_cache is False:
        return ""
    return os.path.abspath(os.path.expanduser(settings.build_cache))


def key_inputs(settings: HostSettings, build: Build) -> dict:
    """What the key holds that the settings and the plan decide (``key`` adds the host's part)."""
    return {
        "v": KEY_VERSION,
        "commit": settings.llamacpp_commit,
        "cmake_flags": list(build.cmake_flags),
        "targets": list(TARGETS),
        "cpu_baselines": [name for name, _ in cpu_candidates(build.cpu_baseline)],
        "cuda_toolkit": build.toolkit_version,
        "build_dir": build.build_dir,
    }


def key(inputs: dict, build_host: dict) -> tuple[str, dict]:
    """(the key, everything it holds): ``inputs`` and the host's distribution, C library,
    machine and, when native code is among the baselines tried, its CPU."""
    native = "native" in inputs["cpu_baselines"]
    full = {**inputs, "os": build_host.get("os", "unknown"), "libc": build_host.get("libc", "unknown"),
            "machine": build_host.get("machine", "unknown"),
            "cpu": build_host.get("cpu", "unknown") if native else None}
    digest = hashlib.sha256(json.dumps(full, sort_keys=True).encode()).hexdigest()[:32]
    return digest, full


@dataclass(frozen=True)
class Entry:
    """An artefact in the cache."""

    key: str
    tarball: str
    sha256: str
    size: int
    built_on: str


def lookup(cache: str, digest: str) -> Entry | None:
    """The cache's entry for ``digest``, or None (no cache, no entry, or an unreadable record)."""
    if not cache:
        return None
    folder = Path(cache) / digest
    try:
        record = json.loads((folder / RECORD).read_text())
        tarball = folder / TARBALL
        if not tarball.is_file():
            return None
        return Entry(digest, str(tarball), record["sha256"], int(record["size"]),
                     record.get("built_on", "another host"))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def store(state, host, cache: str, digest: str, inputs: dict, fetched: str, fetched_record: str) -> bool:
    """FunctionCommand: put an artefact fetched from ``host`` into the cache, once its sha256 is
    the one the host computed; atomically, so a reader never sees half an entry. A cache that
    cannot be written is a warning, not a failed host: its build is in place and verified."""
    try:
        sent = json.loads(Path(fetched_record).read_text())
        found = sha256_file(fetched)
        if sent.get("key") != digest or found != sent.get("sha256"):
            host.log_styled(f"build artefact {digest[:12]}: the copy fetched has sha256 {found}, the "
                            f"host packed {sent.get('sha256')}: not kept in the cache", fg="yellow")
            return True
        folder = Path(cache) / digest
        staging = Path(cache) / f".{digest}.{host.name}.{os.getpid()}"
        staging.mkdir(parents=True, exist_ok=True)
        os.replace(fetched, staging / TARBALL)
        record = {"key": digest, "sha256": found, "size": sent.get("size"), "built_on": host.name,
                  "stored": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "inputs": inputs}
        (staging / RECORD).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        if folder.exists():  # a refused entry, or another host's copy of the same build
            retired = folder.with_name(f".{digest}.old.{os.getpid()}.{id(staging)}")
            os.replace(folder, retired)
            _remove(retired)
        os.replace(staging, folder)
        host.log_styled(f"build artefact {digest[:12]}: kept in the controller's cache {folder} "
                        f"({sent.get('size', 0) / 2**20:.1f} MiB) for the other hosts of this key",
                        fg="cyan")
    except OSError as error:
        host.log_styled(f"build artefact {digest[:12]}: not kept in the cache {cache}: {error}",
                        fg="yellow")
    finally:
        for path in (fetched, fetched_record):
            if os.path.exists(path):
                os.unlink(path)
    return True


def _remove(path: Path) -> None:
    for child in path.iterdir():
        child.unlink()
    path.rmdir()


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------- hosts of one run, one build
#
# pyinfra runs an operation for every host at once, each host in a greenlet of one process, and
# the build is one operation every host defines at the same line (the same op hash). A host
# whose key is not in the cache waits for the hosts before it in the inventory that run the same
# operation and have the same key (or have not said theirs yet), until the key is in the cache
# or they are done (built, failed, or gone); the first such host waits for nobody and builds.
# Waiting only on earlier hosts keeps it free of cycles; with --serial or _parallel batches the
# earlier hosts have finished before a later one starts, and under --no-wait they are waited for
# the same way.

_keys: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def announce(host, cache: str, digest: str) -> None:
    """This host's key (and cache) in this run, for the hosts after it."""
    _keys.setdefault(ctx_state.get(), {})[host.name] = (cache, digest)


def wait_for_earlier(host, cache: str, digest: str) -> str | None:
    """Block this host's greenlet until the cache has ``digest`` or no earlier host of the run
    may still put it there. Returns the name of the host it waited for, or None."""
    run_state = ctx_state.get()
    op_hash = host.current_op_hash
    hosts = list(run_state.inventory)
    earlier = hosts[:hosts.index(host)]
    waited = None
    idle_since: dict[str, float] = {}
    while lookup(cache, digest) is None:
        pending = [h for h in earlier if _may_build(run_state, h, op_hash, cache, digest, idle_since)]
        if not pending:
            break
        if waited is None:
            waited = pending[0].name
            host.log_styled(f"waits for {waited}'s build of {digest[:12]} (same key: commit, "
                            f"flags, toolkit, OS, C library, CPU), to receive it", fg="cyan")
        gevent.sleep(POLL_SECONDS)
    return waited


def _may_build(run_state, other, op_hash: str, cache: str, digest: str, idle_since: dict) -> bool:
    """Whether ``other`` may still put ``digest`` into ``cache`` in this run."""
    if other in run_state.failed_hosts or other not in run_state.active_hosts:
        return False
    op_data = run_state.ops.get(other, {}).get(op_hash)
    if op_data is None or op_data.operation_meta.is_complete():
        return False
    said = _keys.get(run_state, {}).get(other.name)
    if said is not None and said != (cache, digest):
        return False
    if other.executing_op_hash is None:
        since = idle_since.setdefault(other.name, time.monotonic())
        return time.monotonic() - since < IDLE_SECONDS
    idle_since.pop(other.name, None)
    return True


def executing() -> bool:
    return bool(state.is_executing)

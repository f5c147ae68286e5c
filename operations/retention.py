"""Retention: each deploy keeps the llama.cpp builds and model versions that a unit in use or its
rollback target needs, plus the newest ``llm_keep_previous`` others of each kind, and removes
the rest, saying what it freed. Only version folders under llm_install_dir and llm_model_dir are
ever removed, and never one a live or rollback unit names (checked again on the host when the
removal runs: files/retention.py).

What the units will name is known before anything runs: the units this deploy renders, and as
rollback targets the units they replace (or, for a unit that does not change, its saved one).
So a --dry run already lists what would go.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shlex
from dataclasses import dataclass
from typing import Iterable, Mapping

from pyinfra import host, state
from pyinfra.api import FactBase, operation

from llmhost import data_dir, remote

HELPER = "retention.py"
UNIT_DIR = "/etc/systemd/system"
STATE_DIR = "/var/lib/llmhost/units"


@dataclass(frozen=True)
class StoredVersion:
    kind: str  # build, source or model
    path: str
    mtime: float


class StoredVersions(FactBase):
    """Stored versions and the unit texts that name them (files/retention.py --list), run from
    the host's helper when it is this llmhost's (the deploy installs it before retention runs);
    None when it is not (a fresh host, another version): then read again ``from_source``, which
    sends the helper's source as the command."""

    def command(self, install_dir: str, model_dir: str, helper_sha256: str = "",
                from_source: bool = False) -> str:
        args = (f"--install-dir {shlex.quote(install_dir)} --model-dir {shlex.quote(model_dir)} "
                f"--list")
        if from_source:
            return f"python3 -c {shlex.quote(_helper_source())} {args}"
        helper = shlex.quote(f"{remote.HELPER_DIR}/{HELPER}")
        return (f"if [ \"$(sha256sum < {helper} 2>/dev/null)\" = {shlex.quote(helper_sha256 + '  -')} ]; "
                f"then python3 {helper} {args}; else echo stale; fi")

    def process(self, output):
        if [line.strip() for line in output] == ["stale"]:
            return None
        data = json.loads("\n".join(output))
        return {"versions": [StoredVersion(**v) for v in data["versions"]], "units": data["units"]}

    @staticmethod
    def default():
        return {"versions": [], "units": {}}


@functools.lru_cache(maxsize=None)
def _helper_source() -> str:
    return (data_dir("files") / HELPER).read_text()


def stored_versions_arguments(install_dir: str, model_dir: str) -> dict:
    """StoredVersions' arguments, the digest of this llmhost's helper included."""
    return {"install_dir": install_dir, "model_dir": model_dir,
            "helper_sha256": hashlib.sha256((data_dir("files") / HELPER).read_bytes()).hexdigest()}


def units_after(current: Mapping[str, str], rendered: Mapping[str, str]) -> list[str]:
    """Unit texts that will name builds and models once this deploy is done: each rendered unit,
    and its rollback target (the live unit it replaces, or the saved one when it does not
    change). ``current``: path -> text of live units and saved rollback units on the host;
    ``rendered``: unit name -> the text this deploy installs."""
    texts = list(rendered.values())
    for unit, text in rendered.items():
        live = current.get(f"{UNIT_DIR}/{unit}")
        saved = current.get(f"{STATE_DIR}/{unit}.previous")
        if live is not None and live != text:
            texts.append(live)
        elif saved is not None:
            texts.append(saved)
    return texts


def plan(versions: Iterable[StoredVersion], texts: Iterable[str], keep_previous: int) -> list[StoredVersion]:
    """What goes: per kind, versions no unit text names, beyond the newest ``keep_previous``.
    A source stays while a build of its commit stays."""
    texts = list(texts)
    versions = list(versions)

    def named(v: StoredVersion) -> bool:
        return any(v.path + "/" in text for text in texts)

    removed = []
    for kind in ("build", "model"):
        spare = sorted((v for v in versions if v.kind == kind and not named(v)),
                       key=lambda v: v.mtime, reverse=True)
        removed += spare[keep_previous:]
    kept_builds = [v for v in versions if v.kind == "build" and v not in removed]
    commits = {b.path.rsplit("/", 1)[1].split("-", 1)[0] for b in kept_builds}
    removed += [v for v in versions
                if v.kind == "source" and v.path.rsplit("/", 1)[1][:12] not in commits]
    return removed


@operation()
def old_versions(install_dir: str, model_dir: str, rendered: dict[str, str], keep_previous: int):
    """Remove the builds, sources and model versions no unit needs (see the module docstring).

    + install_dir: llm_install_dir of the host
    + model_dir: llm_model_dir of the host
    + rendered: unit name -> text of every unit this deploy installs
    + keep_previous: how many unneeded versions of each kind to keep, newest first

    **Example:**

    .. code:: python

        old_versions(name="Retention", install_dir="/opt/llama.cpp",
                     model_dir="/var/lib/llama-models",
                     rendered={"llama-main.service": unit_text}, keep_previous=1)
    """
    arguments = stored_versions_arguments(install_dir, model_dir)
    stored = host.get_fact(StoredVersions, **arguments)
    if stored is None:  # the host's helper is not this llmhost's yet (a --dry run, say)
        stored = host.get_fact(StoredVersions, **arguments, from_source=True)
    going = plan(stored["versions"], units_after(stored["units"], rendered), keep_previous)
    if not going:
        host.noop(f"retention: nothing to remove (each kind keeps its {keep_previous} newest spare)")
        return
    if not state.is_executing:  # the plan, also under --dry; the helper says what it freed
        host.log_styled(f"retention: will remove {', '.join(v.path for v in going)}", fg="yellow")
    yield remote.streamed(
        remote.helper_command(HELPER, "--install-dir", install_dir, "--model-dir", model_dir,
                              "--remove"), "retention", stdin=json.dumps([v.path for v in going]))

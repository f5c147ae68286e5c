"""The inventory's lock (llmhost.lockfile): a run uses what it holds, not what ``main`` is today.

A model's repo is resolved once, by the first run that needs it (the preflight, on the
controller, before any host is touched); its commit and every needed file's sha256 and size go
into the lock beside the inventory (``inventory.py`` -> ``inventory.lock``, or llm_lock_file).
Every later run and every new host use the lock: a rerun needs no Hub at all, and ten hosts
added next month get the bytes the first one got. The llama.cpp commit of hosts that leave
llm_llamacpp_commit unset is locked too, so an upgrade of llmhost does not rebuild the fleet.

Only ``llmhost-lock INVENTORY --upgrade [NAME ...]`` moves the lock (it prints what changes);
the deploy after it switches the hosts, each behind its health gate. A revision in the settings
that the lock does not hold (another branch, or a pinned commit other than the locked one) is
an error before any host is touched: the lock moves only when asked.

    llmhost-lock inventory.py                       # write what is missing, move nothing
    llmhost-lock inventory.py --upgrade             # every model and llama.cpp
    llmhost-lock inventory.py --upgrade org/repo    # one repo (or llama.cpp)
    llmhost-lock inventory.py --check               # exit 1 when the lock is not complete
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Mapping

from llmhost import hf, lockfile
from llmhost.lockfile import Lock, LockedBuild, LockedFile, LockedModel, LockError
from llmhost.settings import (PINNED_BUILD_NUMBER, PINNED_COMMIT, HostSettings, ModelSpec,
                              SettingsError, load_inventory_settings)

LLAMACPP = "llama.cpp"
DEFAULT_NAME = "llmhost.lock"  # when the inventory is a host list on the command line
# A child of pyinfra's logger: printed as pyinfra prints its own lines.
logger = logging.getLogger("pyinfra.llmhost")


# --------------------------------------------------------------------------- where it lives

def cli_arguments() -> dict:
    """The pyinfra CLI's own parse of this process's command line (``inventory``, ``dry``);
    empty outside the CLI (pyinfra's API, tests). pyinfra 3.10 keeps the inventory's name
    nowhere else, and its click context is not visible from the hosts' greenlets."""
    import pyinfra

    if not pyinfra.is_cli:
        return {}
    from pyinfra_cli.cli import cli

    try:
        with cli.make_context("pyinfra", list(sys.argv[1:]), resilient_parsing=True) as ctx:
            return dict(ctx.params)
    except Exception:  # noqa: BLE001 - an unparsable command line: pyinfra has said so already
        return {}


def default_path(inventory: str | None, cwd: str) -> Path | None:
    """Beside the inventory file (``prod.py`` -> ``prod.lock``), also for an inventory given as
    a Python module (``pkg.inventory:hosts`` -> ``pkg/inventory.lock``); ``llmhost.lock`` in the
    current folder for a host list (``pyinfra host1,host2 deploy.py``); None without one."""
    if not inventory:
        return None
    path = Path(cwd) / inventory
    if path.is_file():
        return path.with_suffix(".lock")
    if "," not in inventory and "@" not in inventory and ("." in inventory or ":" in inventory):
        module = inventory.rsplit(":", 1)[0] if ":" in inventory else inventory.rsplit(".", 1)[0]
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            spec = None
        if spec and spec.origin and spec.origin.endswith(".py"):
            return Path(spec.origin).with_suffix(".lock")
    return Path(cwd) / DEFAULT_NAME


def lock_groups(settings: Mapping[str, HostSettings],
                default: Path | None) -> dict[Path | None, dict[str, HostSettings]]:
    """Hosts by the lock file they use (llm_lock_file, else ``default``)."""
    groups: dict[Path | None, dict[str, HostSettings]] = {}
    for name, s in settings.items():
        groups.setdefault(Path(s.lock_file) if s.lock_file else default, {})[name] = s
    return groups


# --------------------------------------------------------------------------- resolution

class _Problems(Exception):
    def __init__(self, lines: list[str]):
        self.lines = lines


def _uses(settings: Mapping[str, HostSettings]) -> dict[str, list[tuple[str, str, ModelSpec]]]:
    """Each Hugging Face repo -> (host, service, model) of every service that uses it."""
    uses: dict[str, list] = {}
    for host_name in sorted(settings):
        for service in settings[host_name].services:
            if service.model.source != "local":
                uses.setdefault(service.model.repo, []).append((host_name, service.name, service.model))
    return uses


def _uses_default_llamacpp(settings: HostSettings, data: Mapping) -> bool:
    return settings.managed and "llm_llamacpp_commit" not in data


def resolve(settings: Mapping[str, HostSettings], data: Mapping[str, Mapping], lock: Lock,
            where: str, upgrade: frozenset[str] | None = None, prune: bool = False,
            inventory: str = "INVENTORY") -> tuple[Lock, list[str]]:
    """The lock these hosts need: ``lock`` with what is missing resolved on the Hub, and with
    ``upgrade`` (None: nothing; empty: everything; else repos and/or llama.cpp) resolved again
    from the settings. ``prune`` drops what no host uses (only when every host is here).
    Returns the new lock and the problems (host, setting, found, expected)."""
    problems: list[str] = []
    models = {} if prune else dict(lock.models)
    for repo, uses in _uses(settings).items():
        entry = lock.models.get(repo)
        moving = upgrade is not None and (not upgrade or repo in upgrade)
        try:
            if entry is None or moving:
                entry = _resolve_repo(repo, uses)
            else:
                _check_agrees(repo, entry, uses, where, inventory)
                entry = _complete(repo, entry, uses, inventory)
        except _Problems as found:
            problems += found.lines
            continue
        models[repo] = _needed_only(entry, uses) if prune else entry
    build = lock.llamacpp
    defaulted = any(_uses_default_llamacpp(s, data[h]) for h, s in settings.items())
    if defaulted and (build is None or upgrade is not None and (not upgrade or LLAMACPP in upgrade)):
        build = LockedBuild(PINNED_COMMIT, PINNED_BUILD_NUMBER)
    if prune and not defaulted:
        build = None
    return Lock(dict(sorted(models.items())), build), problems


def _where(host: str, service: str) -> str:
    return f"host {host}: llm_services.{service}.model"


def _resolve_repo(repo: str, uses) -> LockedModel:
    """Ask the Hub (once per model, token and endpoint): one commit for every use of the repo."""
    problems, resolved = [], []
    for host, service, model in uses:
        try:
            manifest = hf.resolve_manifest(model, hf.token_for(model), hf.endpoint_for(model))
        except hf.ManifestError as error:
            problems.append(f"{_where(host, service)}: {error}")
            continue
        resolved.append((host, service, model, manifest))
    if problems:
        raise _Problems(problems)
    commits = {m.commit for *_, m in resolved}
    if len(commits) > 1:
        asked = "; ".join(f"host {h} {mo.revision!r} ({m.commit[:12]})" for h, _, mo, m in resolved)
        raise _Problems([
            f"{_where(h, s)}.revision: found {mo.revision!r} (commit {m.commit[:12]}), expected "
            f"one commit of {repo} for every host of a lock ({asked}); fix: set the same revision "
            f"on every host, or give some hosts their own llm_lock_file" for h, s, mo, m in resolved])
    revision = next((mo.revision for _, _, mo, _ in resolved
                     if not lockfile.COMMIT_RE.match(mo.revision)), resolved[0][2].revision)
    files = {f.name: LockedFile(f.sha256, f.size) for *_, m in resolved for f in m.files}
    return LockedModel(revision, commits.pop(), dict(sorted(files.items())))


def _check_agrees(repo: str, entry: LockedModel, uses, where: str, inventory: str) -> None:
    """A revision the lock does not hold is an error: the lock moves only when asked."""
    problems = [
        f"{_where(host, service)}.revision: found {model.revision!r}, expected {entry.revision!r} "
        f"or {entry.commit}, which lock {where} holds for {repo}; fix: set it back, or move the "
        f"lock with: llmhost-lock {inventory} --upgrade {repo}"
        for host, service, model in uses if model.revision not in (entry.revision, entry.commit)]
    if problems:
        raise _Problems(problems)


def _complete(repo: str, entry: LockedModel, uses, inventory: str) -> LockedModel:
    """Files a service needs that the lock lacks (a new service, an mmproj added): resolved at
    the locked commit, which does not move."""
    files = dict(entry.files)
    problems = []
    for host, service, model in uses:
        try:
            if all(name in files for name in hf.wanted_names(model)):
                continue
            pinned = replace(model, revision=entry.commit)
            manifest = hf.resolve_manifest(pinned, hf.token_for(model), hf.endpoint_for(model))
        except hf.ManifestError as error:
            problems.append(f"{_where(host, service)}: {error} (the lock holds {repo} at "
                            f"{entry.commit[:12]}; llmhost-lock {inventory} --upgrade {repo} "
                            f"moves it)")
            continue
        files.update({f.name: LockedFile(f.sha256, f.size) for f in manifest.files})
    if problems:
        raise _Problems(problems)
    return replace(entry, files=dict(sorted(files.items())))


def _needed_only(entry: LockedModel, uses) -> LockedModel:
    needed = {name for *_, model in uses for name in hf.wanted_names(model)}
    return replace(entry, files={n: f for n, f in entry.files.items() if n in needed})


# --------------------------------------------------------------------------- use

def apply(settings: Mapping[str, HostSettings], data: Mapping[str, Mapping],
          lock: Lock) -> dict[str, HostSettings]:
    """The settings as the lock makes them: each Hugging Face model carries its locked commit
    and files, and hosts on the default llama.cpp build the locked commit."""
    out = {}
    for name, s in settings.items():
        services = tuple(replace(service, model=_locked(service.model, lock))
                         if service.model.source != "local" else service
                         for service in s.services)
        changes: dict = {"services": services}
        if lock.llamacpp and _uses_default_llamacpp(s, data[name]):
            changes["llamacpp_commit"] = lock.llamacpp.commit
            if "llm_llamacpp_build_number" not in data[name]:
                changes["llamacpp_build_number"] = lock.llamacpp.build_number
        out[name] = replace(s, **changes)
    return out


def _locked(model: ModelSpec, lock: Lock) -> ModelSpec:
    entry = lock.models[model.repo]
    files = tuple((n, entry.files[n].sha256, entry.files[n].size) for n in hf.wanted_names(model))
    return replace(model, locked_commit=entry.commit, locked_files=files)


def manifest(model: ModelSpec) -> hf.ModelManifest:
    """The model's files as the lock holds them, with URLs pinned to the locked commit: no Hub."""
    endpoint = hf.endpoint_for(model)
    files = tuple(hf.ManifestFile(name=n, size=size, sha256=sha256,
                                  url=hf.file_url(endpoint, model.repo, model.locked_commit, n))
                  for n, sha256, size in model.locked_files)
    return hf.ModelManifest(repo=model.repo, revision=model.revision, commit=model.locked_commit,
                            files=files, model=files[0].name, mmproj=model.mmproj)


def locked_settings(settings: Mapping[str, HostSettings], data: Mapping[str, Mapping],
                    every_host: bool) -> tuple[dict[str, HostSettings], list[str]]:
    """The preflight's step, once per run on the controller: read each lock the hosts use,
    resolve what it lacks, write it back (atomically, only when it changed, not under --dry)
    and return the settings as the lock makes them. ``every_host``: the run covers the whole
    inventory, so entries no host uses are dropped."""
    args = cli_arguments()
    inventory = args.get("inventory") or "INVENTORY"
    out: dict[str, HostSettings] = {}
    problems: list[str] = []
    writes: list[tuple[Path, Lock, Lock]] = []
    for path, group in lock_groups(settings, default_path(args.get("inventory"), os.getcwd())).items():
        try:
            old = lockfile.read(path) if path else Lock()
        except LockError as error:
            problems += error.problems
            continue
        new, found = resolve(group, data, old, str(path), prune=every_host, inventory=inventory)
        problems += found
        if found:
            continue
        if path and (new.to_text() != old.to_text() or not path.exists()):
            writes.append((path, old, new))
        out.update(apply(group, data, new))
    if problems:
        return out, problems
    for path, old, new in writes:
        what = "; ".join(lockfile.changes(old, new)) or "created"
        if args.get("dry"):
            logger.info(f"--> llmhost lock {path}: would write (--dry): {what}")
            continue
        lockfile.write(path, new)
        logger.info(f"--> llmhost lock {path}: {what}")
    return out, problems


# --------------------------------------------------------------------------- llmhost-lock

def _inventory_data(inventory: str) -> dict[str, dict]:
    """Every host's data, as `pyinfra INVENTORY deploy.py` sees it (group_data/ included)."""
    from pyinfra.api import State
    from pyinfra.context import ctx_state
    from pyinfra_cli.inventory import make_inventory

    if os.getcwd() not in sys.path and "." not in sys.path:
        sys.path.append(".")  # as pyinfra's CLI does, for an inventory given as a module
    with ctx_state.use(State()):
        return {h.name: h.data.dict() for h in make_inventory(inventory, cwd=os.getcwd())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="llmhost-lock",
        description="Write the inventory's lock (models and llama.cpp, as the deploy does), or "
                    "move it with --upgrade; prints what changes. Commit the lock with the "
                    "inventory; the next deploy moves the hosts to it behind the health gate.")
    parser.add_argument("inventory", help="the pyinfra inventory (file or module) the deploy uses")
    parser.add_argument("--upgrade", nargs="*", metavar="NAME",
                        help="resolve again: every model and llama.cpp, or only the named repos "
                             f"(owner/name) and {LLAMACPP}")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 when the lock lacks or holds more than the "
                             "inventory needs")
    args = parser.parse_args(argv)
    try:
        data = _inventory_data(args.inventory)
        settings = load_inventory_settings(data)
    except SettingsError as error:
        print(error, file=sys.stderr)
        return 2
    except Exception as error:  # noqa: BLE001 - pyinfra's own inventory errors, said in one line
        print(f"llmhost-lock: inventory {args.inventory}: {error}", file=sys.stderr)
        return 2
    upgrade = frozenset(args.upgrade) if args.upgrade is not None else None
    known = set(_uses(settings)) | {LLAMACPP}
    unknown = sorted((upgrade or frozenset()) - known)
    if unknown:
        print(f"llmhost-lock: --upgrade {' '.join(unknown)}: found no such repo in the "
              f"inventory, expected one of {', '.join(sorted(known))}", file=sys.stderr)
        return 2
    default = default_path(args.inventory, os.getcwd())
    status = 0
    for path, group in lock_groups(settings, default).items():
        if path is None:  # not reached from the CLI (an inventory always names a place)
            continue
        try:
            old = lockfile.read(path)
            new, problems = resolve(group, data, old, str(path), upgrade=upgrade, prune=True,
                                    inventory=args.inventory)
        except LockError as error:
            problems = error.problems
        if problems:
            print("\n".join(problems), file=sys.stderr)
            status = 2
            continue
        lines = lockfile.changes(old, new)
        unchanged = new.to_text() == old.to_text() and path.exists()
        print(f"lock {path}: {'up to date' if unchanged else 'changes:'}")
        for line in lines:
            print(f"  {line}")
        if unchanged:
            continue
        if args.check:
            status = max(status, 1)
            continue
        lockfile.write(path, new)
        print(f"wrote {path}; commit it with the inventory: the next deploy moves the hosts to "
              f"it, each behind its health gate")
    return status


if __name__ == "__main__":
    sys.exit(main())

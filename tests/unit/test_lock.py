"""The lock (llmhost.lockfile, llmhost.lock) against the fake Hugging Face server: what a first
run writes, that a later run asks the Hub nothing and keeps the locked commit after ``main``
moved, what --upgrade moves and prints, the errors (host, setting, found, expected), where the
file lives, that no token reaches it, and that the preflight writes it once for many hosts."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from pyinfra.api import Config, Inventory, State
from pyinfra.context import ctx_state

from llmhost import hf, lock, lockfile, preflight, weights
from llmhost.lockfile import Lock, LockedBuild, LockedFile, LockedModel, LockError
from llmhost.settings import PINNED_BUILD_NUMBER, PINNED_COMMIT, load_inventory_settings
from tests.support.fake_hf import FakeHF

REPO = Path(__file__).resolve().parents[2]
TOKEN = "hf_LockTestSecret0123456789abcdef"
MODEL = "org/Model-GGUF"
GATED = "org/Gated-GGUF"
OTHER_COMMIT = "b" * 40


@pytest.fixture
def hub(monkeypatch):
    """A fresh Hub per test: tests move ``main``."""
    hf.clear_cache()
    monkeypatch.setattr(hf, "BACKOFF", 0.0)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with FakeHF() as server:
        server.add_repo(MODEL, {"m.gguf": b"GGUF-one", "mmproj.gguf": b"GGUF-proj"})
        server.add_repo(GATED, {"g.gguf": b"GGUF-gated"}, gated=True, token=TOKEN)
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        yield server
    hf.clear_cache()


def data(repo: str = MODEL, file: str = "m.gguf", port: int = 8082, **model) -> dict:
    return {"llm_services": {"main": {"port": port, "model": {"source": "hf", "repo": repo,
                                                              "file": file, **model}}}}


def resolve(hosts: dict, old: Lock = Lock(), **kwargs) -> tuple[Lock, list[str]]:
    hf.clear_cache()  # each call is a new run: nothing remembered from the last one
    settings = load_inventory_settings(hosts)
    return lock.resolve(settings, hosts, old, "inventory.lock", inventory="inventory.py", **kwargs)


# --------------------------------------------------------------------------- the file

def sample() -> Lock:
    return Lock({MODEL: LockedModel("main", "a" * 40, {"z.gguf": LockedFile("1" * 64, 5),
                                                       "a.gguf": LockedFile("2" * 64, 7)})},
                LockedBuild(PINNED_COMMIT, PINNED_BUILD_NUMBER))


def test_the_text_is_stable_sorted_json_and_reads_back():
    text = sample().to_text()
    assert text == sample().to_text() and text.endswith("}\n")
    assert text.index('"a.gguf"') < text.index('"z.gguf"')  # sorted, whatever the order held
    assert list(json.loads(text)) == ["llamacpp", "models", "version"]
    assert lockfile.parse(text, "x") == sample()


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["models"][MODEL]["files"]["a.gguf"].update(sha256="XYZ"),
     f"lock x: models.{MODEL}.files.a.gguf: found {{'sha256': 'XYZ', 'size': 7}}, expected a sha256"),
    (lambda d: d["models"][MODEL]["files"].update({"../../etc/passwd": {"sha256": "1" * 64, "size": 1}}),
     f"lock x: models.{MODEL}.files: found file name '../../etc/passwd', expected a path inside the repo"),
    (lambda d: d["models"][MODEL].update(commit="abc"),
     f"lock x: models.{MODEL}.commit: found 'abc', expected 40 lowercase hex digits"),
    (lambda d: d["models"][MODEL].update(revision="c" * 40),
     f"lock x: models.{MODEL}.commit: found {'a' * 40}, expected {'c' * 40}, the commit its revision names"),
    (lambda d: d.update(version=7), "lock x: version: found 7, expected 1"),
    (lambda d: d["llamacpp"].update(build_number=-1), "lock x: llamacpp: found {"),
])
def test_a_damaged_lock_is_refused_naming_the_place(edit, message):
    raw = json.loads(sample().to_text())
    edit(raw)
    with pytest.raises(LockError) as caught:
        lockfile.parse(json.dumps(raw), "x")
    assert message in str(caught.value), str(caught.value)


def test_write_is_atomic_and_leaves_only_the_lock(tmp_path):
    path = tmp_path / "inventory.lock"
    assert lockfile.read(path) == Lock()  # none yet: empty
    path.write_text("old\n")
    lockfile.write(path, sample())
    assert lockfile.read(path) == sample()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inventory.lock"]  # no temp file left
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_a_failed_write_keeps_the_old_lock(tmp_path, monkeypatch):
    path = tmp_path / "inventory.lock"
    lockfile.write(path, sample())

    def fail(*_):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(LockError, match="No space left on device"):
        lockfile.write(path, Lock())
    assert lockfile.read(path) == sample()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inventory.lock"]


def test_changes_name_the_moved_commit_and_each_file_whose_sha_changes():
    old = sample()
    moved = Lock({MODEL: LockedModel("main", "c" * 40, {"z.gguf": LockedFile("1" * 64, 5),
                                                        "a.gguf": LockedFile("3" * 64, 9)})},
                 LockedBuild("d" * 40, 11400))
    assert lockfile.changes(old, moved) == [
        f"{MODEL} (revision 'main'): {'a' * 12} -> {'c' * 12}",
        f"  a.gguf: sha256 {'2' * 12} -> {'3' * 12}, 7 -> 9 bytes",
        f"llama.cpp: {PINNED_COMMIT[:12]} (build {PINNED_BUILD_NUMBER}) -> {'d' * 12} (build 11400)"]
    assert lockfile.changes(old, old) == []


# --------------------------------------------------------------------------- resolution

def test_a_first_run_locks_the_commit_and_every_file_then_later_runs_ask_nothing(hub):
    hosts = {"h1": data(mmproj="mmproj.gguf")}
    first, problems = resolve(hosts)
    assert problems == []
    commit = hub.repos[MODEL].commit
    entry = first.models[MODEL]
    assert (entry.revision, entry.commit) == ("main", commit)
    assert {n: f.size for n, f in entry.files.items()} == {"m.gguf": 8, "mmproj.gguf": 9}
    assert first.llamacpp == LockedBuild(PINNED_COMMIT, PINNED_BUILD_NUMBER)
    assert len(hub.api_requests()) == 1

    hub.new_commit(MODEL, {"m.gguf": b"GGUF-two-fixed"})
    hub.reset_counters()
    again, problems = resolve(hosts, first)
    assert problems == [] and again == first
    assert hub.log == []  # not one request: the lock holds everything
    # What the hosts get: the locked bytes, by URLs pinned to the locked commit.
    settings = lock.apply(load_inventory_settings(hosts), hosts, again)
    placed = weights.plan_hf(settings["h1"], settings["h1"].services[0].model)
    assert [(f.sha256, f.size) for f in placed.files] == [
        (entry.files["m.gguf"].sha256, 8), (entry.files["mmproj.gguf"].sha256, 9)]
    assert all(f"/resolve/{commit}/" in f.url for f in placed.files)
    assert f"/{commit[:12]}/" in placed.model_path
    assert hub.log == []


def test_upgrade_moves_to_main_and_names_the_file_that_changed(hub):
    hosts = {"h1": data(mmproj="mmproj.gguf"), "h2": data(port=8083)}
    old, _ = resolve(hosts)
    new_commit = hub.new_commit(MODEL, {"m.gguf": b"GGUF-two-fixed"})
    new, problems = resolve(hosts, old, upgrade=frozenset())
    assert problems == [] and new.models[MODEL].commit == new_commit
    assert lockfile.changes(old, new) == [
        f"{MODEL} (revision 'main'): {old.models[MODEL].commit[:12]} -> {new_commit[:12]}",
        f"  m.gguf: sha256 {old.models[MODEL].files['m.gguf'].sha256[:12]} -> "
        f"{new.models[MODEL].files['m.gguf'].sha256[:12]}, 8 -> 14 bytes"]
    # Naming another repo moves nothing of this one.
    other, _ = resolve(hosts, old, upgrade=frozenset({"llama.cpp"}))
    assert other.models == old.models


def test_a_pinned_revision_the_lock_holds_needs_no_change_another_one_is_an_error(hub):
    old, _ = resolve({"h1": data()})
    locked = old.models[MODEL].commit
    hub.new_commit(MODEL)
    hub.reset_counters()
    same, problems = resolve({"h1": data(revision=locked)}, old)
    assert problems == [] and same == old and hub.log == []
    _, problems = resolve({"h1": data(revision=OTHER_COMMIT)}, old)
    assert problems == [
        f"host h1: llm_services.main.model.revision: found '{OTHER_COMMIT}', expected 'main' or "
        f"{locked}, which lock inventory.lock holds for {MODEL}; fix: set it back, or move the "
        f"lock with: llmhost-lock inventory.py --upgrade {MODEL}"]
    _, problems = resolve({"h1": data(revision="v2")}, old)
    assert problems and "found 'v2', expected 'main'" in problems[0]
    assert hub.log == []  # refused before asking anything


def test_hosts_of_one_lock_must_agree_on_a_repos_commit(hub):
    first = hub.repos[MODEL].commit
    hub.new_commit(MODEL)
    _, problems = resolve({"h1": data(), "h2": data(revision=first)})
    assert len(problems) == 2 and problems[0].startswith(
        f"host h1: llm_services.main.model.revision: found 'main' (commit "
        f"{hub.repos[MODEL].commit[:12]}), expected one commit of {MODEL} for every host")


def test_a_file_the_lock_lacks_is_resolved_at_the_locked_commit_not_at_main(hub):
    old, _ = resolve({"h1": data()})
    hub.new_commit(MODEL, {"mmproj.gguf": b"GGUF-proj-new"})
    new, problems = resolve({"h1": data(mmproj="mmproj.gguf")}, old)
    assert problems == [] and new.models[MODEL].commit == old.models[MODEL].commit
    assert new.models[MODEL].files["mmproj.gguf"].size == len(b"GGUF-proj")  # the old bytes
    assert [p.split("?")[0] for p in hub.api_requests()][-1].endswith(
        f"/revision/{old.models[MODEL].commit}")


def test_prune_drops_what_no_host_uses(hub):
    old, _ = resolve({"h1": data(mmproj="mmproj.gguf")})
    kept, _ = resolve({"h1": data()}, old)
    assert set(kept.models[MODEL].files) == {"m.gguf", "mmproj.gguf"}  # a --limit run keeps all
    pruned, _ = resolve({"h1": data()}, old, prune=True)
    assert set(pruned.models[MODEL].files) == {"m.gguf"}
    local = {"h1": {"llm_services": {"main": {"port": 1, "model": {"source": "local",
                                                                   "path": "/m.gguf"}}}}}
    assert resolve(local, old, prune=True)[0].models == {}


def test_the_default_llamacpp_is_locked_a_pinned_one_is_the_hosts_own(hub):
    older = Lock(llamacpp=LockedBuild("e" * 40, 11000))
    hosts = {"h1": data(), "h2": {**data(), "llm_llamacpp_commit": OTHER_COMMIT}}
    new, problems = resolve(hosts, older)
    assert problems == [] and new.llamacpp == older.llamacpp  # an llmhost upgrade moves nothing
    settings = lock.apply(load_inventory_settings(hosts), hosts, new)
    assert (settings["h1"].llamacpp_commit, settings["h1"].llamacpp_build_number) == ("e" * 40, 11000)
    assert settings["h2"].llamacpp_commit == OTHER_COMMIT
    moved, _ = resolve(hosts, older, upgrade=frozenset({"llama.cpp"}))
    assert moved.llamacpp == LockedBuild(PINNED_COMMIT, PINNED_BUILD_NUMBER)
    assert moved.models == new.models


def test_no_token_and_no_endpoint_reach_the_lock(hub, tmp_path, monkeypatch):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    hosts = {"h1": data(GATED, "g.gguf", token_file=str(token_file)),
             "h2": data(GATED, "g.gguf", port=8083)}
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    new, problems = resolve(hosts)
    assert problems == []
    text = new.to_text()
    assert TOKEN not in text and TOKEN[3:15] not in text
    assert hub.endpoint not in text and "http" not in text
    assert any(e.authorization for e in hub.log)  # the token was used, and stayed there


def test_the_hub_down_for_a_missing_entry_is_a_problem_an_existing_one_needs_no_hub(hub):
    old, _ = resolve({"h1": data()})
    hub.faults.fail_next = 100
    _, problems = resolve({"h1": data(), "h2": data(GATED, "g.gguf")}, old)
    assert len(problems) == 1 and problems[0].startswith(
        f"host h2: llm_services.main.model: repo {GATED} revision 'main': ") and "503" in problems[0]
    again, problems = resolve({"h1": data()}, old)
    assert problems == [] and again == old


# --------------------------------------------------------------------------- where it lives

def test_the_lock_lives_beside_the_inventory(tmp_path, monkeypatch):
    (tmp_path / "prod.py").write_text("hosts = []\n")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "fleet.py").write_text("def hosts():\n    return {}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cwd = str(tmp_path)
    assert lock.default_path("prod.py", cwd) == tmp_path / "prod.lock"
    assert lock.default_path("pkg.fleet:hosts", cwd) == tmp_path / "pkg" / "fleet.lock"
    assert lock.default_path("pkg.fleet.hosts", cwd) == tmp_path / "pkg" / "fleet.lock"
    for hosts in ("host1,host2", "@local", "gpu1.example.net"):
        assert lock.default_path(hosts, cwd) == tmp_path / "llmhost.lock", hosts
    assert lock.default_path(None, cwd) is None  # pyinfra's API: only llm_lock_file


def test_llm_lock_file_overrides_the_place_per_host():
    hosts = {"a": data(), "b": {**data(), "llm_lock_file": "/srv/canary.lock"}}
    groups = lock.lock_groups(load_inventory_settings(hosts), Path("/inv/prod.lock"))
    assert {str(p): sorted(g) for p, g in groups.items()} == {"/inv/prod.lock": ["a"],
                                                              "/srv/canary.lock": ["b"]}


# --------------------------------------------------------------------------- the preflight

def connected_state(hosts: dict) -> State:
    """A run's State with every host of ``hosts`` connected (what the preflight validates)."""
    names = list(hosts)
    state = State(Inventory((names, {}), all=(names, {}), **{n: ([n], hosts[n]) for n in names}),
                  Config())
    for host in state.inventory:
        state.active_hosts.add(host)
        state.activated_hosts.add(host)
    return state


PARALLEL_DEFINE = """
import json, sys
from gevent import monkey
monkey.patch_all()  # as pyinfra's CLI does, before the deploy file imports llmhost
import gevent
from pyinfra.api import Config, Inventory, State
from pyinfra.context import ctx_host, ctx_state
from llmhost import lockfile, preflight

path, names = sys.argv[1], sys.argv[2].split(",")
data = json.loads(sys.argv[3])
state = State(Inventory((names, {}), **{n: ([n], data) for n in names}), Config())
for h in state.inventory:
    state.active_hosts.add(h)
writes, real_write = [], lockfile.write
lockfile.write = lambda p, new: (writes.append(str(p)), real_write(p, new))
ctx_state.set(state)

def define(h):  # pyinfra_cli.util._parallel_load_hosts: one greenlet per host
    with ctx_host.use(h):
        return preflight.inventory_settings()[h.name].services[0].model.locked_commit

commits = [g.get() for g in [gevent.spawn(define, h) for h in state.inventory]]
print(json.dumps({"writes": writes, "commits": commits}))
"""


def test_the_preflight_resolves_and_writes_once_for_hosts_defined_at_once(hub, tmp_path):
    """pyinfra defines each host's operations in its own greenlet, and each calls
    inventory_settings: one resolves (one API request per model) and writes the lock once, the
    others wait (the Hub's answer lets them run) and take its result."""
    path = tmp_path / "fleet.lock"
    names = [f"h{i}" for i in range(6)]
    result = subprocess.run(
        [sys.executable, "-c", PARALLEL_DEFINE, str(path), ",".join(names),
         json.dumps({**data(), "llm_lock_file": str(path)})],
        cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, "HF_ENDPOINT": hub.endpoint})
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.splitlines()[-1])
    commit = hub.repos[MODEL].commit
    assert out == {"writes": [str(path)], "commits": [commit] * len(names)}
    assert len(hub.api_requests()) == 1
    assert lockfile.read(path).models[MODEL].commit == commit


def test_a_pinned_revision_against_the_lock_stops_the_run_before_any_host(hub, tmp_path):
    path = tmp_path / "inventory.lock"
    lockfile.write(path, resolve({"h1": data()})[0])
    host_data = {**data(revision=OTHER_COMMIT), "llm_lock_file": str(path)}
    state = connected_state({"h1": host_data})
    with ctx_state.use(state), pytest.raises(preflight.SettingsError) as caught:
        preflight.inventory_settings()
    assert "host h1: llm_services.main.model.revision: found 'bbbb" in str(caught.value)
    assert "llmhost-lock INVENTORY --upgrade org/Model-GGUF" in str(caught.value)


# --------------------------------------------------------------------------- llmhost-lock

def lock_cli(folder: Path, *args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmhost.lock", *args], cwd=folder,
                          capture_output=True, text=True, timeout=120, env={**os.environ, **env})


def test_the_command_writes_checks_and_upgrades(hub, tmp_path):
    (tmp_path / "inventory.py").write_text(
        f"gpu = [('h1', {data(mmproj='mmproj.gguf')!r}), ('h2', {data()!r})]\n")
    env = {"HF_ENDPOINT": hub.endpoint}
    check = lock_cli(tmp_path, "inventory.py", "--check", env=env)
    assert check.returncode == 1 and not (tmp_path / "inventory.lock").exists(), check.stdout
    first = lock_cli(tmp_path, "inventory.py", env=env)
    assert first.returncode == 0, first.stderr
    old = lockfile.read(tmp_path / "inventory.lock")
    assert f"{MODEL}: added at {old.models[MODEL].commit[:12]}" in first.stdout
    assert lock_cli(tmp_path, "inventory.py", "--check", env=env).returncode == 0

    new_commit = hub.new_commit(MODEL, {"m.gguf": b"GGUF-two-fixed"})
    same = lock_cli(tmp_path, "inventory.py", env=env)
    assert "up to date" in same.stdout and lockfile.read(tmp_path / "inventory.lock") == old
    bad = lock_cli(tmp_path, "inventory.py", "--upgrade", "org/Nope", env=env)
    assert bad.returncode == 2 and "--upgrade org/Nope: found no such repo in the inventory, " \
        f"expected one of llama.cpp, {MODEL}" in bad.stderr
    upgrade = lock_cli(tmp_path, "inventory.py", "--upgrade", MODEL, env=env)
    assert upgrade.returncode == 0, upgrade.stderr
    assert f"{old.models[MODEL].commit[:12]} -> {new_commit[:12]}" in upgrade.stdout
    assert "  m.gguf: sha256 " in upgrade.stdout and "mmproj.gguf" not in upgrade.stdout
    assert lockfile.read(tmp_path / "inventory.lock").models[MODEL].commit == new_commit


def test_the_deploy_writes_beside_the_inventory_it_was_given_and_not_under_dry(hub, tmp_path, monkeypatch):
    (tmp_path / "prod.py").write_text("hosts = []\n")
    monkeypatch.chdir(tmp_path)
    hosts = {"h1": data()}
    monkeypatch.setattr(lock, "cli_arguments", lambda: {"inventory": "prod.py", "dry": True})
    settings, problems = lock.locked_settings(load_inventory_settings(hosts), hosts, every_host=True)
    assert problems == [] and sorted(p.name for p in tmp_path.iterdir()) == ["prod.py"]
    assert settings["h1"].services[0].model.locked_commit == hub.repos[MODEL].commit
    monkeypatch.setattr(lock, "cli_arguments", lambda: {"inventory": "prod.py", "dry": False})
    lock.locked_settings(load_inventory_settings(hosts), hosts, every_host=True)
    assert lockfile.read(tmp_path / "prod.lock").models[MODEL].commit == hub.repos[MODEL].commit

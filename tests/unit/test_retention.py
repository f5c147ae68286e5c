"""Retention: what a deploy removes (llmhost.retention) and what the host helper refuses
(files/retention.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from pyinfra.context import ctx_host, ctx_state

from llmhost import retention
from llmhost.retention import StoredVersion, StoredVersions

REPO = Path(__file__).resolve().parents[2]
B, M = "/opt/llama.cpp/builds", "/var/lib/llama-models"


def unit(build: str, model: str) -> str:
    return f"[Service]\nExecStart={B}/{build}/bin/llama-server --model {M}/{model}/m.gguf\n"


def v(kind: str, path: str, mtime: float) -> StoredVersion:
    return StoredVersion(kind, path, mtime)


BUILDS = [v("build", f"{B}/0c1e57098bba-aaaa0001", 1), v("build", f"{B}/0c1e57098bba-aaaa0002", 2),
          v("build", f"{B}/1111111111aa-aaaa0003", 3), v("build", f"{B}/1111111111aa-aaaa0004", 4)]
SOURCES = [v("source", "/opt/llama.cpp/src/0c1e57098bba43ac29e6e3b677cdceebdd22334f", 1),
           v("source", "/opt/llama.cpp/src/1111111111aa2222222222222222222222222222", 3)]
MODELS = [v("model", f"{M}/org--m/{c}", t) for t, c in enumerate(("c1", "c2", "c3", "c4"), 1)]


def test_named_versions_stay_and_the_newest_spare_of_each_kind():
    texts = [unit("1111111111aa-aaaa0004", "org--m/c4"), unit("1111111111aa-aaaa0003", "org--m/c3")]
    going = retention.plan(BUILDS + SOURCES + MODELS, texts, keep_previous=1)
    assert [g.path for g in going] == [f"{B}/0c1e57098bba-aaaa0001", f"{M}/org--m/c1"]


def test_keep_zero_keeps_only_what_units_name_and_sources_follow_their_builds():
    texts = [unit("1111111111aa-aaaa0004", "org--m/c4")]
    going = {g.path for g in retention.plan(BUILDS + SOURCES + MODELS, texts, keep_previous=0)}
    assert going == {f"{B}/0c1e57098bba-aaaa0001", f"{B}/0c1e57098bba-aaaa0002",
                     f"{B}/1111111111aa-aaaa0003", SOURCES[0].path,
                     f"{M}/org--m/c1", f"{M}/org--m/c2", f"{M}/org--m/c3"}


def test_a_path_prefix_is_not_a_reference():
    """org--m/c1 is not named by a unit that names org--m/c10."""
    going = retention.plan([v("model", f"{M}/org--m/c1", 1)], [unit("x", "org--m/c10")], 0)
    assert [g.path for g in going] == [f"{M}/org--m/c1"]


def test_units_after_the_deploy_name_the_new_unit_and_its_rollback_target():
    old, new, saved = unit("b-old", "org--m/c3"), unit("b-new", "org--m/c4"), unit("b-older", "org--m/c2")
    current = {"/etc/systemd/system/llama-main.service": old,
               "/var/lib/llmhost/units/llama-main.service.previous": saved}
    # The unit changes: the live one becomes the rollback target, the saved one does not matter.
    assert retention.units_after(current, {"llama-main.service": new}) == [new, old]
    # The unit stays: its saved rollback target still counts.
    assert retention.units_after(current, {"llama-main.service": old}) == [old, saved]


class FakeHost:
    def __init__(self, stored):
        self.stored, self.noops, self.logged = stored, [], []

    def get_fact(self, cls, **kwargs):
        assert cls is StoredVersions
        return self.stored

    def noop(self, text):
        self.noops.append(text)

    def log_styled(self, text, **kwargs):
        self.logged.append(text)


def run_op(fake, rendered, keep=1, executing=False):
    with ctx_host.use(fake), ctx_state.use(SimpleNamespace(is_executing=executing)):
        return list(retention.old_versions._inner(install_dir="/opt/llama.cpp", model_dir=M,
                                                 rendered=rendered, keep_previous=keep))


def test_the_operation_removes_through_the_helper_with_the_paths_on_stdin():
    live = unit("1111111111aa-aaaa0004", "org--m/c4")
    fake = FakeHost({"versions": BUILDS + MODELS, "units": {
        "/etc/systemd/system/llama-main.service": live}})
    (command,) = run_op(fake, {"llama-main.service": live})
    assert str(command) == ("python3 /usr/local/lib/llmhost/retention.py --install-dir /opt/llama.cpp "
                            f"--model-dir {M} --remove")
    # The spare build and model of mtime 3 stay (keep_previous 1); older ones go, newest first.
    assert json.loads(command.connector_arguments["_stdin"]) == [
        f"{B}/0c1e57098bba-aaaa0002", f"{B}/0c1e57098bba-aaaa0001", f"{M}/org--m/c2", f"{M}/org--m/c1"]
    assert fake.logged and fake.logged[0].startswith("retention: will remove ")


def test_nothing_to_remove_is_a_noop():
    live = unit("1111111111aa-aaaa0004", "org--m/c4")
    fake = FakeHost({"versions": BUILDS[3:] + MODELS[3:], "units": {}})
    assert run_op(fake, {"llama-main.service": live}) == []
    assert fake.noops == ["retention: nothing to remove (each kind keeps its 1 newest spare)"]


def test_the_helper_removes_version_folders_only_and_says_what_it_freed(tmp_path):
    install, models = tmp_path / "opt", tmp_path / "models"
    build = install / "builds" / "0c1e57098bba-aaaa0001"
    (build / "bin").mkdir(parents=True)
    (build / "bin" / "llama-server").write_bytes(b"x" * 2_000_000)
    (install / "builds" / "0c1e57098bba-aaaa0001.log").write_text("log")
    model = models / "org--m" / "c1"
    model.mkdir(parents=True)
    (model / "m.gguf").write_bytes(b"y" * 3_000_000)
    outside = tmp_path / "etc"
    outside.mkdir()
    helper = [sys.executable, str(REPO / "files" / "retention.py"), "--install-dir", str(install),
              "--model-dir", str(models)]
    listed = json.loads(subprocess.run(helper + ["--list"], capture_output=True, text=True,
                                       check=True).stdout)
    assert sorted((x["kind"], x["path"]) for x in listed["versions"]) == [
        ("build", str(build)), ("model", str(model))]
    result = subprocess.run(helper + ["--remove"], input=json.dumps([str(build), str(model), str(outside)]),
                            capture_output=True, text=True, check=True)
    assert f"retention: removed {build} (2 MB)" in result.stdout
    assert f"retention: removed {model} (3 MB)" in result.stdout
    assert f"retention: kept {outside}: not a version folder of the deploy's own folders" in result.stdout
    assert "retention: freed 5 MB" in result.stdout
    assert not build.exists() and not (install / "builds" / "0c1e57098bba-aaaa0001.log").exists()
    assert not (models / "org--m").exists() and outside.exists()


def test_stored_versions_run_the_installed_helper_and_send_its_source_only_when_it_is_not_there(tmp_path):
    """A rerun sends no helper source: the fact runs the host's helper when its digest is this
    llmhost's; otherwise it says so (None), and the operation reads it again from source."""
    install, models = tmp_path / "opt", tmp_path / "models"
    (install / "builds" / "0c1e57098bba-aaaa0001").mkdir(parents=True)
    models.mkdir()
    arguments = retention.stored_versions_arguments(str(install), str(models))
    command = StoredVersions().command(**arguments)
    assert "def " not in command and f"{retention.remote.HELPER_DIR}/retention.py" in command
    stale = {**arguments, "helper_sha256": "0" * 64}
    out = subprocess.run(["sh", "-c", StoredVersions().command(**stale)], capture_output=True, text=True,
                         check=True).stdout
    assert StoredVersions().process(out.splitlines()) is None
    out = subprocess.run(["sh", "-c", StoredVersions().command(**arguments, from_source=True)],
                         capture_output=True, text=True, check=True).stdout
    assert [x.kind for x in StoredVersions().process(out.splitlines())["versions"]] == ["build"]

    class Stale(FakeHost):
        def get_fact(self, cls, **kwargs):
            self.asked = [*getattr(self, "asked", []), kwargs.get("from_source", False)]
            return None if not kwargs.get("from_source") else self.stored

    fake = Stale({"versions": [], "units": {}})
    assert run_op(fake, {}) == [] and fake.asked == [False, True]

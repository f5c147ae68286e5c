"""Operations with facts in and commands out (a fake host answers the facts), and the facts'
commands run here on real files: the build's self-check, the unit's missing files, the key."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pyinfra.context import ctx_host

from llmhost import buildplan, llamacpp
from llmhost.facts import BuildState, KeyAccepted, UnitState
from llmhost.settings import load_host_settings


class FakeHost:
    def __init__(self, facts):
        self.facts, self.noops = facts, []

    def get_fact(self, cls, **kwargs):
        return self.facts[cls]

    def noop(self, text):
        self.noops.append(text)


def settings():
    return load_host_settings("h1", {"llm_services": {"t": {"port": 1, "model": {
        "source": "local", "path": "/m.gguf"}}}})


def build_commands(state):
    s = settings()
    build = buildplan.plan_build(s, ("-DGGML_CUDA=OFF",))
    fake = FakeHost({BuildState: state})
    with ctx_host.use(fake):
        commands = llamacpp.build._inner(
            source_dir=build.source_dir, build_dir=build.build_dir, commit=s.llamacpp_commit,
            cmake_flags=list(build.cmake_flags), expected_system_info=[], jobs=2,
            ccache_dir="/opt/llama.cpp/ccache")
        return [str(c) for c in commands], fake, build


def test_a_complete_build_is_a_noop():
    commands, fake, build = build_commands({"files": True, "changed": []})
    assert commands == [] and fake.noops == [f"llama.cpp build {os.path.basename(build.build_dir)} is complete"]


def test_a_build_with_a_replaced_binary_is_built_again_relinking_it():
    commands, fake, build = build_commands({"files": True, "changed": ["bin/llama-server"]})
    assert commands[0] == f"rm -f {build.build_dir}/.llmhost-build.json"
    assert commands[1].startswith("python3 /usr/local/lib/llmhost/build_llamacpp.py --src ")
    assert "--remove=bin/llama-server" in commands[1]


def test_a_complete_build_its_user_cannot_run_gets_its_modes_back_not_a_rebuild():
    commands, fake, build = build_commands({"files": True, "changed": [], "unreadable": [
        "/opt/llama.cpp/builds/x/bin", "/opt/llama.cpp/builds/x/bin/llama-server"]})
    assert commands == ["chmod 755 /opt/llama.cpp/builds/x/bin /opt/llama.cpp/builds/x/bin/llama-server"]
    assert fake.noops == []


def test_a_build_never_verified_is_built():
    commands, _, _ = build_commands(None)
    assert len(commands) == 1 and "--remove" not in commands[0]


def run_fact(fact, **kwargs) -> object:
    """The fact's command run here (sh), its output through the fact's parser."""
    command = fact().command(**kwargs)
    out = subprocess.run(["sh", "-c", command], capture_output=True, text=True, check=True).stdout
    return fact().process(out.splitlines())


def test_build_state_names_deleted_and_replaced_files(tmp_path):
    (tmp_path / "bin").mkdir()
    for name in ("llama-server", "llama-bench", "libggml.so"):
        (tmp_path / "bin" / name).write_bytes(b"x" * 10)
    record = {n: [10, os.stat(tmp_path / n).st_mtime_ns] for n in
              ("bin/llama-server", "bin/llama-bench", "bin/libggml.so")}
    (tmp_path / ".llmhost-build.json").write_text(json.dumps({"commit": "c", "files": record}))
    for path in (tmp_path, tmp_path / "bin", *(tmp_path / "bin").iterdir()):
        path.chmod(0o755)
    assert run_fact(BuildState, build_dir=str(tmp_path)) == {"files": True, "changed": [],
                                                            "unreadable": []}
    (tmp_path / "bin" / "llama-server").chmod(0o700)
    assert run_fact(BuildState, build_dir=str(tmp_path))["unreadable"] == [
        str(tmp_path / "bin" / "llama-server")]
    (tmp_path / "bin" / "llama-server").chmod(0o755)
    (tmp_path / "bin" / "llama-bench").unlink()
    (tmp_path / "bin" / "libggml.so").write_bytes(b"y" * 11)
    assert run_fact(BuildState, build_dir=str(tmp_path)) == {
        "files": True, "changed": ["bin/libggml.so", "bin/llama-bench"], "unreadable": []}
    assert run_fact(BuildState, build_dir=str(tmp_path / "none")) is None


def test_unit_state_names_what_the_units_command_lost(tmp_path, monkeypatch):
    unit = tmp_path / "llama-t.service"
    present = tmp_path / "model.gguf"
    present.write_text("m")
    unit.write_text(f"[Service]\nExecStart={tmp_path}/gone/llama-server --model {present} --port 1\n")
    script = UnitState._MISSING
    out = subprocess.run(["python3", "-c", script, str(unit)], capture_output=True, text=True).stdout
    assert out.splitlines() == [f"missing {tmp_path}/gone/llama-server"]


def test_key_accepted_asks_the_server_with_the_key_on_file(tmp_path):
    """Against a real HTTP server that accepts one key: the file's key is sent from the file
    (never on the command line), 401 means refused, no answer means unknown."""
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.headers.get("Authorization") == "Bearer right" else 401)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1/models"
    key = tmp_path / "t.key"
    try:
        key.write_text("right\n")
        command = KeyAccepted().command(url=url, key_file=str(key))
        assert "right" not in command
        assert run_fact(KeyAccepted, url=url, key_file=str(key)) is True
        key.write_text("wrong\n")
        assert run_fact(KeyAccepted, url=url, key_file=str(key)) is False
        assert run_fact(KeyAccepted, url=url, key_file=str(tmp_path / "none")) is None
    finally:
        server.shutdown()
        server.server_close()
    assert run_fact(KeyAccepted, url=url, key_file=str(key)) is None  # nothing answers


def test_build_packages_are_pyinfras_apt_commands_streamed():
    from pyinfra.facts.deb import DebPackages

    from llmhost import base
    from llmhost.remote import StreamedCommand

    fake = FakeHost({DebPackages: {"python3": ["3.11.2"]}})
    with ctx_host.use(fake):
        commands = list(base.build_packages._inner(packages=["cmake", "python3"]))
    assert all(isinstance(c, StreamedCommand) for c in commands)
    assert [str(c) for c in commands] == [
        "apt-get update",
        "DEBIAN_FRONTEND=noninteractive apt-get -y -o Dpkg::Options::=\"--force-confdef\" -o "
        "Dpkg::Options::=\"--force-confold\" install --no-install-recommends cmake"]


COMMIT = "0c1e57098bba43ac29e6e3b677cdceebdd22334f"
SRC = f"/opt/llama.cpp/src/{COMMIT}"


def source_commands(marker, **kwargs):
    from llmhost.facts import JsonFile

    fake = FakeHost({JsonFile: marker})
    with ctx_host.use(fake):
        return list(llamacpp.source._inner(source_dir=SRC, commit=COMMIT, **kwargs)), fake


def test_source_from_git_is_a_shallow_fetch_of_the_commit_moved_into_place():
    commands, _ = source_commands(None, git_url="git://127.0.0.1/llama.cpp")
    text = [str(c) for c in commands]
    assert text[0] == f"rm -rf {SRC}.partial && mkdir -p {SRC}.partial"
    assert f"fetch -q --depth 1 git://127.0.0.1/llama.cpp {COMMIT}" in text[1]
    assert f"rev-parse HEAD)\" = {COMMIT}" in text[1]
    assert text[2].endswith(f"rm -rf {SRC} && mv {SRC}.partial {SRC}")
    for command in text:
        assert subprocess.run(["sh", "-n", "-c", command]).returncode == 0


def test_source_from_the_controller_is_pushed_and_unpacked():
    from pyinfra.api import FileUploadCommand

    commands, _ = source_commands(None, tarball="/home/me/llama.cpp.tar.gz")
    upload = commands[1]
    assert isinstance(upload, FileUploadCommand)
    assert (upload.src, upload.dest) == ("/home/me/llama.cpp.tar.gz", f"{SRC}.tar.gz")
    assert str(commands[2]).startswith(f"tar -xzf {SRC}.tar.gz -C {SRC}.partial --strip-components=1")
    assert '"from": "local"' in str(commands[3])


def test_a_present_source_is_a_noop():
    commands, fake = source_commands({"commit": COMMIT}, git_url="https://github.com/ggml-org/llama.cpp")
    assert commands == [] and fake.noops == ["llama.cpp source 0c1e57098bba is present"]


def model_fact(size=None, mtime=None, record=None, access_ok=True):
    from llmhost.facts import ModelFile
    return {ModelFile: {"size": size, "mtime_ns": mtime, "record": record,
                        "access_ok": access_ok if size is not None else None}}


DEST = "/var/lib/llama-models/o--r/abc123abc123/m.gguf"


def test_a_verified_model_file_is_a_noop_and_a_rewritten_one_is_not():
    from llmhost import weights

    verified = model_fact(10, 5, {"sha256": "s" * 64, "mtime_ns": 5})
    fake = FakeHost(verified)
    with ctx_host.use(fake):
        assert list(weights.pushed_file._inner(src="/m.gguf", dest=DEST, sha256="s" * 64, size=10)) == []
    assert fake.noops == [f"{DEST} is in place and verified"]
    rewritten = FakeHost(model_fact(10, 6, {"sha256": "s" * 64, "mtime_ns": 5}))
    with ctx_host.use(rewritten):
        assert list(weights.pushed_file._inner(src="/m.gguf", dest=DEST, sha256="s" * 64, size=10))


def test_a_verified_model_file_the_service_cannot_open_gets_its_access_back_not_a_download():
    from llmhost import weights

    unreadable = model_fact(10, 5, {"sha256": "s" * 64, "mtime_ns": 5}, access_ok=False)
    for operation, kwargs in ((weights.pushed_file, {"src": "/m.gguf"}),
                              (weights.downloaded_file, {"url": "https://hub/m.gguf", "record": {},
                                                         "connections": 1})):
        fake = FakeHost(unreadable)
        with ctx_host.use(fake):
            commands = list(operation._inner(dest=DEST, sha256="s" * 64, size=10, **kwargs))
        assert commands == [weights.model_folder_command(DEST) + f" && chown root:root {DEST} && "
                                                                 f"chmod 644 {DEST}"]
        assert fake.noops == []


def test_the_model_file_fact_reads_owner_and_mode_of_the_file_and_its_folders(tmp_path):
    from llmhost.facts import ModelFile

    if os.geteuid() != 0:
        import pytest
        pytest.skip("needs root: the files must be root-owned")
    version = tmp_path / "o--r" / "abc"
    version.mkdir(parents=True)
    model = version / "m.gguf"
    model.write_bytes(b"x" * 10)
    for path, mode in ((model, 0o644), (version, 0o755), (version.parent, 0o755)):
        path.chmod(mode)
    assert run_fact(ModelFile, path=str(model))["access_ok"] is True
    model.chmod(0o600)
    assert run_fact(ModelFile, path=str(model))["access_ok"] is False
    model.chmod(0o644)
    version.parent.chmod(0o700)
    assert run_fact(ModelFile, path=str(model))["access_ok"] is False
    assert run_fact(ModelFile, path=str(tmp_path / "none.gguf"))["size"] is None


def test_a_pushed_file_is_staged_verified_and_moved_by_the_helper():
    from pyinfra.api import FileUploadCommand

    from llmhost import weights

    with ctx_host.use(FakeHost(model_fact())):
        mkdir, upload, place = weights.pushed_file._inner(src="/m.gguf", dest=DEST, sha256="s" * 64,
                                                          size=10)
    assert mkdir == ("mkdir -p /var/lib/llama-models/o--r/abc123abc123 && chown root:root "
                     "/var/lib/llama-models/o--r/abc123abc123 /var/lib/llama-models/o--r && chmod 755 "
                     "/var/lib/llama-models/o--r/abc123abc123 /var/lib/llama-models/o--r")
    assert isinstance(upload, FileUploadCommand) and upload.dest == DEST + ".partial"
    assert place.startswith(f"python3 /usr/local/lib/llmhost/place_model.py --staged {DEST}.partial "
                            f"--dest {DEST} --sha256 {'s' * 64} --size 10")


def test_a_download_sends_the_token_on_stdin_only(tmp_path, monkeypatch):
    from llmhost import weights

    token = tmp_path / "token"
    token.write_text("hf_secret_value\n")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with ctx_host.use(FakeHost(model_fact())):
        mkdir, fetch = weights.downloaded_file._inner(
            url="https://hub/o/r/resolve/abc/m.gguf", dest=DEST, sha256="s" * 64, size=10,
            record={"commit": "abc"}, connections=4, token_file=str(token))
    assert "hf_secret_value" not in str(fetch) and "--token-stdin" in str(fetch)
    assert fetch.connector_arguments["_stdin"] == "hf_secret_value\n"
    with ctx_host.use(FakeHost(model_fact())):
        _, anonymous = weights.downloaded_file._inner(
            url="https://hub/o/r/resolve/abc/m.gguf", dest=DEST, sha256="s" * 64, size=10,
            record={"commit": "abc"}, connections=4)
    assert "--token-stdin" not in str(anonymous) and "_stdin" not in anonymous.connector_arguments


def unit_state(sha=None, enabled=False, active=False, missing=()):
    return {"sha256": sha, "enabled": enabled, "active": active, "missing": list(missing)}


def gated(facts, **overrides):
    from types import SimpleNamespace

    from pyinfra.context import ctx_state

    from llmhost import services

    args = dict(unit="llama-main.service", unit_text="[Service]\nExecStart=/b/llama-server\n",
                health_url="http://127.0.0.1:18082/health",
                argv_options=["/b/llama-server", "--model", "--port"], timeout=300,
                service_name="main")
    args.update(overrides)
    fake = FakeHost(facts)
    fake.name, fake.logged = "gpu1", []
    fake.log_styled = lambda text, **kw: fake.logged.append(text)
    with ctx_host.use(fake), ctx_state.use(SimpleNamespace(is_executing=True)):
        return list(services.health_gated_unit._inner(**args)), fake


def test_an_unchanged_active_unit_is_a_noop_unless_asked_to_restart():
    import hashlib

    from llmhost.facts import ServerOptions, UnitState

    text = "[Service]\nExecStart=/b/llama-server\n"
    same = {UnitState: unit_state(hashlib.sha256(text.encode()).hexdigest(), True, True),
            ServerOptions: {"--model", "--port"}}
    commands, fake = gated(same)
    assert commands == [] and fake.noops == ["llama-main.service is up to date and active"]
    commands, _ = gated(same, restart_if=lambda: True)  # a repaired build under the same unit
    assert len(commands) == 1


def test_a_changed_unit_goes_to_the_switch_helper_with_its_gpus_on_stdin():
    from llmhost.facts import ServerOptions, UnitState

    (switch,), _ = gated({UnitState: unit_state(), ServerOptions: {"--model", "--port"}},
                         on_gpu=True, gpus=[1])
    assert str(switch) == "python3 /usr/local/lib/llmhost/switch_service.py"
    request = json.loads(switch.connector_arguments["_stdin"])
    assert request == {"unit": "llama-main.service", "text": "[Service]\nExecStart=/b/llama-server\n",
                       "health_url": "http://127.0.0.1:18082/health", "timeout": 300,
                       "replaces": [], "gpu": {"gpus": [1]}}
    (cpu,), _ = gated({UnitState: unit_state(), ServerOptions: {"--model", "--port"}})
    assert "gpu" not in json.loads(cpu.connector_arguments["_stdin"])


def test_an_option_the_build_does_not_list_fails_before_the_unit_changes():
    from pyinfra.api import FunctionCommand

    from llmhost.facts import ServerOptions, UnitState

    (fail,), _ = gated({UnitState: unit_state(), ServerOptions: {"--model"}})
    assert isinstance(fail, FunctionCommand)
    assert fail.args[0].startswith("host gpu1: llm_services.main: found --port, which /b/llama-server "
                                   "--help does not list")


def test_a_retired_unit_is_left_alone_and_a_live_one_is_retired():
    from llmhost import services
    from llmhost.facts import UnitState

    fake = FakeHost({UnitState: unit_state()})
    with ctx_host.use(fake):
        assert list(services.retired_units._inner(units=["llama-old.service"])) == []
    assert fake.noops == ["llama-old.service already retired"]
    with ctx_host.use(FakeHost({UnitState: unit_state("a" * 64, True, True)})):
        (retire,) = services.retired_units._inner(units=["llama-old.service"])
    assert json.loads(retire.connector_arguments["_stdin"]) == {"retire": ["llama-old.service"]}


def test_a_key_is_made_only_when_missing_and_its_mode_kept():
    from pyinfra.facts.files import File

    from llmhost import services

    path = "/etc/llama/keys/main.key"
    with ctx_host.use(FakeHost({File: None})):
        made = [str(c) for c in services.generated_key._inner(path=path, group="llama")]
    assert made[0].startswith("umask 077 && head -c 32 /dev/urandom") and made[0].endswith(f"mv {path}.tmp {path}")
    assert made[1] == f"chown root:llama {path} && chmod 640 {path}"
    loose = {"size": 64, "user": "root", "group": "llama", "mode": 644}
    with ctx_host.use(FakeHost({File: loose})):
        assert [str(c) for c in services.generated_key._inner(path=path, group="llama")] == [made[1]]
    good = FakeHost({File: {**loose, "mode": 640}})
    with ctx_host.use(good):
        assert list(services.generated_key._inner(path=path, group="llama")) == []
    assert good.noops == [f"API key {path} is present with root:llama 640"]


def test_a_failed_preflight_fails_the_host_with_every_problem():
    from llmhost import preflight

    (fail,) = preflight.preflight_failed._inner(problems=["host h: a: found x", "host h: b: found y"])
    assert fail.args[0] == "preflight failed, nothing was changed on this host:\nhost h: a: found x\nhost h: b: found y"


def test_account_reads_one_passwd_line_and_exits_0_without_one():
    """run_fact fails on a non-zero exit, as pyinfra fails the host on a fact that does."""
    import grp
    import pwd

    from llmhost.facts import Account

    me = pwd.getpwuid(os.getuid())
    assert run_fact(Account, user=me.pw_name) == {"home": me.pw_dir, "shell": me.pw_shell,
                                                  "group": grp.getgrgid(me.pw_gid).gr_name}
    assert run_fact(Account, user="nosuchuser") is None


def test_file_digests_reads_a_folder_in_one_command(tmp_path):
    from llmhost.facts import FileDigests

    (tmp_path / "a.py").write_text("print(1)\n")
    (tmp_path / "sub").mkdir()
    found = run_fact(FileDigests, path=str(tmp_path))
    digest, user, group, mode = found["a.py"]
    assert list(found) == ["a.py"] and len(digest) == 64 and mode == "644"
    assert run_fact(FileDigests, path=str(tmp_path / "none")) == {}


def test_helpers_upload_only_what_differs_and_remove_what_is_no_longer_shipped(tmp_path):
    import hashlib

    from pyinfra.api import FileUploadCommand

    from llmhost import base
    from llmhost.facts import FileDigests

    for name in ("a.py", "b.py"):
        (tmp_path / name).write_text(name)
    sources = {name: str(tmp_path / name) for name in ("a.py", "b.py")}
    same = (hashlib.sha256(b"a.py").hexdigest(), "root", "root", "755")
    fake = FakeHost({FileDigests: {"a.py": same, "bench_service.py": same}})
    with ctx_host.use(fake):
        commands = list(base.helper_files._inner(sources=sources, dest_dir="/usr/local/lib/llmhost"))
    assert isinstance(commands[0], FileUploadCommand) and commands[0].dest == "/usr/local/lib/llmhost/b.py"
    assert commands[1:] == ["chown root:root /usr/local/lib/llmhost/b.py && chmod 755 /usr/local/lib/llmhost/b.py",
                            "rm -f /usr/local/lib/llmhost/bench_service.py"]
    current = FakeHost({FileDigests: {"a.py": same, "b.py": (hashlib.sha256(b"b.py").hexdigest(),
                                                            "root", "root", "755")}})
    with ctx_host.use(current):
        assert list(base.helper_files._inner(sources=sources, dest_dir="/usr/local/lib/llmhost")) == []
    assert current.noops == ["2 helpers in /usr/local/lib/llmhost are up to date"]

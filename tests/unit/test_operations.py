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
        return [str(c) for c in llamacpp.build._inner(settings=s, build=build)], fake, build


def test_a_complete_build_is_a_noop():
    commands, fake, build = build_commands({"files": True, "changed": []})
    assert commands == [] and fake.noops == [f"llama.cpp build {os.path.basename(build.build_dir)} is complete"]


def test_a_build_with_a_replaced_binary_is_built_again_relinking_it():
    commands, fake, build = build_commands({"files": True, "changed": ["bin/llama-server"]})
    assert commands[0] == f"rm -f {build.build_dir}/.llmhost-build.json"
    assert commands[1].startswith("python3 /usr/local/lib/llmhost/build_llamacpp.py --src ")
    assert "--remove=bin/llama-server" in commands[1]


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
    assert run_fact(BuildState, build_dir=str(tmp_path)) == {"files": True, "changed": []}
    (tmp_path / "bin" / "llama-bench").unlink()
    (tmp_path / "bin" / "libggml.so").write_bytes(b"y" * 11)
    assert run_fact(BuildState, build_dir=str(tmp_path)) == {
        "files": True, "changed": ["bin/libggml.so", "bin/llama-bench"]}
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

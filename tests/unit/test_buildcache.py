"""Build once, ship everywhere (llmhost.buildcache, files/build_llamacpp.py --pack/--artefact):
what the key holds, the cache's entries, one host of a run waiting for another's build, and the
host helper receiving an artefact (verified as a build made there) or refusing it and building."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import gevent
import pytest
from pyinfra.api import FileUploadCommand, FunctionCommand
from pyinfra.context import ctx_host, ctx_state

from llmhost import buildcache, buildplan, llamacpp
from llmhost.facts import BuildHost, BuildState, JsonFile
from llmhost.settings import load_host_settings
from tests.unit.test_build_helper import FAKE_CMAKE

FILES = Path(__file__).resolve().parents[2] / "files"
sys.path.insert(0, str(FILES))
import build_llamacpp as helper  # noqa: E402

COMMIT = "0c1e57098bba43ac29e6e3b677cdceebdd22334f"
HOST = {"os": "debian 12", "libc": "glibc 2.36", "machine": "x86_64", "cpu": "f35b3b469fc1399e"}


def settings(**data):
    return load_host_settings("h1", {"llm_services": {"t": {"port": 1, "model": {
        "source": "local", "path": "/m.gguf"}}}, **data})


def inputs(**data):
    s = settings(**data)
    return buildcache.key_inputs(s, buildplan.plan_build(s, ("-DGGML_CUDA=OFF",)))


# ------------------------------------------------------------------------------------ the key

def test_the_key_changes_with_everything_that_makes_a_build_differ():
    base, _ = buildcache.key(inputs(), HOST)
    assert buildcache.key(inputs(), dict(HOST))[0] == base  # the same build, the same key
    changed = {
        "commit": buildcache.key(inputs(llm_llamacpp_commit="1" * 40), HOST)[0],
        "build number (a cmake flag)": buildcache.key(inputs(llm_llamacpp_build_number=1), HOST)[0],
        "cpu baseline": buildcache.key(inputs(llm_cpu_baseline="x86-64-v3"), HOST)[0],
        "install dir (the build folder)": buildcache.key(inputs(llm_install_dir="/srv/llama"), HOST)[0],
        "toolkit": buildcache.key({**inputs(), "cuda_toolkit": "12.8"}, HOST)[0],
        "cmake flags": buildcache.key({**inputs(), "cmake_flags": ["-DGGML_CUDA=ON"]}, HOST)[0],
        **{f"host {k}": buildcache.key(inputs(), {**HOST, k: "other"})[0] for k in HOST},
    }
    assert base not in changed.values(), [k for k, v in changed.items() if v == base]
    assert len(set(changed.values())) == len(changed)


def test_a_pinned_x86_level_is_not_keyed_by_the_cpu_model():
    """-march=native compiles for this CPU; x86-64-v3 for every CPU that runs v3."""
    pinned = inputs(llm_cpu_baseline="x86-64-v3")
    assert buildcache.key(pinned, HOST)[0] == buildcache.key(pinned, {**HOST, "cpu": "other"})[0]
    assert buildcache.key(pinned, HOST)[1]["cpu"] is None


def test_cuda_builds_are_keyed_by_archs_pairs_and_toolkit():
    from llmhost.gpu import Gpu, GpuFacts, Toolkit
    s = load_host_settings("g", {"llm_services": {"main": {"port": 1, "gpu_layers": 99, "model": {
        "source": "local", "path": "/m.gguf"}}}})
    facts = GpuFacts(gpus=(Gpu(0, "H200", "9.0", "580.1", 143771),),
                     toolkits=(Toolkit("/usr/local/cuda/bin/nvcc", "13.0.88"),))
    key_in = buildcache.key_inputs(s, buildplan.plan_for_host(s, facts))
    assert key_in["cuda_toolkit"] == "13.0.88"
    assert "-DCMAKE_CUDA_ARCHITECTURES=90" in key_in["cmake_flags"]
    assert any(f.startswith("-DGGML_CUDA_FA_QUANTS=") for f in key_in["cmake_flags"])


def test_the_build_host_fact_reads_os_libc_machine_and_cpu_here():
    out = subprocess.run(["sh", "-c", BuildHost().command()], capture_output=True, text=True,
                         check=True).stdout
    found = BuildHost().process(out.splitlines())
    assert set(found) == {"os", "libc", "machine", "cpu"}
    assert found["libc"].startswith("glibc ") and len(found["cpu"]) == 16, found


# ------------------------------------------------------------------------ the controller's cache

class Logged:
    name = "h2"

    def __init__(self):
        self.lines = []

    def log_styled(self, text, **kwargs):
        self.lines.append(text)


def fetched_pair(tmp_path, data: bytes, digest: str, sha256: str | None = None):
    tarball, record = tmp_path / "fetched.tar.gz", tmp_path / "fetched.json"
    tarball.write_bytes(data)
    record.write_text(json.dumps({"key": digest, "sha256": sha256 or hashlib.sha256(data).hexdigest(),
                                  "size": len(data)}))
    return str(tarball), str(record)


def test_store_keeps_a_copy_that_matches_what_the_host_packed_and_replaces_an_old_entry(tmp_path):
    cache = tmp_path / "cache"
    host = Logged()
    assert buildcache.store(None, host, str(cache), "k1", {"commit": "c"},
                            *fetched_pair(tmp_path, b"old", "k1"))
    assert buildcache.store(None, host, str(cache), "k1", {"commit": "c"},
                            *fetched_pair(tmp_path, b"new", "k1"))
    entry = buildcache.lookup(str(cache), "k1")
    assert Path(entry.tarball).read_bytes() == b"new" and entry.built_on == "h2"
    assert entry.sha256 == hashlib.sha256(b"new").hexdigest() and entry.size == 3
    assert json.loads((cache / "k1" / "artefact.json").read_text())["inputs"] == {"commit": "c"}
    assert sorted(p.name for p in cache.iterdir()) == ["k1"]  # no staging or fetched files left
    assert "kept in the controller's cache" in host.lines[-1]


def test_store_drops_a_copy_damaged_on_the_way(tmp_path):
    cache = tmp_path / "cache"
    host = Logged()
    assert buildcache.store(None, host, str(cache), "k1", {},
                            *fetched_pair(tmp_path, b"bytes", "k1", sha256="0" * 64))
    assert buildcache.lookup(str(cache), "k1") is None
    assert "not kept in the cache" in host.lines[-1]


def test_lookup_needs_both_the_record_and_the_artefact(tmp_path):
    (tmp_path / "k1").mkdir()
    (tmp_path / "k1" / "artefact.json").write_text(json.dumps({"sha256": "a", "size": 1}))
    assert buildcache.lookup(str(tmp_path), "k1") is None
    assert buildcache.lookup("", "k1") is None


def test_the_cache_setting_expands_home_and_false_turns_it_off():
    assert buildcache.cache_dir(settings()) == os.path.expanduser("~/.cache/llmhost/builds")
    assert buildcache.cache_dir(settings(llm_build_cache=False)) == ""
    assert buildcache.cache_dir(settings(llm_build_cache="/srv/builds")) == "/srv/builds"


# --------------------------------------------------------------- hosts of one run, one build

class RunHost:
    def __init__(self, name):
        self.name, self.executing_op_hash, self.current_op_hash = name, None, "op"
        self.lines = []

    def log_styled(self, text, **kwargs):
        self.lines.append(text)


class Meta:
    def __init__(self):
        self.done = False

    def is_complete(self):
        return self.done


class OpData:
    def __init__(self):
        self.operation_meta = Meta()


class RunState:
    def __init__(self, hosts):
        self.inventory = hosts
        self.active_hosts, self.failed_hosts = set(hosts), set()
        self.ops = {h: {"op": OpData()} for h in hosts}


def test_a_later_host_waits_for_the_earlier_build_and_stops_once_it_is_in_the_cache(tmp_path):
    first, second = RunHost("h1"), RunHost("h2")
    run = RunState([first, second])
    first.executing_op_hash = "op"
    with ctx_state.use(run):
        buildcache.announce(first, str(tmp_path), "k1")

        def build_then_store():
            gevent.sleep(1.0)
            (tmp_path / "k1").mkdir()
            (tmp_path / "k1" / "build.tar.gz").write_bytes(b"x")
            (tmp_path / "k1" / "artefact.json").write_text(json.dumps({"sha256": "s", "size": 1}))

        started = time.monotonic()
        builder = gevent.spawn(build_then_store)
        assert buildcache.wait_for_earlier(second, str(tmp_path), "k1") == "h1"
        builder.get()
    assert 0.9 < time.monotonic() - started < 3
    assert second.lines == ["waits for h1's build of k1 (same key: commit, flags, toolkit, OS, "
                            "C library, CPU), to receive it"]


def test_the_first_host_and_hosts_of_another_key_wait_for_nobody(tmp_path):
    first, second, third = RunHost("h1"), RunHost("h2"), RunHost("h3")
    run = RunState([first, second, third])
    first.executing_op_hash = second.executing_op_hash = "op"
    with ctx_state.use(run):
        assert buildcache.wait_for_earlier(first, str(tmp_path), "k1") is None
        buildcache.announce(first, str(tmp_path), "k1")
        buildcache.announce(second, str(tmp_path), "k2")
        # h3 has key k2: h1 builds another key, h2 is the one it waits for; h2 fails.
        gevent.spawn_later(0.6, run.failed_hosts.add, second)
        started = time.monotonic()
        assert buildcache.wait_for_earlier(third, str(tmp_path), "k2") == "h2"
    assert time.monotonic() - started < 3


def test_a_host_stops_waiting_when_the_earlier_build_ended_without_an_artefact(tmp_path):
    first, second = RunHost("h1"), RunHost("h2")
    run = RunState([first, second])
    first.executing_op_hash = "op"
    with ctx_state.use(run):
        gevent.spawn_later(0.6, setattr, run.ops[first]["op"].operation_meta, "done", True)
        assert buildcache.wait_for_earlier(second, str(tmp_path), "k1") == "h1"


# ----------------------------------------------------------------- the operation's commands

class OpHost:
    name = "h2"

    def __init__(self, facts):
        self.facts, self.noops = facts, []

    def get_fact(self, cls, **kwargs):
        return self.facts[cls]

    def noop(self, text):
        self.noops.append(text)


def op_commands(facts, cache: str):
    s = settings()
    build = buildplan.plan_build(s, ("-DGGML_CUDA=OFF",))
    with ctx_host.use(OpHost({BuildHost: HOST, **facts})):
        return list(llamacpp.build._inner(
            source_dir=build.source_dir, build_dir=build.build_dir, commit=s.llamacpp_commit,
            cmake_flags=list(build.cmake_flags), expected_system_info=[], jobs=2,
            ccache_dir="/opt/llama.cpp/ccache", cache=cache,
            key_inputs=buildcache.key_inputs(s, build))), build


def test_a_key_in_the_cache_is_pushed_and_given_to_the_helper_to_verify(tmp_path, monkeypatch):
    monkeypatch.setattr(buildcache, "executing", lambda: False)
    _, build = op_commands({BuildState: None, JsonFile: None}, "")
    digest, _ = buildcache.key(inputs(), HOST)
    (tmp_path / digest).mkdir()
    (tmp_path / digest / "build.tar.gz").write_bytes(b"x")
    (tmp_path / digest / "artefact.json").write_text(json.dumps({"sha256": "ab" * 32, "size": 1,
                                                                 "built_on": "h1"}))
    commands, build = op_commands({BuildState: None, JsonFile: {"received": {}}}, str(tmp_path))
    upload, helper_command = commands
    assert isinstance(upload, FileUploadCommand)
    assert (upload.src, upload.dest) == (str(tmp_path / digest / "build.tar.gz"),
                                         f"{build.build_dir}.artefact.tar.gz")
    text = str(helper_command)
    for arg in (f"--artefact={build.build_dir}.artefact.tar.gz", f"--artefact-sha256={'ab' * 32}",
                f"--artefact-key={digest}", "--artefact-from=h1", "--src "):
        assert arg in text, text


def test_a_build_made_here_goes_to_the_cache_and_one_received_does_not(tmp_path, monkeypatch):
    monkeypatch.setattr(buildcache, "executing", lambda: False)
    built, build = op_commands({BuildState: None, JsonFile: {"commit": COMMIT}}, str(tmp_path))
    assert "--artefact" not in str(built[0])
    assert "--pack=" in str(built[1]) and str(built[2]).startswith("FileDownloadCommand(")
    assert isinstance(built[-1], FunctionCommand) and built[-1].function is buildcache.store
    received, _ = op_commands({BuildState: None, JsonFile: {"received": {"key": "k"}}}, str(tmp_path))
    assert len(received) == 1
    no_cache, _ = op_commands({BuildState: None, JsonFile: {"commit": COMMIT}}, "")
    assert len(no_cache) == 1


# ------------------------------------------------------- the host helper: receive or refuse

def fake_cmake(tmp_path) -> Path:
    fake_bin = tmp_path / "fakebin"
    fake_bin.mkdir(exist_ok=True)
    (fake_bin / "cmake").write_text(FAKE_CMAKE)
    (fake_bin / "cmake").chmod(0o755)
    return fake_bin


def run(tmp_path, root: Path, *extra: str):
    """The helper as llamacpp.build runs it, on a 'host' whose files live under ``root``."""
    args = ["--src", str(root / "src"), "--build-dir", str(root / "builds" / "b"), "--commit",
            COMMIT, "--targets", "llama-server,llama-bench", "--jobs", "1",
            "--cmake-flag=-DGGML_CUDA=OFF", "--cpu-baseline=auto", "--cpu-candidate=native=-DGGML_NATIVE=ON",
            *extra]
    env = {**os.environ, "PATH": f"{fake_cmake(tmp_path)}:{os.environ['PATH']}", "FAULTS_ON": "none"}
    return subprocess.run([sys.executable, str(FILES / "build_llamacpp.py"), *args],
                          capture_output=True, text=True, env=env, timeout=120)


def packed(tmp_path) -> tuple[Path, dict]:
    """A build made on 'host1', packed as the deploy packs it."""
    host1 = tmp_path / "host1"
    assert run(tmp_path, host1).returncode == 0
    out = tmp_path / "artefact.tar.gz"
    result = subprocess.run([sys.executable, str(FILES / "build_llamacpp.py"), "--build-dir",
                             str(host1 / "builds" / "b"), f"--pack={out}", "--artefact-key=k1"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "build artefact k1: packed 2 files and 0 links" in result.stdout
    return out, json.loads(Path(f"{out}.json").read_text())


def receive(tmp_path, artefact: Path, sha256: str, key: str = "k1"):
    pushed = tmp_path / "host2" / "builds" / "b.artefact.tar.gz"
    pushed.parent.mkdir(parents=True, exist_ok=True)
    pushed.write_bytes(artefact.read_bytes())
    return run(tmp_path, tmp_path / "host2", f"--artefact={pushed}", f"--artefact-sha256={sha256}",
               f"--artefact-key={key}", "--artefact-from=host1"), pushed


def test_a_received_artefact_is_verified_as_a_build_made_here_and_nothing_is_compiled(tmp_path):
    artefact, sent = packed(tmp_path)
    (tmp_path / "host1" / "builds" / "cmake-calls").unlink()
    result, pushed = receive(tmp_path, artefact, sent["sha256"])
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "build artefact k1: received from the controller's cache (built on host1); verifying it" in out
    assert "CPU self-test: the native build computes on this CPU in " in out
    assert "build artefact k1 verified: the sha256 of its 2 files, the commit, system_info and the CPU self-test" in out
    assert "(received from host1, not built here)" in out
    assert not (tmp_path / "host2" / "builds" / "cmake-calls").exists(), "host2 compiled"
    build = tmp_path / "host2" / "builds" / "b"
    for name in ("llama-server", "llama-bench"):
        assert (build / "bin" / name).read_bytes() == (tmp_path / "host1" / "builds" / "b" / "bin" / name).read_bytes()
    marker = json.loads((build / helper.MARKER).read_text())
    assert marker["received"] == {"key": "k1", "sha256": sent["sha256"], "built_on": "host1"}
    assert marker["cpu"]["baseline"] == "native" and set(marker["files"]) == {"bin/llama-server", "bin/llama-bench"}
    # The self-test ran here, CPU only, on the model this host wrote (the stand-in llama-bench
    # logs its calls beside the build it was made in: host1's own self-test, then host2's).
    calls = (tmp_path / "host1" / "builds" / "b" / "bench-calls").read_text().splitlines()
    assert len(calls) == 2 and calls[1].startswith("CUDA_VISIBLE_DEVICES=[] -m ")
    assert f" -m {build}/" in calls[1] or f"-m {tmp_path}/host2/builds/b." in calls[1], calls[1]
    assert (build / helper.SELFTEST_MODEL).exists()
    assert not pushed.exists() and not list((tmp_path / "host2" / "builds").glob("*.gguf"))


def test_one_byte_changed_in_the_artefact_is_refused_and_the_host_builds(tmp_path):
    artefact, sent = packed(tmp_path)
    data = bytearray(artefact.read_bytes())
    data[len(data) // 2] ^= 0x01
    artefact.write_bytes(bytes(data))
    result, pushed = receive(tmp_path, artefact, sent["sha256"])
    assert result.returncode == 0, result.stdout
    found = hashlib.sha256(bytes(data)).hexdigest()
    assert (f"build artefact k1 refused: its sha256 is {found}, the cache recorded {sent['sha256']}; "
            f"building here instead") in result.stdout
    assert "configure: done" in result.stdout
    marker = json.loads((tmp_path / "host2" / "builds" / "b" / helper.MARKER).read_text())
    assert "received" not in marker and not pushed.exists()


def retarred(artefact: Path, change) -> bytes:
    """The artefact with ``change(name, data) -> data`` applied to its members, packed again (so
    its own sha256 is that of the new bytes: only the record inside can catch it)."""
    out = io.BytesIO()
    with tarfile.open(artefact) as src, tarfile.open(fileobj=out, mode="w:gz") as dst:
        for member in src.getmembers():
            data = change(member.name, src.extractfile(member).read())
            member.size = len(data)
            dst.addfile(member, io.BytesIO(data))
    return out.getvalue()


@pytest.mark.parametrize("what,change,reason", [
    ("a file that differs from its record",
     lambda name, data: data + b"# extra\n" if name == "bin/llama-server" else data,
     "bin/llama-server has sha256 "),
    ("another key's artefact",
     lambda name, data: data.replace(b'"key": "k1"', b'"key": "k2"') if name == "artefact.json" else data,
     "it is the artefact of key k2, not k1"),
])
def test_an_artefact_that_fails_a_check_here_is_refused_with_the_reason(tmp_path, what, change, reason):
    artefact, _ = packed(tmp_path)
    data = retarred(artefact, change)
    artefact.write_bytes(data)
    result, _ = receive(tmp_path, artefact, hashlib.sha256(data).hexdigest())
    assert result.returncode == 0, result.stdout
    assert "build artefact k1 refused: " + reason in result.stdout, (what, result.stdout)
    assert "configure: done" in result.stdout
    assert "received" not in json.loads((tmp_path / "host2" / "builds" / "b" / helper.MARKER).read_text())


def test_an_artefact_whose_code_faults_here_is_refused(tmp_path):
    """Packed from a build whose llama-bench dies of SIGILL (its record is right): the CPU
    self-test here refuses it."""
    host1 = tmp_path / "host1"
    assert run(tmp_path, host1).returncode == 0
    (host1 / "builds" / "b" / "bin" / "llama-bench").write_text("#!/bin/sh\nkill -ILL $$\n")
    out = tmp_path / "artefact.tar.gz"
    subprocess.run([sys.executable, str(FILES / "build_llamacpp.py"), "--build-dir",
                    str(host1 / "builds" / "b"), f"--pack={out}", "--artefact-key=k1"], check=True,
                   capture_output=True)
    result, _ = receive(tmp_path, out, json.loads(Path(f"{out}.json").read_text())["sha256"])
    assert ("build artefact k1 refused: its native CPU code faults on this CPU (SIGILL in the CPU "
            "self-test); building here instead") in result.stdout, result.stdout


def test_an_artefact_writing_outside_bin_is_refused(tmp_path):
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:gz") as tar:
        for name, content in (("artefact.json", json.dumps({"key": "k1", "files": {"../x": "0"}}).encode()),
                              ("../x", b"x")):
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    artefact = tmp_path / "evil.tar.gz"
    artefact.write_bytes(data.getvalue())
    result, _ = receive(tmp_path, artefact, hashlib.sha256(data.getvalue()).hexdigest())
    assert "build artefact k1 refused: it holds '../x', outside bin/" in result.stdout, result.stdout
    assert not (tmp_path / "host2" / "x").exists()

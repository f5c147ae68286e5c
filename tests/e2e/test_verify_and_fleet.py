"""The verify command and fleets, on sandbox hosts through the real CLIs.

(a) `python -m llmhost.verify` passes on a converged host, and names each problem on a host
    whose unit was stopped, whose model was byte-flipped, whose key file was made world-readable
    (one host, broken three ways, verified after each, repaired by redeploying);
(b) a Debian 13 (trixie) host converges, reruns with zero changes and passes verify;
(c) three hosts in one inventory, deployed in parallel: converge, zero-change rerun, verify;
    converge and no-op times for 1 and 3 hosts are recorded (benchmarks/RESULTS-fleet.md);
    with a build cache of their own, empty: the first host builds llama.cpp, the second and
    third receive its artefact and verify it; one byte changed in the cached artefact is refused
    by the host it is pushed to, which builds instead;
(d) one host unreachable among three: the other two converge and the output names it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import cache, deployment, sandbox
from tests.support.deployment import REPO, run_deploy, ssh
from tests.support.fake_hf import FakeHF

pytestmark = pytest.mark.e2e

REPO_ID = "llmhost-tests/gemma-3-270m-GGUF"
UNIT = "llama-translate.service"
KEY = "/etc/llama/keys/translate.key"


def timings_file() -> Path:
    """Where the converge/no-op figures go (one JSON line per measurement), for RESULTS-fleet.md."""
    return Path(os.environ.get("LLMHOST_FLEET_TIMES", cache.cache_dir() / "fleet-times.jsonl"))


def record(what: str, hosts: int, seconds: float, **extra) -> None:
    line = {"what": what, "hosts": hosts, "seconds": round(seconds, 1),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **extra}
    with open(timings_file(), "a") as f:
        f.write(json.dumps(line) + "\n")
    print(f"[timing] {what}, {hosts} host(s): {seconds:.1f}s")


def verify(inventory: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """The verify command as a user runs it, from the repository root."""
    return subprocess.run([sys.executable, "-m", "llmhost.verify", str(inventory), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)


def summary_of(result: subprocess.CompletedProcess) -> str:
    return result.stdout.split("== llmhost verify: per-host summary ==")[-1]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    missing = deployment.require_tools()
    if missing:
        pytest.fail(f"e2e needs {', '.join(missing)} (bash .ci/setup installs them)")
    repo, model = cache.llamacpp_repo(), cache.gemma_model()
    workdir = tmp_path_factory.mktemp("fleet")
    with deployment.git_daemon(repo) as git_url, FakeHF() as hub:
        hub.add_repo(REPO_ID, {cache.MODEL_NAME: model}, sha256={cache.MODEL_NAME: cache.MODEL_SHA256})

        def inventory(file: str, hosts: dict, **service_overrides) -> Path:
            """hosts: name -> SandboxHost (or (SandboxHost, extra data)); one translate service each."""
            entries = {}
            for name, value in hosts.items():
                host, extra = value if isinstance(value, tuple) else (value, {})
                service = deployment.service_settings(
                    extra.pop("port", None) or ports.setdefault(name, sandbox.free_port()), model,
                    model={"source": "hf", "repo": REPO_ID, "file": cache.MODEL_NAME},
                    **service_overrides)
                entries[name] = (host, {"llm_llamacpp_git_url": git_url,
                                        "llm_services": {"translate": service}, **extra})
            return deployment.write_inventory(workdir / file, entries)

        ports: dict[str, int] = {}
        yield {"inventory": inventory, "env": {"HF_ENDPOINT": hub.endpoint}, "hub": hub,
               "workdir": workdir, "ports": ports}


# ---------------------------------------------------------------------------------- (a) verify

@pytest.fixture(scope="module")
def one(site):
    """One converged host (its converge and no-op rerun are the 1-host figures)."""
    with deployment.booted("verify1") as host:
        inventory = site["inventory"]("one.py", {"verify1": host})
        first = run_deploy(inventory, env=site["env"])
        assert first.returncode == 0, first.output[-6000:]
        record("converge", 1, first.seconds)
        rerun = run_deploy(inventory, env=site["env"])
        assert rerun.returncode == 0 and rerun.changed_operations == [], rerun.changed_operations
        record("no-op rerun", 1, rerun.seconds)
        yield {"host": host, "inventory": inventory, "noop_seconds": rerun.seconds}


def test_verify_passes_on_a_converged_host(one):
    result = verify(one["inventory"])
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    summary = summary_of(result)
    assert "verify1: PASSED" in summary and "1 of 1 hosts passed" in summary, summary
    # GPU checks do not apply to this CPU host: skipped, with the reason printed.
    assert "skipped test_compiled_archs_cover_every_gpu: no service of this host uses the GPU" in summary, summary
    assert "0 failed" in summary


def flip_model_byte(host) -> str:
    path = json.loads(ssh(host, "cat /etc/llama/llmhost.json").stdout)["services"][0]["files"][0]["path"]
    ssh(host, f"python3 -c \"f=open('{path}','r+b'); f.seek(1<<20); b=f.read(1); f.seek(1<<20); "
              f"f.write(bytes([b[0]^0xff])); f.close()\"")
    return path


def stop_unit(host) -> None:
    ssh(host, f"systemctl stop {UNIT}")


def open_key(host) -> None:
    ssh(host, f"chmod 644 {KEY}")


BREAKS = {
    # name: (break it, what verify must say, repair needed before the redeploy)
    "unit stopped": (stop_unit, [f"FAILED test_unit_enabled_and_active: translate: {UNIT} is not active",
                                 "FAILED test_health_answers_200_without_a_key: translate:"], None),
    # The redeploy notices the rewritten file by its mtime (the record holds it) without
    # hashing it on every run, verifies it, and fetches it again.
    "model byte-flipped": (flip_model_byte,
                           ["FAILED test_model_files_match_their_sha256: translate: {path} has sha256"],
                           None),
    "key file world-readable": (open_key, [f"FAILED test_api_key_file_is_private_to_the_service_group: "
                                           f"translate: {KEY} is root:llama 0o644, expected root:llama 0o640"],
                                None),
}


@pytest.mark.parametrize("kind", list(BREAKS))
def test_verify_names_each_problem_then_a_redeploy_repairs_it(site, one, kind):
    host, inventory = one["host"], one["inventory"]
    breaker, expected, repair = BREAKS[kind]
    path = breaker(host)
    result = verify(inventory)
    assert result.returncode == 1, result.stdout[-6000:]
    summary = summary_of(result)
    assert "verify1: FAILED" in summary and "0 of 1 hosts passed; failed: verify1" in summary, summary
    for fragment in expected:
        assert fragment.format(path=path) in summary, summary

    if repair:
        repair(host, path)
    redeploy = run_deploy(inventory, env=site["env"])
    assert redeploy.returncode == 0, redeploy.output[-6000:]
    assert redeploy.changed_operations, f"the redeploy changed nothing after: {kind}"
    again = verify(inventory)
    assert again.returncode == 0, summary_of(again)


def test_verify_limit_and_unknown_limit(one):
    result = verify(one["inventory"], "--limit", "verify1", "--quiet")
    assert result.returncode == 0, result.stdout[-3000:]
    bad = verify(one["inventory"], "--limit", "nosuchhost")
    assert bad.returncode == 2
    assert "--limit nosuchhost: matches no host or group of the inventory; its hosts are: verify1" in bad.stderr


# ------------------------------------------------------------------------------- (b) trixie

def test_debian_13_host_converges_and_passes_verify(site):
    try:
        sandbox.base_tarball("trixie")
    except RuntimeError as error:
        pytest.xfail(f"debootstrap of trixie failed here: {str(error)[:500]}")
    with deployment.booted("trixie1", suite="trixie") as host:
        assert "13" in ssh(host, "cat /etc/debian_version").stdout or \
            "trixie" in ssh(host, "cat /etc/os-release").stdout
        inventory = site["inventory"]("trixie.py", {"trixie1": host})
        first = run_deploy(inventory, env=site["env"])
        assert first.returncode == 0, first.output[-6000:]
        record("converge (Debian 13, first build with its compiler)", 1, first.seconds)
        rerun = run_deploy(inventory, env=site["env"])
        assert rerun.returncode == 0 and rerun.changed_operations == [], rerun.changed_operations
        result = verify(inventory)
        assert result.returncode == 0, result.stdout[-6000:]
        assert "trixie1: PASSED" in summary_of(result)


# --------------------------------------------------------------------- (c, d) three hosts at once

@pytest.fixture(scope="module")
def fleet(site, one):
    names = ("fleet1", "fleet2", "fleet3")
    # Their own cache, empty: the session's already holds verify1's build of the same key.
    builds = site["workdir"] / "fleet-builds"
    with contextlib.ExitStack() as stack:
        hosts = {name: stack.enter_context(deployment.booted(name)) for name in names}
        inventory = site["inventory"]("fleet.py", {name: (host, {"llm_build_cache": str(builds)})
                                                   for name, host in hosts.items()})
        first = run_deploy(inventory, env=site["env"])
        assert first.returncode == 0, first.output[-8000:]
        record("converge", 3, first.seconds)
        yield {"hosts": hosts, "inventory": inventory, "first": first, "builds": builds}


def test_three_hosts_converge_in_parallel(fleet):
    for op in ("llama.cpp build", "Service llama-translate.service"):
        assert op in fleet["first"].changed_operations
    for name, host in fleet["hosts"].items():
        assert ssh(host, f"systemctl is-active {UNIT}").stdout.strip() == "active", name


def host_lines(output: str, name: str) -> str:
    return "\n".join(line for line in output.splitlines() if f"[{name}]" in line)


def test_one_host_builds_and_the_others_receive_its_build(fleet):
    """fleet1 builds and sends its artefact to the cache; fleet2 and fleet3 wait for it, receive
    it and verify it (sha256 of each file, the CPU self-test, --version, system_info)."""
    output = fleet["first"].output
    (entry,) = [p for p in fleet["builds"].iterdir() if not p.name.startswith(".")]
    digest = entry.name
    assert json.loads((entry / "artefact.json").read_text())["built_on"] == "fleet1"
    builder = host_lines(output, "fleet1")
    assert re.search(r"build \S+ verified: version: .*commit 0c1e5709\w*\)$", builder, re.M), builder[-3000:]
    assert f"build artefact {digest[:12]}: kept in the controller's cache" in builder, builder[-3000:]
    for name in ("fleet2", "fleet3"):
        lines = host_lines(output, name)
        assert f"build artefact {digest[:12]}: received from the controller's cache (built on fleet1)" \
            in lines, lines[-3000:]
        assert f"build artefact {digest[:12]} verified: the sha256 of its" in lines, lines[-3000:]
        assert "CPU self-test: the native build computes on this CPU" in lines, lines[-3000:]
        assert "(received from fleet1, not built here)" in lines, lines[-3000:]
        assert "configure: done" not in lines, f"{name} compiled llama.cpp: {lines[-3000:]}"
        marker = json.loads(ssh(fleet["hosts"][name], "cat /opt/llama.cpp/builds/*/.llmhost-build.json").stdout)
        assert marker["received"]["built_on"] == "fleet1" and marker["received"]["key"] == digest


def test_a_tampered_artefact_is_refused_and_the_host_builds(site, fleet):
    """One byte of the cached artefact changed: fleet3, whose build is gone, refuses it with the
    reason, builds llama.cpp itself, and its build replaces the cache's entry."""
    (entry,) = [p for p in fleet["builds"].iterdir() if not p.name.startswith(".")]
    tarball = entry / "build.tar.gz"
    data = bytearray(tarball.read_bytes())
    data[len(data) // 2] ^= 0x01
    tarball.write_bytes(bytes(data))
    host = fleet["hosts"]["fleet3"]
    ssh(host, "rm -rf /opt/llama.cpp/builds/*/")
    result = run_deploy(fleet["inventory"], "--limit", "fleet3", env=site["env"])
    assert result.returncode == 0, result.output[-6000:]
    lines = host_lines(result.output, "fleet3")
    assert re.search(rf"build artefact {entry.name[:12]} refused: its sha256 is [0-9a-f]{{64}}, the "
                     rf"cache recorded [0-9a-f]{{64}}; building here instead", lines), lines[-3000:]
    assert "configure: done" in lines and "(received from" not in lines, lines[-3000:]
    assert f"build artefact {entry.name[:12]}: kept in the controller's cache" in lines, lines[-3000:]
    assert json.loads((entry / "artefact.json").read_text())["built_on"] == "fleet3"
    marker = json.loads(ssh(host, "cat /opt/llama.cpp/builds/*/.llmhost-build.json").stdout)
    assert "received" not in marker
    assert ssh(host, f"systemctl is-active {UNIT}").stdout.strip() == "active"


def test_three_hosts_rerun_changes_nothing(site, one, fleet):
    rerun = run_deploy(fleet["inventory"], env=site["env"])
    assert rerun.returncode == 0, rerun.output[-4000:]
    assert rerun.changed_operations == [], (
        f"idempotence: these operations changed on the 3-host rerun: {rerun.changed_operations}")
    record("no-op rerun", 3, rerun.seconds, ratio_to_1_host=round(rerun.seconds / one["noop_seconds"], 2))


def test_verify_three_hosts_in_parallel(fleet):
    started = time.monotonic()
    result = verify(fleet["inventory"])
    record("verify", 3, time.monotonic() - started)
    assert result.returncode == 0, result.stdout[-8000:]
    summary = summary_of(result)
    assert "3 of 3 hosts passed" in summary, summary
    for name in fleet["hosts"]:
        assert f"{name}: PASSED" in summary
        assert f"===== {name} (ssh://" in result.stdout  # one grouped block per host


def test_unreachable_host_among_three(site, fleet):
    hosts = fleet["hosts"]
    down = hosts["fleet3"]
    down.exec("systemctl", "stop", "ssh.service", "ssh.socket", check=False)
    try:
        # A settings change, so "converge" means real work on the two reachable hosts.
        inventory = site["inventory"]("fleet-down.py", dict(hosts), parallel=4)
        result = run_deploy(inventory, env=site["env"])
        assert result.returncode != 0, result.output[-4000:]
        assert "fleet3" in result.output and "Could not connect" in result.output or \
            "fleet3" in result.output and "Connection refused" in result.output, result.output[-4000:]
        assert "Service llama-translate.service" in result.changed_operations, result.output[-4000:]
        for name in ("fleet1", "fleet2"):
            args = ssh(hosts[name], "cat /proc/$(systemctl show -p MainPID --value llama-translate)/cmdline "
                                    "| tr '\\0' ' '").stdout
            assert " -np 4 " in args or " --parallel 4 " in args, args
        # The verify command names the unreachable host too, and the two others pass.
        checked = verify(inventory)
        assert checked.returncode == 1
        summary = summary_of(checked)
        assert "fleet1: PASSED" in summary and "fleet2: PASSED" in summary, summary
        assert "fleet3: FAILED" in summary and "2 of 3 hosts passed; failed: fleet3" in summary, summary
    finally:
        down.exec("systemctl", "start", "ssh.service", check=False)

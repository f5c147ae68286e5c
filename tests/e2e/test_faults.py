"""Faults the deploy survives, on one converged sandbox host:

- the llama-server process killed: systemd brings it back, the host suite passes;
- the disk nearly full before a download: a clear preflight failure, nothing partial left;
- the deploy (the pyinfra process, SIGKILL) killed mid-download, mid-build and mid-unit-switch,
  then rerun to convergence (and a zero-change run after it), with the old service answering
  /health throughout, polled from the controller (the sandbox shares 127.0.0.1): the only
  outage allowed is the restart of the switch itself;
- the switch helper killed on the host mid-switch, then a switch that fails: the rollback returns
  to the unit that last passed the health gate.

One host for the module: each test starts from what the tests before left, and first deploys
the state it relies on where that is more than the converged host (a no-op in the module's run).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.support import cache, deployment, sandbox
from tests.support.health import HealthPoller
from tests.support.deployment import REPO, DeployResult, run_deploy, ssh
from tests.support.fake_hf import FakeHF

pytestmark = pytest.mark.e2e

REPO_ID = "llmhost-tests/gemma-3-270m-GGUF"
COPY_ID = "llmhost-tests/gemma-3-270m-copy-GGUF"  # same bytes, another repo: a new model folder
UNIT = "llama-translate.service"
MODEL_DIR = "/var/lib/llama-models"
# The restart of a unit switch: the old server stops, the new one loads a 250 MB model on 2 cores.
MAX_OUTAGE = 60


def deploy_killed_when(inventory: Path, pattern: str, env: dict, timeout: float = 900) -> tuple[str, float]:
    """Run the real CLI and SIGKILL it as soon as a line of its output matches ``pattern``.
    Returns the output up to the kill and the monotonic time of the kill."""
    cmd = [sys.executable, "-m", "pyinfra", str(inventory), "deploy.py", "-y"]
    process = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
                               start_new_session=True)
    timer = threading.Timer(timeout, lambda: process.kill())
    timer.start()
    lines, killed_at = [], None
    try:
        for line in process.stdout:
            lines.append(line)
            if killed_at is None and re.search(pattern, line):
                process.send_signal(signal.SIGKILL)  # this pyinfra process only, by its PID
                killed_at = time.monotonic()
                break
    finally:
        timer.cancel()
        if process.poll() is None and killed_at is None:
            process.kill()
        process.wait(timeout=30)
        process.stdout.close()
    output = "".join(lines)
    assert killed_at is not None, f"{pattern!r} never appeared; the deploy ended:\n{output[-4000:]}"
    return output, killed_at


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    missing = deployment.require_tools()
    if missing:
        pytest.fail(f"e2e needs {', '.join(missing)} (bash .ci/setup installs them)")
    repo, model = cache.llamacpp_repo(), cache.gemma_model()
    workdir = tmp_path_factory.mktemp("faults")
    with deployment.booted("faults1") as host, deployment.git_daemon(repo) as git_url, FakeHF() as hub:
        for repo_id in (REPO_ID, COPY_ID):
            hub.add_repo(repo_id, {cache.MODEL_NAME: model}, sha256={cache.MODEL_NAME: cache.MODEL_SHA256})
        port = sandbox.free_port()
        current = {"repo": REPO_ID, "host": {}, "service": {}}

        def inventory(name: str = "inventory.py", **changes) -> Path:
            """The host's inventory with the changes so far plus ``changes`` (kept for later)."""
            for key, value in changes.items():
                (current["host"] if key.startswith("llm_") else current["service"])[key] = value
            service = deployment.service_settings(
                port, model, model={"source": "hf", "repo": current.pop("next_repo", None) or current["repo"],
                                    "file": cache.MODEL_NAME}, **current["service"])
            current["repo"] = service["model"]["repo"]
            return deployment.write_inventory(workdir / name, {"faults1": (host, {
                "llm_llamacpp_git_url": git_url, "llm_services": {"translate": service},
                **current["host"]})})

        env = {"HF_ENDPOINT": hub.endpoint}
        first = run_deploy(inventory(), env=env)
        assert first.returncode == 0, first.output[-6000:]
        yield {"host": host, "hub": hub, "port": port, "env": env, "inventory": inventory,
               "current": current, "workdir": workdir}


def state_listing(host) -> set[str]:
    """Every file a deploy could write, by path, size and mtime (not the ccache: it is shared
    with the other sandbox hosts of the machine, which may be building)."""
    return set(ssh(host, "find /etc /opt /usr/local /var/lib/llama-models /var/lib/llmhost -xdev "
                         "-path /opt/llama.cpp/ccache -prune -o \\( -type f -o -type l \\) "
                         "-printf '%p %s %T@\\n' 2>/dev/null").stdout.splitlines())


def host_suite(host) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "tests/host", "-q", "-rs", "-p", "no:cacheprovider",
         f"--hosts={host.testinfra_url}", f"--ssh-config={host.ssh_config}"],
        cwd=REPO, capture_output=True, text=True, timeout=600)


def main_pid(host) -> str:
    return ssh(host, f"systemctl show -p MainPID --value {UNIT}").stdout.strip()


def converge_after_kill(site, inventory: Path, poller: HealthPoller, killed_output: str,
                        killed_at: float) -> DeployResult:
    """The rerun converges, a third run changes nothing, the service answered while the killed
    run and everything before the rerun's switch ran, and at most the switch's restart was lost."""
    rerun = run_deploy(inventory, env=site["env"])
    settled = run_deploy(inventory, env=site["env"])
    time.sleep(1)
    poller.stop()
    assert rerun.returncode == 0, rerun.output[-6000:]
    assert settled.returncode == 0 and settled.changed_operations == [], (
        f"not converged: the run after the rerun changed {settled.changed_operations}")
    during_kill = poller.outages(until=killed_at + 1)
    assert during_kill == [], f"the old service stopped answering during the killed deploy: {during_kill}"
    windows = poller.outages()
    assert len(windows) <= 1 and all(seconds < MAX_OUTAGE for _, seconds in windows), (
        f"outages (start, seconds): {windows}; expected at most the switch's restart")
    assert poller.samples and poller.samples[-1][1], "the service is not answering at the end"
    return rerun


def test_killed_llama_server_is_restarted_by_systemd(site):
    host = site["host"]
    before = main_pid(host)
    ssh(host, f"kill -9 {before}")
    deadline = time.monotonic() + 90
    healthy = False
    while time.monotonic() < deadline:
        pid = main_pid(host)
        if pid not in ("", "0", before):
            with_health = subprocess.run(["curl", "-fsS", "-m", "2",
                                          f"http://127.0.0.1:{site['port']}/health"],
                                         capture_output=True, text=True)
            if with_health.returncode == 0:
                healthy = True
                break
        time.sleep(1)
    assert healthy, f"{UNIT} did not come back healthy within 90 s (MainPID {main_pid(host)})"
    assert int(ssh(host, f"systemctl show -p NRestarts --value {UNIT}").stdout.strip()) >= 1
    suite = host_suite(host)
    assert suite.returncode == 0, suite.stdout[-5000:]


def test_disk_nearly_full_fails_preflight_and_leaves_nothing(site):
    """A 64 MiB tmpfs mounted at the model folder inside the host: the deploy must fetch the
    model there (about 250 MB) and must stop in the preflight, before any byte is written."""
    host = site["host"]
    before = state_listing(host)
    host.exec("mount", "-t", "tmpfs", "-o", "size=64m,mode=755", "llmhost-test-full", MODEL_DIR)
    try:
        result = run_deploy(site["inventory"]("full.py"), env=site["env"])
        left = ssh(host, f"find {MODEL_DIR} -mindepth 1").stdout.strip()
    finally:
        host.exec("umount", MODEL_DIR)
    partial = ssh(host, f"find /opt/llama.cpp/builds {MODEL_DIR} -maxdepth 3 -name '*.partial*'").stdout.strip()
    assert result.returncode != 0
    assert "preflight failed, nothing was changed on this host" in result.output, result.output[-4000:]
    assert re.search(rf"host faults1: free disk on {MODEL_DIR}: found [\d.]+ \w+, expected at least",
                     result.output), result.output[-4000:]
    assert "fetch " not in result.output, "a download started"
    assert left == "", f"left in the full model folder: {left}"
    assert partial == "", f"partial files left: {partial}"
    after = state_listing(host)
    assert after == before, f"changed: {sorted(after ^ before)}"
    assert subprocess.run(["curl", "-fsS", "-m", "5", f"http://127.0.0.1:{site['port']}/health"],
                          capture_output=True).returncode == 0


def test_deploy_killed_mid_download_then_converges(site):
    host, hub = site["host"], site["hub"]
    site["current"]["next_repo"] = COPY_ID
    inventory = site["inventory"]("download.py")
    hub.faults.rate_limit = 1 << 20  # 1 MiB/s per connection: ~30 s for the model
    poller = HealthPoller(site["port"])
    poller.start()
    try:
        output, killed_at = deploy_killed_when(inventory, rf"fetch {re.escape(cache.MODEL_NAME)}: .*%",
                                               site["env"])
    finally:
        hub.faults.reset()
    # The killed run left a partial download (resumable), not a file in place.
    folder = f"{MODEL_DIR}/{COPY_ID.replace('/', '--')}"
    listing = ssh(host, f"ls -la {folder}/*/ 2>&1").stdout
    assert "unit written" not in output, "the killed run reached the unit switch"
    assert ".partial" in listing, listing
    rerun = converge_after_kill(site, inventory, poller, output, killed_at)
    # The rerun went on from what the killed one had fetched, and put the file in place.
    assert "resuming: " in rerun.output, rerun.output[-4000:]
    assert any(op.startswith("Model file") for op in rerun.changed_operations), rerun.changed_operations
    assert f"{folder}/" in ssh(host, "cat /etc/llama/llmhost.json").stdout
    suite = host_suite(host)
    assert suite.returncode == 0, suite.stdout[-5000:]


def test_deploy_killed_mid_build_then_converges(site):
    """A changed LLAMA_BUILD_NUMBER changes the build key: a new build beside the serving one."""
    host = site["host"]
    assert '"-DLLAMA_BUILD_NUMBER=11312"' in ssh(host, "cat /etc/llama/llmhost.json").stdout
    inventory = site["inventory"]("build.py", llm_llamacpp_build_number=11313)
    poller = HealthPoller(site["port"])
    poller.start()
    # "configure: done" is printed once cmake has finished and right before ninja starts.
    output, killed_at = deploy_killed_when(inventory, r"configure: done", site["env"])
    builds_during = ssh(host, "ls /opt/llama.cpp/builds").stdout.split()
    # Killed mid-build: the new build folder exists and has no marker (it is not usable yet).
    complete = ssh(host, "ls /opt/llama.cpp/builds/*/.llmhost-build.json").stdout.split()
    assert len(complete) == 1, f"the build had already finished when the deploy was killed: {complete}"
    rerun = converge_after_kill(site, inventory, poller, output, killed_at)
    assert "llama.cpp build" in rerun.changed_operations, rerun.changed_operations
    version = ssh(host, "$(python3 -c \"import json;print(json.load(open('/etc/llama/llmhost.json'))"
                        "['llama_cpp']['server'])\") --version 2>&1").stdout
    assert "11313" in version, version
    assert len(builds_during) >= 2, builds_during
    suite = host_suite(host)
    assert suite.returncode == 0, suite.stdout[-5000:]


def test_deploy_killed_mid_unit_switch_then_converges(site):
    host = site["host"]
    inventory = site["inventory"]("switch.py", parallel=4)
    poller = HealthPoller(site["port"])
    poller.start()
    output, killed_at = deploy_killed_when(inventory, rf"{re.escape(UNIT)}: unit written, restarting",
                                           site["env"])
    rerun = run_deploy(inventory, env=site["env"])
    settled = run_deploy(inventory, env=site["env"])
    time.sleep(1)
    poller.stop()
    assert rerun.returncode == 0, rerun.output[-6000:]
    assert settled.returncode == 0 and settled.changed_operations == [], settled.changed_operations
    # The switch itself restarts the service: one outage at the kill (the killed switch's
    # restart), at most one more if the rerun switched again; both short; answering at the end.
    windows = poller.outages()
    assert len(windows) <= 2 and all(seconds < MAX_OUTAGE for _, seconds in windows), windows
    assert poller.outages(until=killed_at - 5) == [], "an outage before the switch began"
    assert poller.samples[-1][1], "the service is not answering at the end"
    args = ssh(host, f"tr '\\0' ' ' < /proc/{main_pid(host)}/cmdline").stdout
    assert re.search(r"(-np|--parallel) 4\b", args), args
    suite = host_suite(host)
    assert suite.returncode == 0, suite.stdout[-5000:]


def test_failed_switch_after_an_interrupted_one_returns_to_the_last_healthy_unit(site):
    """A switch helper killed on the host after it restarted the new unit (a reboot, the OOM
    killer) leaves that unit live without its health gate passed, and its `.switching` marker.
    When the next switch fails, the rollback must return to the unit that last passed the gate.

    A killed pyinfra does not make this state (the helper on the host runs on and finishes), and
    killing the helper by hand races the server's ~1.5 s start, so the test leaves on the host
    exactly what the helper has written at that point: the saved previous unit, the marker, and
    the new unit written and restarted."""
    host, units = site["host"], "/var/lib/llmhost/units"
    # The healthy unit to return to runs --parallel 4 (the mid-switch test's inventory: no-op after it).
    ensured = run_deploy(site["inventory"]("switch.py", parallel=4), env=site["env"])
    assert ensured.returncode == 0, ensured.output[-4000:]
    healthy_unit = ssh(host, f"cat /etc/systemd/system/{UNIT}").stdout
    assert "--parallel 4 " in healthy_unit
    ssh(host, f"cp /etc/systemd/system/{UNIT} {units}/{UNIT}.previous && touch {units}/{UNIT}.switching "
              f"&& sed -i 's/--parallel 4 /--parallel 1 /' /etc/systemd/system/{UNIT} "
              f"&& systemctl daemon-reload && systemctl restart {UNIT}")
    # --lora is a flag the binary lists (so the unit is written), and a missing adapter stops
    # the server while it starts: the new unit cannot become healthy.
    failing = run_deploy(site["inventory"]("failing.py", extra_args=["--lora", "/nonexistent/adapter.gguf"]),
                         env=site["env"], timeout=900)
    assert failing.returncode != 0
    assert "ROLLED BACK to the previous unit, which is healthy" in failing.output, failing.output[-4000:]
    assert ssh(host, f"cat /etc/systemd/system/{UNIT}").stdout == healthy_unit
    assert ssh(host, f"test -e {units}/{UNIT}.switching || echo none").stdout.strip() == "none"
    back = run_deploy(site["inventory"]("back.py", extra_args=[]), env=site["env"])
    assert back.returncode == 0 and back.changed_operations == [], back.changed_operations
    assert host_suite(host).returncode == 0

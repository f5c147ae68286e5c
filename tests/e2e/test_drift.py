"""Drift on a converged sandbox host, the way hands cause it: the unit edited (an extra flag,
service restarted), the build's llama-server replaced under the running service, the generated
API key file deleted, and the model file made unreadable. `python -m llmhost.verify` names each
while the service still answers; the next deploy repairs all of it behind the health gate (one
restart: the model's mode comes back before it, or the new process could not open it), verify
passes, and the key on disk is the one the server accepts (the old one gets 401)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.support import cache, deployment, sandbox
from tests.support.deployment import REPO, run_deploy, ssh
from tests.support.health import HealthPoller

pytestmark = pytest.mark.e2e

UNIT = "/etc/systemd/system/llama-translate.service"
KEY = "/etc/llama/keys/translate.key"
# The outage a switch costs: the server stops, the new one loads the model on 2 cores.
MAX_OUTAGE = 60


def verify(inventory) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmhost.verify", str(inventory)], cwd=REPO,
                          capture_output=True, text=True, timeout=900)


def status_with_key(host, port: int, key: str) -> int:
    out = ssh(host, f"python3 -c \"import sys,urllib.request,urllib.error\ntry: print(urllib.request.urlopen("
                    f"urllib.request.Request('http://127.0.0.1:{port}/v1/models', headers={{'Authorization': "
                    f"'Bearer ' + sys.stdin.read().strip()}})).status)\nexcept urllib.error.HTTPError as e: "
                    f"print(e.code)\" <<'EOF'\n{key}\nEOF").stdout
    return int(out.strip())


@pytest.fixture(scope="module")
def drifted(tmp_path_factory):
    missing = deployment.require_tools()
    if missing:
        pytest.fail(f"e2e needs {', '.join(missing)} (bash .ci/setup installs them)")
    repo, model = cache.llamacpp_repo(), cache.gemma_model()
    workdir = tmp_path_factory.mktemp("drift")
    with deployment.booted("drift") as host, deployment.git_daemon(repo) as git_url:
        port = sandbox.free_port()
        inventory = deployment.write_inventory(workdir / "inventory.py", {"drift": (host, {
            "llm_llamacpp_git_url": git_url,
            "llm_services": {"translate": deployment.service_settings(port, model)}})})
        first = run_deploy(inventory)
        assert first.returncode == 0, first.output[-6000:]
        build = ssh(host, "ls -d /opt/llama.cpp/builds/*/").stdout.strip().rstrip("/")
        old_key = ssh(host, f"cat {KEY}").stdout.strip()
        # 1. The unit edited by hand: an extra flag, the service restarted on it.
        ssh(host, f"sed -i 's|^ExecStart=.*|& --top-k 5|' {UNIT} && systemctl daemon-reload "
                  f"&& systemctl restart llama-translate")
        HealthPoller(port).wait_ok(120)
        # 2. The build's llama-server replaced under the running service (another binary, new inode).
        ssh(host, f"cp {build}/bin/llama-bench {build}/bin/llama-server.new && "
                  f"mv {build}/bin/llama-server.new {build}/bin/llama-server")
        # 3. The generated key file deleted.
        ssh(host, f"rm {KEY}")
        # 4. The model file made unreadable under the running server (it has it mapped).
        model_path = ssh(host, "ls /var/lib/llama-models/local-*/*.gguf").stdout.strip()
        ssh(host, f"chmod 000 {model_path}")
        yield {"host": host, "port": port, "inventory": inventory, "build": build,
               "old_key": old_key, "model_path": model_path, "verify": verify(inventory)}


def test_verify_names_each_drift_while_the_service_still_answers(drifted):
    result = drifted["verify"]
    summary = result.stdout.split("== llmhost verify: per-host summary ==")[-1]
    assert result.returncode == 1, summary
    assert f"{UNIT} differs from the unit the deploy wrote" in summary
    assert "runs another command: extra ['--top-k', '5']" in summary
    assert f"{drifted['build']}: bin/llama-server deleted or replaced since the build was verified" in summary
    assert f"runs a binary that is not {drifted['build']}/bin/llama-server on disk" in summary
    assert f"{KEY}" in summary  # the key file's checks name it
    assert (f"user llama cannot open what the service needs: {drifted['model_path']}: "
            f"Permission denied") in summary
    assert HealthPoller(drifted["port"]).wait_ok(5), "the drifted service stopped answering"


def test_the_next_deploy_repairs_it_behind_the_health_gate(drifted):
    host, port = drifted["host"], drifted["port"]
    poller = HealthPoller(port)
    poller.start()
    repair = run_deploy(drifted["inventory"])
    time.sleep(1)
    poller.stop()
    assert repair.returncode == 0, repair.output[-6000:]
    changed = repair.changed_operations
    assert {"llama.cpp build", "API key of translate", "Service llama-translate.service",
            f"Model file {drifted['model_path']}"} <= set(changed), changed
    mode = ssh(host, f"stat -c '%U:%G %a' {drifted['model_path']}").stdout.strip()
    assert mode == "root:root 644", mode
    assert "bin/llama-server was deleted or replaced since the build was verified" in repair.output
    windows = poller.outages()  # the switch's restart, and no other
    assert len(windows) <= 1 and all(seconds < MAX_OUTAGE for _, seconds in windows), windows
    result = verify(drifted["inventory"])
    assert result.returncode == 0, result.stdout[-6000:]
    new_key = ssh(host, f"cat {KEY}").stdout.strip()
    assert new_key and new_key != drifted["old_key"]
    assert status_with_key(host, port, new_key) == 200
    assert status_with_key(host, port, drifted["old_key"]) == 401
    rerun = run_deploy(drifted["inventory"])
    assert rerun.returncode == 0 and rerun.changed_operations == [], rerun.changed_operations

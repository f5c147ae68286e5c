"""A fresh Debian host becomes a serving llama.cpp CPU host through the real `pyinfra ...
deploy.py`; the second run changes nothing; the host suite passes on it (Molecule's create,
converge, idempotence, verify, destroy)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support import cache, deployment, sandbox
from tests.support.deployment import REPO, run_deploy, ssh

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def converged(tmp_path_factory):
    """One sandbox host, deployed once from git at the pinned commit."""
    missing = deployment.require_tools()
    if missing:
        pytest.fail(f"e2e needs {', '.join(missing)} (bash .ci/setup installs them)")
    repo, model = cache.llamacpp_repo(), cache.gemma_model()
    workdir = tmp_path_factory.mktemp("skeleton")
    with sandbox.booted_host("skeleton", binds=deployment.shared_cache_binds()) as host, \
            deployment.git_daemon(repo) as git_url:
        port = sandbox.free_port()
        inventory = deployment.write_inventory(workdir / "inventory.py", {
            "skeleton": (host, {"llm_llamacpp_git_url": git_url,
                                "llm_services": {"translate": deployment.service_settings(port, model)}}),
        })
        first = run_deploy(inventory)
        assert first.returncode == 0, first.output[-8000:]
        yield {"host": host, "inventory": inventory, "first": first, "port": port, "model": model}


def test_first_run_converges(converged):
    first = converged["first"]
    assert "llama.cpp build" in first.changed_operations
    assert "Service llama-translate.service" in first.changed_operations


def test_second_run_changes_nothing(converged):
    second = run_deploy(converged["inventory"])
    assert second.returncode == 0, second.output[-4000:]
    assert second.changed_operations == [], (
        f"idempotence: these operations changed on the second run: {second.changed_operations}\n"
        + second.output[-4000:])
    converged["noop_seconds"] = second.seconds


def test_host_suite_passes(converged):
    host = converged["host"]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/host", "-q", "-rs", "-p", "no:cacheprovider",
         f"--hosts={host.testinfra_url}", f"--ssh-config={host.ssh_config}"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    # The one skip allowed here is the effective memlock check, with its reason printed.
    assert "passed" in result.stdout and " failed" not in result.stdout


def test_served_answer_from_the_pinned_commit(converged):
    host, port = converged["host"], converged["port"]
    key = ssh(host, "cat /etc/llama/keys/translate.key").stdout.strip()
    body = json.dumps({"prompt": "The capital of France is", "n_predict": 16, "temperature": 0})
    answer = ssh(host, f"python3 -c \"import sys,urllib.request; r=urllib.request.urlopen("
                       f"urllib.request.Request('http://127.0.0.1:{port}/completion', data=sys.stdin.buffer.read(), "
                       f"headers={{'Authorization': 'Bearer ' + open('/etc/llama/keys/translate.key').read().strip()}})); "
                       f"print(r.read().decode())\" <<'EOF'\n{body}\nEOF").stdout
    content = json.loads(answer)["content"]
    # A base model: it continues the sentence (NOTES.md: "... the capital of France. It is ...").
    assert "France" in content or "Paris" in content, content
    version = ssh(host, "/opt/llama.cpp/builds/*/bin/llama-server --version 2>&1").stdout
    assert "0c1e5709" in version, version
    assert key not in converged["first"].output

"""Weights through the deploy, against a fake Hugging Face with faults, on a sandbox host:
an interrupted download resumes, a corrupted byte is caught, a server that ignores Range still
ends verified, 5xx are retried then reported. Each test publishes the model under a new repo
name, so each deploy has a new model version to fetch."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.support import cache, deployment, sandbox
from tests.support.deployment import REPO, ssh
from tests.support.fake_hf import FakeHF

pytestmark = pytest.mark.e2e
CHUNK = 64 << 20  # fetch_model.py's default chunk


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    repo, model = cache.llamacpp_repo(), cache.gemma_model()
    workdir = tmp_path_factory.mktemp("weights")
    with deployment.booted("weights") as host, deployment.git_daemon(repo) as git_url, FakeHF() as hub:
        port = sandbox.free_port()

        def inventory(repo_id: str, mirror: bool = False):
            hf_model = {"source": "hf", "repo": repo_id, "file": cache.MODEL_NAME}
            if mirror:  # the endpoint in the settings instead of HF_ENDPOINT
                hf_model.update(source="mirror", endpoint=hub.endpoint)
            service = deployment.service_settings(port, model, model=hf_model)
            return deployment.write_inventory(workdir / "inventory.py", {"weights": (host, {
                "llm_llamacpp_git_url": git_url, "llm_health_timeout": 120,
                "llm_services": {"translate": service}})})

        def publish(repo_id: str) -> str:
            hub.add_repo(repo_id, {cache.MODEL_NAME: model}, sha256={cache.MODEL_NAME: cache.MODEL_SHA256})
            return repo_id

        env = {"HF_ENDPOINT": hub.endpoint}
        first = deployment.run_deploy(inventory(publish("tests/base")), env=env)
        assert first.returncode == 0, first.output[-6000:]
        yield {"host": host, "hub": hub, "inventory": inventory, "publish": publish, "env": env}


def served(hub) -> int:
    return sum(hub.served.values())


def unit_model(host) -> str:
    return ssh(host, "grep -o -- '--model [^ ]*' /etc/systemd/system/llama-translate.service").stdout.strip()


def test_interrupted_download_resumes_and_refetches_at_most_one_chunk(site):
    hub, host = site["hub"], site["host"]
    inventory = site["inventory"](site["publish"]("tests/resume"))
    hub.faults.rate_limit = 8 << 20  # 8 MiB/s per connection: the download takes seconds
    hub.reset_counters()
    process = subprocess.Popen([sys.executable, "-m", "pyinfra", str(inventory), "deploy.py", "-y"],
                               cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, **site["env"]}, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while served(hub) < 0.6 * cache.MODEL_SIZE and time.monotonic() < deadline:
            assert process.poll() is None, "the deploy ended before the cut"
            time.sleep(0.1)
    finally:
        # The controller dies and the link with it: the host helper gets the hang-up.
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    host.exec("pkill", "-HUP", "-f", "fetch_model.py", check=False)
    time.sleep(2)
    cut_at = served(hub)
    assert cut_at < cache.MODEL_SIZE, "the download finished before the cut"
    assert ssh(host, "ls /var/lib/llama-models/tests--resume/*/").stdout.count(".partial") >= 1
    hub.faults.reset()
    hub.reset_counters()
    rerun = deployment.run_deploy(inventory, env=site["env"])
    assert rerun.returncode == 0, rerun.output[-5000:]
    refetched = served(hub)
    assert refetched <= cache.MODEL_SIZE - cut_at + CHUNK, (refetched, cut_at)
    assert "tests--resume" in unit_model(host)


def test_corrupted_byte_is_caught_and_the_service_never_sees_it(site):
    hub, host = site["hub"], site["host"]
    inventory = site["inventory"](site["publish"]("tests/corrupt"))
    hub.faults.corrupt_offset = 12_345_678  # once: the re-fetch is clean
    hub.reset_counters()
    before = unit_model(host)
    result = deployment.run_deploy(inventory, env=site["env"])
    hub.faults.reset()
    assert result.returncode == 0, result.output[-5000:]
    assert "sha256" in result.output and "mismatch" in result.output.lower(), result.output[-5000:]
    assert served(hub) >= 2 * cache.MODEL_SIZE  # fetched twice
    # The unit only ever moved from the old model to the verified new one.
    assert "tests--corrupt" not in before and "tests--corrupt" in unit_model(host)
    digest = ssh(host, "sha256sum /var/lib/llama-models/tests--corrupt/*/*.gguf").stdout.split()[0]
    assert digest == cache.MODEL_SHA256


def test_mirror_ignoring_range_still_ends_verified(site):
    hub, host = site["hub"], site["host"]
    inventory = site["inventory"](site["publish"]("tests/norange"), mirror=True)
    hub.faults.ignore_range = True
    result = deployment.run_deploy(inventory, env={"HF_ENDPOINT": "http://127.0.0.1:9/unused"})
    hub.faults.reset()
    assert result.returncode == 0, result.output[-5000:]
    digest = ssh(host, "sha256sum /var/lib/llama-models/tests--norange/*/*.gguf").stdout.split()[0]
    assert digest == cache.MODEL_SHA256
    assert "tests--norange" in unit_model(host)


def test_transient_5xx_are_retried(site):
    hub = site["hub"]
    inventory = site["inventory"](site["publish"]("tests/flaky"))
    hub.faults.fail_next = 2
    result = deployment.run_deploy(inventory, env=site["env"])
    hub.faults.reset()
    assert result.returncode == 0, result.output[-5000:]


def test_repeated_5xx_are_reported_before_the_host_changes(site):
    hub, host = site["hub"], site["host"]
    inventory = site["inventory"](site["publish"]("tests/down"))
    before = ssh(host, "sha256sum /etc/systemd/system/llama-translate.service").stdout
    hub.faults.fail_next = 50
    result = deployment.run_deploy(inventory, env=site["env"])
    hub.faults.reset()
    assert result.returncode != 0
    assert "tests/down" in result.output and "503" in result.output, result.output[-3000:]
    assert "Starting operation" not in result.output
    assert ssh(host, "sha256sum /etc/systemd/system/llama-translate.service").stdout == before

"""The host suite: checks a deployed host against the manifest the deploy left on it
(/etc/llama/llmhost.json), so it needs nothing but SSH access:

    pytest tests/host --hosts=ssh://root@gpu1 [--ssh-config=FILE]

Each check loops over the host's services and reports every failing service by name.
"""

from __future__ import annotations

import json

import pytest

from llmhost.manifest import Manifest, ManifestError
from llmhost.settings import manifest_path

DEFAULT_MANIFEST = manifest_path({})  # the deploy's default llm_config_dir
GATEWAY_RECORD = "/etc/llmhost-gateway/gateway.json"  # llmhost.gateway.RECORD


def pytest_addoption(parser):
    parser.addoption("--llmhost-manifest", default=DEFAULT_MANIFEST,
                     help="path of the deploy's manifest on the host")


@pytest.fixture
def manifest(host, request) -> Manifest:
    path = request.config.getoption("--llmhost-manifest")
    f = host.file(path)
    if not f.exists:
        if host.file(GATEWAY_RECORD).exists:
            pytest.skip("a gateway without llama.cpp services of its own: service checks do not apply")
        pytest.fail(f"{path} is missing on the host: was deploy.py run to completion?")
    try:
        return Manifest.from_json(f.content_string)
    except ManifestError as error:
        pytest.fail(f"{path}: {error}")


@pytest.fixture
def services(manifest):
    return manifest.services


@pytest.fixture
def gateway(host) -> dict:
    """The gateway's record (llmhost.gateway.record), or a skip on a host that is not one."""
    f = host.file(GATEWAY_RECORD)
    if not f.exists:
        pytest.skip("not a gateway (no llm_gateway): gateway checks do not apply")
    return json.loads(f.content_string)

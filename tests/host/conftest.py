"""The host suite: checks a deployed host against the manifest the deploy left on it
(/etc/llama/llmhost.json), so it needs nothing but SSH access:

    pytest tests/host --hosts=ssh://root@gpu1 [--ssh-config=FILE]
    [--sudo [--llmhost-sudo-password-fd=N]]   (a login user with sudo; llmhost.passwordsudo)

Each check loops over the host's services and reports every failing service by name.
"""

from __future__ import annotations

import json

import pytest

from llmhost import passwordsudo
from llmhost.manifest import Manifest, ManifestError
from llmhost.settings import manifest_path

DEFAULT_MANIFEST = manifest_path({})  # the deploy's default llm_config_dir
GATEWAY_RECORD = "/etc/llmhost-gateway/gateway.json"  # llmhost.gateway.RECORD
SUDO_PASSWORD = pytest.StashKey[passwordsudo.Secret]()


def pytest_addoption(parser):
    parser.addoption("--llmhost-manifest", default=DEFAULT_MANIFEST,
                     help="path of the deploy's manifest on the host")
    parser.addoption(passwordsudo.OPTION, type=int, default=None, metavar="FD",
                     help="with --sudo: read sudo's password from this open file descriptor "
                          "(llmhost-verify passes _sudo_password so); sudo then reads it on stdin")


def pytest_configure(config):
    fd = config.getoption(passwordsudo.OPTION)
    if fd is None:
        return
    try:
        config.stash[SUDO_PASSWORD] = passwordsudo.read_fd(fd)
    except (OSError, ValueError) as error:
        raise pytest.UsageError(f"{passwordsudo.OPTION}={fd}: {error}") from None
    config.option.showlocals = False  # a frame's locals could hold the password


@pytest.fixture(scope="module")
def host(_testinfra_host, request):
    """testinfra's host, whose sudo reads the password from stdin when one was given."""
    password = request.config.stash.get(SUDO_PASSWORD, None)
    if password is not None:
        try:
            passwordsudo.apply(_testinfra_host.backend, password)
        except ValueError as error:
            pytest.fail(str(error), pytrace=False)
    return _testinfra_host


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

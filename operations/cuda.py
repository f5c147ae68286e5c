"""The optional CUDA toolkit install (llm_cuda_toolkit_install, off by default).

NVIDIA's apt repository comes through its ``cuda-keyring`` package, then ``cuda-toolkit-X-Y``,
which puts nvcc under /usr/local/cuda-X.Y/bin (not on PATH: the build names it). The driver is
never installed or changed: the toolkit package does not depend on one, and an apt pin keeps a
later ``apt upgrade`` from swapping the host's driver for one from NVIDIA's repository (a driver
swap under running services breaks them until a reboot).

Idempotent through facts: a converged host costs two reads (dpkg -l, one sha256) and no change.
"""

from __future__ import annotations

import hashlib
import shlex
from typing import Any, Iterator, Mapping

from pyinfra import host
from pyinfra.api import operation
from pyinfra.api.exceptions import OperationValueError
from pyinfra.facts.deb import DebPackages
from pyinfra.facts.files import Sha256File
from pyinfra.facts.server import Arch, LinuxDistribution

from llmhost.buildplan import toolkit_nvcc_path
from llmhost.remote import streamed

REPO_BASE = "https://developer.download.nvidia.com/compute/cuda/repos"
KEYRING_PACKAGE = "cuda-keyring"
KEYRING_VERSION = "1.1-1"
SUPPORTED_REPOS = ("ubuntu2204", "ubuntu2404", "debian12")
PIN_PATH = "/etc/apt/preferences.d/llmhost-cuda-no-driver"
# Driver packages as NVIDIA's repository names them; libraries stay allowed because the
# toolkit's own packages may need some.
PIN_TEXT = """\
# Written by llmhost: the CUDA toolkit comes from NVIDIA's repository, the driver never does.
Package: cuda-drivers* nvidia-driver* nvidia-open* nvidia-kernel-* nvidia-dkms-* nvidia-utils-* nvidia-firmware-* xserver-xorg-video-nvidia* nvidia-modprobe nvidia-persistenced nvidia-settings
Pin: origin developer.download.nvidia.com
Pin-Priority: -1
"""
APT = "DEBIAN_FRONTEND=noninteractive apt-get -o Dpkg::Options::=--force-confold"


def toolkit_package(version: str) -> str:
    """"cuda-toolkit-12-8" for "12-8" or "12.8"."""
    return "cuda-toolkit-" + version.replace(".", "-")


def repo_for(distro: Mapping[str, Any], arch: str) -> str | None:
    """NVIDIA's repo folder for this host ("ubuntu2404"), or None when NVIDIA has none we support."""
    if arch != "x86_64":
        return None
    name, major, minor = distro.get("name"), distro.get("major"), distro.get("minor")
    if name == "Ubuntu" and major is not None and minor is not None:
        repo = f"ubuntu{major}{int(minor):02d}"
    elif name == "Debian" and major is not None:
        repo = f"debian{major}"
    else:
        return None
    return repo if repo in SUPPORTED_REPOS else None


def keyring_url(repo: str) -> str:
    return f"{REPO_BASE}/{repo}/x86_64/{KEYRING_PACKAGE}_{KEYRING_VERSION}_all.deb"


def toolkit_preflight_problems(host_name: str, distro: Mapping[str, Any], arch: str,
                               version: str) -> list[str]:
    """Why the toolkit cannot be installed here (call only with the install enabled)."""
    problems = []
    if repo_for(distro, arch) is None:
        found = f"{distro.get('name')} {distro.get('major')}.{distro.get('minor') or 0} on {arch}"
        problems.append(
            f"host {host_name}: llm_cuda_toolkit_install: found {found}, expected Ubuntu 22.04, "
            f"Ubuntu 24.04 or Debian 12 on x86_64 (NVIDIA's apt repositories we use); fix: install "
            f"CUDA yourself and set llm_cuda_toolkit_install: false")
    try:
        toolkit_nvcc_path(version)
    except ValueError:
        problems.append(
            f"host {host_name}: llm_cuda_toolkit_version: found {version!r}, expected "
            f"MAJOR-MINOR like '12-8'; fix: set llm_cuda_toolkit_version: '12-8'")
    return problems


@operation()
def toolkit(version: str = "12-8"):
    """Install NVIDIA's apt repository (cuda-keyring) and cuda-toolkit-<version>; no driver."""
    packages = host.get_fact(DebPackages)
    changed = False
    for command in _keyring(packages):
        changed = True
        yield command
    for command in _driver_pin():
        changed = True
        yield command
    for command in _toolkit(packages, version):
        changed = True
        yield command
    if not changed:
        host.noop(f"{toolkit_package(version)} is installed from NVIDIA's repository")


def install_toolkit(version: str = "12-8") -> str:
    """Define the install for the current host; return the nvcc the build must use."""
    toolkit(version=version, name=f"Install CUDA toolkit {version} (NVIDIA apt repository)")
    return toolkit_nvcc_path(version)


def _keyring(packages: Mapping[str, list[str]]) -> Iterator[str]:
    if KEYRING_VERSION in packages.get(KEYRING_PACKAGE, []):
        return
    repo = repo_for(host.get_fact(LinuxDistribution), host.get_fact(Arch))
    if repo is None:
        raise OperationValueError("NVIDIA's CUDA apt repository is used for Ubuntu 22.04, 24.04 "
                                  "and Debian 12 on x86_64 only (see the preflight)")
    if "ca-certificates" not in packages:
        yield f"{APT} install -y --no-install-recommends ca-certificates"
    # python3 fetches it: fresh minimal images have neither curl nor wget
    fetch = ("import sys, urllib.request; urllib.request.urlretrieve(sys.argv[1], sys.argv[2])")
    yield (f"t=$(mktemp --suffix=.deb) && python3 -c {shlex.quote(fetch)} "
           f"{shlex.quote(keyring_url(repo))} \"$t\" && dpkg -i \"$t\"; r=$?; rm -f \"$t\"; exit $r")


def _driver_pin(path: str = PIN_PATH) -> Iterator[str]:
    wanted = hashlib.sha256(PIN_TEXT.encode()).hexdigest()
    if host.get_fact(Sha256File, path=path) == wanted:
        return
    yield f"printf '%s' {shlex.quote(PIN_TEXT)} > {shlex.quote(path)}"


def _toolkit(packages: Mapping[str, list[str]], version: str) -> Iterator[Any]:
    package = toolkit_package(version)
    nvcc = toolkit_nvcc_path(version)
    if package in packages:
        return
    yield f"{APT} update -q"
    # several GB: stream apt's per-package lines so the operator sees progress
    yield streamed(f"{APT} install -y --no-install-recommends {package}", f"{package} install")
    yield f"test -x {nvcc}"

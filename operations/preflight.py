"""Checks that run before any host changes: every host's settings, then what the controller must
have (local files named by the settings). Problems of all hosts are reported together."""

from __future__ import annotations

import os

from pyinfra import host, state
from pyinfra.api import operation

from pyinfra.facts.server import Arch, LinuxDistribution

from llmhost import cuda, gpu, hf, remote, weights
from llmhost.facts import JsonFile
from llmhost.settings import HostSettings, SettingsError, load_inventory_settings

# Room a build needs beside the old one (measured: CPU ~0.3 GB; a CUDA build for one arch with a
# few FA pairs ~2 GB), with headroom.
BUILD_BYTES = {False: 2 << 30, True: 6 << 30}

_validated: dict[int, dict[str, HostSettings]] = {}


def controller_problems(settings: HostSettings) -> list[str]:
    """Files on the controller that the settings name must exist and be readable."""
    problems = []
    where = f"host {settings.host_name}"

    def need(path: str | None, setting: str, what: str) -> None:
        if path and not os.access(path, os.R_OK):
            problems.append(f"{where}: {setting}: found {path!r}, which does not exist or is not "
                            f"readable on the controller; expected {what}")

    if settings.llamacpp_source == "local":
        need(settings.llamacpp_local_path, "llm_llamacpp_local_path",
             "a llama.cpp .tar.gz or git checkout")
    for service in settings.services:
        prefix = f"llm_services.{service.name}"
        if service.model.source == "local":
            need(service.model.path, f"{prefix}.model.path", "the GGUF file to push")
            need(service.model.mmproj, f"{prefix}.model.mmproj", "the projector file to push")
        need(service.api_key_file, f"{prefix}.api_key_file", "a file holding the API key")
        need(service.model.token_file, f"{prefix}.model.token_file", "a file holding the HF token")
    return problems


def inventory_settings() -> dict[str, HostSettings]:
    """Validate every host this run touches once per run, before the first operation: the
    hosts pyinfra connected to within --limit (an unreachable host or one outside the limit is
    neither validated nor resolved)."""
    key = id(state)
    if key not in _validated:
        active = set(state.inventory.get_active_hosts())
        hosts = {h.name: h.data.dict() for h in state.inventory if h in active}
        settings = load_inventory_settings(hosts)
        problems = [p for s in settings.values() for p in controller_problems(s)]
        problems += manifest_problems(settings)
        if problems:
            raise SettingsError(problems)
        _validated[key] = settings
    return _validated[key]


def manifest_problems(settings: dict[str, HostSettings]) -> list[str]:
    """Resolve every Hugging Face model of the inventory now (each once), so a missing file or
    a refused token stops the run before any host changes."""
    problems = []
    for host_settings in settings.values():
        for service in host_settings.services:
            model = service.model
            if model.source == "local":
                continue
            try:
                hf.resolve_manifest(model, hf.token_for(model), hf.endpoint_for(model))
            except hf.ManifestError as error:
                problems.append(f"host {host_settings.host_name}: llm_services.{service.name}.model: {error}")
    return problems


def toolkit_install_problems(settings: HostSettings) -> list[str]:
    """With llm_cuda_toolkit_install, a distribution NVIDIA's repository serves (said now, not
    when apt fails half-way)."""
    if not (settings.uses_gpu and settings.cuda_toolkit_install):
        return []
    return cuda.toolkit_preflight_problems(settings.host_name, host.get_fact(LinuxDistribution),
                                           host.get_fact(Arch), settings.cuda_toolkit_version)


def gpu_problems(settings: HostSettings, facts: gpu.GpuFacts) -> list[str]:
    return gpu.gpu_preflight_problems(settings.host_name, facts, settings,
                                      settings.cuda_toolkit_install, settings.cuda_toolkit_version)


def disk_problems(settings: HostSettings, facts: gpu.GpuFacts, build, models) -> list[str]:
    """Free disk for what this run still has to write: a new build, model files not in place."""
    needed = {settings.install_dir: 0, settings.model_dir: 0}
    if build is not None and not host.get_fact(JsonFile, path=f"{build.build_dir}/.llmhost-build.json"):
        needed[settings.install_dir] = BUILD_BYTES[settings.uses_gpu]
    for model in models.values():
        for spec in model.files:
            if not weights.is_in_place(spec):
                needed[settings.model_dir] += spec.size
    return gpu.disk_problems(settings.host_name, facts.free_bytes_by_path(), needed,
                             facts.mount_by_path())


@operation()
def preflight_failed(problems: list[str]):
    """Fails this host with every preflight problem; other hosts go on."""
    yield remote.fail("preflight failed, nothing was changed on this host:\n" + "\n".join(problems))


def fail(problems: list[str]) -> None:
    preflight_failed(name="Preflight", problems=problems)

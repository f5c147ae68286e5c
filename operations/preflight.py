"""Every check that runs before a host changes: the settings of every host the run touches, what
the controller must have (files the settings name), the Hugging Face models, and per host its
GPUs, driver, kernel module and toolkit (pure functions on llmhost.gpu's facts) and its free
disk. Each problem is one line: host, check, what was found, what was expected, the fix."""

from __future__ import annotations

import os
import threading
from typing import Mapping, Sequence

from pyinfra import host, state
from pyinfra.api import operation

from pyinfra.facts.server import Arch, LinuxDistribution

from llmhost import cuda, gpu, lock, remote, weights
from llmhost.buildplan import (FA_TYPES, architectures_for, build_toolkit, cuda_arch_for,
                               toolkit_bounds, uncompilable_fa_pairs)
from llmhost.gpu import (Gpu, GpuFacts, NoNvidiaDevices, Toolkit, arch_number, cap_tuple,
                         cuda_device_allow, release, version_tuple)
from llmhost.facts import JsonFile
from llmhost.settings import HostSettings, SettingsError, load_inventory_settings

# Room a build needs beside the old one (measured: CPU ~0.3 GB; a CUDA build for one arch with a
# few FA pairs ~2 GB), with headroom.
BUILD_BYTES = {False: 2 << 30, True: 6 << 30}

# Each run's validated settings live on its pyinfra State (one per run; tests make many).
_SETTINGS_ATTR = "_llmhost_settings"
_FAILED_ATTR = "_llmhost_settings_failed"
# Held while one host's greenlet validates and resolves for the run; made when the deploy file
# imports this, after pyinfra's CLI patched threading for gevent, so waiting yields.
_RESOLVING = threading.Lock()


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
    if settings.gateway:
        for name, path in settings.gateway.client_key_files:
            need(path, f"llm_gateway.client_key_files.{name}", "a file holding the client's key")
        need(settings.gateway.tls_cert_file, "llm_gateway.tls_cert_file",
             "a PEM file with the certificate and its key")
    return problems


def inventory_settings() -> dict[str, HostSettings]:
    """Validate every host this run touches once per run, before the first operation: the
    hosts pyinfra connected to within --limit (an unreachable host or one outside the limit is
    neither validated nor resolved). The inventory's lock is applied here (llmhost.lock):
    Hugging Face models it lacks are resolved now, each once, so a missing file or a refused
    token stops the run before any host changes; what it holds needs no Hub.

    pyinfra defines each host's operations in its own greenlet: the first one here does the
    work (and writes the lock, once), the others wait for it and take its result."""
    settings = getattr(state, _SETTINGS_ATTR, None)
    if settings is not None:
        return settings
    with _RESOLVING:
        settings = getattr(state, _SETTINGS_ATTR, None)
        if settings is None:
            failed = getattr(state, _FAILED_ATTR, None)
            if failed:
                raise failed
            active = set(state.inventory.get_active_hosts())
            hosts = {h.name: h.data.dict() for h in state.inventory if h in active}
            try:
                settings = load_inventory_settings(hosts)
                problems = [p for s in settings.values() for p in controller_problems(s)]
                if not problems:
                    settings, problems = lock.locked_settings(
                        settings, hosts, every_host=len(active) == len(state.inventory))
                if problems:
                    raise SettingsError(problems)
            except SettingsError as error:
                setattr(state, _FAILED_ATTR, error)
                raise
            setattr(state, _SETTINGS_ATTR, settings)
    return settings


def toolkit_install_problems(settings: HostSettings) -> list[str]:
    """With llm_cuda_toolkit_install, a distribution NVIDIA's repository serves (said now, not
    when apt fails half-way)."""
    if not (settings.uses_gpu and settings.cuda_toolkit_install):
        return []
    return cuda.toolkit_preflight_problems(settings.host_name, host.get_fact(LinuxDistribution),
                                           host.get_fact(Arch), settings.cuda_toolkit_version)


def gpu_problems(settings: HostSettings, facts: gpu.GpuFacts) -> list[str]:
    return gpu_preflight_problems(settings.host_name, facts, settings,
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
    return free_disk_problems(settings.host_name, facts.free_bytes_by_path(), needed,
                              facts.mount_by_path())


@operation()
def preflight_failed(problems: list[str]):
    """Fails this host with every preflight problem; other hosts go on."""
    yield remote.fail("preflight failed, nothing was changed on this host:\n" + "\n".join(problems))


def fail(problems: list[str]) -> None:
    preflight_failed(name="Preflight", problems=problems)


# ---------------------------------------------------------------------------------------------
# GPU, driver and toolkit checks (pure: facts and settings in, one line per problem out)

# Driver each CUDA toolkit needs (CUDA 12.x and 13.0 release notes, table 3).
# A release between two rows needs the lower row's driver at least.
DRIVER_FOR_TOOLKIT: tuple[tuple[tuple[int, int], str], ...] = (
    ((12, 0), "525.60.13"),
    ((12, 4), "550.54.14"),
    ((12, 6), "560.28.03"),
    ((12, 8), "570.26"),
    ((12, 9), "575.51.03"),
    ((13, 0), "580.65.06"),
)

DEFAULT_TOOLKIT = (12, 8)  # llm_cuda_toolkit_version's default, "12-8"

def keyring_fix(needed: tuple[int, int] = DEFAULT_TOOLKIT) -> str:
    """The fix that installs a toolkit able to build for the GPUs present (``needed`` at least:
    a GB10, compute 12.1, needs 12.9, which the default 12-8 is not)."""
    if needed > DEFAULT_TOOLKIT:
        version = f"{needed[0]}-{needed[1]}"
        return (f"set llm_cuda_toolkit_install: true and llm_cuda_toolkit_version: '{version}' "
                f"(installs cuda-toolkit-{version} from NVIDIA's apt repository; the driver is "
                f"never touched)")
    return ("set llm_cuda_toolkit_install: true (installs cuda-toolkit-12-8 from NVIDIA's apt "
            "repository; the driver is never touched)")

def gpu_preflight_problems(host_name: str, gpu_facts: GpuFacts, settings: HostSettings,
                           toolkit_install_enabled: bool, toolkit_version: str) -> list[str]:
    """Every GPU reason this host cannot build or serve; [] for CPU-only hosts."""
    gpu_services = [s for s in settings.services if s.uses_gpu]
    if not gpu_services:
        return []
    where = f"host {host_name}"
    if not gpu_facts.gpus:
        return [_no_driver(where, gpu_facts, gpu_services)] + _toolkit_problems(
            where, gpu_facts, architectures_for((), settings.cuda_architectures),
            toolkit_install_enabled, toolkit_version)
    archs = architectures_for(gpu_facts.gpus, settings.cuda_architectures)
    toolkit = build_toolkit(gpu_facts, toolkit_install_enabled, toolkit_version, archs)
    problems: list[str] = []
    problems += _driver_problems(where, gpu_facts, toolkit, toolkit_install_enabled)
    problems += _module_problems(where, gpu_facts)
    problems += _toolkit_problems(where, gpu_facts, archs, toolkit_install_enabled, toolkit_version)
    problems += _arch_list_problems(where, gpu_facts.gpus, settings.cuda_architectures)
    problems += _pinned_gpu_problems(where, gpu_facts.gpus, gpu_services)
    try:
        cuda_device_allow(gpu_facts.char_devices)
    except NoNvidiaDevices:
        problems.append(f"{where}: NVIDIA device nodes: found no character major 195 (nvidia) in "
                        f"/proc/devices, expected the driver's devices for the GPU services' "
                        f"DeviceAllow; fix: load the driver (modprobe nvidia) or reboot after "
                        f"installing it")
    return problems

def free_disk_problems(host_name: str, free_bytes_by_path: Mapping[str, int],
                  needed_bytes_by_path: Mapping[str, int],
                  mount_by_path: Mapping[str, str] | None = None) -> list[str]:
    """Too little free disk. Paths on one filesystem (mount_by_path) add up their needs."""
    groups: dict[str, list[str]] = {}
    for path in needed_bytes_by_path:
        groups.setdefault((mount_by_path or {}).get(path, path), []).append(path)
    problems = []
    for mount, paths in groups.items():
        needed = sum(needed_bytes_by_path[p] for p in paths)
        free = min(free_bytes_by_path.get(p, 0) for p in paths)
        if free >= needed:
            continue
        place = paths[0] if len(paths) == 1 and mount == paths[0] else (
            f"{mount} (for {', '.join(paths)})")
        problems.append(
            f"host {host_name}: free disk on {place}: found {_gib(free)}, expected at least "
            f"{_gib(needed)}; fix: free space there, or set llm_install_dir / llm_model_dir to a "
            f"larger filesystem")
    return problems

def fa_pair_warnings(host_name: str, settings: HostSettings) -> list[str]:
    """Services whose K/V pair has no compiled flash-attention kernel (slower, still serves)."""
    return [
        f"host {host_name}: llm_services.{s.name}: K/V {s.cache_type_k}-{s.cache_type_v} has no "
        f"CUDA flash-attention kernel in llama.cpp: it runs converted to f16 (slow); use types "
        f"from {', '.join(FA_TYPES)}"
        for s in settings.services
        if s.uses_gpu and uncompilable_fa_pairs([(s.cache_type_k, s.cache_type_v)])
    ]

def _no_driver(where: str, facts: GpuFacts, services: list) -> str:
    found = {"absent": "nvidia-smi not found"}.get(facts.smi, f"nvidia-smi {facts.smi}")
    if facts.module.version:
        found += f", kernel module {facts.module.version} loaded"
    if facts.module.nouveau:
        found += ", nouveau loaded"
    names = ", ".join(s.name for s in services)
    fix = "install the NVIDIA driver (570.26+ for CUDA 12.8; the open kernel modules for Blackwell)"
    if facts.module.nouveau:
        fix += ", blacklist nouveau"
    return (f"{where}: NVIDIA driver: found no usable GPU ({found}), expected a driver that lists "
            f"the GPUs for services {names} (gpu_layers > 0); fix: {fix} and reboot, or set "
            f"gpu_layers: 0 on those services")

def _driver_problems(where: str, facts: GpuFacts, toolkit: Toolkit | None,
                     install_enabled: bool) -> list[str]:
    driver = facts.driver_version
    if toolkit is None or driver is None:
        return []
    needed = driver_needed(toolkit.version)
    if needed is None or version_tuple(driver) >= version_tuple(needed):
        return []
    major, minor = toolkit.release
    fix = f"upgrade the NVIDIA driver to {needed} or newer and reboot (the deploy never changes it)"
    if install_enabled:
        fix += ", or set llm_cuda_toolkit_version to an older toolkit"
    return [f"{where}: NVIDIA driver: found {driver}, expected {needed} or newer for CUDA "
            f"{major}.{minor} ({toolkit.path}); fix: {fix}"]

def driver_needed(toolkit_version: str) -> str | None:
    """Minimum driver for a toolkit release; None below the table (no check)."""
    toolkit = release(toolkit_version)
    needed = None
    for row_release, driver in DRIVER_FOR_TOOLKIT:
        if toolkit >= row_release:
            needed = driver
    return needed

def _module_problems(where: str, facts: GpuFacts) -> list[str]:
    problems = []
    if facts.module.flavour == "proprietary":
        for gpu in facts.gpus:
            if gpu.compute_cap and cap_tuple(gpu.compute_cap)[0] >= 10:
                problems.append(
                    f"{where}: NVIDIA kernel module: found the proprietary module "
                    f"{facts.module.version} with {gpu.label}, expected the open kernel module "
                    f"(Blackwell GPUs need it); fix: install the driver's open flavour "
                    f"(e.g. nvidia-driver-570-open, or nvidia-open on Debian) and reboot")
    if facts.pci_gpus > len(facts.gpus):
        problems.append(
            f"{where}: NVIDIA GPUs: found {facts.pci_gpus} on the PCI bus but nvidia-smi lists "
            f"{len(facts.gpus)}, expected every NVIDIA GPU driven; fix: Blackwell needs the open "
            f"kernel module and GPUs older than Turing (GTX 10xx) the proprietary one, so one "
            f"host cannot drive both: remove one, or run its service on the CPU (gpu_layers: 0)")
    return problems

def _toolkit_problems(where: str, facts: GpuFacts, archs: Sequence[str], install_enabled: bool,
                      install_version: str) -> list[str]:
    low, low_archs, high, high_archs = toolkit_bounds(archs)
    need_text = f"{low[0]}.{low[1]} or newer" if low_archs else "from CUDA 12 or newer"
    for_archs = f" for CUDA architectures {';'.join(low_archs)}" if low_archs else ""
    if install_enabled:
        wanted = release(install_version)
        if low_archs and wanted < low:
            return [f"{where}: llm_cuda_toolkit_version: found {install_version!r}, expected "
                    f"{low[0]}-{low[1]} or newer{for_archs}; fix: set llm_cuda_toolkit_version: "
                    f"'{low[0]}-{low[1]}'"]
        if high and wanted >= high:
            return [f"{where}: llm_cuda_toolkit_version: found {install_version!r}, expected one "
                    f"older than {high[0]}-{high[1]} for CUDA architectures {';'.join(high_archs)} "
                    f"(CUDA 13 dropped Maxwell, Pascal and Volta); fix: set "
                    f"llm_cuda_toolkit_version: '12-8'"]
        return []
    toolkit = build_toolkit(facts, False, "", archs)
    if toolkit is None:
        return [f"{where}: CUDA toolkit: found no nvcc (PATH, /usr/local/cuda*/bin), expected "
                f"nvcc {need_text}{for_archs}; fix: {keyring_fix(low)}"]
    if low_archs and toolkit.release < low:
        return [f"{where}: CUDA toolkit: found nvcc {toolkit.version} ({toolkit.path}), expected "
                f"{need_text}{for_archs}; fix: {keyring_fix(low)}, or install CUDA "
                f"{low[0]}.{low[1]}+ yourself"]
    if high and toolkit.release >= high:
        return [f"{where}: CUDA toolkit: found nvcc {toolkit.version} ({toolkit.path}), expected "
                f"one older than 13.0 for CUDA architectures {';'.join(high_archs)} (CUDA 13 "
                f"dropped Maxwell, Pascal and Volta); fix: {keyring_fix()}"]
    return []

def _arch_list_problems(where: str, gpus: Sequence[Gpu], override: Sequence[str] | None) -> list[str]:
    if not override:
        return []
    covered = {arch_number(a) for a in override}
    return [
        f"{where}: llm_cuda_architectures: found {list(override)!r}, expected it to include "
        f"{cuda_arch_for(g.compute_cap)} for {g.label}; fix: add '{cuda_arch_for(g.compute_cap)}' "
        f"or unset llm_cuda_architectures to build for the GPUs present"
        for g in gpus
        if g.compute_cap and arch_number(cuda_arch_for(g.compute_cap)) not in covered
    ]

def _pinned_gpu_problems(where: str, gpus: Sequence[Gpu], services: list) -> list[str]:
    present = sorted(g.index for g in gpus)
    return [
        f"{where}: llm_services.{s.name}.gpus: found GPU index {index}, expected one of "
        f"{', '.join(map(str, present))} (nvidia-smi); fix: pin the service to a GPU the host has, "
        f"or remove gpus to use all of them"
        for s in services
        for index in (s.gpus or ())
        if index not in present
    ]

def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"

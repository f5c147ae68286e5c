"""The GPU unit's device access, rendered against /proc/devices of two driver generations: every
major a CUDA process opens is allowed, and no group the host lacks is named."""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

import pytest

from llmhost import gpu
from llmhost.buildplan import plan_build
from llmhost.services import render_unit
from llmhost.settings import load_host_settings
from llmhost.weights import ModelFileSpec, PlacedModel

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures" / "gpu"
# Majors a CUDA process opens: the GPUs and /dev/nvidiactl (195), unified memory, MIG caps.
CUDA_GROUPS = {"nvidia-uvm", "nvidia-caps"}


def devices(name: str) -> tuple[tuple[int, str], ...]:
    return gpu.parse_proc_devices((FIXTURES / name).read_text().splitlines())


def guide_gpu_unit(device_allow) -> str:
    namespace: dict = {}
    exec((REPO / "group_data" / "gpu_servers.py").read_text(), namespace)
    settings = load_host_settings("gpu1", {"llm_services": namespace["llm_services"]})
    main = settings.services[0]
    model = PlacedModel("/m/Q.gguf", None, (ModelFileSpec("/m/Q.gguf", "a" * 64, 1),))
    return render_unit(settings, main, plan_build(settings), model, device_allow)


def allowed_majors(unit: str, char_devices) -> set[int]:
    """Majors the unit's DeviceAllow= lines open read-write, resolved as systemd does
    (char-<glob> against /proc/devices names)."""
    majors = set()
    for group in re.findall(r"^DeviceAllow=char-(\S+) rwm?$", unit, re.M):
        majors |= {major for major, name in char_devices if fnmatch.fnmatchcase(name, group)}
    return majors


def test_driver_580_names_major_195_nvidia_and_nvidiactl():
    assert gpu.cuda_device_allow(devices("proc-devices-580.txt")) == (
        "char-nvidia", "char-nvidiactl", "char-nvidia-uvm", "char-nvidia-caps")


def test_older_drivers_name_major_195_nvidia_frontend():
    assert gpu.cuda_device_allow(devices("proc-devices-535-frontend.txt")) == (
        "char-nvidia-frontend", "char-nvidia-uvm", "char-nvidia-caps")


@pytest.mark.parametrize("fixture", ["proc-devices-580.txt", "proc-devices-535-frontend.txt"])
def test_rendered_gpu_unit_allows_every_major_cuda_opens_and_names_nothing_else(fixture):
    char_devices = devices(fixture)
    unit = guide_gpu_unit(gpu.cuda_device_allow(char_devices))
    needed = {gpu.NVIDIA_MAJOR} | {major for major, name in char_devices if name in CUDA_GROUPS}
    assert needed <= allowed_majors(unit, char_devices), unit
    named = set(re.findall(r"^DeviceAllow=char-(\S+) rwm?$", unit, re.M))
    assert named <= {name for _, name in char_devices}, f"names the host lacks: {named}"
    # The fabric manager's groups stay closed.
    fabric = {major for major, name in char_devices if "nvswitch" in name or "nvlink" in name
              or "imex" in name}
    assert not fabric & allowed_majors(unit, char_devices)
    assert not re.search(r"^DeviceAllow=/dev/", unit, re.M), "paths are covered by the groups"


def test_uvm_is_allowed_before_its_module_is_loaded():
    """nvidia-uvm's major appears only once the module loads: the unit names it anyway, since
    systemd resolves the group when the service starts, after llmhost-nvidia-uvm.service."""
    without_uvm = tuple((m, n) for m, n in devices("proc-devices-580.txt") if n != "nvidia-uvm")
    assert "char-nvidia-uvm" in gpu.cuda_device_allow(without_uvm)


def test_a_host_without_the_driver_loaded_fails_its_preflight():
    no_driver = devices("proc-devices-580.txt")
    no_driver = tuple((m, n) for m, n in no_driver if m != gpu.NVIDIA_MAJOR)
    with pytest.raises(gpu.NoNvidiaDevices, match="found no character major 195"):
        gpu.cuda_device_allow(no_driver)


def test_proc_devices_parser_keeps_character_devices_only():
    parsed = devices("proc-devices-580.txt")
    assert (195, "nvidia") in parsed and (195, "nvidiactl") in parsed
    assert (259, "blkext") not in parsed and (7, "loop") not in parsed

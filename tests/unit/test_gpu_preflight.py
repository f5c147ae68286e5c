"""Every GPU preflight failure, with the exact line the operator reads."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from llmhost import buildplan, gpu, preflight
from llmhost.gpu import Gpu, GpuFacts, KernelModule, Toolkit
from llmhost.settings import load_host_settings

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "gpu"
NVCC_128 = Toolkit("/usr/local/cuda-12.8/bin/nvcc", "12.8.93")
NVCC_124 = Toolkit("/usr/local/cuda-12.4/bin/nvcc", "12.4.131")
NVCC_130 = Toolkit("/usr/local/cuda-13.0/bin/nvcc", "13.0.88")
OPEN_575 = KernelModule("open", "575.57.08")


def smi(name: str):
    return tuple(gpu.parse_nvidia_smi((FIXTURES / name).read_text().splitlines()))


def host(arches=None, **services):
    """Settings of host gpu1; each service given as {gpu_layers, gpus, ...}."""
    data = {"llm_services": {
        name: {"port": 8080 + i, "model": {"source": "local", "path": f"/m/{name}.gguf"},
               "extra_args": [], **values}
        for i, (name, values) in enumerate(services.items())}}
    if arches is not None:
        data["llm_cuda_architectures"] = arches
    return load_host_settings("gpu1", data)


DEVICES_580 = gpu.parse_proc_devices((FIXTURES / "proc-devices-580.txt").read_text().splitlines())


def facts(smi_file: str, module=OPEN_575, toolkits=(NVCC_128,), pci=None,
          char_devices=DEVICES_580) -> GpuFacts:
    gpus = smi(smi_file)
    return GpuFacts(gpus=gpus, smi="ok", module=module, toolkits=toolkits,
                    pci_gpus=len(gpus) if pci is None else pci, char_devices=char_devices)


MAIN = {"gpu_layers": 99, "cache_type_k": "q4_0", "cache_type_v": "q8_0"}


def check(settings, gpu_facts, install=False, version="12-8"):
    return preflight.gpu_preflight_problems("gpu1", gpu_facts, settings, install, version)


# --- hosts that pass --------------------------------------------------------------------------

def test_a_good_5090_host_passes():
    assert check(host(main=MAIN), facts("smi-rtx5090.txt")) == []


def test_the_h100_passes_with_its_nvcc_13():
    h100 = GpuFacts(gpus=smi("smi-h100.txt"), smi="ok", module=KernelModule("open", "580.159.04"),
                    toolkits=(NVCC_130,), pci_gpus=1, char_devices=DEVICES_580)
    assert check(host(main=MAIN), h100) == []


def test_cpu_only_host_gets_no_gpu_problem_even_without_anything():
    assert check(host(translate={"gpu_layers": 0}), GpuFacts()) == []


# --- one test per message -------------------------------------------------

def test_no_driver():
    assert check(host(main=MAIN, translate={"gpu_layers": 0}), GpuFacts(toolkits=(NVCC_128,))) == [
        "host gpu1: NVIDIA driver: found no usable GPU (nvidia-smi not found), expected a driver "
        "that lists the GPUs for services main (gpu_layers > 0); fix: install the NVIDIA driver "
        "(570.26+ for CUDA 12.8; the open kernel modules for Blackwell) and reboot, or set "
        "gpu_layers: 0 on those services"]


def test_no_driver_with_nouveau_and_a_failing_nvidia_smi():
    broken = GpuFacts(smi="failed: NVIDIA-SMI has failed", module=KernelModule(nouveau=True),
                      toolkits=(NVCC_128,))
    assert check(host(main=MAIN), broken) == [
        "host gpu1: NVIDIA driver: found no usable GPU (nvidia-smi failed: NVIDIA-SMI has failed, "
        "nouveau loaded), expected a driver that lists the GPUs for services main (gpu_layers > 0); "
        "fix: install the NVIDIA driver (570.26+ for CUDA 12.8; the open kernel modules for "
        "Blackwell), blacklist nouveau and reboot, or set gpu_layers: 0 on those services"]


def test_no_driver_and_no_toolkit_are_both_said():
    problems = check(host(main=MAIN), GpuFacts())
    assert len(problems) == 2
    assert problems[1] == (
        "host gpu1: CUDA toolkit: found no nvcc (PATH, /usr/local/cuda*/bin), expected nvcc from CUDA "
        "12 or newer; fix: set llm_cuda_toolkit_install: true (installs cuda-toolkit-12-8 "
        "from NVIDIA's apt repository; the driver is never touched)")


def test_driver_too_old_for_the_nvcc_found():
    old = facts("smi-rtx4090.txt", module=KernelModule("proprietary", "550.120"))
    assert check(host(main=MAIN), old) == [
        "host gpu1: NVIDIA driver: found 550.120, expected 570.26 or newer for CUDA 12.8 "
        "(/usr/local/cuda-12.8/bin/nvcc); fix: upgrade the NVIDIA driver to 570.26 or newer and "
        "reboot (the deploy never changes it)"]


def test_driver_too_old_for_the_toolkit_to_install():
    h100 = replace(facts("smi-h100.txt"), toolkits=())
    h100 = replace(h100, gpus=(replace(h100.gpus[0], driver_version="575.57.08"),))
    assert check(host(main=MAIN), h100, install=True, version="13-0") == [
        "host gpu1: NVIDIA driver: found 575.57.08, expected 580.65.06 or newer for CUDA 13.0 "
        "(/usr/local/cuda-13.0/bin/nvcc); fix: upgrade the NVIDIA driver to 580.65.06 or newer and "
        "reboot (the deploy never changes it), or set llm_cuda_toolkit_version to an older toolkit"]


def test_driver_exactly_at_the_minimum_passes():
    at_min = facts("smi-rtx4090.txt")
    at_min = replace(at_min, gpus=(replace(at_min.gpus[0], driver_version="570.26"),))
    assert check(host(main=MAIN), at_min) == []


def test_blackwell_on_the_proprietary_module():
    prop = facts("smi-rtx5090.txt", module=KernelModule("proprietary", "575.57.08"))
    assert check(host(main=MAIN), prop) == [
        "host gpu1: NVIDIA kernel module: found the proprietary module 575.57.08 with GPU 0 NVIDIA "
        "GeForce RTX 5090 (compute capability 12.0), expected the open kernel module (Blackwell "
        "GPUs need it); fix: install the driver's open flavour (e.g. nvidia-driver-570-open, or "
        "nvidia-open on Debian) and reboot"]


def test_a_gpu_on_the_bus_that_the_module_does_not_drive():
    # what a 5090 + GTX 1060 host really shows: the open module drives only the 5090
    assert check(host(main=MAIN), facts("smi-rtx5090.txt", pci=2)) == [
        "host gpu1: NVIDIA GPUs: found 2 on the PCI bus but nvidia-smi lists 1, expected every "
        "NVIDIA GPU driven; fix: Blackwell needs the open kernel module and GPUs older than Turing "
        "(GTX 10xx) the proprietary one, so one host cannot drive both: remove one, or run its "
        "service on the CPU (gpu_layers: 0)"]


def test_nvcc_older_than_12_8_for_blackwell():
    old = facts("smi-rtx5090.txt", toolkits=(NVCC_124,))
    assert check(host(main=MAIN), old) == [
        "host gpu1: CUDA toolkit: found nvcc 12.4.131 (/usr/local/cuda-12.4/bin/nvcc), expected "
        "12.8 or newer for CUDA architectures 120a; fix: set llm_cuda_toolkit_install: true "
        "(installs cuda-toolkit-12-8 from NVIDIA's apt repository; the driver is never touched), "
        "or install CUDA 12.8+ yourself"]


def test_old_nvcc_is_fine_when_the_toolkit_install_is_enabled():
    old = facts("smi-rtx5090.txt", toolkits=(NVCC_124,))
    assert check(host(main=MAIN), old, install=True, version="12-8") == []


def test_old_nvcc_is_fine_without_12x():
    assert check(host(main=MAIN), facts("smi-rtx4090.txt", toolkits=(NVCC_124,))) == []


def test_no_nvcc_for_blackwell():
    assert check(host(main=MAIN), facts("smi-rtx5090.txt", toolkits=())) == [
        "host gpu1: CUDA toolkit: found no nvcc (PATH, /usr/local/cuda*/bin), expected nvcc 12.8 "
        "or newer for CUDA architectures 120a; fix: set llm_cuda_toolkit_install: true (installs "
        "cuda-toolkit-12-8 from NVIDIA's apt repository; the driver is never touched)"]


def test_toolkit_version_setting_too_old_for_blackwell():
    assert check(host(main=MAIN), facts("smi-rtx5090.txt"), install=True, version="12-4") == [
        "host gpu1: llm_cuda_toolkit_version: found '12-4', expected 12-8 or newer for CUDA "
        "architectures 120a; fix: set llm_cuda_toolkit_version: '12-8'"]


def test_nvcc_13_cannot_build_for_a_gtx_1060():
    pascal = facts("smi-gtx1060.txt", toolkits=(NVCC_130,))
    pascal = replace(pascal, gpus=(replace(pascal.gpus[0], driver_version="580.82.07"),))
    assert check(host(main=MAIN), pascal) == [
        "host gpu1: CUDA toolkit: found nvcc 13.0.88 (/usr/local/cuda-13.0/bin/nvcc), expected one "
        "older than 13.0 for CUDA architectures 61 (CUDA 13 dropped Maxwell, Pascal and Volta); "
        "fix: set llm_cuda_toolkit_install: true (installs cuda-toolkit-12-8 from NVIDIA's apt "
        "repository; the driver is never touched)"]


def test_nvcc_13_newest_but_12_8_present_for_a_gtx_1060_builds_with_12_8():
    pascal = facts("smi-gtx1060.txt", toolkits=(NVCC_130, NVCC_128))
    pascal = replace(pascal, gpus=(replace(pascal.gpus[0], driver_version="580.82.07"),))
    assert check(host(main=MAIN), pascal) == []
    assert buildplan.build_toolkit(pascal, False, "", ("61",)) == NVCC_128
    assert buildplan.build_toolkit(pascal, False, "", ("89",)) == NVCC_130


def test_toolkit_version_setting_too_new_for_a_gtx_1060():
    pascal = facts("smi-gtx1060.txt")
    pascal = replace(pascal, gpus=(replace(pascal.gpus[0], driver_version="580.82.07"),))
    assert check(host(main=MAIN), pascal, install=True, version="13-0") == [
        "host gpu1: llm_cuda_toolkit_version: found '13-0', expected one older than 13-0 for CUDA "
        "architectures 61 (CUDA 13 dropped Maxwell, Pascal and Volta); fix: set "
        "llm_cuda_toolkit_version: '12-8'"]


def test_arch_list_missing_a_gpu_present():
    two = facts("smi-rtx5090-gtx1060.txt")
    assert check(host(arches=["120a"], main=MAIN), two) == [
        "host gpu1: llm_cuda_architectures: found ['120a'], expected it to include 61 for GPU 1 "
        "NVIDIA GeForce GTX 1060 6GB (compute capability 6.1); fix: add '61' or unset "
        "llm_cuda_architectures to build for the GPUs present"]


def test_arch_list_plain_120_covers_the_5090():
    assert check(host(arches=["120", "89"], main=MAIN), facts("smi-rtx5090.txt")) == []


def test_service_pinned_to_a_missing_gpu():
    translate = {"gpu_layers": 99, "gpus": [1, 2]}
    problems = check(host(main=MAIN, translate=translate), facts("smi-rtx5090-gtx1060.txt"))
    assert problems == [
        "host gpu1: llm_services.translate.gpus: found GPU index 2, expected one of 0, 1 "
        "(nvidia-smi); fix: pin the service to a GPU the host has, or remove gpus to use all of them"]


def test_several_problems_are_all_reported():
    bad = facts("smi-rtx5090.txt", module=KernelModule("proprietary", "550.120"), toolkits=(NVCC_124,))
    bad = replace(bad, gpus=(replace(bad.gpus[0], driver_version="550.120"),))
    problems = check(host(main={**MAIN, "gpus": [3]}), bad)
    assert [p.split(": ")[1] for p in problems] == [
        "NVIDIA kernel module", "CUDA toolkit", "llm_services.main.gpus"]
    # nvcc 12.4 needs 550.54.14: 550.120 is newer, so the driver itself passes
    assert all(p.startswith("host gpu1: ") and "\n" not in p for p in problems)


# --- disk -------------------------------------------------------------------------------------

GIB = 2**30


def test_disk_enough():
    assert preflight.free_disk_problems("gpu1", {"/opt/llama.cpp": 10 * GIB}, {"/opt/llama.cpp": 5 * GIB}) == []


def test_disk_too_little():
    assert preflight.free_disk_problems("gpu1", {"/opt/llama.cpp": 3 * GIB}, {"/opt/llama.cpp": 25 * GIB}) == [
        "host gpu1: free disk on /opt/llama.cpp: found 3.0 GiB, expected at least 25.0 GiB; fix: "
        "free space there, or set llm_install_dir / llm_model_dir to a larger filesystem"]


def test_disk_needs_on_one_filesystem_add_up():
    free = {"/opt/llama.cpp": 30 * GIB, "/var/lib/llama-models": 30 * GIB}
    needed = {"/opt/llama.cpp": 5 * GIB, "/var/lib/llama-models": 28 * GIB}
    assert preflight.free_disk_problems("gpu1", free, needed) == []
    mounts = {"/opt/llama.cpp": "/", "/var/lib/llama-models": "/"}
    assert preflight.free_disk_problems("gpu1", free, needed, mounts) == [
        "host gpu1: free disk on / (for /opt/llama.cpp, /var/lib/llama-models): found 30.0 GiB, "
        "expected at least 33.0 GiB; fix: free space there, or set llm_install_dir / llm_model_dir "
        "to a larger filesystem"]


# --- warnings ---------------------------------------------------------------------------------

def test_fa_pair_warning_for_iq4_nl():
    settings = host(main={"gpu_layers": 99, "cache_type_k": "iq4_nl", "cache_type_v": "iq4_nl"})
    assert preflight.fa_pair_warnings("gpu1", settings) == [
        "host gpu1: llm_services.main: K/V iq4_nl-iq4_nl has no CUDA flash-attention kernel in "
        "llama.cpp: it runs converted to f16 (slow); use types from q4_0, q4_1, q5_0, q5_1, q8_0, "
        "bf16, f16"]
    assert preflight.fa_pair_warnings("gpu1", host(main=MAIN)) == []


def test_a_driver_without_its_devices_loaded_is_refused_with_the_fix():
    loaded_nothing = tuple((m, n) for m, n in DEVICES_580 if m != gpu.NVIDIA_MAJOR)
    problems = check(host(main=MAIN), facts("smi-rtx5090.txt", char_devices=loaded_nothing))
    assert problems == [
        "host gpu1: NVIDIA device nodes: found no character major 195 (nvidia) in /proc/devices, "
        "expected the driver's devices for the GPU services' DeviceAllow; fix: load the driver "
        "(modprobe nvidia) or reboot after installing it"]


def test_a_gb10_without_a_toolkit_is_told_a_version_that_builds_it():
    """A GB10 (compute 12.1) needs CUDA 12.9: the fix must not suggest the default 12-8."""
    gb10 = (Gpu(0, "NVIDIA GB10", "12.1", "580.95.05", 122000),)
    problems = check(host(main=MAIN), replace(facts("smi-rtx5090.txt"), gpus=gb10, toolkits=()))
    assert problems == [
        "host gpu1: CUDA toolkit: found no nvcc (PATH, /usr/local/cuda*/bin), expected nvcc 12.9 "
        "or newer for CUDA architectures 121a; fix: set llm_cuda_toolkit_install: true and "
        "llm_cuda_toolkit_version: '12-9' (installs cuda-toolkit-12-9 from NVIDIA's apt repository; "
        "the driver is never touched)"]

"""GPU fact parsers on recorded outputs, and the build inputs computed from them."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest

from llmhost import buildplan, gpu, preflight
from llmhost.gpu import Gpu, GpuFacts, KernelModule, Toolkit

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "gpu"


def lines(name: str) -> list[str]:
    return (FIXTURES / name).read_text().splitlines()


def text(name: str) -> str:
    return (FIXTURES / name).read_text()


# --- nvidia-smi -------------------------------------------------------------------------------

def test_h100_row_as_recorded():
    assert gpu.parse_nvidia_smi(lines("smi-h100.txt")) == [
        Gpu(0, "NVIDIA H100 80GB HBM3", "9.0", "580.159.04", 81559)]


@pytest.mark.parametrize("name, expected", [
    ("smi-rtx5090.txt", Gpu(0, "NVIDIA GeForce RTX 5090", "12.0", "575.57.08", 32607)),
    ("smi-rtx4090.txt", Gpu(0, "NVIDIA GeForce RTX 4090", "8.9", "550.120", 24564)),
    ("smi-gtx1060.txt", Gpu(0, "NVIDIA GeForce GTX 1060 6GB", "6.1", "535.183.01", 6144)),
])
def test_single_gpu_rows(name, expected):
    assert gpu.parse_nvidia_smi(lines(name)) == [expected]


def test_two_gpus_keep_their_indexes():
    gpus = gpu.parse_nvidia_smi(lines("smi-rtx5090-gtx1060.txt"))
    assert [(g.index, g.compute_cap) for g in gpus] == [(0, "12.0"), (1, "6.1")]


def test_driver_error_text_is_no_gpu():
    assert gpu.parse_nvidia_smi(lines("smi-no-driver.txt")) == []


def test_row_with_units_comma_in_name_and_unknown_cap():
    rows = ["0, NVIDIA H100 80GB HBM3, 9.0, 580.159.04, 81559 MiB",
            "1, Odd, Name, 8.6, 550.1, 100",
            "2, Old Card, [N/A], 470.1, 2048"]
    assert gpu.parse_nvidia_smi(rows) == [
        Gpu(0, "NVIDIA H100 80GB HBM3", "9.0", "580.159.04", 81559),
        Gpu(1, "Odd, Name", "8.6", "550.1", 100),
        Gpu(2, "Old Card", "", "470.1", 2048),
    ]


# --- kernel module, nvcc, meminfo ---------------------------------------------------------------

def test_open_module():
    assert gpu.parse_driver_version_file(text("driver-open.txt")) == KernelModule("open", "575.57.08")


def test_proprietary_module():
    assert gpu.parse_driver_version_file(text("driver-proprietary.txt")) == KernelModule(
        "proprietary", "550.120")


def test_no_module_file():
    assert gpu.parse_driver_version_file("") == KernelModule()


@pytest.mark.parametrize("name, version", [
    ("nvcc-12.8.txt", "12.8.93"), ("nvcc-13.0.txt", "13.0.88"), ("nvcc-12.4.txt", "12.4.131")])
def test_nvcc_versions(name, version):
    assert gpu.parse_nvcc_version(text(name)) == version


def test_not_nvcc():
    assert gpu.parse_nvcc_version("bash: nvcc: command not found") is None


# --- the one fact -----------------------------------------------------------------------------

def test_whole_fact_on_a_5090_host():
    facts = gpu.parse_gpu_host(lines("host-rtx5090.txt"))
    assert facts.gpus == (Gpu(0, "NVIDIA GeForce RTX 5090", "12.0", "575.57.08", 32607),)
    assert facts.smi == "ok"
    assert facts.module == KernelModule("open", "575.57.08", nouveau=False)
    assert facts.pci_gpus == 1
    # /usr/local/cuda links to cuda-12.8: one toolkit per real nvcc
    assert facts.toolkits == (Toolkit("/usr/local/cuda-12.8/bin/nvcc", "12.8.93"),
                              Toolkit("/usr/local/cuda-12.4/bin/nvcc", "12.4.131"))
    assert facts.free_bytes_by_path() == {"/opt/llama.cpp": 53687091200,
                                          "/var/lib/llama-models": 214748364800}
    assert facts.mount_by_path() == {"/opt/llama.cpp": "/", "/var/lib/llama-models": "/srv"}
    assert facts.driver_version == "575.57.08"


def test_whole_fact_recorded_on_the_dev_machine():
    facts = gpu.parse_gpu_host(lines("host-dev-no-gpu.txt"))
    assert facts.gpus == () and facts.smi == "absent" and facts.pci_gpus == 0
    assert facts.module == KernelModule()
    assert {t.version for t in facts.toolkits} == {"13.0.88"}
    assert "/usr/local/cuda-13.0/bin/nvcc" in {t.path for t in facts.toolkits}
    assert len(facts.disks) == 2


def test_fact_prints_as_json_for_the_pyinfra_cli():
    import json
    data = json.loads(json.dumps(gpu.parse_gpu_host(lines("host-rtx5090.txt")).to_json()))
    assert data["gpus"][0]["compute_cap"] == "12.0" and data["module"]["flavour"] == "open"


def test_failed_smi_and_nouveau():
    out = ["### nvidia-smi 9", *lines("smi-no-driver.txt"), "### driver", "### modules", "nouveau"]
    facts = gpu.parse_gpu_host(out)
    assert facts.gpus == ()
    assert facts.smi.startswith("failed: NVIDIA-SMI has failed because it couldn't communicate")
    assert facts.module.nouveau is True and facts.driver_version is None


def test_fact_class_processes_and_defaults():
    fact = gpu.GpuHost()
    assert fact.process(lines("host-rtx5090.txt")).gpus[0].compute_cap == "12.0"
    assert fact.default() == GpuFacts()


def test_fact_command_runs_here_and_exits_zero():
    # the dev machine has no GPU and no nvidia-smi: the command must still succeed, and
    # a folder that does not exist yet is measured on the filesystem it will be made on
    command = gpu.GpuHost().command(paths=("/nonexistent/llmhost/builds",))
    run = subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    facts = gpu.parse_gpu_host(run.stdout.splitlines())
    assert [d.path for d in facts.disks] == ["/nonexistent/llmhost/builds"]
    assert facts.disks[0].free_bytes > 0 and facts.disks[0].mount == "/"


# --- build inputs -----------------------------------------------------------------------------

@pytest.mark.parametrize("cap, arch", [
    ("12.0", "120a"), ("12.1", "121a"), ("10.0", "100"), ("9.0", "90"), ("8.9", "89"),
    ("8.6", "86"), ("6.1", "61")])
def test_cuda_arch_for(cap, arch):
    assert buildplan.cuda_arch_for(cap) == arch


def test_cuda_arch_for_rejects_garbage():
    with pytest.raises(ValueError, match="not MAJOR.MINOR"):
        buildplan.cuda_arch_for("[N/A]")


def test_architectures_union_sorted_by_number():
    gpus = gpu.parse_nvidia_smi(lines("smi-rtx5090-gtx1060.txt") + lines("smi-rtx4090.txt"))
    assert buildplan.architectures_for(gpus, None) == ("61", "89", "120a")


def test_architectures_one_entry_per_kind_and_override_wins():
    h100 = gpu.parse_nvidia_smi(lines("smi-h100.txt")) * 2
    assert buildplan.architectures_for(h100, None) == ("90",)
    assert buildplan.architectures_for(h100, ("90a", "89")) == ("90a", "89")
    assert buildplan.architectures_for([], None) == ()


def test_system_info_archs():
    assert buildplan.system_info_archs(["120a", "61"]) == "610,1200"
    assert buildplan.system_info_archs(["90"]) == "900"


def test_fa_quants_f16_first_then_sorted_without_duplicates():
    assert buildplan.fa_quants([("q4_0", "q8_0")]) == "f16-f16;q4_0-q8_0"
    assert buildplan.fa_quants([("q4_0", "q8_0"), ("f16", "f16"), ("q4_0", "q8_0")]) == "f16-f16;q4_0-q8_0"
    assert buildplan.fa_quants([]) == "f16-f16"
    assert buildplan.fa_quants([*buildplan.FA_DEFAULT_PAIRS, ("q4_0", "q8_0")]) == (
        "f16-f16;bf16-bf16;q4_0-q4_0;q4_0-q8_0;q8_0-q8_0")


def test_system_info_reads_back_what_fa_quants_wrote():
    line = ("system_info: n_threads = 16 | CUDA : ARCHS = 900 | USE_GRAPHS = 1 | "
            "FA_QUANTS = f16-f16,q4_0-q8_0 | CPU : SSE3 = 1 |")
    assert buildplan.system_info_fa_pairs(line) == (("f16", "f16"), ("q4_0", "q8_0"))
    assert buildplan.fa_quants(buildplan.system_info_fa_pairs(line)) == "f16-f16;q4_0-q8_0"
    assert buildplan.system_info_fa_pairs("system_info: n_threads = 2 | CPU : SSE3 = 1 |") is None


def test_fa_quants_drops_types_ggml_cannot_compile():
    assert buildplan.fa_quants([("iq4_nl", "iq4_nl"), ("f32", "f16"), ("q8_0", "q8_0")]) == "f16-f16;q8_0-q8_0"
    assert buildplan.uncompilable_fa_pairs([("iq4_nl", "iq4_nl"), ("f32", "f16"), ("q8_0", "q8_0")]) == [
        ("f32", "f16"), ("iq4_nl", "iq4_nl")]


def test_fa_types_match_the_pinned_source():
    # ggml/cmake/common.cmake at the pinned commit, when the checkout is on this machine
    source = Path("/var/cache/llmhost/llama.cpp-0c1e57098bba/ggml/cmake/common.cmake")
    if not source.exists():
        pytest.skip("pinned llama.cpp checkout not cached here")
    assert "set(FA_TYPES " + " ".join(buildplan.FA_TYPES) + ")" in source.read_text()


def test_cuda_cmake_flags():
    assert buildplan.cuda_cmake_flags("/usr/local/cuda-12.8/bin/nvcc", ("61", "120a"), [("q4_0", "q8_0")]) == [
        "-DGGML_CUDA=ON",
        "-DCMAKE_CUDA_COMPILER=/usr/local/cuda-12.8/bin/nvcc",
        "-DCMAKE_CUDA_ARCHITECTURES=61;120a",
        "-DGGML_CUDA_FA_QUANTS=f16-f16;q4_0-q8_0",
    ]


def test_cuda_cmake_flags_refuse_an_empty_arch_list():
    with pytest.raises(ValueError, match="no CUDA architectures"):
        buildplan.cuda_cmake_flags("/usr/bin/nvcc", (), [])


# --- toolkit choice ---------------------------------------------------------------------------

def test_build_toolkit_is_the_newest_found_or_the_one_installed():
    facts = gpu.parse_gpu_host(lines("host-rtx5090.txt"))
    assert buildplan.build_toolkit(facts, False, "12-8") == Toolkit("/usr/local/cuda-12.8/bin/nvcc", "12.8.93")
    assert buildplan.build_toolkit(facts, True, "12-9") == Toolkit("/usr/local/cuda-12.9/bin/nvcc", "12.9")
    assert buildplan.build_toolkit(GpuFacts(), False, "12-8") is None


def test_toolkit_nvcc_path_accepts_both_spellings():
    assert buildplan.toolkit_nvcc_path("12-8") == buildplan.toolkit_nvcc_path("12.8") == "/usr/local/cuda-12.8/bin/nvcc"


@pytest.mark.parametrize("toolkit, driver", [
    ("12.8", "570.26"), ("12.8.93", "570.26"), ("13.0.88", "580.65.06"), ("12.4", "550.54.14"),
    ("12.5", "550.54.14"), ("13.1", "580.65.06"), ("11.8", None)])
def test_driver_needed(toolkit, driver):
    assert preflight.driver_needed(toolkit) == driver


# --- operations/cuda.py: the optional toolkit install -----------------------------------------

import hashlib  # noqa: E402

from pyinfra.api.exceptions import OperationValueError  # noqa: E402
from pyinfra.context import ctx_host  # noqa: E402
from pyinfra.facts.deb import DebPackages  # noqa: E402
from pyinfra.facts.files import Sha256File  # noqa: E402
from pyinfra.facts.server import Arch, LinuxDistribution  # noqa: E402

from llmhost import cuda  # noqa: E402

UBUNTU_2404 = {"name": "Ubuntu", "major": 24, "minor": 4, "release_meta": {}}
PIN_SHA = hashlib.sha256(cuda.PIN_TEXT.encode()).hexdigest()


class FakeHost:
    """Answers the facts an operation reads; records noops."""

    def __init__(self, packages, pin_sha=None, distro=UBUNTU_2404, arch="x86_64"):
        self.facts = {DebPackages: packages, Sha256File: pin_sha, LinuxDistribution: distro,
                      Arch: arch}
        self.asked: list[type] = []
        self.noops: list[str] = []

    def get_fact(self, cls, **kwargs):
        self.asked.append(cls)
        return self.facts[cls]

    def noop(self, description):
        self.noops.append(description)


def run_toolkit_op(fake, version="12-8"):
    with ctx_host.use(fake):
        return list(cuda.toolkit._inner(version=version))


def test_toolkit_op_on_a_fresh_host():
    fake = FakeHost({"python3": ["3.12.3"]})
    commands = run_toolkit_op(fake)
    assert [str(c) for c in commands[:3]] == [
        f"{cuda.APT} install -y --no-install-recommends ca-certificates",
        "t=$(mktemp --suffix=.deb) && python3 -c 'import sys, urllib.request; "
        "urllib.request.urlretrieve(sys.argv[1], sys.argv[2])' https://developer.download.nvidia.com"
        "/compute/cuda/repos/ubuntu2404/x86_64/cuda-keyring_1.1-1_all.deb \"$t\" && dpkg -i \"$t\"; "
        "r=$?; rm -f \"$t\"; exit $r",
        f"printf '%s' {shlex.quote(cuda.PIN_TEXT)} > /etc/apt/preferences.d/llmhost-cuda-no-driver",
    ]
    assert str(commands[3]) == f"{cuda.APT} update -q"
    assert str(commands[4]) == f"{cuda.APT} install -y --no-install-recommends cuda-toolkit-12-8"
    assert str(commands[5]) == "test -x /usr/local/cuda-12.8/bin/nvcc"
    assert len(commands) == 6 and fake.noops == []
    for command in commands[:3] + [commands[5]]:
        assert subprocess.run(["sh", "-n", "-c", str(command)]).returncode == 0


def test_toolkit_op_is_a_noop_when_converged():
    fake = FakeHost({"cuda-keyring": ["1.1-1"], "ca-certificates": ["2024"],
                     "cuda-toolkit-12-8": ["12.8.1-1"]}, pin_sha=PIN_SHA)
    assert run_toolkit_op(fake) == []
    assert fake.noops == ["cuda-toolkit-12-8 is installed from NVIDIA's repository"]
    # a converged host reads two facts, not the distro
    assert fake.asked == [DebPackages, Sha256File]


def test_toolkit_op_installs_only_what_is_missing():
    fake = FakeHost({"cuda-keyring": ["1.1-1"], "cuda-toolkit-12-4": ["12.4.1-1"]}, pin_sha=PIN_SHA)
    commands = run_toolkit_op(fake, version="12.8")
    assert [str(commands[0]), str(commands[-1])] == [
        f"{cuda.APT} update -q", "test -x /usr/local/cuda-12.8/bin/nvcc"]
    assert len(commands) == 3


def test_toolkit_op_refuses_an_unsupported_distro():
    fake = FakeHost({}, distro={"name": "Debian", "major": 11, "minor": None})
    with pytest.raises(OperationValueError, match="Ubuntu 22.04, 24.04 and Debian 12"):
        run_toolkit_op(fake)


def test_pin_command_writes_exactly_the_pinned_text(tmp_path):
    target = tmp_path / "pin"
    with ctx_host.use(FakeHost({})):
        (command,) = list(cuda._driver_pin(str(target)))
    assert subprocess.run(["sh", "-c", command]).returncode == 0
    assert hashlib.sha256(target.read_bytes()).hexdigest() == PIN_SHA


@pytest.mark.parametrize("distro, arch, repo", [
    (UBUNTU_2404, "x86_64", "ubuntu2404"),
    ({"name": "Ubuntu", "major": 22, "minor": 4}, "x86_64", "ubuntu2204"),
    ({"name": "Debian", "major": 12, "minor": 7}, "x86_64", "debian12"),
    ({"name": "Ubuntu", "major": 20, "minor": 4}, "x86_64", None),
    (UBUNTU_2404, "aarch64", None),
])
def test_repo_for(distro, arch, repo):
    assert cuda.repo_for(distro, arch) == repo


def test_keyring_url_and_package_names():
    assert cuda.keyring_url("debian12") == (
        "https://developer.download.nvidia.com/compute/cuda/repos/debian12/x86_64/"
        "cuda-keyring_1.1-1_all.deb")
    assert cuda.toolkit_package("12.8") == cuda.toolkit_package("12-8") == "cuda-toolkit-12-8"


def test_toolkit_preflight_problems():
    assert cuda.toolkit_preflight_problems("gpu1", UBUNTU_2404, "x86_64", "12-8") == []
    assert cuda.toolkit_preflight_problems(
        "gpu1", {"name": "Ubuntu", "major": 20, "minor": 4}, "x86_64", "12.8-1") == [
        "host gpu1: llm_cuda_toolkit_install: found Ubuntu 20.4 on x86_64, expected Ubuntu 22.04, "
        "Ubuntu 24.04 or Debian 12 on x86_64 (NVIDIA's apt repositories we use); fix: install "
        "CUDA yourself and set llm_cuda_toolkit_install: false"]
    assert cuda.toolkit_preflight_problems("gpu1", UBUNTU_2404, "x86_64", "latest") == [
        "host gpu1: llm_cuda_toolkit_version: found 'latest', expected MAJOR-MINOR like '12-8'; "
        "fix: set llm_cuda_toolkit_version: '12-8'"]


def test_the_preflight_refuses_a_toolkit_install_on_a_distribution_nvidia_does_not_serve():
    from llmhost import preflight
    from llmhost.settings import load_host_settings

    settings = load_host_settings("gpu1", {"llm_cuda_toolkit_install": True, "llm_services": {
        "main": {"port": 1, "gpu_layers": 99, "model": {"source": "local", "path": "/m.gguf"}}}})
    fake = FakeHost({}, distro={"name": "Fedora", "major": 40, "minor": None}, arch="x86_64")
    with ctx_host.use(fake):
        problems = preflight.toolkit_install_problems(settings)
    assert problems == [
        "host gpu1: llm_cuda_toolkit_install: found Fedora 40.0 on x86_64, expected Ubuntu 22.04, "
        "Ubuntu 24.04 or Debian 12 on x86_64 (NVIDIA's apt repositories we use); fix: install CUDA "
        "yourself and set llm_cuda_toolkit_install: false"]

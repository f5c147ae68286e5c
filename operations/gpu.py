"""What a host's GPUs, driver and CUDA toolkits are, and what that means for the build.

One fact (``GpuHost``) reads everything in one round trip: the no-op rerun pays one SSH command for
all of it. The parsers and the arithmetic on their results are pure functions, tested on recorded
outputs in tests/fixtures/gpu/. Preflight messages are one line each:
``host NAME: <check>: found X, expected Y; fix: Z``.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Iterable, Mapping, Sequence

from pyinfra.api import FactBase

if TYPE_CHECKING:  # hints only: the H100 proof imports this module without pyinfra
    from llmhost.settings import HostSettings

SMI_QUERY = ("nvidia-smi --query-gpu=index,name,compute_cap,driver_version,memory.total "
             "--format=csv,noheader,nounits")

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

# K/V types ggml can compile flash-attention vector kernels for (ggml/cmake/common.cmake
# FA_TYPES at the pinned commit). Any other type in GGML_CUDA_FA_QUANTS is a cmake FATAL_ERROR.
FA_TYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "bf16", "f16")
# A flash-attention K/V pair: (K type, V type). One type everywhere; fa_quants() is the one place
# that writes it for cmake ("q4_0-q8_0;..."), system_info_fa_pairs() the one that reads it back.
KVPair = tuple[str, str]
F16 = ("f16", "f16")
# ggml's default list, for builds that want what upstream compiles plus their own pairs.
FA_DEFAULT_PAIRS = (("q4_0", "q4_0"), ("q8_0", "q8_0"), F16, ("bf16", "bf16"))

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


# ---------------------------------------------------------------------------------------------
# What the fact returns


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    compute_cap: str  # "12.0"; "" when the driver cannot say
    driver_version: str
    memory_mib: int

    def to_json(self) -> dict:  # `pyinfra HOST fact llmhost.gpu.NvidiaGpus` prints it
        return asdict(self)

    @property
    def label(self) -> str:
        return f"GPU {self.index} {self.name} (compute capability {self.compute_cap or 'unknown'})"


@dataclass(frozen=True)
class KernelModule:
    flavour: str | None = None  # "open", "proprietary", or None when no nvidia module is loaded
    version: str | None = None
    nouveau: bool = False


@dataclass(frozen=True)
class Toolkit:
    path: str      # nvcc, as the build should call it
    version: str   # "12.8.93" (or "12.8" for a toolkit that is only planned)

    @property
    def release(self) -> tuple[int, int]:
        return _release(self.version)


@dataclass(frozen=True)
class Disk:
    path: str
    free_bytes: int
    mount: str


@dataclass(frozen=True)
class GpuFacts:
    gpus: tuple[Gpu, ...] = ()
    smi: str = "absent"  # "absent", "ok" or "failed: <its first line>"
    module: KernelModule = field(default_factory=KernelModule)
    pci_gpus: int = 0    # NVIDIA display/3D devices on the PCI bus, driven or not
    toolkits: tuple[Toolkit, ...] = ()
    mem_total_bytes: int = 0
    mem_available_bytes: int = 0
    disks: tuple[Disk, ...] = ()
    # /proc/devices' character devices as (major, name): what DeviceAllow= names resolve to.
    char_devices: tuple[tuple[int, str], ...] = ()

    @property
    def driver_version(self) -> str | None:
        if self.gpus:
            return self.gpus[0].driver_version
        return self.module.version

    def to_json(self) -> dict:  # `pyinfra HOST fact llmhost.gpu.GpuHost` prints it
        return asdict(self)

    def free_bytes_by_path(self) -> dict[str, int]:
        return {d.path: d.free_bytes for d in self.disks}

    def mount_by_path(self) -> dict[str, str]:
        return {d.path: d.mount for d in self.disks}


# ---------------------------------------------------------------------------------------------
# Parsers (pure; each takes the lines a command printed)


def parse_nvidia_smi(lines: Iterable[str]) -> list[Gpu]:
    """GPUs from SMI_QUERY output; lines that are not a GPU row (errors, blanks) are skipped."""
    gpus = []
    for line in lines:
        gpu = _parse_smi_row(line)
        if gpu:
            gpus.append(gpu)
    return gpus


def _parse_smi_row(line: str) -> Gpu | None:
    head, sep, rest = line.strip().partition(",")
    if not sep or not head.strip().isdigit():
        return None
    parts = rest.rsplit(",", 3)  # a name may hold a comma; the last three fields never do
    if len(parts) != 4:
        return None
    name, cap, driver, memory = (p.strip() for p in parts)
    memory = memory.removesuffix("MiB").strip()  # tolerate output made without nounits
    if not re.fullmatch(r"\d+\.\d+", cap):
        cap = ""  # "[N/A]" on drivers too old to report it
    return Gpu(int(head), name, cap, driver, int(memory) if memory.isdigit() else 0)


_MODULE_RE = re.compile(r"NVIDIA UNIX (Open )?.*?Kernel Module(?: for \S+)?\s+(\d+(?:\.\d+)+)")


def parse_driver_version_file(text: str) -> KernelModule:
    """Flavour and version from /proc/driver/nvidia/version (empty when no module is loaded)."""
    match = _MODULE_RE.search(text)
    if not match:
        return KernelModule()
    return KernelModule("open" if match.group(1) else "proprietary", match.group(2))


_NVCC_RE = re.compile(r"release (\d+\.\d+), V(\d+(?:\.\d+)+)")


def parse_nvcc_version(text: str) -> str | None:
    """"12.8.93" from `nvcc --version` output, or None when it is not nvcc's."""
    match = _NVCC_RE.search(text)
    return match.group(2) if match else None


def parse_meminfo(lines: Iterable[str]) -> dict[str, int]:
    """/proc/meminfo fields in bytes."""
    values = {}
    for line in lines:
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            scale = 1024 if parts[1:2] == ["kB"] else 1
            values[key.strip()] = int(parts[0]) * scale
    return values


def parse_proc_devices(lines: Iterable[str]) -> tuple[tuple[int, str], ...]:
    """(major, name) of the character devices in /proc/devices (its block devices are skipped)."""
    found, in_char = [], False
    for line in lines:
        text = line.strip()
        if text.endswith("devices:"):
            in_char = text == "Character devices:"
            continue
        major, _, name = text.partition(" ")
        if in_char and major.isdigit() and name:
            found.append((int(major), name.strip()))
    return tuple(found)


def parse_gpu_host(lines: Sequence[str]) -> GpuFacts:
    """GpuFacts from the sectioned output of GpuHost's command ("### name args" headers)."""
    sections: list[tuple[list[str], list[str]]] = []
    for line in lines:
        if line.startswith("### "):
            sections.append((line[4:].split(), []))
        elif sections:
            sections[-1][1].append(line)
    gpus: list[Gpu] = []
    smi, module, nouveau, pci = "absent", KernelModule(), False, 0
    toolkits: dict[str, Toolkit] = {}
    memory: dict[str, int] = {}
    disks: list[Disk] = []
    char_devices: tuple[tuple[int, str], ...] = ()
    for header, body in sections:
        kind, args = header[0], header[1:]
        if kind == "nvidia-smi":
            gpus = parse_nvidia_smi(body)
            smi = _smi_state(args, body, gpus)
        elif kind == "driver":
            module = parse_driver_version_file("\n".join(body))
        elif kind == "modules":
            nouveau = "nouveau" in (b.strip() for b in body)
        elif kind == "pci":
            pci = sum(1 for b in body if b.strip())
        elif kind == "nvcc" and len(args) == 2:
            version = parse_nvcc_version("\n".join(body))
            # /usr/local/cuda is usually a link to a versioned folder: keep one per real file
            if version and args[1] not in toolkits:
                toolkits[args[1]] = Toolkit(args[1], version)
        elif kind == "meminfo":
            memory = parse_meminfo(body)
        elif kind == "disk" and len(args) == 3 and args[1].isdigit():
            disks.append(Disk(args[0], int(args[1]), args[2]))
        elif kind == "devices":
            char_devices = parse_proc_devices(body)
    return GpuFacts(
        gpus=tuple(gpus), smi=smi,
        module=KernelModule(module.flavour, module.version, nouveau),
        pci_gpus=pci, toolkits=tuple(toolkits.values()),
        mem_total_bytes=memory.get("MemTotal", 0),
        mem_available_bytes=memory.get("MemAvailable", 0),
        disks=tuple(disks),
        char_devices=char_devices,
    )


def _smi_state(args: list[str], body: list[str], gpus: list[Gpu]) -> str:
    if args == ["absent"]:
        return "absent"
    if args == ["0"] and gpus:
        return "ok"
    first = next((b.strip() for b in body if b.strip()), "no output")
    return f"failed: {first}" if args != ["0"] else "failed: it lists no GPU"


# ---------------------------------------------------------------------------------------------
# Facts


def gpu_host_command(paths: Sequence[str] = ()) -> str:
    """One POSIX sh snippet printing every section parse_gpu_host reads; it always exits 0."""
    parts = [
        "if command -v nvidia-smi >/dev/null 2>&1; then "
        f"o=$({SMI_QUERY} 2>&1); echo \"### nvidia-smi $?\"; printf '%s\\n' \"$o\"; "
        "else echo '### nvidia-smi absent'; fi",
        "echo '### driver'; cat /proc/driver/nvidia/version 2>/dev/null",
        "echo '### modules'; awk '$1==\"nouveau\"||$1==\"nvidia\"{print $1}' /proc/modules 2>/dev/null",
        # NVIDIA (0x10de) display controllers (class 0x03xxxx): a GPU the loaded module
        # cannot drive is on the bus but missing from nvidia-smi.
        "echo '### pci'; for d in /sys/bus/pci/devices/*; do "
        "[ -r \"$d/vendor\" ] && [ \"$(cat \"$d/vendor\")\" = 0x10de ] || continue; "
        "case \"$(cat \"$d/class\")\" in 0x03*) echo \"${d##*/}\";; esac; done",
        "for n in \"$(command -v nvcc 2>/dev/null)\" /usr/local/cuda*/bin/nvcc; do "
        "[ -n \"$n\" ] && [ -x \"$n\" ] || continue; "
        "echo \"### nvcc $n $(readlink -f \"$n\")\"; \"$n\" --version 2>&1 | grep release; done",
        "echo '### meminfo'; grep -E '^(MemTotal|MemAvailable):' /proc/meminfo",
        "echo '### devices'; cat /proc/devices 2>/dev/null",
    ]
    for path in paths:
        q = shlex.quote(path)
        # a folder the deploy has not made yet: measure the filesystem it will be made on
        parts.append(
            f"p={q}; while [ ! -e \"$p\" ]; do p=$(dirname \"$p\"); done; "
            f"echo \"### disk {q} $(df -P -B1 \"$p\" | awk 'NR==2{{print $4, $6}}')\"")
    parts.append("true")
    return "; ".join(p for p in parts if p)


class GpuHost(FactBase[GpuFacts]):
    """GPUs, kernel module, CUDA toolkits, RAM and free disk at ``paths``: one round trip."""

    def command(self, paths: Sequence[str] = ()) -> str:
        return gpu_host_command(tuple(paths))

    @staticmethod
    def default() -> GpuFacts:
        return GpuFacts()

    def process(self, output: list[str]) -> GpuFacts:
        return parse_gpu_host(output)


class NvidiaGpus(FactBase[list[Gpu]]):
    """Just the GPUs; [] when nvidia-smi is absent or fails."""

    def command(self) -> str:
        return f"if command -v nvidia-smi >/dev/null 2>&1; then {SMI_QUERY} 2>&1; fi; true"

    @staticmethod
    def default() -> list[Gpu]:
        return []

    def process(self, output: list[str]) -> list[Gpu]:
        return parse_nvidia_smi(output)


# ---------------------------------------------------------------------------------------------
# Device access of GPU services

# The NVIDIA driver's fixed character major: the GPUs (/dev/nvidia0..), /dev/nvidiactl and
# /dev/nvidia-modeset. Drivers before ~550 name it "nvidia-frontend" in /proc/devices, current
# ones "nvidia" and "nvidiactl" (580 on the H200).
NVIDIA_MAJOR = 195
# The other groups a CUDA process opens: unified memory (every CUDA context) and the MIG
# capability nodes. The fabric groups (nvidia-nvswitch, nvidia-nvlink, imex channels) are the
# fabric manager's, not a CUDA process's, and stay closed.
CUDA_DEVICE_GROUPS = ("nvidia-uvm", "nvidia-caps")


class NoNvidiaDevices(ValueError):
    """The host's /proc/devices names no NVIDIA major 195: its driver is not loaded."""


def cuda_device_allow(char_devices: Sequence[tuple[int, str]]) -> tuple[str, ...]:
    """DeviceAllow= groups a CUDA service needs on this host, by its own /proc/devices names.

    nvidia-uvm is always listed: its module may load only when the first CUDA program (or the
    llmhost-nvidia-uvm unit, which GPU services start after) asks for it, and systemd resolves
    the name when the service starts. Every other name must be one /proc/devices has now.
    """
    names = [name for major, name in char_devices if major == NVIDIA_MAJOR]
    if not names:
        raise NoNvidiaDevices("found no character major 195 (nvidia) in /proc/devices: the "
                              "NVIDIA kernel module is not loaded")
    present = {name for _, name in char_devices}
    extra = [name for name in CUDA_DEVICE_GROUPS if name in present or name == "nvidia-uvm"]
    return tuple(f"char-{name}" for name in dict.fromkeys(names + extra))


# ---------------------------------------------------------------------------------------------
# Build inputs


def cuda_arch_for(compute_cap: str) -> str:
    """CMAKE_CUDA_ARCHITECTURES entry for a compute capability: "8.9" -> "89".

    12.x gets the arch-specific "12Xa" (what ggml's CMake rewrites a plain 12X to, and what
    the Blackwell FP4 tensor-core path needs); 10.x stays plain, as ggml compiles it.
    """
    major, minor = _cap(compute_cap)
    arch = f"{major}{minor}"
    return arch + "a" if major == 12 else arch


def architectures_for(gpus: Iterable[Gpu], override: Sequence[str] | None) -> tuple[str, ...]:
    """The arch list to build: the override as given, else one entry per kind of GPU present."""
    if override:
        return tuple(override)
    archs = {cuda_arch_for(g.compute_cap) for g in gpus if g.compute_cap}
    return tuple(sorted(archs, key=_arch_number))


def system_info_archs(archs: Iterable[str]) -> str:
    """What llama.cpp's system_info prints as ARCHS for a build of ``archs``: "610,1200"."""
    return ",".join(str(n * 10) for n in sorted({_arch_number(a) for a in archs}))


def compiled_fa_pairs(pairs: Iterable[KVPair]) -> tuple[KVPair, ...]:
    """The pairs a build compiles for services needing ``pairs``: f16/f16 first, then the rest
    sorted. Pairs ggml cannot compile (f32, iq4_nl) are left out: naming them fails the
    configure, and llama.cpp converts them at run time anyway (see uncompilable_fa_pairs)."""
    pairs = list(pairs)
    wanted = set(pairs) - set(uncompilable_fa_pairs(pairs)) - {F16}
    return (F16, *sorted(wanted))


def fa_quants(pairs: Iterable[KVPair]) -> str:
    """GGML_CUDA_FA_QUANTS for these pairs ("f16-f16;q4_0-q8_0")."""
    return ";".join(f"{k}-{v}" for k, v in compiled_fa_pairs(pairs))


def system_info_fa_pairs(system_info: str) -> tuple[KVPair, ...] | None:
    """The pairs llama.cpp's system_info line lists as compiled ("FA_QUANTS = f16-f16,q4_0-q8_0"),
    or None when it lists none (a CPU build)."""
    match = re.search(r"FA_QUANTS = ([^|]+)", system_info)
    if not match:
        return None
    return tuple(tuple(item.strip().split("-", 1)) for item in match.group(1).split(",") if "-" in item)


def uncompilable_fa_pairs(pairs: Iterable[KVPair]) -> list[KVPair]:
    """Pairs with a type ggml has no flash-attention vector kernel for."""
    return sorted({(k, v) for k, v in pairs if k not in FA_TYPES or v not in FA_TYPES})


def cuda_cmake_flags(nvcc_path: str, archs: Sequence[str], fa_pairs: Iterable[KVPair]) -> list[str]:
    """cmake -D arguments for a CUDA build; each is one argv word (quote it for a shell:
    the lists hold ';')."""
    if not archs:
        raise ValueError("no CUDA architectures: ggml would build its generic multi-arch default")
    return [
        "-DGGML_CUDA=ON",
        f"-DCMAKE_CUDA_COMPILER={nvcc_path}",
        f"-DCMAKE_CUDA_ARCHITECTURES={';'.join(archs)}",
        f"-DGGML_CUDA_FA_QUANTS={fa_quants(fa_pairs)}",
    ]


def toolkit_nvcc_path(version: str) -> str:
    """Where NVIDIA's cuda-toolkit-X-Y package puts nvcc (not on PATH)."""
    major, minor = _release(version)
    return f"/usr/local/cuda-{major}.{minor}/bin/nvcc"


def newest_toolkit(toolkits: Iterable[Toolkit]) -> Toolkit | None:
    return max(toolkits, key=lambda t: _version_tuple(t.version), default=None)


def build_toolkit(facts: GpuFacts, install_enabled: bool, install_version: str,
                  archs: Sequence[str] = ()) -> Toolkit | None:
    """The nvcc the build will use: the one we install when enabled, else the newest found that
    compiles every arch in ``archs`` (CUDA 13 dropped sm < 75), else the newest found."""
    if install_enabled:
        major, minor = _release(install_version)
        return Toolkit(toolkit_nvcc_path(install_version), f"{major}.{minor}")
    low, _, high, _ = _toolkit_bounds(archs)
    fitting = [t for t in facts.toolkits if low <= t.release and (high is None or t.release < high)]
    return newest_toolkit(fitting) or newest_toolkit(facts.toolkits)


# ---------------------------------------------------------------------------------------------
# Preflight


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


def disk_problems(host_name: str, free_bytes_by_path: Mapping[str, int],
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
    if needed is None or _version_tuple(driver) >= _version_tuple(needed):
        return []
    major, minor = toolkit.release
    fix = f"upgrade the NVIDIA driver to {needed} or newer and reboot (the deploy never changes it)"
    if install_enabled:
        fix += ", or set llm_cuda_toolkit_version to an older toolkit"
    return [f"{where}: NVIDIA driver: found {driver}, expected {needed} or newer for CUDA "
            f"{major}.{minor} ({toolkit.path}); fix: {fix}"]


def driver_needed(toolkit_version: str) -> str | None:
    """Minimum driver for a toolkit release; None below the table (no check)."""
    release = _release(toolkit_version)
    needed = None
    for row_release, driver in DRIVER_FOR_TOOLKIT:
        if release >= row_release:
            needed = driver
    return needed


def _module_problems(where: str, facts: GpuFacts) -> list[str]:
    problems = []
    if facts.module.flavour == "proprietary":
        for gpu in facts.gpus:
            if gpu.compute_cap and _cap(gpu.compute_cap)[0] >= 10:
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


def _toolkit_bounds(archs: Sequence[str]) -> tuple[tuple[int, int], list[str], tuple[int, int] | None, list[str]]:
    """(lowest release, archs that need it, first release too new, archs it drops)."""
    low, low_archs, high, high_archs = (0, 0), [], None, []
    for arch in archs:
        n = _arch_number(arch)
        need = (12, 9) if n == 121 else (12, 8) if n >= 100 else (11, 8) if n >= 89 else (0, 0)
        if need > low:
            low, low_archs = need, [arch]
        elif need == low and need != (0, 0):
            low_archs.append(arch)
        if n < 75:  # CUDA 13 dropped Maxwell, Pascal and Volta
            high = (13, 0)
            high_archs.append(arch)
    return low, low_archs, high, high_archs


def _toolkit_problems(where: str, facts: GpuFacts, archs: Sequence[str], install_enabled: bool,
                      install_version: str) -> list[str]:
    low, low_archs, high, high_archs = _toolkit_bounds(archs)
    need_text = f"{low[0]}.{low[1]} or newer" if low_archs else "from CUDA 12 or newer"
    for_archs = f" for CUDA architectures {';'.join(low_archs)}" if low_archs else ""
    if install_enabled:
        release = _release(install_version)
        if low_archs and release < low:
            return [f"{where}: llm_cuda_toolkit_version: found {install_version!r}, expected "
                    f"{low[0]}-{low[1]} or newer{for_archs}; fix: set llm_cuda_toolkit_version: "
                    f"'{low[0]}-{low[1]}'"]
        if high and release >= high:
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
    covered = {_arch_number(a) for a in override}
    return [
        f"{where}: llm_cuda_architectures: found {list(override)!r}, expected it to include "
        f"{cuda_arch_for(g.compute_cap)} for {g.label}; fix: add '{cuda_arch_for(g.compute_cap)}' "
        f"or unset llm_cuda_architectures to build for the GPUs present"
        for g in gpus
        if g.compute_cap and _arch_number(cuda_arch_for(g.compute_cap)) not in covered
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


# ---------------------------------------------------------------------------------------------
# Small helpers


def _cap(compute_cap: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)\.(\d)", compute_cap.strip())
    if not match:
        raise ValueError(f"compute capability {compute_cap!r} is not MAJOR.MINOR")
    return int(match.group(1)), int(match.group(2))


def _arch_number(arch: str) -> int:
    """89 for "89", "89-real"; 120 for "120a", "120f-virtual"."""
    match = re.match(r"(\d+)", arch)
    if not match:
        raise ValueError(f"CUDA architecture {arch!r} does not start with digits")
    return int(match.group(1))


def _release(version: str) -> tuple[int, int]:
    """(12, 8) from "12.8.93", "12.8" or "12-8"."""
    parts = re.split(r"[.-]", version.strip())
    if len(parts) < 2 or not parts[0].isdigit() or not parts[1].isdigit():
        raise ValueError(f"CUDA version {version!r} is not MAJOR.MINOR or MAJOR-MINOR")
    return int(parts[0]), int(parts[1])


def _version_tuple(version: str) -> tuple[int, ...]:
    """(570, 26, 0) from "570.26": padded, so "570.26" == "570.26.0" < "570.26.1"."""
    numbers = [int(p) for p in re.findall(r"\d+", version)]
    return tuple(numbers + [0] * (3 - len(numbers)))


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"

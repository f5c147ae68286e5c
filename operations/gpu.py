"""What a host's GPUs, driver, kernel module, CUDA toolkits and device majors are: the dataclasses,
their parsers, and the one fact (``GpuHost``) that reads everything in one round trip, so the
no-op rerun pays one SSH command for all of it. The parsers are pure functions, tested on
recorded outputs in tests/fixtures/gpu/. Build inputs are llmhost.buildplan's; checks are
llmhost.preflight's.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

from pyinfra.api import FactBase

SMI_QUERY = ("nvidia-smi --query-gpu=index,name,compute_cap,driver_version,memory.total "
             "--format=csv,noheader,nounits")


# ---------------------------------------------------------------------------------------------
# What the fact returns


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    compute_cap: str  # "12.0"; "" when the driver cannot say
    driver_version: str
    memory_mib: int

    def to_json(self) -> dict:  # in the JSON of `pyinfra HOST fact llmhost.gpu.GpuHost`
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
        return release(self.version)

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
    disks: tuple[Disk, ...] = ()
    # /proc/devices' character devices as (major, name): what DeviceAllow= names resolve to.
    char_devices: tuple[tuple[int, str], ...] = ()

    @property
    def driver_version(self) -> str | None:
        if self.gpus:
            return self.gpus[0].driver_version
        return self.module.version

    def to_json(self) -> dict:  # in the JSON of `pyinfra HOST fact llmhost.gpu.GpuHost`
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
        elif kind == "disk" and len(args) == 3 and args[1].isdigit():
            disks.append(Disk(args[0], int(args[1]), args[2]))
        elif kind == "devices":
            char_devices = parse_proc_devices(body)
    return GpuFacts(
        gpus=tuple(gpus), smi=smi,
        module=KernelModule(module.flavour, module.version, nouveau),
        pci_gpus=pci, toolkits=tuple(toolkits.values()),
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
# The fact


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
# Versions and compute capabilities


def cap_tuple(compute_cap: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)\.(\d)", compute_cap.strip())
    if not match:
        raise ValueError(f"compute capability {compute_cap!r} is not MAJOR.MINOR")
    return int(match.group(1)), int(match.group(2))

def arch_number(arch: str) -> int:
    """89 for "89", "89-real"; 120 for "120a", "120f-virtual"."""
    match = re.match(r"(\d+)", arch)
    if not match:
        raise ValueError(f"CUDA architecture {arch!r} does not start with digits")
    return int(match.group(1))

def release(version: str) -> tuple[int, int]:
    """(12, 8) from "12.8.93", "12.8" or "12-8"."""
    parts = re.split(r"[.-]", version.strip())
    if len(parts) < 2 or not parts[0].isdigit() or not parts[1].isdigit():
        raise ValueError(f"CUDA version {version!r} is not MAJOR.MINOR or MAJOR-MINOR")
    return int(parts[0]), int(parts[1])

def version_tuple(version: str) -> tuple[int, ...]:
    """(570, 26, 0) from "570.26": padded, so "570.26" == "570.26.0" < "570.26.1"."""
    numbers = [int(p) for p in re.findall(r"\d+", version)]
    return tuple(numbers + [0] * (3 - len(numbers)))

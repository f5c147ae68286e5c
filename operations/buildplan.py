"""Build inputs: what llama.cpp build a host gets, computed from its settings and its GPUs
(llmhost.gpu's facts). The CUDA archs of the GPUs present (12.x as the arch-specific 12Xa of the
Blackwell FP4 path), the flash-attention K/V pairs its GPU services use, the toolkit able to
compile both, the CPU baselines to try (llm_cpu_baseline), and the cmake flags; the build folder
is keyed by all of them. Pure functions.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

from llmhost.gpu import Gpu, GpuFacts, Toolkit, arch_number, cap_tuple, release, version_tuple
from llmhost.settings import CPU_BASELINES, FA_TYPES, HostSettings

TARGETS = ("llama-server", "llama-bench")

# Offline-safe, server-only configuration (llama.cpp's CMakeLists at the pinned commit): no web
# UI download at build time, no OpenSSL (models come from our own downloader, not -hf), no tests
# or examples.
BASE_CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DGGML_CCACHE=ON",
)


# A flash-attention K/V pair: (K type, V type). One type everywhere; fa_quants() is the one place
# that writes it for cmake ("q4_0-q8_0;..."), system_info_fa_pairs() the one that reads it back.
KVPair = tuple[str, str]
F16 = ("f16", "f16")
# ggml's default list, for builds that want what upstream compiles plus their own pairs.
FA_DEFAULT_PAIRS = (("q4_0", "q4_0"), ("q8_0", "q8_0"), F16, ("bf16", "bf16"))


# CPU baselines (settings.CPU_BASELINES, best first): what ggml's CPU code is compiled for.
# "native" is -march=native (GGML_NATIVE=ON, llama.cpp's default); the x86-64 levels are the
# psABI's (v2: SSE4.2, v3: AVX2/FMA/F16C/BMI2, v4: AVX-512 F/CD/BW/DQ/VL), spelled in ggml's
# own options, without VNNI, BF16, VBMI or AMX. A CPU whose CPUID lists more than its hypervisor
# lets it run (the H200 VM: AMX, AVX512-FP16) faults on native code; the build's CPU self-test
# finds that, and auto tries the next baseline.

# Every x86 instruction-set option of ggml at the pinned commit (ggml/CMakeLists.txt; used by
# ggml/src/ggml-cpu/CMakeLists.txt when GGML_NATIVE is OFF). Each is passed ON or OFF, so a
# build folder reconfigured for another baseline keeps nothing of the one before.
X86_OPTIONS = ("SSE42", "AVX", "AVX2", "BMI2", "FMA", "F16C", "AVX_VNNI", "AVX512",
               "AVX512_VBMI", "AVX512_VNNI", "AVX512_BF16", "AMX_TILE", "AMX_INT8", "AMX_BF16")
_X86_V2 = ("SSE42",)
_X86_V3 = (*_X86_V2, "AVX", "AVX2", "BMI2", "FMA", "F16C")
# GGML_AVX512 is -mavx512f -mavx512cd -mavx512vl -mavx512dq -mavx512bw: exactly v4's AVX-512.
_X86_V4 = (*_X86_V3, "AVX512")
X86_LEVELS = {"x86-64-v4": _X86_V4, "x86-64-v3": _X86_V3, "x86-64-v2": _X86_V2}
# The options system_info names when they are compiled in (ggml-cpu.cpp get_features); SSE4.2,
# AMX_TILE and AMX_BF16 it does not name.
SYSTEM_INFO_FEATURES = ("AVX", "AVX2", "BMI2", "FMA", "F16C", "AVX_VNNI", "AVX512", "AVX512_VBMI",
                        "AVX512_VNNI", "AVX512_BF16", "AMX_INT8")


def cpu_baseline_flags(baseline: str) -> tuple[str, ...]:
    """The cmake options that compile ggml's CPU code for ``baseline``."""
    if baseline == "native":
        return ("-DGGML_NATIVE=ON",)
    on = X86_LEVELS[baseline]
    return ("-DGGML_NATIVE=OFF",
            *(f"-DGGML_{option}={'ON' if option in on else 'OFF'}" for option in X86_OPTIONS))


def cpu_candidates(requested: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """(baseline, its cmake flags) to try in order: every baseline, best first, for auto; the
    one pinned otherwise (a pinned baseline that faults fails the host)."""
    names = CPU_BASELINES if requested == "auto" else (requested,)
    return tuple((name, cpu_baseline_flags(name)) for name in names)


def cpu_baseline_features(baseline: str) -> dict[str, bool]:
    """What system_info must show (True) and must not show (False) for a build of ``baseline``;
    nothing for native, whose features are the build host's."""
    if baseline not in X86_LEVELS:
        return {}
    return {feature: feature in X86_LEVELS[baseline] for feature in SYSTEM_INFO_FEATURES}


@dataclass(frozen=True)
class Build:
    source_dir: str
    build_dir: str
    cmake_flags: tuple[str, ...]
    # Fragments system_info must show before the build is used (CUDA archs, FA pairs, FP4).
    expected_system_info: tuple[str, ...] = ()
    nvcc: str | None = None
    toolkit_version: str | None = None          # the CUDA toolkit's release ("12.8"); None for CPU
    archs: tuple[str, ...] = ()                  # CUDA archs compiled; () for a CPU build
    fa_pairs: tuple[tuple[str, str], ...] = ()   # flash-attention (K, V) pairs compiled
    # GPUs of the host it is built for: what a GPU service without `gpus` offloads to (not
    # part of the build's key: the same build serves any number of GPUs of its archs).
    gpu_count: int = 0
    # llm_cpu_baseline: the build tries cpu_candidates(cpu_baseline) in order, and the first
    # whose CPU self-test computes is the build (its marker records which).
    cpu_baseline: str = "auto"

    @property
    def server_binary(self) -> str:
        return f"{self.build_dir}/bin/llama-server"

    @property
    def bench_binary(self) -> str:
        return f"{self.build_dir}/bin/llama-bench"


def cmake_flags(settings: HostSettings, backend_flags: tuple[str, ...] = ()) -> tuple[str, ...]:
    """Every cmake -D of the build; the build directory's name hashes them."""
    return (
        *BASE_CMAKE_FLAGS,
        f"-DLLAMA_BUILD_COMMIT={settings.llamacpp_commit}",
        f"-DLLAMA_BUILD_NUMBER={settings.llamacpp_build_number}",
        *backend_flags,
    )


def plan_build(settings: HostSettings, backend_flags: tuple[str, ...] = (),
               expected_system_info: tuple[str, ...] = (), nvcc: str | None = None,
               archs: tuple[str, ...] = (), fa_pairs: tuple[tuple[str, str], ...] = (),
               gpu_count: int = 0, toolkit_version: str | None = None) -> Build:
    flags = cmake_flags(settings, backend_flags)
    # Keyed by the baseline asked for, not the one found: "auto" is one build, "the best
    # baseline that runs here", so a rerun finds it complete and never tries native again.
    tried = [f"cpu:{name}:{' '.join(cpu_flags)}"
             for name, cpu_flags in cpu_candidates(settings.cpu_baseline)]
    key = hashlib.sha256("\n".join(flags + TARGETS + tuple(tried)).encode()).hexdigest()[:8]
    base = settings.install_dir
    return Build(
        source_dir=f"{base}/src/{settings.llamacpp_commit}",
        build_dir=f"{base}/builds/{settings.llamacpp_commit[:12]}-{key}",
        cmake_flags=flags,
        expected_system_info=expected_system_info,
        nvcc=nvcc,
        toolkit_version=toolkit_version,
        archs=archs,
        fa_pairs=fa_pairs,
        gpu_count=gpu_count,
        cpu_baseline=settings.cpu_baseline,
    )


def plan_for_host(settings: HostSettings, facts: GpuFacts) -> Build:
    """CPU build for CPU-only hosts; for GPU hosts, CUDA for exactly the GPUs present (or the
    configured archs), with the flash-attention K/V pairs every service needs."""
    if not settings.uses_gpu:
        return plan_build(settings, ("-DGGML_CUDA=OFF",))
    archs = architectures_for(facts.gpus, settings.cuda_architectures)
    toolkit = build_toolkit(facts, settings.cuda_toolkit_install, settings.cuda_toolkit_version, archs)
    expected = [f"ARCHS={system_info_archs(archs)}",
                f"FA_QUANTS={fa_quants(settings.fa_pairs).replace(';', ',')}"]
    if any(arch.startswith("12") for arch in archs) and any(g.compute_cap.startswith("12.") for g in facts.gpus):
        # Printed only at run time with a Blackwell GPU present (ggml-cuda's system_info at the
        # pinned commit): never on an H100 or H200.
        expected.append("BLACKWELL_NATIVE_FP4=1")
    return plan_build(settings, tuple(cuda_cmake_flags(toolkit.path, archs, settings.fa_pairs)),
                      tuple(expected), toolkit.path, tuple(archs),
                      compiled_fa_pairs(settings.fa_pairs), gpu_count=len(facts.gpus),
                      toolkit_version=toolkit.version)

# ---------------------------------------------------------------------------------------------
# CUDA archs, flash-attention pairs, the toolkit


def cuda_arch_for(compute_cap: str) -> str:
    """CMAKE_CUDA_ARCHITECTURES entry for a compute capability: "8.9" -> "89".

    12.x gets the arch-specific "12Xa" (what ggml's CMake rewrites a plain 12X to, and what
    the Blackwell FP4 tensor-core path needs); 10.x stays plain, as ggml compiles it.
    """
    major, minor = cap_tuple(compute_cap)
    arch = f"{major}{minor}"
    return arch + "a" if major == 12 else arch

def architectures_for(gpus: Iterable[Gpu], override: Sequence[str] | None) -> tuple[str, ...]:
    """The arch list to build: the override as given, else one entry per kind of GPU present."""
    if override:
        return tuple(override)
    archs = {cuda_arch_for(g.compute_cap) for g in gpus if g.compute_cap}
    return tuple(sorted(archs, key=arch_number))

def system_info_archs(archs: Iterable[str]) -> str:
    """What llama.cpp's system_info prints as ARCHS for a build of ``archs``: "610,1200"."""
    return ",".join(str(n * 10) for n in sorted({arch_number(a) for a in archs}))

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
    major, minor = release(version)
    return f"/usr/local/cuda-{major}.{minor}/bin/nvcc"

def newest_toolkit(toolkits: Iterable[Toolkit]) -> Toolkit | None:
    return max(toolkits, key=lambda t: version_tuple(t.version), default=None)

def build_toolkit(facts: GpuFacts, install_enabled: bool, install_version: str,
                  archs: Sequence[str] = ()) -> Toolkit | None:
    """The nvcc the build will use: the one we install when enabled, else the newest found that
    compiles every arch in ``archs`` (CUDA 13 dropped sm < 75), else the newest found."""
    if install_enabled:
        major, minor = release(install_version)
        return Toolkit(toolkit_nvcc_path(install_version), f"{major}.{minor}")
    low, _, high, _ = toolkit_bounds(archs)
    fitting = [t for t in facts.toolkits if low <= t.release and (high is None or t.release < high)]
    return newest_toolkit(fitting) or newest_toolkit(facts.toolkits)

def toolkit_bounds(archs: Sequence[str]) -> tuple[tuple[int, int], list[str], tuple[int, int] | None, list[str]]:
    """(lowest release, archs that need it, first release too new, archs it drops)."""
    low, low_archs, high, high_archs = (0, 0), [], None, []
    for arch in archs:
        n = arch_number(arch)
        need = (12, 9) if n == 121 else (12, 8) if n >= 100 else (11, 8) if n >= 89 else (0, 0)
        if need > low:
            low, low_archs = need, [arch]
        elif need == low and need != (0, 0):
            low_archs.append(arch)
        if n < 75:  # CUDA 13 dropped Maxwell, Pascal and Volta
            high = (13, 0)
            high_archs.append(arch)
    return low, low_archs, high, high_archs

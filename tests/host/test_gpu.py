"""What the deploy promised a GPU host, checked on the host: the build's flags, driver and nvcc
versions, the compiled CUDA archs cover every GPU, the compiled flash-attention K/V pairs cover
every GPU service, Blackwell's FP4 path, each GPU service on its own GPUs, no failed mlock.

On a host without GPU services (or without GPUs) the GPU checks are skipped with the reason,
never passed silently; a host whose manifest promises GPU services but shows no GPU fails.
"""

from __future__ import annotations

import json
import re

import pytest

from llmhost import data_dir
from llmhost import hostcheck
from llmhost.hostcheck import each, info_fields
from llmhost.buildplan import system_info_fa_pairs

# The same check the deploy's health gate runs on the host (files/gpu_check.py), sent as source.
GPU_CHECK = (data_dir("files") / "gpu_check.py").read_text()

# CUDA toolkit release -> minimum Linux driver (CUDA release notes, table 3).
DRIVER_FOR_TOOLKIT = (((12, 0), "525.60.13"), ((12, 4), "550.54.14"), ((12, 6), "560.28.03"),
                      ((12, 8), "570.26"), ((12, 9), "575.51.03"), ((13, 0), "580.65.06"))
# Oldest toolkit that compiles for a GPU generation (sm_120: CUDA 12.8; sm_100: 12.8; sm_90: 11.8).
TOOLKIT_FOR_MAJOR = {12: (12, 8), 10: (12, 8), 9: (11, 8)}
SMI_GPUS = ("nvidia-smi --query-gpu=index,name,compute_cap,driver_version "
            "--format=csv,noheader,nounits")

_system_info_cache: dict[tuple[int, str], str] = {}


def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text))


@pytest.fixture
def gpu_services(services):
    chosen = [s for s in services if s.uses_gpu]
    if not chosen:
        pytest.skip("no service of this host uses the GPU (every service has gpu_layers 0): "
                    "GPU checks do not apply")
    return chosen


@pytest.fixture
def gpus(host, gpu_services):
    """The host's GPUs; a host that promises GPU services but shows none fails."""
    if not host.exists("nvidia-smi"):
        pytest.fail(f"services {', '.join(s.name for s in gpu_services)} use the GPU, but "
                    f"nvidia-smi is not on this host (is the NVIDIA driver installed?)")
    result = host.run(SMI_GPUS)
    rows = [[c.strip() for c in line.split(",")] for line in result.stdout.splitlines() if line.strip()]
    found = [{"index": r[0], "name": r[1], "compute_cap": r[2], "driver": r[3]} for r in rows if len(r) >= 4]
    if result.rc or not found:
        pytest.fail(f"services {', '.join(s.name for s in gpu_services)} use the GPU, but "
                    f"nvidia-smi lists none (exit {result.rc}): {(result.stdout + result.stderr)[:300]}")
    return found


@pytest.fixture
def system_info(host, manifest, gpus) -> str:
    """system_info of the deployed llama-server as this host runs it (the backend's ARCHS,
    FA_QUANTS, BLACKWELL_NATIVE_FP4 are printed only at run time, with the GPU present)."""
    server = manifest.llama_cpp.server
    key = (id(host), server)
    if key not in _system_info_cache:
        _system_info_cache[key] = hostcheck.system_info(host, server)
    return _system_info_cache[key]


def test_build_has_the_manifest_commit_and_flags(host, manifest):
    """The build the services run was configured with the flags the deploy computed."""
    build = manifest.llama_cpp
    marker = host.file(f"{build.build_dir}/.llmhost-build.json")
    assert marker.exists, f"{build.build_dir} has no .llmhost-build.json: the build was never verified"
    record = json.loads(marker.content_string)
    assert record["commit"] == build.commit, \
        f"the build is of commit {record['commit']}, expected {build.commit}"
    missing = sorted(set(build.cmake_flags) - set(record["flags"]))
    extra = sorted(set(record["flags"]) - set(build.cmake_flags))
    assert not missing and not extra, \
        f"the build's cmake flags differ from the manifest: missing {missing}, unexpected {extra}"


def test_driver_and_nvcc_versions(host, manifest, gpus):
    nvcc = manifest.llama_cpp.nvcc
    assert nvcc, "the manifest names no nvcc for a GPU build (redeploy to refresh the manifest)"
    text = host.run("%s --version", nvcc).stdout
    release = re.search(r"release (\d+)\.(\d+)", text)
    assert release, f"{nvcc} --version printed no release: {text[-300:]}"
    toolkit = (int(release.group(1)), int(release.group(2)))
    problems = []
    needed = None
    for row, driver in DRIVER_FOR_TOOLKIT:
        if toolkit >= row:
            needed = driver
    for gpu in gpus:
        if needed and version_tuple(gpu["driver"]) < version_tuple(needed):
            problems.append(f"GPU {gpu['index']} ({gpu['name']}): driver {gpu['driver']}, CUDA "
                            f"{toolkit[0]}.{toolkit[1]} needs >= {needed}")
        major = int(gpu["compute_cap"].split(".")[0])
        floor = TOOLKIT_FOR_MAJOR.get(major)
        if floor and toolkit < floor:
            problems.append(f"GPU {gpu['index']} ({gpu['name']}, {gpu['compute_cap']}): nvcc "
                            f"{toolkit[0]}.{toolkit[1]}, expected >= {floor[0]}.{floor[1]}")
    assert not problems, "\n".join(problems)


def test_compiled_archs_cover_every_gpu(gpus, system_info):
    archs = [int(a) for a in re.findall(r"\d+", info_fields(system_info).get("ARCHS", ""))]
    assert archs, f"system_info shows no CUDA ARCHS: {system_info}"
    uncovered = []
    for gpu in gpus:
        major, minor = (int(x) for x in gpu["compute_cap"].split(".")[:2])
        # A cubin runs on its own major with an equal or higher minor.
        if not any(a // 100 == major and (a % 100) // 10 <= minor for a in archs):
            uncovered.append(f"GPU {gpu['index']} ({gpu['name']}, compute capability "
                             f"{gpu['compute_cap']}): ARCHS = {','.join(map(str, archs))} has no "
                             f"{major}{minor}0")
    assert not uncovered, "\n".join(uncovered)


def test_fa_pairs_cover_every_gpu_service(manifest, gpu_services, system_info):
    compiled = system_info_fa_pairs(system_info) or ()
    missing = set(manifest.llama_cpp.fa_pairs) - set(compiled)
    assert not missing, f"the build compiled {compiled}, not all of what the deploy meant: {manifest.llama_cpp.fa_pairs}"

    def check(s):
        if s.kv_pair not in compiled:
            return (f"K/V pair {'-'.join(s.kv_pair)} is not among the compiled pairs "
                    f"{', '.join('-'.join(p) for p in compiled) or '(none)'}: attention would fall "
                    f"back to a slow path")
    each(gpu_services, check)


def test_blackwell_native_fp4(gpus, system_info):
    blackwell = [g for g in gpus if g["compute_cap"].startswith("12.")]
    if not blackwell:
        pytest.skip(f"no Blackwell GPU (compute capability 12.x) on this host: "
                    f"{', '.join(g['name'] + ' ' + g['compute_cap'] for g in gpus)}")
    fp4 = info_fields(system_info).get("BLACKWELL_NATIVE_FP4")
    assert fp4 == "1", \
        f"BLACKWELL_NATIVE_FP4 = {fp4} on " \
        f"{blackwell[0]['name']}, expected 1 (build for 120a with CUDA >= 12.8)"


def test_gpu_services_run_on_their_gpus(host, gpus, gpu_services):
    """The deploy's GPU health gate, run again: the main process holds memory on each GPU it
    was given (and no other), else the reason (device nodes its unit does not allow, uvm
    missing, llama.cpp's 'no usable GPU'). /health alone passes a server on the CPU."""
    def check(s):
        wanted = ",".join(map(str, s.settings.gpus)) if s.settings.gpus is not None else ""
        result = host.run("python3 -c %s --unit %s --gpus %s", GPU_CHECK, s.unit, wanted)
        try:
            verdict = json.loads(result.stdout)
        except ValueError:
            return f"the GPU check printed no verdict (exit {result.rc}): {result.stderr[-300:]}"
        return None if verdict["ok"] else verdict["reason"]
    each(gpu_services, check)


def test_no_failed_mlock_in_gpu_service_journal(host, gpus, gpu_services):
    def check(s):
        if "mlock" not in s.settings.load_mode:
            return None
        invocation = host.run("systemctl show -p InvocationID --value %s", s.unit).stdout.strip()
        if not invocation:
            return f"{s.unit} has no current invocation"
        journal = host.run("journalctl --no-pager -o cat _SYSTEMD_INVOCATION_ID=%s", invocation).stdout
        lines = [line for line in journal.splitlines() if "failed to mlock" in line]
        if lines:
            return f"the journal says {lines[0].strip()[:200]} (raise the host's RLIMIT_MEMLOCK)"
    each(gpu_services, check)

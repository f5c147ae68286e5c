"""The GPU proof: the project's own deploy, run as users run it, on a GPU host under systemd.

A fresh Debian 12 host with systemd as PID 1 is booted on the lent GPU machine (an H200) with
the NVIDIA device nodes and driver visible inside, and reached over SSH on 127.0.0.1 (the same
kind of host the CPU tests boot: tests/support/sandbox.py). The real `pyinfra inventory.py
deploy.py`, with llmhost installed from its wheel, turns it into the guide's two services: the
GPU model server (`main`, -ngl 99, K=q4_0 V=q8_0, 131072 context, 4 slots) and the CPU translator,
with gemma-3-270m (the tests' real small model) and llama.cpp at the pinned commit, built there
with CUDA for the GPU present. Then the host suite (`llmhost-verify`), the bench, a reboot, decode
through the unit against the same binary and flags started by hand, the hardening measured line
by line, and faults the health gate must catch. Every phase powers the host off at its end.

Here, on the development machine (needs the test caches: bash .ci/setup, then any e2e run):

    python -m benchmarks.gpu_sandbox pack       # .devcarry/gpu/ (git-ignored), and the call plan

On the GPU machine, through the device tool, calls back to back (it keeps /var/tmp only while
warm, 30 s after a call; each call carries at most 64 MiB and runs at most 10 minutes):

    python3 -m benchmarks.gpu_sandbox receive   # the carried pieces -> /var/tmp/llmhost-gpu
    python3 -m benchmarks.gpu_sandbox up        # boot, deploy (cold CUDA build), zero-change rerun,
                                                # host suite; the unit, its exposure, GPU evidence
    python3 -m benchmarks.gpu_sandbox prove     # reboot, host suite, bench (--restart), decode
                                                # unit vs by hand alternated, hardening probe
    python3 -m benchmarks.gpu_sandbox faults    # a unit on the CPU rolled back under load, a GPU
                                                # hidden by the unit refused, a rejected flag
    python3 -m benchmarks.gpu_sandbox two-gpus  # services pinned to GPU 0, GPU 1, and both
    python3 -m benchmarks.gpu_sandbox gateway   # two hosts (one GPU each) behind a gateway host:
                                                # deploy, rerun, verify, decode through it

Each call may carry the freshly built llmhost wheel (pack --wheel-only), so a fix made here
reaches the next call. Files for benchmarks/gpu-sandbox/ come back in $OUT (8 at most a call).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CARRY = REPO / ".devcarry" / "gpu"
WORK = Path(os.environ.get("LLMHOST_GPU_WORK", "/var/tmp/llmhost-gpu"))
OUT = Path(os.environ.get("OUT") or WORK / "out")
PIECE_BYTES = 29 * 2**20          # a call carries <= 64 MiB, the repository included
CALL_BYTES = 60 * 2**20
# LLMHOST_GPU_REHEARSAL=1 runs the phases on a machine without a GPU (the development machine,
# with a Python 3.12 like the GPU machine's): no driver binds, the main service on the CPU.
REHEARSAL = os.environ.get("LLMHOST_GPU_REHEARSAL") == "1"
# Wheels of what the GPU machine's Python 3.12 lacks (pyinfra and testinfra with their needs);
# what it has (click, jinja2, requests, pytest, packaging, ...) is used as it is there.
WHEELS = ("pyinfra==3.10.0", "pytest-testinfra==10.2.2")
# benchmarks/gpu_realsize.py writes its models there with llama.cpp's GGUF library (pure Python;
# numpy and PyYAML are on the machine).
REALSIZE_WHEELS = ("gguf==0.19.0",)
ON_DEVICE = {"click", "jinja2", "markupsafe", "python_dateutil", "six", "packaging", "requests",
             "urllib3", "idna", "certifi", "charset_normalizer", "pytest", "pluggy", "iniconfig",
             "pygments", "typing_extensions", "setuptools", "numpy", "pyyaml", "tqdm", "requests"}
SANDBOX = "gpuhost"
# As on cloud GPU images: an ordinary login user with passwordless sudo, root's login refused.
LOGIN_USER = os.environ.get("LLMHOST_GPU_LOGIN_USER", "ops")
GPU_PORT, CPU_PORT = 18082, 18083
HIDDEN_PORT = 18090


def say(message: str) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {message}"
    print(line, flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / "summary.txt", "a") as f:
        f.write(line + "\n")
    with open(WORK / "summary-all.txt", "a") as f:
        f.write(line + "\n")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


# =========================================================================== here: pack

def pack(args) -> int:
    """Split everything the GPU machine lacks into carried pieces, and print the call plan."""
    sys.path.insert(0, str(REPO))
    from tests.support import cache, sandbox
    from llmhost.base import BUILD_PACKAGES

    pieces = CARRY / "pieces"
    CARRY.mkdir(parents=True, exist_ok=True)
    check = subprocess.run(["git", "-C", str(REPO), "check-ignore", "-q", str(CARRY / "x")])
    if check.returncode:
        raise SystemExit(f"{CARRY} is not git-ignored: it would travel with every call")
    _build_llmhost_wheel()
    if args.wheel_only:
        return 0
    shutil.rmtree(pieces, ignore_errors=True)
    pieces.mkdir()
    staging = CARRY / "staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()

    # The GPU machine has no network: what the deploy installs must be in the image already
    # (the build's packages, and HAProxy for the gateway host of the `gateway` phase).
    extra = tuple(p for p in BUILD_PACKAGES if p not in sandbox.BASE_PACKAGES) + ("haproxy",)
    rootfs = _slim_rootfs(sandbox.base_tarball("bookworm", extra=extra), staging / "rootfs.tar.xz")
    llamacpp = staging / "llama.cpp.tar.gz"
    _trimmed_source(cache.llamacpp_repo(), llamacpp)
    wheels = staging / "wheels.tar"
    _wheels(wheels, WHEELS + (REALSIZE_WHEELS if args.realsize else ()))
    # The real-size phases make their models there (gpu_realsize.py): no model travels.
    carried = (wheels, llamacpp, rootfs) if args.realsize else (wheels, llamacpp, rootfs,
                                                                cache.gemma_model())

    manifest = {"model_sha256": cache.MODEL_SHA256, "artifacts": []}
    for path in carried:
        manifest["artifacts"].append(_split(path, pieces))
    (CARRY / "manifest.json").write_text(json.dumps(manifest, indent=1))
    shutil.rmtree(staging)
    _print_plan(manifest)
    return 0


def _build_llmhost_wheel() -> None:
    for old in CARRY.glob("llmhost-*.whl"):
        old.unlink()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(CARRY),
                    str(REPO)], check=True)
    commit = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"],
                            capture_output=True, text=True, check=True).stdout.strip()
    (CARRY / "commit.txt").write_text(commit + "\n")
    print(f"pack: {next(CARRY.glob('llmhost-*.whl')).name} of commit {commit}")


def _slim_rootfs(tarball: Path, target: Path) -> Path:
    """The debootstrap tarball without apt lists, .debs, docs, man pages and locales, as .tar.xz."""
    with tempfile_dir() as tmp:
        root = tmp / "root"
        root.mkdir()
        subprocess.run(["tar", "-C", str(root), "-xf", str(tarball)], check=True)
        for sub in ("var/lib/apt/lists", "var/cache/apt", "usr/share/doc", "usr/share/man",
                    "usr/share/info", "usr/share/locale", "usr/share/lintian"):
            shutil.rmtree(root / sub, ignore_errors=True)
        (root / "var/lib/apt/lists/partial").mkdir(parents=True)
        (root / "var/cache/apt/archives/partial").mkdir(parents=True)
        subprocess.run(["tar", "-C", str(root), "-cJf", str(target), "."], check=True,
                       env={**os.environ, "XZ_OPT": "-9 -T0"})
    print(f"pack: rootfs {target.stat().st_size / 2**20:.1f} MiB")
    return target


def _trimmed_source(repo: Path, target: Path) -> None:
    """The pinned commit as a release-like tarball, without what a server build never reads."""
    with tempfile_dir() as tmp:
        subprocess.run(["git", "-C", str(repo), "archive", "--format=tar", "--prefix=llama.cpp/",
                        "-o", str(tmp / "full.tar"), "HEAD"], check=True)
        subprocess.run(["tar", "-C", str(tmp), "-xf", str(tmp / "full.tar")], check=True)
        for sub in ("docs", "models", "media", "benches", "tools/ui/src", "tools/ui/tests",
                    "examples/model-conversion", "gguf-py/tests"):
            shutil.rmtree(tmp / "llama.cpp" / sub, ignore_errors=True)
        subprocess.run(["tar", "-C", str(tmp), "-czf", str(target), "llama.cpp"], check=True)
    print(f"pack: llama.cpp {target.stat().st_size / 2**20:.1f} MiB")


def _wheels(target: Path, requirements: tuple[str, ...] = WHEELS) -> None:
    with tempfile_dir() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:",
                        "--python-version", "3.12", "--implementation", "cp",
                        *[a for n in (39, 34, 28, 17) for a in ("--platform", f"manylinux_2_{n}_x86_64")],
                        "--platform", "manylinux2014_x86_64", "-d", str(tmp), *requirements],
                       check=True)
        kept = [w for w in sorted(tmp.glob("*.whl"))
                if w.name.split("-")[0].lower() not in ON_DEVICE]
        with tarfile.open(target, "w") as tar:
            for wheel in kept:
                tar.add(wheel, arcname=wheel.name)
    print(f"pack: {len(kept)} wheels, {target.stat().st_size / 2**20:.1f} MiB")


def _split(path: Path, pieces: Path) -> dict:
    entry = {"name": path.name, "size": path.stat().st_size, "sha256": sha256(path), "pieces": []}
    with open(path, "rb") as f:
        index = 0
        while block := f.read(PIECE_BYTES):
            piece = pieces / f"{path.name}.{index:02d}"
            piece.write_bytes(block)
            entry["pieces"].append({"name": piece.name, "size": len(block),
                                    "sha256": hashlib.sha256(block).hexdigest()})
            index += 1
    return entry


def _print_plan(manifest: dict) -> None:
    calls, current, size = [], [], 0
    for artifact in manifest["artifacts"]:
        for piece in artifact["pieces"]:
            if current and (size + piece["size"] > CALL_BYTES or len(current) == 5):
                calls.append(current)
                current, size = [], 0
            current.append(f".devcarry/gpu/pieces/{piece['name']}")
            size += piece["size"]
    calls.append(current)
    print(f"pack: {len(calls)} receiving calls; each also carries .devcarry/gpu/manifest.json "
          f"and the llmhost wheel:")
    for i, paths in enumerate(calls, 1):
        print(f"  call {i}: carry {paths}; command: python3 -m benchmarks.gpu_sandbox receive")


class tempfile_dir:
    def __enter__(self) -> Path:
        import tempfile
        self.path = Path(tempfile.mkdtemp(prefix="llmhost-gpu-pack-", dir="/var/tmp"))
        return self.path

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


# =========================================================================== there: receive

def receive(args=None) -> int:
    """Keep what this call carried under /var/tmp (verified), join artifacts once complete."""
    (WORK / "pieces").mkdir(parents=True, exist_ok=True)
    if (CARRY / "manifest.json").exists():
        shutil.copy(CARRY / "manifest.json", WORK / "manifest.json")
    for wheel in CARRY.glob("llmhost-*.whl"):
        for old in WORK.glob("llmhost-*.whl"):
            old.unlink()
        shutil.copy(wheel, WORK / wheel.name)
    if (CARRY / "commit.txt").exists():
        shutil.copy(CARRY / "commit.txt", WORK / "commit.txt")
    if not (WORK / "manifest.json").exists():
        raise SystemExit("receive: no manifest yet: carry .devcarry/gpu/manifest.json")
    manifest = json.loads((WORK / "manifest.json").read_text())
    status = []
    for artifact in manifest["artifacts"]:
        target = WORK / artifact["name"]
        if target.exists():
            status.append(f"{artifact['name']} ready")
            continue
        for piece in artifact["pieces"]:
            carried, kept = CARRY / "pieces" / piece["name"], WORK / "pieces" / piece["name"]
            if carried.exists() and not kept.exists():
                if sha256(carried) != piece["sha256"]:
                    raise SystemExit(f"receive: {piece['name']} does not match its sha256")
                shutil.copy(carried, kept)
        have = [p for p in artifact["pieces"] if (WORK / "pieces" / p["name"]).exists()]
        if len(have) == len(artifact["pieces"]):
            with open(f"{target}.partial", "wb") as out:
                for piece in artifact["pieces"]:
                    with open(WORK / "pieces" / piece["name"], "rb") as f:
                        shutil.copyfileobj(f, out, 1 << 20)
            if sha256(Path(f"{target}.partial")) != artifact["sha256"]:
                raise SystemExit(f"receive: joined {artifact['name']} does not match its sha256")
            os.replace(f"{target}.partial", target)
            for piece in artifact["pieces"]:
                (WORK / "pieces" / piece["name"]).unlink()
            status.append(f"{artifact['name']} ready")
        else:
            status.append(f"{artifact['name']} {len(have)}/{len(artifact['pieces'])} pieces")
    print("receive: " + "; ".join(status), flush=True)
    return 0


def probe(args=None) -> int:
    """What the machine offers the sandbox (first call: nothing else depends on it)."""
    commands = [
        "nvidia-smi --query-gpu=index,name,compute_cap,driver_version,memory.total,pci.bus_id --format=csv",
        "grep -i nvidia /proc/devices", "ls -l /dev/nvidia* /dev/nvidia-caps 2>&1 | head -20",
        "readlink -f /usr/local/cuda", "ls /usr/local/cuda/lib64 | grep -E 'cublas|cudart' | head",
        "ls /usr/local/nvidia/lib64 | grep -E 'libcuda|libnvidia-ml' | head -5",
        "stat -fc %T /sys/fs/cgroup", "cat /sys/fs/cgroup/cgroup.subtree_control",
        "command -v ssh ssh-keygen unshare nsenter xz tar", "nproc; free -g | head -2; df -h /var/tmp | tail -1",
        "python3 --version; python3 -c 'import cryptography, paramiko' 2>&1 | tail -1",
        "ls /proc/driver/nvidia/gpus/ && cat /proc/driver/nvidia/gpus/*/information | head -12",
        "cat /proc/driver/nvidia/version | head -1",
    ]
    for command in commands:
        result = subprocess.run(["bash", "-c", command], capture_output=True, text=True)
        print(f"$ {command}\n{(result.stdout + result.stderr).strip()}", flush=True)
    return receive()


# =========================================================================== there: the host

def _install_wheels() -> None:
    site = WORK / "site"
    wheels = WORK / "wheels"
    if not (site / "pyinfra").exists():
        wheels.mkdir(exist_ok=True)
        with tarfile.open(WORK / "wheels.tar") as tar:
            tar.extractall(wheels, filter="data")
        _pip_target(site, sorted(wheels.glob("*.whl")))
    # llmhost itself from the wheel of this call (pack --wheel-only), not editable, not the tree.
    wheel = next(WORK.glob("llmhost-*.whl"))
    marker = site / ".llmhost-wheel"
    if not marker.exists() or marker.read_text() != sha256(wheel):
        for old in site.glob("llmhost*"):
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        _pip_target(site, [wheel])
        marker.write_text(sha256(wheel))
    if str(site) not in sys.path:
        sys.path.insert(0, str(site))
    if str(REPO) not in sys.path:
        sys.path.append(str(REPO))  # tests.support (sandbox, health poller); llmhost from site


def _pip_target(site: Path, wheels: list[Path]) -> None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                    "--no-compile", "--no-cache-dir", "--upgrade", "--target", str(site),
                    *map(str, wheels)], check=True)


def _env() -> dict:
    """For the commands users run (pyinfra, llmhost-verify, llmhost-bench): llmhost from site/."""
    return {**os.environ, "PYTHONPATH": str(WORK / "site"), "PYTHONUNBUFFERED": "1",
            "PATH": f"{WORK / 'site' / 'bin'}:{os.environ.get('PATH', '')}"}


def _sandbox(name: str = SANDBOX):
    """A GPU host: prepared once (its root stays under /var/tmp while the machine is warm)."""
    from tests.support import sandbox

    workdir = WORK / ("host" if name == SANDBOX else f"host-{name}")
    state = workdir / "state.json"
    cuda = os.path.realpath("/usr/local/cuda")
    binds_ro = {} if REHEARSAL else {"/usr/local/nvidia": "/usr/local/nvidia", cuda: cuda}
    # A rehearsal here shares the tests' ccache, so its CPU build is mostly cache hits.
    binds = {}
    if REHEARSAL:
        from tests.support.deployment import shared_cache_binds
        binds = shared_cache_binds()
    if state.exists():
        data = json.loads(state.read_text())
        return sandbox.SandboxHost(name=name, suite="bookworm", workdir=workdir,
                                   ssh_port=data["ssh_port"], key_path=workdir / "id_ed25519",
                                   binds=binds, binds_ro=binds_ro, tarball=WORK / "rootfs.tar.xz",
                                   login_user=LOGIN_USER)
    workdir.mkdir(parents=True)
    host = sandbox.SandboxHost(name=name, suite="bookworm", workdir=workdir,
                               ssh_port=sandbox.free_port(), key_path=workdir / "id_ed25519",
                               binds=binds, binds_ro=binds_ro, tarball=WORK / "rootfs.tar.xz",
                               login_user=LOGIN_USER)
    host.prepare()
    root = host.root
    if REHEARSAL:
        state.write_text(json.dumps({"ssh_port": host.ssh_port}))
        return host
    # What the driver's and the toolkit's packages give a host: their libraries in the linker's
    # path (cuda-toolkit's /etc/ld.so.conf.d/988_cuda-*.conf; without it the CUDA build fails to
    # link: "undefined reference to cudaPeekAtLastError@libcudart.so.13") and nvidia-smi.
    (root / "etc/ld.so.conf.d/llmhost-sandbox.conf").write_text(
        f"/usr/local/nvidia/lib64\n{cuda}/lib64\n")
    shutil.copy("/usr/local/nvidia/bin/nvidia-smi", root / "usr/local/bin/nvidia-smi")
    # The toolkit where NVIDIA's packages put it: /usr/local/cuda -> /usr/local/cuda-13.0.
    if cuda != "/usr/local/cuda":
        (root / "usr/local/cuda").symlink_to(cuda)
    state.write_text(json.dumps({"ssh_port": host.ssh_port}))
    say(f"sandbox prepared: {root} (ssh 127.0.0.1:{host.ssh_port})")
    return host


class booted:
    """Boot a GPU host for one phase and power it off at its end, pass or fail."""

    def __init__(self, name: str = SANDBOX):
        self.name = name

    def __enter__(self):
        self.host = _sandbox(self.name)
        started = time.monotonic()
        self.host.boot(timeout=120)
        say(f"sandbox {self.name} booted (systemd running, sshd answering) in "
            f"{time.monotonic() - started:.1f}s")
        return self.host

    def __exit__(self, *exc) -> None:
        self.host.stop()
        say(f"sandbox {self.name} powered off")


def _inventory(host, name: str = "inventory.py", **changes) -> Path:
    """The guide's two services on the GPU host, with the tests' real small model."""
    model = {"source": "local", "path": str(WORK / "gemma-3-270m-q4_k_m.gguf"),
             "sha256": json.loads((WORK / "manifest.json").read_text())["model_sha256"]}
    services = {
        "main": {"port": GPU_PORT, "model": model, "gpu_layers": 99, "ctx_size": 131072,
                 "parallel": 4, "flash_attn": "on", "cache_type_k": "q4_0", "cache_type_v": "q8_0",
                 "load_mode": "mmap+mlock", "reasoning": "auto", "reasoning_format": "deepseek"},
        "translate": {"port": CPU_PORT, "model": model, "gpu_layers": 0, "ctx_size": 4096,
                      "parallel": 4, "reasoning": "off"},
    }
    if REHEARSAL:
        services["main"]["gpu_layers"] = 0
        services["main"]["ctx_size"] = 8192
    else:
        # Measured on the H200 machine (a Firecracker VM): llama.cpp's native CPU build dies of
        # SIGILL there whenever it computes on the CPU alone (by hand as root too: CPUID lists
        # amx_* and avx512_fp16), so the CPU translator is proven on the CPU machines only.
        services.pop("translate")
    for service, values in changes.pop("services", {}).items():
        if values is None:
            services.pop(service, None)
        else:
            services[service] = {**services.get(service, {"model": model}), **values}
    data = {**host.pyinfra_data(), "llm_llamacpp_source": "local",
            "llm_llamacpp_local_path": str(WORK / "llama.cpp.tar.gz"), "llm_services": services,
            **changes}
    path = WORK / name
    path.write_text(f"gpu_servers = [({SANDBOX!r}, {data!r})]\n")
    return path


def _deploy(inventory: Path, log_name: str, label: str):
    """`pyinfra INVENTORY deploy.py -y`, from the repository root, output streamed and kept."""
    from tests.support.deployment import DeployResult

    started = time.monotonic()
    lines = []
    process = subprocess.Popen([sys.executable, "-m", "pyinfra", str(inventory), "deploy.py", "-y"],
                               cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    with open(OUT / log_name, "a") as log:
        for line in process.stdout:
            lines.append(line)
            log.write(line)
            if any(k in line for k in ("build:", "configure", "healthy", "ROLLED", "without its GPU",
                                       "Error", "error", "failed", "verified")):
                print(f"  | {line.rstrip()[:220]}", flush=True)
    result = DeployResult(process.wait(), "".join(lines), time.monotonic() - started)
    say(f"deploy {label}: exit {result.returncode} in {result.seconds:.1f}s; changed: "
        f"{', '.join(result.changed_operations) or 'nothing'}")
    return result


def _verify(inventory: Path, log_name: str, label: str) -> int:
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "llmhost.verify", str(inventory)], cwd=WORK,
                            env=_env(), capture_output=True, text=True)
    (OUT / log_name).write_text(result.stdout + result.stderr)
    summary = result.stdout.split("== llmhost verify: per-host summary ==")[-1].strip()
    say(f"verify {label}: exit {result.returncode} in {time.monotonic() - started:.1f}s\n{summary}")
    return result.returncode


def _sh_here(command: str) -> str:
    return subprocess.run(["bash", "-c", command], capture_output=True, text=True).stdout.strip()


def _sh(host, command: str, check: bool = False) -> str:
    return host.exec("bash", "-c", command, check=check, timeout=300).stdout


def _gpu_evidence(host, unit: str, gpus: str = "") -> dict:
    source = (WORK / "site" / "llmhost" / "files" / "gpu_check.py").read_text()
    result = host.exec("python3", "-c", source, "--unit", unit, "--gpus", gpus, "--evidence",
                       check=False, timeout=120)
    return json.loads(result.stdout)


def _records(host, label: str, evidence: bool = True) -> None:
    """The unit as rendered, its exposure, the device files its process holds, GPU evidence."""
    unit = _sh(host, "cat /etc/systemd/system/llama-main.service")
    security = _sh(host, "systemd-analyze security --no-pager llama-main.service")
    pid = _sh(host, "systemctl show -p MainPID --value llama-main").strip()
    fds = _sh(host, f"ls -l /proc/{pid}/fd | grep -o '/dev/nvidia.*' | sort | uniq -c")
    smi = _sh(host, "nvidia-smi; nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv")
    exposure = [line for line in security.splitlines() if "Overall exposure level" in line]
    (OUT / f"unit-{label}.txt").write_text(
        f"# /etc/systemd/system/llama-main.service\n{unit}\n# systemd-analyze security\n{security}\n"
        f"# device files held by the main process (pid {pid})\n{fds}\n# nvidia-smi\n{smi}\n"
        f"# /proc/devices\n{_sh(host, 'cat /proc/devices')}")
    verdict = "not recorded"
    if evidence:
        try:
            found = _gpu_evidence(host, "llama-main.service")
            (OUT / f"gpu-evidence-{label}.json").write_text(json.dumps(found, indent=1))
            verdict = f"{found['ok']} ({found['reason']})"
        except ValueError as error:
            verdict = f"no verdict ({error})"
    say(f"records {label}: {exposure[0].strip() if exposure else 'no exposure line'}; device files "
        f"held: {' '.join(fds.split()) or 'none'}; gpu check: {verdict}")


# =========================================================================== phases

def up(args) -> int:
    receive()
    _install_wheels()
    missing = [a["name"] for a in json.loads((WORK / "manifest.json").read_text())["artifacts"]
               if not (WORK / a["name"]).exists()]
    if missing:
        raise SystemExit(f"up: still missing {', '.join(missing)}: send the receiving calls")
    commit = (WORK / "commit.txt").read_text().strip() if (WORK / "commit.txt").exists() else "?"
    say(f"llmhost wheel of commit {commit}; {_sh_here('nvidia-smi -L')}")
    with booted() as host:
        inventory = _inventory(host)
        first = _deploy(inventory, "deploy.log", "first (cold)")
        if first.returncode:
            _records(host, "failed")
            return 1
        rerun = _deploy(inventory, "rerun.log", "rerun")
        if rerun.returncode or rerun.changed_operations:
            say("rerun: NOT a zero-change run")
        _verify(inventory, "verify.log", "after deploy")
        _records(host, "up")
    return 0


def prove(args) -> int:
    receive()
    _install_wheels()
    with booted() as host:  # a reboot of the deployed host: units come back on their own
        inventory = WORK / "inventory.py"
        _wait_healthy(GPU_PORT, 120, "after the reboot, llama-main")
        _verify(inventory, "verify-reboot.log", "after a reboot")
        _sh(host, "systemctl show -p ActiveEnterTimestampMonotonic --value "
                  "llmhost-nvidia-uvm.service llama-main.service > /tmp/order")
        order = _sh(host, "cat /tmp/order").split()
        say(f"boot order: llmhost-nvidia-uvm active at {order[0] if order else '?'} us, llama-main at "
            f"{order[1] if len(order) > 1 else '?'} us (monotonic)")
        _bench(inventory)
        _unit_vs_hand(host, blocks=args.blocks, requests=args.requests, tokens=args.tokens)
        if args.hardening:
            _hardening_probe(host)
        _records(host, "prove", evidence=False)
    return 0


def faults(args) -> int:
    receive()
    _install_wheels()
    with booted() as host:
        inventory = WORK / "inventory.py"
        _deploy(inventory, "faults.log", "converge (a new unit is switched in if the wheel "
                                         "changed it)")
        _records(host, "faults")
        # 1. (Until c10bbda: a new unit given `--device none` through extra_args, refused by the
        # GPU gate. --device is now the `gpus` setting's, so a GPU unit cannot be told to serve
        # from the CPU; a GPU service found off its GPU is gpu_realsize.py's off_gpu_repaired.)
        # 2. A GPU service whose unit hides the GPUs: the control and uvm nodes allowed by path,
        # the GPUs not (what the shipped unit did on driver 580: char-nvidia-frontend matched
        # nothing). A group name would not do: char-nvidiactl is major 195, the GPUs' too.
        _sh(host, "mkdir -p /etc/systemd/system/llama-hidden.service.d && printf '[Service]\\n"
                  "DeviceAllow=\\nDeviceAllow=/dev/nvidiactl rw\\nDeviceAllow=/dev/nvidia-uvm rw\\n' "
                  "> /etc/systemd/system/llama-hidden.service.d/hide-gpu.conf", check=True)
        hidden = _deploy(_inventory(host, "hidden.py", services={"hidden": {
            "port": HIDDEN_PORT, "gpu_layers": 99, "ctx_size": 4096, "parallel": 2,
            "extra_args": ["--no-warmup", "--no-repack"]}}),
            "faults.log", "a new service whose unit hides the GPU")
        lines = [l.strip() for l in hidden.output.splitlines()
                 if "without its GPU" in l or "no previous unit" in l]
        say(f"fault 2 (GPU hidden by the unit): exit {hidden.returncode}; " + " | ".join(lines))
        _sh(host, "rm -rf /etc/systemd/system/llama-hidden.service.d")
        _hidden_from_the_new_unit(host)
        # 3. A flag this build rejects: refused before the unit changes.
        flag = _deploy(_inventory(host, "flag.py", services={"main": {"extra_args": ["--no-such-flag"]}}),
                       "faults.log", "a flag the build rejects")
        say(f"fault 3: exit {flag.returncode}; "
            + " | ".join(l.strip() for l in flag.output.splitlines() if "--help does not list" in l)[:400])
        back = _deploy(inventory, "faults.log", "the original settings again")
        say(f"after the faults: exit {back.returncode}, changed: {back.changed_operations}")
        _verify(inventory, "verify-faults.log", "after the faults")
    return 0


HIDE_MAIN = "/etc/systemd/system/llama-main.service.d/hide-gpu.conf"
# On the host, bounded (300 s): once the new unit's process runs (with the drop-in in force),
# remove the drop-in file without a daemon-reload. The switch's rollback reloads systemd, so
# the previous unit starts with its GPUs again: the GPU is hidden from the new unit only.
UNHIDE_WATCHER = (
    "old=$(systemctl show -p MainPID --value llama-main); end=$(( $(date +%s) + 300 )); "
    "while [ $(date +%s) -lt $end ]; do p=$(systemctl show -p MainPID --value llama-main); "
    f"if [ \"$p\" != \"$old\" ] && [ \"$p\" != 0 ]; then rm -f {HIDE_MAIN}; "
    "echo \"new pid $p ran with the GPU hidden\" > /run/unhide.log; exit 0; fi; sleep 0.1; done; "
    "echo no new pid in 300 s > /run/unhide.log")


def _hidden_from_the_new_unit(host) -> None:
    """Fault 2b: the serving GPU service gets a changed unit whose GPUs are hidden (a drop-in
    narrowing DeviceAllow, in this test only); the gate must refuse it and the previous unit
    must serve on the GPU again."""
    _sh(host, f"mkdir -p {os.path.dirname(HIDE_MAIN)} && printf '[Service]\\nDeviceAllow=\\n"
              f"DeviceAllow=/dev/nvidiactl rw\\nDeviceAllow=/dev/nvidia-uvm rw\\n' > {HIDE_MAIN}",
        check=True)
    # A script file: systemd would expand the $ words of a command line given to systemd-run.
    _sh(host, f"cat > /run/unhide.sh <<'EOF'\n{UNHIDE_WATCHER}\nEOF", check=True)
    host.exec("systemd-run", "--unit=llmhost-test-unhide", "--collect", "bash", "/run/unhide.sh",
              check=True)
    from tests.support.health import HealthPoller

    poller = HealthPoller(GPU_PORT)
    poller.start()
    started = time.monotonic()
    changed = _deploy(_inventory(host, "hidden-main.py", services={"main": {
        "ctx_size": 65536, "extra_args": ["--no-warmup", "--no-repack"]}}),
        "faults.log", "main with a changed unit whose GPUs are hidden")
    time.sleep(2)
    poller.stop()
    lines = [l.strip() for l in changed.output.splitlines()
             if "without its GPU" in l or "ROLLED" in l]
    say(f"fault 2b (the serving service's new unit hides the GPU): exit {changed.returncode}; "
        + " | ".join(lines) + f"; watcher: {_sh(host, 'cat /run/unhide.log').strip()}")
    say(f"fault 2b: /health outages (s after the deploy started, length): "
        f"{[(round(s - started, 1), round(d, 1)) for s, d in poller.outages()]}")
    evidence = _gpu_evidence(host, "llama-main.service")
    ctx = _sh(host, "systemctl show -p ExecStart --value llama-main | grep -o -- '--ctx-size [0-9]*'")
    say(f"fault 2b: after the rollback, llama-main ({ctx.strip()}): ok={evidence['ok']}, "
        f"{evidence['reason']}")
    _sh(host, f"rm -rf {os.path.dirname(HIDE_MAIN)} && systemctl daemon-reload")


def shell(args) -> int:
    """Boot the host and run --command inside it (diagnosis)."""
    _install_wheels()
    with booted() as host:
        print(_sh(host, args.command), flush=True)
    return 0


def two_gpus(args) -> int:
    receive()
    _install_wheels()
    with booted() as host:
        _wait_healthy(GPU_PORT, 120, "llama-main")
        inventory = _inventory(host, "two.py", services={
            "main": None,
            "gpu0": {"port": 18084, "gpu_layers": 99, "ctx_size": 16384, "parallel": 4,
                     "cache_type_k": "q4_0", "cache_type_v": "q8_0", "gpus": [0]},
            "gpu1": {"port": 18085, "gpu_layers": 99, "ctx_size": 16384, "parallel": 4,
                     "cache_type_k": "q4_0", "cache_type_v": "q8_0", "gpus": [1]},
            "both": {"port": 18086, "gpu_layers": 99, "ctx_size": 16384, "parallel": 4,
                     "cache_type_k": "q4_0", "cache_type_v": "q8_0", "gpus": [0, 1]}})
        first = _deploy(inventory, "two-gpus.log", "three GPU services on two GPUs")
        rerun = _deploy(inventory, "two-gpus.log", "rerun")
        say(f"two GPUs: first exit {first.returncode}, rerun changed: {rerun.changed_operations or 'nothing'}")
        _verify(inventory, "verify-two-gpus.log", "two GPUs")
        for unit, gpus in (("llama-gpu0.service", "0"), ("llama-gpu1.service", "1"),
                           ("llama-both.service", "0,1")):
            evidence = _gpu_evidence(host, unit, gpus)
            (OUT / f"gpu-evidence-{unit.split('.')[0]}.json").write_text(json.dumps(evidence, indent=1))
            say(f"{unit} (gpus {gpus}): {evidence['ok']}: {evidence['reason']}")
        say(_sh(host, "nvidia-smi --query-compute-apps=pid,gpu_bus_id,used_memory --format=csv"))
    return 0


FLEET = {"gpu0host": (18082, 0), "gpu1host": (18092, 1)}  # host: (port of main, its GPU)
GATEWAY_HOST, GATE_PORT, GATE_METRICS = "gatehost", 18100, 18101


def _fleet_inventory(hosts: dict, key: Path) -> Path:
    """Two GPU hosts, one GPU each, serving `main` with one pushed key, and a gateway host."""
    model = {"source": "local", "path": str(WORK / "gemma-3-270m-q4_k_m.gguf"),
             "sha256": json.loads((WORK / "manifest.json").read_text())["model_sha256"]}
    servers = []
    for name, (port, gpu) in FLEET.items():
        main = {"port": port, "model": model, "gpu_layers": 99, "ctx_size": 32768, "parallel": 4,
                "cache_type_k": "q4_0", "cache_type_v": "q8_0", "reasoning": "off",
                "gpus": [gpu], "api_key_file": str(key)}
        if REHEARSAL:
            main.update(gpu_layers=0, ctx_size=4096, gpus=None)
        servers.append((name, {**hosts[name].pyinfra_data(), "llm_llamacpp_source": "local",
                               "llm_llamacpp_local_path": str(WORK / "llama.cpp.tar.gz"),
                               # Both hosts build at once on one machine: half its cores each.
                               "llm_build_jobs": max(1, (os.cpu_count() or 2) // 2),
                               "llm_services": {"main": main}}))
    gateway = [(GATEWAY_HOST, {**hosts[GATEWAY_HOST].pyinfra_data(), "llm_gateway": {
        "clients": ["bench"], "bind": "127.0.0.1", "port": GATE_PORT,
        "metrics_port": GATE_METRICS, "check_interval": 1}})]
    path = WORK / "fleet.py"
    path.write_text(f"gpu_servers = {servers!r}\nllm_gateways = {gateway!r}\n")
    return path


def gateway_phase(args) -> int:
    """Two GPU hosts (one GPU each) behind a gateway host: deploy, rerun, verify, then
    aggregate decode through the gateway at 8 parallel against one host at 4, alternated."""
    import contextlib
    import secrets

    receive()
    _install_wheels()
    key = WORK / "main.key"
    if not key.exists():
        key.write_text(secrets.token_hex(32) + "\n")
        key.chmod(0o600)
    with contextlib.ExitStack() as stack:
        hosts = {name: stack.enter_context(booted(name)) for name in (*FLEET, GATEWAY_HOST)}
        inventory = _fleet_inventory(hosts, key)
        first = _deploy(inventory, "gateway.log", "two GPU hosts and a gateway")
        if first.returncode:
            return 1
        rerun = _deploy(inventory, "gateway.log", "rerun")
        if rerun.returncode or rerun.changed_operations:
            say("rerun: NOT a zero-change run")
        _verify(inventory, "verify-gateway.log", "two GPU hosts and the gateway")
        client = hosts[GATEWAY_HOST].exec("cat", "/etc/llmhost-gateway/clients/bench.key").stdout.strip()
        _fleet_decode(key.read_text().strip(), client, blocks=args.blocks, tokens=args.tokens)
        say(_sh(hosts[GATEWAY_HOST], "python3 /usr/local/lib/llmhost/gateway_admin.py show"))
    return 0


def _batch(port: int, key: str, parallel: int, tokens: int) -> tuple[int, float]:
    """``parallel`` completions at once: (tokens generated, seconds from first start to last end)."""
    from concurrent.futures import ThreadPoolExecutor

    def one(_):
        body = json.dumps({"prompt": "Write a long story about a lighthouse keeper.",
                           "n_predict": tokens, "temperature": 0, "ignore_eos": True,
                           "cache_prompt": False}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/completion", data=body, headers={
            "Authorization": f"Bearer {key}", "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=300) as response:
            return int(json.load(response)["tokens_predicted"])

    started = time.monotonic()
    with ThreadPoolExecutor(parallel) as pool:
        generated = sum(pool.map(one, range(parallel)))
    return generated, time.monotonic() - started


def _fleet_decode(backend_key: str, client_key: str, blocks: int, tokens: int) -> None:
    one_host, gateway = [], []
    direct_port = FLEET["gpu0host"][0]
    _batch(direct_port, backend_key, 4, 16)  # warm both paths
    _batch(GATE_PORT, client_key, 8, 16)
    for _ in range(blocks):
        n, seconds = _batch(direct_port, backend_key, 4, tokens)
        one_host.append(n / seconds)
        n, seconds = _batch(GATE_PORT, client_key, 8, tokens)
        gateway.append(n / seconds)
    ratio = statistics.median(gateway) / statistics.median(one_host)
    result = {"tokens_per_request": tokens, "blocks": blocks, "one_host_at_4": one_host,
              "gateway_at_8": gateway, "median_one_host": statistics.median(one_host),
              "median_gateway": statistics.median(gateway), "ratio": ratio}
    (OUT / "fleet-decode.json").write_text(json.dumps(result, indent=1))
    say(f"aggregate decode, {blocks} alternated blocks of {tokens} tokens per request (client "
        f"side: tokens / wall time of the batch): one host at 4 parallel "
        f"{statistics.median(one_host):.1f} tok/s, the gateway over two hosts at 8 parallel "
        f"{statistics.median(gateway):.1f} tok/s, ratio {ratio:.2f} (target >= 1.8)")


# =========================================================================== measurements

def _wait_healthy(port: int, timeout: float, label: str) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    waited = time.monotonic() - started
                    say(f"{label}: /health 200 after {waited:.1f}s")
                    return waited
        except OSError:
            pass
        time.sleep(0.2)
    say(f"{label}: /health not 200 within {timeout:.0f}s")
    return -1


def _bench(inventory: Path) -> None:
    out = OUT / "bench"
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "llmhost.bench", str(inventory), "--service", "main", "--out", str(out),
         "--restart", "--decode-tokens", "256", "--rounds", "5", "--parallel", "1", "2", "4",
         "--needle-max", "16384", "--time-budget", "240"],
        cwd=WORK, env=_env(), capture_output=True, text=True, timeout=600)
    (OUT / "bench.log").write_text(result.stdout + result.stderr)
    say(f"bench: exit {result.returncode} in {time.monotonic() - started:.1f}s")
    # The report and the host's JSON come back flat (the device returns files 2 levels deep).
    for name in ("report.md", f"{SANDBOX}.json"):
        if (out / name).exists():
            shutil.copy(out / name, OUT / f"bench-{name}")
    shutil.rmtree(out, ignore_errors=True)


def _completion_rate(port: int, key: str, tokens: int) -> float:
    body = json.dumps({"prompt": "The capital of France is", "n_predict": tokens, "temperature": 0,
                       "ignore_eos": True, "cache_prompt": False}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/completion", data=body, headers={
        "Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return float(json.load(response)["timings"]["predicted_per_second"])


def _unit_vs_hand(host, blocks: int, requests: int, tokens: int) -> None:
    """Decode through the systemd unit against the same binary and argv started by hand in the
    same host (another port), in alternated blocks (ABBA) so the machine's drift cancels out."""
    from tests.support.sandbox import free_port

    pid = _sh(host, "systemctl show -p MainPID --value llama-main").strip()
    argv = [a for a in _sh(host, f"cat /proc/{pid}/cmdline").split("\0") if a]
    port = free_port()
    argv[argv.index("--port") + 1] = str(port)
    key = _sh(host, "cat /etc/llama/keys/main.key").strip()
    quoted = " ".join(shlex_quote(a) for a in argv)
    hand = subprocess.Popen(
        ["nsenter", "--target", str(host.init_pid), "--mount", "--uts", "--ipc", "--pid", "--root",
         "--wd", "--", "sh", "-c", f"echo $$ > /tmp/hand.pid; exec runuser -u llama -- {quoted} "
                                   f"> /tmp/hand.log 2>&1"],
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    try:
        if _wait_healthy(port, 120, "hand-started llama-server") < 0:
            say(_sh(host, "tail -20 /tmp/hand.log"))
            return
        for target in (GPU_PORT, port):  # warm-up, not counted
            _completion_rate(target, key, tokens)
        unit_rates, hand_rates, ratios = [], [], []
        for block in range(blocks):
            order = (GPU_PORT, port) if block % 2 == 0 else (port, GPU_PORT)
            rates = {}
            for target in order:
                rates[target] = [_completion_rate(target, key, tokens) for _ in range(requests)]
            unit_rates += rates[GPU_PORT]
            hand_rates += rates[port]
            ratios.append(statistics.median(rates[GPU_PORT]) / statistics.median(rates[port]))
        ratio = statistics.median(unit_rates) / statistics.median(hand_rates)
        say(f"decode through the unit / by hand, {blocks} alternated blocks of {requests} requests of "
            f"{tokens} tokens at 1 request: unit {statistics.median(unit_rates):.1f} tok/s, hand "
            f"{statistics.median(hand_rates):.1f} tok/s, ratio {ratio:.3f} (per block "
            f"{', '.join(f'{r:.3f}' for r in ratios)})")
        (OUT / "unit-vs-hand.json").write_text(json.dumps({
            "argv_unit": argv, "tokens": tokens, "blocks": blocks, "requests": requests,
            "unit": unit_rates, "hand": hand_rates, "block_ratios": ratios, "ratio": ratio}, indent=1))
    finally:
        hand_pid = _sh(host, "cat /tmp/hand.pid").strip()
        if hand_pid:
            _sh(host, f"kill {hand_pid}")
        hand.wait(timeout=30)


def shlex_quote(arg: str) -> str:
    import shlex
    return shlex.quote(arg)


# Each set added to the deployed GPU unit alone (a drop-in), to find the tightest unit CUDA still
# serves under. List settings add up across files: an empty assignment resets them first.
HARDENING_PROBES = (
    "PrivateUsers=yes",
    "RestrictAddressFamilies=\nRestrictAddressFamilies=AF_INET AF_INET6",
    "DeviceAllow=\nDeviceAllow=char-nvidia rw\nDeviceAllow=char-nvidiactl rw\nDeviceAllow=char-nvidia-uvm rw",
    "MemoryDenyWriteExecute=no",
)


def _hardening_probe(host) -> None:
    results = []
    dropin = "/etc/systemd/system/llama-main.service.d/zz-probe.conf"
    for lines in HARDENING_PROBES:
        _sh(host, f"mkdir -p {os.path.dirname(dropin)} && printf '[Service]\\n%s\\n' {shlex_quote(lines)} "
                  f"> {dropin} && systemctl daemon-reload && systemctl restart llama-main", check=True)
        waited = _wait_healthy(GPU_PORT, 90, f"probe {lines.splitlines()[0]}")
        evidence = _gpu_evidence(host, "llama-main.service") if waited >= 0 else {"ok": False, "reason": "no /health"}
        security = _sh(host, "systemd-analyze security --no-pager llama-main.service | tail -1").strip()
        results.append({"lines": lines, "health": waited >= 0, "gpu": evidence["ok"],
                        "reason": evidence["reason"], "security": security})
        say(f"probe [{lines.replace(chr(10), '; ')}]: health {waited >= 0}, gpu {evidence['ok']} "
            f"({evidence['reason']}); {security}")
    _sh(host, f"rm -f {dropin} && systemctl daemon-reload && systemctl restart llama-main", check=True)
    _wait_healthy(GPU_PORT, 90, "llama-main as deployed again")
    (OUT / "hardening.json").write_text(json.dumps(results, indent=1))


# =========================================================================== command line

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("phase", nargs="+",
                        choices=["pack", "probe", "receive", "up", "prove", "faults", "two-gpus",
                                 "gateway", "shell"])
    parser.add_argument("--command", default="true", help="shell: what to run inside the host")
    parser.add_argument("--wheel-only", action="store_true", help="pack: rebuild the llmhost wheel only")
    parser.add_argument("--realsize", action="store_true",
                        help="pack: for benchmarks/gpu_realsize.py (the gguf wheel, no model)")
    parser.add_argument("--blocks", type=int, default=6, help="prove: unit/hand alternated blocks")
    parser.add_argument("--requests", type=int, default=5, help="prove: requests per block")
    parser.add_argument("--tokens", type=int, default=256, help="prove: tokens per request")
    parser.add_argument("--no-hardening", dest="hardening", action="store_false")
    args = parser.parse_args()
    phases = {"pack": pack, "probe": probe, "receive": receive, "up": up, "prove": prove,
              "faults": faults, "two-gpus": two_gpus, "gateway": gateway_phase, "shell": shell}
    code = 0
    for phase in args.phase:
        if phase != "pack":
            WORK.mkdir(parents=True, exist_ok=True)
            OUT.mkdir(parents=True, exist_ok=True)
        code = phases[phase](args) or code
    return code


if __name__ == "__main__":
    sys.exit(main())

"""The guide's own setup at real size on the GPU host, and the GPU safety cases, through the
project's own deploy (issues 20 and 19).

The GPU machine has no network and a call carries at most 64 MiB, so the guide's models are made
there: shape-true GGUFs (benchmarks/shape_true.py: the real architecture, hyperparameters, tensor
names, shapes and quant types, random finite weights) of Qwen3.5-35B-A3B UD-Q4_K_XL (`main`, the
GPU service), the dense Qwen3.5-27B Q4_K_M (decode against the MoE and the bandwidth limit) and
Qwen2.5-1.5B-Instruct Q8_0 (the guide's CPU translator). The host is the same GPU sandbox host as
benchmarks/gpu_sandbox.py (a Debian 12 with systemd as PID 1, reached as a sudo user over SSH);
`pyinfra inventory.py deploy.py` from the llmhost wheel converges it into both of the guide's
services. The model files are hard-linked into the host's model folder with the record the
deploy's own placement writes (place_model.py), so its model step finds them in place: a 19 GB
push over loopback SSH would cost minutes and a second 19 GB of the machine's 64 GB of disk.
Everything else is the deploy's.

Here (the development machine; needs the test caches, as gpu_sandbox):

    python -m benchmarks.gpu_sandbox pack --realsize   # rootfs, llama.cpp, wheels (one call)

There, calls back to back (the machine keeps /var/tmp while warm, 30 s after a call):

    python3 -m benchmarks.gpu_realsize start    # receive; the models are written in the
                                                # background (setsid) while pieces arrive
    python3 -m benchmarks.gpu_sandbox receive   # the middle pieces
    python3 -m benchmarks.gpu_realsize up       # receive; boot; cold deploy of both services,
                                                # zero-change rerun, verify
    python3 -m benchmarks.gpu_realsize prove    # a reboot to first answers; uvm removed and
                                                # restart; kill -9; a GPU service off its GPU
                                                # named by verify, repaired by the deploy;
                                                # --device with no GPU; the guide's tables
                                                # (llmhost-bench, llama-bench); a switch and a
                                                # forced rollback under a polling client
    python3 -m benchmarks.gpu_realsize tune     # llmhost-tune on main (throughput, >= 60 tok/s
                                                # and 32K context each, ~6 min), the profile
                                                # deployed, verify (after `up`; < 10 min)
    python3 -m benchmarks.gpu_realsize tune-budget  # main under a 16 GB budget held by the
                                                # ballast: the tuner's choice vs --fit (~5 min)

LLMHOST_GPU_REHEARSAL=1 runs it all on a machine without a GPU with the tiny recipes (every
service on the CPU), to find mistakes before device time is spent.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks import gpu_sandbox as gs
from benchmarks.gpu_sandbox import OUT, REHEARSAL, WORK, say

MODELS = WORK / "models"
# Recipe per role; the tiny ones in a rehearsal.
RECIPES = {
    "moe": "tiny-qwen35moe" if REHEARSAL else "qwen3.5-35b-a3b-ud-q4_k_xl",
    "dense": "tiny-qwen35" if REHEARSAL else "qwen3.5-27b-q4_k_m",
    "translator": "tiny-qwen2" if REHEARSAL else "qwen2.5-1.5b-instruct-q8_0",
}
MAIN_PORT, TRANSLATE_PORT, HAND_PORT = 18082, 18083, 18095
INVENTORY = WORK / "realsize.py"
# The guide's tables (benchmarks/reference/rtx5090-llamacpp-guide.txt, RTX 5090).
GUIDE_KV = {("f16", "f16"): 195, ("q4_0", "q8_0"): 188, ("q4_0", "q4_0"): 186,
            ("q5_0", "q5_0"): 153, ("iq4_nl", "iq4_nl"): 38}
GUIDE_AGGREGATE = {1: 190, 2: 290, 4: 356}
GUIDE_PREFILL_S = {9_000: 1.2, 53_000: 6.6, 107_000: 16.3, 178_000: 34.9}
GUIDE_DENSE_OVER_MOE = 66 / 190
CONTEXTS = (1_000, 2_000) if REHEARSAL else tuple(GUIDE_PREFILL_S)
# llmhost-tune (issue 21): main for throughput, every request >= 60 tok/s with 32K context,
# about 6 minutes; then the same model under a 16 GB budget (the ballast holds the rest of the
# H200) against llama.cpp's own --fit. A rehearsal runs main on the CPU: smaller terms.
TUNED_DIR, TUNED_BUDGET_DIR = WORK / "tuned", WORK / "tuned-16g"
MAIN_TUNE = ({"goal": "throughput", "min_tok_s": 5, "min_ctx": 2048, "slots": [1, 2, 4],
              "time_budget_s": 150} if REHEARSAL else
             {"goal": "throughput", "min_tok_s": 60, "min_ctx": 32768, "slots": [1, 2, 4, 8],
              "time_budget_s": 270})
BUDGET_TUNE = {**MAIN_TUNE, "goal": "latency", "slots": [1, 2, 4], "memory_budget_mib": 16384,
               "ballast": not REHEARSAL, "time_budget_s": 120 if REHEARSAL else 150}
TUNE_TOKENS = "32" if REHEARSAL else "128"
DENSE = os.environ.get("LLMHOST_REALSIZE_DENSE") == "1"


def model_path(role: str) -> Path:
    return MODELS / f"{RECIPES[role]}.gguf"


# =========================================================================== make

def make_models(args) -> int:
    """Write the shape-true models (sha256 beside the served ones), then measure the GPU's
    memory bandwidth. Run in the background by `start`; its lines go to WORK/make.log."""
    MODELS.mkdir(parents=True, exist_ok=True)

    def write(role: str) -> str:
        path = model_path(role)
        digest_file = path.with_suffix(".sha256")
        if digest_file.exists():
            return f"{path.name}: present"
        started = time.monotonic()
        # The writer writes PATH.partial and renames it when whole.
        subprocess.run([sys.executable, "-m", "benchmarks.shape_true", "write", RECIPES[role],
                        str(path), "--seed", "1"], check=True, cwd=gs.REPO, env=gs._env())
        written = time.monotonic() - started
        digest_file.write_text(gs.sha256(path) + "\n")
        return (f"{path.name}: {path.stat().st_size / 1e9:.2f} GB written in {written:.1f}s, "
                f"hashed in {time.monotonic() - started - written:.1f}s")

    # The served ones; the dense model only with LLMHOST_REALSIZE_DENSE=1 (device time).
    with ThreadPoolExecutor(2) as pool:
        for line in pool.map(write, ("moe", "translator")):
            say(f"make: {line}")
    if DENSE:
        say(f"make: {write('dense')}")
    described = [subprocess.run([sys.executable, "-m", "benchmarks.shape_true", "describe", name],
                                capture_output=True, text=True, cwd=gs.REPO, env=gs._env())
                 for name in RECIPES.values()]
    (WORK / "shape-true-describe.txt").write_text("".join(d.stdout + d.stderr for d in described))
    if not REHEARSAL:
        bandwidth()
    say("make: done")
    return 0


def start(args) -> int:
    """Receive, install the wheels, and start make_models in its own session: it runs on while
    the next calls carry the rest (the machine stays while calls follow within 30 s)."""
    gs.receive()
    gs._install_wheels()
    log = open(WORK / "make.log", "ab")
    subprocess.Popen([sys.executable, "-m", "benchmarks.gpu_realsize", "make-models"],
                     cwd=gs.REPO, env=gs._env(), stdout=log, stderr=subprocess.STDOUT,
                     start_new_session=True)
    say("start: writing the models in the background (WORK/make.log)")
    return 0


def wait_for_models(roles: tuple[str, ...], timeout: float) -> bool:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if all(model_path(r).with_suffix(".sha256").exists() for r in roles):
            say(f"models {', '.join(roles)} ready (waited {time.monotonic() - started:.0f}s)")
            return True
        time.sleep(2)
    say(f"models {', '.join(roles)} NOT ready after {timeout:.0f}s: "
        f"{(WORK / 'make.log').read_text()[-1500:] if (WORK / 'make.log').exists() else 'no make.log'}")
    return False


def bandwidth() -> None:
    """A device-to-device copy of 8 GiB, best of 10 (torch is on the GPU machine): read+write
    bytes per second, the figure decode is held against."""
    script = ("import torch,json\n"
              "n=8<<30; a=torch.empty(n,dtype=torch.uint8,device='cuda'); b=torch.empty_like(a)\n"
              "b.copy_(a); torch.cuda.synchronize(); best=1e9\n"
              "for _ in range(10):\n"
              "  s=torch.cuda.Event(enable_timing=True); e=torch.cuda.Event(enable_timing=True)\n"
              "  s.record(); b.copy_(a); e.record(); torch.cuda.synchronize()\n"
              "  best=min(best,s.elapsed_time(e)/1000)\n"
              "print(json.dumps({'bytes':n,'seconds':best,'read_write_GBps':2*n/best/1e9,"
              "'device':torch.cuda.get_device_name(0)}))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    (WORK / "bandwidth.json").write_text(result.stdout or result.stderr)
    say(f"bandwidth: {result.stdout.strip() or result.stderr.strip()[-500:]}")


# =========================================================================== the host

def preplace(host, role: str) -> dict:
    """Hard-link a model into the host's model folder with the record place_model.py writes
    (same sha256, size, mtime): the deploy's model step then finds it in place. Returns the
    model settings naming it, as a user's inventory would (source local, sha256 known)."""
    path = model_path(role)
    digest = path.with_suffix(".sha256").read_text().strip()
    folder = gs._sandbox().root / "var/lib/llama-models" / f"local-{digest[:12]}"
    dest = folder / path.name
    if not dest.exists():
        folder.mkdir(parents=True, exist_ok=True)
        for d in (folder, folder.parent):
            os.chown(d, 0, 0)
            d.chmod(0o755)
        os.link(path, dest)
        os.chown(dest, 0, 0)
        dest.chmod(0o644)
        st = dest.stat()
        record = {"source": "local", "sha256": digest, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        Path(f"{dest}.record.json").write_text(json.dumps(record))
    return {"source": "local", "path": str(path), "sha256": digest}


def inventory(host, main_changes: dict | None = None, name: Path = INVENTORY,
              tuned_dir: Path | None = None) -> Path:
    """The guide's two services: `main` on the GPU with its flags, `translate` on the CPU;
    llmhost-tune's profile read from ``tuned_dir`` (the tune phases), else from a folder that
    holds none (the guide's flags as they are, for up and prove)."""
    main = {"port": MAIN_PORT, "model": preplace(host, "moe"), "gpu_layers": 99,
            "ctx_size": 131072, "parallel": 4, "flash_attn": "on", "cache_type_k": "q4_0",
            "cache_type_v": "q8_0", "load_mode": "mmap+mlock", "reasoning": "auto",
            "reasoning_format": "deepseek", "tune": MAIN_TUNE}
    translate = {"port": TRANSLATE_PORT, "model": preplace(host, "translator"), "gpu_layers": 0,
                 "ctx_size": 4096, "parallel": 4, "reasoning": "off"}
    if REHEARSAL:
        main.update(gpu_layers=0, ctx_size=8192)
    main.update(main_changes or {})
    data = {**host.pyinfra_data(), "llm_llamacpp_source": "local",
            "llm_llamacpp_local_path": str(WORK / "llama.cpp.tar.gz"),
            # The guide's K/V table compiled, so each pair runs its own kernel (iq4_nl has none
            # in ggml: it is converted, as the guide's slow row).
            "llm_cuda_fa_extra_pairs": [["q4_0", "q4_0"], ["q5_0", "q5_0"]],
            "llm_tuned_dir": str(tuned_dir or WORK / "untuned"),
            "llm_services": {"main": main, "translate": translate}}
    name.write_text(f"gpu_servers = [({gs.SANDBOX!r}, {data!r})]\n")
    return name


def up(args) -> int:
    gs.receive()
    gs._install_wheels()
    if not wait_for_models(("moe", "translator"), 240):
        return 1
    commit = (WORK / "commit.txt").read_text().strip() if (WORK / "commit.txt").exists() else "?"
    say(f"realsize up: llmhost wheel of commit {commit}; {gs._sh_here('nvidia-smi -L')}")
    with gs.booted() as host:
        path = inventory(host)
        first = gs._deploy(path, "realsize-deploy.log", "cold, both guide services at real size")
        if first.returncode:
            gs._records(host, "realsize-failed", evidence=not REHEARSAL)
            say(gs._sh(host, "journalctl -u llama-main -u llama-translate -n 40 --no-pager -o cat"))
            return 1
        rerun = gs._deploy(path, "realsize-rerun.log", "rerun")
        say(f"rerun: exit {rerun.returncode}, changed: {rerun.changed_operations or 'nothing'} "
            f"in {rerun.seconds:.1f}s")
        # LLMHOST_REALSIZE_UP_VERIFY=0 leaves verify to a later phase (device time).
        if os.environ.get("LLMHOST_REALSIZE_UP_VERIFY", "1") == "1":
            gs._verify(path, "realsize-verify.log", "after the cold deploy")
        startup_lines(host)
        if not REHEARSAL:
            gs._records(host, "realsize-up")
    return 0


def startup_lines(host) -> None:
    """What the journal says about loading, locking and the CPU build's self-test."""
    text = gs._sh(host, "journalctl -u llama-main -u llama-translate --no-pager -o cat | grep -iE "
                        "'mlock|load time|model size|CUDA0 model buffer|no usable GPU|invalid device|"
                        "server is listening' | tail -20")
    say(f"journal (load/lock):\n{text.strip()}")


# =========================================================================== prove

def prove(args) -> int:
    """One call (device time is short): the safety cases, the guide's tables, then a switch and
    a forced rollback of main. Each step says what it saw in summary.txt; figures go to
    tables.json; the deploy and verify logs beside it."""
    from tests.support.health import HealthPoller

    gs.receive()
    gs._install_wheels()
    booted_at = time.monotonic()
    tables: dict = {"recipes": RECIPES}
    with gs.booted() as host:
        # 1. A reboot (every call boots the host anew): both services come back by themselves.
        main_s = first_answer(MAIN_PORT, "/etc/llama/keys/main.key", host, 300)
        translate_s = first_answer(TRANSLATE_PORT, "/etc/llama/keys/translate.key", host, 120)
        say(f"reboot: main answered {time.monotonic() - booted_at:.1f}s after the boot began "
            f"({main_s:.1f}s after sshd), translate {translate_s:.1f}s after main; main "
            f"{on_gpu(host)}")
        tables["reboot"] = {"main_first_answer_s": main_s, "translate_first_answer_s": translate_s}
        if not REHEARSAL:
            uvm_removed(host)
        killed(host)
        if not REHEARSAL:
            off_gpu_repaired(host, INVENTORY)
            device_guard(host)
        tables.update(guide_tables(host))
        (OUT / "tables.json").write_text(json.dumps(tables, indent=1))
        tables["switches"] = switch_and_rollback(host, HealthPoller)
        (OUT / "tables.json").write_text(json.dumps(tables, indent=1))
    return 0


def first_answer(port: int, key_file: str, host, timeout: float) -> float:
    """Seconds until a one-token completion answers 200 (the key read on the host)."""
    key = gs._sh(host, f"cat {key_file}").strip()
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        try:
            body = json.dumps({"prompt": "Hello", "n_predict": 1}).encode()
            request = urllib.request.Request(f"http://127.0.0.1:{port}/completion", data=body,
                                             headers={"Authorization": f"Bearer {key}"})
            with urllib.request.urlopen(request, timeout=5) as response:
                if response.status == 200:
                    return time.monotonic() - started
        except OSError:
            pass
        time.sleep(0.2)
    return -1.0


def on_gpu(host) -> str:
    if REHEARSAL:
        return "(rehearsal: no GPU)"
    evidence = gs._gpu_evidence(host, "llama-main.service")
    return f"{evidence['ok']}: {evidence['reason']}"


def journal_since(host, since: str) -> str:
    """llama-main's lines since ``since`` that say whether it found its GPU and listened."""
    text = gs._sh(host, f"journalctl -u llama-main --since '{since}' --no-pager -o cat | grep -E "
                        f"'no usable GPU found|invalid device|server is listening|nvidia-uvm:' || true")
    return " | ".join(line.strip() for line in text.splitlines()[-6:])


def host_time(host) -> str:
    return gs._sh(host, "date '+%Y-%m-%d %H:%M:%S'").strip()


def uvm_removed(host) -> None:
    """Issue 19's case: /dev/nvidia-uvm removed, then a restart outside the deploy."""
    since = host_time(host)
    gs._sh(host, "rm -f /dev/nvidia-uvm /dev/nvidia-uvm-tools && systemctl restart llama-main")
    waited = first_answer(MAIN_PORT, "/etc/llama/keys/main.key", host, 300)
    say(f"uvm removed + restart: answered after {waited:.1f}s; main {on_gpu(host)}; journal: "
        f"{journal_since(host, since)}; nodes now: {' '.join(gs._sh(host, 'ls /dev/nvidia-uvm*').split())}")


def killed(host) -> None:
    since = host_time(host)
    pid = gs._sh(host, "systemctl show -p MainPID --value llama-main").strip()
    gs._sh(host, f"kill -9 {pid}")
    waited = first_answer(MAIN_PORT, "/etc/llama/keys/main.key", host, 300)
    say(f"kill -9 {pid}: answered again after {waited:.1f}s (RestartSec=5 included); main "
        f"{on_gpu(host)}; journal: {journal_since(host, since)}")


RUNTIME_DROP_IN = "/run/systemd/system/llama-main.service.d/zz-off-gpu.conf"


def main_argv(host) -> list[str]:
    return [a for a in gs._sh(host, "cat /proc/$(systemctl show -p MainPID --value llama-main)/cmdline")
            .split("\0") if a]


def off_gpu_repaired(host, path: Path) -> None:
    """A GPU service running off its GPU while its unit file is as the deploy wrote it: a runtime
    drop-in (what `systemctl edit --runtime` leaves; gone at the next boot) runs the argv
    without --device and without the uvm step while /dev/nvidia-uvm is missing; the drop-in is
    then removed without a restart. verify must name it; the next deploy must restart it onto
    its GPU (only its GpuHeld fact can tell: the unit file and its state are as written)."""
    words = main_argv(host)
    i = words.index("--device")
    without = " ".join(shlex.quote(w) for w in words[:i] + words[i + 2:])
    gs._sh(host, f"mkdir -p {os.path.dirname(RUNTIME_DROP_IN)} && printf '[Service]\\nExecStartPre=\\n"
                 f"ExecStart=\\nExecStart=%s\\n' {shlex.quote(without)} > {RUNTIME_DROP_IN} && "
                 f"systemctl daemon-reload && rm -f /dev/nvidia-uvm /dev/nvidia-uvm-tools && "
                 f"systemctl restart llama-main")
    waited = first_answer(MAIN_PORT, "/etc/llama/keys/main.key", host, 300)
    gs._sh(host, f"rm -f {RUNTIME_DROP_IN} && systemctl daemon-reload && "
                 f"python3 /usr/local/lib/llmhost/nvidia_uvm.py")
    say(f"off-GPU: the argv without --device, uvm missing, answered after {waited:.1f}s; main "
        f"{on_gpu(host)} (the runtime drop-in removed, no restart)")
    named = gpu_check_by_verify(path)
    say(f"off-GPU: verify (the GPU check) exit {named.returncode}: "
        f"{named.stdout.split('per-host summary ==')[-1].strip()[:600]}")
    repair = gs._deploy(path, "prove-repair.log", "repair of a GPU service off its GPU")
    lines = [line.strip() for line in repair.output.splitlines()
             if "not on its GPUs" in line or "healthy after" in line]
    say(f"off-GPU: deploy exit {repair.returncode}, changed {repair.changed_operations}; "
        f"{' | '.join(lines)}; main {on_gpu(host)}")
    after = gpu_check_by_verify(path)
    say(f"off-GPU: verify (the GPU check) after the repair: exit {after.returncode}")


def gpu_check_by_verify(path: Path) -> subprocess.CompletedProcess:
    """llmhost-verify with only the host suite's GPU placement check (seconds, not a minute)."""
    result = subprocess.run([sys.executable, "-m", "llmhost.verify", str(path), "--quiet", "--",
                             "-k", "gpu_services_run_on_their_gpus"], cwd=WORK, env=gs._env(),
                            capture_output=True, text=True)
    with open(OUT / "prove-verify.log", "a") as log:
        log.write(result.stdout + result.stderr)
    return result


def device_guard(host) -> None:
    """What the pinned llama-server does given --device CUDA0 and no usable GPU: run by hand as
    the service user with the GPUs hidden (CUDA_VISIBLE_DEVICES empty)."""
    words = main_argv(host)
    words[words.index("--port") + 1] = str(HAND_PORT)
    command = " ".join(shlex.quote(w) for w in words)
    out = gs._sh(host, f"cd /tmp && CUDA_VISIBLE_DEVICES= timeout 60 runuser -u llama -- {command} "
                       f"> /tmp/guard.log 2>&1; echo exit=$?; grep -E 'invalid device|no usable GPU|"
                       f"listening' /tmp/guard.log | head -3")
    say(f"--device CUDA0 with the GPU hidden: {' | '.join(out.strip().splitlines())}")


# --------------------------------------------------------------------------- the guide's tables

def guide_tables(host) -> dict:
    """llmhost-bench on main (decode at 1/2/4, served vs tg128 alternated, the K/V sweep over
    the compiled pairs), llama-bench for iq4_nl (no kernel in ggml), prefill at the guide's
    contexts with the GPU's memory sampled, the dense model's tg128 and served decode."""
    out = {"bench": bench_main()}
    moe = placed_path("moe")
    out["iq4_nl"] = llama_bench(host, moe, "-p", "512", "-n", "128", "-r", "1", "-ctk", "iq4_nl",
                                "-ctv", "iq4_nl")
    say(f"iq4_nl/iq4_nl: {rates(out['iq4_nl'])}")
    out["prefill"] = prefill(host, moe)
    if DENSE and wait_for_models(("dense",), 60):
        out["dense"] = dense(host)
    bandwidth_file = WORK / "bandwidth.json"
    out["bandwidth"] = json.loads(bandwidth_file.read_text()) if bandwidth_file.exists() else None
    out["describe"] = (WORK / "shape-true-describe.txt").read_text() \
        if (WORK / "shape-true-describe.txt").exists() else None
    return out


def bench_main() -> dict | None:
    out = WORK / "bench"
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "llmhost.bench", str(INVENTORY), "--service", "main", "--out", str(out),
         "--kv-sweep", "--decode-tokens", "256", "--rounds", "1", "--parallel", "1", "2", "4",
         "--bench-repetitions", "1", "--ceiling-pairs", "2", "--needle-max", "9000",
         "--time-budget", "200"],
        cwd=WORK, env=gs._env(), capture_output=True, text=True, timeout=300)
    (OUT / "prove-bench.log").write_text(result.stdout + result.stderr)
    say(f"llmhost-bench on main: exit {result.returncode} in {time.monotonic() - started:.1f}s")
    found = out / f"{gs.SANDBOX}.json"
    return json.loads(found.read_text()) if found.exists() else None


def llama_bench(host, model: str, *flags: str, timeout: float = 300, env: str = "") -> list[dict]:
    """llama-bench of the deployed build, inside the host: its JSON rows. Flash attention on
    unless the flags say (llama-bench runs every value a repeated flag gives)."""
    bench = json.loads(gs._sh(host, "cat /etc/llama/llmhost.json"))["llama_cpp"]["bench"]
    ngl = "0" if REHEARSAL else "99"
    fa = "" if "-fa" in flags else "-fa 1"
    command = (f"{env} {bench} -m {shlex.quote(model)} -ngl {ngl} {fa} -o json "
               f"{' '.join(flags)}")
    result = host.exec("bash", "-c", command, check=False, timeout=timeout)
    try:
        return json.loads(result.stdout)
    except ValueError:
        say(f"llama-bench {' '.join(flags)}: no JSON ({result.stderr.strip()[-400:]})")
        return []


def rates(rows: list[dict]) -> str:
    return ", ".join(f"{'tg' if r.get('n_gen') else 'pp'}{r.get('n_gen') or r.get('n_prompt')} "
                     f"{r.get('avg_ts', 0):.1f} tok/s" for r in rows)


def placed_path(role: str) -> str:
    digest = model_path(role).with_suffix(".sha256").read_text().strip()
    return f"/var/lib/llama-models/local-{digest[:12]}/{model_path(role).name}"


def gpu_used_mib() -> int | None:
    used = gs._sh_here("nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits").strip()
    return int(used) if used.isdigit() else None


def prefill(host, model: str) -> list[dict]:
    """One prompt of N tokens each (llama-bench -p N -n 0, K=q4_0 V=q8_0 as the service), the
    GPU's used memory sampled every 0.2 s."""
    rows = []
    for n in CONTEXTS:
        peak, stop = [0], threading.Event()

        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], gpu_used_mib() or 0)
                time.sleep(0.2)

        before = gpu_used_mib()
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        found = llama_bench(host, model, "-p", str(n), "-n", "0", "-r", "1", "-ctk", "q4_0",
                            "-ctv", "q8_0")
        stop.set()
        sampler.join()
        if found:
            row = {"tokens": n, "prefill_s": n / found[0]["avg_ts"], "tok_s": found[0]["avg_ts"],
                   "gpu_mib_before": before, "gpu_mib_peak": peak[0]}
            rows.append(row)
            say(f"prefill {n} tokens: {row['prefill_s']:.2f}s ({row['tok_s']:.0f} tok/s); GPU "
                f"memory {before} MiB before, {peak[0]} MiB at the peak")
    return rows


def dense(host) -> dict:
    """The dense model (hard-linked into the host): llama-bench pp512/tg128, and decode at one
    request served by llama-server by hand with main's flags."""
    preplace(host, "dense")
    model = placed_path("dense")
    rows = llama_bench(host, model, "-p", "512", "-n", "128", "-r", "2", "-ctk", "q4_0",
                       "-ctv", "q8_0")
    say(f"dense: {rates(rows)}")
    return {"llama_bench": rows, "served_1": served_by_hand(host, model)}


def dense_phase(args) -> int:
    """One call for what the first sitting left out: a reboot with the machine's page cache
    dropped (the 19 GB model read from disk, not memory), then the dense model against the MoE,
    alternated (llama-bench tg128 with the service's K/V pair), the flags and settings the
    project controls that could raise the dense decode (flash attention off/on, F16 K/V, CUDA
    graphs off as the control), and the dense model served at one request."""
    gs.receive()
    gs._install_wheels()
    if not wait_for_models(("moe", "translator", "dense"), 300):
        return 1
    if not REHEARSAL:
        subprocess.run("sync && echo 3 > /proc/sys/vm/drop_caches", shell=True, check=True)
        say(f"page cache dropped: {gs._sh_here('grep -E ^Cached: /proc/meminfo').strip()}")
    booted_at = time.monotonic()
    found: dict = {"recipes": RECIPES}
    with gs.booted() as host:
        main_s = first_answer(MAIN_PORT, "/etc/llama/keys/main.key", host, 400)
        translate_s = first_answer(TRANSLATE_PORT, "/etc/llama/keys/translate.key", host, 120)
        say(f"reboot, page cache cold: main answered {time.monotonic() - booted_at:.1f}s after "
            f"the boot began ({main_s:.1f}s after sshd); translate {translate_s:.1f}s after "
            f"main; main {on_gpu(host)}")
        found["cold_reboot"] = {"main_first_answer_s": main_s, "since_boot_s":
                                time.monotonic() - booted_at, "translate_after_s": translate_s}
        preplace(host, "dense")
        models = {"moe": placed_path("moe"), "dense": placed_path("dense")}
        service_kv = ("-ctk", "q4_0", "-ctv", "q8_0")
        rounds = []
        for round_ in range(3):  # the first also warms the page cache
            for role in ("dense", "moe"):
                rows = llama_bench(host, models[role], "-p", "0", "-n", "128", "-r", "2",
                                   *service_kv)
                rounds.append({"role": role, "round": round_, "rows": rows})
                say(f"{role} tg128 (round {round_ + 1}): {rates(rows)}")
        found["alternated"] = rounds
        variants = {"fa on, q4_0/q8_0 (the service)": ("-fa", "1", *service_kv),
                    "fa on, f16/f16": ("-fa", "1", "-ctk", "f16", "-ctv", "f16"),
                    "fa off, f16/f16": ("-fa", "0", "-ctk", "f16", "-ctv", "f16")}
        found["variants"] = {}
        for label, flags in variants.items():
            rows = llama_bench(host, models["dense"], "-p", "0", "-n", "128", "-r", "2", *flags)
            found["variants"][label] = rows
            say(f"dense tg128, {label}: {rates(rows)}")
        rows = llama_bench(host, models["dense"], "-p", "0", "-n", "128", "-r", "2", *service_kv,
                           env="GGML_CUDA_DISABLE_GRAPHS=1")
        found["variants"]["CUDA graphs off (control)"] = rows
        say(f"dense tg128, CUDA graphs off: {rates(rows)}")
        found["dense_served_1"] = served_by_hand(host, models["dense"])
        bandwidth_file = WORK / "bandwidth.json"
        found["bandwidth"] = (json.loads(bandwidth_file.read_text())
                              if bandwidth_file.exists() else None)
        (OUT / "tables-dense.json").write_text(json.dumps(found, indent=1))
    return 0


def served_by_hand(host, model: str) -> dict:
    words = main_argv(host)
    words[words.index("--model") + 1] = model
    words[words.index("--port") + 1] = str(HAND_PORT)
    command = " ".join(shlex.quote(w) for w in words)
    gs._sh(host, f"cd /tmp && (setsid runuser -u llama -- {command} > /tmp/dense.log 2>&1 & "
                 f"echo $! > /tmp/dense.pid)")
    try:
        if gs._wait_healthy(HAND_PORT, 240, "dense by hand") < 0:
            return {"error": gs._sh(host, "tail -5 /tmp/dense.log")}
        key = gs._sh(host, "cat /etc/llama/keys/main.key").strip()
        gs._completion_rate(HAND_PORT, key, 16)
        found = [gs._completion_rate(HAND_PORT, key, 256) for _ in range(3)]
        say(f"dense served by hand, 1 request of 256 tokens: {', '.join(f'{r:.1f}' for r in found)} tok/s")
        return {"decode_tok_s": found, "median": statistics.median(found)}
    finally:
        gs._sh(host, "kill $(cat /tmp/dense.pid) 2>/dev/null; sleep 1; "
                     "pkill -u llama -f -- '--port %d' || true" % HAND_PORT)


# --------------------------------------------------------------------------- switch, rollback

def switch_and_rollback(host, poller_cls) -> list[dict]:
    """A switch of main (parallel 4 -> 2), a forced rollback (a flag --help lists whose file
    does not exist: the new process exits), and back, each under a client polling /health."""
    found = []
    for label, changes in (("switch (parallel 2)", {"parallel": 2}),
                           ("forced rollback (--lora of a missing file)",
                            {"parallel": 2, "extra_args": ["--lora", "/nonexistent.gguf"]})):
        poller = poller_cls(MAIN_PORT)
        poller.start()
        result = gs._deploy(inventory(host, changes, WORK / "realsize-change.py"),
                            "prove-switch.log", label)
        time.sleep(1)
        poller.stop()
        windows = [round(seconds, 1) for _, seconds in poller.outages()]
        lines = [line.strip() for line in result.output.splitlines()
                 if "healthy after" in line or "ROLLED BACK" in line or "not healthy" in line]
        say(f"{label}: exit {result.returncode} in {result.seconds:.1f}s; /health outages seen by "
            f"a client {windows} s; {' | '.join(lines)}")
        found.append({"label": label, "exit": result.returncode, "seconds": result.seconds,
                      "outages_s": windows, "lines": lines})
    inventory(host, {"parallel": 2})  # the inventory file as deployed last
    return found


# --------------------------------------------------------------------------- tune (issue 21)

def run_tune(path: Path, label: str, budget: int) -> subprocess.CompletedProcess:
    """`llmhost-tune INVENTORY --service main`, its lines streamed and kept."""
    started = time.monotonic()
    process = subprocess.Popen([sys.executable, "-m", "llmhost.tune", str(path), "--service", "main",
                                "--tokens", TUNE_TOKENS], cwd=WORK, env=gs._env(),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    with open(OUT / f"{label}.log", "a") as log:
        for line in process.stdout:
            lines.append(line)
            log.write(line)
            if any(k in line for k in ("tune: [", "proposal", "FAILED", "ballast", "does not fit",
                                       "largest context", "stopped", "kv ")):
                print(f"  | {line.rstrip()[:220]}", flush=True)
    code = process.wait(timeout=budget + 400)
    say(f"{label}: llmhost-tune exit {code} in {time.monotonic() - started:.1f}s "
        f"(budget {budget} s)")
    return subprocess.CompletedProcess(process.args, code, "".join(lines), "")


def tune_figures(tuned_dir: Path, label: str) -> dict | None:
    """The comparison of the last report: each row's figures, and the chosen one over the
    others at the goal's load (the acceptance ratios)."""
    reports = sorted((tuned_dir / "reports").glob(f"{gs.SANDBOX}-*/main.json"))
    if not reports:
        say(f"{label}: no report")
        return None
    result = json.loads(reports[-1].read_text())
    rows = (result.get("comparison") or {}).get("rows") or {}
    figures = {name: {k: row.get(k) for k in ("decode_1_tok_s", "per_request_min_tok_s",
                                               "aggregate_tok_s", "memory_mib", "error")}
               for name, row in rows.items()}
    key = "decode_1_tok_s" if result["goal"] == "latency" else "aggregate_tok_s"
    chosen = (figures.get("chosen") or {}).get(key)
    ratios = {f"chosen/{name}": round(chosen / row[key], 3) for name, row in figures.items()
              if name != "chosen" and chosen and row.get(key)}
    say(f"{label}: goal {result['goal']}, {result['seconds']:.0f} s of {result['budget_s']:.0f}; "
        f"chosen {result.get('chosen', {}).get('flags')}; {key}: "
        + ", ".join(f"{n} {_fmt(r.get(key))}" for n, r in figures.items())
        + f"; ratios {ratios}; proposal: {(result.get('proposal') or {}).get('reason')}")
    return {"figures": figures, "ratios": ratios, "seconds": result["seconds"],
            "stopped_early": result.get("stopped_early"), "errors": result.get("errors")}


def _fmt(value) -> str:
    return "—" if value is None else f"{value:.1f}"


def pack_tune_files(tuned_dir: Path, name: str) -> None:
    """The profile, reports, JSON and plots as one file in $OUT (a call returns few files)."""
    import tarfile
    with tarfile.open(OUT / name, "w:gz") as tar:
        tar.add(tuned_dir, arcname=tuned_dir.name)


def tune_phase(args) -> int:
    """llmhost-tune on main for the throughput goal (the acceptance's terms), the profile
    deployed through the deploy, verify. After `up` (main deployed, the models written)."""
    gs.receive()
    gs._install_wheels()
    tables: dict = {}
    with gs.booted() as host:
        path = inventory(host, tuned_dir=TUNED_DIR)
        found = run_tune(path, "tune", MAIN_TUNE["time_budget_s"])
        tables["tune"] = tune_figures(TUNED_DIR, "tune")
        profile = TUNED_DIR / f"{gs.SANDBOX}.py"
        if found.returncode == 0 and profile.exists():
            say(f"profile:\n{profile.read_text()}")
            deployed = gs._deploy(path, "tune-deploy.log", "the tuned profile")
            tables["deploy"] = {"exit": deployed.returncode, "seconds": deployed.seconds,
                                "changed": deployed.changed_operations}
            tables["verify_exit"] = gs._verify(path, "tune-verify.log", "on the tuned profile")
        pack_tune_files(TUNED_DIR, "tune.tar.gz")
    (OUT / "tune.json").write_text(json.dumps(tables, indent=1))
    return 0 if tables.get("verify_exit") == 0 else 1


def tune_budget_phase(args) -> int:
    """main under a 16 GB memory budget: the ballast holds the rest of the GPU, so the tuner's
    candidates and llama.cpp's --fit see 16 GB; the tuner's choice against --fit, alternated.
    Its profile goes to a folder of its own (the deployed profile stays the `tune` phase's)."""
    gs.receive()
    gs._install_wheels()
    with gs.booted() as host:
        path = inventory(host, {"tune": BUDGET_TUNE}, WORK / "realsize-16g.py", TUNED_BUDGET_DIR)
        run_tune(path, "tune-budget", BUDGET_TUNE["time_budget_s"])
        figures = tune_figures(TUNED_BUDGET_DIR, "tune-budget")
        pack_tune_files(TUNED_BUDGET_DIR, "tune-budget.tar.gz")
    (OUT / "tune-budget.json").write_text(json.dumps(figures, indent=1))
    return 0 if figures else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("phase", nargs="+", choices=["start", "make-models", "up", "prove", "dense",
                                                      "tune", "tune-budget"])
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    OUT.mkdir(parents=True, exist_ok=True)
    phases = {"start": start, "make-models": make_models, "up": up, "prove": prove,
              "dense": dense_phase, "tune": tune_phase, "tune-budget": tune_budget_phase}
    code = 0
    for phase in args.phase:
        code = phases[phase](args) or code
    return code


if __name__ == "__main__":
    sys.exit(main())

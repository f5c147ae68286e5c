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

There, calls back to back (each phase powers the host off at its end, so each later phase
begins with a reboot of the deployed host):

    python3 -m benchmarks.gpu_realsize make     # receive, shape-true models, device bandwidth
    python3 -m benchmarks.gpu_realsize up       # cold deploy of both services, rerun, verify
    python3 -m benchmarks.gpu_realsize safety   # reboot to first answer; uvm removed + restart;
                                                # kill -9; a GPU service off its GPU found and
                                                # repaired by verify + deploy; --device without
                                                # a GPU; switch and forced rollback, outage
    python3 -m benchmarks.gpu_realsize tables   # the guide's tables as ratios, dense vs MoE,
                                                # decode against the bandwidth limit

LLMHOST_GPU_REHEARSAL=1 runs it all on a machine without a GPU with the tiny recipes (every
service on the CPU), to find mistakes before device time is spent.
"""

from __future__ import annotations

import argparse
import hashlib
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


def model_path(role: str) -> Path:
    return MODELS / f"{RECIPES[role]}.gguf"


# =========================================================================== make

def make(args) -> int:
    """Receive the carried pieces, write the three shape-true models (sha256 beside each), and
    measure the GPU's memory bandwidth with a device-to-device copy."""
    gs.receive()
    gs._install_wheels()
    MODELS.mkdir(parents=True, exist_ok=True)

    def write(role: str) -> str:
        path = model_path(role)
        digest_file = path.with_suffix(".sha256")
        if path.exists() and digest_file.exists():
            return f"{path.name}: present"
        started = time.monotonic()
        # The writer writes PATH.partial and renames it when whole.
        subprocess.run([sys.executable, "-m", "benchmarks.shape_true", "write", RECIPES[role],
                        str(path), "--seed", "1"], check=True, cwd=gs.REPO, env=gs._env())
        written = time.monotonic() - started
        digest_file.write_text(gs.sha256(path) + "\n")
        return (f"{path.name}: {path.stat().st_size / 1e9:.2f} GB written in {written:.1f}s, "
                f"hashed in {time.monotonic() - started - written:.1f}s")

    with ThreadPoolExecutor(3) as pool:
        for line in pool.map(write, RECIPES):
            say(f"make: {line}")
    describe = subprocess.run([sys.executable, "-m", "benchmarks.shape_true", "describe",
                               *RECIPES.values()], capture_output=True, text=True, cwd=gs.REPO,
                              env=gs._env())
    (OUT / "shape-true-describe.txt").write_text(describe.stdout + describe.stderr)
    say(f"make: describe:\n{describe.stdout.strip()}")
    if not REHEARSAL:
        bandwidth()
    return 0


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
    (OUT / "bandwidth.json").write_text(result.stdout or result.stderr)
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


def inventory(host, main_changes: dict | None = None, name: Path = INVENTORY) -> Path:
    """The guide's two services: `main` on the GPU with its flags, `translate` on the CPU."""
    main = {"port": MAIN_PORT, "model": preplace(host, "moe"), "gpu_layers": 99,
            "ctx_size": 131072, "parallel": 4, "flash_attn": "on", "cache_type_k": "q4_0",
            "cache_type_v": "q8_0", "load_mode": "mmap+mlock", "reasoning": "auto",
            "reasoning_format": "deepseek"}
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
            "llm_services": {"main": main, "translate": translate}}
    name.write_text(f"gpu_servers = [({gs.SANDBOX!r}, {data!r})]\n")
    return name


def up(args) -> int:
    gs.receive()
    gs._install_wheels()
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


# =========================================================================== safety

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


def no_gpu_lines(host, since: str) -> str:
    """Journal lines of llama-main since ``since`` that say it found no GPU, and whether any
    process of the unit then listened (it must not)."""
    text = gs._sh(host, f"journalctl -u llama-main --since '{since}' --no-pager -o cat | grep -E "
                        f"'no usable GPU found|invalid device|server is listening|nvidia-uvm' || true")
    return " | ".join(line.strip() for line in text.splitlines()[-8:])


def host_time(host) -> str:
    return gs._sh(host, "date '+%Y-%m-%d %H:%M:%S'").strip()


def safety(args) -> int:
    from tests.support.health import HealthPoller

    gs.receive()
    gs._install_wheels()
    booted_at = time.monotonic()
    with gs.booted() as host:
        path = INVENTORY
        # 1. A reboot: both services come back by themselves; time to the first answer.
        main_s = first_answer(MAIN_PORT, "/etc/llama/keys/main.key", host, 300)
        translate_s = first_answer(TRANSLATE_PORT, "/etc/llama/keys/translate.key", host, 300)
        say(f"reboot: first answer of main {time.monotonic() - booted_at:.1f}s after the boot "
            f"began (polled {main_s:.1f}s after sshd answered), translate {translate_s:.1f}s; "
            f"main {on_gpu(host)}")
        gs._verify(path, "safety-verify-reboot.log", "after a reboot")
        if not REHEARSAL:
            # 2. /dev/nvidia-uvm removed, then a restart outside the deploy (the case of issue 19).
            since = host_time(host)
            gs._sh(host, "rm -f /dev/nvidia-uvm /dev/nvidia-uvm-tools && systemctl restart llama-main")
            waited = first_answer(MAIN_PORT, "/etc/llama/keys/main.key", host, 300)
            say(f"uvm removed + restart: answered after {waited:.1f}s; main {on_gpu(host)}; "
                f"journal: {no_gpu_lines(host, since)}; nodes: "
                f"{gs._sh(host, 'ls -l /dev/nvidia-uvm*').strip()}")
        # 3. kill -9 of the main process: systemd restarts it, on its GPU.
        since = host_time(host)
        pid = gs._sh(host, "systemctl show -p MainPID --value llama-main").strip()
        gs._sh(host, f"kill -9 {pid}")
        waited = first_answer(MAIN_PORT, "/etc/llama/keys/main.key", host, 300)
        say(f"kill -9 {pid}: answered again after {waited:.1f}s (RestartSec=5 included); main "
            f"{on_gpu(host)}; journal: {no_gpu_lines(host, since)}")
        if not REHEARSAL:
            off_gpu_repaired(host, path)
            device_guard(host)
        switch_and_rollback(host, path, HealthPoller)
    return 0


RUNTIME_DROP_IN = "/run/systemd/system/llama-main.service.d/zz-off-gpu.conf"


def off_gpu_repaired(host, path: Path) -> None:
    """A GPU service running off its GPU with its unit file as the deploy wrote it: a runtime
    drop-in (what `systemctl edit --runtime` leaves; gone at the next boot) runs the argv without
    --device and without the uvm step while /dev/nvidia-uvm is missing, then the drop-in is
    removed without a restart. verify must name it; the next deploy must restart it onto its GPU
    (only the GpuHeld fact can tell: the unit file and its state are as written)."""
    argv = gs._sh(host, "cat /proc/$(systemctl show -p MainPID --value llama-main)/cmdline | tr '\\0' ' '")
    words = argv.split()
    i = words.index("--device")
    without = " ".join(shlex.quote(w) for w in words[:i] + words[i + 2:])
    gs._sh(host, f"mkdir -p {os.path.dirname(RUNTIME_DROP_IN)} && printf '[Service]\\nExecStartPre=\\n"
                 f"ExecStart=\\nExecStart=%s\\n' {shlex.quote(without)} > {RUNTIME_DROP_IN} && "
                 f"systemctl daemon-reload && rm -f /dev/nvidia-uvm /dev/nvidia-uvm-tools && "
                 f"systemctl restart llama-main")
    waited = first_answer(MAIN_PORT, "/etc/llama/keys/main.key", host, 300)
    gs._sh(host, f"rm -f {RUNTIME_DROP_IN} && systemctl daemon-reload && "
                 f"python3 /usr/local/lib/llmhost/nvidia_uvm.py")
    say(f"off-GPU: the old argv without --device answered after {waited:.1f}s; main "
        f"{on_gpu(host)} (runtime drop-in removed, no restart)")
    code = gs._verify(path, "safety-verify-off-gpu.log", "with main off its GPU")
    say(f"off-GPU: verify exit {code} (1 expected, naming it)")
    repair = gs._deploy(path, "safety-repair.log", "repair of a GPU service off its GPU")
    lines = [line.strip() for line in repair.output.splitlines()
             if "not on its GPUs" in line or "healthy after" in line]
    say(f"off-GPU: deploy exit {repair.returncode}, changed {repair.changed_operations}; "
        f"{' | '.join(lines)}; main {on_gpu(host)}")
    gs._verify(path, "safety-verify-repaired.log", "after the repair")


def device_guard(host) -> None:
    """What the pinned llama-server does given --device CUDA0 and no usable GPU: exit (run by
    hand with the GPUs hidden), where -ngl alone warns and serves from the CPU."""
    argv = gs._sh(host, "cat /proc/$(systemctl show -p MainPID --value llama-main)/cmdline | tr '\\0' ' '")
    words = argv.split()
    words[words.index("--port") + 1] = str(HAND_PORT)
    command = " ".join(shlex.quote(w) for w in words)
    out = gs._sh(host, f"cd /tmp && CUDA_VISIBLE_DEVICES= timeout 60 runuser -u llama -- {command} "
                       f"> /tmp/guard.log 2>&1; echo exit=$?; grep -E 'invalid device|no usable GPU|"
                       f"listening' /tmp/guard.log | head -5")
    say(f"--device with the GPU hidden: {' | '.join(out.split(chr(10)))}")


def switch_and_rollback(host, path: Path, poller_cls) -> None:
    """A switch of main (parallel 4 -> 2) and a forced rollback (a flag --help lists whose file
    does not exist: the new process exits), each under a client polling /health."""
    for label, changes in (("switch (parallel 2)", {"parallel": 2}),
                           ("forced rollback (--lora of a missing file)",
                            {"parallel": 2, "extra_args": ["--lora", "/nonexistent.gguf"]}),
                           ("switch back (parallel 4)", {})):
        poller = poller_cls(MAIN_PORT)
        poller.start()
        result = gs._deploy(inventory(host, changes, WORK / "realsize-change.py"),
                            "safety-switch.log", label)
        time.sleep(1)
        poller.stop()
        windows = [round(seconds, 1) for _, seconds in poller.outages()]
        lines = [line.strip() for line in result.output.splitlines()
                 if "healthy after" in line or "ROLLED BACK" in line or "not healthy" in line]
        say(f"{label}: exit {result.returncode}; /health outages seen by a client {windows} s; "
            f"{' | '.join(lines)}")
    inventory(host)  # the inventory file as deployed


# =========================================================================== tables

def tables(args) -> int:
    """llmhost-bench on main (decode at 1/2/4, the engine ceiling, the K/V sweep), llama-bench
    for prefill at the guide's contexts (GPU memory sampled) and for the dense model, served
    decode of the dense model by hand, and decode against the measured bandwidth."""
    gs.receive()
    gs._install_wheels()
    with gs.booted() as host:
        gs._wait_healthy(MAIN_PORT, 300, "main after the boot")
        bench_main()
        prefill(host)
        dense(host)
    return 0


def bench_main() -> None:
    out = WORK / "bench"
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "llmhost.bench", str(INVENTORY), "--service", "main", "--out", str(out),
         "--kv-sweep", "--decode-tokens", "256", "--rounds", "3", "--parallel", "1", "2", "4",
         "--bench-repetitions", "3", "--ceiling-pairs", "3", "--needle-max", "9000",
         "--time-budget", "300"],
        cwd=WORK, env=gs._env(), capture_output=True, text=True, timeout=420)
    (OUT / "tables-bench.log").write_text(result.stdout + result.stderr)
    say(f"bench: exit {result.returncode} in {time.monotonic() - started:.1f}s")
    for name in ("report.md", f"{gs.SANDBOX}.json"):
        if (out / name).exists():
            (OUT / f"tables-bench-{name}").write_bytes((out / name).read_bytes())


def llama_bench(host, model: str, *flags: str, timeout: float = 300) -> list[dict]:
    """llama-bench (the deployed build) inside the host, JSON rows."""
    bench = json.loads(gs._sh(host, "cat /etc/llama/llmhost.json"))["llama_cpp"]["bench"]
    ngl = "0" if REHEARSAL else "99"
    command = f"{bench} -m {shlex.quote(model)} -ngl {ngl} -fa 1 -o json {' '.join(flags)}"
    result = host.exec("bash", "-c", command, check=False, timeout=timeout)
    try:
        return json.loads(result.stdout)
    except ValueError:
        say(f"llama-bench {' '.join(flags)}: no JSON ({result.stderr.strip()[-400:]})")
        return []


def placed_path(host, role: str) -> str:
    digest = model_path(role).with_suffix(".sha256").read_text().strip()
    return f"/var/lib/llama-models/local-{digest[:12]}/{model_path(role).name}"


def prefill(host) -> None:
    """Prefill time and GPU memory at the guide's contexts: one prompt of N tokens each
    (llama-bench -p N -n 0, K=q4_0 V=q8_0 as the service), the GPU's used memory sampled."""
    rows = []
    for n in CONTEXTS:
        peak, stop = [0], threading.Event()

        def sample():
            while not stop.is_set():
                used = gs._sh_here("nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits")
                if used.strip().isdigit():
                    peak[0] = max(peak[0], int(used.strip()))
                time.sleep(0.2)

        before = gs._sh_here("nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits")
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        found = llama_bench(host, placed_path(host, "moe"), "-p", str(n), "-n", "0", "-r", "1",
                            "-ctk", "q4_0", "-ctv", "q8_0", "-ub", "512")
        stop.set()
        sampler.join()
        if found:
            seconds = n / found[0]["avg_ts"]
            rows.append({"tokens": n, "prefill_s": seconds, "tok_s": found[0]["avg_ts"],
                         "gpu_mib_before": int(before) if before.strip().isdigit() else None,
                         "gpu_mib_peak": peak[0]})
            say(f"prefill {n} tokens: {seconds:.2f}s ({found[0]['avg_ts']:.0f} tok/s), GPU memory "
                f"peak {peak[0]} MiB (before {before.strip()} MiB)")
    (OUT / "tables-prefill.json").write_text(json.dumps(rows, indent=1))


def dense(host) -> None:
    """The dense model: llama-bench tg128/pp512, and served decode at 1 request by hand with
    the service's flags (the deployed build), alternated with tg128."""
    model = placed_path(host, "dense")
    preplace(host, "dense")
    rows = llama_bench(host, model, "-p", "512", "-n", "128", "-r", "3", "-ctk", "q4_0",
                       "-ctv", "q8_0")
    moe = llama_bench(host, placed_path(host, "moe"), "-p", "512", "-n", "128", "-r", "3",
                      "-ctk", "q4_0", "-ctv", "q8_0")
    # The guide's slow row: iq4_nl has no flash-attention kernel in ggml (the bench's sweep
    # skips pairs the build did not compile); at the pin it is converted to f16 as it runs.
    iq4_nl = llama_bench(host, placed_path(host, "moe"), "-p", "512", "-n", "128", "-r", "1",
                         "-ctk", "iq4_nl", "-ctv", "iq4_nl")
    served_dense = served_by_hand(host, model)
    result = {"dense": rows, "moe": moe, "moe_iq4_nl": iq4_nl, "served_dense_1": served_dense}
    (OUT / "tables-dense.json").write_text(json.dumps(result, indent=1))
    tg = {name: next((r["avg_ts"] for r in found if r.get("n_gen")), None)
          for name, found in (("dense", rows), ("moe", moe))}
    say(f"tg128 dense {tg['dense']}, MoE {tg['moe']}; served dense at 1 request {served_dense}")


def served_by_hand(host, model: str) -> dict:
    """llama-server on ``model`` with main's flags on another port, as the service user; decode
    of 256 tokens at 1 request, 3 times."""
    argv = gs._sh(host, "cat /proc/$(systemctl show -p MainPID --value llama-main)/cmdline | tr '\\0' ' '")
    words = argv.split()
    words[words.index("--model") + 1] = model
    words[words.index("--port") + 1] = str(HAND_PORT)
    if "--mmproj" in words:
        i = words.index("--mmproj")
        del words[i:i + 2]
    command = " ".join(shlex.quote(w) for w in words)
    gs._sh(host, f"cd /tmp && (setsid runuser -u llama -- {command} > /tmp/dense.log 2>&1 & "
                 f"echo $! > /tmp/dense.pid)")
    try:
        if gs._wait_healthy(HAND_PORT, 300, "dense by hand") < 0:
            return {"error": gs._sh(host, "tail -5 /tmp/dense.log")}
        key = gs._sh(host, "cat /etc/llama/keys/main.key").strip()
        gs._completion_rate(HAND_PORT, key, 16)
        rates = [gs._completion_rate(HAND_PORT, key, 256) for _ in range(3)]
        return {"decode_tok_s": rates, "median": statistics.median(rates)}
    finally:
        gs._sh(host, "pkill -f -- '--port %d' || true" % HAND_PORT)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("phase", nargs="+", choices=["make", "up", "safety", "tables"])
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    OUT.mkdir(parents=True, exist_ok=True)
    phases = {"make": make, "up": up, "safety": safety, "tables": tables}
    code = 0
    for phase in args.phase:
        code = phases[phase](args) or code
    return code


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Benchmark one deployed llama-server service, on its own host, against its own address.

Runs on the host (python3 standard library only). Reads the deploy's manifest
(/etc/llama/llmhost.json) for the service's unit, address, API key file, model, K/V cache types and
llama.cpp build; reads the API key from its file (never printed, never on a command line); asks the
server's /props for the per-slot context and chat template. Then, each step bounded in count and
time, printing one progress line per step:

  decode      tok/s at 1, 2, 4 parallel /completion requests, per request and aggregate, from the
              server's own `timings`
  ttft        time to first token of a streamed /completion
  prompt      prompt processing rate (a ~512-token prompt, server timings)
  engine      llama-bench pp512/tg128 with the service's model, -ngl, K/V types and -fa 1; then
              served decode and tg128 alternated (--ceiling-pairs) when both can run at once
  thinking    tokens and latency of a short translation with thinking on and off
              (skipped, with the reason, when the chat template has no thinking)
  needle      a needle at a known depth in haystacks up to the per-slot context: prefill time,
              GPU memory growth (nvidia-smi), the service's RSS growth, found or not
  startup     `systemctl restart` to /health 200 (only with --restart; skipped, with the
              reason, where systemd is not PID 1)
  kv-sweep    llama-bench over the guide's K/V pairs the build compiled (only with --kv-sweep)

Writes one JSON object to --out. Exit status 0 when the JSON was written (failed steps are
recorded in it under "errors"), 2 when the service could not be benchmarked at all.

    bench_service.py --service translate --out /tmp/result.json [--restart] [--kv-sweep] [--pid PID]

Without systemd as PID 1 the service's process (argv, RSS) is the listener of its port, or --pid.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime, timezone

SCHEMA = 1
MANIFEST = "/etc/llama/llmhost.json"
# The guide's K/V table (section 3.2), in its order.
GUIDE_KV_PAIRS = (("f16", "f16"), ("q4_0", "q8_0"), ("q4_0", "q4_0"), ("q5_0", "q5_0"),
                  ("iq4_nl", "iq4_nl"))
# The guide's long-context points (section 3.4): tested too whenever they fit the slot.
GUIDE_CONTEXT_POINTS = (9_000, 53_000, 107_000, 178_000)
DECODE_PROMPT = "The capital of France is"
TG_TOKENS = 128  # llama-bench's tg128
TRANSLATION = "Translate into English: 今天天气很好，我们一起去公园散步吧。"
THINKING_MARKERS = ("enable_thinking", "<think>", "reasoning_content")
NEEDLE_ANSWER_TOKENS = 8


def log(message: str) -> None:
    print(f"bench: {message}", flush=True)


# -- small pure helpers (unit-tested on the controller) --------------------------------------

def compiled_fa_pairs(llama: dict, gpu_layers: int) -> list[str] | None:
    """The K/V pairs with a flash-attention kernel in this build, as "k-v", from the manifest's
    record of the build; None means every pair (a CPU build, or a CPU-only service: the CPU
    computes every type)."""
    pairs = llama.get("fa_pairs") or []
    if gpu_layers <= 0 or not pairs:
        return None
    return [f"{k}-{v}" for k, v in pairs]


def needle_sizes(per_slot: int, reserve: int) -> list[int]:
    """Haystack sizes in tokens, smallest first, at most 6: as much as fits in the slot, the
    guide's points that fit, then 1/8, 1/4 and 1/2 of the slot while there is room."""
    top = per_slot - reserve
    if top < 64:
        return []
    chosen = {top} | {p for p in GUIDE_CONTEXT_POINTS if p <= top}
    for size in (max(64, per_slot // 8), max(64, per_slot // 4), max(64, per_slot // 2)):
        if len(chosen) < 6 and size <= top:
            chosen.add(size)
    return sorted(chosen)


def haystack_lines(count: int, seed: int = 7) -> list[tuple[str, str]]:
    """``count`` (name, code) pairs, names and 6-digit codes all distinct, the same every run.
    Bounded: the name space holds 468,000 names, a 200K-token haystack needs about 15,000."""
    count = min(count, 200_000)
    rng = random.Random(seed)
    first = ("Anna", "Boris", "Chen", "Dara", "Emil", "Fatima", "Goran", "Hana", "Ivo", "Jun",
             "Kira", "Luca", "Mira", "Nils", "Olga", "Pavel", "Quinn", "Rosa", "Sami", "Tara",
             "Uma", "Vera", "Wim", "Xenia", "Yusuf", "Zora")
    last = ("Berg", "Costa", "Dahl", "Eng", "Fox", "Gray", "Holm", "Ito", "Kahn", "Lind", "Moss",
            "Nagy", "Ortiz", "Park", "Quist", "Roth", "Sato", "Toth", "Vogel", "Wolf")
    out, seen, codes = [], set(), set()
    for _ in range(count * 20):
        if len(out) == count:
            break
        name = f"{rng.choice(first)} {rng.choice(last)}-{rng.randint(100, 999)}"
        code = str(rng.randint(100_000, 999_999))
        if name in seen or code in codes:
            continue
        seen.add(name)
        codes.add(code)
        out.append((name, code))
    return out


def needle_prompt(lines: list[tuple[str, str]], depth: float) -> tuple[str, str, str]:
    """The prompt (a completion a base model can answer), the needle's name and its code; the
    needle is the line at ``depth`` (0 first, 1 last) of the haystack."""
    index = min(len(lines) - 1, max(0, round(depth * (len(lines) - 1))))
    name, code = lines[index]
    body = "\n".join(f"The secret code of {n} is {c}." for n, c in lines)
    return f"{body}\nThe secret code of {name} is", name, code


def decode_summary(parallel: int, results: list[dict]) -> dict:
    """One round of ``parallel`` concurrent requests: per-request rates (server timings) and the
    aggregate rate, tokens of all requests over the span of their decode intervals (each interval
    ends when its response arrived and lasted the server's predicted_ms)."""
    rates = [r["predicted_per_second"] for r in results]
    starts = [r["end"] - r["predicted_ms"] / 1000 for r in results]
    span = max(r["end"] for r in results) - min(starts)
    tokens = sum(r["predicted_n"] for r in results)
    return {
        "parallel": parallel,
        "tokens": tokens,
        "per_request_tok_s": statistics.median(rates),
        "per_request_min_tok_s": min(rates),
        "aggregate_tok_s": tokens / span if span > 0 else None,
        "sum_of_rates_tok_s": sum(rates),
        "decode_span_s": span,
    }


def has_thinking(template: str) -> bool:
    return any(marker in (template or "") for marker in THINKING_MARKERS)


def median_or_none(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


# -- the server --------------------------------------------------------------------------------

class Server:
    """HTTP to the service's own address; the key is sent as a header and nowhere else."""

    def __init__(self, base: str, key: str | None):
        self.base = base
        self._key = key

    def _headers(self) -> dict:
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        return headers

    def get(self, path: str, timeout: float = 10) -> tuple[int, dict | str]:
        request = urllib.request.Request(self.base + path, headers=self._headers())
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                text = response.read().decode()
                status = response.status
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode(errors="replace")[:300]
        try:
            return status, json.loads(text)
        except ValueError:
            return status, text

    def post(self, path: str, body: dict, timeout: float) -> dict:
        request = urllib.request.Request(self.base + path, json.dumps(body).encode(),
                                         self._headers())
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.load(response)
        except urllib.error.HTTPError as error:
            text = error.read().decode(errors="replace")[:300]
            raise RuntimeError(f"POST {path} answered {error.code}: {text}") from None

    def health(self, timeout: float = 5) -> int:
        try:
            with urllib.request.urlopen(self.base + "/health", timeout=timeout) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code
        except (urllib.error.URLError, OSError):
            return 0

    def count_tokens(self, text: str, timeout: float = 120) -> int:
        return len(self.post("/tokenize", {"content": text, "add_special": True}, timeout)["tokens"])

    def completion(self, prompt: str, tokens: int, timeout: float, ignore_eos: bool = True) -> dict:
        return self.post("/completion", {
            "prompt": prompt, "n_predict": tokens, "temperature": 0, "ignore_eos": ignore_eos,
            "cache_prompt": False}, timeout)

    def first_token_seconds(self, prompt: str, tokens: int, timeout: float) -> float:
        """Seconds from sending a streamed /completion to its first generated text."""
        body = json.dumps({"prompt": prompt, "n_predict": tokens, "temperature": 0,
                           "ignore_eos": True, "cache_prompt": False, "stream": True}).encode()
        request = urllib.request.Request(self.base + "/completion", body, self._headers())
        started = time.monotonic()
        first = None
        with urllib.request.urlopen(request, timeout=timeout) as response:
            for raw in response:
                line = raw.decode(errors="replace").strip()
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                event = json.loads(payload)
                if first is None and event.get("content"):
                    first = time.monotonic() - started
                if event.get("stop"):
                    break
        if first is None:
            raise RuntimeError("the stream carried no generated text")
        return first


def concurrent_completions(server: Server, parallel: int, tokens: int, timeout: float,
                           prompt: str = DECODE_PROMPT) -> list[dict]:
    """``parallel`` /completion requests of ``tokens`` each, released together: each one's
    server timings and the moment it answered ("end"). Raises when any failed. (The tuner,
    files/tune_service.py, measures with it too.)"""
    barrier = threading.Barrier(parallel)
    results: list[dict] = []
    errors: list[str] = []

    def worker() -> None:
        try:
            barrier.wait(timeout=30)
            timings = server.completion(prompt, tokens, timeout)["timings"]
            results.append({**timings, "end": time.monotonic()})
        except Exception as error:
            errors.append(f"{type(error).__name__}: {error}")

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(parallel)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 35)
    if errors or len(results) != parallel:
        raise RuntimeError(f"{parallel} parallel requests: {len(results)} answered; "
                           + "; ".join(errors[:2]))
    return results


# -- the host ----------------------------------------------------------------------------------

def run(argv: list[str], timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def nvidia_smi(indexes: list[int] | None = None) -> list[dict] | None:
    """GPUs from nvidia-smi, or None where there is none."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        result = run(["nvidia-smi", "--query-gpu=index,name,memory.total,memory.used,driver_version",
                      "--format=csv,noheader,nounits"], timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode:
        return None
    gpus = []
    for line in result.stdout.strip().splitlines():
        cells = [c.strip() for c in line.split(",")]
        if len(cells) < 5:
            continue
        try:
            gpu = {"index": int(cells[0]), "name": cells[1], "memory_total_mib": float(cells[2]),
                   "memory_used_mib": float(cells[3]), "driver": cells[4]}
        except ValueError:
            continue
        if indexes is None or gpu["index"] in indexes:
            gpus.append(gpu)
    return gpus


def host_info() -> dict:
    cpu = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    memory = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    memory = int(line.split()[1]) // 1024
    except OSError:
        pass
    gpus = nvidia_smi()
    return {"hostname": socket.gethostname(), "cpu": cpu, "cpus": os.cpu_count(),
            "memory_mib": memory, "nvidia_smi": gpus is not None, "gpus": gpus or [],
            "loadavg_start": load_average()}


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load: other work on the host skews every figure."""
    try:
        with open("/proc/loadavg") as f:
            return [float(x) for x in f.read().split()[:3]]
    except (OSError, ValueError):
        return None


def main_pid(unit: str) -> int:
    try:
        result = run(["systemctl", "show", "-p", "MainPID", "--value", unit], timeout=20)
        return int(result.stdout.strip() or 0)
    except (OSError, subprocess.TimeoutExpired, ValueError):
        return 0


def systemd_running() -> bool:
    """True when systemd is PID 1 (sd_booted's test). Without it (a container, the H100 proof
    machine) there is no MainPID to ask for and no unit to restart."""
    return os.path.isdir("/run/systemd/system")


def listener_pid(port: int) -> int:
    """The process listening on TCP ``port`` (from /proc/net/tcp{,6} and /proc/*/fd), or 0. Bounded:
    one pass over /proc; a socket of another user's process needs root to be seen."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f, None)
                for line in f:
                    cells = line.split()
                    # local_address is HEXIP:HEXPORT; state 0A is LISTEN
                    if len(cells) > 9 and cells[3] == "0A" and int(cells[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add(f"socket:[{cells[9]}]")
        except (OSError, ValueError):
            continue
    if not inodes:
        return 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            for fd in os.listdir(f"/proc/{entry}/fd"):
                if os.readlink(f"/proc/{entry}/fd/{fd}") in inodes:
                    return int(entry)
        except OSError:
            continue
    return 0


def rss_mib(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def is_own_address(address: str) -> bool:
    """True when ``address`` is loopback or assigned to this host (a bind to it succeeds)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if ip.is_loopback:
        return True
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.bind((address, 0))
        return True
    except OSError:
        return False


class MemoryWatch:
    """Peak GPU memory (nvidia-smi) and service RSS while a request runs, polled in a thread."""

    def __init__(self, pid: int, gpus: list[int] | None, use_gpu: bool, interval: float = 0.2):
        self.pid, self.gpus, self.use_gpu, self.interval = pid, gpus, use_gpu, interval
        self._stop = threading.Event()
        self.gpu_base = self._gpu()
        self.rss_base = rss_mib(pid)
        self.gpu_peak, self.rss_peak = self.gpu_base, self.rss_base
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _gpu(self) -> float | None:
        if not self.use_gpu:
            return None
        gpus = nvidia_smi(self.gpus)
        return sum(g["memory_used_mib"] for g in gpus) if gpus else None

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            gpu, rss = self._gpu(), rss_mib(self.pid)
            if gpu is not None and (self.gpu_peak is None or gpu > self.gpu_peak):
                self.gpu_peak = gpu
            if rss is not None and (self.rss_peak is None or rss > self.rss_peak):
                self.rss_peak = rss

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=30)

    def growth(self) -> dict:
        def diff(peak, base):
            return None if peak is None or base is None else round(peak - base, 1)
        return {"gpu_mem_growth_mib": diff(self.gpu_peak, self.gpu_base),
                "rss_growth_mib": diff(self.rss_peak, self.rss_base)}


# -- the bench ---------------------------------------------------------------------------------

class Bench:
    def __init__(self, args, manifest: dict, service: dict):
        self.args = args
        self.manifest = manifest
        self.service = service
        self.deadline = time.monotonic() + args.time_budget
        self.errors: list[dict] = []
        self.result: dict = {}

    # budget ----------------------------------------------------------------------------------
    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def timeout(self, wanted: float) -> float:
        """A request timeout: ``wanted`` seconds, never past the run's deadline."""
        left = self.remaining()
        if left <= 1:
            raise TimeoutError("the run's time budget is spent")
        return min(wanted, left)

    def step(self, name: str, function) -> dict:
        if self.remaining() <= 1:
            log(f"{name}: skipped, time budget ({self.args.time_budget:.0f} s) spent")
            return {"skipped": f"time budget of {self.args.time_budget:.0f} s spent"}
        started = time.monotonic()
        try:
            out = function()
        except Exception as error:  # recorded and reported; the next step still runs
            message = f"{type(error).__name__}: {error}"
            log(f"{name}: FAILED: {message}")
            self.errors.append({"step": name, "error": message})
            return {"error": message}
        out["step_seconds"] = round(time.monotonic() - started, 2)
        return out

    # setup -----------------------------------------------------------------------------------
    def setup(self) -> None:
        s = self.service
        url = urllib.parse.urlsplit(s["health_url"])
        self.address = url.hostname
        if not is_own_address(self.address):
            raise SystemExit(f"bench: {s['name']}: health_url {s['health_url']} is not an address "
                             f"of this host; expected the service's own (loopback) address")
        self.base = f"{url.scheme}://{url.netloc}"
        key = None
        if s.get("key_file"):
            with open(s["key_file"]) as f:
                key = f.read().strip()
        self.server = Server(self.base, key)
        status = self.server.health()
        if status != 200:
            raise SystemExit(f"bench: {s['name']}: {self.base}/health answered {status or 'nothing'}; "
                             f"expected 200 (is {s['unit']} running?)")
        self.systemd = systemd_running()
        if self.args.pid:
            self.pid, pid_source = self.args.pid, "--pid"
        elif self.systemd:
            self.pid, pid_source = main_pid(s["unit"]), "systemd MainPID"
        else:
            self.pid = listener_pid(url.port) if url.port else 0
            pid_source = f"the listener of port {url.port} (systemd is not PID 1 here)"
            log(f"service {s['name']}: no systemd: its process is {pid_source}: "
                f"{self.pid or 'not found (run as root, or pass --pid)'}")
        status, props = self.server.get("/props")
        if status != 200 or not isinstance(props, dict):
            props = {}
        generation = props.get("default_generation_settings") or {}
        # What the deploy intended, from its manifest; only the per-slot context is the server's.
        intent = s["settings"]  # the service's settings as the deploy recorded them
        ctx_size, parallel = intent["ctx_size"], intent["parallel"]
        per_slot = generation.get("n_ctx") or ctx_size // parallel
        llama = self.manifest["llama_cpp"]
        build_dir = llama["build_dir"]
        gpu_layers = intent["gpu_layers"]
        template = props.get("chat_template") or ""
        model_path = s["model_path"]
        self.uses_gpu = gpu_layers > 0
        self.gpus = intent["gpus"]
        self.per_slot = per_slot
        self.slots = parallel
        self.bench_binary = llama["bench"]
        self.result["service"] = {
            "name": s["name"], "unit": s["unit"], "address": self.address, "port": url.port,
            "base_url": self.base, "main_pid": self.pid, "pid_source": pid_source,
            "model_path": model_path, "model_file": os.path.basename(model_path or ""),
            "model_bytes": os.path.getsize(model_path) if model_path and os.path.exists(model_path) else None,
            "gpu_layers": gpu_layers, "gpus": self.gpus,
            "cache_type_k": intent["cache_type_k"], "cache_type_v": intent["cache_type_v"],
            "ctx_size": ctx_size, "parallel": parallel, "per_slot_ctx": per_slot,
            "flash_attn": intent["flash_attn"], "reasoning": intent["reasoning"],
            "threads": intent["threads"], "load_mode": intent["load_mode"],
            "chat_template_has_thinking": has_thinking(template),
            "build_info": props.get("build_info"),
        }
        fa = compiled_fa_pairs(llama, gpu_layers)
        self.compiled_pairs = fa
        self.result["llama_cpp"] = {
            "commit": llama.get("commit"), "build_dir": build_dir, "server": llama.get("server"),
            "bench": self.bench_binary, "cmake_flags": llama.get("cmake_flags", []),
            "compiled_fa_pairs": fa if fa is not None else "all (CPU computes every K/V type)",
        }
        svc = self.result["service"]
        log(f"service {svc['name']}: {self.base}, model {svc['model_file']}, -ngl {gpu_layers}, "
            f"K/V {svc['cache_type_k']}/{svc['cache_type_v']}, {parallel} slots of {per_slot} tokens")

    # steps -----------------------------------------------------------------------------------
    def decode(self) -> dict:
        a = self.args
        self.server.completion(DECODE_PROMPT, 8, self.timeout(a.request_timeout))  # warm-up
        levels = []
        for parallel in a.parallel:
            rounds = []
            for round_index in range(a.rounds):
                results = self._concurrent(parallel, a.decode_tokens)
                summary = decode_summary(parallel, results)
                rounds.append(summary)
                log(f"decode: {parallel} parallel, round {round_index + 1}/{a.rounds}: "
                    f"{summary['per_request_tok_s']:.1f} tok/s per request, "
                    f"{summary['aggregate_tok_s']:.1f} tok/s aggregate")
            levels.append({
                "parallel": parallel,
                "queued": bool(self.slots and parallel > self.slots),
                "per_request_tok_s": median_or_none([r["per_request_tok_s"] for r in rounds]),
                "aggregate_tok_s": median_or_none([r["aggregate_tok_s"] for r in rounds]),
                "rounds": rounds,
            })
        return {"tokens_per_request": a.decode_tokens, "levels": levels,
                "method": "per request: median of the server's timings.predicted_per_second; "
                          "aggregate: generated tokens of all requests / span of their decode "
                          "intervals (server predicted_ms); median over rounds"}

    def _concurrent(self, parallel: int, tokens: int) -> list[dict]:
        return concurrent_completions(self.server, parallel, tokens,
                                      self.timeout(self.args.request_timeout))

    def ttft(self) -> dict:
        samples = []
        for i in range(self.args.rounds + 1):
            seconds = self.server.first_token_seconds(DECODE_PROMPT, 4, self.timeout(self.args.request_timeout))
            samples.append(seconds * 1000)
            log(f"ttft: round {i + 1}/{self.args.rounds + 1}: {seconds * 1000:.0f} ms")
        return {"ms": statistics.median(samples), "samples_ms": samples, "prompt": DECODE_PROMPT}

    def prompt_processing(self) -> dict:
        target = min(512, (self.per_slot or 1024) // 2)
        lines = haystack_lines(max(4, target // 8))
        text = "\n".join(f"The secret code of {n} is {c}." for n, c in lines)
        prompt = self._trim_to(text, target)
        samples, n = [], None
        for i in range(self.args.rounds):
            timings = self.server.completion(prompt, 1, self.timeout(self.args.request_timeout))["timings"]
            samples.append(timings["prompt_per_second"])
            n = timings["prompt_n"]
            log(f"prompt: round {i + 1}/{self.args.rounds}: {n} tokens at "
                f"{timings['prompt_per_second']:.1f} tok/s")
        return {"prompt_tokens": n, "tok_s": statistics.median(samples), "samples_tok_s": samples}

    def _trim_to(self, text: str, tokens: int) -> str:
        """Cut ``text`` at a line boundary so it is at most ``tokens`` tokens (bounded halvings)."""
        lines = text.split("\n")
        for _ in range(20):
            count = self.server.count_tokens("\n".join(lines))
            if count <= tokens or len(lines) <= 1:
                break
            lines = lines[:max(1, int(len(lines) * tokens / count * 0.98))]
        return "\n".join(lines)

    def _llama_bench(self, k: str, v: str, repetitions: int, timeout: float, prompt: int = 512) -> dict:
        svc = self.result["service"]
        argv = [self.bench_binary, "-m", svc["model_path"], "-ngl", str(svc["gpu_layers"]),
                "-fa", "1", "-ctk", k, "-ctv", v, "-p", str(prompt), "-n", str(TG_TOKENS),
                "-r", str(repetitions), "-o", "json"]
        if svc["threads"]:
            argv += ["-t", str(svc["threads"])]
        env = {"CUDA_VISIBLE_DEVICES": ",".join(map(str, self.gpus))} if self.gpus else None
        result = run(argv, timeout=self.timeout(timeout), env=env)
        if result.returncode:
            raise RuntimeError(f"llama-bench exited {result.returncode}: {result.stderr.strip()[-400:]}")
        rows = json.loads(result.stdout)
        out = {"argv": argv, "k": k, "v": v}
        for row in rows:
            test = "pp512" if row.get("n_prompt") and not row.get("n_gen") else "tg128"
            out[f"{test}_tok_s"] = row.get("avg_ts")
            out[f"{test}_stddev"] = row.get("stddev_ts")
            out.setdefault("backends", row.get("backends"))
            out.setdefault("gpu_info", row.get("gpu_info"))
            out.setdefault("cpu_info", row.get("cpu_info"))
            out.setdefault("build_commit", row.get("build_commit"))
        return out

    def engine_room(self) -> str | None:
        """None when llama-bench can load a second copy of the model beside the service, else why
        not (a GPU that cannot hold it twice)."""
        if not os.path.exists(self.bench_binary):
            return f"{self.bench_binary} is missing (the build has no llama-bench)"
        if not self.uses_gpu:
            return None
        gpus = nvidia_smi(self.gpus)
        size = self.result["service"]["model_bytes"] or 0
        if not gpus:
            return None
        free = min(g["memory_total_mib"] - g["memory_used_mib"] for g in gpus)
        needed = size / (1 << 20) * 1.1 + 1024
        if free * len(gpus) < needed:
            return (f"the GPU has {free:.0f} MiB free beside the running service, llama-bench needs "
                    f"about {needed:.0f} MiB; rerun with --restart to let the bench stop the "
                    f"service for it")
        return None

    def engine(self, service_up: bool = True) -> dict:
        svc = self.result["service"]
        out = self._llama_bench(svc["cache_type_k"], svc["cache_type_v"], self.args.bench_repetitions,
                                self.args.bench_timeout)
        log(f"engine: llama-bench K/V {svc['cache_type_k']}/{svc['cache_type_v']}: "
            f"pp512 {out.get('pp512_tok_s', 0):.1f} tok/s, tg128 {out.get('tg128_tok_s', 0):.1f} tok/s")
        if not service_up:
            out["paired"] = {"skipped": "llama-bench ran with the service stopped (the GPU cannot "
                                        "hold the model twice), so it cannot alternate with it"}
        elif self.args.ceiling_pairs:
            out["paired"] = self.step("engine pairs", self.paired_ceiling)  # its failure keeps tg128
        else:
            out["paired"] = {"skipped": "not asked for (--ceiling-pairs 0)"}
        return out

    def paired_ceiling(self) -> dict:
        """Served decode at 1 request vs llama-bench tg128, alternated back to back.

        On a shared machine the throughput drifts by more than the server's overhead over the tens
        of seconds between the decode and engine steps (a 2-core VM: 54-77 tok/s served and 64-81
        tok/s tg128 across runs, same binary and flags). Alternating one of each cancels the drift,
        so the ratio says whether the engine really is the served decode's ceiling."""
        svc = self.result["service"]
        pairs = []
        for i in range(self.args.ceiling_pairs):
            if self.remaining() < 10:
                break
            served = self.server.completion(DECODE_PROMPT, TG_TOKENS, self.timeout(self.args.request_timeout))
            engine = self._llama_bench(svc["cache_type_k"], svc["cache_type_v"], 1,
                                       self.args.bench_timeout, prompt=0)
            pair = {"served_tok_s": served["timings"]["predicted_per_second"],
                    "tg128_tok_s": engine["tg128_tok_s"]}
            pair["ratio"] = pair["served_tok_s"] / pair["tg128_tok_s"]
            pairs.append(pair)
            log(f"engine: pair {i + 1}/{self.args.ceiling_pairs}: served {pair['served_tok_s']:.1f} "
                f"tok/s, tg128 {pair['tg128_tok_s']:.1f} tok/s, ratio {pair['ratio']:.3f}")
        if not pairs:
            return {"skipped": "time budget spent before the first pair"}
        return {"tokens": TG_TOKENS, "pairs": pairs,
                "served_over_tg128": statistics.median(p["ratio"] for p in pairs),
                "method": f"{len(pairs)} alternations of one {TG_TOKENS}-token /completion (server "
                          f"timings) and one llama-bench -p 0 -n {TG_TOKENS} -r 1; median of the ratios"}

    def thinking(self) -> dict:
        svc = self.result["service"]
        if not svc["chat_template_has_thinking"]:
            reason = (f"the chat template of {svc['model_file']} has no thinking "
                      f"(none of {', '.join(THINKING_MARKERS)})")
            log(f"thinking: skipped: {reason}")
            return {"skipped": reason}
        out = {"prompt": TRANSLATION}
        modes = [("off", False)]
        if svc["reasoning"] == "off":
            out["on"] = {"skipped": "the service runs with --reasoning off"}
        else:
            modes.insert(0, ("on", True))
        for mode, enabled in modes:
            samples = []
            for i in range(self.args.rounds):
                max_tokens = min(1024, (self.per_slot or 2048) // 2) if enabled else 128
                body = {"messages": [{"role": "user", "content": TRANSLATION}], "temperature": 0,
                        "max_tokens": max_tokens,
                        "chat_template_kwargs": {"enable_thinking": enabled}}
                started = time.monotonic()
                answer = self.server.post("/v1/chat/completions", body,
                                          self.timeout(self.args.request_timeout))
                seconds = time.monotonic() - started
                message = answer["choices"][0]["message"]
                tokens = answer.get("usage", {}).get("completion_tokens")
                samples.append({"seconds": seconds, "completion_tokens": tokens,
                                "reasoning_chars": len(message.get("reasoning_content") or ""),
                                "answer": (message.get("content") or "")[:200]})
                log(f"thinking {mode}: round {i + 1}/{self.args.rounds}: {tokens} tokens, {seconds:.2f} s")
            out[mode] = {"seconds": statistics.median(s["seconds"] for s in samples),
                         "completion_tokens": median_or_none([s["completion_tokens"] for s in samples]),
                         "samples": samples}
        return out

    def needle(self) -> dict:
        reserve = NEEDLE_ANSWER_TOKENS + 32
        sizes = needle_sizes(self.per_slot or 0, reserve)
        if self.args.needle_max:
            sizes = [s for s in sizes if s <= self.args.needle_max]
        if not sizes:
            return {"skipped": f"per-slot context {self.per_slot} leaves no room for a haystack"}
        # Tokens per haystack line, measured once on a sample (the tokenizer is the server's).
        sample = haystack_lines(64)
        per_line = self.server.count_tokens("\n".join(f"The secret code of {n} is {c}." for n, c in sample)) / 64
        points = []
        for target in sizes:
            if self.remaining() < 5:
                points.append({"target_tokens": target, "skipped": "time budget spent"})
                continue
            count = max(2, int(target / per_line))
            lines = haystack_lines(count)
            prompt, name, code = needle_prompt(lines, self.args.needle_depth)
            for _ in range(8):  # fit the slot: drop lines until the prompt fits (bounded)
                n = self.server.count_tokens(prompt)
                if n <= target or count <= 2:
                    break
                count = max(2, int(count * target / n * 0.99))
                lines = haystack_lines(count)
                prompt, name, code = needle_prompt(lines, self.args.needle_depth)
            with MemoryWatch(self.pid, self.gpus, self.uses_gpu) as watch:
                answer = self.server.completion(prompt, NEEDLE_ANSWER_TOKENS,
                                                self.timeout(self.args.needle_timeout), ignore_eos=False)
            timings = answer["timings"]
            found = code in answer.get("content", "")
            point = {"target_tokens": target, "prompt_tokens": timings["prompt_n"],
                     "lines": count, "depth": self.args.needle_depth, "needle": name, "code": code,
                     "answer": answer.get("content", "")[:80], "found": found,
                     "prefill_s": timings["prompt_ms"] / 1000,
                     "prefill_tok_s": timings.get("prompt_per_second"), **watch.growth()}
            points.append(point)
            mem = (f"GPU +{point['gpu_mem_growth_mib']} MiB" if point["gpu_mem_growth_mib"] is not None
                   else f"RSS +{point['rss_growth_mib']} MiB")
            log(f"needle: {point['prompt_tokens']} tokens: prefill {point['prefill_s']:.2f} s, {mem}, "
                f"{'found' if found else 'NOT found'}")
        return {"depth": self.args.needle_depth, "per_slot_ctx": self.per_slot, "points": points,
                "memory_source": "nvidia-smi memory.used" if self.uses_gpu and nvidia_smi(self.gpus)
                else "the service's VmRSS (no GPU in use)"}

    def startup(self) -> dict:
        unit = self.service["unit"]
        started = time.monotonic()
        result = run(["systemctl", "restart", unit], timeout=self.timeout(self.args.startup_timeout))
        if result.returncode:
            raise RuntimeError(f"systemctl restart {unit} exited {result.returncode}: {result.stderr.strip()}")
        returned = time.monotonic() - started
        deadline = started + self.args.startup_timeout
        status = 0
        while time.monotonic() < deadline:
            status = self.server.health(timeout=2)
            if status == 200:
                break
            time.sleep(0.1)
        else:
            raise RuntimeError(f"/health answered {status or 'nothing'} {self.args.startup_timeout} s "
                               f"after systemctl restart {unit}")
        seconds = time.monotonic() - started
        self.pid = main_pid(unit)
        log(f"startup: systemctl restart {unit} to /health 200: {seconds:.2f} s")
        return {"seconds": seconds, "systemctl_returned_s": returned}

    def kv_sweep(self) -> dict:
        pairs = []
        for k, v in GUIDE_KV_PAIRS:
            pair = f"{k}-{v}"
            if self.compiled_pairs is not None and pair not in self.compiled_pairs:
                reason = f"not compiled in this build (flash-attention pairs: {', '.join(self.compiled_pairs)})"
                log(f"kv-sweep: {k}/{v}: skipped: {reason}")
                pairs.append({"k": k, "v": v, "skipped": reason})
                continue
            if self.remaining() < 5:
                pairs.append({"k": k, "v": v, "skipped": "time budget spent"})
                continue
            try:
                out = self._llama_bench(k, v, 1, self.args.bench_timeout)
            except Exception as error:
                message = f"{type(error).__name__}: {error}"
                log(f"kv-sweep: {k}/{v}: FAILED: {message}")
                pairs.append({"k": k, "v": v, "error": message})
                continue
            log(f"kv-sweep: {k}/{v}: pp512 {out.get('pp512_tok_s', 0):.1f} tok/s, "
                f"tg128 {out.get('tg128_tok_s', 0):.1f} tok/s")
            pairs.append(out)
        return {"pairs": pairs, "repetitions": 1}

    def _stopped_service(self, why: str, function):
        """Run ``function`` with the service stopped (only with --restart), then start it again
        and wait for /health 200."""
        unit = self.service["unit"]
        log(f"{why}: stopping {unit} (--restart given)")
        run(["systemctl", "stop", unit], timeout=120)
        try:
            return function()
        finally:
            run(["systemctl", "start", unit], timeout=120)
            deadline = time.monotonic() + self.args.startup_timeout
            while time.monotonic() < deadline and self.server.health(timeout=2) != 200:
                time.sleep(0.2)
            self.pid = main_pid(unit)
            log(f"{why}: {unit} started again")

    # run -------------------------------------------------------------------------------------
    def run(self) -> dict:
        a = self.args
        started = datetime.now(timezone.utc)
        self.result.update({"schema": SCHEMA, "started": started.isoformat(timespec="seconds"),
                            "host": host_info()})
        self.setup()
        self.result["params"] = {
            "decode_tokens": a.decode_tokens, "parallel": a.parallel, "rounds": a.rounds,
            "bench_repetitions": a.bench_repetitions, "needle_depth": a.needle_depth,
            "time_budget_s": a.time_budget, "restart": a.restart, "kv_sweep": a.kv_sweep}
        self.result["decode"] = self.step("decode", self.decode)
        self.result["ttft"] = self.step("ttft", self.ttft)
        self.result["prompt"] = self.step("prompt", self.prompt_processing)
        restart = a.restart and self.systemd
        no_restart = (f"--restart needs systemd, which is not PID 1 on this host (no "
                      f"/run/systemd/system): {self.service['unit']} cannot be restarted")
        if a.restart and not restart:
            log(f"startup: skipped: {no_restart}")
        room = self.engine_room()
        deferred = []
        if room is None:
            self.result["engine"] = self.step("engine", self.engine)
        elif restart and self.uses_gpu and "missing" not in room:
            deferred.append(("engine", lambda: self.engine(service_up=False)))
        else:
            log(f"engine: skipped: {room}")
            self.result["engine"] = {"skipped": room}
        self.result["thinking"] = self.step("thinking", self.thinking)
        self.result["needle"] = self.step("needle", self.needle)
        if a.kv_sweep:
            if room is None:
                self.result["kv_sweep"] = self.step("kv-sweep", self.kv_sweep)
            elif deferred:
                deferred.append(("kv_sweep", self.kv_sweep))
            else:
                self.result["kv_sweep"] = {"skipped": room}
        else:
            self.result["kv_sweep"] = {"skipped": "not asked for (--kv-sweep)"}
        if deferred:
            def both():
                return {key: self.step(key, fn) for key, fn in deferred}
            self.result.update(self._stopped_service("llama-bench", both))
        if restart:
            self.result["startup"] = self.step("startup", self.startup)
        elif a.restart:
            self.result["startup"] = {"skipped": no_restart}
        else:
            self.result["startup"] = {"skipped": "not asked for (--restart restarts the service)"}
        self.result["host"]["loadavg_end"] = load_average()
        self.result["errors"] = self.errors
        self.result["seconds"] = round((datetime.now(timezone.utc) - started).total_seconds(), 1)
        return self.result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--manifest", default=MANIFEST)
    p.add_argument("--service", required=True, help="service name in the manifest")
    p.add_argument("--out", required=True, help="where to write the JSON result")
    p.add_argument("--restart", action="store_true",
                   help="measure start-up (systemctl restart to /health 200); lets llama-bench "
                        "stop the service when the GPU cannot hold the model twice")
    p.add_argument("--kv-sweep", action="store_true", help="llama-bench over the guide's K/V pairs")
    p.add_argument("--pid", type=int, default=0,
                   help="the service's process id, in place of systemd's MainPID (hosts without "
                        "systemd as PID 1; without it there the port's listener is looked up)")
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--parallel", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--bench-repetitions", type=int, default=3)
    p.add_argument("--ceiling-pairs", type=int, default=5,
                   help="alternations of served decode and llama-bench tg128 (0: none)")
    p.add_argument("--needle-depth", type=float, default=0.5)
    p.add_argument("--needle-max", type=int, default=0, help="largest haystack in tokens (0: the slot)")
    p.add_argument("--request-timeout", type=float, default=300)
    p.add_argument("--needle-timeout", type=float, default=900)
    p.add_argument("--bench-timeout", type=float, default=900)
    p.add_argument("--startup-timeout", type=float, default=300)
    p.add_argument("--time-budget", type=float, default=3600, help="seconds for the whole run")
    args = p.parse_args(argv)
    args.rounds = max(1, min(args.rounds, 20))
    args.bench_repetitions = max(1, min(args.bench_repetitions, 10))
    args.ceiling_pairs = max(0, min(args.ceiling_pairs, 20))
    args.parallel = [n for n in args.parallel if 1 <= n <= 64][:8] or [1]
    args.decode_tokens = max(8, min(args.decode_tokens, 4096))
    args.needle_depth = max(0.0, min(args.needle_depth, 1.0))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        with open(args.manifest) as f:
            manifest = json.load(f)
    except OSError as error:
        print(f"bench: cannot read the manifest {args.manifest}: {error}; was deploy.py run to "
              f"completion on this host?", file=sys.stderr)
        return 2
    services = {s["name"]: s for s in manifest.get("services", [])}
    if args.service not in services:
        print(f"bench: service {args.service!r} is not in {args.manifest}; it lists "
              f"{', '.join(services) or 'none'}", file=sys.stderr)
        return 2
    try:
        result = Bench(args, manifest, services[args.service]).run()
    except SystemExit as error:
        print(str(error), file=sys.stderr)
        return 2
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, args.out)
    log(f"done in {result['seconds']} s, {len(result['errors'])} step(s) failed; result in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

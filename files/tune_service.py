#!/usr/bin/env python3
"""Tune one deployed llama-server service on its own host: every candidate is the pinned build's
llama-server with the service's model, started as the service's user on a spare 127.0.0.1 port
(never the unit's), measured under concurrent load, and stopped. Nothing is estimated: a
context "fits" because a server holding it started and stayed within the memory budget.

Runs on the host (python3 standard library only), beside files/bench_service.py, whose HTTP
client and load generator it uses (llmhost-tune uploads both). Reads the deploy's manifest for
the build, the model, the service's settings and argv, and its user and key file.

Search, each stage bounded and stopped by the time budget (the best so far is kept):
  CPU service   threads (1 request), batch/ubatch (prompt rate), slots (N requests at once,
                N slots of the context each needs)
  GPU service   K/V pairs allowed and compiled (others: "needs a rebuild with pair X"), the
                largest context that fits with all layers on the GPU per pair, and for a model
                that does not fit, --n-cpu-moe N or -ngl N, whichever decodes faster; then
                batch/ubatch and slots as above
Then the goal picks (latency, throughput, mix), and the chosen flags, the service's current
flags and llama-server's defaults (and, with a memory budget, --fit under it) are measured
alternated, round after round. A new profile is proposed only when it beats the current one
by more than the keep margin; otherwise the current one is kept, and the reason said.

    tune_service.py --service translate --out /tmp/tune.json --goal throughput --budget-s 300

Writes one JSON object to --out; exit 0 when written, 2 when the service could not be tuned.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.parse
from datetime import datetime, timezone

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_service as bs  # noqa: E402  (uploaded beside this file)

SCHEMA = 1
# The options the search sets, by the long name the deploy's argv uses (llmhost.flags).
OPTION = {"threads": "--threads", "batch_size": "--batch-size", "ubatch_size": "--ubatch-size",
          "parallel": "--parallel", "ctx_size": "--ctx-size", "cache_type_k": "--cache-type-k",
          "cache_type_v": "--cache-type-v", "gpu_layers": "--n-gpu-layers",
          "n_cpu_moe": "--n-cpu-moe"}
CONTEXT_STEP = 1024           # contexts are chosen in whole KiB of tokens
FIT_HEADROOM = 0.95           # of the largest context measured to fit, what a profile takes
START_TIMEOUT = 600
ALL_LAYERS = 999
GRACE_S = 5                   # past the time budget: a request under way may finish this late


def log(message: str) -> None:
    print(f"tune: {message}", flush=True)


# -- pure parts (unit-tested on the controller) -----------------------------------------------

def with_flags(argv: list[str], flags: dict) -> list[str]:
    """``argv`` with each flag's option set to its value (replaced where present, appended
    where not); a value None removes the option."""
    out = list(argv)
    for key, value in flags.items():
        option = OPTION[key]
        if option in out:
            i = out.index(option)
            del out[i:i + 2]
        if value is not None:
            out += [option, str(value)]
    return out


def serving_argv(argv: list[str], port: int) -> list[str]:
    """The deployed argv on 127.0.0.1:``port`` (the key file stays: candidates need it too)."""
    out = list(argv)
    for option, value in (("--host", "127.0.0.1"), ("--port", str(port))):
        if option in out:
            out[out.index(option) + 1] = value
        else:
            out += [option, value]
    return out


def defaults_argv(argv: list[str], port: int, on_gpu: bool) -> list[str]:
    """llama-server's defaults: the model, -ngl 99 for a GPU service, the address, the key."""
    out = [argv[0], "--model", argv[argv.index("--model") + 1]]
    if on_gpu:
        out += ["--n-gpu-layers", "99"]
    if "--api-key-file" in argv:
        out += ["--api-key-file", argv[argv.index("--api-key-file") + 1]]
    return out + ["--host", "127.0.0.1", "--port", str(port)]


def fit_argv(argv: list[str], port: int, ctx_size: int, parallel: int, k: str, v: str) -> list[str]:
    """llama.cpp's own --fit under the same memory: context and slots as asked, the layers and
    experts left for --fit to place."""
    out = defaults_argv(argv, port, on_gpu=False)
    return out + ["--ctx-size", str(ctx_size), "--parallel", str(parallel), "--flash-attn", "on",
                  "--cache-type-k", k, "--cache-type-v", v, "--fit", "on"]


def thread_candidates(cpus: int, current: int | None) -> list[int]:
    """Thread counts worth measuring: all cores, half, a quarter and three quarters, and the
    current setting; at most 5."""
    wanted = {cpus, max(1, cpus // 2), max(1, cpus // 4), max(1, 3 * cpus // 4)}
    if current:
        wanted.add(min(current, cpus))
    return sorted(wanted)[-5:]


def batch_candidates(on_gpu: bool) -> list[tuple[int, int]]:
    """(batch, ubatch) pairs: llama.cpp's default (2048, 512) and ubatch a step either side."""
    ubatches = (512, 1024, 2048) if on_gpu else (128, 256, 512)
    return [(max(2048, ub), ub) for ub in ubatches]


def round_ctx(tokens: float) -> int:
    return max(CONTEXT_STEP, int(tokens) // CONTEXT_STEP * CONTEXT_STEP)


def slot_candidates(slots: list[int], per_slot: int, max_total: int | None) -> list[int]:
    """The slot counts whose context (slots x per_slot) fits in ``max_total`` (None: any)."""
    return [n for n in sorted(set(slots)) if max_total is None or n * per_slot <= max_total]


def largest_fit(points: list[tuple[int, float]], budget_mib: float) -> int | None:
    """The total context the memory budget holds, on the line through two measured
    (context, MiB) points; a guess that a start then checks (never taken unmeasured)."""
    (c1, m1), (c2, m2) = points[0], points[-1]
    if c2 == c1 or m2 <= m1:
        return None
    per_token = (m2 - m1) / (c2 - c1)
    return round_ctx(c1 + (budget_mib - m1) / per_token)


def meets(row: dict, min_tok_s: float) -> bool:
    return row.get("per_request_min_tok_s") is not None and row["per_request_min_tok_s"] >= min_tok_s


def choose_slots(goal: str, rows: list[dict], min_tok_s: float, margin: float) -> tuple[dict | None, str]:
    """The slots row the goal picks, and why in one sentence. ``rows``: one per slot count
    with decode_1_tok_s (1 request), per_request_min_tok_s and aggregate_tok_s (N requests at
    once, N = slots)."""
    rows = [r for r in rows if r.get("aggregate_tok_s")]
    if not rows:
        return None, "no slot count was measured (see the errors of the slots table)"
    if goal == "latency":
        best = max(r["decode_1_tok_s"] for r in rows)
        near = [r for r in rows if r["decode_1_tok_s"] >= best * (1 - margin)]
        row = max(near, key=lambda r: r["slots"])
        return row, (f"latency: {row['slots']} slot(s): one request decodes at "
                     f"{row['decode_1_tok_s']:.1f} tok/s, within {margin:.0%} of the fastest "
                     f"({best:.1f}); the most slots that keep that speed")
    if goal == "throughput":
        ok = [r for r in rows if meets(r, min_tok_s)]
        if not ok:
            row = max(rows, key=lambda r: r["per_request_min_tok_s"] or 0)
            return row, (f"throughput: no slot count keeps every request at {min_tok_s:g} tok/s; "
                         f"{row['slots']} slot(s) come closest ({row['per_request_min_tok_s']:.1f})")
        row = max(ok, key=lambda r: r["aggregate_tok_s"])
        return row, (f"throughput: {row['slots']} slots: {row['aggregate_tok_s']:.1f} tok/s "
                     f"aggregate, the best with every request at >= {min_tok_s:g} tok/s (slowest "
                     f"{row['per_request_min_tok_s']:.1f})")
    # mix: agents and translations at once (the guide's 4 slots): the most slots whose every
    # request keeps half of the single-request decode and the floor.
    single = max(r["decode_1_tok_s"] for r in rows)
    ok = [r for r in rows if meets(r, max(min_tok_s, single / 2))]
    row = max(ok, key=lambda r: r["slots"]) if ok else min(rows, key=lambda r: r["slots"])
    return row, (f"mix: {row['slots']} slot(s): the most whose every request keeps half of the "
                 f"single-request decode ({single:.1f} tok/s) and >= {min_tok_s:g} tok/s "
                 f"(slowest {row['per_request_min_tok_s']:.1f}, aggregate "
                 f"{row['aggregate_tok_s']:.1f})")


def figure(goal: str, measurement: dict) -> float | None:
    """The goal's figure of one alternated measurement."""
    if goal == "latency":
        return measurement.get("decode_1_tok_s")
    return measurement.get("aggregate_tok_s")


def keep_or_switch(goal: str, chosen: dict | None, current: dict | None, same: bool,
                   margin: float, min_tok_s: float) -> tuple[bool, str]:
    """Whether the service keeps its current flags, and why: ``chosen`` and ``current`` are
    the alternated medians of the comparison."""
    if same:
        return True, "the search chose the flags the service runs now"
    if not chosen or figure(goal, chosen) is None:
        return True, "the chosen flags could not be measured against the current ones"
    if not current or figure(goal, current) is None:
        return False, "the current flags could not be measured (they failed to start or serve)"
    new, old = figure(goal, chosen), figure(goal, current)
    gain = new / old - 1
    if goal != "latency" and not meets(current, min_tok_s) and meets(chosen, min_tok_s):
        return False, (f"the current flags leave a request under {min_tok_s:g} tok/s "
                       f"({current['per_request_min_tok_s']:.1f}); the chosen ones do not")
    if gain > margin:
        return False, f"the chosen flags are {gain:+.1%} on the goal's figure, more than the {margin:.0%} margin"
    how = "not better than" if gain <= 0 else f"better by no more than the {margin:.0%} margin over"
    return True, (f"the chosen flags are {gain:+.1%} on the goal's figure ({new:.1f} vs {old:.1f} "
                  f"tok/s), {how} the current ones: kept the current ones")


def median_of(rounds: list[dict]) -> dict:
    keys = ("decode_1_tok_s", "per_request_min_tok_s", "per_request_tok_s", "aggregate_tok_s",
            "prompt_tok_s")
    return {k: bs.median_or_none([r.get(k) for r in rounds]) for k in keys
            if any(r.get(k) is not None for r in rounds)}


def gguf_layout(path: str) -> dict:
    """arch, layers (block_count), experts (expert_count) and context (context_length) from a
    GGUF's header: the key-value section only, read with bounded loops."""
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    wanted = {".block_count": "layers", ".expert_count": "experts", ".context_length": "context"}
    out: dict = {}
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        _version, _tensors, kvs = struct.unpack("<IQQ", f.read(20))

        def string() -> str:
            (n,) = struct.unpack("<Q", f.read(8))
            return f.read(n).decode(errors="replace")

        def value(kind: int):
            if kind == 8:
                return string()
            if kind == 9:
                inner, count = struct.unpack("<IQ", f.read(12))
                for _ in range(min(count, 10_000_000)):
                    value(inner)
                return None
            return int.from_bytes(f.read(sizes[kind]), "little")

        for _ in range(min(kvs, 100_000)):
            key = string()
            (kind,) = struct.unpack("<I", f.read(4))
            found = value(kind)
            if key == "general.architecture":
                out["arch"] = found
            for suffix, name in wanted.items():
                if key.endswith(suffix) and not key.startswith("general."):
                    out[name] = found
    return out


# -- the host ----------------------------------------------------------------------------------

def spare_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gpu_mib_of(pid: int) -> float | None:
    """GPU memory held by ``pid`` (nvidia-smi's compute apps), or None without nvidia-smi."""
    try:
        result = bs.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                         "--format=csv,noheader,nounits"], timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode:
        return None
    total = 0.0
    for line in result.stdout.splitlines():
        cells = [c.strip() for c in line.split(",")]
        if len(cells) == 2 and cells[0] == str(pid) and cells[1].replace(".", "").isdigit():
            total += float(cells[1])
    return total


class Candidate:
    """One llama-server started for measuring: as the service's user, on a spare port."""

    def __init__(self, tuner: "Tuner", label: str, argv: list[str], flags: dict | None = None):
        self.tuner, self.label, self.flags = tuner, label, dict(flags or {})
        self.port = spare_port()
        self.argv = [a if a != "PORT" else str(self.port) for a in argv]
        if "--port" in self.argv:
            self.argv[self.argv.index("--port") + 1] = str(self.port)
        self.process: subprocess.Popen | None = None
        self.server = bs.Server(f"http://127.0.0.1:{self.port}", tuner.key)
        self.start_s: float | None = None
        self.memory_mib: float | None = None
        self.error: str | None = None

    def start(self) -> bool:
        t = self.tuner
        self.log = tempfile.TemporaryFile()
        user = {"user": t.user, "group": t.user, "extra_groups": []} if t.as_user else {}
        started = time.monotonic()
        self.process = subprocess.Popen(self.argv, stdout=self.log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, cwd="/", env=t.env,
                                        start_new_session=True, **user)
        deadline = started + min(START_TIMEOUT, max(5.0, t.remaining()))
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.error = f"exited {self.process.returncode}: {self.tail()}"
                return False
            if self.server.health(timeout=2) == 200:
                self.start_s = time.monotonic() - started
                self.memory_mib = (gpu_mib_of(self.process.pid) if t.on_gpu
                                   else bs.rss_mib(self.process.pid))
                if t.on_gpu and t.budget_mib and self.memory_mib and self.memory_mib > t.budget_mib:
                    self.error = (f"holds {self.memory_mib:.0f} MiB of GPU memory, over the "
                                  f"budget of {t.budget_mib} MiB")
                    self.stop()
                    return False
                return True
            time.sleep(0.2)
        self.error = f"no /health 200 within {deadline - started:.0f} s: {self.tail()}"
        self.stop()
        return False

    def tail(self) -> str:
        self.log.seek(0)
        lines = self.log.read().decode(errors="replace").strip().splitlines()
        wanted = [l for l in lines if any(w in l.lower() for w in ("error", "failed", "out of memory",
                                                                    "unable", "invalid"))]
        return " | ".join((wanted or lines)[-3:])[:600]

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(30)
        self.process = None

    def measure(self, parallel: int, tokens: int, prompt_tokens: int = 0) -> dict:
        """N requests at once (N = ``parallel``), one request alone, and the prompt rate."""
        t = self.tuner
        timeout = t.request_timeout()
        out: dict = {}
        one = bs.concurrent_completions(self.server, 1, tokens, timeout)
        out["decode_1_tok_s"] = one[0]["predicted_per_second"]
        if parallel > 1:
            summary = bs.decode_summary(parallel, bs.concurrent_completions(
                self.server, parallel, tokens, timeout))
        else:
            summary = bs.decode_summary(1, one)
        out.update({k: summary[k] for k in ("per_request_tok_s", "per_request_min_tok_s",
                                             "aggregate_tok_s")})
        if prompt_tokens:
            timings = self.server.completion(t.prompt(self.server, prompt_tokens), 1, timeout)["timings"]
            out["prompt_tok_s"] = timings["prompt_per_second"]
            out["prompt_tokens"] = timings["prompt_n"]
        return out


class Tuner:
    def __init__(self, args, manifest: dict, service: dict):
        self.args = args
        self.service = service
        self.settings = service["settings"]
        self.tune = self.settings.get("tune") or {}
        self.build = manifest["llama_cpp"]
        self.user = manifest["service_user"]
        self.as_user = os.geteuid() == 0
        self.on_gpu = self.settings["gpu_layers"] > 0
        self.argv = list(service["argv"])
        self.started = time.monotonic()
        self.deadline = self.started + args.budget_s
        self.key = None
        if service.get("key_file"):
            with open(service["key_file"]) as f:
                self.key = f.read().strip()
        gpus = self.settings.get("gpus")
        self.env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/"}
        if gpus is not None:
            self.env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
        self.budget_mib = args.memory_budget_mib
        self.errors: list[dict] = []
        self.stages: dict = {}
        self.notes: dict[str, str] = {}
        self.stopped_early: str | None = None
        self._prompts: dict[int, str] = {}
        self.ballast = None

    # budget ------------------------------------------------------------------------------------
    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def request_timeout(self) -> float:
        """A request's timeout: what is left of the budget and a few seconds of grace, at least
        5 s, at most 300 s. A request that would outlast the budget fails (recorded), so the
        budget holds even where a candidate turns out very slow."""
        return min(300.0, max(5.0, self.remaining() + GRACE_S))

    def room_for(self, stage: str, seconds: float) -> bool:
        """Whether a stage of about ``seconds`` fits before the final comparison's reserve."""
        if self.remaining() - self.args.reserve_s >= seconds:
            return True
        if not self.stopped_early:
            self.stopped_early = (f"{stage}: stopped, {max(0, self.remaining()):.0f} s left of "
                                  f"the {self.args.budget_s:.0f} s budget (the final comparison "
                                  f"keeps {self.args.reserve_s:.0f} s)")
            log(self.stopped_early)
        return False

    # helpers -------------------------------------------------------------------------------------
    def prompt(self, server: bs.Server, tokens: int) -> str:
        """A prompt of at most ``tokens`` tokens by the model's own tokenizer (bounded trims),
        the same text for every candidate."""
        if tokens not in self._prompts:
            lines = [f"The secret code of {n} is {c}." for n, c in bs.haystack_lines(max(4, tokens // 8))]
            for _ in range(20):
                count = server.count_tokens("\n".join(lines), timeout=self.request_timeout())
                if count <= tokens or len(lines) <= 1:
                    break
                lines = lines[:max(1, int(len(lines) * tokens / count * 0.98))]
            self._prompts[tokens] = "\n".join(lines)
        return self._prompts[tokens]

    def candidate(self, label: str, flags: dict) -> Candidate:
        argv = with_flags(serving_argv(self.argv, 0), flags)
        return Candidate(self, label, argv, flags)

    def measured(self, candidates: list[Candidate], parallel_of, rounds: int, tokens: int,
                 prompt_tokens: int = 0, together: bool = True, final: bool = False) -> dict[str, dict]:
        """Each candidate measured ``rounds`` times, alternated (the order rotates each round):
        all started at once when ``together`` (memory allows), else one at a time, started and
        stopped each round. Returns label -> {median figures, rounds, start_s, memory_mib,
        error}."""
        results = {c.label: {"label": c.label, "flags": c.flags, "rounds": []} for c in candidates}
        alive = candidates
        try:
            if together:
                alive = [c for c in candidates if self._started(c, results)]
            last_round = longest = 0.0
            for r in range(rounds):
                # A round starts only when one as long as the last fits: a search stage before
                # the comparison's reserve, the comparison before the budget's end.
                left = self.remaining() - (0 if final else self.args.reserve_s)
                if r and left < last_round:
                    reason = (f"{'comparison' if final else 'search'}: {r} of {rounds} rounds "
                              f"within the budget (a round took {last_round:.0f} s)")
                    self.stopped_early = self.stopped_early or reason
                    log(reason)
                    break
                round_started = time.monotonic()
                order = alive[r % len(alive):] + alive[:r % len(alive)] if alive else []
                for c in order:
                    # Within a round too: a candidate is measured only when one as long as the
                    # longest so far fits (the first always is).
                    left = self.remaining() - (0 if final else self.args.reserve_s)
                    if longest and left < longest:
                        results[c.label]["skipped"] = f"round {r + 1}: the time budget"
                        log(f"{c.label}: round {r + 1}: skipped, {max(0, left):.0f} s left")
                        self.stopped_early = self.stopped_early or (
                            f"{'comparison' if final else 'search'}: round {r + 1} cut short by "
                            f"the time budget")
                        continue
                    if not together and not self._started(c, results):
                        continue
                    measure_started = time.monotonic()
                    try:
                        m = c.measure(parallel_of(c), tokens, prompt_tokens)
                        results[c.label]["rounds"].append(m)
                        log(f"{c.label}: round {r + 1}/{rounds}: " + ", ".join(
                            f"{k} {v:.1f}" for k, v in m.items() if isinstance(v, float)))
                    except Exception as error:
                        results[c.label]["error"] = f"{type(error).__name__}: {error}"
                        log(f"{c.label}: FAILED: {results[c.label]['error']}")
                    finally:
                        longest = max(longest, time.monotonic() - measure_started)
                        if not together:
                            c.stop()
                last_round = time.monotonic() - round_started
        finally:
            for c in candidates:
                c.stop()
        for entry in results.values():
            entry.update(median_of(entry["rounds"]))
        return results

    def _started(self, c: Candidate, results: dict) -> bool:
        ok = c.start()
        entry = results[c.label]
        entry["start_s"], entry["memory_mib"] = c.start_s, c.memory_mib
        if not ok:
            entry["error"] = c.error
            log(f"{c.label}: did not start: {c.error}")
        return ok

    def together(self, count: int) -> bool:
        """Whether ``count`` candidates may run at once: always on the CPU (the model's pages
        are shared), on a GPU only without a memory budget and with room for all."""
        if not self.on_gpu:
            return True
        if self.budget_mib or self.ballast:
            return False
        gpus = bs.nvidia_smi(self.settings.get("gpus"))
        size = (self.service.get("files") or [{}])[0].get("size") or 0
        free = min((g["memory_total_mib"] - g["memory_used_mib"] for g in gpus), default=0) if gpus else 0
        return free > count * (size / 2**20 * 1.3 + 4096)

    # stages ------------------------------------------------------------------------------------
    def base_flags(self) -> dict:
        s = self.settings
        return {"threads": s.get("threads"), "batch_size": s.get("batch_size"),
                "ubatch_size": s.get("ubatch_size"), "parallel": s["parallel"],
                "ctx_size": s["ctx_size"], "cache_type_k": s["cache_type_k"],
                "cache_type_v": s["cache_type_v"], "gpu_layers": s["gpu_layers"],
                "n_cpu_moe": s.get("n_cpu_moe")}

    def stage_threads(self, flags: dict) -> dict:
        cpus = os.cpu_count() or 1
        counts = thread_candidates(cpus, flags.get("threads"))
        if len(counts) < 2 or not self.room_for("threads", 20 * len(counts)):
            return flags
        cands = [self.candidate(f"threads {n}", {**flags, "threads": n}) for n in counts]
        rows = self.measured(cands, lambda c: 1, self.args.rounds, self.args.tokens,
                             together=self.together(len(cands)))
        table = [{"threads": n, **rows[f"threads {n}"]} for n in counts]
        self.stages["threads"] = table
        ok = [r for r in table if r.get("decode_1_tok_s")]
        if ok:
            best = max(ok, key=lambda r: r["decode_1_tok_s"])
            others = ", ".join(f"{r['threads']}: {r['decode_1_tok_s']:.1f}" for r in ok if r is not best)
            self.notes["threads"] = (f"1 request: {best['decode_1_tok_s']:.1f} tok/s "
                                     f"(other thread counts: {others}), alternated")
            flags = {**flags, "threads": best["threads"]}
        return flags

    def stage_batch(self, flags: dict, per_slot: int) -> dict:
        pairs = batch_candidates(self.on_gpu)
        prompt_tokens = min(2048 if self.on_gpu else 512, per_slot - self.args.tokens - 64)
        if prompt_tokens < 128 or not self.room_for("batch", 20 * len(pairs)):
            return flags
        cands = [self.candidate(f"batch {b}/{ub}", {**flags, "batch_size": b, "ubatch_size": ub})
                 for b, ub in pairs]
        rows = self.measured(cands, lambda c: 1, self.args.rounds, 8, prompt_tokens=prompt_tokens,
                             together=self.together(len(cands)))
        table = [{"batch_size": b, "ubatch_size": ub, **rows[f"batch {b}/{ub}"]} for b, ub in pairs]
        self.stages["batch"] = table
        ok = [r for r in table if r.get("prompt_tok_s")]
        if ok:
            best = max(ok, key=lambda r: r["prompt_tok_s"])
            others = ", ".join(f"{r['ubatch_size']}: {r['prompt_tok_s']:.0f}" for r in ok if r is not best)
            note = (f"prompt of {prompt_tokens} tokens: {best['prompt_tok_s']:.0f} tok/s at ubatch "
                    f"{best['ubatch_size']} (other ubatch: {others}), alternated")
            self.notes["batch_size"] = self.notes["ubatch_size"] = note
            flags = {**flags, "batch_size": best["batch_size"], "ubatch_size": best["ubatch_size"]}
        return flags

    def stage_slots(self, flags: dict, per_slot: int, max_total: int | None) -> tuple[dict, dict | None, str]:
        counts = slot_candidates(self.args.slots, per_slot, max_total)
        if not counts:
            return flags, None, f"no slot count of {self.args.slots} fits {per_slot} tokens each"
        cands = [self.candidate(f"slots {n}", {**flags, "parallel": n, "ctx_size": n * per_slot})
                 for n in counts if self.room_for("slots", 15)]
        rows = self.measured(cands, lambda c: c.flags["parallel"], self.args.rounds,
                             self.args.tokens, together=self.together(len(cands)))
        table = [{"slots": c.flags["parallel"], "per_slot_ctx": per_slot, **rows[c.label]}
                 for c in cands]
        self.stages["slots"] = table
        row, why = choose_slots(self.args.goal, table, self.args.min_tok_s, self.args.keep_margin)
        if row is None:
            return flags, None, why
        measured = "; ".join(f"{r['slots']}: {r['per_request_min_tok_s']:.1f} each, "
                             f"{r['aggregate_tok_s']:.1f} aggregate" for r in table
                             if r.get("aggregate_tok_s"))
        self.notes["parallel"] = f"{why} (slots: {measured})"
        chosen = {**flags, "parallel": row["slots"], "ctx_size": row["slots"] * per_slot}
        return chosen, row, why

    # GPU stages --------------------------------------------------------------------------------
    def kv_pairs(self) -> list[tuple[str, str]]:
        compiled = {tuple(p) for p in self.build.get("fa_pairs") or ()}
        allowed = [tuple(p) for p in self.args.kv_pairs]
        rebuild = [f"{k}/{v} needs a rebuild with pair {k}-{v} (add [{k!r}, {v!r}] to "
                   f"llm_cuda_fa_extra_pairs)" for k, v in allowed if compiled and (k, v) not in compiled]
        for line in rebuild:
            log(f"kv: {line}")
        self.stages["kv_rebuild"] = rebuild
        pairs = [p for p in allowed if not compiled or p in compiled]
        current = (self.settings["cache_type_k"], self.settings["cache_type_v"])
        return sorted(pairs, key=lambda p: p != current)

    def stage_context(self, flags: dict, pairs: list[tuple[str, str]], per_slot: int) -> dict:
        """Per K/V pair: decode at 1 request, and the largest total context that fits with
        every layer on the GPU (two measured points, the line through them, a start there)."""
        top = max(self.args.slots)
        budget = self.budget_mib or self.gpu_room()
        rows = []
        for k, v in pairs:
            if not self.room_for("context", 60):
                break
            row = {"k": k, "v": v, "points": []}
            for total in (per_slot, per_slot * top):
                c = self.candidate(f"kv {k}/{v} ctx {total}", {**flags, "cache_type_k": k,
                                                               "cache_type_v": v, "ctx_size": total,
                                                               "parallel": 1})
                if not c.start():
                    row["points"].append({"ctx": total, "fits": False, "error": c.error})
                    break
                try:
                    point = {"ctx": total, "fits": True, "memory_mib": c.memory_mib}
                    if total == per_slot:
                        m = c.measure(1, self.args.tokens)
                        row["decode_1_tok_s"] = m["decode_1_tok_s"]
                    row["points"].append(point)
                finally:
                    c.stop()
            fitted = [(p["ctx"], p["memory_mib"]) for p in row["points"] if p["fits"] and p["memory_mib"]]
            guess = largest_fit(fitted, budget * FIT_HEADROOM) if len(fitted) == 2 and budget else None
            for _ in range(2):  # the guess, then 10 % less: each one started, none assumed
                if not guess or guess <= (fitted[-1][0] if fitted else 0) or not self.room_for("context", 30):
                    break
                guess = min(guess, self.args.n_ctx_train * top) if self.args.n_ctx_train else guess
                c = self.candidate(f"kv {k}/{v} ctx {guess}", {**flags, "cache_type_k": k,
                                                               "cache_type_v": v, "ctx_size": guess,
                                                               "parallel": 1})
                ok = c.start()
                row["points"].append({"ctx": guess, "fits": ok, "memory_mib": c.memory_mib,
                                      "error": c.error})
                c.stop()
                if ok:
                    break
                guess = round_ctx(guess * 0.9)
            fits = [p["ctx"] for p in row["points"] if p["fits"]]
            row["max_ctx"] = max(fits) if fits else None
            log(f"kv {k}/{v}: 1 request {row.get('decode_1_tok_s') or 0:.1f} tok/s, largest context "
                f"that fitted {row['max_ctx']}")
            rows.append(row)
        self.stages["kv"] = rows
        return {(r["k"], r["v"]): r for r in rows}

    def gpu_room(self) -> float | None:
        gpus = bs.nvidia_smi(self.settings.get("gpus"))
        if not gpus:
            return None
        return min(g["memory_total_mib"] - g["memory_used_mib"] for g in gpus) - 1024

    def stage_offload(self, flags: dict) -> dict:
        """A model that does not fit with every layer on the GPU: the fewest MoE layers on the
        CPU (--n-cpu-moe) and the most layers on the GPU (-ngl) that fit, each found by starts
        (bisection), each measured at 1 request; the faster one."""
        layout = gguf_layout(self.service["model_path"])
        layers = layout.get("layers") or 0
        options = []
        if layout.get("experts"):
            options.append(("n_cpu_moe", lambda n: {**flags, "gpu_layers": ALL_LAYERS, "n_cpu_moe": n},
                            False))
        options.append(("gpu_layers", lambda n: {**flags, "gpu_layers": n, "n_cpu_moe": None}, True))
        rows = []
        for key, make, more_is_more_gpu in options:
            lo, hi, best = 0, layers, None   # bisection over the number of layers
            while lo <= hi and self.room_for("offload", 40):
                mid = (lo + hi) // 2
                c = self.candidate(f"{key} {mid}", make(mid))
                ok = c.start()
                c.stop()
                rows.append({"option": key, "value": mid, "fits": ok, "memory_mib": c.memory_mib,
                             "error": c.error})
                log(f"offload: {key} {mid}: {'fits' if ok else 'does not fit'}")
                if ok:
                    best = mid
                    lo, hi = (mid + 1, hi) if more_is_more_gpu else (lo, mid - 1)
                else:
                    lo, hi = (lo, mid - 1) if more_is_more_gpu else (mid + 1, hi)
                if hi - lo < max(1, layers // 16):
                    break
            if best is not None:
                cands = [self.candidate(f"{key} {best}", make(best))]
                m = self.measured(cands, lambda c: 1, self.args.rounds, self.args.tokens)[cands[0].label]
                rows.append({"option": key, "value": best, "chosen_for_option": True, **m})
        self.stages["offload"] = rows
        measured = [r for r in rows if r.get("chosen_for_option") and r.get("decode_1_tok_s")]
        if not measured:
            raise RuntimeError("the model fits the GPU neither with experts nor layers on the CPU "
                               "within the budget")
        best = max(measured, key=lambda r: r["decode_1_tok_s"])
        others = ", ".join(f"{r['option']} {r['value']}: {r['decode_1_tok_s']:.1f}" for r in measured
                           if r is not best)
        note = (f"does not fit with every layer on the GPU; {best['option']} {best['value']}: "
                f"{best['decode_1_tok_s']:.1f} tok/s at 1 request ({others or 'the only one that fitted'})")
        self.notes[best["option"]] = note
        return make_flags(options, best)

    # the run -----------------------------------------------------------------------------------
    def search(self) -> tuple[dict, dict | None, str]:
        flags = self.base_flags()
        per_slot = self.args.min_ctx or self.settings["ctx_size"] // self.settings["parallel"]
        per_slot = round_ctx(per_slot) if per_slot >= CONTEXT_STEP else per_slot
        max_total = None
        if self.on_gpu:
            pairs = self.kv_pairs()
            if not pairs:
                raise RuntimeError("no allowed K/V pair is compiled in this build: "
                                   + "; ".join(self.stages["kv_rebuild"]))
            probe = self.candidate("fit check", {**flags, "ctx_size": per_slot, "parallel": 1,
                                                 "cache_type_k": pairs[0][0],
                                                 "cache_type_v": pairs[0][1]})
            fits = probe.start()
            probe.stop()
            self.stages["fit_check"] = {"fits": fits, "memory_mib": probe.memory_mib,
                                        "error": probe.error}
            if not fits:
                log(f"the model does not fit with {flags['gpu_layers']} layers and {per_slot} "
                    f"context: {probe.error}")
                # Placed for the context the goal needs: one slot for latency, else the most.
                slots = 1 if self.args.goal == "latency" else max(self.args.slots)
                flags = self.stage_offload({**flags, "parallel": slots, "ctx_size": slots * per_slot,
                                            "cache_type_k": pairs[0][0], "cache_type_v": pairs[0][1]})
            kv = self.stage_context(flags, pairs, per_slot)
            ok = [r for r in kv.values() if r.get("decode_1_tok_s")]
            if ok:
                best = max(ok, key=lambda r: r["decode_1_tok_s"])
                near = [r for r in ok if r["decode_1_tok_s"] >= best["decode_1_tok_s"] * (1 - self.args.keep_margin)]
                # Within the margin of the fastest: the pair that holds the most context.
                pick = max(near, key=lambda r: (r.get("max_ctx") or 0, r["decode_1_tok_s"]))
                flags = {**flags, "cache_type_k": pick["k"], "cache_type_v": pick["v"]}
                max_total = pick.get("max_ctx")
                table = ", ".join(f"{r['k']}/{r['v']}: {r['decode_1_tok_s']:.1f} tok/s, fits "
                                  f"{r.get('max_ctx')}" for r in ok)
                self.notes["cache_type_k"] = self.notes["cache_type_v"] = (
                    f"1 request and largest context with all layers on the GPU per pair: {table}; "
                    f"within {self.args.keep_margin:.0%} of the fastest, the one holding the most")
        else:
            flags = self.stage_threads(flags)
        flags = self.stage_batch(flags, per_slot)
        flags, row, why = self.stage_slots(flags, per_slot, max_total)
        if self.on_gpu and max_total and row:
            # The context each slot gets: as much as fits (within the headroom), at least the floor.
            each = round_ctx(max_total * FIT_HEADROOM / flags["parallel"])
            if self.args.n_ctx_train:
                each = min(each, self.args.n_ctx_train)
            each = max(each, per_slot)
            flags["ctx_size"] = each * flags["parallel"]
            self.notes["ctx_size"] = (f"{each} tokens a slot: {FIT_HEADROOM:.0%} of the largest "
                                      f"context that started within the memory with this pair "
                                      f"({max_total})")
        else:
            self.notes["ctx_size"] = f"{per_slot} tokens a slot (the floor asked for) x {flags['parallel']} slots"
        return flags, row, why

    def compare(self, chosen: dict) -> dict:
        """The chosen flags, the current ones, llama-server's defaults (and --fit under a memory
        budget) measured alternated at the goal's load."""
        n = 1 if self.args.goal == "latency" else chosen["parallel"]
        cands = [self.candidate("chosen", chosen),
                 Candidate(self, "current", serving_argv(self.argv, 0), self.base_flags()),
                 Candidate(self, "defaults", defaults_argv(self.argv, 0, self.on_gpu))]
        if self.on_gpu and (self.budget_mib or self.ballast):
            cands.append(Candidate(self, "fit", fit_argv(self.argv, 0, chosen["ctx_size"],
                                                         chosen["parallel"], chosen["cache_type_k"],
                                                         chosen["cache_type_v"])))
        rows = self.measured(cands, lambda c: n, self.args.compare_rounds, self.args.tokens,
                             together=self.together(len(cands)), final=True)
        for c in cands:
            rows[c.label]["argv"] = c.argv[1:]
        return {"load": n, "rounds": self.args.compare_rounds, "rows": rows,
                "method": f"{self.args.compare_rounds} rounds; each round measures every one "
                          f"(the order rotating): {n} request(s) of {self.args.tokens} tokens at "
                          f"once (server timings) and 1 request alone; medians"}

    def run(self) -> dict:
        started = datetime.now(timezone.utc)
        tunable = {k: self.settings.get(k) for k in OPTION}
        log(f"service {self.service['name']}: goal {self.args.goal}, time budget "
            f"{self.args.budget_s:.0f} s (the final comparison keeps {self.args.reserve_s:.0f} s), "
            f"{'GPU' if self.on_gpu else 'CPU'}, model {os.path.basename(self.service['model_path'])}"
            + (f", memory budget {self.budget_mib} MiB" if self.budget_mib else ""))
        result = {"schema": SCHEMA, "started": started.isoformat(timespec="seconds"),
                  "host": bs.host_info(), "service": self.service["name"],
                  "on_gpu": self.on_gpu, "goal": self.args.goal,
                  "constraints": {"min_tok_s": self.args.min_tok_s, "min_ctx": self.args.min_ctx,
                                  "slots": self.args.slots, "kv_pairs": self.args.kv_pairs,
                                  "memory_budget_mib": self.budget_mib, "ballast": self.args.ballast,
                                  "keep_margin": self.args.keep_margin},
                  "budget_s": self.args.budget_s, "tokens": self.args.tokens,
                  "build": {"commit": self.build["commit"], "server": self.build["server"],
                            "fa_pairs": self.build.get("fa_pairs")},
                  "model": {"path": self.service["model_path"],
                            "sha256": (self.service.get("files") or [{}])[0].get("sha256")},
                  "current": tunable}
        try:
            if self.args.ballast:
                self.ballast = start_ballast(self.args.ballast, self.budget_mib, self.env)
                result["ballast"] = self.ballast["ready"]
            chosen, row, why = self.search()
            if row is None:
                raise RuntimeError(f"nothing to choose from: {why}")
            result["chosen"] = {"flags": chosen, "reason": why, "notes": self.notes}
            comparison = self.compare(chosen)
            result["comparison"] = comparison
            rows = comparison["rows"]
            same = all(chosen.get(k) == tunable.get(k) for k in chosen)
            keep, reason = keep_or_switch(self.args.goal, rows["chosen"], rows["current"], same,
                                          self.args.keep_margin, self.args.min_tok_s)
            result["proposal"] = {
                "keep_current": keep, "reason": reason,
                "settings": {k: v for k, v in (tunable if keep else chosen).items()
                             if v is not None and (k in self.notes or k in ("parallel", "ctx_size"))}}
            log(f"proposal: {'keep the current flags' if keep else 'the chosen flags'}: {reason}")
        except Exception as error:
            message = f"{type(error).__name__}: {error}"
            log(f"FAILED: {message}")
            self.errors.append({"step": "search", "error": message})
        finally:
            if self.ballast:
                stop_ballast(self.ballast)
        result.update({"stages": self.stages, "errors": self.errors,
                       "stopped_early": self.stopped_early,
                       "seconds": round(time.monotonic() - self.started, 1)})
        log(f"done in {result['seconds']:.0f} s of the {self.args.budget_s:.0f} s budget")
        return result


def make_flags(options, best: dict) -> dict:
    make = next(m for key, m, _ in options if key == best["option"])
    return make(best["value"])


# -- the ballast ---------------------------------------------------------------------------------

def start_ballast(helper: str, budget_mib: int, env: dict) -> dict:
    """files/gpu_ballast.py holding every MiB of the GPU beyond ``budget_mib``; returns its
    process and what it reported once ready."""
    ready = tempfile.NamedTemporaryFile(prefix="llmhost-ballast-", suffix=".json", delete=False).name
    os.unlink(ready)
    process = subprocess.Popen([sys.executable, helper, "--leave-mib", str(budget_mib),
                                "--ready-file", ready], env={**os.environ, **env},
                               start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if os.path.exists(ready):
            with open(ready) as f:
                report = json.load(f)
            log(f"ballast: holds {report['held_mib']:.0f} MiB; the GPU shows "
                f"{report['free_mib']:.0f} MiB free")
            return {"process": process, "ready": report}
        if process.poll() is not None:
            raise RuntimeError(f"the ballast exited {process.returncode} before it was ready")
        time.sleep(0.2)
    process.kill()
    raise RuntimeError("the ballast was not ready within 120 s")


def stop_ballast(ballast: dict) -> None:
    process = ballast["process"]
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()


# -- main ----------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--manifest", default=bs.MANIFEST)
    p.add_argument("--service", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--goal", choices=("latency", "throughput", "mix"), default="throughput")
    p.add_argument("--min-tok-s", type=float, default=20)
    p.add_argument("--min-ctx", type=int, default=0, help="tokens each slot holds (0: the service's)")
    p.add_argument("--slots", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--kv-pairs", nargs="+", default=["f16-f16", "q4_0-q8_0", "q4_0-q4_0"])
    p.add_argument("--memory-budget-mib", type=int, default=0)
    p.add_argument("--ballast", default="", help="path of gpu_ballast.py: hold the GPU beyond the budget")
    p.add_argument("--budget-s", type=float, default=900)
    p.add_argument("--keep-margin", type=float, default=0.05)
    p.add_argument("--tokens", type=int, default=64, help="tokens per decode request")
    p.add_argument("--rounds", type=int, default=2, help="alternated rounds per search stage")
    p.add_argument("--compare-rounds", type=int, default=3, help="alternated rounds of the comparison")
    p.add_argument("--n-ctx-train", type=int, default=0, help="cap on a slot's context (0: read it)")
    args = p.parse_args(argv)
    args.kv_pairs = [tuple(p.split("-", 1)) for p in args.kv_pairs]
    args.slots = sorted({n for n in args.slots if 1 <= n <= 64}) or [1]
    args.tokens = max(8, min(args.tokens, 1024))
    args.rounds = max(1, min(args.rounds, 10))
    args.compare_rounds = max(1, min(args.compare_rounds, 10))
    args.memory_budget_mib = args.memory_budget_mib or None
    # The comparison's share of the budget: about a quarter, at least 30 s.
    args.reserve_s = max(30.0, args.budget_s * 0.25)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        with open(args.manifest) as f:
            manifest = json.load(f)
    except OSError as error:
        print(f"tune: cannot read the manifest {args.manifest}: {error}", file=sys.stderr)
        return 2
    services = {s["name"]: s for s in manifest.get("services", [])}
    if args.service not in services:
        print(f"tune: service {args.service!r} is not in {args.manifest}; it lists "
              f"{', '.join(services) or 'none'}", file=sys.stderr)
        return 2
    service = services[args.service]
    if not args.n_ctx_train:
        try:
            args.n_ctx_train = gguf_layout(service["model_path"]).get("context") or 0
        except (OSError, ValueError, struct.error):
            args.n_ctx_train = 0
    result = Tuner(args, manifest, service).run()
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

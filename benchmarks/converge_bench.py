"""Fresh sandbox host to serving, per step, and the no-op rerun.

    python -m benchmarks.converge_bench [--cold] [--reruns 3] [--floor]

--cold gives the host an empty ccache and apt cache (what CI's first run pays); without it the
shared caches of tests/support are used (what every later run pays). The debootstrap tarball
is made once and timed when it is missing. Per-operation times come from the deploy itself
(LLMHOST_TIMINGS, operations/timing.py). Prints a Markdown table for benchmarks/RESULTS.md.

--floor also runs benchmarks/floor_deploy.py (3 pyinfra operations) on the same host, once to
converge it, then alternates it with the full deploy's no-op rerun (--reruns times each: both
whole `pyinfra` processes, zero changes) and prints both medians and their ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from tests.support import cache, deployment, sandbox

FLOOR = "benchmarks/floor_deploy.py"

STEPS = (  # (step, predicate on the operation name)
    ("packages", lambda op: op.startswith("Install build packages")),
    ("user, directories, helpers", lambda op: op.split(" ")[0] in ("Group", "System", "memlock",
                                                                    "Directory", "Host")),
    ("llama.cpp source", lambda op: op == "llama.cpp source"),
    ("llama.cpp build", lambda op: op == "llama.cpp build"),
    ("model", lambda op: op.startswith("Model file")),
    ("API key", lambda op: op.startswith("API key")),
    ("unit switch + /health", lambda op: op.startswith("Service ")),
    ("manifest", lambda op: op.startswith("Manifest")),
)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cold", action="store_true")
    parser.add_argument("--reruns", type=int, default=3)
    parser.add_argument("--floor", action="store_true")
    args = parser.parse_args()

    rows: list[tuple[str, float]] = []
    tarball_missing = not any(cache.cache_dir().glob("debootstrap-bookworm-*.tar"))
    started = time.monotonic()
    sandbox.base_tarball("bookworm")
    rows.append(("debootstrap (cached tarball)" if not tarball_missing else "debootstrap",
                 time.monotonic() - started))
    repo, model = cache.llamacpp_repo(), cache.gemma_model()

    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        tmp = Path(tmp)
        if args.cold:
            (tmp / "ccache").mkdir()
            binds, apt = {str(tmp / "ccache"): "/opt/llama.cpp/ccache"}, tmp / "apt"
        else:
            binds, apt = deployment.shared_cache_binds(), deployment.apt_cache()
        started = time.monotonic()
        with sandbox.booted_host("bench", binds=binds, apt_cache=apt) as host, \
                deployment.git_daemon(repo) as git_url:
            rows.append(("boot to sshd", time.monotonic() - started))
            port = sandbox.free_port()
            inventory = deployment.write_inventory(tmp / "inventory.py", {"bench": (host, {
                "llm_llamacpp_git_url": git_url,
                "llm_services": {"translate": deployment.service_settings(port, model)}})})
            timings = tmp / "timings.jsonl"
            first = deployment.run_deploy(inventory, env={"LLMHOST_TIMINGS": str(timings)})
            if first.returncode:
                print(first.output[-5000:])
                return 1
            ops = [json.loads(line) for line in timings.read_text().splitlines()]
            for step, matches in STEPS:
                # Operations of the packaged deploy are named "llama.cpp server | <name>".
                rows.append((f"deploy: {step}", sum(o["seconds"] for o in ops
                                                    if matches(o["operation"].rpartition(" | ")[2]))))
            rows.append(("deploy total (pyinfra CLI, connect to exit)", first.seconds))
            reruns, floors = [], []
            if args.floor:
                assert deployment.run_deploy(inventory, deploy=FLOOR).returncode == 0
            for _ in range(args.reruns):
                rerun = deployment.run_deploy(inventory)
                assert rerun.returncode == 0 and not rerun.changed_operations, rerun.output[-3000:]
                reruns.append(rerun.seconds)
                if args.floor:
                    floor = deployment.run_deploy(inventory, deploy=FLOOR)
                    assert floor.returncode == 0 and not floor.changed_operations, floor.output[-3000:]
                    floors.append(floor.seconds)
            rows.append((f"no-op rerun, median of {args.reruns} (zero changes)", statistics.median(reruns)))
            if args.floor:
                rows.append((f"3-operation pyinfra deploy (benchmarks/floor_deploy.py), no-op, median "
                             f"of {args.reruns}, alternated", statistics.median(floors)))
                print("no-op reruns:", " ".join(f"{s:.2f}" for s in reruns))
                print("floor reruns:", " ".join(f"{s:.2f}" for s in floors))
                print(f"ratio: {statistics.median(reruns) / statistics.median(floors):.2f}x")

    print(f"| step ({'cold caches' if args.cold else 'warm caches'}) | seconds |\n|---|---:|")
    for step, seconds in rows:
        print(f"| {step} | {seconds:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

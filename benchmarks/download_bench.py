"""Download benchmark: files/fetch_model.py (parallel ranged connections) vs one curl stream.

The fake Hugging Face server (tests/support/fake_hf.py) serves a 2 GiB file throttled per
connection, as a CDN does, so parallelism matters as it does against the real Hub. All runs happen
in the same process run, against the same server. Then the no-op rerun is timed with a 20 GB-class
record present (a sparse file). Files live outside the checkout (default /var/tmp/llmhost-bench).

    python3 benchmarks/download_bench.py [--rate-mb 20] [--size-gib 2] [--no-single] \
        [--write benchmarks/RESULTS-download.md]
"""

from __future__ import annotations

import argparse
import datetime
import json
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.fake_hf import FakeHF, sha256_path  # noqa: E402

HELPER = ROOT / "files" / "fetch_model.py"
REPO, NAME = "bench/Bench-GGUF", "bench-2g.gguf"


def timed(cmd: list[str]) -> tuple[float, float, subprocess.CompletedProcess]:
    """Wall seconds, child CPU seconds (user+sys) and the result."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    result = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if result.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return wall, cpu, result


def make_source(work: Path, size: int) -> Path:
    source = work / NAME
    if not source.exists() or source.stat().st_size != size:
        with open(source, "wb") as f:  # sparse: the server reads zeros, the network is the same
            f.truncate(size)
    return source


def helper_cmd(url: str, dest: Path, sha: str, size: int, connections: int) -> list[str]:
    return [sys.executable, str(HELPER), "--url", url, "--dest", str(dest), "--sha256", sha,
            "--size", str(size), "--connections", str(connections),
            "--record-json", json.dumps({"commit": "bench"})]


def clean(dest: Path) -> None:
    for p in dest.parent.glob(dest.name + "*"):
        p.unlink()


def run_downloads(args, work: Path) -> tuple[list[dict], int]:
    size = int(args.size_gib * 1024**3)
    source = make_source(work, size)
    sha = sha256_path(source)
    rows = []
    with FakeHF() as hub:
        commit = hub.add_repo(REPO, {NAME: source}, sha256={NAME: sha})
        hub.faults.rate_limit = int(args.rate_mb * 1_000_000)
        url = hub.resolve_url(REPO, commit, NAME)
        dest = work / "out" / NAME
        dest.parent.mkdir(exist_ok=True)

        clean(dest)
        wall, cpu, _ = timed(["curl", "-sS", "-L", "-o", str(dest), url])
        hash_wall, hash_cpu, hashed = timed(["sha256sum", str(dest)])
        assert hashed.stdout.split()[0] == sha, "curl's file does not match"
        rows.append(dict(what="curl, 1 stream (download only)", wall=wall, cpu=cpu, size=size))
        rows.append(dict(what="curl, 1 stream, then sha256sum", wall=wall + hash_wall,
                         cpu=cpu + hash_cpu, size=size))
        counts = [1, args.connections] if args.single else [args.connections]
        for n in counts:
            clean(dest)
            wall, cpu, result = timed(helper_cmd(url, dest, sha, size, n))
            rows.append(dict(what=f"fetch_model.py, {n} connection{'s' if n > 1 else ''} of 64 MiB "
                                  f"chunks (download + sha256 + record)", wall=wall, cpu=cpu,
                             size=size, last=result.stdout.strip().splitlines()[-1]))
        clean(dest)
    return rows, size


def run_noop(work: Path, runs: int = 5) -> list[float]:
    big = work / "noop" / "big-20g.gguf"
    big.parent.mkdir(exist_ok=True)
    size, sha = 20 * 1000**3, "ab" * 32
    with open(big, "wb") as f:
        f.truncate(size)
    Path(f"{big}.record.json").write_text(json.dumps(
        {"sha256": sha, "size": size, "commit": "c" * 40, "mtime_ns": big.stat().st_mtime_ns}))
    times = []
    for _ in range(runs):
        # The URL is never contacted on a no-op: nothing listens there.
        wall, _, result = timed(helper_cmd("http://127.0.0.1:9/x", big, sha, size, 8))
        assert "already present" in result.stdout
        times.append(wall)
    shutil.rmtree(big.parent)
    return times


def machine() -> str:
    nproc = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    free = subprocess.run(["free", "-g"], capture_output=True, text=True).stdout.rstrip()
    curl = subprocess.run(["curl", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    return (f"nproc: {nproc}; Python {sys.version.split()[0]}; {curl}\n\n```\n$ free -g\n{free}\n```")


def report(args, rows: list[dict], noop: list[float]) -> str:
    lines = [
        "# Download benchmark",
        "",
        f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}. Command, from "
        f"the repository root:",
        "",
        f"    python3 benchmarks/download_bench.py --rate-mb {args.rate_mb:g} --size-gib "
        f"{args.size_gib:g}{'' if args.single else ' --no-single'} --write {args.write}",
        "",
        f"Machine: {machine()}",
        "",
        f"A {args.size_gib:g} GiB file served by tests/support/fake_hf.py on 127.0.0.1 (resolve "
        f"URL, 302 to the \"CDN\" port), throttled to {args.rate_mb:g} MB/s per connection, as a "
        f"CDN limits each stream. Same server, same run, one after the other. Wall time includes "
        f"process start; CPU is user+sys of the client process (the server runs in the benchmark "
        f"process and shares the machine's cores).",
        "",
        "| client | wall s | mean MB/s | client CPU s |",
        "|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['what']} | {r['wall']:.1f} | {r['size'] / r['wall'] / 1e6:.1f} | "
                     f"{r['cpu']:.1f} |")
    lines += ["", "fetch_model.py's own final lines:", ""]
    lines += [f"    {r['last']}" for r in rows if "last" in r]
    lines += [
        "",
        f"No-op rerun with a 20 GB (20,000,000,000 bytes, sparse) file and its record present, "
        f"{len(noop)} runs of `python3 files/fetch_model.py ... --size 20000000000` (the whole "
        f"process, Python start included): median {statistics.median(noop) * 1000:.0f} ms, "
        f"max {max(noop) * 1000:.0f} ms. It stats the file and reads the record; the URL is "
        f"not contacted.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rate-mb", type=float, default=20.0, help="per-connection limit, MB/s")
    p.add_argument("--size-gib", type=float, default=2.0)
    p.add_argument("--connections", type=int, default=8)
    p.add_argument("--no-single", dest="single", action="store_false",
                   help="skip fetch_model.py with one connection")
    p.add_argument("--work", default="/var/tmp/llmhost-bench")
    p.add_argument("--write", default="", help="write the markdown report here")
    args = p.parse_args()
    if not shutil.which("curl"):
        raise SystemExit("curl is missing: apt-get install -y curl")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows, _ = run_downloads(args, work)
    noop = run_noop(work)
    text = report(args, rows, noop)
    print(text)
    if args.write:
        Path(args.write).write_text(text)


if __name__ == "__main__":
    main()

"""Acceptance bench over the deploy's inventory: is every service as fast as the guide says?

    python -m llmhost.bench inventory.py [--limit HOST] [--service NAME] [--out DIR]
                                            [--restart] [--kv-sweep]

For each host (the same inventory and group_data/ the deploy used) and each deployed service,
uploads files/bench_service.py, runs it there (load on the host itself, against the service's own
address, every loop bounded) with its progress lines printed live, and brings its JSON back. Writes
benchmarks/results/<timestamp>/ (or --out): <host>.json per host, report.md (tables like the
guide's, PASS / BELOW / NO-REFERENCE against the guide's figures, a fleet summary) and PNG plots
when matplotlib is installed (`pip install 'llmhost[bench]'`).

--restart restarts each service (start-up time) and may stop it while llama-bench runs when the
GPU cannot hold the model twice. Exit status: 0 every service measured, 1 some host or service
failed, 3 with --fail-below when a figure is BELOW the guide's.
"""

from __future__ import annotations

import argparse
import io
import json
import shlex
import sys
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from llmhost import bench_reference, bench_report, data_dir
from llmhost.inventory import InventoryError, InventoryHost, enable_output, load_inventory
from llmhost.manifest import Manifest, ManifestError
from llmhost.services import MANIFEST_NAME
from llmhost.settings import load_host_settings

HELPER = data_dir("files") / "bench_service.py"
GATEWAY_HELPER = data_dir("files") / "bench_gateway.py"
GATEWAY_RECORD = "/etc/llmhost-gateway/gateway.json"  # llmhost.gateway.RECORD


def say(message: str) -> None:
    print(f"bench: {message}", flush=True)


def helper_args(args: argparse.Namespace) -> list[str]:
    """bench_service.py options passed through from ours."""
    out = ["--decode-tokens", str(args.decode_tokens), "--rounds", str(args.rounds),
           "--bench-repetitions", str(args.bench_repetitions), "--ceiling-pairs", str(args.ceiling_pairs),
           "--time-budget", str(args.time_budget), "--parallel", *map(str, args.parallel)]
    if args.needle_max:
        out += ["--needle-max", str(args.needle_max)]
    if args.restart:
        out.append("--restart")
    if args.kv_sweep:
        out.append("--kv-sweep")
    return out


def read_manifest(host: InventoryHost, config_dir: str) -> Manifest:
    path = f"{config_dir.rstrip('/')}/{MANIFEST_NAME}"
    buffer = io.BytesIO()
    if not host.get(path, buffer):
        raise RuntimeError(f"cannot read {path}: was deploy.py run to completion on {host.name}?")
    try:
        return Manifest.from_json(buffer.getvalue().decode())
    except ManifestError as error:
        raise RuntimeError(f"{path}: {error}") from None


@contextmanager
def uploaded(host: InventoryHost, *helpers: Path, prefix: str = "llmhost-bench"):
    """A private folder on the host holding ``helpers``; removed afterwards, pass or fail."""
    ok, tmp, err = host.run(f"mktemp -d /tmp/{prefix}.XXXXXX")
    if not ok:
        raise RuntimeError(f"mktemp failed: {err}")
    tmp = tmp.strip()
    try:
        for helper in helpers:
            if not host.put(str(helper), f"{tmp}/{helper.name}"):
                raise RuntimeError(f"upload of {helper.name} to {tmp} failed")
        yield tmp
    finally:
        host.run(f"rm -rf {shlex.quote(tmp)}")


def bench_gateway(host: InventoryHost, args: argparse.Namespace) -> dict:
    """Decode through a gateway host's own address, measured there (files/bench_gateway.py):
    {"services": [], "gateway": result, "error": None}."""
    with host, uploaded(host, GATEWAY_HELPER) as tmp:
        say(f"[{host.name}] gateway: decode through it (bench_gateway.py on the host)")
        command = " ".join(map(shlex.quote, [
            "python3", f"{tmp}/bench_gateway.py", "--record", GATEWAY_RECORD, "--out",
            f"{tmp}/gateway.json", "--decode-tokens", str(args.decode_tokens),
            "--rounds", str(args.rounds), "--parallel", *map(str, args.parallel)]))
        ok, stdout, stderr = host.run(command, print_output=True, timeout=int(args.time_budget) + 300)
        buffer = io.BytesIO()
        if not ok or not host.get(f"{tmp}/gateway.json", buffer):
            tail = (stderr or stdout).strip().splitlines()[-5:]
            raise RuntimeError(f"bench_gateway.py failed: {' / '.join(tail)}")
    return {"services": [], "gateway": json.loads(buffer.getvalue().decode()), "error": None}


def bench_host(host: InventoryHost, args: argparse.Namespace) -> dict:
    """Every chosen service of one host: {"services": [result, ...], "error": str | None}; on a
    gateway host, decode through the gateway."""
    if "llm_gateway" in host.data and "llm_services" not in host.data:
        return bench_gateway(host, args)
    entry: dict = {"services": [], "error": None}
    config_dir = load_host_settings(host.name, host.data).config_dir
    with host:
        manifest = read_manifest(host, config_dir)
        names = [s.name for s in manifest.services]
        if args.service:
            missing = [n for n in args.service if n not in names]
            if missing:
                raise RuntimeError(f"service(s) {', '.join(missing)} not deployed here; the manifest "
                                   f"lists {', '.join(names) or 'none'}")
            names = [n for n in names if n in args.service]
        with uploaded(host, HELPER) as tmp:
            for name in names:
                say(f"[{host.name}] {name}: benchmarking (bench_service.py on the host)")
                out = f"{tmp}/{name}.json"
                command = " ".join(map(shlex.quote, [
                    "python3", f"{tmp}/bench_service.py", "--manifest",
                    f"{config_dir.rstrip('/')}/{MANIFEST_NAME}", "--service", name, "--out", out,
                    *helper_args(args)]))
                ok, stdout, stderr = host.run(command, print_output=True,
                                              timeout=int(args.time_budget) + 300)
                buffer = io.BytesIO()
                if not ok or not host.get(out, buffer):
                    tail = (stderr or stdout).strip().splitlines()[-5:]
                    message = f"{name}: bench_service.py failed: {' / '.join(tail)}"
                    say(f"[{host.name}] {message}")
                    entry["services"].append(None)
                    entry["error"] = (entry["error"] + "; " if entry["error"] else "") + message
                    continue
                result = json.loads(buffer.getvalue().decode())
                result["inventory_host"] = host.name
                entry["services"].append(result)
    entry["services"] = [s for s in entry["services"] if s]
    return entry


def write_outputs(fleet: dict, out_dir: Path, command: str, started: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    for host, entry in fleet.items():
        (out_dir / f"{host}.json").write_text(json.dumps(
            {"host": host, "command": command, "started": started, **entry}, indent=1) + "\n")
    plots, note = bench_report.make_plots(fleet, out_dir)
    report = bench_report.render(fleet, command=command, started=started, plots=plots, plot_note=note)
    path = out_dir / "report.md"
    path.write_text(report)
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m llmhost.bench",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("inventory", help="the pyinfra inventory the deploy used (e.g. inventory.py)")
    p.add_argument("--limit", action="append", default=[],
                   help="host name, group or glob (repeatable, or comma-separated), as pyinfra's")
    p.add_argument("--service", action="append", default=[], help="only this service (repeatable)")
    p.add_argument("--out", type=Path, help="output folder (default benchmarks/results/<timestamp>)")
    p.add_argument("--restart", action="store_true",
                   help="measure start-up: restarts each service (and may stop it for llama-bench)")
    p.add_argument("--kv-sweep", action="store_true",
                   help="llama-bench over the guide's K/V pairs the build compiled")
    p.add_argument("--decode-tokens", type=int, default=128, help="tokens per decode request")
    p.add_argument("--parallel", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--rounds", type=int, default=3, help="rounds per measurement (median)")
    p.add_argument("--bench-repetitions", type=int, default=3, help="llama-bench -r")
    p.add_argument("--ceiling-pairs", type=int, default=5,
                   help="served decode and llama-bench tg128 alternated this many times, so drift "
                        "on a shared machine cancels out of their ratio (0: none)")
    p.add_argument("--needle-max", type=int, default=0,
                   help="largest needle haystack in tokens (default: the per-slot context)")
    p.add_argument("--time-budget", type=float, default=3600, help="seconds per service at most")
    p.add_argument("--fail-below", action="store_true",
                   help="exit 3 when any figure is BELOW the guide's")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    enable_output()
    command = "python -m llmhost.bench " + " ".join(map(shlex.quote, sys.argv[1:] if argv is None else argv))
    started_at = datetime.now(timezone.utc)
    started = started_at.isoformat(timespec="seconds")
    out_dir = args.out or Path("benchmarks") / "results" / started_at.strftime("%Y%m%dT%H%M%SZ")
    limit = [part for item in args.limit for part in item.split(",") if part]
    try:
        hosts = load_inventory(args.inventory, limit or None)
    except InventoryError as error:
        say(str(error))
        return 1
    left_alone = [h.name for h in hosts if "llm_services" not in h.data and "llm_gateway" not in h.data]
    if left_alone:
        say(f"left alone (no llm_services, no llm_gateway): {', '.join(left_alone)}")
    fleet: dict = {}
    failed = False
    for host in (h for h in hosts if h.name not in left_alone):
        t = time.monotonic()
        say(f"[{host.name}] connecting")
        try:
            fleet[host.name] = bench_host(host, args)
        except Exception as error:  # one host failing does not stop the others
            say(f"[{host.name}] FAILED: {type(error).__name__}: {error}")
            fleet[host.name] = {"services": [], "error": f"{type(error).__name__}: {error}"}
        failed |= bool(fleet[host.name]["error"])
        say(f"[{host.name}] done in {time.monotonic() - t:.0f} s")
    report = write_outputs(fleet, out_dir, command, started)
    below = [f"{h}/{r['service']['name']}: {row.label}"
             for h, r in bench_report.services(fleet) for row in bench_reference.rows(r)
             if row.verdict == bench_reference.BELOW]
    for line in below:
        say(f"BELOW the guide: {line}")
    say(f"report: {report}")
    if failed:
        return 1
    if below and args.fail_below:
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())

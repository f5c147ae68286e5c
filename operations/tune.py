"""llmhost-tune: each service's flags chosen by measurement on its own host, for its goal,
written as a profile of settings the deploy applies and verify checks.

    llmhost-tune inventory.py [--limit HOST] [--service NAME] [--goal latency|throughput|mix]
                              [--budget-s N] [--out DIR]

For each host (the inventory and group_data/ the deploy used) and each deployed service, uploads
files/tune_service.py (with files/bench_service.py, whose load generator it uses, and
files/gpu_ballast.py for tune.ballast), runs it there with the progress lines printed live:
a bounded search with the pinned build, the service's model and real llama-servers on spare
loopback ports (the unit is never touched), then the chosen flags, the current ones and
llama-server's defaults measured alternated. Writes

  <llm_tuned_dir>/<host>.py          the profile: plain Python data, each value with the
                                     measurement that chose it (commit it to keep it, delete it
                                     to go back to the inventory's values)
  <llm_tuned_dir>/reports/<host>-<time>/report.md (+ <service>.json, PNG plots with matplotlib)

Then `pyinfra inventory.py deploy.py` applies the profile and `llmhost-verify inventory.py`
checks the running services match it. A second tune with nothing changed keeps the profile
unless its new choice is better by more than tune.keep_margin (and says which).
Exit status: 0 every service tuned, 1 a host or service failed, 2 the inventory is unusable.
"""

from __future__ import annotations

import argparse
import io
import json
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from llmhost import data_dir, tune_report, tuned
from llmhost.bench import read_manifest, uploaded
from llmhost.inventory import InventoryError, InventoryHost, enable_output, load_inventory
from llmhost.services import MANIFEST_NAME
from llmhost.settings import HostSettings, ServiceSpec, SettingsError, load_host_settings

FILES = data_dir("files")
HELPERS = (FILES / "tune_service.py", FILES / "bench_service.py", FILES / "gpu_ballast.py")


def say(message: str) -> None:
    print(f"tune: {message}", flush=True)


def helper_args(service: ServiceSpec, args: argparse.Namespace, tmp: str) -> list[str]:
    """tune_service.py's options for one service: its tune settings, the command line's over them."""
    tune = service.tuning
    per_slot = tune.min_ctx or service.ctx_size // service.parallel
    out = ["--goal", args.goal or tune.goal, "--min-tok-s", str(tune.min_tok_s),
           "--min-ctx", str(per_slot), "--slots", *map(str, tune.slots),
           "--kv-pairs", *[f"{k}-{v}" for k, v in tune.kv_pairs],
           "--budget-s", str(args.budget_s or tune.time_budget_s),
           "--keep-margin", str(tune.keep_margin), "--tokens", str(args.tokens),
           "--rounds", str(args.rounds), "--compare-rounds", str(args.compare_rounds)]
    if tune.memory_budget_mib:
        out += ["--memory-budget-mib", str(tune.memory_budget_mib)]
        if tune.ballast:
            out += ["--ballast", f"{tmp}/gpu_ballast.py"]
    return out


def stated(service: ServiceSpec, args: argparse.Namespace) -> str:
    """The search's terms, said before it starts."""
    tune = service.tuning
    goal = args.goal or tune.goal
    per_slot = tune.min_ctx or service.ctx_size // service.parallel
    terms = {"latency": "the fastest single request",
             "throughput": f"the best aggregate with every request >= {tune.min_tok_s:g} tok/s",
             "mix": f"the most slots each keeping half the single-request decode and >= "
                    f"{tune.min_tok_s:g} tok/s"}[goal]
    memory = f", GPU memory budget {tune.memory_budget_mib} MiB" if tune.memory_budget_mib else ""
    ballast = " (held by the ballast)" if tune.memory_budget_mib and tune.ballast else ""
    return (f"goal {goal}: {terms}, {per_slot} tokens of context each, slots {list(tune.slots)}"
            f"{memory}{ballast}; time budget {args.budget_s or tune.time_budget_s} s")


def tune_host(host: InventoryHost, args: argparse.Namespace, stamp: str) -> dict:
    """Every chosen service of one host: {"services": {name: result}, "error": str | None,
    "settings": HostSettings}."""
    settings = load_host_settings(host.name, host.data)
    entry: dict = {"services": {}, "error": None, "settings": settings}
    with host:
        manifest = read_manifest(host, settings.config_dir)
        names = [s.name for s in manifest.services]
        if args.service:
            missing = [n for n in args.service if n not in names]
            if missing:
                raise RuntimeError(f"service(s) {', '.join(missing)} not deployed here; the manifest "
                                   f"lists {', '.join(names) or 'none'}")
            names = [n for n in names if n in args.service]
        specs = {s.name: s for s in settings.services}
        with uploaded(host, *HELPERS, prefix="llmhost-tune") as tmp:
            for name in names:
                spec = specs.get(name)
                if spec is None:
                    entry["error"] = f"{name}: deployed, but no longer in llm_services"
                    continue
                budget = args.budget_s or spec.tuning.time_budget_s
                say(f"[{host.name}] {name}: {stated(spec, args)}")
                out = f"{tmp}/{name}.json"
                command = " ".join(map(shlex.quote, [
                    "python3", f"{tmp}/tune_service.py", "--manifest",
                    f"{settings.config_dir}/{MANIFEST_NAME}", "--service", name, "--out", out,
                    *helper_args(spec, args, tmp)]))
                started = time.monotonic()
                ok, stdout, stderr = host.run(command, print_output=True, timeout=int(budget) + 300)
                buffer = io.BytesIO()
                if not ok or not host.get(out, buffer):
                    tail = (stderr or stdout).strip().splitlines()[-5:]
                    message = f"{name}: tune_service.py failed: {' / '.join(tail)}"
                    say(f"[{host.name}] {message}")
                    entry["error"] = (entry["error"] + "; " if entry["error"] else "") + message
                    continue
                result = json.loads(buffer.getvalue().decode())
                result["wall_s"] = round(time.monotonic() - started, 1)
                say(f"[{host.name}] {name}: searched in {result['seconds']:.0f} s of its "
                    f"{budget} s budget")
                if result.get("errors"):
                    entry["error"] = "; ".join(f"{name}: {e['error']}" for e in result["errors"])
                entry["services"][name] = result
    return entry


def profile_entries(host: str, settings: HostSettings, results: dict, stamp: str,
                    existing: dict | None) -> tuple[dict, dict, list[str]]:
    """The host's profile after this run: entries by service, notes by service, and one line
    per service saying what changed. A service not tuned now keeps its entry; one whose
    proposal is the same settings keeps its entry whole (name, date)."""
    services = {s.name: s for s in settings.services}
    entries = {name: e for name, e in (existing or {}).items() if name in services}
    notes: dict[str, dict[str, str]] = {}
    lines = []
    for name, result in results.items():
        proposal = result.get("proposal")
        if not proposal:
            lines.append(f"{name}: no proposal (the search failed); its profile entry is unchanged")
            continue
        chosen = result["chosen"]
        notes[name] = dict(chosen.get("notes") or {})
        old = entries.get(name)
        settings_now = proposal["settings"]
        if old and old.get("settings") == settings_now:
            lines.append(f"{name}: the same settings as its profile {old['profile']} "
                         f"({proposal['reason']})")
            notes[name] = {k: f"kept: {proposal['reason']}" for k in settings_now} \
                if proposal["keep_current"] else notes[name]
            continue
        if proposal["keep_current"]:
            notes[name] = {k: f"the current value, kept: {proposal['reason']}" for k in settings_now}
        goal = result["goal"]
        entries[name] = {"profile": f"{name}-{goal}-{stamp}", "date": result["started"],
                         "build_commit": result["build"]["commit"],
                         "model_sha256": result["model"]["sha256"], "goal": goal,
                         "settings": settings_now}
        before = (old or {}).get("settings")
        lines.append(f"{name}: {'kept the current flags' if proposal['keep_current'] else 'new'} "
                     f"{settings_now}" + (f" (was {before})" if before else "")
                     + f": {proposal['reason']}")
    return entries, notes, lines


def write_profile(host: str, settings: HostSettings, results: dict, stamp: str) -> tuple[Path, list[str]]:
    path = tuned.profile_path(settings.tuned_dir, host)
    existing, problems = tuned.read(path)
    if problems:
        raise RuntimeError("; ".join(problems))
    entries, notes, lines = profile_entries(host, settings, results, stamp, existing)
    # Entries this run did not touch keep their comments only in git history: say so once.
    preamble = [f"Last run: llmhost-tune, {stamp}; the report is in reports/{host}-{stamp}/.",
                "Applied by `pyinfra inventory.py deploy.py`, checked by `llmhost-verify inventory.py`."]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tuned.render(host, entries, notes, preamble))
    return path, lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="llmhost-tune", description=__doc__.split("\n\n")[0])
    p.add_argument("inventory", help="the pyinfra inventory the deploy used (e.g. inventory.py)")
    p.add_argument("--limit", action="append", default=[],
                   help="host name, group or glob (repeatable, or comma-separated), as pyinfra's")
    p.add_argument("--service", action="append", default=[], help="only this service (repeatable)")
    p.add_argument("--goal", choices=("latency", "throughput", "mix"),
                   help="over each service's tune.goal")
    p.add_argument("--budget-s", type=int, help="seconds per service, over tune.time_budget_s")
    p.add_argument("--out", type=Path, help="report folder (default <llm_tuned_dir>/reports/<host>-<time>)")
    p.add_argument("--tokens", type=int, default=64, help="tokens per decode request")
    p.add_argument("--rounds", type=int, default=2, help="alternated rounds per search stage")
    p.add_argument("--compare-rounds", type=int, default=3,
                   help="alternated rounds of chosen / current / defaults")
    args = p.parse_args(argv)
    if args.budget_s is not None and not 30 <= args.budget_s <= 86400:
        p.error(f"--budget-s: found {args.budget_s}, expected 30 to 86400 seconds")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    enable_output()
    started_at = datetime.now(timezone.utc)
    stamp = started_at.strftime("%Y%m%dT%H%M%SZ")
    command = "llmhost-tune " + " ".join(map(shlex.quote, sys.argv[1:] if argv is None else argv))
    limit = [part for item in args.limit for part in item.split(",") if part]
    try:
        hosts = load_inventory(args.inventory, limit or None)
    except InventoryError as error:
        say(str(error))
        return 2
    hosts = [h for h in hosts if "llm_services" in h.data]
    if not hosts:
        say("no host with llm_services in the inventory (within --limit)")
        return 2
    failed = False
    for host in hosts:
        t = time.monotonic()
        say(f"[{host.name}] connecting")
        try:
            entry = tune_host(host, args, stamp)
        except (SettingsError, RuntimeError, OSError) as error:
            say(f"[{host.name}] FAILED: {error}")
            failed = True
            continue
        failed |= bool(entry["error"])
        if not entry["services"]:
            continue
        settings = entry["settings"]
        profile, lines = write_profile(host.name, settings, entry["services"], stamp)
        out = args.out or Path(settings.tuned_dir) / "reports" / f"{host.name}-{stamp}"
        report = tune_report.write(out, host.name, entry["services"], command, profile)
        for line in lines:
            say(f"[{host.name}] {line}")
        say(f"[{host.name}] profile: {profile}; report: {report}; done in {time.monotonic() - t:.0f} s")
        say(f"[{host.name}] keep it: commit {profile} and run `pyinfra {args.inventory} deploy.py` "
            f"then `llmhost-verify {args.inventory}`; discard it: delete {profile}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

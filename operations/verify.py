"""Run the host suite (tests/host) against every host of a pyinfra inventory.

    llmhost-verify inventory.py [--limit HOST[,GROUP...]] [--jobs N] [-- PYTEST ARGS]
    (or python -m llmhost.verify ...)

Reads the inventory and group_data/ exactly as `pyinfra inventory.py deploy.py` does
(operations/inventory.py), builds each host's SSH connection from its data (ssh_hostname,
ssh_port, ssh_user, ssh_key; `@local` hosts run locally), and runs one
`pytest tests/host` per host with pytest-testinfra, hosts in parallel. Each host's pytest output
is printed as one block, then a summary names, per host, every failed check with its message
and every skipped check with its reason. Exit code: 0 when every host passed, 1 when any host
failed (or could not be reached), 2 when the inventory could not be read.

Plain `pytest tests/host --hosts=ssh://root@gpu1 [--ssh-config=FILE]` keeps working.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from llmhost import data_dir
from llmhost.inventory import load_inventory, missing_ssh_key
from llmhost.settings import manifest_path

SUITE = data_dir("hostsuite")
PER_HOST_TIMEOUT = 900


@dataclass
class Target:
    """How testinfra reaches one inventory host."""

    name: str
    url: str  # testinfra --hosts value
    ssh_config: str | None = None  # the Host block for this host (ssh only)
    sudo: bool = False
    manifest: str = manifest_path({})  # the deploy's llm_config_dir on this host
    problem: str | None = None  # why this host cannot be verified (then it fails)


@dataclass
class Check:
    name: str
    outcome: str  # passed, failed, error, skipped
    message: str = ""


@dataclass
class HostResult:
    name: str
    returncode: int
    output: str
    seconds: float
    checks: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.returncode == 0 and not any(c.outcome in ("failed", "error") for c in self.checks)

    def count(self, outcome: str) -> int:
        return sum(c.outcome == outcome for c in self.checks)


def _ssh_value(value) -> str:
    text = str(value)
    if any(c in text for c in "\n\r"):
        raise ValueError(f"invalid value {text!r}")
    return f'"{text}"' if " " in text else text


def target_for(index: int, name: str, data: dict) -> Target:
    """The testinfra URL (and ssh_config block) for a host, from its pyinfra data."""
    if name == "@local" or name.startswith("@local"):
        return Target(name, "local://", sudo=bool(data.get("_sudo")), manifest=manifest_path(data))
    if name.startswith("@docker/"):
        return Target(name, f"docker://{name.split('/', 1)[1]}", sudo=bool(data.get("_sudo")),
                      manifest=manifest_path(data))
    if name.startswith("@"):
        return Target(name, "", problem=f"connector {name.split('/')[0]} is not supported by "
                                            f"verify; run pytest tests/host --hosts=... by hand")
    missing = missing_ssh_key(name, data)
    if missing:
        return Target(name, "", problem=missing)
    if data.get("ssh_password") and not data.get("ssh_key"):
        return Target(name, "", problem="ssh_password is set and no ssh_key: testinfra's ssh "
                                        "backend needs key (or agent) authentication")
    alias = f"llmhost-verify-{index}"
    lines = [f"Host {alias}", f"  HostName {_ssh_value(data.get('ssh_hostname') or name)}"]
    if data.get("ssh_port"):
        lines.append(f"  Port {int(data['ssh_port'])}")
    if data.get("ssh_user"):
        lines.append(f"  User {_ssh_value(data['ssh_user'])}")
    if data.get("ssh_key"):
        # pytest runs from the repository root: a relative key path is the user's, made absolute.
        lines.append(f"  IdentityFile {_ssh_value(os.path.abspath(os.path.expanduser(data['ssh_key'])))}")
        lines.append("  IdentitiesOnly yes")
    # testinfra 10.2 needs these in an ssh_config; --ssh-extra-args alone still failed
    # host-key verification. Verification reads, it never trusts a new key for later use.
    lines += ["  StrictHostKeyChecking no", "  UserKnownHostsFile /dev/null", "  LogLevel ERROR",
              "  ConnectTimeout 15", "  ServerAliveInterval 15", "  BatchMode yes"]
    # testinfra's ssh backend runs OpenSSH's client; without one (minimal images) its paramiko
    # backend reads the same ssh_config block.
    backend = "ssh" if shutil.which("ssh") else "paramiko"
    return Target(name, f"{backend}://{alias}", ssh_config="\n".join(lines) + "\n",
                  sudo=bool(data.get("_sudo")), manifest=manifest_path(data))


def _message(element: ET.Element) -> str:
    """The assertion's own message (each check names the service and the problem)."""
    text = element.get("message") or element.text or ""
    text = text.removeprefix("AssertionError: ").removeprefix("Failed: ")
    text = text.split("\nassert ")[0]
    return text.strip()


def parse_junit(path: Path) -> list[Check]:
    if not path.exists() or path.stat().st_size == 0:
        return []
    checks = []
    for case in ET.parse(path).getroot().iter("testcase"):
        name = case.get("name", "?").split("[", 1)[0]
        for outcome in ("failure", "error", "skipped"):
            element = case.find(outcome)
            if element is not None:
                message = _message(element)
                if outcome == "skipped":
                    message = message.removeprefix("Skipped: ")
                checks.append(Check(name, {"failure": "failed"}.get(outcome, outcome), message))
                break
        else:
            checks.append(Check(name, "passed"))
    return checks


def run_host(target: Target, workdir: Path, suite: Path, extra: list[str],
             timeout: float = PER_HOST_TIMEOUT) -> HostResult:
    started = time.monotonic()
    if target.problem:
        return HostResult(target.name, 1, "", 0.0, [Check("connection", "error", target.problem)])
    junit = workdir / f"{target.url.replace('/', '_').replace(':', '_')}-{id(target)}.xml"
    cmd = [sys.executable, "-m", "pytest", str(suite), f"--rootdir={suite}", "-p", "no:cacheprovider", "-rfEs",
           "--color=no", f"--hosts={target.url}", f"--junitxml={junit}",
           f"--llmhost-manifest={target.manifest}"]
    if target.ssh_config:
        config = workdir / f"ssh_config-{junit.stem}"
        config.write_text(target.ssh_config)
        cmd.append(f"--ssh-config={config}")
    if target.sudo:
        cmd.append("--sudo")
    cmd += extra
    try:
        # From the work folder: the caller's own pytest configuration must not apply to the suite.
        result = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=timeout,
                                stdin=subprocess.DEVNULL)
        code, output = result.returncode, result.stdout + result.stderr
    except subprocess.TimeoutExpired as e:
        code = 124
        output = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        output += f"\npytest did not finish within {timeout:.0f}s"
    checks = parse_junit(junit)
    if code and not any(c.outcome in ("failed", "error") for c in checks):
        # pytest itself failed (unreachable host in a fixture, usage error, timeout): say why.
        tail = [line for line in output.strip().splitlines() if line.strip()][-3:]
        checks.append(Check("pytest", "error", f"pytest exited {code}: " + " | ".join(tail)))
    return HostResult(target.name, code, output, time.monotonic() - started, checks)


def _unreachable(bad: list[Check]) -> str | None:
    """The SSH error when every check failed the same way reaching the host (ssh exits 255)."""
    if not bad or not all(c.outcome == "error" and "exit_status=255" in c.message for c in bad):
        return None
    match = re.search(r"_stderr=b'(.*?)'\)", bad[0].message)
    return (match.group(1).replace("\\r", "").replace("\\n", " ").strip() if match
            else "ssh exited 255")


def summary(results: list[HostResult]) -> str:
    lines = ["", "== llmhost verify: per-host summary =="]
    for r in results:
        verdict = "PASSED" if r.passed else "FAILED"
        lines.append(f"{r.name}: {verdict} ({r.count('passed')} passed, {r.count('failed')} failed, "
                     f"{r.count('error')} errors, {r.count('skipped')} skipped) in {r.seconds:.1f}s")
        bad = [c for c in r.checks if c.outcome in ("failed", "error")]
        unreachable = _unreachable(bad)
        if unreachable:
            lines.append(f"  UNREACHABLE: {unreachable} (all {len(bad)} checks errored)")
            bad = []
        for c in bad:
            first, *rest = (c.message or "(no message)").splitlines() or ["(no message)"]
            lines.append(f"  {c.outcome.upper()} {c.name}: {first}")
            lines += [f"      {line}" for line in rest[:12]]
        for c in r.checks:
            if c.outcome == "skipped":
                lines.append(f"  skipped {c.name}: {c.message}")
    failed = [r.name for r in results if not r.passed]
    lines.append(f"{len(results) - len(failed)} of {len(results)} hosts passed"
                 + (f"; failed: {', '.join(failed)}" if failed else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(
        prog="llmhost-verify",
        description="Run tests/host against every host of a pyinfra inventory, one pytest per "
                    "host, in parallel. Arguments after -- go to pytest.")
    parser.add_argument("inventory", help="the pyinfra inventory file the deploy used")
    parser.add_argument("--limit", action="append", default=[],
                        help="host name, glob or group (as pyinfra's --limit); repeatable or comma-separated")
    parser.add_argument("--jobs", type=int, default=0, help="hosts verified at once (default: all)")
    parser.add_argument("--suite", default=str(SUITE), help="the host suite (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=PER_HOST_TIMEOUT,
                        help="seconds one host's pytest may take (default: %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="print only the summary")
    args = parser.parse_args(argv)

    suite = Path(args.suite)
    if not (suite / "conftest.py").exists():
        print(f"verify: the host suite {suite} is missing (reinstall llmhost)",
              file=sys.stderr)
        return 2
    limit = [part for item in args.limit for part in item.split(",") if part]
    try:
        hosts = load_inventory(args.inventory, limit=limit or None)
    except Exception as error:  # InventoryError, or pyinfra's own errors for a bad file
        print(f"verify: cannot load inventory {args.inventory}: {error}", file=sys.stderr)
        return 2
    if not hosts:
        print(f"verify: inventory {args.inventory} has no hosts", file=sys.stderr)
        return 2
    # As the deploy does: a host with neither services nor a gateway (a web server, a database
    # in the same inventory) is not ours to check.
    left_alone = [h.name for h in hosts if "llm_services" not in h.data and "llm_gateway" not in h.data]
    if left_alone:
        print(f"verify: left alone (no llm_services, no llm_gateway): {', '.join(left_alone)}")
        hosts = [h for h in hosts if h.name not in left_alone]
        if not hosts:
            return 0
    targets = []
    for index, h in enumerate(hosts):
        try:
            targets.append(target_for(index, h.name, h.data))
        except ValueError as error:
            targets.append(Target(h.name, "", problem=f"bad connection data: {error}"))

    print(f"verify: {len(targets)} host(s): {', '.join(t.name for t in targets)}", flush=True)
    with tempfile.TemporaryDirectory(prefix="llmhost-verify-") as tmp:
        workdir = Path(tmp)
        with ThreadPoolExecutor(max_workers=args.jobs or len(targets)) as pool:
            futures = [pool.submit(run_host, t, workdir, suite, extra, args.timeout) for t in targets]
            results = []
            for target, future in zip(targets, futures):
                result = future.result()
                results.append(result)
                if not args.quiet:
                    print(f"\n===== {target.name} ({target.url or 'not verifiable'}) =====")
                    print(result.output.rstrip() or "(no pytest output)", flush=True)
    print(summary(results), flush=True)
    return 0 if all(r.passed for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Run the host suite (tests/host) against every host of a pyinfra inventory.

    llmhost-verify inventory.py [--limit HOST[,GROUP...]] [--jobs N] [-- PYTEST ARGS]
    (or python -m llmhost.verify ...)

Reads the inventory and group_data/ exactly as `pyinfra inventory.py deploy.py` does
(operations/inventory.py), builds each host's SSH connection from its data (ssh_hostname,
ssh_port, ssh_user, ssh_key; host keys checked as ssh_strict_host_key_checking and
ssh_known_hosts_file say; `_sudo`, with `_sudo_password` where sudo asks for one; `@local` hosts
run locally), and runs one `pytest tests/host` per host with pytest-testinfra, hosts in
parallel. Each host's pytest output is printed as one block, then a summary names, per host,
every failed check with its message and every skipped check with its reason. Exit code: 0 when
every host passed, 1 when any host failed (or could not be reached), 2 when the inventory could
not be read.

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

from llmhost import data_dir, passwordsudo
from llmhost.inventory import load_inventory, missing_ssh_key
from llmhost.settings import manifest_path

SUITE = data_dir("hostsuite")
PER_HOST_TIMEOUT = 900
# pyinfra 3.10's values of ssh_strict_host_key_checking (connectors/sshuserclient/client.py,
# get_missing_host_key_policy) and what verify does for each. The default is "yes" where
# pyinfra's is "accept-new": the deploy, run first, has recorded each host's key, and verify
# names a host it has no key for instead of trusting it. "ask" cannot ask here: "yes".
HOST_KEY_CHECKING = {"yes": "yes", "ask": "yes", "accept-new": "accept-new", "no": "off", "off": "off"}
DEFAULT_KNOWN_HOSTS = "~/.ssh/known_hosts"  # pyinfra's, when ssh_known_hosts_file is unset


@dataclass
class Target:
    """How testinfra reaches one inventory host."""

    name: str
    url: str  # testinfra --hosts value
    ssh_config: str | None = None  # the Host block for this host (ssh only)
    sudo: bool = False
    # _sudo_password, given to pytest through a pipe (llmhost.passwordsudo); never printed.
    sudo_password: passwordsudo.Secret | None = field(default=None, repr=False)
    known_hosts: str | None = None  # the file host keys are checked against (ssh only)
    manifest: str = manifest_path({})  # the deploy's llm_config_dir on this host
    problem: str | None = None  # why this host cannot be verified (then it fails)


@dataclass
class Check:
    name: str
    outcome: str  # passed, failed, error, skipped
    message: str = ""
    report: str = ""  # the whole report of a failure or error (pytest cuts junit's message short)


@dataclass
class HostResult:
    name: str
    returncode: int
    output: str
    seconds: float
    checks: list[Check] = field(default_factory=list)
    known_hosts: str | None = None

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


def _ssh_path(path: str) -> str:
    """A controller path for ssh_config: absolute (pytest runs in verify's work folder), with
    '%' kept literal (OpenSSH expands %-tokens in these options)."""
    return _ssh_value(os.path.abspath(os.path.expanduser(str(path))).replace("%", "%%"))


def host_key_checking(name: str, data: dict) -> str:
    """'yes', 'accept-new' or 'off', from the host's ssh_strict_host_key_checking (ValueError:
    a value pyinfra would refuse too)."""
    value = data.get("ssh_strict_host_key_checking")
    if value is None:
        value = "yes"
    mode = HOST_KEY_CHECKING.get(value, "") if isinstance(value, str) else ""
    if not mode:
        raise ValueError(f"host {name}: ssh_strict_host_key_checking: found {value!r}; expected "
                         f"'yes' (verify's default), 'accept-new', 'no' or 'off' (as pyinfra)")
    return mode


def host_key_lines(mode: str, known_hosts: str) -> list[str]:
    """ssh_config lines that check the host's key against ``known_hosts`` as pyinfra does."""
    known = _ssh_path(known_hosts)
    if mode == "off":
        # pyinfra's "off" takes a key it has none for without saving it, and still refuses one
        # that differs from the key the file holds (paramiko raises BadHostKeyException whatever
        # the policy); OpenSSH's "no" would let a changed key through. So: accept-new, whose new
        # keys go to the first file, /dev/null, while the real file is still read.
        lines = ["StrictHostKeyChecking accept-new", f"UserKnownHostsFile /dev/null {known}"]
    else:
        lines = [f"StrictHostKeyChecking {mode}", f"UserKnownHostsFile {known}"]
    # Only that file, as pyinfra reads only it; and verify never rewrites it beyond accept-new.
    return lines + ["GlobalKnownHostsFile /dev/null", "UpdateHostKeys no"]


def _sudo_password(name: str, data: dict) -> passwordsudo.Secret | None:
    """The host's _sudo_password where sudo is on (as pyinfra: an empty one is none)."""
    value = data.get("_sudo_password")
    if not data.get("_sudo") or not value:
        return None
    why = passwordsudo.problem(value)
    if why:
        raise ValueError(f"host {name}: _sudo_password: {why}")  # never the value itself
    return passwordsudo.Secret(value)


def target_for(index: int, name: str, data: dict) -> Target:
    """The testinfra URL (and ssh_config block) for a host, from its pyinfra data."""
    try:
        password = _sudo_password(name, data)
    except ValueError as error:
        return Target(name, "", problem=str(error))
    sudo = bool(data.get("_sudo"))
    if name == "@local" or name.startswith("@local"):
        return Target(name, "local://", sudo=sudo, sudo_password=password, manifest=manifest_path(data))
    if name.startswith("@docker/"):
        if password:
            return Target(name, "", problem="_sudo_password: testinfra's docker backend cannot give "
                                            "sudo its password; use passwordless sudo in the container")
        return Target(name, f"docker://{name.split('/', 1)[1]}", sudo=sudo, manifest=manifest_path(data))
    if name.startswith("@"):
        return Target(name, "", problem=f"connector {name.split('/')[0]} is not supported by "
                                            f"verify; run pytest tests/host --hosts=... by hand")
    missing = missing_ssh_key(name, data)
    if missing:
        return Target(name, "", problem=missing)
    if data.get("ssh_password") and not data.get("ssh_key"):
        return Target(name, "", problem="ssh_password is set and no ssh_key: testinfra's ssh "
                                        "backend needs key (or agent) authentication")
    try:
        checking = host_key_checking(name, data)
    except ValueError as error:
        return Target(name, "", problem=str(error))
    known_hosts = os.path.abspath(os.path.expanduser(data.get("ssh_known_hosts_file")
                                                     or DEFAULT_KNOWN_HOSTS))
    # testinfra's ssh backend runs OpenSSH's client; without one (minimal images) its paramiko
    # backend reads the same ssh_config block, but checks no known_hosts file and cannot give
    # sudo a password: only for hosts that need neither.
    backend = "ssh" if shutil.which("ssh") else "paramiko"
    if backend == "paramiko" and (password or checking != "off"):
        return Target(name, "", problem="OpenSSH's ssh client is not on this controller (install "
                                        "openssh-client): testinfra's paramiko backend checks no "
                                        "host keys and cannot give sudo a password; only hosts with "
                                        "ssh_strict_host_key_checking off and no _sudo_password can "
                                        "go without it")
    alias = f"llmhost-verify-{index}"
    lines = [f"Host {alias}", f"  HostName {_ssh_value(data.get('ssh_hostname') or name)}"]
    if data.get("ssh_port"):
        lines.append(f"  Port {int(data['ssh_port'])}")
    if data.get("ssh_user"):
        lines.append(f"  User {_ssh_value(data['ssh_user'])}")
    if data.get("ssh_key"):
        # pytest runs from verify's work folder: a relative key path is the user's, made absolute.
        lines.append(f"  IdentityFile {_ssh_path(data['ssh_key'])}")
        lines.append("  IdentitiesOnly yes")
    # In an ssh_config, as testinfra 10.2 needs (--ssh-extra-args alone did not reach host-key
    # checking). BatchMode: never a prompt (the stdin of a password-sudo host's ssh is sudo's).
    lines += [f"  {line}" for line in host_key_lines(checking, known_hosts)]
    lines += ["  LogLevel ERROR", "  ConnectTimeout 15", "  ServerAliveInterval 15", "  BatchMode yes"]
    return Target(name, f"{backend}://{alias}", ssh_config="\n".join(lines) + "\n", sudo=sudo,
                  sudo_password=password, manifest=manifest_path(data), known_hosts=known_hosts)


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
                checks.append(Check(name, {"failure": "failed"}.get(outcome, outcome), message,
                                    element.text or ""))
                break
        else:
            checks.append(Check(name, "passed"))
    return checks


def _close(fd: int) -> None:
    # Not os.close: pyinfra's CLI module patches it with gevent's, which defers closing a pipe to
    # an event loop that never runs in verify's threads (the descriptor stayed open).
    os.closerange(fd, fd + 1)


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
    password_fd, pass_fds = None, ()
    if target.sudo_password is not None:
        # A pipe pytest inherits, filled and closed on this side before it starts (one line,
        # well under the pipe's buffer): only its number is on pytest's argv.
        password_fd, write_end = os.pipe()
        os.write(write_end, target.sudo_password.line())
        _close(write_end)
        cmd.append(f"{passwordsudo.OPTION}={password_fd}")
        pass_fds = (password_fd,)
    cmd += extra
    try:
        # From the work folder: the caller's own pytest configuration must not apply to the suite.
        result = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=timeout,
                                stdin=subprocess.DEVNULL, pass_fds=pass_fds)
        code, output = result.returncode, result.stdout + result.stderr
    except subprocess.TimeoutExpired as e:
        code = 124
        output = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        output += f"\npytest did not finish within {timeout:.0f}s"
    finally:
        if password_fd is not None:
            _close(password_fd)
    checks = parse_junit(junit)
    if code and not any(c.outcome in ("failed", "error") for c in checks):
        # pytest itself failed (unreachable host in a fixture, usage error, timeout): say why.
        tail = [line for line in output.strip().splitlines() if line.strip()][-3:]
        checks.append(Check("pytest", "error", f"pytest exited {code}: " + " | ".join(tail)))
    return HostResult(target.name, code, output, time.monotonic() - started, checks, target.known_hosts)


def _unreachable(bad: list[Check], known_hosts: str | None = None) -> str | None:
    """One line for a host no check could reach (every check failed on ssh's exit 255): a host
    key that differs from the known one or is not known, else ssh's own error."""
    if not bad or not all(c.outcome == "error" and "exit_status=255" in c.message for c in bad):
        return None
    message = bad[0].report or bad[0].message  # a changed key's warning is longer than the message
    match = re.search(r"_stderr=b(['\"])(.*?)\1\)", message)
    stderr = match.group(2).replace("\\r", "").replace("\\n", " ").strip() if match else "ssh exited 255"
    where = known_hosts or "the known_hosts file"
    changed = re.search(r"Host key for (\S+) has changed", message)
    if "REMOTE HOST IDENTIFICATION HAS CHANGED" in message or changed:
        entry = changed.group(1) if changed else "the host"
        return (f"HOST KEY MISMATCH: {entry} sent a different key than {where} holds for it, so no "
                f"check ran. If the host was reinstalled, remove the old key (ssh-keygen -f "
                f"{where} -R '{entry}') and verify again; if not, the connection may be intercepted")
    unknown = re.search(r"No (\S+) host key is known for (\S+)", message)
    if unknown:
        return (f"HOST KEY UNKNOWN: {where} holds no {unknown.group(1)} key for {unknown.group(2)} and "
                f"ssh_strict_host_key_checking is yes (verify's default), so no check ran: deploy "
                f"first (pyinfra records the key), add it to the file, or set accept-new")
    return f"UNREACHABLE: {stderr}"


def summary(results: list[HostResult]) -> str:
    lines = ["", "== llmhost verify: per-host summary =="]
    for r in results:
        verdict = "PASSED" if r.passed else "FAILED"
        lines.append(f"{r.name}: {verdict} ({r.count('passed')} passed, {r.count('failed')} failed, "
                     f"{r.count('error')} errors, {r.count('skipped')} skipped) in {r.seconds:.1f}s")
        bad = [c for c in r.checks if c.outcome in ("failed", "error")]
        unreachable = _unreachable(bad, r.known_hosts)
        if unreachable:
            lines.append(f"  {unreachable} (all {len(bad)} checks errored)")
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

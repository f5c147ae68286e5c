"""Looking for a secret where it must not be: argv of running processes, files, a host's journal,
and the command strings a login user's SSH sessions ran. Every search takes the secret on stdin
or in memory, never on a command line of its own."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from tests.support.sandbox import SandboxHost

LOGIN_RECORD = "/var/log/llmhost-test-login-commands"


class Watch:
    """While open, looks every ``interval`` seconds through the argv of every process this
    machine's PID namespace shows (the sandbox hosts' processes included) and through the files
    under ``folders``, for ``secret``. A sampler: it can miss a process that lives for less than
    one sweep, it cannot report one that never held the secret. ``hits`` names what held it."""

    def __init__(self, secret: str, folders: tuple[Path, ...] = (), interval: float = 0.02):
        self.secret = secret.encode()
        self.folders = folders
        self.interval = interval
        self.hits: set[str] = set()
        self.sweeps = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "Watch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sweep()  # what the last moments left behind

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sweep()
            self._stop.wait(self.interval)

    def _sweep(self) -> None:
        self.sweeps += 1
        for pid in os.listdir("/proc"):
            if pid.isdigit() and self.secret in _read(f"/proc/{pid}/cmdline"):
                self.hits.add(f"argv of pid {pid}: {_read(f'/proc/{pid}/comm').strip().decode()}")
        for folder in self.folders:
            for path in folder.rglob("*"):
                if path.is_file() and not path.is_symlink() and self.secret in _read(path):
                    self.hits.add(f"file {path}")


def _read(path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def files_holding(host: SandboxHost, secret: str, *folders: str) -> list[str]:
    """Files under ``folders`` on the host that contain ``secret`` (grep reads it from stdin)."""
    result = host.exec("grep", "-rlF", "-D", "skip", "-f", "-", *folders, input=secret + "\n",
                       check=False, timeout=120)
    if result.returncode not in (0, 1):
        raise RuntimeError(f"{host.name}: grep over {folders} failed: {result.stderr[-2000:]}")
    return result.stdout.split()


def journal(host: SandboxHost) -> str:
    """The host's whole journal, every field (command lines of the logging processes included)."""
    return host.exec("journalctl", "--no-pager", "-o", "json", timeout=120).stdout


def record_login_commands(host: SandboxHost) -> None:
    """From now on, append each command string the host's login user's SSH sessions run to
    LOGIN_RECORD (sshd runs `<login shell> -c <string>`: the argv every remote command starts
    from), through a login shell that records, then execs bash."""
    shell = host.root / "usr/local/bin/llmhost-test-recording-shell"
    shell.write_text('#!/bin/sh\nprintf "%s\\n" "$*" >> ' + LOGIN_RECORD + '\nexec /bin/bash "$@"\n')
    shell.chmod(0o755)
    user = host.login_user
    host.exec("sh", "-c", f"install -m 600 -o {user} /dev/null {LOGIN_RECORD} && "
                          f"usermod -s /usr/local/bin/llmhost-test-recording-shell {user}")


def login_commands(host: SandboxHost) -> str:
    return host.exec("cat", LOGIN_RECORD).stdout


"""sudo that asks for a password, for the host suite (testinfra) without a terminal.

verify gives the host's `_sudo_password` (inventory data, as pyinfra reads it) to the suite's
pytest through an inherited pipe: only the pipe's number is on argv
(`--llmhost-sudo-password-fd=N`). By hand, any readable descriptor works:

    pytest <site-packages>/llmhost/hostsuite --hosts=ssh://gpu1 --sudo \\
        --llmhost-sudo-password-fd=3 3< <(pass show gpu1/sudo)

Why this is safe, against what pyinfra 3.10 does: pyinfra (connectors/util.py,
make_unix_command) writes an askpass script to the host's temp folder and runs
`env SUDO_ASKPASS=<script> PYINFRA_SUDO_PASSWORD=<password> sudo -H -A -k sh -c '...'`: the password
is part of the command string, so it is in the argv of the host's login shell (sshd runs
`$SHELL -c <string>`) and of `env`, readable by every local user in /proc/<pid>/cmdline while
they run (recorded in tests/e2e/test_operator_paths.py). Here it only ever moves through pipes:
pytest holds it in memory, writes it as one line to the stdin of each `ssh` (or local) command,
ssh carries it over the encrypted channel, and the host runs

    sudo -S -p '' -k /bin/sh -c 'exec </dev/null
    <command>'

- `-S`: sudo reads the password from its stdin: no terminal, no askpass file, nothing on disk.
- `-p ''`: no prompt text in the output.
- `-k`: cached credentials are ignored and none are written: sudo asks (and reads the line)
  every time, and verify leaves no sudo timestamp that another process of the login user could
  ride on (pyinfra passes -k for the same reason).
- `exec </dev/null` first in the root shell: where sudo did not read the line (a NOPASSWD rule,
  a policy that needs no password) it is still waiting on stdin; no command ever reads it.
No command string holds the password, so no argv (ssh's here, the login shell's, sudo's and
sh's there), no sudo journal line and no file does. It stays out of pytest's output too: the
value prints as '***' and `--showlocals` is turned off.
"""

from __future__ import annotations

import os
import subprocess
from typing import Any

OPTION = "--llmhost-sudo-password-fd"


class Secret:
    """A password that prints as '***' (repr, str, pytest's assertion and traceback output)."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def line(self) -> bytes:
        """The password as sudo -S reads it: one line."""
        return self._value.encode() + b"\n"


def problem(value: Any) -> str | None:
    """Why ``value`` cannot be a sudo password read as one line, or None."""
    if not isinstance(value, str) or not value:
        return f"found a {type(value).__name__}; expected a non-empty string"
    if any(c in value for c in "\r\n\0"):
        return "found a line break or NUL in it; sudo reads the password as one line"
    return None


def read_fd(fd: int) -> Secret:
    """The password written to descriptor ``fd`` (one trailing newline dropped), which is closed."""
    with os.fdopen(fd, "rb") as pipe:
        value = pipe.read().decode()
    value = value[:-1] if value.endswith("\n") else value
    why = problem(value)
    if why:
        raise ValueError(why)
    return Secret(value)


class PasswordSudo:
    """Mixed into a testinfra backend whose commands go through run_local (ssh, local): sudo
    reads the password from stdin (see the module docstring)."""

    sudo_password: Secret

    def get_sudo_command(self, command: str, sudo_user: str | None) -> str:
        guarded = "exec </dev/null\n" + command
        if sudo_user is None:
            return self.quote("sudo -S -p '' -k /bin/sh -c %s", guarded)  # type: ignore[attr-defined]
        return self.quote("sudo -S -p '' -k -u %s /bin/sh -c %s", sudo_user, guarded)  # type: ignore[attr-defined]

    def run_local(self, command: str, *args: str):
        # testinfra's BaseBackend.run_local, with the password line as the command's stdin.
        cmd = self.encode(self.quote(command, *args))  # type: ignore[attr-defined]
        process = subprocess.Popen(cmd, shell=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE)
        stdout, stderr = process.communicate(self.sudo_password.line())
        return self.result(process.returncode, cmd, stdout, stderr)  # type: ignore[attr-defined]


def apply(backend, password: Secret) -> None:
    """Make ``backend`` (a testinfra SshBackend or LocalBackend with sudo on) give ``password``
    to sudo on stdin. Its class is swapped for a subclass with PasswordSudo mixed in: the
    backend keeps its connection settings and testinfra's caches keep their object."""
    from testinfra.backend.local import LocalBackend
    from testinfra.backend.ssh import SshBackend

    if not isinstance(backend, (SshBackend, LocalBackend)):
        raise ValueError(f"{OPTION}: testinfra's {backend.NAME} backend does not pass stdin to its "
                         "commands; use ssh:// or local://")
    if not backend.sudo:
        raise ValueError(f"{OPTION} was given without --sudo")
    if not isinstance(backend, PasswordSudo):
        cls = type(backend)
        backend.__class__ = type(f"PasswordSudo{cls.__name__}", (PasswordSudo, cls), {})
    backend.sudo_password = password

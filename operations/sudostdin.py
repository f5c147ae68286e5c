"""The deploy's sudo password goes to sudo on stdin, never into a command string.

What this replaces in pyinfra 3.10 (pinned to 3.10.x in pyproject.toml), and why: for a command
with `_sudo` and a `_sudo_password` (host data, the deploy call, `--data`, or the password pyinfra
prompts for after "a password is required"), connectors/util.py make_unix_command_for_host writes
an askpass script to the host's temp folder and make_unix_command builds

    env SUDO_ASKPASS=<script> PYINFRA_SUDO_PASSWORD=<password> sudo -H -A -k sh -c '<command>'

That string is the argv of the host's login shell (sshd runs `$SHELL -c <string>`) and of `env`
while they start, readable by every local user in /proc/<pid>/cmdline, once per fact and per
command. `install()` swaps, in the ssh and local connectors only, the name
`make_unix_command_for_host` and each connector's `run_shell_command`, so that such a command is

    sudo -H -S -p '' -k [-i] [-E] [-u <user>] sh -c '<discard up to END>; <command, with _env
    and _chdir as pyinfra writes them>'

and its stdin (over the SSH channel, or the local pipe) is

    <password>\\n  \\n  \\n  END\\n  <the command's own _stdin, if any>

- `-S -p ''`: sudo reads the password as one line from stdin, byte by byte (it stops at the
  newline), with no prompt text; no askpass script, nothing on disk. `-k` as pyinfra: sudo asks
  every time and leaves no timestamp.
- The root shell first reads and drops every line up to END (a fixed marker): after sudo took
  the password, that is the two blank lines and END; where sudo did not ask (a NOPASSWD rule, a
  policy without authentication) it is the password line too. Either way the command's stdin
  starts at its own first byte: the password never reaches a command.
- The two blank lines: with a wrong password sudo tries again (`passwd_tries`, 3 by default),
  reading further lines as passwords; they are what it reads, not the command's own stdin
  (secrets, the HF token), and it exits without running anything.
- Commands pyinfra runs for file transfers under sudo (put_file's `cp`, get_file's copy) go
  through run_shell_command too, so they are covered.

Left to pyinfra as it is: commands without `_sudo` or without a password (`sudo -n`), and any
with `_su_user`, `_doas` or `_dzdo`. Installed by importing llmhost.deploys (the deploy),
llmhost.secrets (secrets written from a user's own deploy file) and llmhost.inventory (the
commands llmhost-bench and llmhost-verify run through pyinfra).
"""

from __future__ import annotations

import functools
from typing import Any

from pyinfra.api import QuoteString, StringCommand
from pyinfra.connectors import local as local_connector
from pyinfra.connectors import ssh as ssh_connector
from pyinfra.connectors import util

END = "llmhost-sudo-password-end"
# Lines sudo may read after a wrong password (passwd_tries 3 by default): blank, never stdin.
SPARE_LINES = ("", "")
DISCARD = f'while IFS= read -r llmhost_line && [ "$llmhost_line" != {END} ]; do :; done'
_INSTALLED = "_llmhost_sudostdin"


def password_for(host, arguments: dict[str, Any]) -> str | None:
    """The sudo password this command gives on stdin, or None where pyinfra's own way applies."""
    if not arguments.get("_sudo") or any(arguments.get(k) for k in ("_su_user", "_doas", "_dzdo")):
        return None
    password = arguments.get("_sudo_password") or host.connector_data.get("prompted_sudo_password")
    if not password:
        return None
    if not isinstance(password, str) or any(c in password for c in "\r\n\0") or password == END:
        raise ValueError(f"{host.name}: _sudo_password: found a value sudo cannot read as one line "
                         "from stdin; expected one line of text")
    return password


def sudo_command(command: StringCommand, _env=None, _chdir=None, _shell_executable="sh",
                 _sudo_user=None, _use_sudo_login=False, _preserve_sudo_env=False,
                 **_others) -> StringCommand:
    """`sudo -S` running ``command`` (with _env and _chdir as pyinfra writes them) in a shell
    that first drops the password and spare lines from its stdin (see the module docstring)."""
    inner = util.make_unix_command(command, _env=_env, _chdir=_chdir, _shell_executable=None)
    bits: list[Any] = ["sudo", "-H", "-S", "-p", "''", "-k"]
    if _use_sudo_login:
        bits.append("-i")
    if _preserve_sudo_env:
        bits.append("-E")
    if _sudo_user:
        bits.extend(("-u", QuoteString(_sudo_user)))
    shell = _shell_executable if isinstance(_shell_executable, str) else "sh"
    # `;`, not a newline: under -i sudo escapes a newline into a line continuation.
    bits.extend([shell, "-c", QuoteString(StringCommand(DISCARD + ";", inner))])
    return StringCommand(*bits)


class PasswordFirst:
    """A command's `_stdin` as pyinfra's write_stdin reads it (readlines), decided when it is
    written: the password, spare lines and END first where this attempt's command is `sudo -S`
    (pyinfra retries once with a prompted password), then the command's own stdin."""

    def __init__(self, host, arguments: dict[str, Any], own):
        self.host, self.arguments = host, arguments
        if own is None:
            own = []
        elif hasattr(own, "readlines"):
            own = own.readlines()
        elif not isinstance(own, (list, tuple)):
            own = [own]
        self.own = list(own)

    def __bool__(self) -> bool:  # pyinfra writes stdin only `if _stdin`
        return True

    def __repr__(self) -> str:
        return f"PasswordFirst(<password>, {len(self.own)} line(s) of the command's own)"

    def readlines(self) -> list:
        password = password_for(self.host, self.arguments)
        first = [password, *SPARE_LINES, END] if password else []
        return first + self.own


def make_unix_command_for_host(state, host, command, **arguments) -> StringCommand:
    if password_for(host, arguments):
        return sudo_command(command, **arguments)
    return _pyinfra["make_unix_command_for_host"](state, host, command, **arguments)


def _with_password_first(run_shell_command):
    @functools.wraps(run_shell_command)
    def wrapper(self, command, print_output=False, print_input=False, **arguments):
        if arguments.get("_sudo") and not any(arguments.get(k) for k in ("_su_user", "_doas", "_dzdo")):
            own = arguments.pop("_stdin", None)
            arguments["_stdin"] = PasswordFirst(self.host, dict(arguments), own)
        return run_shell_command(self, command, print_output=print_output,
                                 print_input=print_input, **arguments)

    setattr(wrapper, _INSTALLED, run_shell_command)
    return wrapper


_pyinfra: dict[str, Any] = {}


def install() -> None:
    """Make pyinfra's ssh and local connectors give `_sudo_password` on stdin (idempotent)."""
    if _pyinfra:
        return
    _pyinfra["make_unix_command_for_host"] = util.make_unix_command_for_host
    for module, connector in ((ssh_connector, ssh_connector.SSHConnector),
                              (local_connector, local_connector.LocalConnector)):
        if module.make_unix_command_for_host is not util.make_unix_command_for_host:
            raise RuntimeError(f"llmhost.sudostdin: {module.__name__}.make_unix_command_for_host is "
                               "not pyinfra 3.10's; refusing to replace an unknown function")
        module.make_unix_command_for_host = make_unix_command_for_host
        connector.run_shell_command = _with_password_first(connector.run_shell_command)

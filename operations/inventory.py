"""The deploy's inventory, loaded as `pyinfra INVENTORY deploy.py` loads it, for the commands that
run beside the deploy (bench, verify): the same hosts, groups, group_data/ and connection data.

    hosts = load_inventory("inventory.py", limit=["gpu1"])
    for h in hosts:
        with h:                                   # connects, disconnects on exit
            ok, out, err = h.run("nvidia-smi -L")

Uses pyinfra_cli.inventory.make_inventory inside ctx_state.use(State()): an internal API of
pyinfra 3.10 (pinned in pyproject.toml), the way pyinfra's own CLI builds its inventory.
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from fnmatch import fnmatch
from pathlib import Path
from typing import IO, Any, Iterable

from pyinfra.api import Config, State
from pyinfra.api.exceptions import NoGroupError
from pyinfra.api.host import Host
from pyinfra.api.command import StringCommand
from pyinfra.context import ctx_host, ctx_inventory, ctx_state
from pyinfra_cli.inventory import make_inventory

from llmhost import sudostdin

# The bench's and verify's own commands give `_sudo_password` to sudo on stdin, as the deploy's.
sudostdin.install()

# Connection arguments a user may set in host data (e.g. _sudo for a non-root ssh_user); they
# apply to our commands as they do to the deploy's.
CONNECTOR_DATA = ("_sudo", "_sudo_user", "_use_sudo_login", "_sudo_password", "_preserve_sudo_env",
                  "_su_user", "_use_su_login", "_preserve_su_env", "_su_shell", "_su_password",
                  "_doas", "_doas_user", "_shell_executable", "_env")


class InventoryError(Exception):
    """The inventory could not be loaded or the limit matched nothing."""


class InventoryHost:
    """One host of the inventory: its name, groups and data, and commands run on it over
    pyinfra's own connector (SSH, local, docker, ...)."""

    def __init__(self, host: Host, state: State):
        self._host = host
        self._state = state

    @property
    def name(self) -> str:
        return self._host.name

    @property
    def groups(self) -> tuple[str, ...]:
        return tuple(self._host.groups or ())

    @property
    def data(self) -> dict[str, Any]:
        """The host's data: inventory entry over group_data/ over all.py, as the deploy sees it."""
        return self._host.data.dict()

    def _context(self) -> ExitStack:
        """pyinfra's context (state, inventory, host) for one call: nothing global is left set."""
        stack = ExitStack()
        stack.enter_context(ctx_state.use(self._state))
        stack.enter_context(ctx_inventory.use(self._state.inventory))
        stack.enter_context(ctx_host.use(self._host))
        return stack

    def _arguments(self) -> dict[str, Any]:
        data = self.data
        return {key: data[key] for key in CONNECTOR_DATA if data.get(key) is not None}

    def connect(self) -> None:
        with self._context():
            self._host.connect(raise_exceptions=True, show_errors=False)

    def disconnect(self) -> None:
        if self._host.connected:
            with self._context():
                self._host.disconnect()

    def __enter__(self) -> "InventoryHost":
        self.connect()
        return self

    def __exit__(self, *exc) -> None:
        self.disconnect()

    def run(self, command: str, *, stdin: str | None = None, print_output: bool = False,
            timeout: int | None = None) -> tuple[bool, str, str]:
        """Run a shell command; returns (succeeded, stdout, stderr). ``stdin`` is for secrets,
        which never belong on a command line. ``print_output`` prints each line as it arrives,
        prefixed with the host's name."""
        arguments = self._arguments()
        if stdin is not None:
            arguments["_stdin"] = stdin
        if timeout is not None:
            arguments["_timeout"] = timeout
        with self._context():
            ok, output = self._host.run_shell_command(StringCommand(command),
                                                      print_output=print_output, **arguments)
        return ok, "\n".join(output.stdout_lines), "\n".join(output.stderr_lines)

    def put(self, local: str | Path | IO, remote: str) -> bool:
        with self._context():
            return self._host.put_file(str(local) if isinstance(local, Path) else local, remote,
                                       **self._arguments())

    def get(self, remote: str, local: str | Path | IO) -> bool:
        with self._context():
            return self._host.get_file(remote, str(local) if isinstance(local, Path) else local,
                                       **self._arguments())


def missing_ssh_key(name: str, data: dict) -> str | None:
    """The line for a host whose ssh_key file is not on the controller, or None."""
    key = data.get("ssh_key")
    if key and not os.path.exists(os.path.expanduser(str(key))):
        return (f"host {name}: ssh_key: found {key!r}, which does not exist on the controller; "
                f"expected the private key file to log in with")
    return None


def check_ssh_keys(namespace: dict) -> None:
    """Call at the end of an inventory file (``check_ssh_keys(globals())``): pyinfra loads the
    inventory before it connects, so a missing ssh_key stops the run there with one line per
    host, before any host is touched (pyinfra's own connect error names no host)."""
    from pyinfra.api.exceptions import PyinfraError

    problems = []
    for value in list(namespace.values()):
        hosts, group_data = value, {}
        if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], dict) \
                and isinstance(value[0], (list, tuple)):
            hosts, group_data = value
        if not isinstance(hosts, (list, tuple)):
            continue
        for entry in hosts:
            if isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[1], dict):
                problem = missing_ssh_key(str(entry[0]), {**group_data, **entry[1]})
            elif isinstance(entry, str):
                problem = missing_ssh_key(entry, group_data)
            else:
                continue
            if problem:
                problems.append(problem)
    if problems:
        raise PyinfraError("\n".join(problems))


def enable_output() -> None:
    """Let ``run(print_output=True)`` print: pyinfra's API mode prints nothing until a CLI installs
    an echo function, as pyinfra's own CLI does at start-up. For commands, not for libraries."""
    import click
    from pyinfra.api import output

    if not output.is_output_active():
        output.set_echo(click.echo)
        output.set_formatter(click.style)


def _limit(inventory, patterns: Iterable[str]) -> list[Host]:
    """pyinfra's --limit: each pattern is a group name or a glob over host names."""
    chosen: list[Host] = []
    for pattern in patterns:
        try:
            hosts = list(inventory.get_group(pattern))
        except NoGroupError:
            hosts = [h for h in inventory if fnmatch(h.name, pattern)]
        if not hosts:
            names = ", ".join(h.name for h in inventory)
            raise InventoryError(f"--limit {pattern}: matches no host or group of the inventory; "
                                 f"its hosts are: {names}")
        chosen.extend(h for h in hosts if h not in chosen)
    return chosen


def load_inventory(path: str | Path, limit: Iterable[str] | str | None = None,
                   cwd: str | Path | None = None) -> list[InventoryHost]:
    """The inventory's hosts (in inventory order), limited like pyinfra's --limit.

    group_data/ is read from ``cwd`` (default: the current directory, as the pyinfra CLI does)
    and from the inventory file's directory.
    """
    path = Path(path)
    if not path.exists():
        raise InventoryError(f"inventory {path}: no such file")
    if isinstance(limit, str):
        limit = [part for part in limit.split(",") if part]
    state = State()
    with ctx_state.use(state):
        inventory = make_inventory(str(path), cwd=str(cwd or os.getcwd()))
        with ctx_inventory.use(inventory):
            chosen = _limit(inventory, limit) if limit else list(inventory)
            state.init(inventory, Config(), initial_limit=chosen)
    order = {h.name: i for i, h in enumerate(inventory)}
    return [InventoryHost(h, state) for h in sorted(chosen, key=lambda h: order[h.name])]

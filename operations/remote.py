"""Running our long host-side steps (builds, downloads, service switches) so that the operator sees
their progress lines live in pyinfra's normal output, and secrets travel on stdin only."""

from __future__ import annotations

import shlex

from pyinfra.api import FunctionCommand, StringCommand
from pyinfra.connectors.util import CommandOutput

# Host helpers from files/ are uploaded here by the deploy (see helpers.install_helpers).
HELPER_DIR = "/usr/local/lib/llmhost"


def helper_command(script: str, *args: str) -> str:
    """Command line that runs one of our files/ helpers on the host (python3 from the host)."""
    return " ".join(["python3", shlex.quote(f"{HELPER_DIR}/{script}"), *map(shlex.quote, args)])


class StreamedCommand(StringCommand):
    """A shell command whose every output line is printed as it arrives, prefixed by the host
    name, and whose last lines are repeated in red when it fails.

    It is a StringCommand, so pyinfra runs it with the operation's connector arguments, as it
    runs every other command: _sudo, _sudo_user, _sudo_password, _env, ... from host data, the
    command line or the deploy call. Helpers print a progress line at most every few seconds.
    """

    def __init__(self, command: str, label: str, stdin: str | None = None):
        # Secrets (an HF token, a unit request) travel as _stdin, never on the command line.
        super().__init__(command, **({"_stdin": stdin} if stdin is not None else {}))
        self.label = label

    def execute(self, state, host, connector_arguments):
        connector_arguments.update(self.connector_arguments)
        ok, output = host.run_shell_command(self, print_output=True, **connector_arguments)
        if not ok:
            host.log_styled(f"{self.label} failed; its last lines:", fg="red")
            for line in output.combined_lines[-15:]:
                host.log_styled(f"    {line.line}", fg="red")
        # Every line was printed as it came: pyinfra would print them all again on failure.
        return ok, CommandOutput([])


def streamed(command: str, label: str, stdin: str | None = None) -> StreamedCommand:
    return StreamedCommand(command, label, stdin)


def fail(message: str) -> FunctionCommand:
    """A command that fails this host with one clear line (other hosts carry on)."""
    return FunctionCommand(_fail, (message,), {})


def _fail(state, host, message: str) -> bool:
    host.log_styled(message, fg="red")
    return False

"""Running our long host-side steps (builds, downloads, service switches) so that the operator sees
their progress lines live in pyinfra's normal output, and secrets travel on stdin only."""

from __future__ import annotations

import shlex

from pyinfra.api import FunctionCommand, StringCommand

# Host helpers from files/ are uploaded here by the deploy (see helpers.install_helpers).
HELPER_DIR = "/usr/local/lib/llmhost"


def helper_command(script: str, *args: str) -> str:
    """Command line that runs one of our files/ helpers on the host (python3 from the host)."""
    return " ".join(["python3", shlex.quote(f"{HELPER_DIR}/{script}"), *map(shlex.quote, args)])


def streamed(command: str, label: str, stdin: str | None = None) -> FunctionCommand:
    """A command whose every output line is printed as it arrives, prefixed by the host name.

    Helpers print a progress line at most every few seconds, not a flood. ``stdin`` carries
    secrets (an HF token), which must never be part of a command line.
    """
    return FunctionCommand(_run_streamed, (command, label, stdin), {})


def _run_streamed(state, host, command: str, label: str, stdin: str | None) -> bool:
    kwargs = {"_stdin": stdin} if stdin is not None else {}
    ok, output = host.run_shell_command(StringCommand(command), print_output=True, **kwargs)
    if not ok:
        host.log_styled(f"{label} failed; its last lines:", fg="red")
        for line in output.combined_lines[-15:]:
            host.log_styled(f"    {line.line}", fg="red")
    return ok


def fail(message: str) -> FunctionCommand:
    """A command that fails this host with one clear line (other hosts carry on)."""
    return FunctionCommand(_fail, (message,), {})


def _fail(state, host, message: str) -> bool:
    host.log_styled(message, fg="red")
    return False

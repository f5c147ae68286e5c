"""llmhost.sudostdin: facts in, command strings and stdin out, and the shell plumbing run for real
through pyinfra's local connector with a stand-in `sudo` (real sudo: tests/e2e/test_operator_paths.py).

The stand-in reads the password line as `sudo -S` does (one line, byte by byte, then the rest of
stdin is the command's), records its argv, and can act as a NOPASSWD rule (reads nothing)."""

from __future__ import annotations

import os
import stat

import pytest
from pyinfra.api import Config, Inventory, State, StringCommand
from pyinfra.api.connect import connect_all
from pyinfra.connectors import local as local_connector
from pyinfra.connectors import ssh as ssh_connector
from pyinfra.connectors import util

import llmhost.deploys  # noqa: F401  (importing the deploy installs the hook)
from llmhost import sudostdin

PASSWORD = "pw-s3cret 'with' quotes $HOME"

FAKE_SUDO = r"""#!/bin/sh
# Stand-in for sudo -S: record argv, read one password line (unless NOPASSWD), run the rest.
printf '%s\n' "$*" >> "$FAKE_SUDO_ARGV"
[ "$1 $2 $3 $4 $5" = "-H -S -p  -k" ] || { echo "fake sudo: unexpected flags: $*" >&2; exit 2; }
shift 5
if [ -z "$FAKE_SUDO_NOPASSWD" ]; then
    IFS= read -r given || exit 1
    [ "$given" = "$FAKE_SUDO_PASSWORD" ] || { echo "Sorry, try again." >&2; exit 1; }
fi
exec "$@"
"""


@pytest.fixture
def local_host(tmp_path, monkeypatch):
    fake = tmp_path / "bin" / "sudo"
    fake.parent.mkdir()
    fake.write_text(FAKE_SUDO)
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SUDO_ARGV", str(tmp_path / "argv"))
    monkeypatch.setenv("FAKE_SUDO_PASSWORD", PASSWORD)
    inventory = Inventory((["@local"], {}))
    state = State(inventory, Config())
    connect_all(state)
    host = inventory.get_host("@local")
    host.argv_file = tmp_path / "argv"
    return host


def command_for(host, **arguments) -> str:
    return ssh_connector.make_unix_command_for_host(host.state, host, StringCommand("id", "-u"),
                                           **arguments).get_raw_value()


def test_install_replaced_pyinfra_in_both_connectors():
    for module in (ssh_connector, local_connector):
        assert module.make_unix_command_for_host is sudostdin.make_unix_command_for_host
    assert hasattr(ssh_connector.SSHConnector.run_shell_command, sudostdin._INSTALLED)
    sudostdin.install()  # twice is once
    assert not hasattr(getattr(ssh_connector.SSHConnector.run_shell_command, sudostdin._INSTALLED),
                       sudostdin._INSTALLED)


def test_a_password_sudo_command_holds_no_password_and_no_askpass(local_host):
    command = sudostdin.make_unix_command_for_host(local_host.state, local_host, StringCommand("id", "-u"),
                                                   _sudo=True, _sudo_password=PASSWORD)
    raw = command.get_raw_value()
    assert PASSWORD not in raw and "pw-s3cret" not in raw and "ASKPASS" not in raw
    assert raw == ("sudo -H -S -p '' -k sh -c '" + sudostdin.DISCARD.replace("'", "'\"'\"'")
                   + "; id -u'")
    assert not any(k.startswith("sudo_askpass_path") and v for k, v in local_host.connector_data.items())


@pytest.mark.parametrize("arguments, expected", [
    ({"_sudo_user": "llama"}, "sudo -H -S -p '' -k -u llama sh -c "),
    ({"_use_sudo_login": True}, "sudo -H -S -p '' -k -i sh -c "),
    ({"_preserve_sudo_env": True}, "sudo -H -S -p '' -k -E sh -c "),
    ({"_shell_executable": "bash"}, "sudo -H -S -p '' -k bash -c "),
])
def test_sudo_options_keep_their_flags(local_host, arguments, expected):
    raw = sudostdin.make_unix_command_for_host(local_host.state, local_host, StringCommand("id"),
                                               _sudo=True, _sudo_password=PASSWORD, **arguments).get_raw_value()
    assert raw.startswith(expected) and PASSWORD not in raw


def test_env_and_chdir_run_inside_sudo_after_the_discard(local_host):
    raw = sudostdin.make_unix_command_for_host(
        local_host.state, local_host, StringCommand("id"), _sudo=True, _sudo_password=PASSWORD,
        _env={"HF_HOME": "/var/lib/x"}, _chdir="/opt").get_raw_value()
    assert raw.endswith("; cd /opt && export HF_HOME=/var/lib/x && id'"), raw


@pytest.mark.parametrize("arguments", [
    {},  # no sudo
    {"_sudo": True},  # sudo -n: no password
    {"_sudo": True, "_sudo_password": ""},
    {"_su_user": "llama", "_su_password": "x"},
    {"_doas": True},
    {"_sudo": True, "_sudo_password": PASSWORD, "_su_user": "llama"},  # su: pyinfra's own way
])
def test_everything_else_is_pyinfras_own_command(monkeypatch, local_host, arguments):
    # Stop before pyinfra writes an askpass file: the su case is about the command path only.
    monkeypatch.setattr(util, "_ensure_askpass_set_for_host", lambda *a, **k: "/tmp/askpass")
    ours = sudostdin.make_unix_command_for_host(local_host.state, local_host, StringCommand("id"), **arguments)
    theirs = sudostdin._pyinfra["make_unix_command_for_host"](local_host.state, local_host,
                                                               StringCommand("id"), **arguments)
    assert ours.get_raw_value() == theirs.get_raw_value()


def test_stdin_is_password_spares_end_then_the_commands_own(local_host):
    lines = sudostdin.PasswordFirst(local_host, {"_sudo": True, "_sudo_password": PASSWORD},
                                    "token\nsecond").readlines()
    assert lines == [PASSWORD, "", "", sudostdin.END, "token\nsecond"]
    assert PASSWORD not in repr(sudostdin.PasswordFirst(local_host, {"_sudo_password": PASSWORD}, None))
    # Without a password (or su), only the command's own stdin, as pyinfra writes it.
    assert sudostdin.PasswordFirst(local_host, {"_sudo": True}, ["a", "b"]).readlines() == ["a", "b"]


def test_a_password_pyinfra_prompted_for_is_used_on_its_retry(local_host):
    """pyinfra runs `sudo -n` first and, on "a password is required", prompts and runs the same
    command again: the command string and stdin are both decided per attempt."""
    arguments = {"_sudo": True}
    stdin = sudostdin.PasswordFirst(local_host, arguments, None)
    assert stdin.readlines() == [] and "sudo -H -n" in command_for(local_host, **arguments)
    local_host.connector_data["prompted_sudo_password"] = PASSWORD
    try:
        assert stdin.readlines()[0] == PASSWORD
        assert command_for(local_host, **arguments).startswith("sudo -H -S -p '' -k sh -c ")
    finally:
        local_host.connector_data["prompted_sudo_password"] = None


@pytest.mark.parametrize("value", ["two\nlines", sudostdin.END])
def test_a_password_sudo_cannot_read_as_one_line_is_refused(local_host, value):
    with pytest.raises(ValueError, match="@local: _sudo_password"):
        command_for(local_host, _sudo=True, _sudo_password=value)


@pytest.mark.parametrize("nopasswd", [False, True], ids=["sudo-asks", "nopasswd-rule"])
def test_the_command_reads_only_its_own_stdin_through_a_real_shell(local_host, monkeypatch, nopasswd):
    if nopasswd:
        monkeypatch.setenv("FAKE_SUDO_NOPASSWD", "1")
    own = "first line\nsecond line\n"
    ok, output = local_host.run_shell_command(StringCommand("cat"), _sudo=True, _sudo_password=PASSWORD,
                                              _stdin=own, _env={"A": "1"}, _chdir="/")
    assert ok, output.stderr
    assert output.stdout_lines == ["first line", "second line"]
    # A command without stdin of its own reads nothing (EOF), not the password.
    ok, output = local_host.run_shell_command(StringCommand("cat"), _sudo=True, _sudo_password=PASSWORD)
    assert ok and output.stdout_lines == [], output
    argv = local_host.argv_file.read_text()
    assert argv.count("-H -S -p  -k sh -c") == 2 and PASSWORD not in argv and "pw-s3cret" not in argv


def test_a_wrong_password_runs_nothing(local_host, monkeypatch):
    monkeypatch.setenv("FAKE_SUDO_PASSWORD", "another")
    ok, output = local_host.run_shell_command(StringCommand("cat"), _sudo=True, _sudo_password=PASSWORD,
                                              _stdin="secret-token\n")
    assert not ok and "secret-token" not in output.stdout

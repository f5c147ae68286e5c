"""verify checks each host against the manifest where the deploy wrote it (llm_config_dir)."""

from llmhost.verify import target_for


def test_manifest_follows_the_hosts_config_dir():
    assert target_for(0, "gpu1", {"ssh_user": "root"}).manifest == "/etc/llama/llmhost.json"
    moved = target_for(1, "gpu2", {"ssh_user": "root", "llm_config_dir": "/srv/llama/"})
    assert moved.manifest == "/srv/llama/llmhost.json"
    assert target_for(2, "@local", {"llm_config_dir": "/x"}).manifest == "/x/llmhost.json"


def test_a_missing_ssh_key_names_its_host(tmp_path):
    key = tmp_path / "id_ed25519"
    key.write_text("k")
    target = target_for(0, "gpu1", {"ssh_user": "root", "ssh_key": str(tmp_path / "nope")})
    assert target.problem == (f"host gpu1: ssh_key: found '{tmp_path}/nope', which does not exist "
                              f"on the controller; expected the private key file to log in with")
    assert target_for(0, "gpu1", {"ssh_user": "root", "ssh_key": str(key)}).problem is None


def test_the_inventory_check_stops_on_missing_keys_before_pyinfra_connects(tmp_path):
    import pytest
    from pyinfra.api.exceptions import PyinfraError

    from llmhost.inventory import check_ssh_keys

    key = tmp_path / "id_ed25519"
    key.write_text("k")
    inventory = {"gpu_servers": [("gpu1", {"ssh_key": str(key)}), ("gpu2", {"ssh_key": "/nope/a"})],
                 "web": (["web1", ("web2", {})], {"ssh_key": "/nope/b"}), "not_a_group": 3}
    with pytest.raises(PyinfraError) as error:
        check_ssh_keys(inventory)
    assert str(error.value).splitlines() == [
        "host gpu2: ssh_key: found '/nope/a', which does not exist on the controller; expected the "
        "private key file to log in with",
        "host web1: ssh_key: found '/nope/b', which does not exist on the controller; expected the "
        "private key file to log in with",
        "host web2: ssh_key: found '/nope/b', which does not exist on the controller; expected the "
        "private key file to log in with"]
    check_ssh_keys({"gpu_servers": [("gpu1", {"ssh_key": str(key)})]})  # present: no error


def test_hosts_without_services_or_gateway_are_left_alone(tmp_path, capsys):
    """A web server in the same inventory is not checked (it would fail for a missing
    manifest it was never meant to have)."""
    from llmhost.verify import main

    inventory = tmp_path / "inventory.py"
    inventory.write_text("web = [('web1', {'ssh_user': 'root'})]\n")
    assert main([str(inventory)]) == 0
    assert "verify: left alone (no llm_services, no llm_gateway): web1" in capsys.readouterr().out


# -- host keys: pyinfra's ssh_strict_host_key_checking and ssh_known_hosts_file -------------------

import os
import shutil
import subprocess

import pytest

from llmhost.verify import Target, run_host


def block(target: Target) -> list[str]:
    return [line.strip() for line in target.ssh_config.splitlines()]


def effective(target: Target, tmp_path) -> dict[str, str]:
    """The options OpenSSH itself reads from the block (`ssh -G`: parse only, no connection)."""
    config = tmp_path / "ssh_config"
    config.write_text(target.ssh_config)
    alias = target.url.split("://", 1)[1]
    out = subprocess.run(["ssh", "-G", "-F", str(config), alias], capture_output=True, text=True,
                         check=True).stdout
    return dict(line.split(" ", 1) for line in out.splitlines() if " " in line)


needs_ssh = pytest.mark.skipif(not shutil.which("ssh"), reason="OpenSSH's client is not installed")


@needs_ssh
def test_host_keys_are_checked_strictly_against_the_users_known_hosts_by_default(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    target = target_for(0, "gpu1", {"ssh_user": "root"})
    lines = block(target)
    assert "StrictHostKeyChecking yes" in lines
    assert f"UserKnownHostsFile {tmp_path}/.ssh/known_hosts" in lines
    assert target.known_hosts == f"{tmp_path}/.ssh/known_hosts"
    assert "StrictHostKeyChecking no" not in lines and "UserKnownHostsFile /dev/null" not in lines
    options = effective(target, tmp_path)
    assert options["stricthostkeychecking"] == "true"  # how ssh -G spells yes
    assert options["userknownhostsfile"] == f"{tmp_path}/.ssh/known_hosts"
    assert options["globalknownhostsfile"] == "/dev/null"  # pyinfra reads only the one file
    assert options["updatehostkeys"] == "false" and options["batchmode"] == "yes"


@needs_ssh
@pytest.mark.parametrize("value, strict, files", [
    ("yes", "true", "{f}"), ("ask", "true", "{f}"),  # verify cannot ask: ask is yes
    ("accept-new", "accept-new", "{f}"),
    # off/no: a new key is taken and forgotten (written to /dev/null), the file still read, so a
    # changed key is refused, as pyinfra's paramiko refuses it whatever the policy.
    ("off", "accept-new", "/dev/null {f}"), ("no", "accept-new", "/dev/null {f}"),
])
def test_each_pyinfra_value_of_strict_checking(tmp_path, monkeypatch, value, strict, files):
    monkeypatch.chdir(tmp_path)
    data = {"ssh_user": "root", "ssh_strict_host_key_checking": value, "ssh_known_hosts_file": "keys/known"}
    options = effective(target_for(0, "gpu1", data), tmp_path)
    assert options["stricthostkeychecking"] == strict
    # A relative file is the user's, from where verify runs (pytest runs elsewhere).
    assert options["userknownhostsfile"] == files.format(f=tmp_path / "keys/known")


@needs_ssh
def test_known_hosts_paths_keep_spaces_and_percent_signs(tmp_path):
    known = tmp_path / "my keys" / "100%known"
    options = effective(target_for(0, "gpu1", {"ssh_known_hosts_file": str(known),
                                               "ssh_strict_host_key_checking": "yes"}), tmp_path)
    assert options["userknownhostsfile"] == str(known)


@pytest.mark.parametrize("value", ["maybe", "YES", False, 1])
def test_a_value_pyinfra_refuses_is_named(value):
    target = target_for(0, "gpu1", {"ssh_user": "root", "ssh_strict_host_key_checking": value})
    assert target.problem == (f"host gpu1: ssh_strict_host_key_checking: found {value!r}; expected "
                              "'yes' (verify's default), 'accept-new', 'no' or 'off' (as pyinfra)")
    assert target.ssh_config is None


def test_the_sandbox_hosts_connection_data_turns_checking_off():
    """What the e2e inventories carry (tests/support/sandbox.py): off, /dev/null."""
    target = target_for(0, "sandbox1", {"ssh_hostname": "127.0.0.1", "ssh_port": 2222,
                                        "ssh_strict_host_key_checking": "off",
                                        "ssh_known_hosts_file": "/dev/null"})
    assert "StrictHostKeyChecking accept-new" in block(target)
    assert "UserKnownHostsFile /dev/null /dev/null" in block(target)


# -- sudo with a password: _sudo_password ---------------------------------------------------------

PASSWORD = "s3cret pass'word$(x)"


def test_the_sudo_password_is_carried_but_never_shown():
    target = target_for(0, "gpu1", {"ssh_user": "deploy", "_sudo": True, "_sudo_password": PASSWORD})
    assert target.problem is None and target.sudo and target.sudo_password is not None
    assert target.sudo_password.line() == PASSWORD.encode() + b"\n"
    for shown in (repr(target), str(target.sudo_password), repr(target.sudo_password), target.ssh_config):
        assert PASSWORD not in shown and "s3cret" not in shown


def test_a_sudo_password_applies_only_with_sudo_and_must_be_one_line():
    assert target_for(0, "gpu1", {"_sudo_password": PASSWORD}).sudo_password is None  # pyinfra too
    assert target_for(0, "gpu1", {"_sudo": True, "_sudo_password": ""}).sudo_password is None
    broken = target_for(0, "gpu1", {"_sudo": True, "_sudo_password": "first\nsecond"})
    assert broken.problem == ("host gpu1: _sudo_password: found a line break or NUL in it; sudo "
                              "reads the password as one line")
    docker = target_for(0, "@docker/box", {"_sudo": True, "_sudo_password": PASSWORD})
    assert docker.problem.startswith("_sudo_password: testinfra's docker backend cannot")
    local = target_for(0, "@local", {"_sudo": True, "_sudo_password": PASSWORD})
    assert local.url == "local://" and local.sudo_password is not None


SUITE_TEST = '''
import os

def test_sudo_reads_the_password_from_stdin_and_no_command_does(host):
    backend = host.backend
    assert type(backend).__name__ == "PasswordSudoLocalBackend"
    command = backend.get_command("cat")
    # What sudo -S is given on stdin: the password line, from the pipe verify filled.
    assert backend.run_local("cat").stdout == os.environ["EXPECTED"] + "\\n"
    # What the command behind sudo reads where sudo left the line unread (NOPASSWD): nothing.
    as_root = backend.run_local(command.removeprefix("sudo -S -p '' -k "))
    assert as_root.rc == 0 and as_root.stdout == ""
    assert command == "sudo -S -p '' -k /bin/sh -c 'exec </dev/null\\ncat'"
    # Only the pipe's number is on pytest's command line.
    with open("/proc/self/cmdline", "rb") as f:
        argv = f.read().split(b"\\0")
    assert any(a.startswith(b"--llmhost-sudo-password-fd=") for a in argv)
    assert os.environ["EXPECTED"].encode() not in b" ".join(argv)
'''


def pipes() -> set[str]:
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # the listing's own descriptor
            continue
        if link.startswith("pipe:"):
            found.add(link)
    return found


def test_verify_hands_the_password_to_the_suite_through_a_pipe(tmp_path, monkeypatch):
    """run_host with the real host suite's conftest, on testinfra's local backend (no sudo runs:
    the command sudo would start is run directly)."""
    import llmhost.hostsuite

    suite = tmp_path / "suite"
    suite.mkdir()
    real = os.path.join(os.path.dirname(llmhost.hostsuite.__file__), "conftest.py")
    shutil.copy(real, suite / "conftest.py")
    (suite / "test_password.py").write_text(SUITE_TEST)
    monkeypatch.setenv("EXPECTED", PASSWORD)  # the check compares; verify itself never sets this
    target = target_for(0, "@local", {"_sudo": True, "_sudo_password": PASSWORD})
    open_fds = pipes()
    result = run_host(target, tmp_path, suite, [], timeout=120)
    assert [(c.name, c.outcome) for c in result.checks] == [
        ("test_sudo_reads_the_password_from_stdin_and_no_command_does", "passed")], result.output[-3000:]
    assert PASSWORD not in result.output
    assert pipes() == open_fds  # the pipe is closed on this side


# -- the summary names a host-key failure (ssh's stderr, as testinfra raised it on a sandbox host) -

from llmhost.verify import Check, HostResult, summary  # noqa: E402

CHANGED = (
    "RuntimeError: CommandResult(backend=<testinfra.backend.ssh.SshBackend object at 0x7ff291af67d0>, "
    "exit_status=255, command=b'uname -s', _stdout=b'', _stderr=b'@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@"
    "@@@@@@@@@@@@@@@@@@@@@@@@\\r\\n@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @\\r\\n@@@@"
    "@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@\\r\\nIT IS POSSIBLE THAT SOMEONE IS DOING "
    "SOMETHING NASTY!\\r\\nSomeone could be eavesdropping on you right now (man-in-the-middle attack)!\\r"
    "\\nIt is also possible that a host key has just been changed.\\r\\nThe fingerprint for the ED25519 "
    "key sent by the remote host is\\nSHA256:jiuuiPCo/xaFPgvAGzkQ8jusBPKIVFUUPhFnYo2HAhY.\\r\\nPlease "
    "contact your system administrator.\\r\\nAdd correct host key in /tmp/kh_bad to get rid of this "
    "message.\\r\\nOffending ED25519 key in /tmp/kh_bad:1\\r\\n  remove with:\\r\\n  ssh-keygen -f "
    "\"/tmp/kh_bad\" -R \"[127.0.0.1]:41225\"\\r\\nHost key for [127.0.0.1]:41225 has changed and you "
    "have requested strict checking.\\r\\nHost key verification failed.\\r\\n')")
UNKNOWN = (
    "RuntimeError: CommandResult(backend=<testinfra.backend.ssh.SshBackend object at 0x7f99c6931e10>, "
    "exit_status=255, command=b'uname -s', _stdout=b'', _stderr=b'No ED25519 host key is known for "
    "[127.0.0.1]:41225 and you have requested strict checking.\\r\\nHost key verification failed.\\r\\n')")
REFUSED = ("RuntimeError: CommandResult(backend=<x>, exit_status=255, command=b'uname -s', _stdout=b'', "
           "_stderr=b'ssh: connect to host 127.0.0.1 port 41225: Connection refused\\r\\n')")


def host_summary(report: str) -> list[str]:
    # junit's message stops where pytest cut it (for the changed key: after "attack)", 544
    # characters in); the report (the element's text) is whole.
    cut = report.find("(man-in-the-middle attack)")
    message = 'failed on setup with "' + (report if cut < 0 else (
        report[:cut + 26] + "...\n[truncated; full report in element text]"))
    checks = [Check(f"test_{i}", "error", message, "...traceback...\nE   " + report) for i in range(3)]
    return summary([HostResult("gpu1", 1, "", 1.0, checks, "/tmp/kh_bad")]).splitlines()[3:-1]


def test_a_changed_host_key_is_named_as_a_mismatch():
    assert host_summary(CHANGED) == [
        "  HOST KEY MISMATCH: [127.0.0.1]:41225 sent a different key than /tmp/kh_bad holds for it, "
        "so no check ran. If the host was reinstalled, remove the old key (ssh-keygen -f /tmp/kh_bad "
        "-R '[127.0.0.1]:41225') and verify again; if not, the connection may be intercepted "
        "(all 3 checks errored)"]


def test_an_unknown_host_key_and_an_unreachable_host_are_named_as_such():
    assert host_summary(UNKNOWN) == [
        "  HOST KEY UNKNOWN: /tmp/kh_bad holds no ED25519 key for [127.0.0.1]:41225 and "
        "ssh_strict_host_key_checking is yes (verify's default), so no check ran: deploy first "
        "(pyinfra records the key), add it to the file, or set accept-new (all 3 checks errored)"]
    assert host_summary(REFUSED) == [
        "  UNREACHABLE: ssh: connect to host 127.0.0.1 port 41225: Connection refused (all 3 checks errored)"]

"""Secret files (llmhost.secrets): the operation with facts in and commands out (the content is
in no command string and not in the operation's arguments as pyinfra records them), the
host-side command and the fact run here by sh on real files, and the real pyinfra CLI on
@local under --diff, -vvv, --debug and --json: the content is in none of its output."""

from __future__ import annotations

import base64
import grp
import hashlib
import os
import pwd
import subprocess
import sys
from pathlib import Path

import pytest
from pyinfra.api import StringCommand
from pyinfra.api.operation import attach_args
from pyinfra.api.state import StateOperationMeta
from pyinfra.context import ctx_host, ctx_state

from llmhost import secrets
from llmhost.secrets import Secret, SecretFile

REPO = Path(__file__).resolve().parents[2]
KEY = "sk-unit-" + "9" * 40
OLD = "sk-unit-old-" + "8" * 36


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class FakeHost:
    name = "h1"

    def __init__(self, present):
        self.present, self.noops, self.logs, self.asked = present, [], [], []

    def get_fact(self, cls, **kwargs):
        assert cls is SecretFile
        self.asked.append(kwargs)
        return self.present

    def noop(self, text):
        self.noops.append(text)

    def log(self, text, log_func=None):
        self.logs.append(text)


class FakeConfig:
    DIFF = True


class FakeState:
    config = FakeConfig()


def run_put(present, **kwargs):
    fake = FakeHost(present)
    with ctx_host.use(fake), ctx_state.use(FakeState()):
        commands = list(secrets.put._inner(**{"user": "root", "group": "llama", "mode": "640",
                                             "dest": "/etc/llama/keys/main.key", **kwargs}))
    return commands, fake


def present(content: str, user="root", group="llama", mode="640", head: str | None = None):
    return {"user": user, "group": group, "mode": mode, "sha256": digest(content),
            "head": digest(head) if head is not None else None}


def test_a_secret_in_place_with_its_owner_and_mode_is_a_noop():
    commands, fake = run_put(present(KEY + "\n"), src=Secret(KEY + "\n"))
    assert commands == [] and fake.noops == ["secret /etc/llama/keys/main.key is up to date (root:llama 640)"]


def test_a_changed_secret_travels_on_stdin_only_and_shows_its_path_only():
    commands, fake = run_put(present(OLD + "\n"), src=Secret(KEY + "\n"))
    (command,) = commands
    assert isinstance(command, StringCommand)
    text = str(command) + repr(command) + command.get_raw_value()
    for secret in (KEY, OLD, base64.b64encode((KEY + "\n").encode()).decode()):
        assert secret not in text
    assert command.connector_arguments == {"_stdin": base64.b64encode((KEY + "\n").encode()).decode(),
                                           "_get_pty": False}
    assert digest(KEY + "\n") in text  # what the host checks the content against
    assert "mktemp /etc/llama/keys/.main.key.llmhost-XXXXXXXX" in text and "/tmp" not in text
    assert "umask 077" in text and "mv -f \"$tmp\" /etc/llama/keys/main.key" in text
    # --diff says what changes, never how.
    assert len(fake.logs) == 1 and "content (a secret: not shown)" in fake.logs[0]
    assert KEY not in fake.logs[0] and OLD not in fake.logs[0]


def test_only_owner_and_mode_that_drifted_are_repaired_without_sending_the_content():
    commands, fake = run_put(present(KEY, group="root", mode="644"), src=Secret(KEY))
    assert [str(c) for c in commands] == ["chown root:llama /etc/llama/keys/main.key && "
                                          "chmod 640 /etc/llama/keys/main.key"]
    assert isinstance(commands[0], str)  # a plain command: nothing on its stdin
    assert len(fake.logs) == 1 and "Will change owner and mode of" in fake.logs[0]


def test_a_missing_file_is_written():
    commands, _ = run_put(None, src=Secret(KEY), mode="0600", group="root")
    assert len(commands) == 1 and "chmod 600 \"$tmp\"" in str(commands[0])


def test_keep_previous_compares_the_first_lines_and_keeps_the_others_on_the_host():
    # The new key first, the previous ones after it: up to date while the first line is the key.
    commands, fake = run_put(present(KEY + "\n" + OLD + "\n", head=KEY + "\n"), src=Secret(KEY + "\n"),
                             keep_previous=True)
    assert commands == [] and fake.asked == [{"path": "/etc/llama/keys/main.key", "lines": 1}]
    commands, _ = run_put(present(OLD + "\n", head=OLD + "\n"), src=Secret(KEY + "\n"), keep_previous=True)
    assert "grep -vxF -f \"$tmp\" /etc/llama/keys/main.key" in str(commands[0])
    # Without keep_previous the whole file must be the key: the previous lines go.
    commands, _ = run_put(present(KEY + "\n" + OLD + "\n", head=KEY + "\n"), src=Secret(KEY + "\n"))
    assert len(commands) == 1 and "grep" not in str(commands[0])


def test_anything_but_a_secret_is_refused_without_being_echoed():
    with pytest.raises(TypeError) as error:
        run_put(None, src=KEY)
    assert KEY not in str(error.value)
    with pytest.raises(ValueError):
        run_put(None, src=Secret(KEY), keep_previous=True)  # no newline: lines could merge


def test_the_operations_arguments_as_pyinfra_records_them_hold_no_secret():
    """What --json ("args") and --debug-operations print for an operation given no name."""
    meta = attach_args(StateOperationMeta((1,)), (), {"src": Secret(KEY), "dest": "/k"})
    assert meta.args == [f"src=Secret(sha256={digest(KEY)})", "dest=/k"]
    assert KEY not in repr(Secret(KEY)) + str(Secret(KEY))


def test_read_key_takes_the_first_line_without_spaces(tmp_path):
    (tmp_path / "k").write_text(f"  {KEY}  \n{OLD}\n")
    assert secrets.read_key(str(tmp_path / "k")) == KEY
    (tmp_path / "k").write_text(KEY)
    assert secrets.read_key(str(tmp_path / "k")) == KEY


# ----------------------------------------------------- the host's side, run here by sh

def me() -> tuple[str, str]:
    return pwd.getpwuid(os.getuid()).pw_name, grp.getgrgid(os.getgid()).gr_name


def write(dest: Path, content: bytes, sent: bytes | None = None, keep_previous=False, mode="640"):
    """The operation's command run by sh with what pyinfra would write to its stdin."""
    user, group = me()
    command = secrets.write_command(str(dest), hashlib.sha256(content).hexdigest(), user, group,
                                    mode, keep_previous)
    stdin = base64.b64encode(content if sent is None else sent).decode() + "\n"
    return subprocess.run(["sh", "-c", command], input=stdin, capture_output=True, text=True)


def test_the_host_writes_the_file_atomically_with_its_mode_and_leaves_no_temporary(tmp_path):
    dest = tmp_path / "keys" / "main.key"
    dest.parent.mkdir()
    result = write(dest, KEY.encode())
    assert result.returncode == 0, result.stderr
    assert dest.read_bytes() == KEY.encode()  # as given: no newline added
    assert oct(dest.stat().st_mode & 0o777) == "0o640"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["main.key"]


def test_content_that_did_not_arrive_whole_leaves_the_file_unchanged(tmp_path):
    dest = tmp_path / "main.key"
    dest.write_text(OLD)
    result = write(dest, KEY.encode(), sent=b"")  # stdin taken by something else (su's password)
    assert result.returncode != 0
    assert "the content did not arrive whole on stdin; the file is unchanged" in result.stderr
    assert dest.read_text() == OLD and sorted(p.name for p in tmp_path.iterdir()) == ["main.key"]
    assert KEY not in result.stderr + result.stdout


def test_keep_previous_keeps_the_other_lines_after_the_new_ones_and_a_put_without_drops_them(tmp_path):
    dest = tmp_path / "main.key"
    dest.write_text(f"{OLD}\n")
    assert write(dest, f"{KEY}\n".encode(), keep_previous=True).returncode == 0
    assert dest.read_text() == f"{KEY}\n{OLD}\n"
    # Again with the same key (a run that failed after this step): nothing doubles.
    assert write(dest, f"{KEY}\n".encode(), keep_previous=True).returncode == 0
    assert dest.read_text() == f"{KEY}\n{OLD}\n"
    assert write(dest, f"{KEY}\n".encode()).returncode == 0
    assert dest.read_text() == f"{KEY}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["main.key"]


def run_fact(**kwargs):
    command = SecretFile().command(**kwargs)
    out = subprocess.run(["sh", "-c", command], capture_output=True, text=True, check=True).stdout
    assert KEY not in out and OLD not in out
    return SecretFile().process(out.splitlines())


def test_the_fact_reads_digests_owner_and_mode_never_the_content(tmp_path):
    dest = tmp_path / "main.key"
    assert run_fact(path=str(dest)) is None
    dest.write_text(f"{KEY}\n{OLD}\n")
    dest.chmod(0o640)
    user, group = me()
    assert run_fact(path=str(dest), lines=1) == {
        "user": user, "group": group, "mode": "640", "sha256": digest(f"{KEY}\n{OLD}\n"),
        "head": digest(f"{KEY}\n")}
    assert run_fact(path=str(dest))["head"] is None


# ------------------------------------------------ the real pyinfra CLI, its output searched

DEPLOY = """from llmhost.secrets import Secret, put

put(src=Secret(open({key!r}).read()), dest={dest!r}, user={user!r}, group={group!r}, mode="600")
put(name="Named secret", src=Secret(open({key!r}).read() + "\\n"), dest={dest!r} + ".2",
    user={user!r}, group={group!r}, mode="600")
"""


@pytest.mark.parametrize("flags", [["--diff", "-y"], ["--diff", "--dry"], ["-vvv", "-y"],
                                   ["--debug", "-y"], ["--json", "-y"], ["--debug-operations"]],
                         ids=lambda flags: " ".join(flags))
def test_pyinfra_shows_no_secret_under_its_verbose_flags(tmp_path, flags):
    """pyinfra on @local (its local connector: the same _stdin and logging code paths as SSH,
    which the e2e tests run), a secret changed from an old one: the output names the file."""
    user, group = me()
    key_file, dest = tmp_path / "new.key", tmp_path / "out" / "secret.key"
    key_file.write_text(KEY)
    dest.parent.mkdir()
    dest.write_text(OLD)
    (tmp_path / "deploy.py").write_text(DEPLOY.format(key=str(key_file), dest=str(dest), user=user,
                                                      group=group))
    result = subprocess.run([sys.executable, "-m", "pyinfra", "@local", "deploy.py", *flags],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    for secret in (KEY, OLD, base64.b64encode(KEY.encode()).decode()):
        assert secret not in output, flags
    if flags == ["--diff", "--dry"]:
        assert "Will change content (a secret: not shown) of" in output and str(dest) in output
        assert dest.read_text() == OLD
    elif "-y" in flags:
        assert dest.read_text() == KEY and (tmp_path / "out" / "secret.key.2").read_text() == KEY + "\n"
    if "--json" in flags:
        assert f"src=Secret(sha256={digest(KEY)})" in result.stdout
    if "-vvv" in flags:
        assert "umask 077" in output  # the command itself was printed, and stdin was not

"""Secret files (API keys, the gateway's key maps, TLS key material): one way for every secret
the deploy writes from the controller.

The content travels on the command's stdin only (base64, one line), never on a command line,
in an uploaded temporary file or in pyinfra's output: ``--diff`` says the file will change and
never shows a line of it, ``-vvv`` and ``--debug`` print the command (paths, owner, mode, the
sha256 the content must have) and never stdin, ``--json`` and ``--debug-operations`` show the
argument as ``Secret(sha256=...)``. The host writes a temporary file in the destination's own
folder (umask 077), checks the sha256 of what arrived, sets owner and mode, fsyncs it and
renames it over the destination: a reader sees the old file or the new one, never a part.

What is compared is the sha256 of the content with the host's (a fact), and owner and mode. A
sha256 of a random key is no secret; it would be one of a guessable password, which is not
what this is for.

Under ``_sudo`` the sudo password travels through pyinfra's askpass helper (an environment
variable of ``sudo -A``), not stdin, so the two never meet. A privilege wrapper that does read
stdin (``_su_user`` with ``_su_password``) takes it before the content: the sha256 check then
fails the host with the file unchanged.
"""

from __future__ import annotations

import base64
import hashlib
import posixpath
import shlex
from pathlib import Path

from pyinfra import host, logger, state
from pyinfra.api import FactBase, StringCommand, operation
from pyinfra.api.output import format_text

from llmhost import sudostdin

# A secret written from a user's own deploy file (not only llama_server's) reaches a host whose
# sudo asks a password with that password on stdin too, never in a command string.
sudostdin.install()


class Secret:
    """Content to write to a host without showing it: ``str()`` and ``repr()`` give its sha256
    only, so an operation's arguments, pyinfra's ``--json`` output and logs never hold it."""

    __slots__ = ("_value",)

    def __init__(self, value: str | bytes):
        self._value = value.encode() if isinstance(value, str) else bytes(value)

    @classmethod
    def from_file(cls, path: str) -> "Secret":
        """A controller file's bytes, as they are (a TLS PEM, say)."""
        return cls(Path(path).read_bytes())

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self._value).hexdigest()

    def reveal(self) -> bytes:
        """The content itself: for the stdin of the command that writes it, nothing else."""
        return self._value

    def __repr__(self) -> str:
        return f"Secret(sha256={self.sha256})"

    __str__ = __repr__


def read_key(path: str) -> str:
    """The key in a controller file: its first line, without spaces or the newline (a file
    made with ``echo KEY > file`` and one without a newline hold the same key)."""
    text = Path(path).read_text()
    return (text.strip().splitlines() or [""])[0].strip()


class SecretFile(FactBase):
    """Owner, group, mode and sha256 of a regular file, and the sha256 of its first ``lines``
    lines when asked; never a byte of its content. None when there is no such file.

    .. code:: python

        {"user": "root", "group": "llama", "mode": "640", "sha256": "9f86d0...", "head": "9f86d0..."}
    """

    def command(self, path: str, lines: int = 0) -> str:
        q = shlex.quote(path)
        head = f" && head -n {int(lines)} {q} | sha256sum" if lines else ""
        return f"if [ -f {q} ]; then stat -c '%U %G %a' {q} && sha256sum < {q}{head}; fi"

    def process(self, output):
        if len(output) < 2:
            return None
        user, group, mode = output[0].split()
        digests = [line.split()[0] for line in output[1:]]
        return {"user": user, "group": group, "mode": mode, "sha256": digests[0],
                "head": digests[1] if len(digests) > 1 else None}


def _mode(mode: str | int) -> str:
    """"0600", "600" and 0o600 as stat's %a prints them: "600"."""
    return format(mode, "o") if isinstance(mode, int) else (mode.lstrip("0") or "0")


@operation()
def put(src: Secret, dest: str, user: str = "root", group: str = "root", mode: str = "600",
        keep_previous: bool = False):
    """Write a secret file from content held on the controller, sent on stdin only.

    + src: the content, a ``Secret`` (its representation is its sha256)
    + dest: the file on the host; its folder must exist
    + user: owner of the file
    + group: group of the file
    + mode: permissions, e.g. ``"600"``
    + keep_previous: keep the lines of the present file that differ from the new content after
      it (a key being rotated: a server reading the file accepts the new key and the previous
      ones until a later ``put`` without it); the previous lines are read on the host and never
      leave it. The content must then end with a newline.

    The content is compared by sha256 (with ``keep_previous``: the file's first lines), owner
    and mode by the ``SecretFile`` fact. A change shows as the path only, under ``--diff`` too.

    **Example:**

    .. code:: python

        from llmhost.secrets import Secret, put

        put(name="API key of main", src=Secret(open("/secure/main.key").read()),
            dest="/etc/llama/keys/main.key", user="root", group="llama", mode="640")
    """
    if not isinstance(src, Secret):
        # Anything else may be the secret itself: never echoed, not even in this error.
        raise TypeError(f"secrets.put of {dest}: src must be a llmhost.secrets.Secret, found a "
                        f"{type(src).__name__}")
    content = src.reveal()
    if keep_previous and not content.endswith(b"\n"):
        raise ValueError(f"secrets.put of {dest}: keep_previous needs content of whole lines "
                         f"(ending with a newline)")
    mode = _mode(mode)
    lines = content.count(b"\n") if keep_previous else 0
    present = host.get_fact(SecretFile, path=dest, lines=lines)
    found = present or {}
    same = found.get("head" if keep_previous else "sha256") == src.sha256
    owned = (found.get("user"), found.get("group"), found.get("mode")) == (user, group, mode)
    if same and owned:
        host.noop(f"secret {dest} is up to date ({user}:{group} {mode})")
        return
    if state.config.DIFF:
        what = "owner and mode" if same else "content (a secret: not shown)"
        host.log(f"Will change {what} of {format_text(dest, bold=True)}", logger.info)
    q = shlex.quote(dest)
    if same:
        yield f"chown {shlex.quote(user)}:{shlex.quote(group)} {q} && chmod {mode} {q}"
        return
    yield StringCommand(write_command(dest, src.sha256, user, group, mode, keep_previous),
                        # One base64 line on stdin; no terminal, which would echo it back.
                        _stdin=base64.b64encode(content).decode(), _get_pty=False)


def write_command(dest: str, sha256: str, user: str, group: str, mode: str,
                  keep_previous: bool = False) -> str:
    """The shell command that writes ``dest`` from base64 on its stdin, atomically: a temporary
    file beside it (never /tmp), made under umask 077, checked against ``sha256``, given its
    owner and mode, fsynced, renamed over ``dest``; the folder fsynced after."""
    folder, name = posixpath.split(dest)
    q, tmp_pattern = shlex.quote(dest), shlex.quote(f"{folder}/.{name}.llmhost-XXXXXXXX")
    torn = shlex.quote(f"{dest}: the content did not arrive whole on stdin; the file is unchanged")
    steps = [
        "umask 077",
        f"tmp=$(mktemp {tmp_pattern}) || exit 1",
        "trap 'rm -f \"$tmp\" \"$tmp.previous\"' EXIT",
        "trap 'exit 1' HUP INT TERM",
        "base64 -d > \"$tmp\" || exit 1",
        f"[ \"$(sha256sum < \"$tmp\" | cut -d' ' -f1)\" = {sha256} ] || "
        f"{{ echo {torn} >&2; exit 1; }}",
    ]
    if keep_previous:
        # The present lines other than the new ones, read here (the new content is grep's
        # pattern file): they stay after it until a put without keep_previous.
        steps.append(f"if [ -f {q} ]; then grep -vxF -f \"$tmp\" {q} | grep . > \"$tmp.previous\"; "
                     f"cat \"$tmp.previous\" >> \"$tmp\"; fi")
    steps.append(f"chown {shlex.quote(user)}:{shlex.quote(group)} \"$tmp\" && chmod {mode} \"$tmp\" "
                 f"&& sync \"$tmp\" && mv -f \"$tmp\" {q} && sync {shlex.quote(folder or '/')}")
    return "; ".join(steps)

"""Facts our operations read from each host. Each is one small shell command that never fails:
absence is a value (None, empty), so a fresh host and a converged one read the same way."""

from __future__ import annotations

import json
import shlex

from pyinfra.api import FactBase

from llmhost import flags


class JsonFile(FactBase):
    """A small JSON file (build markers, model records), or None when absent or unreadable."""

    def command(self, path: str) -> str:
        return f"cat {shlex.quote(path)} 2>/dev/null || true"

    def process(self, output):
        text = "\n".join(output).strip()
        if not text:
            return None
        try:
            return json.loads(text)
        except ValueError:
            return None


class BuildState(FactBase):
    """A build's marker and which of the files it recorded are missing or changed (size or
    mtime): a few dozen stats, so a rerun trusts no deleted or replaced binary. None when the
    build has no marker (not built, or not verified)."""

    def command(self, build_dir: str) -> str:
        script = ("import json,os,sys; d=sys.argv[1]\n"
                  "try: r=json.load(open(os.path.join(d,'.llmhost-build.json')))\n"
                  "except (OSError,ValueError): print('null'); sys.exit()\n"
                  "def bad(n,v):\n"
                  "    try: s=os.stat(os.path.join(d,n))\n"
                  "    except OSError: return True\n"
                  "    return [s.st_size,s.st_mtime_ns]!=v\n"
                  "print(json.dumps({'files':'files' in r,"
                  "'changed':sorted(n for n,v in r.get('files',{}).items() if bad(n,v))}))")
        return f"python3 -c {shlex.quote(script)} {shlex.quote(build_dir)}"

    def process(self, output):
        return json.loads("\n".join(output) or "null")


class ModelFile(FactBase):
    """Size and mtime of a model file and its record: enough to trust it without hashing it
    again (a file rewritten in place keeps its size but not its mtime)."""

    def command(self, path: str) -> str:
        q = shlex.quote(path)
        # python3 for the exact st_mtime_ns the helpers record (stat's %.9Y varies by version).
        return (f"python3 -c 'import os,sys; s=os.stat(sys.argv[1]); print(s.st_size, s.st_mtime_ns)' "
                f"{q} 2>/dev/null || echo -; cat {shlex.quote(path + '.record.json')} 2>/dev/null || true")

    def process(self, output):
        first = output[0].split() if output else ["-"]
        record = None
        if len(output) > 1:
            try:
                record = json.loads("\n".join(output[1:]))
            except ValueError:
                record = None
        if not first[0].isdigit():
            return {"size": None, "mtime_ns": None, "record": record}
        return {"size": int(first[0]), "mtime_ns": int(first[1]), "record": record}

    @staticmethod
    def default():
        return {"size": None, "mtime_ns": None, "record": None}


class UnitState(FactBase):
    """The installed unit's sha256, whether systemd has it enabled and active, and the files its
    command names that are gone (a rollback to it would fail: said before a switch)."""

    _MISSING = ("import os,shlex,sys\n"
                "try: text=open(sys.argv[1]).read()\n"
                "except OSError: sys.exit()\n"
                "for line in text.splitlines():\n"
                "    if line.startswith('ExecStart='):\n"
                "        for word in shlex.split(line[len('ExecStart='):]):\n"
                "            if word.startswith('/') and not os.path.exists(word): print('missing', word)")

    def command(self, unit: str) -> str:
        q = shlex.quote(unit)
        return (f"(sha256sum /etc/systemd/system/{q} 2>/dev/null || echo -) | cut -d' ' -f1; "
                f"systemctl is-enabled {q} 2>/dev/null || true; "
                f"systemctl is-active {q} 2>/dev/null || true; "
                f"python3 -c {shlex.quote(self._MISSING)} /etc/systemd/system/{q}")

    def process(self, output):
        lines = [line.strip() for line in output] + ["", "", ""]
        return {"sha256": None if lines[0] == "-" else lines[0], "enabled": lines[1] == "enabled",
                "active": lines[2] == "active",
                "missing": [line.split(" ", 1)[1] for line in lines[3:] if line.startswith("missing ")]}


class FileDigests(FactBase):
    """Name -> (sha256, owner, group, mode) of the regular files in a folder, in one command;
    {} when the folder does not exist yet."""

    def command(self, path: str) -> str:
        q = shlex.quote(path)
        return (f"cd {q} 2>/dev/null && for f in *; do [ -f \"$f\" ] || continue; "
                f"echo \"$(sha256sum \"$f\" | cut -d' ' -f1) $(stat -c '%U %G %a' \"$f\") $f\"; done; true")

    def process(self, output):
        found = {}
        for line in output:
            parts = line.split(" ", 4)
            if len(parts) == 5:
                digest, user, group, mode, name = parts
                found[name] = (digest, user, group, mode)
        return found

    @staticmethod
    def default():
        return {}


class KeyAccepted(FactBase):
    """Whether the running service accepts the key in its key file (/v1/models with it): False
    when it answers 401, as after the file was replaced or made again while it ran; None when
    nothing answers or the file cannot be read. The key is the file's first line (a rotation
    keeps the previous keys after it for a while). It is read on the host, never sent here."""

    def command(self, url: str, key_file: str) -> str:
        script = ("import sys,urllib.request,urllib.error\n"
                  "try: key=open(sys.argv[2]).readline().strip()\n"
                  "except OSError: print('none'); sys.exit()\n"
                  "r=urllib.request.Request(sys.argv[1],headers={'Authorization':'Bearer '+key})\n"
                  "try: print(urllib.request.urlopen(r,timeout=10).status)\n"
                  "except urllib.error.HTTPError as e: print(e.code)\n"
                  "except Exception: print('none')")
        return f"python3 -c {shlex.quote(script)} {shlex.quote(url)} {shlex.quote(key_file)}"

    def process(self, output):
        status = "".join(output).strip()
        return None if not status.isdigit() else int(status) != 401


class ServerOptions(FactBase):
    """Option names `llama-server --help` lists, or None when the binary is not there yet."""

    def command(self, binary: str) -> str:
        q = shlex.quote(binary)
        return f"if test -x {q}; then echo present; {q} --help 2>&1 || true; else echo absent; fi"

    def process(self, output):
        if not output or output[0].strip() != "present":
            return None
        return flags.help_options("\n".join(output[1:]))

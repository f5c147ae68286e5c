"""Facts our operations read from each host. Each is one small shell command that never fails:
absence is a value (None, empty), so a fresh host and a converged one read the same way."""

from __future__ import annotations

import json
import re
import shlex

from pyinfra.api import FactBase

from llmhost import flags
from llmhost.remote import HELPER_DIR


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
    """A build's marker, which of the files it recorded are missing or changed (size or
    mtime), and which of them (or the folders above them) others may no longer read and run:
    a few dozen stats, so a rerun trusts no deleted or replaced binary and the services' user
    can still start what it names. None when the build has no marker (not built, or not
    verified)."""

    def command(self, build_dir: str) -> str:
        script = ("import json,os,sys; d=sys.argv[1]\n"
                  "try: r=json.load(open(os.path.join(d,'.llmhost-build.json')))\n"
                  "except (OSError,ValueError): print('null'); sys.exit()\n"
                  "def bad(n,v):\n"
                  "    try: s=os.stat(os.path.join(d,n))\n"
                  "    except OSError: return True\n"
                  "    return [s.st_size,s.st_mtime_ns]!=v\n"
                  "def closed(p):\n"
                  "    try: return os.stat(p).st_mode&0o005!=0o005\n"
                  "    except OSError: return False\n"
                  "files=r.get('files',{})\n"
                  "paths=[d,os.path.join(d,'bin')]+[os.path.join(d,n) for n in files]\n"
                  "print(json.dumps({'files':'files' in r,"
                  "'changed':sorted(n for n,v in files.items() if bad(n,v)),"
                  "'unreadable':[p for p in paths if closed(p)]}))")
        return f"python3 -c {shlex.quote(script)} {shlex.quote(build_dir)}"

    def process(self, output):
        return json.loads("\n".join(output) or "null")


class ManifestState(FactBase):
    """The deploy's manifest on the host (sha256, owner, group, mode; None when absent) and the
    CPU record of the build's marker (the baseline its self-test found; None before it ran):
    one command, so writing the manifest costs a rerun no more than a plain file would."""

    def command(self, path: str, build_dir: str) -> str:
        script = ("import grp,hashlib,json,os,pwd,sys; p,d=sys.argv[1:3]\n"
                  "try:\n"
                  "    s=os.stat(p); h=hashlib.sha256(open(p,'rb').read()).hexdigest()\n"
                  "    f=[h,pwd.getpwuid(s.st_uid).pw_name,grp.getgrgid(s.st_gid).gr_name,"
                  "oct(s.st_mode&0o7777)[2:]]\n"
                  "except (OSError,KeyError): f=None\n"
                  "try: c=json.load(open(os.path.join(d,'.llmhost-build.json'))).get('cpu')\n"
                  "except (OSError,ValueError,AttributeError): c=None\n"
                  "print(json.dumps({'file':f,'cpu':c}))")
        return f"python3 -c {shlex.quote(script)} {shlex.quote(path)} {shlex.quote(build_dir)}"

    def process(self, output):
        return json.loads("\n".join(output))

    @staticmethod
    def default():
        return {"file": None, "cpu": None}


class ModelFile(FactBase):
    """Size and mtime of a model file and its record: enough to trust it without hashing it
    again (a file rewritten in place keeps its size but not its mtime); and whether it and its
    two folders are still root-owned 0644 / 0755, so the service's user can open it."""

    # The access the services' user needs: the file, its version folder and the one above it.
    _STAT = ("import os,sys; p=sys.argv[1]; s=os.stat(p); d=os.path.dirname(p)\n"
             "own=lambda st,m: st.st_uid==0 and st.st_gid==0 and st.st_mode&0o7777==m\n"
             "ok=own(s,0o644) and own(os.stat(d),0o755) and own(os.stat(os.path.dirname(d)),0o755)\n"
             "print(s.st_size, s.st_mtime_ns, int(ok))")

    def command(self, path: str) -> str:
        q = shlex.quote(path)
        # python3 for the exact st_mtime_ns the helpers record (stat's %.9Y varies by version).
        return (f"python3 -c {shlex.quote(self._STAT)} {q} 2>/dev/null || echo -; "
                f"cat {shlex.quote(path + '.record.json')} 2>/dev/null || true")

    def process(self, output):
        first = output[0].split() if output else ["-"]
        record = None
        if len(output) > 1:
            try:
                record = json.loads("\n".join(output[1:]))
            except ValueError:
                record = None
        if not first[0].isdigit():
            return {"size": None, "mtime_ns": None, "record": record, "access_ok": None}
        return {"size": int(first[0]), "mtime_ns": int(first[1]), "record": record,
                "access_ok": first[2:] == ["1"]}

    @staticmethod
    def default():
        return {"size": None, "mtime_ns": None, "record": None, "access_ok": None}


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
        # Two commands for all the files (a few per file would cost a rerun ~100 ms).
        return (f"cd {shlex.quote(path)} 2>/dev/null || exit 0; set --; "
                f"for f in *; do [ -f \"$f\" ] && set -- \"$@\" \"$f\"; done; "
                f"[ $# -gt 0 ] || exit 0; sha256sum -- \"$@\" && stat -c '%U %G %a %n' -- \"$@\"")

    def process(self, output):
        digests, found = {}, {}
        for line in output:
            match = re.fullmatch(r"([0-9a-f]{64})  (.+)", line)
            if match:
                digests[match.group(2)] = match.group(1)
                continue
            parts = line.split(" ", 3)
            if len(parts) == 4 and parts[3] in digests:
                user, group, mode, name = parts
                found[name] = (digests[name], user, group, mode)
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
        # A bare HTTP/1.0 request over a socket: urllib.request costs the host ~60 ms more to
        # import, on every rerun.
        script = ("import socket,sys,urllib.parse\n"
                  "try: key=open(sys.argv[2]).readline().strip()\n"
                  "except OSError: print('none'); sys.exit()\n"
                  "u=urllib.parse.urlsplit(sys.argv[1])\n"
                  "try:\n"
                  "    with socket.create_connection((u.hostname,u.port),timeout=10) as s:\n"
                  "        s.sendall(f'GET {u.path} HTTP/1.0\\r\\nHost: {u.netloc}\\r\\n"
                  "Authorization: Bearer {key}\\r\\n\\r\\n'.encode())\n"
                  "        print(s.makefile('rb').readline().split()[1].decode())\n"
                  "except Exception: print('none')")
        return f"python3 -c {shlex.quote(script)} {shlex.quote(url)} {shlex.quote(key_file)}"

    def process(self, output):
        status = "".join(output).strip()
        return None if not status.isdigit() else int(status) != 401


class Account(FactBase):
    """A local account's home, shell and primary group ({"home", "shell", "group"}), from its
    /etc/passwd line as pyinfra's Users fact reads it, or None when there is no such account:
    one user, where Users runs a few commands for every account on the host.

    .. code:: python

        {"home": "/var/lib/llama", "shell": "/usr/sbin/nologin", "group": "llama"}
    """

    def command(self, user: str) -> str:
        q = shlex.quote(user)
        # Exits 0 when there is no such account too (a failed fact fails the host).
        return f"awk -F: -v u={q} '$1==u{{print $6; print $7}}' /etc/passwd | grep . && id -gn {q}; true"

    def process(self, output):
        lines = [line.strip() for line in output]
        if len(lines) != 3:
            return None
        return {"home": lines[0], "shell": lines[1], "group": lines[2]}


class ServerOptions(FactBase):
    """Option names `llama-server --help` lists, or None when the binary is not there yet."""

    def command(self, binary: str) -> str:
        q = shlex.quote(binary)
        return f"if test -x {q}; then echo present; {q} --help 2>&1 || true; else echo absent; fi"

    def process(self, output):
        if not output or output[0].strip() != "present":
            return None
        return flags.help_options("\n".join(output[1:]))


class GpuHeld(FactBase):
    """Whether a running GPU service holds memory on exactly its GPUs now (files/gpu_check.py):
    {"ok": bool, "reason": str}. A service started outside the deploy (a reboot, a crash, a
    restart by hand) may have found no GPU. None when the unit is not active or the helper is
    not on the host yet (a fresh host): then the unit's own state decides."""

    def command(self, unit: str, gpus: str = "") -> str:
        helper, q = shlex.quote(f"{HELPER_DIR}/gpu_check.py"), shlex.quote(unit)
        return (f"if test -f {helper} && systemctl is-active -q {q}; then "
                f"python3 {helper} --unit {q} --gpus {shlex.quote(gpus)} || true; fi")

    def process(self, output):
        text = "\n".join(output).strip()
        try:
            found = json.loads(text) if text else None
        except ValueError:
            return None
        return {"ok": bool(found["ok"]), "reason": found.get("reason", "")} if found else None


class BuildHost(FactBase):
    """What a llama.cpp build made here depends on beyond its flags: the distribution and its
    release, the C library, the machine, and the CPU (vendor, family, model and flags of the
    first CPU, hashed: what -march=native compiles for). Read only for a build that is not in
    place, to key its artefact (llmhost.buildcache)."""

    # First CPU's block of /proc/cpuinfo, the lines that decide -march=native (x86 and Arm).
    _CPU = ("awk -F: '/^$/{exit} /^(vendor_id|cpu family|model|flags|Features|CPU implementer|"
            "CPU architecture|CPU variant|CPU part)[ \\t]*:/{print}' /proc/cpuinfo "
            "| sha256sum | cut -c1-16")

    def command(self) -> str:
        return ("(. /etc/os-release 2>/dev/null; echo \"os=${ID:-unknown} ${VERSION_ID:-}\"); "
                "echo \"libc=$(getconf GNU_LIBC_VERSION 2>/dev/null || echo unknown)\"; "
                "echo \"machine=$(uname -m)\"; "
                f"echo \"cpu=$({self._CPU})\"")

    def process(self, output):
        return dict(line.strip().split("=", 1) for line in output if "=" in line)

    @staticmethod
    def default():
        return {}

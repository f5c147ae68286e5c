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
    """The installed unit's sha256 and whether systemd has it enabled and active."""

    def command(self, unit: str) -> str:
        q = shlex.quote(unit)
        return (f"(sha256sum /etc/systemd/system/{q} 2>/dev/null || echo -) | cut -d' ' -f1; "
                f"systemctl is-enabled {q} 2>/dev/null || true; "
                f"systemctl is-active {q} 2>/dev/null || true")

    def process(self, output):
        lines = [line.strip() for line in output] + ["", "", ""]
        return {"sha256": None if lines[0] == "-" else lines[0], "enabled": lines[1] == "enabled",
                "active": lines[2] == "active"}


class ServerOptions(FactBase):
    """Option names `llama-server --help` lists, or None when the binary is not there yet."""

    def command(self, binary: str) -> str:
        q = shlex.quote(binary)
        return f"if test -x {q}; then echo present; {q} --help 2>&1 || true; else echo absent; fi"

    def process(self, output):
        if not output or output[0].strip() != "present":
            return None
        return flags.help_options("\n".join(output[1:]))

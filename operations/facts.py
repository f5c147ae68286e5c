"""Facts our operations read from each host. Each is one small shell command that never fails:
absence is a value (None, empty), so a fresh host and a converged one read the same way."""

from __future__ import annotations

import json
import shlex

from pyinfra.api import FactBase

from operations import flags


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


class DirectoryExists(FactBase):
    def command(self, path: str) -> str:
        return f"test -d {shlex.quote(path)} && echo yes || echo no"

    def process(self, output):
        return output[0].strip() == "yes"


class ModelFile(FactBase):
    """Size of a model file and its record: enough to trust it without hashing it again."""

    def command(self, path: str) -> str:
        q = shlex.quote(path)
        return f"stat -c %s {q} 2>/dev/null || echo -; cat {shlex.quote(path + '.record.json')} 2>/dev/null || true"

    def process(self, output):
        size = output[0].strip() if output else "-"
        record = None
        if len(output) > 1:
            try:
                record = json.loads("\n".join(output[1:]))
            except ValueError:
                record = None
        return {"size": int(size) if size.isdigit() else None, "record": record}

    @staticmethod
    def default():
        return {"size": None, "record": None}


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

"""Tuned profiles: the plain, commented Python data file llmhost-tune writes for a host
(``tuned/<host>.py`` by default, llm_tuned_dir), which the settings read like any host data.

    llm_tuned = {
        "translate": {
            "profile": "translate-throughput-20261204T101500Z",
            "date": "2026-12-04T10:15:00+00:00",
            "build_commit": "0c1e57098bba43ac29e6e3b677cdceebdd22334f",
            "model_sha256": "a5fd...",
            "goal": "throughput",
            "settings": {
                "threads": 2,  # 1 request: 61.2 tok/s (1 thread: 38.0), alternated
                "parallel": 4,  # 4 requests: 15.1 tok/s each, 60.4 aggregate (2 slots: 48.0)
            },
        },
    }

Only literals are read (ast.literal_eval of one assignment): the file is data, never run. The
values of ``settings`` override the service's own in inventory.py and group_data/; deleting the
file (or the service's entry) goes back to them.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path
from typing import Any

VARIABLE = "llm_tuned"
HEADER = "# Written by llmhost-tune; keep it by committing it, discard it by deleting it."


def profile_path(tuned_dir: str, host_name: str) -> Path:
    """The host's profile file (relative folders from the current directory, as group_data/)."""
    return Path(os.path.expanduser(tuned_dir)) / f"{host_name}.py"


def read(path: Path) -> tuple[dict[str, Any] | None, list[str]]:
    """The profile file's ``llm_tuned`` mapping (None when there is no file), and its problems."""
    if not path.exists():
        return None, []
    try:
        tree = ast.parse(path.read_text(), filename=str(path))
    except (SyntaxError, OSError, UnicodeDecodeError) as error:
        return None, [f"{path}: cannot be read as Python data: {error}"]
    found = None
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 \
                and isinstance(node.targets[0], ast.Name) and node.targets[0].id == VARIABLE:
            try:
                found = ast.literal_eval(node.value)
            except ValueError:
                return None, [f"{path}: {VARIABLE} holds something other than plain data "
                              f"(numbers, strings, lists, mappings), expected llmhost-tune's output"]
        elif not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)):
            return None, [f"{path}: line {node.lineno}: found code, expected only the assignment "
                          f"of {VARIABLE} (the file is read as data, never run)"]
    if not isinstance(found, dict):
        return None, [f"{path}: found no {VARIABLE} mapping, expected {VARIABLE} = "
                      f"{{service name: profile}}"]
    return found, []


def entry_problems(where: str, entry: Any) -> list[str]:
    """What is wrong with one service's entry, besides its settings' values."""
    if not isinstance(entry, dict):
        return [f"{where}: found {entry!r}, expected a mapping (profile, date, build_commit, "
                f"goal, settings)"]
    problems = [f"{where}.{key}: found nothing, expected a string" for key in
                ("profile", "date", "build_commit", "goal") if not isinstance(entry.get(key), str)]
    if not isinstance(entry.get("settings"), dict):
        problems.append(f"{where}.settings: found {entry.get('settings')!r}, expected a mapping of "
                        f"setting to value")
    return problems


def render(host_name: str, services: dict[str, dict], notes: dict[str, dict[str, str]],
           preamble: list[str]) -> str:
    """The profile file: ``services`` name -> entry (as read() returns them), each setting with
    the measurement that chose it from ``notes`` (name -> setting -> comment) on its line."""
    lines = [HEADER, f"# Host {host_name}: each service's tuned values; the measurement that "
                     f"chose each is beside it.", *[f"# {line}" for line in preamble],
             f"{VARIABLE} = {{"]
    for name, entry in services.items():
        lines.append(f"    {name!r}: {{")
        for key in ("profile", "date", "build_commit", "model_sha256", "goal"):
            if entry.get(key) is not None:
                lines.append(f"        {key!r}: {entry[key]!r},")
        lines.append("        'settings': {")
        for key, value in entry["settings"].items():
            note = notes.get(name, {}).get(key)
            lines.append(f"            {key!r}: {value!r},{f'  # {note}' if note else ''}")
        lines.append("        },")
        lines.append("    },")
    lines.append("}")
    return "\n".join(lines) + "\n"

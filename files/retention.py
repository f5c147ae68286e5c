#!/usr/bin/env python3
"""List, or remove, the llama.cpp builds, sources and model versions the deploy keeps on a host.

Runs on the host (python3 standard library only). Two modes:

    retention.py --install-dir D --model-dir M --list
        prints one JSON object: every stored version (kind, path, mtime, bytes) and the text of
        every llama-*.service unit and saved rollback unit (what points at them)
    retention.py --install-dir D --model-dir M --remove   (a JSON list of paths on stdin)
        removes them, each only if it is a version folder under D or M and no live unit and no
        rollback unit names it at this moment; prints what it freed

The deploy decides what goes (llmhost.retention.plan); this checks again when it acts, so a
unit switched in between still keeps its build and model.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys

UNIT_GLOBS = ("/etc/systemd/system/llama-*.service", "/var/lib/llmhost/units/*.previous")


def size_of(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def versions(install_dir: str, model_dir: str) -> list[dict]:
    """Builds (with their .log), sources, and model folders (hf: owner--repo/commit12, local-sha12).
    No sizes: walking every file of every build on each deploy would slow the no-op rerun; the
    removal says what it freed."""
    found = []
    patterns = (("build", f"{install_dir}/builds/*/"), ("source", f"{install_dir}/src/*/"),
                ("model", f"{model_dir}/*--*/*/"), ("model", f"{model_dir}/local-*/"))
    for kind, pattern in patterns:
        for path in sorted(glob.glob(pattern)):
            path = path.rstrip("/")
            if path.endswith(".partial"):
                continue  # an unfinished source or download: its own step resumes or replaces it
            found.append({"kind": kind, "path": path, "mtime": os.stat(path).st_mtime})
    return found


def unit_texts() -> dict[str, str]:
    texts = {}
    for pattern in UNIT_GLOBS:
        for path in sorted(glob.glob(pattern)):
            try:
                with open(path) as f:
                    texts[path] = f.read()
            except OSError:
                pass
    return texts


def removable(path: str, install_dir: str, model_dir: str) -> str | None:
    """Why ``path`` may not be removed, or None."""
    real = os.path.realpath(path)
    roots = [os.path.realpath(p) for p in (f"{install_dir}/builds", f"{install_dir}/src", model_dir)]
    parent = os.path.dirname(real)
    if not any(parent == root or os.path.dirname(parent) == root for root in roots):
        return "not a version folder of the deploy's own folders"
    for unit, text in unit_texts().items():
        if path.rstrip("/") + "/" in text:
            return f"{unit} points at it"
    return None


def remove(paths: list[str], install_dir: str, model_dir: str) -> int:
    freed = 0
    for path in paths:
        if not os.path.isdir(path):
            continue
        why = removable(path, install_dir, model_dir)
        if why:
            print(f"retention: kept {path}: {why}", flush=True)
            continue
        size = size_of(path)
        shutil.rmtree(path)
        if os.path.exists(path + ".log"):  # a build's log sits beside it
            size += os.path.getsize(path + ".log")
            os.unlink(path + ".log")
        parent = os.path.dirname(path)
        if parent != model_dir.rstrip("/") and os.path.isdir(parent) and not os.listdir(parent):
            os.rmdir(parent)  # an owner--repo folder left empty
        freed += size
        print(f"retention: removed {path} ({size / 1e6:.0f} MB)", flush=True)
    print(f"retention: freed {freed / 1e6:.0f} MB", flush=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--install-dir", required=True)
    parser.add_argument("--model-dir", required=True)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--list", action="store_true")
    mode.add_argument("--remove", action="store_true", help="paths as a JSON list on stdin")
    args = parser.parse_args()
    if args.list:
        print(json.dumps({"versions": versions(args.install_dir, args.model_dir),
                          "units": unit_texts()}))
        return 0
    return remove(json.load(sys.stdin), args.install_dir, args.model_dir)


if __name__ == "__main__":
    sys.exit(main())

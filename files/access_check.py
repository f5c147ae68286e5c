#!/usr/bin/env python3
"""Can a service's user open every file its command names? Runs on the host (python3 standard
library only): the unit switch (switch_service.py) asks it when a switch fails, and the host
suite runs it for every service.

A running llama-server keeps the files it has open or mapped, so a model, key or library made
unreadable under it shows nothing until the next start, which then fails (and so does a
rollback to a unit naming the same files). This opens each file as the service's own user.

    access_check.py --user llama [--libraries-of BINARY] PATH...

prints one line per file the user cannot open ("PATH: Permission denied"), nothing when all
open, and exits 1 when any cannot. As root with --user, it runs itself again as that user
(runuser); the libraries of BINARY are the shared objects in its folder (llama.cpp's build).
"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys


def libraries_of(binary: str) -> list[str]:
    return sorted(glob.glob(os.path.join(os.path.dirname(binary), "*.so*")))


def problems(paths: list[str], executables: list[str]) -> list[str]:
    """'PATH: reason' for each path this process cannot open for reading (or run, for
    ``executables``)."""
    found = []
    for path in paths:
        try:
            with open(path, "rb"):
                pass
        except OSError as error:
            found.append(f"{path}: {error.strerror}")
            continue
        if path in executables and not os.access(path, os.X_OK):
            found.append(f"{path}: not executable")
    return found


def as_user(user: str, paths: list[str], binary: str | None = None) -> list[str]:
    """problems() as ``user`` (this process must be root)."""
    args = [f"--libraries-of={binary}"] if binary else []
    result = subprocess.run(["runuser", "-u", user, "--", sys.executable, os.path.abspath(__file__),
                             *args, *paths], capture_output=True, text=True, timeout=60)
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    if result.returncode not in (0, 1):
        lines.append(f"could not check as {user}: {result.stderr.strip()[-300:]}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--user", help="check as this user (run as root)")
    parser.add_argument("--libraries-of", dest="binary", help="also the shared objects beside it")
    parser.add_argument("paths", nargs="*")
    args = parser.parse_args()
    if args.user:
        lines = as_user(args.user, args.paths, args.binary)
    else:
        paths = list(args.paths) + (libraries_of(args.binary) if args.binary else [])
        lines = problems(paths, [args.binary] if args.binary else [])
    for line in lines:
        print(line, flush=True)
    return 1 if lines else 0


if __name__ == "__main__":
    sys.exit(main())

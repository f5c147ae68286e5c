#!/usr/bin/env python3
"""Verify a model file staged on the host and move it into place with its record.

Runs on the target host (python3 stdlib only). The service only ever points at a path that got
here: the staged file is hashed, and only a match is renamed into place (atomic, same folder)
and recorded beside it, so a rerun can trust size + record without hashing gigabytes again.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--staged", required=True)
    parser.add_argument("--dest", required=True)
    parser.add_argument("--sha256", required=True)
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--record-json", default="{}", help="extra fields for the record")
    args = parser.parse_args()

    started = time.monotonic()
    size = os.path.getsize(args.staged)
    if size != args.size:
        os.unlink(args.staged)
        print(f"{args.dest}: staged file has {size} bytes, expected {args.size}; removed", flush=True)
        return 2
    digest = sha256_of(args.staged)
    if digest != args.sha256:
        os.unlink(args.staged)
        print(f"{args.dest}: sha256 {digest} does not match the expected {args.sha256}; removed",
              flush=True)
        return 3
    os.chmod(args.staged, 0o644)
    os.chown(args.staged, 0, 0)  # uploaded as the login user when the deploy runs with sudo
    os.replace(args.staged, args.dest)
    # The mtime lets a rerun notice a file rewritten in place without hashing it again.
    record = {**json.loads(args.record_json), "sha256": digest, "size": size,
              "mtime_ns": os.stat(args.dest).st_mtime_ns}
    tmp = args.dest + ".record.json.tmp"
    with open(tmp, "w") as f:
        json.dump(record, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, args.dest + ".record.json")
    print(f"{args.dest}: verified sha256 {digest[:16]}..., {size} bytes, "
          f"in {time.monotonic() - started:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

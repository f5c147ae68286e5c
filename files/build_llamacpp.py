#!/usr/bin/env python3
"""Configure and build llama.cpp on the host, printing progress at most every 10 seconds.

Runs on the target host (python3 stdlib only). The build directory is keyed by commit and flags
by the caller; a build is usable only once its marker file exists, and the marker is written
after the binary has proven it is the pinned commit. An interrupted build resumes where ninja
left off on the next run. The full log stays beside the build for failures.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time

MARKER = ".llmhost-build.json"
PROGRESS_EVERY = 10.0


def log(message: str) -> None:
    print(message, flush=True)


def run_logged(cmd: list[str], log_path: str, label: str, env: dict[str, str]) -> int:
    """Run cmd with output appended to log_path; print ninja's [n/m] every PROGRESS_EVERY s.

    The progress line comes from a timer, not from the output: ninja is silent for minutes
    while nvcc compiles one large CUDA file.
    """
    started = time.monotonic()
    last_step = [""]
    with open(log_path, "a", encoding="utf-8", errors="replace") as logf:
        logf.write(f"\n$ {' '.join(cmd)}\n")
        logf.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace", env=env)

        def read() -> None:
            for line in proc.stdout:
                logf.write(line)
                step = re.match(r"^\[(\d+)/(\d+)\]", line)
                if step:
                    done, total = int(step.group(1)), int(step.group(2))
                    last_step[0] = f"{done}/{total} ({100 * done // total}%)"

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        while True:
            reader.join(PROGRESS_EVERY)
            if not reader.is_alive():
                break
            log(f"{label}: {last_step[0] or 'running'} after {time.monotonic() - started:.0f}s")
        code = proc.wait()
    log(f"{label}: {'done' if code == 0 else f'failed ({code})'} in {time.monotonic() - started:.0f}s")
    return code


def tail(path: str, lines: int = 25) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return "".join(f.readlines()[-lines:])


def version_output(build_dir: str) -> str:
    # llama-server --version prints to stderr.
    result = subprocess.run([os.path.join(build_dir, "bin", "llama-server"), "--version"],
                            capture_output=True, text=True, timeout=60)
    return result.stdout + result.stderr


def system_info(build_dir: str) -> str:
    """The system_info line (trace verbosity) of the built server. It is printed before the model
    loads, so a model that does not exist is enough; port 0 binds nothing anyone uses."""
    result = subprocess.run(
        [os.path.join(build_dir, "bin", "llama-server"), "-lv", "4", "--host", "127.0.0.1",
         "--port", "0", "--model", "/nonexistent/llmhost-probe.gguf"],
        capture_output=True, text=True, timeout=120)
    for line in (result.stdout + result.stderr).splitlines():
        if "system_info:" in line:
            return line.split("system_info:", 1)[1].strip()
    return ""


def system_info_problems(info: str, expectations: list[str]) -> list[str]:
    """KEY=VALUE expectations; FA_QUANTS lists pairs that must all be compiled in."""
    found = {k: v.strip() for k, v in re.findall(r"(\w+) = ([^|]+)", info)}
    problems = []
    for expectation in expectations:
        key, _, value = expectation.partition("=")
        have = found.get(key)
        if key == "FA_QUANTS" and have is not None:
            missing = set(value.split(",")) - set(have.split(","))
            if missing:
                problems.append(f"FA_QUANTS = {have} lacks {','.join(sorted(missing))}")
        elif have != value:
            problems.append(f"{key} = {have} (expected {value})")
    return problems


def built_files(build_dir: str) -> dict[str, list[int]]:
    """Every file of bin/ (the binaries and the libraries beside them): size and mtime, so a
    rerun notices one deleted or replaced without hashing it (llmhost.facts.BuildState)."""
    files = {}
    bin_dir = os.path.join(build_dir, "bin")
    for name in sorted(os.listdir(bin_dir)):
        path = os.path.join(bin_dir, name)
        if os.path.isfile(path) and not os.path.islink(path):
            st = os.stat(path)
            files[f"bin/{name}"] = [st.st_size, st.st_mtime_ns]
    return files


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--src", required=True)
    parser.add_argument("--build-dir", required=True)
    parser.add_argument("--commit", required=True)
    parser.add_argument("--targets", required=True, help="comma-separated ninja targets")
    parser.add_argument("--jobs", type=int, default=0)
    parser.add_argument("--ccache-dir", default="")
    parser.add_argument("--cmake-flag", action="append", default=[])
    parser.add_argument("--remove", action="append", help="a file of bin/ to build again")
    parser.add_argument("--expect-system-info", action="append", default=[],
                        help="KEY=VALUE that system_info must show, e.g. ARCHS=900")
    args = parser.parse_args()

    marker = os.path.join(args.build_dir, MARKER)
    if os.path.exists(marker):
        log(f"build {args.build_dir} is complete; nothing to do")
        return 0
    # Files of an earlier build that were replaced by hand: ninja would take a newer file for an
    # up-to-date one, so they go and are linked again (missing ones it notices by itself).
    for name in args.remove or ():
        path = os.path.join(args.build_dir, name)
        log(f"build: {name} was deleted or replaced since the build was verified: building it again")
        if os.path.isfile(path):
            os.unlink(path)
    os.makedirs(args.build_dir, exist_ok=True)
    log_path = args.build_dir + ".log"
    env = dict(os.environ)
    if args.ccache_dir:
        os.makedirs(args.ccache_dir, exist_ok=True)
        env["CCACHE_DIR"] = args.ccache_dir
        # Sources live under a per-commit folder: hash relative paths so a new commit still hits.
        env["CCACHE_BASEDIR"] = os.path.dirname(os.path.abspath(args.src))
        env["CCACHE_NOHASHDIR"] = "true"
    jobs = args.jobs or os.cpu_count() or 1
    started = time.monotonic()

    configure = ["cmake", "-S", args.src, "-B", args.build_dir, "-G", "Ninja", *args.cmake_flag]
    if run_logged(configure, log_path, "configure", env):
        log(f"configure failed; log {log_path}:\n{tail(log_path)}")
        return 1
    build = ["cmake", "--build", args.build_dir, "--parallel", str(jobs), "--target",
             *args.targets.split(",")]
    if run_logged(build, log_path, "build", env):
        log(f"build failed; log {log_path}:\n{tail(log_path)}")
        return 1

    version = version_output(args.build_dir)
    if args.commit[:8] not in version:
        log(f"build check failed: llama-server --version does not name commit {args.commit[:8]}:\n"
            f"{version}")
        return 2
    if args.expect_system_info:
        info = system_info(args.build_dir)
        problems = system_info_problems(info, args.expect_system_info)
        if problems:
            log(f"build check failed: system_info does not show what this host needs: "
                f"{'; '.join(problems)}\nsystem_info: {info}")
            return 2
        log(f"system_info: {info}")
    record = {"commit": args.commit, "flags": args.cmake_flag, "targets": args.targets.split(","),
              "version": version.strip().splitlines()[-2:], "seconds": round(time.monotonic() - started),
              "files": built_files(args.build_dir)}
    tmp = marker + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, marker)
    log(f"build {args.build_dir} verified: {version.strip().splitlines()[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

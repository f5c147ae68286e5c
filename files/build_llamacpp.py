#!/usr/bin/env python3
"""Configure and build llama.cpp on the host, printing progress at most every 10 seconds.

Runs on the target host (python3 stdlib only). The build directory is keyed by commit and flags
by the caller; a build is usable only once its marker file exists, and the marker is written
after the binary has computed on this host's CPU (a short llama-bench on a tiny model) and proven
it is the pinned commit. Where the CPU code faults (SIGILL: the CPU's CPUID lists instructions
its hypervisor does not let it run), the build is redone for the next CPU baseline given, in the
same folder; the marker records the baseline that ran and the faults seen. An interrupted build
resumes where ninja left off on the next run. The full log stays beside the build for failures.

A build made on another host of the fleet (its artefact: bin/ and its record, from the
controller's cache, llmhost.buildcache) is taken only once it passes the same checks here: the
sha256 the cache recorded for the whole artefact and for each file, the CPU self-test on this
CPU, the commit in --version and system_info; an artefact that fails one is refused with the
reason, removed, and the build is made here instead. ``--pack`` makes such an artefact of a
verified build, for the controller to fetch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import hashlib
import io
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time

import tiny_gguf  # beside this file on the host (files/)

MARKER = ".llmhost-build.json"
FAULTS = ".llmhost-cpu-faults.json"   # baselines whose code faulted here: never tried again
SELFTEST_MODEL = "selftest.gguf"      # the tiny model of the CPU self-test (files/tiny_gguf.py)
SELFTEST_TIMEOUT = 300
# How code for instructions the CPU does not run dies (an abort, an OOM kill or a timeout is a
# broken build or host, not a baseline to drop).
FAULT_SIGNALS = ("SIGILL", "SIGSEGV", "SIGBUS")
PROGRESS_EVERY = 10.0
# Inside an artefact: what it holds and their sha256, and the build's record (llmhost.buildcache).
ARTEFACT_RECORD = "artefact.json"
RECORD_KEYS = ("commit", "flags", "cpu", "targets", "version")


class BuildError(RuntimeError):
    """configure or build failed (its exit code); the log says why."""


class SelfTestError(RuntimeError):
    """The self-test failed without a fault of the CPU: a broken build, not a baseline to drop."""


class CpuFaultError(RuntimeError):
    """No baseline tried runs on this CPU."""


class Refused(RuntimeError):
    """A build artefact from the cache failed a check here (the reason); it is not used."""


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


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def identity_problems(build_dir: str, commit: str, expectations: list[str]) -> tuple[list[str], str, str]:
    """(what is wrong, --version's output, system_info): the commit must be in --version and
    system_info must show every expectation. Run for a build made here and one received."""
    version = version_output(build_dir)
    if commit[:8] not in version:
        return [f"llama-server --version does not name commit {commit[:8]}:\n{version}"], version, ""
    info = ""
    if expectations:
        info = system_info(build_dir)
        problems = system_info_problems(info, expectations)
        if problems:
            return [f"system_info does not show what this host needs: {'; '.join(problems)}\n"
                    f"system_info: {info}"], version, info
    return [], version, info


def write_marker(build_dir: str, record: dict) -> None:
    """The marker, written last and atomically: the build is usable from here on."""
    marker = os.path.join(build_dir, MARKER)
    tmp = marker + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, marker)


def selftest_line(cpu: dict, model: str) -> str:
    pp, tg = (f"{v:.0f}" for v in (cpu["rates"].get("pp32", 0), cpu["rates"].get("tg8", 0)))
    return (f"CPU self-test: the {cpu['baseline']} build computes on this CPU in "
            f"{cpu['selftest_seconds']:.2f}s (llama-bench on a {os.path.getsize(model) >> 20} MB "
            f"model, CPU only: pp32 {pp} t/s, tg8 {tg} t/s)")


def pack(build_dir: str, out: str, key: str) -> int:
    """A verified build's artefact at ``out`` (.tar.gz: bin/ and ARTEFACT_RECORD, with every
    file's sha256 and the build's record), and ``out``.json with the artefact's own sha256, which
    the controller checks the copy it fetched against."""
    try:
        with open(os.path.join(build_dir, MARKER)) as f:
            marker = json.load(f)
    except (OSError, ValueError) as error:
        log(f"build artefact: {build_dir} has no readable marker ({error}): not packed")
        return 1
    files, links = {}, {}
    bin_dir = os.path.join(build_dir, "bin")
    for name in sorted(os.listdir(bin_dir)):
        path = os.path.join(bin_dir, name)
        if os.path.islink(path):
            links[f"bin/{name}"] = os.readlink(path)
        elif os.path.isfile(path):
            files[f"bin/{name}"] = sha256_file(path)
    record = {"key": key, "files": files, "links": links,
              "record": {k: marker.get(k) for k in RECORD_KEYS}}
    partial = out + ".partial"
    # gzip level 1: a CUDA build's libggml-cuda.so is hundreds of MB, sent over SSH twice.
    with tarfile.open(partial, "w:gz", compresslevel=1) as tar:
        data = json.dumps(record, indent=1).encode()
        info = tarfile.TarInfo(ARTEFACT_RECORD)
        info.size, info.mode, info.mtime = len(data), 0o644, int(time.time())
        tar.addfile(info, io.BytesIO(data))
        for name in [*files, *links]:
            tar.add(os.path.join(build_dir, name), arcname=name, recursive=False)
    digest, size = sha256_file(partial), os.path.getsize(partial)
    os.replace(partial, out)
    with open(out + ".json", "w") as f:
        json.dump({"key": key, "sha256": digest, "size": size}, f)
    log(f"build artefact {key[:12]}: packed {len(files)} files and {len(links)} links of "
        f"{build_dir}, {size / 2**20:.1f} MiB, sha256 {digest}")
    return 0


def _members(tar: tarfile.TarFile, record: dict) -> list[tarfile.TarInfo]:
    """The artefact's files and links, exactly those its record lists, each a plain name under
    bin/ (nothing written outside the build folder)."""
    listed = set(record.get("files", {})) | set(record.get("links", {}))
    found = {}
    for member in tar.getmembers():
        if member.name == ARTEFACT_RECORD:
            continue
        folder, _, name = member.name.partition("/")
        if folder != "bin" or not name or "/" in name or name in (".", ".."):
            raise Refused(f"it holds {member.name!r}, outside bin/")
        if not (member.isfile() or (member.issym() and "/" not in member.linkname)):
            raise Refused(f"{member.name} is neither a file nor a link within bin/")
        found[member.name] = member
    if set(found) != listed:
        raise Refused(f"its files differ from its record: {sorted(set(found) ^ listed)}")
    return [found[name] for name in sorted(found)]


def receive(args, model: str) -> int:
    """Put the artefact ``args.artefact`` in place as ``args.build_dir`` and verify it as a build
    made here is verified. 0 when it is in place with its marker; 1 when it was refused (the
    reason printed, nothing of it left behind)."""
    tag = f"build artefact {args.artefact_key[:12]}"
    log(f"{tag}: received from the controller's cache (built on {args.artefact_from}); verifying it")
    created = not os.path.isdir(args.build_dir)
    placed: list[str] = []
    try:
        digest = sha256_file(args.artefact)
        if digest != args.artefact_sha256:
            raise Refused(f"its sha256 is {digest}, the cache recorded {args.artefact_sha256}")
        try:
            tar = tarfile.open(args.artefact)
            record = json.load(tar.extractfile(ARTEFACT_RECORD))
        except (tarfile.TarError, KeyError, ValueError, TypeError) as error:
            raise Refused(f"it is not a readable artefact ({error})")
        with tar:
            if record.get("key") != args.artefact_key:
                raise Refused(f"it is the artefact of key {record.get('key')}, not {args.artefact_key}")
            members = _members(tar, record)
            os.makedirs(os.path.join(args.build_dir, "bin"), exist_ok=True)
            for member in members:
                path = os.path.join(args.build_dir, member.name)
                tmp = path + ".received"
                if os.path.lexists(tmp):
                    os.unlink(tmp)
                if member.issym():
                    os.symlink(member.linkname, tmp)
                else:
                    with tar.extractfile(member) as src, open(tmp, "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
                    os.chmod(tmp, 0o755)
                    found = sha256_file(tmp)
                    if found != record["files"][member.name]:
                        os.unlink(tmp)
                        raise Refused(f"{member.name} has sha256 {found}, its record says "
                                      f"{record['files'][member.name]}")
                os.replace(tmp, path)
                placed.append(path)
        cpu_built = (record.get("record") or {}).get("cpu") or {}
        baseline = cpu_built.get("baseline", "native")
        try:
            seconds, fault, output = selftest(args.build_dir, model)
        except (SelfTestError, subprocess.TimeoutExpired, OSError) as error:
            raise Refused(f"its CPU self-test failed here: {error}")
        if fault:
            raise Refused(f"its {baseline} CPU code faults on this CPU ({fault} in the CPU self-test)")
        problems, version, info = identity_problems(args.build_dir, args.commit, args.expect_system_info)
        if problems:
            raise Refused("; ".join(problems))
    except Refused as error:
        log(f"{tag} refused: {error}; building here instead")
        for path in placed:
            os.unlink(path)
        if created:
            shutil.rmtree(args.build_dir, ignore_errors=True)
        return 1
    finally:
        if os.path.exists(args.artefact):
            os.unlink(args.artefact)
    cpu = {"baseline": baseline, "flags": cpu_built.get("flags", []),
           "faults": cpu_built.get("faults", []), "selftest_seconds": round(seconds, 2),
           "rates": rates(output), "requested": args.cpu_baseline}
    line = fallback_line(cpu)
    if line:
        log(f"{line} (found on {args.artefact_from}, whose CPU is the same)")
    log(selftest_line(cpu, model))
    if info:
        log(f"system_info: {info}")
    write_marker(args.build_dir, {
        "commit": args.commit, "flags": args.cmake_flag, "cpu": cpu,
        "targets": args.targets.split(","), "version": version.strip().splitlines()[-2:],
        "seconds": 0, "files": built_files(args.build_dir),
        "received": {"key": args.artefact_key, "sha256": args.artefact_sha256,
                     "built_on": args.artefact_from}})
    log(f"{tag} verified: the sha256 of its {len(members)} files, the commit, system_info "
        f"and the CPU self-test")
    log(f"build {args.build_dir} verified: {version.strip().splitlines()[0]} "
        f"(received from {args.artefact_from}, not built here)")
    return 0


def signal_name(returncode: int) -> str | None:
    """SIGILL for a process killed by signal 4 (subprocess reports -4), else None."""
    if returncode >= 0:
        return None
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def selftest(build_dir: str, model: str) -> tuple[float, str | None, str]:
    """Compute on this host's CPU with the built llama-bench: a prompt of 32 tokens and 8
    generated ones on the tiny model, no layer offloaded and CUDA devices hidden, so a CUDA
    build computes on the CPU too. (seconds, the fault signal that killed it or None, its
    output); SelfTestError when it failed otherwise."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    cmd = [os.path.join(build_dir, "bin", "llama-bench"), "-m", model, "-p", "32", "-n", "8",
           "-r", "1", "-ngl", "0", "-o", "jsonl"]
    started = time.monotonic()
    result = subprocess.run(cmd, capture_output=True, text=True, errors="replace", env=env,
                            timeout=SELFTEST_TIMEOUT)
    seconds = time.monotonic() - started
    output = result.stdout + result.stderr
    fault = signal_name(result.returncode)
    if fault in FAULT_SIGNALS:
        return seconds, fault, output
    if result.returncode != 0:
        how = f"was killed by {fault}" if fault else f"exited {result.returncode}"
        raise SelfTestError(f"llama-bench {how}:\n{output[-2000:]}")
    if not rates(result.stdout):
        raise SelfTestError(f"llama-bench printed no result:\n{output[-2000:]}")
    return seconds, fault, output


def rates(jsonl: str) -> dict[str, float]:
    """llama-bench's tokens per second by test ("pp32", "tg8") from its jsonl lines."""
    found = {}
    for line in jsonl.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        test = f"pp{row['n_prompt']}" if row.get("n_prompt") else f"tg{row.get('n_gen')}"
        found[test] = float(row.get("avg_ts", 0))
    return found


def read_faults(path: str) -> dict[str, str]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def resolve_cpu_baseline(candidates: list[tuple[str, list[str]]], build, build_dir: str,
                         model: str, machine: str) -> dict:
    """Build each candidate baseline in turn and self-test it; the first that computes is the
    build. ``build(flags)`` configures and builds with the candidate's cmake flags, in the same
    folder (ninja recompiles only the CPU backend, whose flags changed). A fault is kept in the
    folder (FAULTS) as soon as it is seen, so a build interrupted or repaired later does not try
    that baseline again. Returns the build's CPU record; raises CpuFaultError when none runs."""
    faults_path = os.path.join(build_dir, FAULTS)
    known = read_faults(faults_path)
    faults = []
    for name, flags in candidates:
        if name in known:
            log(f"CPU self-test: {name} CPU code faulted on this CPU before ({known[name]}); "
                f"not tried again (remove {faults_path} to try it)")
            faults.append({"baseline": name, "signal": known[name]})
            continue
        if name.startswith("x86-64") and machine not in ("x86_64", "AMD64"):
            if len(candidates) == 1:
                raise CpuFaultError(f"{name} is an x86-64 baseline and this CPU is {machine}")
            log(f"CPU self-test: {name} is an x86-64 baseline and this CPU is {machine}; skipped")
            continue
        code = build(flags)
        if code:
            raise BuildError(code)
        seconds, fault, output = selftest(build_dir, model)
        if fault:
            log(f"CPU self-test: {name} CPU code faults on this CPU ({fault} in llama-bench "
                f"after {seconds:.1f}s); its last lines:\n{output.strip()[-600:]}")
            faults.append({"baseline": name, "signal": fault})
            known[name] = fault
            with open(faults_path, "w") as f:
                json.dump(known, f)
            continue
        return {"baseline": name, "flags": flags, "faults": faults,
                "selftest_seconds": round(seconds, 2), "rates": rates(output)}
    raise CpuFaultError(faults_text(faults))


def faults_text(faults: list[dict]) -> str:
    """"native CPU code faults on this CPU (SIGILL in the CPU self-test)"."""
    names = [f["baseline"] for f in faults]
    signals = sorted({f["signal"] for f in faults})
    listed = " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)
    return (f"{listed or 'no'} CPU code {'faults' if len(names) == 1 else 'fault'} on this CPU "
            f"({', '.join(signals)} in the CPU self-test)")


def fallback_line(record: dict) -> str | None:
    """The deploy's one line when the build is not for the first baseline tried."""
    if not record["faults"]:
        return None
    return f"{faults_text(record['faults'])}; built for {record['baseline']} instead"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--build-dir", required=True)
    parser.add_argument("--pack", metavar="OUT", help="make the artefact of the verified build "
                        "at OUT (and OUT.json); nothing else is done")
    parser.add_argument("--artefact", help="an artefact of this build from the controller's "
                        "cache: verified and used, else refused and the build made here")
    parser.add_argument("--artefact-sha256", default="", help="its sha256 as the cache recorded it")
    parser.add_argument("--artefact-key", default="", help="its key (llmhost.buildcache)")
    parser.add_argument("--artefact-from", default="another host", help="the host that built it")
    parser.add_argument("--src")
    parser.add_argument("--commit")
    parser.add_argument("--targets", help="comma-separated ninja targets")
    parser.add_argument("--jobs", type=int, default=0)
    parser.add_argument("--ccache-dir", default="")
    parser.add_argument("--cmake-flag", action="append", default=[])
    parser.add_argument("--cpu-baseline", default="native",
                        help="llm_cpu_baseline as set (auto or one baseline), for the record")
    parser.add_argument("--cpu-candidate", action="append", default=[],
                        help="NAME=FLAG,FLAG...: a CPU baseline and its cmake flags, best first")
    parser.add_argument("--remove", action="append", help="a file of bin/ to build again")
    parser.add_argument("--expect-system-info", action="append", default=[],
                        help="KEY=VALUE that system_info must show, e.g. ARCHS=900")
    args = parser.parse_args()
    if args.pack:
        return pack(args.build_dir, args.pack, args.artefact_key)
    if not (args.src and args.commit and args.targets):
        parser.error("--src, --commit and --targets are required to build")

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
    if args.artefact:
        # The self-test's model, beside the folder until the artefact is taken.
        model = f"{args.build_dir}.{SELFTEST_MODEL}"
        tiny_gguf.write(model)
        received = receive(args, model) == 0
        if received:
            os.replace(model, os.path.join(args.build_dir, SELFTEST_MODEL))
            return 0
        os.unlink(model)
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

    def build(cpu_flags: list[str]) -> int:
        configure = ["cmake", "-S", args.src, "-B", args.build_dir, "-G", "Ninja",
                     *args.cmake_flag, *cpu_flags]
        if run_logged(configure, log_path, "configure", env):
            log(f"configure failed; log {log_path}:\n{tail(log_path)}")
            return 1
        build_cmd = ["cmake", "--build", args.build_dir, "--parallel", str(jobs), "--target",
                     *args.targets.split(",")]
        if run_logged(build_cmd, log_path, "build", env):
            log(f"build failed; log {log_path}:\n{tail(log_path)}")
            return 1
        return 0

    candidates = [(name, [flag for flag in flags.split(",") if flag])
                  for name, _, flags in (c.partition("=") for c in args.cpu_candidate)]
    model = os.path.join(args.build_dir, SELFTEST_MODEL)
    tiny_gguf.write(model)
    try:
        cpu = resolve_cpu_baseline(candidates or [("native", [])], build, args.build_dir, model,
                                   platform.machine())
    except BuildError:
        return 1
    except SelfTestError as error:
        log(f"build check failed: the CPU self-test of {args.build_dir}: {error}")
        return 2
    except CpuFaultError as error:
        fix = ("expected a baseline that runs here: set llm_cpu_baseline to auto, or pin a lower "
               "baseline" if args.cpu_baseline != "auto" else "no baseline auto tries runs here")
        log(f"build check failed: {error}; llm_cpu_baseline is {args.cpu_baseline}: {fix} "
            f"(build {args.build_dir}, log {args.build_dir}.log)")
        return 3
    cpu["requested"] = args.cpu_baseline
    line = fallback_line(cpu)
    if line:
        log(line)
    log(selftest_line(cpu, model))
    problems, version, info = identity_problems(args.build_dir, args.commit, args.expect_system_info)
    if problems:
        log(f"build check failed: {problems[0]}")
        return 2
    if info:
        log(f"system_info: {info}")
    write_marker(args.build_dir, {
        "commit": args.commit, "flags": args.cmake_flag, "cpu": cpu,
        "targets": args.targets.split(","), "version": version.strip().splitlines()[-2:],
        "seconds": round(time.monotonic() - started), "files": built_files(args.build_dir)})
    log(f"build {args.build_dir} verified: {version.strip().splitlines()[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""llama.cpp: pinned source on the host, a build keyed by commit and flags, verified before use.

Layout under llm_install_dir:
    src/<commit>/                    the source, from git or pushed from the controller
    builds/<commit12>-<flags8>/      one build per commit, flag set and llm_cpu_baseline as set (auto
                                     is one build: the best baseline that runs here), marker written
                                     once verified; selftest.gguf, the CPU self-test's tiny model
    builds/<...>.log                 the build log, kept for failures (none for a build received
                                     from the controller's cache: llmhost.buildcache)
    ccache/                          shared by every build, so a flag change recompiles only what changed
A new commit or flag set builds beside the old build, which keeps serving until the unit switch.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import tempfile
from pathlib import Path

from pyinfra import host
from pyinfra.api import FileDownloadCommand, FileUploadCommand, FunctionCommand, operation

from llmhost import buildcache, remote
from llmhost.buildplan import TARGETS, cpu_candidates
from llmhost.facts import BuildHost, BuildState, JsonFile
from llmhost.settings import HostSettings

SOURCE_MARKER = ".llmhost-source"
BUILD_MARKER = ".llmhost-build.json"


def local_source_tarball(settings: HostSettings) -> str:
    """A .tar.gz of the pinned commit on the controller: the given tarball, or `git archive` of
    the given checkout (cached, so a rerun does not archive again)."""
    path = Path(settings.llamacpp_local_path)
    if path.is_file():
        return str(path)
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llmhost"
    cache.mkdir(parents=True, exist_ok=True)
    tarball = cache / f"llama.cpp-{settings.llamacpp_commit}.tar.gz"
    if not tarball.exists():
        with tempfile.NamedTemporaryFile(dir=cache, suffix=".partial", delete=False) as tmp:
            # One top-level folder, like a release tarball: source() strips it when unpacking.
            subprocess.run(["git", "-C", str(path), "archive", "--format=tar.gz", "-o", tmp.name,
                            f"--prefix=llama.cpp-{settings.llamacpp_commit[:12]}/",
                            settings.llamacpp_commit], check=True)
        os.replace(tmp.name, tarball)
    return str(tarball)


@operation()
def source(source_dir: str, commit: str, git_url: str | None = None, tarball: str | None = None):
    """Put llama.cpp's source at ``source_dir``, exactly ``commit``: a shallow fetch of that
    commit from ``git_url`` on the host, or ``tarball`` pushed from the controller (air-gapped
    hosts). It lands in a .partial folder and is moved into place with its marker, so an
    interrupted fetch is never taken for a source.

    + source_dir: where the source goes (llm_install_dir/src/<commit>)
    + commit: the full commit sha
    + git_url: the repository the host fetches from (source git)
    + tarball: a .tar.gz of the commit on the controller, one top folder (source local)

    **Example:**

    .. code:: python

        source(name="llama.cpp source", source_dir="/opt/llama.cpp/src/0c1e...",
               commit="0c1e...", git_url="https://github.com/ggml-org/llama.cpp")
    """
    if host.get_fact(JsonFile, path=f"{source_dir}/{SOURCE_MARKER}"):
        host.noop(f"llama.cpp source {commit[:12]} is present")
        return
    src, tmp = shlex.quote(source_dir), shlex.quote(source_dir + ".partial")
    marker = shlex.quote(f"{source_dir}.partial/{SOURCE_MARKER}")
    yield f"rm -rf {tmp} && mkdir -p {tmp}"
    if tarball is None:
        # A shallow fetch of the exact commit (GitHub serves any reachable sha).
        url, sha = shlex.quote(git_url), shlex.quote(commit)
        yield (f"git -C {tmp} init -q && git -C {tmp} fetch -q --depth 1 {url} {sha} "
               f"&& git -C {tmp} -c advice.detachedHead=false checkout -q FETCH_HEAD "
               f"&& test \"$(git -C {tmp} rev-parse HEAD)\" = {sha}")
    else:
        remote_tarball = f"{source_dir}.tar.gz"
        yield FileUploadCommand(tarball, remote_tarball)
        yield (f"tar -xzf {shlex.quote(remote_tarball)} -C {tmp} --strip-components=1 "
               f"&& rm -f {shlex.quote(remote_tarball)}")
    record = shlex.quote(json.dumps({"commit": commit, "from": "git" if tarball is None else "local"}))
    yield f"echo {record} > {marker} && rm -rf {src} && mv {tmp} {src}"


@operation()
def build(source_dir: str, build_dir: str, commit: str, cmake_flags: list[str],
          expected_system_info: list[str], jobs: int, ccache_dir: str, cpu_baseline: str = "auto",
          cache: str = "", key_inputs: dict | None = None):
    """Build llama-server and llama-bench, verified before use: the build computes on this
    host's CPU (a CPU self-test: llama-bench on a tiny model, CUDA hidden), --version must name
    ``commit`` and system_info show ``expected_system_info``, then a marker records the build's
    files and the CPU baseline it runs. Where the CPU code faults (SIGILL), ``cpu_baseline``
    auto rebuilds it for the next baseline in the same folder (only ggml's CPU backend
    recompiles) and says so in one line; a pinned baseline that faults fails the host. A
    complete build is never rebuilt; one whose recorded files were deleted or replaced is built
    again where it stands (ninja relinks just those; a running service keeps the files it has
    open until its restart behind the health gate).

    With a ``cache`` on the controller (llmhost.buildcache), a build of the same key made by
    another host is received instead: the first host of the run that needs the key builds it
    and sends its artefact to the cache, the hosts after it wait for that and get it pushed,
    then verify it here exactly as a build made here (sha256 of the artefact and each file, the
    CPU self-test, --version, system_info). An artefact that fails a check is refused with the
    reason and the build is made here (and replaces the cache's entry).

    + source_dir: the source (see source)
    + build_dir: the build's folder, keyed by commit and flags (llmhost.buildplan)
    + commit: what --version must name
    + cmake_flags: every -D of the build
    + expected_system_info: KEY=VALUE fragments system_info must show (CUDA archs, FA pairs)
    + jobs: parallel compile jobs, 0 for one per CPU
    + ccache_dir: ccache shared by every build of the host
    + cpu_baseline: llm_cpu_baseline: auto (native, else the first x86-64 level that runs) or one
      baseline (llmhost.buildplan.cpu_candidates)
    + cache: the controller's artefact folder (llm_build_cache), "" for none
    + key_inputs: what the artefact's key holds from the plan (llmhost.buildcache.key_inputs);
      the host's distribution, C library, machine and CPU are added here

    **Example:**

    .. code:: python

        build(name="llama.cpp build", source_dir=plan.source_dir, build_dir=plan.build_dir,
              commit=plan_commit, cmake_flags=list(plan.cmake_flags),
              expected_system_info=list(plan.expected_system_info), jobs=0,
              ccache_dir="/opt/llama.cpp/ccache", cpu_baseline="auto",
              cache="/home/me/.cache/llmhost/builds", key_inputs=buildcache.key_inputs(s, plan))
    """
    recorded = host.get_fact(BuildState, build_dir=build_dir)
    label = f"llama.cpp build {os.path.basename(build_dir)}"
    if recorded and recorded["files"] and not recorded["changed"]:
        if recorded.get("unreadable"):
            # chmod by hand under a running service: its next start would fail as its user.
            yield f"chmod 755 {' '.join(shlex.quote(p) for p in recorded['unreadable'])}"
        else:
            host.noop(f"{label} is complete")
        return
    args = ["--src", source_dir, "--build-dir", build_dir, "--commit", commit,
            "--targets", ",".join(TARGETS), "--jobs", str(jobs), "--ccache-dir", ccache_dir]
    # "=" form: argparse would take a bare "-DFOO" for an option of its own.
    args += [f"--cmake-flag={flag}" for flag in cmake_flags]
    args += [f"--expect-system-info={fragment}" for fragment in expected_system_info]
    args += [f"--cpu-baseline={cpu_baseline}"]
    args += [f"--cpu-candidate={name}={','.join(flags)}" for name, flags in cpu_candidates(cpu_baseline)]
    if recorded:  # its record no longer matches (or predates file records): verify it again
        args += [f"--remove={changed}" for changed in recorded["changed"]]
        yield f"rm -f {shlex.quote(f'{build_dir}/{BUILD_MARKER}')}"
    if not cache or key_inputs is None:
        yield remote.streamed(remote.helper_command("build_llamacpp.py", *args), label)
        return

    digest, inputs = buildcache.key(key_inputs, host.get_fact(BuildHost))
    if buildcache.executing():
        buildcache.announce(host, cache, digest)
        buildcache.wait_for_earlier(host, cache, digest)
    entry = buildcache.lookup(cache, digest)
    if entry:
        pushed = f"{build_dir}.artefact.tar.gz"
        yield FileUploadCommand(entry.tarball, pushed)
        args += [f"--artefact={pushed}", f"--artefact-sha256={entry.sha256}",
                 f"--artefact-key={digest}", f"--artefact-from={entry.built_on}"]
    yield remote.streamed(remote.helper_command("build_llamacpp.py", *args), label)
    # Built here (nothing in the cache, or the cache's artefact was refused): its artefact goes
    # to the cache for the hosts after this one.
    marker = host.get_fact(JsonFile, path=f"{build_dir}/{BUILD_MARKER}")
    if marker and "received" not in marker:
        yield from _send_to_cache(build_dir, cache, digest, inputs)


def _send_to_cache(build_dir: str, cache: str, digest: str, inputs: dict):
    """Pack the verified build on the host, fetch it, keep it in the cache (buildcache.store)."""
    packed = f"{build_dir}.artefact.tar.gz"
    os.makedirs(cache, exist_ok=True)
    fetched = os.path.join(cache, f".{digest}.{host.name}.fetched")
    yield remote.streamed(remote.helper_command("build_llamacpp.py", "--build-dir", build_dir,
                                                f"--pack={packed}", f"--artefact-key={digest}"),
                          f"llama.cpp build artefact {digest[:12]}")
    yield FileDownloadCommand(packed, fetched + ".tar.gz")
    yield FileDownloadCommand(packed + ".json", fetched + ".json")
    yield f"rm -f {shlex.quote(packed)} {shlex.quote(packed + '.json')}"
    yield FunctionCommand(buildcache.store, (cache, digest, inputs, fetched + ".tar.gz",
                                             fetched + ".json"), {})

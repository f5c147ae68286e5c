"""llama.cpp: pinned source on the host, a build keyed by commit and flags, verified before use.

Layout under llm_install_dir:
    src/<commit>/                    the source, from git or pushed from the controller
    builds/<commit12>-<flags8>/      one build per commit and flag set, marker written once verified
    builds/<...>.log                 the build log, kept for failures
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
from pyinfra.api import FileUploadCommand, operation

from llmhost import remote
from llmhost.buildplan import TARGETS, Build
from llmhost.facts import BuildState, JsonFile
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
def source(settings: HostSettings, build: Build):
    """Put the pinned source at src/<commit>, from git or from the controller."""
    if host.get_fact(JsonFile, path=f"{build.source_dir}/{SOURCE_MARKER}"):
        host.noop(f"llama.cpp source {settings.llamacpp_commit[:12]} is present")
        return
    src = shlex.quote(build.source_dir)
    tmp = shlex.quote(build.source_dir + ".partial")
    marker = shlex.quote(f"{build.source_dir}.partial/{SOURCE_MARKER}")
    yield f"rm -rf {tmp} && mkdir -p {tmp}"
    if settings.llamacpp_source == "git":
        # A shallow fetch of the exact commit (GitHub serves any reachable sha).
        url = shlex.quote(settings.llamacpp_git_url)
        commit = shlex.quote(settings.llamacpp_commit)
        yield (f"git -C {tmp} init -q && git -C {tmp} fetch -q --depth 1 {url} {commit} "
               f"&& git -C {tmp} -c advice.detachedHead=false checkout -q FETCH_HEAD "
               f"&& test \"$(git -C {tmp} rev-parse HEAD)\" = {commit}")
    else:
        remote_tarball = f"{build.source_dir}.tar.gz"
        yield FileUploadCommand(local_source_tarball(settings), remote_tarball)
        yield (f"tar -xzf {shlex.quote(remote_tarball)} -C {tmp} --strip-components=1 "
               f"&& rm -f {shlex.quote(remote_tarball)}")
    record = shlex.quote(json.dumps({"commit": settings.llamacpp_commit, "from": settings.llamacpp_source}))
    yield f"echo {record} > {marker} && rm -rf {src} && mv {tmp} {src}"


@operation()
def build(settings: HostSettings, build: Build):
    """Build the needed targets, verified before use; a complete build is never rebuilt, and
    one whose recorded files were deleted or replaced is built again where it stands (ninja
    relinks just those; a running service keeps the files it has open until its restart)."""
    recorded = host.get_fact(BuildState, build_dir=build.build_dir)
    name = os.path.basename(build.build_dir)
    if recorded and recorded["files"] and not recorded["changed"]:
        host.noop(f"llama.cpp build {name} is complete")
        return
    args = ["--src", build.source_dir, "--build-dir", build.build_dir,
            "--commit", settings.llamacpp_commit, "--targets", ",".join(TARGETS),
            "--jobs", str(settings.build_jobs), "--ccache-dir", f"{settings.install_dir}/ccache"]
    # "=" form: argparse would take a bare "-DFOO" for an option of its own.
    args += [f"--cmake-flag={flag}" for flag in build.cmake_flags]
    args += [f"--expect-system-info={fragment}" for fragment in build.expected_system_info]
    if recorded:  # its record no longer matches (or predates file records): verify it again
        args += [f"--remove={changed}" for changed in recorded["changed"]]
        yield f"rm -f {shlex.quote(f'{build.build_dir}/{BUILD_MARKER}')}"
    yield remote.streamed(remote.helper_command("build_llamacpp.py", *args),
                          f"llama.cpp build {os.path.basename(build.build_dir)}")

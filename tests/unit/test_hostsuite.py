"""The host suite ships in the package and runs only on a controller against a host: an import
it lost in a refactor would surface there as a collection error. Collecting it here catches that
in seconds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import llmhost.hostsuite

SUITE = Path(llmhost.hostsuite.__file__).parent


def test_the_packaged_host_suite_collects_without_errors():
    result = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                             "-p", "no:cacheprovider", str(SUITE)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    modules = {line.split("::")[0].rsplit("/", 1)[-1] for line in result.stdout.splitlines()
               if "::" in line}
    assert modules == {p.name for p in SUITE.glob("test_*.py")}, result.stdout[-3000:]

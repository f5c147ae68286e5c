"""The contract between the deploy and what reads its result: intent comes from the typed
manifest (llmhost.manifest), never from parsing llama-server's argv or cmake's flags back.

Reading /proc/PID/cmdline to compare it whole with the manifest's argv is checking, not
recovering intent, and stays allowed; taking options out of it, or pairs out of a cmake flag, is
what this guards against."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
READERS = sorted([*REPO.glob("operations/*.py"), *REPO.glob("files/*.py"), *REPO.glob("tests/host/*.py")])
FORBIDDEN = [
    (re.compile(r"def \w*parse\w*argv"), "a parser of llama-server's argv"),
    (re.compile(r"GGML_CUDA_FA_QUANTS"), "the cmake flag of the FA pairs"),
]
# The one writer of each: the argv (flags.py), the cmake flags and the pairs (buildplan.py), and the
# settings that refuse those options in extra_args (settings.py).
WRITERS = {"operations/flags.py", "operations/buildplan.py", "operations/settings.py"}


def test_no_reader_recovers_intent_from_argv_or_cmake_flags():
    found = []
    for path in READERS:
        name = str(path.relative_to(REPO))
        if name in WRITERS:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for pattern, what in FORBIDDEN:
                if pattern.search(line):
                    found.append(f"{name}:{number}: {what}: {line.strip()}")
    assert not found, "\n".join(found)


def test_the_guard_sees_what_it_forbids(tmp_path):
    """The patterns match what the bench and the host suite once did."""
    old = 'def parse_server_argv(argv):\nquants = flags.get("GGML_CUDA_FA_QUANTS")\n'
    assert all(pattern.search(old) for pattern, _ in FORBIDDEN)

"""`bash .ci/demo`'s main job (python -m tests.support.demo, after the set-up): a fresh sandbox
host serves an answer, and the deploy's progress is printed as it happens, a line at least every
15 s, never only at the end."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.support.deployment import REPO

pytestmark = pytest.mark.e2e

MAX_SILENCE = 15.0


def test_demo_serves_an_answer_and_shows_progress_while_it_works():
    process = subprocess.Popen([sys.executable, "-u", "-m", "tests.support.demo"], cwd=REPO,
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    lines: list[tuple[float, str]] = []
    for line in process.stdout:
        lines.append((time.monotonic(), line.rstrip()))
    assert process.wait(timeout=60) == 0, "\n".join(text for _, text in lines[-60:])
    texts = [text for _, text in lines]
    start = next(i for i, text in enumerate(texts) if text.startswith("==> pyinfra "))
    end = next(i for i, text in enumerate(texts) if "--> Results:" in text)
    deploy = lines[start:end + 1]
    assert end - start > 20, texts[start:end + 1]  # the deploy's own lines, not a summary
    gaps = [(b[0] - a[0], b[1]) for a, b in zip(deploy, deploy[1:])]
    worst = max(gaps)
    assert worst[0] <= MAX_SILENCE, f"{worst[0]:.1f}s of silence before: {worst[1]}"
    answer = texts[texts.index(next(t for t in texts if t.startswith("==> Served answer"))) + 1]
    assert "France" in answer or "Paris" in answer, answer

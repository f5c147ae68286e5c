"""files/build_llamacpp.py: the checks a build must pass before it is used, and its progress."""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "files"))
import build_llamacpp as helper  # noqa: E402

# Recorded on the H100 on 2026-11-24 (the build log of a deploy there), a build for arch 90.
H100_INFO = ("n_threads = 16 (n_threads_batch = 16) / 16 | CUDA : ARCHS = 900 | USE_GRAPHS = 1 | "
             "FA_QUANTS = f16-f16,q4_0-q8_0,q8_0-q8_0 | CPU : SSE3 = 1 | AVX2 = 1 | OPENMP = 1 |")


def test_h100_build_shows_its_arch_and_pairs():
    assert helper.system_info_problems(H100_INFO, ["ARCHS=900", "FA_QUANTS=f16-f16,q4_0-q8_0"]) == []


@pytest.mark.parametrize("expected,problem", [
    (["ARCHS=1200"], "ARCHS = 900 (expected 1200)"),
    (["FA_QUANTS=f16-f16,q4_0-q4_0"], "FA_QUANTS = f16-f16,q4_0-q8_0,q8_0-q8_0 lacks q4_0-q4_0"),
    # An H100 never prints it: a Blackwell host whose build lacks 12x code fails the same way.
    (["BLACKWELL_NATIVE_FP4=1"], "BLACKWELL_NATIVE_FP4 = None (expected 1)"),
])
def test_missing_arch_pair_or_fp4_is_named(expected, problem):
    assert helper.system_info_problems(H100_INFO, expected) == [problem]


def test_progress_is_printed_on_a_timer_while_the_build_is_silent(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(helper, "PROGRESS_EVERY", 0.5)
    code = helper.run_logged(["bash", "-c", "echo '[1/4] a'; sleep 1.8; echo '[4/4] d'"],
                             str(tmp_path / "log"), "build", dict(os.environ))
    lines = capsys.readouterr().out.splitlines()
    assert code == 0
    assert sum(line.startswith("build: 1/4 (25%) after") for line in lines) >= 2
    assert lines[-1].startswith("build: done in")
    assert "[4/4] d" in (tmp_path / "log").read_text()

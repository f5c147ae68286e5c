"""files/build_llamacpp.py: the checks a build must pass before it is used (its CPU self-test and
the fallback to a lower CPU baseline included, with a real process that dies of SIGILL), and its
progress."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pyinfra.context import ctx_host

from llmhost import llamacpp
from llmhost.buildplan import cpu_baseline_flags
from llmhost.facts import BuildState

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


# --- The CPU self-test and the fallback, through the helper as the deploy runs it -------------
# A stand-in cmake on PATH: configure records the -D flags, build writes a llama-server that
# names the commit and a llama-bench that, in a folder configured with FAULTS_ON, kills itself
# with SIGILL as native code does on the H200 VM, and otherwise prints llama-bench's jsonl.
# (FAULTS_ON: an extended regex of whole flag lines.)
FAKE_CMAKE = r"""#!/bin/bash
set -e
if [ "$1" = --build ]; then
    dir=$2; mkdir -p "$dir/bin"
    printf '#!/bin/sh\necho "version: 11312 (0c1e5709)" >&2\necho "built with cc" >&2\n' > "$dir/bin/llama-server"
    if grep -qxE -- "$FAULTS_ON" "$dir/flags"; then
        printf '#!/bin/sh\nkill -ILL $$\n' > "$dir/bin/llama-bench"
    else
        printf '#!/bin/sh\necho "CUDA_VISIBLE_DEVICES=[${CUDA_VISIBLE_DEVICES-unset}] $*" >> "%s/bench-calls"\necho '"'"'{"n_prompt": 32, "n_gen": 0, "avg_ts": 900.5}'"'"'\necho '"'"'{"n_prompt": 0, "n_gen": 8, "avg_ts": 95.25}'"'"'\n' "$dir" > "$dir/bin/llama-bench"
    fi
    chmod +x "$dir/bin/"*
    echo build >> "$dir/../cmake-calls"
else
    dir=$4; mkdir -p "$dir"
    shift 6; printf '%s\n' "$@" > "$dir/flags"
    echo "configure $(grep -o 'GGML_NATIVE=[A-Z]*\|GGML_AVX512=[A-Z]*\|GGML_AVX2=[A-Z]*' "$dir/flags" | tr '\n' ' ')" >> "$dir/../cmake-calls"
fi
"""


def run_helper(tmp_path, baseline: str, faults_on: str, fake_bin: Path | None = None):
    """The helper's command line as llamacpp.build writes it, run here with the stand-in cmake."""
    if fake_bin is None:
        fake_bin = tmp_path / "fakebin"
        fake_bin.mkdir(exist_ok=True)
        (fake_bin / "cmake").write_text(FAKE_CMAKE)
        (fake_bin / "cmake").chmod(0o755)

    class Host:
        def get_fact(self, cls, **kwargs):
            assert cls is BuildState
            return None

    with ctx_host.use(Host()):
        (command,) = llamacpp.build._inner(
            source_dir=str(tmp_path / "src"), build_dir=str(tmp_path / "builds" / "b"),
            commit="0c1e57098bba43ac29e6e3b677cdceebdd22334f", cmake_flags=["-DGGML_CUDA=OFF"],
            expected_system_info=[], jobs=1, ccache_dir="", cpu_baseline=baseline)
    command = str(command).replace("/usr/local/lib/llmhost/", str(HELPER_DIR) + "/")
    # A GPU visible to the deploy: the self-test must hide it.
    env = {**os.environ, "PATH": f"{fake_bin}:{os.environ['PATH']}", "FAULTS_ON": faults_on,
           "CUDA_VISIBLE_DEVICES": "0"}
    return subprocess.run(["sh", "-c", command], capture_output=True, text=True, env=env, timeout=120)


HELPER_DIR = Path(__file__).resolve().parents[2] / "files"


def calls(tmp_path) -> list[str]:
    return (tmp_path / "builds" / "cmake-calls").read_text().split("\n")[:-1]


def marker(tmp_path) -> dict:
    return json.loads((tmp_path / "builds" / "b" / helper.MARKER).read_text())


def test_native_code_that_dies_of_sigill_is_rebuilt_for_v4_in_the_same_folder(tmp_path):
    result = run_helper(tmp_path, "auto", faults_on="-DGGML_NATIVE=ON")
    assert result.returncode == 0, result.stdout + result.stderr
    assert ("native CPU code faults on this CPU (SIGILL in the CPU self-test); built for "
            "x86-64-v4 instead") in result.stdout
    assert result.stdout.count("\nbuild: done in ") == 2
    assert "CPU self-test: the x86-64-v4 build computes on this CPU in " in result.stdout
    assert "pp32 900 t/s, tg8 95 t/s" in result.stdout
    assert calls(tmp_path) == ["configure GGML_NATIVE=ON ", "build",
                               "configure GGML_NATIVE=OFF GGML_AVX2=ON GGML_AVX512=ON ", "build"]
    cpu = marker(tmp_path)["cpu"]
    assert cpu["requested"] == "auto" and cpu["baseline"] == "x86-64-v4"
    assert cpu["faults"] == [{"baseline": "native", "signal": "SIGILL"}]
    assert cpu["flags"] == list(cpu_baseline_flags("x86-64-v4"))
    assert isinstance(cpu["selftest_seconds"], float) and cpu["selftest_seconds"] >= 0
    # The planned flags stay as planned (the host suite compares them with the manifest).
    assert marker(tmp_path)["flags"] == ["-DGGML_CUDA=OFF"]
    # CPU only: CUDA devices hidden, nothing offloaded, on the tiny model the helper wrote.
    bench = (tmp_path / "builds" / "b" / "bench-calls").read_text()
    assert bench.startswith("CUDA_VISIBLE_DEVICES=[] -m ") and " -ngl 0 " in bench
    assert (tmp_path / "builds" / "b" / "selftest.gguf").stat().st_size > 4 << 20


@pytest.mark.parametrize("signal", ["SEGV", "BUS"])
def test_a_segfault_or_bus_error_is_a_cpu_fault_too(tmp_path, signal):
    fake_bin = tmp_path / "fakebin"
    fake_bin.mkdir()
    (fake_bin / "cmake").write_text(FAKE_CMAKE.replace("kill -ILL $$", f"kill -{signal} $$"))
    (fake_bin / "cmake").chmod(0o755)
    result = run_helper(tmp_path, "auto", faults_on="-DGGML_NATIVE=ON", fake_bin=fake_bin)
    assert result.returncode == 0, result.stdout
    assert (f"native CPU code faults on this CPU (SIG{signal} in the CPU self-test); built for "
            f"x86-64-v4 instead") in result.stdout


def test_a_build_redone_later_does_not_try_the_baseline_that_faulted_again(tmp_path):
    """A repaired build (its marker gone) starts from what faulted here, not from native."""
    assert run_helper(tmp_path, "auto", faults_on="-DGGML_NATIVE=ON").returncode == 0
    (tmp_path / "builds" / "b" / helper.MARKER).unlink()
    (tmp_path / "builds" / "cmake-calls").unlink()
    again = run_helper(tmp_path, "auto", faults_on="-DGGML_NATIVE=ON")
    assert again.returncode == 0, again.stdout
    assert "native CPU code faulted on this CPU before (SIGILL); not tried again" in again.stdout
    assert calls(tmp_path) == ["configure GGML_NATIVE=OFF GGML_AVX2=ON GGML_AVX512=ON ", "build"]
    assert marker(tmp_path)["cpu"]["faults"] == [{"baseline": "native", "signal": "SIGILL"}]


def test_a_cpu_that_runs_native_code_keeps_the_native_build(tmp_path):
    result = run_helper(tmp_path, "auto", faults_on="none")
    assert result.returncode == 0, result.stdout
    assert calls(tmp_path) == ["configure GGML_NATIVE=ON ", "build"]
    assert marker(tmp_path)["cpu"]["baseline"] == "native" and marker(tmp_path)["cpu"]["faults"] == []
    assert "built for" not in result.stdout


def test_a_pinned_baseline_that_faults_fails_with_one_line_and_no_fallback(tmp_path):
    result = run_helper(tmp_path, "x86-64-v4", faults_on="-DGGML_AVX512=ON")
    assert result.returncode == 3
    assert ("build check failed: x86-64-v4 CPU code faults on this CPU (SIGILL in the CPU "
            "self-test); llm_cpu_baseline is x86-64-v4: expected a baseline that runs here: set "
            "llm_cpu_baseline to auto, or pin a lower baseline") in result.stdout
    assert calls(tmp_path) == ["configure GGML_NATIVE=OFF GGML_AVX2=ON GGML_AVX512=ON ", "build"]
    assert not (tmp_path / "builds" / "b" / helper.MARKER).exists()


def test_auto_goes_down_the_levels_until_one_computes(tmp_path):
    result = run_helper(tmp_path, "auto", faults_on="-DGGML_NATIVE=ON|-DGGML_AVX2=ON")
    assert result.returncode == 0, result.stdout
    assert ("native, x86-64-v4 and x86-64-v3 CPU code fault on this CPU (SIGILL in the CPU "
            "self-test); built for x86-64-v2 instead") in result.stdout
    assert marker(tmp_path)["cpu"]["baseline"] == "x86-64-v2"
    assert len(calls(tmp_path)) == 8


@pytest.mark.parametrize("death,said", [("exit 1", "llama-bench exited 1"),
                                        ("kill -ABRT $$", "llama-bench was killed by SIGABRT")])
def test_a_self_test_that_fails_other_than_by_a_cpu_fault_fails_the_build(tmp_path, death, said):
    """An exit code or an abort (a GGML_ASSERT) is a broken build or model, not a CPU to build
    down for: no fallback, no marker."""
    fake_bin = tmp_path / "fakebin"
    fake_bin.mkdir()
    (fake_bin / "cmake").write_text(FAKE_CMAKE.replace("kill -ILL $$", death))
    (fake_bin / "cmake").chmod(0o755)
    result = run_helper(tmp_path, "auto", faults_on="-DGGML_NATIVE=ON", fake_bin=fake_bin)
    assert result.returncode == 2
    assert f"build check failed: the CPU self-test of {tmp_path}/builds/b: {said}" in result.stdout
    assert calls(tmp_path) == ["configure GGML_NATIVE=ON ", "build"]
    assert not (tmp_path / "builds" / "b" / helper.MARKER).exists()

"""llm_cpu_baseline: each baseline's cmake options, read against ggml's own CMake files at the
pinned commit (tests/fixtures/ggml-cpu-options-0c1e570.txt), the order auto tries them in, and
the build folder they key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from llmhost import buildplan
from llmhost.buildplan import cpu_baseline_features, cpu_baseline_flags, cpu_candidates, plan_build
from llmhost.settings import SettingsError, load_host_settings

PINNED_CMAKE = (Path(__file__).resolve().parents[1] / "fixtures" / "ggml-cpu-options-0c1e570.txt").read_text()

# gcc's -march=x86-64-vN beyond x86-64 (SSE2): the psABI levels, as -m flags ggml's options
# give (SSE4.2 implies SSSE3/SSE4.1; POPCNT, CX16, LZCNT, MOVBE, XSAVE are not ggml options).
PSABI = {
    "x86-64-v2": {"-msse4.2"},
    "x86-64-v3": {"-msse4.2", "-mavx", "-mavx2", "-mbmi2", "-mfma", "-mf16c"},
    "x86-64-v4": {"-msse4.2", "-mavx", "-mavx2", "-mbmi2", "-mfma", "-mf16c",
                  "-mavx512f", "-mavx512cd", "-mavx512vl", "-mavx512dq", "-mavx512bw"},
}


def pinned_options() -> set[str]:
    """The instruction-set options ggml declares at the pinned commit."""
    return set(re.findall(r"option\((GGML_(?:SSE42|AVX\w*|BMI2|FMA|F16C|AMX_\w+))\s", PINNED_CMAKE))


def compiler_flags(cmake_flags: tuple[str, ...]) -> set[str]:
    """The -m flags ggml's CPU CMakeLists (non-MSVC x86, GGML_NATIVE OFF) adds for these -D
    options: each `if (GGML_X)` block's `list(APPEND ARCH_FLAGS ...)` lines."""
    on = {flag[2:].split("=")[0] for flag in cmake_flags if flag.endswith("=ON")}
    x86 = PINNED_CMAKE.split("# --- ggml/src/ggml-cpu/CMakeLists.txt", 1)[1]
    flags = set()
    # Innermost blocks only (GGML_NATIVE's if/else holds the others).
    for option, body in re.findall(r"if \((GGML_\w+)\)\n((?:(?!if \().)*?)endif\(\)", x86, re.S):
        if option in on:
            flags |= set(re.findall(r"list\(APPEND ARCH_FLAGS (-m[\w.-]+)\)", body))
    return flags


def settings(**data):
    return load_host_settings("h1", {**data, "llm_services": {"t": {"port": 1, "model": {
        "source": "local", "path": "/m.gguf"}}}})


def test_native_is_llama_cpps_default_march_native():
    assert cpu_baseline_flags("native") == ("-DGGML_NATIVE=ON",)


@pytest.mark.parametrize("baseline", ["x86-64-v4", "x86-64-v3", "x86-64-v2"])
def test_each_level_sets_every_pinned_option_once_and_only_those(baseline):
    """A misspelt -D is ignored by cmake without a word; each option is set ON or OFF, so a
    folder reconfigured from another baseline keeps none of its options."""
    flags = cpu_baseline_flags(baseline)
    assert flags[0] == "-DGGML_NATIVE=OFF"
    names = [flag[2:].split("=")[0] for flag in flags[1:]]
    assert sorted(names) == sorted(pinned_options())
    assert all(flag.endswith(("=ON", "=OFF")) for flag in flags)


@pytest.mark.parametrize("baseline", ["x86-64-v4", "x86-64-v3", "x86-64-v2"])
def test_each_level_compiles_exactly_its_psabi_instructions(baseline):
    assert compiler_flags(cpu_baseline_flags(baseline)) == PSABI[baseline]


def test_v4_is_avx512_without_vnni_bf16_vbmi_fp16_or_amx():
    on = {f[2:-3] for f in cpu_baseline_flags("x86-64-v4") if f.endswith("=ON")}
    assert on == {"GGML_SSE42", "GGML_AVX", "GGML_AVX2", "GGML_BMI2", "GGML_FMA", "GGML_F16C",
                  "GGML_AVX512"}
    assert cpu_baseline_features("x86-64-v4") == {
        "AVX": True, "AVX2": True, "BMI2": True, "FMA": True, "F16C": True, "AVX512": True,
        "AVX_VNNI": False, "AVX512_VBMI": False, "AVX512_VNNI": False, "AVX512_BF16": False,
        "AMX_INT8": False}
    assert cpu_baseline_features("native") == {}


def test_auto_tries_native_then_each_level_down_and_a_pinned_baseline_only_itself():
    assert [name for name, _ in cpu_candidates("auto")] == ["native", "x86-64-v4", "x86-64-v3",
                                                            "x86-64-v2"]
    assert cpu_candidates("x86-64-v3") == (("x86-64-v3", cpu_baseline_flags("x86-64-v3")),)


def test_the_build_folder_is_keyed_by_the_baseline_asked_for():
    """auto is one folder whatever it resolves to (the marker says which), so a rerun finds it
    complete; pinning a baseline is another folder, built beside it."""
    auto, again = plan_build(settings()), plan_build(settings(llm_cpu_baseline="auto"))
    pinned = plan_build(settings(llm_cpu_baseline="x86-64-v4"))
    assert auto.build_dir == again.build_dir and auto.cpu_baseline == "auto"
    assert pinned.build_dir != auto.build_dir and pinned.cpu_baseline == "x86-64-v4"
    # The baseline flags go to the helper, not into the planned flags (which the marker and the
    # host suite compare as they are).
    assert not any("GGML_NATIVE" in flag for flag in auto.cmake_flags)


def test_an_unknown_baseline_is_named_with_the_choices():
    with pytest.raises(SettingsError) as error:
        settings(llm_cpu_baseline="x86-64-v5")
    assert error.value.problems == [
        "host h1: llm_cpu_baseline: found 'x86-64-v5', expected one of 'auto', 'native', "
        "'x86-64-v4', 'x86-64-v3', 'x86-64-v2'"]


def test_every_baseline_has_flags():
    for name in buildplan.CPU_BASELINES:
        assert cpu_baseline_flags(name)

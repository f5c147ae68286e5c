"""The manifest: what the deploy intended, written as JSON on the host and read back typed by the
host suite, verify and the bench (llmhost.manifest)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace

import pytest

from llmhost.buildplan import plan_build
from llmhost.manifest import VERSION, Manifest, ManifestError
from llmhost.settings import ServiceSpec, load_host_settings, settings_of
from llmhost.weights import ModelFileSpec, PlacedModel

MODEL = {"source": "hf", "repo": "unsloth/gemma-3-270m-it-GGUF", "revision": "a" * 40,
         "file": "gemma-3-270m-it-Q4_K_M.gguf"}


def deployed_manifest(**main) -> Manifest:
    settings = load_host_settings("h1", {"llm_services": {
        "main": {"port": 8082, "model": MODEL, "gpu_layers": 99, "gpus": [0, 1], "ctx_size": 131072,
                 "cache_type_k": "q4_0", "cache_type_v": "q8_0", "reasoning_format": "deepseek",
                 "extra_args": ["--jinja"], **main},
        "translate": {"port": 8083, "model": MODEL, "api_key": False}}})
    build = plan_build(settings, ("-DGGML_CUDA=ON",), archs=("90",),
                       fa_pairs=(("f16", "f16"), ("q4_0", "q8_0")), nvcc="12.8")
    models = {s.name: PlacedModel(f"/var/lib/llama-models/m/{s.name}.gguf", None,
                                  (ModelFileSpec(f"/var/lib/llama-models/m/{s.name}.gguf", "b" * 64, 7),))
              for s in settings.services}
    rendered = {s.unit_name: f"[Service]\n# {s.name}\n" for s in settings.services}
    return Manifest.for_deploy(settings, build, models, rendered)


def test_the_manifest_reads_back_as_the_deploy_wrote_it():
    manifest = deployed_manifest()
    back = Manifest.from_json(manifest.to_json())
    assert back == manifest
    main = back.service("main")
    assert main.settings.gpus == (0, 1) and main.settings.extra_args == ("--jinja",)
    assert main.kv_pair == ("q4_0", "q8_0") and main.uses_gpu
    assert main.settings.model.repo == MODEL["repo"]
    assert back.llama_cpp.fa_pairs == (("f16", "f16"), ("q4_0", "q8_0"))
    assert back.service("translate").key_file is None


def test_every_service_setting_is_recorded_without_naming_it():
    """Adding a setting to settings.ServiceSpec is enough for it to reach the manifest."""
    recorded = json.loads(deployed_manifest().to_json())["services"][0]["settings"]
    declared = {s.name for s in settings_of(ServiceSpec)}
    assert declared - set(recorded) == set()


def test_a_setting_the_manifest_lacks_reads_as_its_default():
    data = json.loads(deployed_manifest(metrics=False).to_json())
    del data["services"][0]["settings"]["metrics"]
    main = Manifest.from_json(json.dumps(data)).service("main")
    assert main.settings.metrics is ServiceSpec.metrics
    assert replace(main.settings, metrics=False) == deployed_manifest(metrics=False).service("main").settings


@pytest.mark.parametrize("text, found", [
    (json.dumps({"version": 2, "services": []}), "found version 2, expected"),
    ("{not json", "not JSON"),
])
def test_another_version_or_broken_json_is_refused_with_what_to_do(text, found):
    with pytest.raises(ManifestError) as error:
        Manifest.from_json(text)
    assert found in str(error.value)
    if "version" in found:
        assert f"expected {VERSION}: redeploy the host" in str(error.value)


MARKER_CPU = {"requested": "auto", "baseline": "x86-64-v4",
              "flags": ["-DGGML_NATIVE=OFF", "-DGGML_AVX512=ON"],
              "faults": [{"baseline": "native", "signal": "SIGILL"}], "selftest_seconds": 1.27,
              "rates": {"pp32": 900.0, "tg8": 95.0}}


def test_the_build_record_takes_the_cpu_baseline_its_self_test_found():
    planned = deployed_manifest()
    assert planned.llama_cpp.cpu_baseline == "auto" and planned.llama_cpp.cpu_resolved is None
    found = planned.with_cpu(MARKER_CPU)
    back = Manifest.from_json(found.to_json())
    assert back == found
    assert back.llama_cpp.cpu_resolved == "x86-64-v4"
    assert back.llama_cpp.cpu_flags == ("-DGGML_NATIVE=OFF", "-DGGML_AVX512=ON")
    assert back.llama_cpp.cpu_faults == (("native", "SIGILL"),)
    assert back.llama_cpp.cpu_selftest_seconds == 1.27
    assert planned.with_cpu(None) == planned


def test_a_version_3_manifest_reads_as_a_native_build_never_self_tested():
    """Written before builds were self-tested: verify and the bench still read it."""
    data = json.loads(deployed_manifest().to_json())
    data["version"] = 3
    for key in [k for k in data["llama_cpp"] if k.startswith("cpu_")]:
        del data["llama_cpp"][key]
    back = Manifest.from_json(json.dumps(data))
    assert back.llama_cpp.cpu_baseline == "native" and back.llama_cpp.cpu_resolved is None
    assert back.services == deployed_manifest().services


def manifest_commands(found):
    """The manifest operation's commands on a host whose manifest file and build marker are as
    the fact found them (facts in, commands out)."""
    from pyinfra.context import ctx_host

    from llmhost import manifest as record
    from llmhost.facts import ManifestState

    class Host:
        noops = []

        def get_fact(self, cls, **kwargs):
            assert cls is ManifestState and kwargs["path"] == "/etc/llama/llmhost.json"
            return found

        def noop(self, text):
            self.noops.append(text)

    fake = Host()
    with ctx_host.use(fake):
        return list(record.manifest_file._inner(dest="/etc/llama/llmhost.json",
                                                manifest=deployed_manifest())), fake.noops


def test_the_manifest_written_carries_the_baseline_read_from_the_build_marker():
    commands, _ = manifest_commands({"file": None, "cpu": MARKER_CPU})
    upload, install = commands
    assert upload.dest == "/etc/llama/llmhost.json.llmhost-new"
    assert Manifest.from_json(upload.src.getvalue()) == deployed_manifest().with_cpu(MARKER_CPU)
    assert str(install).endswith("mv -f /etc/llama/llmhost.json.llmhost-new /etc/llama/llmhost.json")
    # Planned before the build ran (a first deploy): what is known then; pyinfra runs the
    # operation again when it executes, after the build, and it reads the marker then.
    commands, _ = manifest_commands({"file": None, "cpu": None})
    assert Manifest.from_json(commands[0].src.getvalue()).llama_cpp.cpu_resolved is None


def test_an_unchanged_manifest_is_a_noop_and_a_changed_mode_is_not():
    text = deployed_manifest().with_cpu(MARKER_CPU).to_json()
    digest = hashlib.sha256(text.encode()).hexdigest()
    commands, noops = manifest_commands({"file": [digest, "root", "root", "644"], "cpu": MARKER_CPU})
    assert commands == [] and noops == ["/etc/llama/llmhost.json is up to date"]
    commands, _ = manifest_commands({"file": [digest, "root", "root", "666"], "cpu": MARKER_CPU})
    assert len(commands) == 2


def test_the_manifest_state_fact_reads_the_file_and_the_markers_cpu_record(tmp_path):
    from tests.unit.test_operations import run_fact
    from llmhost.facts import ManifestState

    path, build = tmp_path / "llmhost.json", tmp_path / "build"
    assert run_fact(ManifestState, path=str(path), build_dir=str(build)) == {"file": None, "cpu": None}
    build.mkdir()
    (build / ".llmhost-build.json").write_text(json.dumps({"cpu": MARKER_CPU}))
    path.write_text("{}\n")
    path.chmod(0o640)
    found = run_fact(ManifestState, path=str(path), build_dir=str(build))
    assert found["cpu"] == MARKER_CPU
    assert found["file"][0] == hashlib.sha256(b"{}\n").hexdigest() and found["file"][3] == "640"

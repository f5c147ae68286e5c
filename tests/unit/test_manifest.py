"""The manifest: what the deploy intended, written as JSON on the host and read back typed by the
host suite, verify and the bench (llmhost.manifest)."""

from __future__ import annotations

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

"""Settings validation: every bad input stops the run with one exact line (host, setting, found,
expected); good input becomes typed values."""

from pathlib import Path

import pytest

from llmhost import settings as S
from llmhost.settings import SettingsError, load_host_settings, load_inventory_settings

MODEL = {"source": "local", "path": "/models/m.gguf"}


def service(**overrides):
    return {"port": 18083, "model": MODEL, **overrides}


def host_data(**overrides):
    return {"llm_services": {"translate": service()}, **overrides}


def problems_of(data, host="h1"):
    with pytest.raises(SettingsError) as error:
        load_host_settings(host, data)
    return error.value.problems


def test_defaults_give_the_pinned_commit_and_a_loopback_cpu_service():
    s = load_host_settings("h1", host_data())
    assert s.llamacpp_commit == S.PINNED_COMMIT
    assert s.llamacpp_source == "git"
    (translate,) = s.services
    assert (translate.host, translate.port, translate.gpu_layers) == ("127.0.0.1", 18083, 0)
    assert translate.load_mode == "mmap+mlock"
    assert translate.unit_name == "llama-translate.service"
    assert not s.uses_gpu


def test_keys_that_are_not_ours_are_left_alone():
    s = load_host_settings("h1", {**host_data(), "ssh_user": "root", "my_other_deploy": 3})
    assert s.services[0].name == "translate"


BAD_INPUTS = [
    ("unknown host setting",
     host_data(llm_modle_dir="/x"),
     "host h1: llm_modle_dir: found an unknown setting, expected one of "
     + ", ".join(sorted(s.name for s in S.HOST_SETTINGS))),
    ("unknown service setting",
     host_data(llm_services={"translate": service(ctx=4096)}),
     "host h1: llm_services.translate.ctx: found an unknown setting, expected one of "
     + ", ".join(sorted(s.name for s in S.SERVICE_SETTINGS if s.name != "model"))),
    ("wrong type",
     host_data(llm_services={"translate": service(ctx_size="4096")}),
     "host h1: llm_services.translate.ctx_size: found '4096', expected a positive integer"),
    ("bool where an integer is expected",
     host_data(llm_services={"translate": service(parallel=True)}),
     "host h1: llm_services.translate.parallel: found True, expected a positive integer"),
    ("port used twice",
     host_data(llm_services={"a": service(), "b": service()}),
     "host h1: llm_services.b.port: found 18083, already used by llm_services.a, expected a port "
     "unique on the host"),
    ("context not divisible by slots",
     host_data(llm_services={"translate": service(ctx_size=4097, parallel=4)}),
     "host h1: llm_services.translate.ctx_size: found 4097, expected a multiple of parallel (4) so "
     "every slot gets the same context"),
    ("missing model",
     host_data(llm_services={"translate": {"port": 18083}}),
     "host h1: llm_services.translate.model: found no model, expected a mapping with source local "
     "(path) or hf/mirror (repo and file), or a profile"),
    ("local model without a path",
     host_data(llm_services={"translate": service(model={"source": "local"})}),
     "host h1: llm_services.translate.model.path: found nothing, expected the controller path of "
     "the GGUF for source 'local'"),
    ("hf model without a file",
     host_data(llm_services={"translate": service(model={"source": "hf", "repo": "a/b"})}),
     "host h1: llm_services.translate.model.file: found nothing, expected it for source 'hf'"),
    ("missing port",
     host_data(llm_services={"translate": {"model": MODEL}}),
     "host h1: llm_services.translate.port: found nothing, expected an integer from 1 to 65535"),
    ("port out of range",
     host_data(llm_services={"translate": service(port=70000)}),
     "host h1: llm_services.translate.port: found 70000, expected an integer from 1 to 65535"),
    ("bad K/V type",
     host_data(llm_services={"translate": service(cache_type_k="q3_k")}),
     "host h1: llm_services.translate.cache_type_k: found 'q3_k', expected one of "
     + ", ".join(repr(t) for t in S.CACHE_TYPES)),
    ("quantized V cache without flash attention",
     host_data(llm_services={"translate": service(cache_type_v="q8_0", flash_attn="off")}),
     "host h1: llm_services.translate.flash_attn: found 'off', expected 'on' because cache_type_v "
     "'q8_0' is quantized (llama.cpp needs flash attention for a quantized V cache)"),
    ("the guide's --mlock as a load mode",
     host_data(llm_services={"translate": service(load_mode="--mlock")}),
     "host h1: llm_services.translate.load_mode: found '--mlock', expected one of 'auto', 'none', "
     "'mmap', 'mlock', 'mmap+mlock', 'dio'"),
    ("public bind without a key",
     host_data(llm_services={"translate": service(host="0.0.0.0", api_key=False)}),
     "host h1: llm_services.translate.host: found '0.0.0.0' with api_key false, expected a loopback "
     "address, or allow_public_without_key: true to accept the risk"),
    ("secret in plain settings",
     host_data(llm_services={"translate": service(key="sk-123")}),
     "host h1: llm_services.translate.key: found a secret in plain settings, expected it in a file "
     "(api_key_file, token_file, or HF_TOKEN in the controller's environment)"),
    ("HF token in plain model settings",
     host_data(llm_services={"translate": service(model={**MODEL, "token": "hf_x"})}),
     "host h1: llm_services.translate.model.token: found a secret in plain settings, expected it in "
     "a file (api_key_file, token_file, or HF_TOKEN in the controller's environment)"),
    ("bad CUDA arch",
     host_data(llm_cuda_architectures=["sm_120"]),
     "host h1: llm_cuda_architectures: found ['sm_120'], expected a list of arch strings like '90', "
     "'89' or '120a'"),
    ("short commit",
     host_data(llm_llamacpp_commit="0c1e570"),
     "host h1: llm_llamacpp_commit: found '0c1e570', expected a full 40-character lowercase commit sha"),
    ("local llama.cpp source without a path",
     host_data(llm_llamacpp_source="local"),
     "host h1: llm_llamacpp_local_path: found nothing, expected the controller path of a llama.cpp "
     "tarball or git checkout for source 'local'"),
    ("bad service name",
     host_data(llm_services={"Main Server": service()}),
     "host h1: llm_services: found service name 'Main Server', expected lowercase letters, digits "
     "and '-', starting with a letter"),
    ("gpus on a CPU service",
     host_data(llm_services={"translate": service(gpus=[1])}),
     "host h1: llm_services.translate.gpus: found [1] on a CPU-only service (gpu_layers 0), expected "
     "gpu_layers > 0 or no gpus"),
    ("unknown profile",
     host_data(llm_services={"translate": service(model={"profile": "qwen9"})}),
     "host h1: llm_services.translate.model.profile: found 'qwen9', expected one of "
     + ", ".join(repr(p) for p in S.profiles.PROFILES)),
    ("relative install dir",
     host_data(llm_install_dir="opt/llama"),
     "host h1: llm_install_dir: found 'opt/llama', expected an absolute path without spaces or .., not a system folder (/, /etc, /usr, /opt, ...)"),
    # Settings that would corrupt a unit, leak a secret or spread the deploy over the system.
    ("newline in an alias",
     host_data(llm_services={"translate": service(alias="x\nExecStartPre=/bin/sh -c id")}),
     "host h1: llm_services.translate.alias: found 'x\\nExecStartPre=/bin/sh -c id', expected text "
     "without control characters (newline, tab, ...)"),
    ("newline in an extra_args word",
     host_data(llm_services={"translate": service(extra_args=["--top-k", "40\nUser=root"])}),
     "host h1: llm_services.translate.extra_args: found ['--top-k', '40\\nUser=root'], expected text "
     "without control characters (newline, tab, ...)"),
    ("tab in a model file name",
     host_data(llm_services={"translate": service(model={"source": "hf", "repo": "a/b", "file": "m\t.gguf"})}),
     "host h1: llm_services.translate.model.file: found 'm\\t.gguf', expected text without control "
     "characters (newline, tab, ...)"),
    ("an API key in extra_args",
     host_data(llm_services={"translate": service(extra_args=["--api-key", "sk-123"])}),
     "host h1: llm_services.translate.extra_args: found '--api-key', expected no secret on the "
     "command line (argv and the unit are readable); API keys are generated on the host or pushed "
     "with api_key_file"),
    ("an HF token in extra_args",
     host_data(llm_services={"translate": service(extra_args=["--hf-token=hf_abc"])}),
     "host h1: llm_services.translate.extra_args: found '--hf-token', expected no secret on the "
     "command line (argv and the unit are readable); API keys are generated on the host or pushed "
     "with api_key_file"),
    ("an open bind through extra_args",
     host_data(llm_services={"translate": service(api_key=False, extra_args=["--host", "0.0.0.0"])}),
     "host h1: llm_services.translate.extra_args: found '--host', expected it through the setting "
     "llm_services.translate.host (extra_args may not set what a setting owns)"),
    ("a port through extra_args",
     host_data(llm_services={"translate": service(extra_args=["--port=9999"])}),
     "host h1: llm_services.translate.extra_args: found '--port', expected it through the setting "
     "llm_services.translate.port (extra_args may not set what a setting owns)"),
    ("a model through extra_args",
     host_data(llm_services={"translate": service(extra_args=["-m", "/tmp/other.gguf"])}),
     "host h1: llm_services.translate.extra_args: found '-m', expected it through the setting "
     "llm_services.translate.model (extra_args may not set what a setting owns)"),
    ("an API key file through extra_args",
     host_data(llm_services={"translate": service(extra_args=["--api-key-file", "/tmp/k"])}),
     "host h1: llm_services.translate.extra_args: found '--api-key-file', expected it through the "
     "setting llm_services.translate.api_key_file (extra_args may not set what a setting owns)"),
    ("a setting's short flag in extra_args",
     host_data(llm_services={"translate": service(extra_args=["-c", "8192"])}),
     "host h1: llm_services.translate.extra_args: found '-c', expected it through the setting "
     "llm_services.translate.ctx_size (extra_args may not set what a setting owns)"),
    ("root as the service user",
     host_data(llm_service_user="root"),
     "host h1: llm_service_user: found 'root', expected a lowercase user name other than root (the "
     "units' hardening assumes an unprivileged user)"),
    ("the root folder as the install dir",
     host_data(llm_install_dir="/"),
     "host h1: llm_install_dir: found '/', expected an absolute path without spaces or .., not a system folder (/, /etc, /usr, /opt, ...)"),
    ("/etc as the config dir",
     host_data(llm_config_dir="/etc/"),
     "host h1: llm_config_dir: found '/etc/', expected an absolute path without spaces or .., not a system folder (/, /etc, /usr, /opt, ...)"),
    ("/usr as the model dir",
     host_data(llm_model_dir="/usr"),
     "host h1: llm_model_dir: found '/usr', expected an absolute path without spaces or .., not a system folder (/, /etc, /usr, /opt, ...)"),
    ("a model dir that climbs out",
     host_data(llm_model_dir="/srv/models/../../etc"),
     "host h1: llm_model_dir: found '/srv/models/../../etc', expected an absolute path without spaces or .., not a system folder (/, /etc, /usr, /opt, ...)"),
    ("an HF file that climbs out of its folder",
     host_data(llm_services={"translate": service(model={"source": "hf", "repo": "a/b",
                                                         "file": "../../etc/cron.d/x.gguf"})}),
     "host h1: llm_services.translate.model.file: found '../../etc/cron.d/x.gguf', expected a path "
     "inside the repo (no leading /, no ..)"),
    ("an HF file with a leading slash",
     host_data(llm_services={"translate": service(model={"source": "hf", "repo": "a/b",
                                                         "file": "/etc/passwd"})}),
     "host h1: llm_services.translate.model.file: found '/etc/passwd', expected a path inside the "
     "repo (no leading /, no ..)"),
    ("an extra FA pair ggml cannot compile",
     host_data(llm_cuda_fa_extra_pairs=[["iq4_nl", "iq4_nl"]]),
     "host h1: llm_cuda_fa_extra_pairs: found [['iq4_nl', 'iq4_nl']], expected a list of [K, V] "
     "pairs of 'q4_0', 'q4_1', 'q5_0', 'q5_1', 'q8_0', 'bf16', 'f16'"),
    ("an HF mmproj that climbs out",
     host_data(llm_services={"translate": service(model={"source": "hf", "repo": "a/b",
                                                         "file": "m.gguf", "mmproj": "../p.gguf"})}),
     "host h1: llm_services.translate.model.mmproj: found '../p.gguf', expected a path inside the "
     "repo (no leading /, no ..)"),
]


@pytest.mark.parametrize("data,expected", [case[1:] for case in BAD_INPUTS],
                         ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_is_one_exact_line(data, expected):
    assert problems_of(data) == [expected]


GATEWAY = {"clients": ["team-a"]}

# One port, one listener: a host's services and its gateway share the host's ports; a GPU
# listed twice is one GPU. (Not in BAD_INPUTS, which the e2e also runs through the CLI: the
# same load_host_settings path, so the same "before any host changes" proof covers them.)
CROSS_SETTING_INPUTS = [
    ("the gateway's API port used by a service",
     host_data(llm_gateway={**GATEWAY, "port": 18083}),
     ["host h1: llm_gateway.port: found 18083, already used by llm_services.translate, expected a "
      "port unique on the host"]),
    ("the gateway's metrics port used by a service",
     host_data(llm_gateway={**GATEWAY, "metrics_port": 18083}),
     ["host h1: llm_gateway.metrics_port: found 18083, already used by llm_services.translate, "
      "expected a port unique on the host"]),
    ("both gateway ports used by two services",
     host_data(llm_services={"a": service(port=8080), "b": service(port=8405)}, llm_gateway=GATEWAY),
     ["host h1: llm_gateway.port: found 8080, already used by llm_services.a, expected a port "
      "unique on the host",
      "host h1: llm_gateway.metrics_port: found 8405, already used by llm_services.b, expected a "
      "port unique on the host"]),
    ("the gateway's metrics port on its API port",
     host_data(llm_gateway={**GATEWAY, "port": 9000, "metrics_port": 9000}),
     ["host h1: llm_gateway.metrics_port: found 9000, the API's port, expected a port of its own"]),
    ("a GPU listed twice",
     host_data(llm_services={"main": service(gpu_layers=99, gpus=[0, 1, 0])}),
     ["host h1: llm_services.main.gpus: found [0, 1, 0], expected a list of distinct non-negative "
      "integers"]),
]


@pytest.mark.parametrize("data,expected", [case[1:] for case in CROSS_SETTING_INPUTS],
                         ids=[case[0] for case in CROSS_SETTING_INPUTS])
def test_ports_and_gpus_are_unique_per_host(data, expected):
    assert problems_of(data) == expected


def test_a_gateway_beside_services_on_other_ports_is_valid():
    s = load_host_settings("h1", host_data(llm_services={"main": service(gpu_layers=99, gpus=[1, 0])},
                                           llm_gateway=GATEWAY))
    assert (s.gateway.port, s.gateway.metrics_port, s.services[0].gpus) == (8080, 8405, (1, 0))


def test_problems_of_every_host_are_reported_together():
    with pytest.raises(SettingsError) as error:
        load_inventory_settings({
            "a": host_data(llm_build_jobs=-1),
            "b": host_data(llm_health_timeout="5m"),
        })
    assert error.value.problems == [
        "host a: llm_build_jobs: found -1, expected a non-negative integer",
        "host b: llm_health_timeout: found '5m', expected a positive integer",
    ]
    assert str(error.value).startswith("invalid settings, no host was changed:\n")


def test_guide_measurements_warn_about_slow_cache_types():
    s = load_host_settings("h1", host_data(llm_services={"t": service(cache_type_k="iq4_nl",
                                                                        cache_type_v="q5_0")}))
    assert s.services[0].warnings == (
        "host h1: llm_services.t.cache_type_k: iq4_nl: " + S.CACHE_TYPE_WARNINGS["iq4_nl"],
        "host h1: llm_services.t.cache_type_v: q5_0: " + S.CACHE_TYPE_WARNINGS["q5_0"],
    )


def test_profile_fills_repo_and_file_and_can_be_overridden():
    s = load_host_settings("h1", host_data(llm_services={"main": service(
        model={"profile": "qwen3.5-35b-a3b-ud-q4_k_xl", "revision": "v1"})}))
    model = s.services[0].model
    assert (model.source, model.repo, model.file, model.mmproj, model.revision) == (
        "hf", "unsloth/Qwen3.5-35B-A3B-GGUF", "Qwen3.5-35B-A3B-UD-Q4_K_XL.gguf", "mmproj-F16.gguf", "v1")


def test_fa_pairs_are_the_gpu_services_pairs_plus_f16():
    s = load_host_settings("h1", host_data(llm_services={
        "a": service(gpu_layers=99, cache_type_k="q4_0", cache_type_v="q8_0"),
        "b": service(port=2, gpu_layers=99, cache_type_k="q4_0", cache_type_v="q8_0"),
        "cpu": service(port=3, cache_type_k="q8_0", cache_type_v="q8_0")}))
    assert s.fa_pairs == (("f16", "f16"), ("q4_0", "q8_0"))
    extra = load_host_settings("h1", host_data(
        llm_cuda_fa_extra_pairs=[["q4_0", "q4_0"], ["q5_0", "q5_0"]],
        llm_services={"a": service(gpu_layers=99, cache_type_k="q4_0", cache_type_v="q8_0")}))
    assert extra.fa_pairs == (("f16", "f16"), ("q4_0", "q4_0"), ("q4_0", "q8_0"), ("q5_0", "q5_0"))


def test_a_cpu_only_change_keeps_the_cuda_build_and_the_gpu_unit():
    """Changing the K/V types of a CPU service on a GPU host: same CUDA build key (no rebuild),
    same GPU unit text (no restart)."""
    from llmhost import buildplan, gpu
    from llmhost.services import render_unit
    from llmhost.weights import ModelFileSpec, PlacedModel

    fixtures = Path(__file__).parents[1] / "fixtures" / "gpu"
    facts = gpu.GpuFacts(gpus=tuple(gpu.parse_nvidia_smi((fixtures / "smi-h100.txt").read_text().splitlines())),
                         toolkits=(gpu.Toolkit("/usr/local/cuda/bin/nvcc", "13.0.88"),))
    devices = gpu.cuda_device_allow(gpu.parse_proc_devices(
        (fixtures / "proc-devices-580.txt").read_text().splitlines()))
    model = PlacedModel("/m/a.gguf", None, (ModelFileSpec("/m/a.gguf", "a" * 64, 1),))

    def plan(cpu_types):
        s = load_host_settings("h1", host_data(llm_services={
            "main": service(gpu_layers=99, cache_type_k="q4_0", cache_type_v="q8_0"),
            "cpu": service(port=2, **cpu_types)}))
        build = buildplan.plan_for_host(s, facts)
        return build, render_unit(s, s.services[0], build, model, devices)

    before = plan({"cache_type_k": "f16", "cache_type_v": "f16"})
    after = plan({"cache_type_k": "q8_0", "cache_type_v": "q8_0"})
    assert after[0].build_dir == before[0].build_dir and after[0].cmake_flags == before[0].cmake_flags
    assert after[1] == before[1]


def test_group_data_of_the_guide_is_valid():
    namespace = {}
    exec((Path(__file__).parents[2] / "group_data" / "gpu_servers.py").read_text(), namespace)
    s = load_host_settings("gpu1", {"llm_services": namespace["llm_services"]})
    main, translate = s.services
    assert (main.gpu_layers, main.ctx_size, main.parallel, main.cache_type_k, main.cache_type_v) == (
        99, 131072, 4, "q4_0", "q8_0")
    assert (translate.gpu_layers, translate.ctx_size, translate.parallel, translate.reasoning) == (
        0, 4096, 4, "off")


def test_a_host_without_llm_services_is_not_managed_and_not_refused():
    """A web server in the same inventory: left alone, but its llm_ keys are still checked."""
    s = load_host_settings("web1", {"ssh_user": "deploy", "nginx_port": 80,
                                    "llm_llamacpp_commit": "0c1e57098bba43ac29e6e3b677cdceebdd22334f"})
    assert not s.managed and s.services == ()
    assert problems_of({"llm_servcies": {}}, host="web1") == [
        "host web1: llm_servcies: found an unknown setting, expected one of " + ", ".join(
            sorted(setting.name for setting in S.HOST_SETTINGS))]

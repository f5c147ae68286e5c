"""argv and units rendered from typed settings, compared flag by flag with the guide's intent."""

import json
from pathlib import Path

import pytest

from llmhost import flags, gpu
from llmhost.flags import ServerPaths, server_argv, systemd_exec_line
from llmhost.buildplan import plan_build
from llmhost.manifest import Manifest
from llmhost.services import render_unit, unit_paths
from llmhost.settings import load_host_settings
from llmhost.weights import ModelFileSpec, PlacedModel

REPO = Path(__file__).resolve().parents[2]
HELP = (REPO / "tests" / "fixtures" / "llama-server-help-0c1e570.txt").read_text()
# DeviceAllow groups of a GPU service on the H200's driver 580 (tests/unit/test_gpu_unit.py).
DRIVER_580 = gpu.cuda_device_allow(gpu.parse_proc_devices(
    (REPO / "tests" / "fixtures" / "gpu" / "proc-devices-580.txt").read_text().splitlines()))


def guide_settings():
    namespace = {}
    exec((REPO / "group_data" / "gpu_servers.py").read_text(), namespace)
    return load_host_settings("gpu1", {"llm_services": namespace["llm_services"]})


def placed(path, mmproj=None):
    return PlacedModel(model_path=path, mmproj_path=mmproj,
                       files=(ModelFileSpec(dest=path, sha256="a" * 64, size=1),))


def option_values(argv):
    """{option: value or True} of an argv."""
    values, i = {}, 1
    while i < len(argv):
        if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            values[argv[i]] = argv[i + 1]
            i += 2
        else:
            values[argv[i]] = True
            i += 1
    return values


def test_main_service_matches_the_guide():
    settings = guide_settings()
    main = settings.services[0]
    argv = server_argv(main, ServerPaths("/b/llama-server", "/m/Qwen.gguf", "/m/mmproj-F16.gguf",
                                         "/etc/llama/keys/main.key"))
    got = option_values(argv)
    # The guide: -m, --mmproj, -ngl 99, -c 131072, -np 4, --flash-attn on, -ctk q4_0, -ctv q8_0,
    # --mlock, --cont-batching, --cache-prompt, --reasoning-format deepseek, --port 18082.
    assert got["--model"] == "/m/Qwen.gguf"
    assert got["--mmproj"] == "/m/mmproj-F16.gguf"
    assert got["--n-gpu-layers"] == "99"
    assert got["--ctx-size"] == "131072"
    assert got["--parallel"] == "4"
    assert got["--flash-attn"] == "on"
    assert got["--cache-type-k"] == "q4_0"
    assert got["--cache-type-v"] == "q8_0"
    assert got["--load-mode"] == "mmap+mlock"  # the guide's --mlock at the pinned commit
    assert "--mlock" not in argv
    assert got["--cont-batching"] is True and got["--cache-prompt"] is True
    assert got["--reasoning-format"] == "deepseek"
    assert got["--reasoning"] == "auto"  # thinking toggled per request
    assert got["--port"] == "18082"
    # Made safe: loopback and a key file instead of 0.0.0.0 with no key.
    assert got["--host"] == "127.0.0.1"
    assert got["--api-key-file"] == "/etc/llama/keys/main.key"


def test_translate_service_matches_the_guide():
    translate = guide_settings().services[1]
    got = option_values(server_argv(translate, ServerPaths("/b/llama-server", "/m/q.gguf")))
    # The guide: -ngl 0 -c 4096 -np 4 --port 18083; thinking off for translations.
    assert (got["--n-gpu-layers"], got["--ctx-size"], got["--parallel"], got["--port"]) == (
        "0", "4096", "4", "18083")
    assert got["--reasoning"] == "off"
    assert "--mmproj" not in got


def test_every_rendered_option_is_in_the_pinned_help():
    settings = guide_settings()
    for service in settings.services:
        argv = server_argv(service, ServerPaths("/b/llama-server", "/m/x.gguf", "/m/p.gguf", "/k"))
        assert flags.unknown_options(argv, HELP) == []


# Options server_argv always passes; no setting sets them.
FIXED_OPTIONS = {"--cont-batching", "--cache-prompt"}


def test_every_option_a_setting_renders_is_owned_by_a_setting():
    """A setting that renders an option declares it (setting(..., owns=...)), so extra_args
    cannot set it a second time, past the setting's checks."""
    from llmhost.settings import OWNED_OPTIONS

    settings = load_host_settings("h1", {"llm_services": {"all": {
        "port": 8080, "host": "127.0.0.1", "model": {"source": "local", "path": "/m/x.gguf"},
        "gpu_layers": 9, "reasoning_format": "deepseek", "reasoning_budget": 64, "threads": 3,
        "alias": "x"}}})
    argv = server_argv(settings.services[0], ServerPaths("/b/llama-server", "/m/x.gguf",
                                                         "/m/p.gguf", "/k"))
    owned = {option for options in OWNED_OPTIONS.values() for option in options}
    assert set(flags.option_names(argv)) - FIXED_OPTIONS - owned == set()
    # and each owned option is one --help lists
    assert flags.unknown_options(["llama-server", *sorted(owned)], HELP) == []


def test_the_guides_literal_mlock_is_rejected_by_the_pinned_help():
    guide_argv = ["llama-server", "-m", "/m.gguf", "-ngl", "99", "--flash-attn", "on", "--mlock",
                  "--cont-batching", "--cache-prompt"]
    assert flags.unknown_options(guide_argv, HELP) == ["--mlock"]
    assert "--load-mode" in flags.help_options(HELP)


def test_help_parser_reads_aliases_and_skips_metavars_and_descriptions():
    options = flags.help_options(HELP)
    assert {"-m", "--model", "-ngl", "--n-gpu-layers", "-ctk", "--cache-type-k", "--api-key-file",
            "--no-cache-prompt", "-rea", "--reasoning"} <= options
    assert "FNAME" not in options and "--" not in options


def test_extra_args_go_last_and_negative_values_are_not_options():
    settings = load_host_settings("h", {"llm_services": {"s": {
        "port": 1, "model": {"source": "local", "path": "/m.gguf"}, "reasoning_budget": -1,
        "extra_args": ["--temp", "0.7"]}}})
    argv = server_argv(settings.services[0], ServerPaths("/b/llama-server", "/m.gguf"))
    assert argv[-2:] == ["--temp", "0.7"]
    assert "-1" not in flags.option_names(argv)


@pytest.mark.parametrize("arg,quoted", [
    ("/plain/path", "/plain/path"),
    ("my model", '"my model"'),
    ("50%", "50%%"),
    ("$HOME", "$$HOME"),
    ('say "hi"', '"say \\"hi\\""'),
])
def test_exec_line_quotes_what_systemd_would_split_or_expand(arg, quoted):
    assert systemd_exec_line(["/bin/x", arg]) == f"/bin/x {quoted}"


def test_rendered_units_are_hardened_and_keep_secrets_out():
    settings = guide_settings()
    build = plan_build(settings)
    main, translate = settings.services
    cpu_unit = render_unit(settings, translate, build, placed("/m/q.gguf"))
    gpu_unit = render_unit(settings, main, build, placed("/m/Q.gguf", "/m/mmproj-F16.gguf"), DRIVER_580)
    for unit in (cpu_unit, gpu_unit):
        assert "LimitMEMLOCK=infinity" in unit
        assert "Restart=always" in unit
        assert "User=llama" in unit
        assert "ProtectSystem=strict" in unit and "NoNewPrivileges=yes" in unit
        assert "--api-key-file /etc/llama/keys/" in unit
        assert "--mlock" not in unit
    assert "PrivateDevices=yes" in cpu_unit and "MemoryDenyWriteExecute=yes" in cpu_unit
    assert "DeviceAllow" not in cpu_unit and "nvidia" not in cpu_unit
    assert "PrivateDevices=no" in gpu_unit and "DevicePolicy=closed" in gpu_unit
    assert "Requires=llmhost-nvidia-uvm.service" in gpu_unit
    assert "After=llmhost-nvidia-uvm.service" in gpu_unit
    # Every start of a GPU unit makes its uvm node first, as root (the oneshot runs at boot only),
    # and only the uvm group may be mknod'ed; the CPU unit needs neither.
    assert "ExecStartPre=+/usr/bin/python3 /usr/local/lib/llmhost/nvidia_uvm.py" in gpu_unit
    assert "DeviceAllow=char-nvidia-uvm rwm\n" in gpu_unit
    assert "DeviceAllow=char-nvidia rw\n" in gpu_unit
    assert "ExecStartPre=" not in cpu_unit
    # A filtered system call fails instead of killing the server.
    for unit in (cpu_unit, gpu_unit):
        assert "SystemCallErrorNumber=EPERM" in unit


def test_a_gpu_service_names_its_devices_so_it_cannot_start_without_them():
    """-ngl alone warns and serves from the CPU when no GPU is usable; --device makes that an
    argument error (llama.cpp at the pin: "invalid device"), so systemd restarts it instead."""
    settings = load_host_settings("h", {"llm_services": {
        "all": {"port": 1, "model": {"source": "local", "path": "/m.gguf"}, "gpu_layers": 99},
        "one": {"port": 2, "model": {"source": "local", "path": "/m.gguf"}, "gpu_layers": 99,
                "gpus": [1]},
        "pair": {"port": 3, "model": {"source": "local", "path": "/m.gguf"}, "gpu_layers": 99,
                 "gpus": [0, 1]},
        "cpu": {"port": 4, "model": {"source": "local", "path": "/m.gguf"}}}})
    build = plan_build(settings, gpu_count=4)
    argv = {s.name: option_values(server_argv(s, unit_paths(settings, s, build, placed("/m.gguf"))))
            for s in settings.services}
    assert argv["all"]["--device"] == "CUDA0,CUDA1,CUDA2,CUDA3"  # every GPU of the host
    assert argv["one"]["--device"] == "CUDA0"  # CUDA_VISIBLE_DEVICES=1 renumbers it
    assert argv["pair"]["--device"] == "CUDA0,CUDA1"
    assert "--device" not in argv["cpu"]
    assert "--device" in flags.help_options(HELP)


def test_a_gpu_unit_cannot_be_rendered_without_its_device_groups():
    settings = guide_settings()
    with pytest.raises(ValueError, match="main: a GPU service needs its DeviceAllow groups"):
        render_unit(settings, settings.services[0], plan_build(settings), placed("/m/Q.gguf"))


def test_gpu_pinning_sets_cuda_visible_devices():
    settings = load_host_settings("h", {"llm_services": {"t": {
        "port": 1, "model": {"source": "local", "path": "/m.gguf"}, "gpu_layers": 99,
        "gpus": [1]}}})
    unit = render_unit(settings, settings.services[0], plan_build(settings), placed("/m.gguf"),
                       DRIVER_580)
    assert "Environment=CUDA_VISIBLE_DEVICES=1" in unit


def test_only_services_the_last_manifest_lists_and_the_settings_dropped_are_retired():
    from llmhost.services import handed_over, removed_services

    settings = guide_settings()  # services main (18082) and translate (18083)
    assert removed_services(settings, None) == []  # a fresh host: nothing of ours to retire
    previous = {"services": [
        {"name": "main", "unit": "llama-main.service", "port": 18082, "health_url": "http://127.0.0.1:18082/health"},
        {"name": "translator", "unit": "llama-translator.service", "port": 18083,
         "health_url": "http://127.0.0.1:18083/health"},
        {"name": "old", "unit": "llama-old.service", "port": 9999, "health_url": "http://127.0.0.1:9999/health"}]}
    by_name = {s.name: s for s in settings.services}
    # The manifest as this llmhost writes it, and as version 2 (a host last deployed by an
    # earlier llmhost) wrote it: port at the top.
    renamed = load_host_settings("gpu1", {"llm_services": {
        "main": {"port": 18082, "model": {"source": "local", "path": "/m/a.gguf"}},
        "translator": {"port": 18083, "model": {"source": "local", "path": "/m/b.gguf"}},
        "old": {"port": 9999, "model": {"source": "local", "path": "/m/c.gguf"}}}})
    written = json.loads(Manifest.for_deploy(
        renamed, plan_build(renamed), {s.name: placed(f"/m/{s.name}.gguf") for s in renamed.services},
        {s.unit_name: "" for s in renamed.services}).to_json())
    for manifest in (written, previous):
        removed = removed_services(settings, manifest)
        assert [s["name"] for s in removed] == ["translator", "old"]
        # translate takes the port of translator (a rename): the switch hands it over.
        assert handed_over(by_name["translate"], removed) == [
            {"unit": "llama-translator.service", "health_url": "http://127.0.0.1:18083/health"}]
        assert handed_over(by_name["main"], removed) == []


def test_the_health_gate_waits_longer_for_a_bigger_model_unless_told():
    """120 s plus 10 s a GB of the service's files: the guide's 19 GiB (20.4 GB) model gets
    330 s, where a fixed 300 s would time out one that loads slower than ~100 MB/s;
    llm_health_timeout wins."""
    from llmhost.services import health_timeout

    def model(*sizes):
        return PlacedModel("/m/a.gguf", None, tuple(ModelFileSpec(f"/m/{i}", "a" * 64, s)
                                                     for i, s in enumerate(sizes)))

    settings = guide_settings()
    assert health_timeout(settings, model(20_427_281_696)) == 120 + 10 * 21
    assert health_timeout(settings, model(253_113_024)) == 130
    assert health_timeout(settings, model(10**9, 10**9 + 1)) == 120 + 10 * 3  # every file counts
    told = load_host_settings("h", {"llm_health_timeout": 90, "llm_services": {"t": {
        "port": 1, "model": {"source": "local", "path": "/m.gguf"}}}})
    assert health_timeout(told, model(20_427_281_696)) == 90

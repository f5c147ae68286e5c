"""deploy.py for the H100 proof machine: the same facts, preflight, build plan and operations, minus
what that machine cannot do (no systemd as PID 1, no network for apt).

    pyinfra benchmarks/h100/inventory.py benchmarks/h100/gpu_deploy.py -y     (from the repo root)

Differences from deploy.py, each forced by the machine:
- base.packages() is left out: apt cannot reach a registry there; cmake and ninja come from
  /opt/torch/.venv/bin on PATH, nvcc from /usr/local/cuda.
- cuda.install_toolkit() is left out (off by default in deploy.py too).
- services.health_gated_unit() is replaced by writing the rendered unit to
  <llm_config_dir>/units/<unit> and the argv it runs (flags.server_argv) beside it as JSON;
  proof.sh starts llama-server from that unit's ExecStart, User and Environment.
LLMHOST_STAGE=build stops after the build (the model is still arriving piece by piece); it
validates the settings like deploy.py but leaves the model file check to the full run.
"""

import json
import os
from io import StringIO

from pyinfra import host, state
from pyinfra.operations import files

from operations import base, gpu, llamacpp, preflight, services, weights
from operations.flags import server_argv
from operations.settings import load_inventory_settings

STAGE = os.environ.get("LLMHOST_STAGE", "all")


def say(message: str) -> None:
    print(f"[{host.name}] {message}", flush=True)


def converge() -> None:
    if STAGE == "build":
        settings = load_inventory_settings({h.name: h.data.dict() for h in state.inventory})[host.name]
    else:
        settings = preflight.inventory_settings()[host.name]
    for service in settings.services:
        for warning in service.warnings:
            say(f"warning: {warning}")
    for warning in gpu.fa_pair_warnings(host.name, settings):
        say(f"warning: {warning}")

    facts = host.get_fact(gpu.GpuHost, paths=(settings.install_dir, settings.model_dir))
    say(f"GpuHost fact: {json.dumps(facts.to_json())}")
    models = {} if STAGE == "build" else {
        service.name: weights.plan_local(settings, service.model) for service in settings.services}
    problems = preflight.gpu_problems(settings, facts)
    build = None if problems else llamacpp.plan_for_host(settings, facts)
    problems += preflight.disk_problems(settings, facts, build, models)
    say(f"preflight: {len(problems)} problem(s)" + "".join(f"\n    {p}" for p in problems))
    if problems:
        preflight.fail(problems)
        return
    say(f"build plan: {build.build_dir}; expected system_info {list(build.expected_system_info)}; "
        f"cmake {' '.join(build.cmake_flags)}")

    base.service_user(settings)
    base.directories(settings)
    base.helpers()
    llamacpp.source(name="llama.cpp source", settings=settings, build=build)
    llamacpp.build(name="llama.cpp build", settings=settings, build=build)
    if STAGE == "build":
        return

    for service in settings.services:
        for spec in models[service.name].files:
            weights.pushed_file(name=f"Model file {spec.dest}", spec=spec)

    units = f"{settings.config_dir}/units"
    files.directory(name=f"Directory {units}", path=units, user="root", group="root", mode="755")
    for service in settings.services:
        path = services.key_path(settings, service)
        if path and service.api_key_file:
            files.put(name=f"API key of {service.name}", src=service.api_key_file, dest=path,
                      user="root", group=settings.service_user, mode=services.KEY_MODE)
        elif path:
            services.generated_key(name=f"API key of {service.name}", path=path,
                                   group=settings.service_user)
        # In place of services.health_gated_unit (no systemd here): the unit it would install,
        # and the argv that unit's ExecStart runs.
        unit_text = services.render_unit(settings, service, build, models[service.name])
        files.put(name=f"Unit {service.unit_name} (staged: no systemd here)",
                  src=StringIO(unit_text), dest=f"{units}/{service.unit_name}", mode="644")
        argv = server_argv(service, services.unit_paths(settings, service, build, models[service.name]))
        files.put(name=f"argv of {service.unit_name}", src=StringIO(json.dumps(argv) + "\n"),
                  dest=f"{units}/{service.name}.argv.json", mode="644")

    manifest = services.host_manifest(settings, build, models)
    files.put(name="Manifest for tests/host", src=StringIO(json.dumps(manifest, indent=1) + "\n"),
              dest=f"{settings.config_dir}/{services.MANIFEST_NAME}", mode="644")


converge()

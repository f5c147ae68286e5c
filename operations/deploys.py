"""The packaged deploy: ``llama_server()`` is the whole job, as pyinfra's packaged deploys are
(a ``@deploy`` function a user's deploy file calls). The repository's deploy.py is that call."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from pyinfra import host, state
from pyinfra.api import deploy
from pyinfra.facts.deb import DebPackages
from pyinfra.facts.files import Directory, File, Sha1File
from pyinfra.facts.server import Groups, Os
from pyinfra.facts.systemd import SystemdEnabled, SystemdStatus

from llmhost import (base, buildcache, buildplan, cuda, gateway, gpu, hostread, llamacpp,
                     preflight, retention, secrets, services, sudostdin, timing, weights)
from llmhost import manifest as record
from llmhost.facts import (Account, BuildState, FileDigests, GpuHeld, JsonFile, KeyAccepted, ManifestState,
                           ModelFile, UnitState)
from llmhost.remote import HELPER_DIR
from llmhost.manifest import Manifest
from llmhost.settings import HostSettings

logger = logging.getLogger("llmhost")
# Every deploy that imports this gives `_sudo_password` to sudo on stdin, not in command strings.
sudostdin.install()
# ... and answers the facts of llmhost.hostread's one host read from it.
hostread.install()


@deploy("llama.cpp server")
def llama_server() -> None:
    """Converge the current host into the llama.cpp server its settings describe.

    Order: validate every host's settings (before anything runs), read the host and run its
    preflight (a failing host stops here, the others go on), base packages/user/directories,
    CUDA toolkit when asked, llama.cpp source and build, model files, API keys, then each
    service's unit behind a health gate, one service at a time; then the gateways' backend
    keys, then a rotated key's previous value dropped from the services; and last the manifest
    the host suite checks.

    pyinfra orders operations as a graph of each host's sequence: an operation every host
    defines at the same line waits for all hosts' earlier steps. ``gateway.move_backend_keys``
    is one (a no-op but on gateways): every step of ``_serve`` runs on every host before it, and
    ``_finish`` after it. A backend key rotated through a gateway thus fails no request: the
    backends accept the new and the previous key, the gateway moves to the new one, the
    backends drop the previous one.

    Global arguments given to the call (``llama_server(_sudo=True)``) reach every step.

    Example, a user's own deploy file:

    .. code:: python

        from llmhost.deploys import llama_server

        llama_server()
    """
    timing.install(state)
    settings = preflight.inventory_settings()[host.name]
    if settings.gateway:
        gateway.gateway(settings)
    if not settings.managed and not settings.gateway:
        logger.warning(f"[{host.name}] no llm_services in its data: llmhost leaves this host alone")
    served = _serve(settings) if settings.managed else None
    # On every host (a no-op but on gateways), so that it waits for every host's steps above.
    gateway.move_backend_keys(settings)
    if served:
        _finish(settings, served)


@dataclass
class _Served:
    """What _serve leaves for _finish: the manifest's inputs, and the services whose previous
    key is dropped once the gateways have moved to the new one."""

    build: buildplan.Build
    models: dict
    rendered: dict[str, str]
    manifest_file: str
    argv_options: dict[str, list[str]] = field(default_factory=dict)
    drop_previous_key: list[dict] = field(default_factory=list)


def _serve(settings: HostSettings) -> _Served | None:
    for service in settings.services:
        for warning in service.warnings:
            logger.warning(f"[{host.name}] {warning}")
    for warning in preflight.fa_pair_warnings(host.name, settings):
        logger.warning(f"[{host.name}] {warning}")

    facts = host.get_fact(gpu.GpuHost, paths=(settings.install_dir, settings.model_dir))
    models = {service.name: weights.plan(settings, service.model) for service in settings.services}
    problems = preflight.gpu_problems(settings, facts) + preflight.toolkit_install_problems(settings)
    build = None if problems else buildplan.plan_for_host(settings, facts)
    if build is not None:
        hostread.prefetch(_host_reads(settings, build, models))
    problems += preflight.disk_problems(settings, facts, build, models)
    if problems:
        preflight.fail(problems)
        return None

    base.packages()
    base.service_user(settings)
    base.directories(settings)
    base.helpers()
    device_allow = ()
    if settings.uses_gpu:
        device_allow = gpu.cuda_device_allow(facts.char_devices)
        services.nvidia_uvm()

    if settings.uses_gpu and settings.cuda_toolkit_install:
        cuda.install_toolkit(settings.cuda_toolkit_version)
    llamacpp.source(name="llama.cpp source", source_dir=build.source_dir,
                    commit=settings.llamacpp_commit, git_url=settings.llamacpp_git_url,
                    tarball=(llamacpp.local_source_tarball(settings)
                             if settings.llamacpp_source == "local" else None))
    build_op = llamacpp.build(
        name="llama.cpp build", source_dir=build.source_dir, build_dir=build.build_dir,
        commit=settings.llamacpp_commit, cmake_flags=list(build.cmake_flags),
        expected_system_info=list(build.expected_system_info), jobs=settings.build_jobs,
        ccache_dir=f"{settings.install_dir}/ccache", cpu_baseline=build.cpu_baseline,
        cache=buildcache.cache_dir(settings), key_inputs=buildcache.key_inputs(settings, build))

    for service in settings.services:
        for spec in models[service.name].files:
            weights.model_file(spec, service.model, settings.download_connections)

    manifest_file = f"{settings.config_dir}/{services.MANIFEST_NAME}"
    removed = services.removed_services(settings, host.get_fact(JsonFile, path=manifest_file))
    if removed:
        logger.warning(f"[{host.name}] no longer in llm_services: "
                       f"{', '.join(s['name'] for s in removed)}; their units are retired, one whose "
                       f"port a new service takes once that one is healthy (keys, models and "
                       f"builds stay)")
    # Behind gateways a pushed key is rotated in two steps (see llama_server): the new one is
    # written first with the previous ones after it, which the server then accepts as well.
    gateway_hosts = gateway.gateways()
    all_gateways_in_run = set(gateway_hosts) <= set(state.inventory.get_active_hosts())
    served = _Served(build, models, {}, manifest_file)
    for service in settings.services:
        # A service restarts behind the health gate when its unit is new or changed, and also
        # when what it runs changed under the same unit: a build repaired in place, or a key
        # that was pushed, made again, or replaced by hand (the server reads it at start only).
        restart_on = [build_op]
        path = services.key_path(settings, service)
        if path and service.api_key_file:
            key = secrets.Secret(secrets.read_key(service.api_key_file) + "\n")
            present = host.get_fact(secrets.SecretFile, path=path)
            restart_on.append(secrets.put(
                name=f"API key of {service.name}", src=key, dest=path, user="root",
                group=settings.service_user, mode=services.KEY_MODE,
                keep_previous=bool(gateway_hosts)))
            if gateway_hosts and present and present["sha256"] != key.sha256:
                if all_gateways_in_run:
                    served.drop_previous_key.append({"service": service, "key": key, "path": path})
                else:
                    logger.warning(f"[{host.name}] {service.name}: its key changes while a gateway "
                                   f"is not in this run: the previous key stays accepted until a "
                                   f"run that includes every gateway")
        elif path:
            restart_on.append(services.generated_key(name=f"API key of {service.name}", path=path,
                                                     group=settings.service_user))
        key_refused = bool(path) and host.get_fact(
            KeyAccepted, url=service.health_url.replace("/health", "/v1/models"), key_file=path) is False
        # A GPU service (re)started outside the deploy may have found no GPU: repaired here.
        off_gpu = service.uses_gpu and services.off_its_gpus(service)
        unit_text = services.render_unit(settings, service, build, models[service.name], device_allow)
        served.rendered[service.unit_name] = unit_text
        served.argv_options[service.name] = services.argv_options(settings, service, build,
                                                                  models[service.name])
        _gated_unit(settings, service, models[service.name], unit_text,
                    served.argv_options[service.name],
                    restart_if=lambda ops=restart_on, refused=key_refused, off=off_gpu:
                        refused or off or services.any_changed(ops),
                    replaces=services.handed_over(service, removed), name=f"Service {service.unit_name}")
    if removed:
        services.retired_units(name="Retire removed services", units=[s["unit"] for s in removed])
    retention.old_versions(name="Remove old builds and model versions",
                           install_dir=settings.install_dir, model_dir=settings.model_dir,
                           rendered=served.rendered, keep_previous=settings.keep_previous)
    return served


def _host_reads(settings: HostSettings, build: buildplan.Build, models: dict) -> list:
    """Every fact the steps below read from a host the last deploy converged, as each step asks
    for it (class, keyword arguments): llmhost.hostread reads them in one command. One missing
    here is read on its own (slower, not wrong); tests/unit/test_deploy_wiring.py checks that
    none is."""
    manifest_file = f"{settings.config_dir}/{services.MANIFEST_NAME}"
    user = settings.service_user
    reads = [(JsonFile, {"path": f"{build.build_dir}/{llamacpp.BUILD_MARKER}"}),
             (DebPackages, {}), (JsonFile, {"path": manifest_file}),
             # base.service_user: server.group, system_user (and its home), files.put
             (Groups, {}), (Os, {}), (Account, {"user": user}),
             (Directory, {"path": base.service_home(settings)}),
             *_put_reads(base.memlock_path(settings)),
             *[(Directory, {"path": path}) for path in base.directory_paths(settings)],
             (FileDigests, {"path": HELPER_DIR}),
             (JsonFile, {"path": f"{build.source_dir}/{llamacpp.SOURCE_MARKER}"}),
             (BuildState, {"build_dir": build.build_dir}),
             (ManifestState, {"path": manifest_file, "build_dir": build.build_dir}),
             (retention.StoredVersions, retention.stored_versions_arguments(
                 settings.install_dir, settings.model_dir))]
    if settings.uses_gpu:
        reads += [*_put_reads(services.MODULES_LOAD_PATH),
                  *_put_reads(f"/etc/systemd/system/{services.UVM_UNIT}")]
        reads += [(fact, {"user_mode": False, "machine": None, "user_name": None,
                          "services": [services.UVM_UNIT]}) for fact in (SystemdStatus, SystemdEnabled)]
    reads += [(ModelFile, {"path": spec.dest}) for model in models.values() for spec in model.files]
    gateway_hosts = bool(gateway.gateways())
    for service in settings.services:
        reads.append((UnitState, {"unit": service.unit_name}))
        path = services.key_path(settings, service)
        if path and service.api_key_file:
            reads.append((secrets.SecretFile, {"path": path, "lines": 1 if gateway_hosts else 0}))
        elif path:
            reads.append((File, {"path": path}))
        if path:
            reads.append((KeyAccepted, {"url": service.health_url.replace("/health", "/v1/models"),
                                        "key_file": path}))
        if service.uses_gpu:
            reads.append((GpuHeld, {"unit": service.unit_name,
                                    "gpus": ",".join(map(str, service.gpus or ()))}))
    return reads


def _put_reads(path: str) -> list:
    """What pyinfra's files.put reads of a file that is in place."""
    return [(File, {"path": path}), (Directory, {"path": path.rsplit("/", 1)[0]}),
            (Sha1File, {"path": path})]


def _finish(settings: HostSettings, served: _Served) -> None:
    # The gateways send the new keys now: each service whose key was rotated drops the previous
    # one, restarted behind the gateways' drain again.
    for entry in served.drop_previous_key:
        service = entry["service"]
        dropped = secrets.put(name=f"API key of {service.name} (previous key dropped)",
                              src=entry["key"], dest=entry["path"], user="root",
                              group=settings.service_user, mode=services.KEY_MODE)
        _gated_unit(settings, service, served.models[service.name],
                    served.rendered[service.unit_name], served.argv_options[service.name],
                    restart_if=lambda op=dropped: services.any_changed([op]), replaces=[],
                    name=f"Service {service.unit_name} (previous key dropped)")

    # Last, so it only describes a host whose every step above succeeded.
    record.manifest_file(name="Manifest for tests/host", dest=served.manifest_file,
                         manifest=Manifest.for_deploy(settings, served.build, served.models,
                                                      served.rendered))


def _gated_unit(settings: HostSettings, service, model, unit_text: str,
                argv_options: list[str], restart_if, replaces, name: str):
    """The service's unit behind the health gate; behind gateways, out of them around the
    switch, llm_max_unavailable hosts at a time."""
    drain, undrain = gateway.drain_steps(settings, service)
    rolling = {"_parallel": settings.max_unavailable} if drain else {}
    return services.health_gated_unit(
        name=name, unit=service.unit_name, unit_text=unit_text, health_url=service.health_url,
        argv_options=argv_options, timeout=services.health_timeout(settings, model),
        service_name=service.name,
        on_gpu=service.uses_gpu, gpus=list(service.gpus) if service.gpus is not None else None,
        restart_if=restart_if, replaces=replaces, drain=drain, undrain=undrain, **rolling)

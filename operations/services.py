"""The llama-server services: user, API keys, units rendered from typed settings, and a
health-gated switch that rolls back to the previous unit (and so the previous build and model)
when the new one does not come up."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import math
import shlex
from io import StringIO
from typing import Callable

import jinja2
from pyinfra import host, state
from pyinfra.api import operation
from pyinfra.facts.files import File
from pyinfra.operations import files, systemd

from llmhost import data_dir, remote
from llmhost.facts import GpuHeld, ServerOptions, UnitState
from llmhost.flags import ServerPaths, option_names, server_argv, systemd_exec_line
from llmhost.buildplan import Build
from llmhost.settings import HostSettings, ServiceSpec, manifest_path
from llmhost.weights import PlacedModel

TEMPLATES = data_dir("templates")
KEY_MODE = "640"


def key_path(settings: HostSettings, service: ServiceSpec) -> str | None:
    if not service.api_key:
        return None
    return f"{settings.config_dir}/keys/{service.name}.key"


# A oneshot unit that makes sure /dev/nvidia-uvm exists before any GPU service starts: the
# services themselves have no privilege to load the module or make the node.
UVM_UNIT = "llmhost-nvidia-uvm.service"
# GPU units also run it as root before every start (ExecStartPre=+): the oneshot above does not
# run again while it is active, and a node removed later would leave a restart on the CPU. Its
# mknod needs "m" in the unit's device policy for that group.
UVM_HELPER = f"{remote.HELPER_DIR}/nvidia_uvm.py"
UVM_GROUP, UVM_ACCESS = "char-nvidia-uvm", "rwm"
# Loaded at boot on GPU hosts (the uvm unit covers a module that still is not there).
MODULES_LOAD_PATH = "/etc/modules-load.d/llmhost-nvidia.conf"
MODULES_LOAD_TEXT = "# Written by llmhost: CUDA services need both at boot.\nnvidia\nnvidia_uvm\n"


def render_unit(settings: HostSettings, service: ServiceSpec, build: Build, model: PlacedModel,
                device_allow: tuple[str, ...] = ()) -> str:
    """The service's unit. ``device_allow``: the DeviceAllow= groups of a GPU service, from
    the host's /proc/devices (gpu.cuda_device_allow); empty for a CPU service."""
    if service.uses_gpu and not device_allow:
        raise ValueError(f"{service.name}: a GPU service needs its DeviceAllow groups")
    argv = server_argv(service, unit_paths(settings, service, build, model))
    return _templates().get_template("llama-server.service.j2").render(
        service=service,
        unit_name=service.unit_name,
        user=settings.service_user,
        exec_line=systemd_exec_line(argv),
        model_name=model.model_path.rsplit("/", 1)[-1],
        model_fingerprint=model.fingerprint,
        cuda_visible_devices=",".join(map(str, service.gpus)) if service.gpus is not None else None,
        device_allow=[(group, UVM_ACCESS if group == UVM_GROUP else "rw") for group in device_allow]
        if service.uses_gpu else [],
        loopback=ipaddress.ip_address(service.host).is_loopback,
        uvm_unit=UVM_UNIT,
        uvm_helper=UVM_HELPER,
    )


def health_timeout(settings: HostSettings, model: PlacedModel) -> int:
    """The health gate's timeout for a service: llm_health_timeout, else 120 s plus 10 s per GB
    of its model files (read and locked at start; a fixed timeout a bigger model outgrows)."""
    if settings.health_timeout:
        return settings.health_timeout
    return 120 + 10 * math.ceil(sum(f.size for f in model.files) / 1e9)


def render_uvm_unit() -> str:
    return _templates().get_template("llmhost-nvidia-uvm.service.j2").render(helper=UVM_HELPER)


def unit_paths(settings: HostSettings, service: ServiceSpec, build: Build, model: PlacedModel) -> ServerPaths:
    visible = 0
    if service.uses_gpu:
        visible = len(service.gpus) if service.gpus is not None else build.gpu_count
    return ServerPaths(binary=build.server_binary, model=model.model_path,
                       mmproj=model.mmproj_path, api_key_file=key_path(settings, service),
                       visible_gpus=visible)


def _templates() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), trim_blocks=True,
                              lstrip_blocks=True, keep_trailing_newline=True,
                              undefined=jinja2.StrictUndefined, autoescape=False)


def nvidia_uvm() -> None:
    """GPU hosts: the nvidia modules loaded at boot, and the oneshot unit that GPU services
    require, which makes /dev/nvidia-uvm if it is still missing when they start."""
    files.put(name="NVIDIA modules at boot", src=StringIO(MODULES_LOAD_TEXT),
              dest=MODULES_LOAD_PATH, user="root", group="root", mode="644")
    unit = files.put(name=f"Unit {UVM_UNIT}", src=StringIO(render_uvm_unit()),
                     dest=f"/etc/systemd/system/{UVM_UNIT}", user="root", group="root", mode="644")
    systemd.daemon_reload(name="systemd daemon-reload", _if=unit.did_change)
    systemd.service(name=f"Service {UVM_UNIT}", service=UVM_UNIT, running=True, enabled=True)


@operation()
def generated_key(path: str, group: str):
    """An API key made on the host (32 random bytes, hex) when it has none: it never leaves
    the host and is never printed; its owner and mode are kept root:<group> 0640.

    + path: the key file
    + group: the services' group, which may read it

    **Example:**

    .. code:: python

        generated_key(name="API key of main", path="/etc/llama/keys/main.key", group="llama")
    """
    info = host.get_fact(File, path=path)
    if info and info["size"] > 0 and info["user"] == "root" and info["group"] == group \
            and info["mode"] == int(KEY_MODE):
        host.noop(f"API key {path} is present with root:{group} {KEY_MODE}")
        return
    q = shlex.quote(path)
    if not info or info["size"] == 0:
        yield new_key_command(path)
    yield f"chown root:{shlex.quote(group)} {q} && chmod {KEY_MODE} {q}"


def new_key_command(path: str) -> str:
    """Write a new key (32 random bytes, hex, no newline) to ``path``, readable by root only:
    made on the host, it is on no command line and in no output."""
    tmp = shlex.quote(path + ".tmp")
    return (f"umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n' > {tmp} "
            f"&& mv {tmp} {shlex.quote(path)}")


def removed_services(settings: HostSettings, previous_manifest: dict | None) -> list[dict]:
    """Services the last deploy's manifest lists and the settings no longer name: only units
    this tool installed are ever retired."""
    wanted = {service.name for service in settings.services}
    return [s for s in (previous_manifest or {}).get("services", []) if s.get("name") not in wanted]


def handed_over(service: ServiceSpec, removed: list[dict]) -> list[dict]:
    """The removed services whose port ``service`` takes (a renamed service)."""
    return [{"unit": s["unit"], "health_url": s["health_url"]} for s in removed
            if _recorded_port(s) == service.port]


def _recorded_port(record: dict) -> int | None:
    """A service's port in the last manifest, read as JSON (not llmhost.manifest) so a host last
    deployed by an earlier llmhost still hands its port over: manifest version 3 keeps it under
    "settings", version 2 at the top."""
    return (record.get("settings") or {}).get("port", record.get("port"))


@operation()
def retired_units(units: list[str]):
    """Stop, disable and set aside the units of removed services (see removed_services); a
    unit already gone is left alone.

    + units: unit names, e.g. ``["llama-old.service"]``

    **Example:**

    .. code:: python

        retired_units(name="Retire removed services", units=["llama-old.service"])
    """
    states = {unit: host.get_fact(UnitState, unit=unit) for unit in units}
    present = [unit for unit, s in states.items() if s["sha256"] or s["enabled"] or s["active"]]
    if not present:
        host.noop(f"{', '.join(units)} already retired")
        return
    yield remote.streamed(remote.helper_command("switch_service.py"), f"retire of {', '.join(present)}",
                          stdin=json.dumps({"retire": present}))


@operation()
def health_gated_unit(unit: str, unit_text: str, health_url: str, argv_options: list[str],
                      timeout: int, service_name: str, on_gpu: bool = False,
                      gpus: list[int] | None = None, restart_if: Callable[[], bool] | None = None,
                      replaces: list[dict] | None = None, drain: list | None = None,
                      undrain: list | None = None):
    """Install a service's unit and (re)start it behind the health gate: /health 200 within
    ``timeout`` and, for a GPU service, its process on its GPUs (files/gpu_check.py). A unit
    that fails the gate is rolled back to the previous one (and so the previous build and
    model), which is started and checked again; the host then fails with the reason.

    Before anything changes, every option of the new argv must be one the built binary's
    --help lists: an unknown flag fails the host with the running service untouched.

    + unit: the unit's name, e.g. ``llama-main.service``
    + unit_text: the unit file to install
    + health_url: the service's /health
    + argv_options: the binary, then the option names of its argv (what --help must list)
    + timeout: seconds the new unit may take to pass the gate
    + service_name: the service, for the lines the operator reads
    + on_gpu: a GPU service (gpu_layers > 0): healthy only on its GPUs
    + gpus: the GPU indexes it was given (None: any of the host's)
    + restart_if: restart behind the gate even when the unit text is the same (a build or a
      key that changed under it)
    + replaces: units of removed services on the same port (a rename): stopped just before,
      retired once this one is healthy, started again if it is not
    + drain: commands run just before the switch (take the service out of the gateways:
      llmhost.gateway.drain_steps); a failed switch leaves it out, and says so
    + undrain: commands run once the switch is healthy (put it back in)

    **Example:**

    .. code:: python

        health_gated_unit(name="Service llama-main.service", unit="llama-main.service",
                          unit_text=text, health_url="http://127.0.0.1:18082/health",
                          argv_options=["/opt/llama.cpp/builds/x/bin/llama-server", "--model"],
                          timeout=300, service_name="main", on_gpu=True)
    """
    current = host.get_fact(UnitState, unit=unit)
    wanted = hashlib.sha256(unit_text.encode()).hexdigest()
    forced = bool(restart_if and restart_if())
    if current["sha256"] == wanted and current["enabled"] and current["active"] and not forced:
        host.noop(f"{unit} is up to date and active")
        return
    if current["sha256"] and current["sha256"] != wanted and current.get("missing") and not state.is_executing:
        host.log_styled(f"{unit}: the unit now live, which a failed switch would go back to, "
                        f"names files that are gone: {', '.join(current['missing'])}", fg="yellow")
    binary = argv_options[0]
    # None while planning a fresh host (no build yet); at execution the build exists.
    known = host.get_fact(ServerOptions, binary=binary)
    unknown = [name for name in argv_options[1:] if known is not None and name not in known]
    if unknown:
        yield remote.fail(
            f"host {host.name}: llm_services.{service_name}: found {', '.join(unknown)}, which "
            f"{binary} --help does not list; expected only options this llama.cpp build accepts "
            f"(check extra_args and llm_llamacpp_commit). The running service was not changed.")
        return
    request = {"unit": unit, "text": unit_text, "health_url": health_url, "timeout": timeout,
               "replaces": replaces or []}
    if on_gpu:
        # Healthy means on its GPUs too: /health alone passes a server that fell back to the CPU.
        request["gpu"] = {"gpus": list(gpus) if gpus is not None else None}
    switch = remote.helper_command("switch_service.py")
    if drain:
        yield from drain
        switch += (f" || {{ rc=$?; echo '{unit}: left drained at the gateway: the switch failed, "
                   f"so it takes no gateway traffic until a deploy switches it healthy'; exit $rc; }}")
    yield remote.streamed(switch, f"switch of {unit}", stdin=json.dumps(request))
    yield from undrain or ()


def off_its_gpus(service: ServiceSpec) -> bool:
    """Whether the running GPU service holds its GPUs no longer (or never did): said, and then
    restarted behind the health gate like any change."""
    held = host.get_fact(GpuHeld, unit=service.unit_name,
                         gpus=",".join(map(str, service.gpus or ())))
    if held is None or held["ok"]:
        return False
    host.log_styled(f"{service.unit_name} is running but not on its GPUs ({held['reason']}): "
                    f"restarting it behind the health gate", fg="yellow")
    return True


def any_changed(op_metas) -> bool:
    """Whether any of the operations changes the host: `did_change` once they ran,
    `will_change` while pyinfra is still planning."""
    if state.is_executing:
        return any(op.did_change() for op in op_metas)
    return any(op.will_change for op in op_metas)


def argv_options(settings: HostSettings, service: ServiceSpec, build: Build, model: PlacedModel) -> list[str]:
    """The binary followed by the option names of the service's argv (what --help must list)."""
    argv = server_argv(service, unit_paths(settings, service, build, model))
    return [argv[0], *option_names(argv)]


MANIFEST_NAME = manifest_path({}).rsplit("/", 1)[1]

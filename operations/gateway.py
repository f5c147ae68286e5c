"""The fleet gateway: HAProxy (the distribution's package) in front of every service of the
inventory, on the hosts whose data has ``llm_gateway`` (group_data/llm_gateways.py).

One OpenAI-compatible front (/v1/..., /health), a backend per model (a service's alias, else
its name) holding every host that serves it, routed by the request body's ``model``; active
health checks on each server's /health, least connections, each server's maxconn = its
service's slots so extra requests queue at the gateway; retries and redispatch when a
connection fails or a server dies before answering; keys checked at the edge; Prometheus on a
loopback port. Redeploys of the backends drain each server here first (see ``drain_steps``).

Secrets: client keys are made on the gateway (root-only files) or pushed, and the config names
only their sha256 (clients.map); the key the gateway shows a backend is the service's pushed key
(api_key_file on the controller), written to backend-keys.map, root-only. Pushed keys, the map
and the TLS PEM travel through llmhost.secrets (stdin only): none is in the config text, a
command line, a temporary file or pyinfra's output, --diff included.

A backend key rotated in one deploy fails no request: each backend first accepts the new key and
the previous one (its switch, behind the drain), then the gateway moves to the new key
(``backend_keys``, an operation every host shares, so it waits for all of them), then each
backend drops the previous key (llmhost.deploys).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
import shlex
import weakref
from dataclasses import dataclass, field
from io import StringIO
from pathlib import Path

import jinja2
from pyinfra import host, state
from pyinfra.api import FileUploadCommand, FunctionCommand, State, StringCommand, operation
from pyinfra.api.arguments import CONNECTOR_ARGUMENT_KEYS, pop_global_arguments
from pyinfra.context import ctx_state
from pyinfra.facts.deb import DebPackages
from pyinfra.operations import apt, files, systemd

from llmhost import base, data_dir, preflight, remote, secrets, services
from llmhost.facts import FileDigests
from llmhost.remote import HELPER_DIR
from llmhost.settings import GATEWAY_ALIAS_RE, GatewaySpec, HostSettings, SettingsError, \
    load_inventory_settings

CONFIG = "/etc/haproxy/haproxy.cfg"
STATE_DIR = "/etc/llmhost-gateway"
CLIENT_KEYS = f"{STATE_DIR}/clients"
CLIENTS_MAP = f"{STATE_DIR}/clients.map"
BACKEND_KEYS_MAP = f"{STATE_DIR}/backend-keys.map"
TLS_PEM = f"{STATE_DIR}/tls.pem"
# What the deploy made of llm_gateway, for the host suite (tests/host/test_gateway.py): no key.
RECORD = f"{STATE_DIR}/gateway.json"
ADMIN_SOCKET = "/run/haproxy/admin.sock"
# The master-worker CLI of Debian's and Ubuntu's haproxy.service (-S, its EXTRAOPTS).
MASTER_SOCKET = "/run/haproxy-master.sock"
TEMPLATES = data_dir("templates")
MIB = 1024 * 1024
# HAProxy's buffers hold a request's headers and body together, and keep tune.maxrewrite
# (1 KiB) and a few HTX block headers of their own: the headroom above max_body_mib. Headers are
# capped well below it, so a body up to the limit always fits whole and one byte over it always
# shows (measured in tests/unit/test_gateway.py).
BUFFER_HEADROOM = 64 * 1024
MAX_HEADERS = 32 * 1024


@dataclass(frozen=True)
class Server:
    """One service of one host, as a server of its model's backend."""

    host_name: str
    service: str
    address: str
    port: int
    slots: int
    key_file: str | None  # the pushed key on the controller; None: the service has no key

    @property
    def name(self) -> str:
        return _haproxy_name(f"{self.host_name}-{self.service}")


@dataclass(frozen=True)
class Backend:
    model: str
    servers: tuple[Server, ...]

    @property
    def name(self) -> str:
        return "be_" + _haproxy_name(self.model)

    @property
    def key_file(self) -> str | None:
        return self.servers[0].key_file


def _haproxy_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.:-]", "_", text)


def host_address(name: str, data: dict, settings: HostSettings) -> str:
    """Where gateways reach a host: llm_address, else its SSH address, else its name."""
    return settings.address or data.get("ssh_hostname") or name


def backends(fleet: dict[str, HostSettings], addresses: dict[str, str]) -> tuple[Backend, ...]:
    """Every service of every host of the inventory, grouped by model, in inventory order."""
    by_model: dict[str, list[Server]] = {}
    for name, settings in fleet.items():
        for service in settings.services:
            model = service.alias or service.name
            by_model.setdefault(model, []).append(Server(
                name, service.name, addresses[name], service.port, service.parallel,
                service.api_key_file if service.api_key else None))
    return tuple(Backend(model, tuple(servers)) for model, servers in by_model.items())


def problems(gateway_name: str, spec: GatewaySpec, fleet_backends: tuple[Backend, ...],
             fleet: dict[str, HostSettings]) -> list[str]:
    """What makes this gateway's config wrong, one line each (host, setting, found, allowed)."""
    where = f"host {gateway_name}: llm_gateway"
    found = []
    if not fleet_backends:
        found.append(f"{where}: found no host with llm_services in the inventory, expected at "
                     f"least one service to serve")
    models = [b.model for b in fleet_backends]
    if spec.default_model and spec.default_model not in models:
        found.append(f"{where}.default_model: found {spec.default_model!r}, expected one of the "
                     f"inventory's models: {', '.join(models)}")
    for backend in fleet_backends:
        first = backend.servers[0]
        if not GATEWAY_ALIAS_RE.match(backend.model):
            found.append(f"host {first.host_name}: llm_services.{first.service}.alias: found "
                         f"{backend.model!r}, expected letters, digits and . _ : / - for a model "
                         f"a gateway routes on")
        keys = {s.key_file for s in backend.servers}
        if len(keys) > 1:
            found.append(f"{where}: model {backend.model!r}: its servers "
                         f"({', '.join(f'{s.host_name}.{s.service}' for s in backend.servers)}) "
                         f"have different keys, expected one api_key_file for all of them (the "
                         f"gateway shows a model's servers one key)")
        for server in backend.servers:
            service = next(s for s in fleet[server.host_name].services if s.name == server.service)
            if service.api_key and not service.api_key_file:
                found.append(f"host {server.host_name}: llm_services.{server.service}.api_key_file: "
                             f"found none (a key generated on the host), expected a pushed key "
                             f"for a service behind gateway {gateway_name} (the gateway must know "
                             f"it), or api_key: false on a loopback bind")
            if _loopback(service.host) and not _loopback(server.address):
                found.append(f"host {server.host_name}: llm_services.{server.service}.host: found "
                             f"{service.host!r}, expected an address gateway {gateway_name} can "
                             f"reach (it reaches the host at {server.address})")
    return found


def _loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address == "localhost"


def render_config(spec: GatewaySpec, fleet_backends: tuple[Backend, ...], *,
                  admin_socket: str = ADMIN_SOCKET, clients_map: str = CLIENTS_MAP,
                  backend_keys_map: str = BACKEND_KEYS_MAP, tls_pem: str = TLS_PEM) -> str:
    """The config; the paths are the gateway's own unless a test runs HAProxy elsewhere."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), trim_blocks=True,
                             lstrip_blocks=True, keep_trailing_newline=True,
                             undefined=jinja2.StrictUndefined, autoescape=False)
    default = next((b for b in fleet_backends if b.model == spec.default_model), fleet_backends[0])
    max_body = spec.max_body_mib * MIB
    too_large = json.dumps({"error": {
        "code": 413, "message": f"request body larger than the gateway limit of "
                                f"{spec.max_body_mib} MiB ({max_body} bytes)",
        "type": "invalid_request_error"}}, separators=(",", ":"))
    return env.get_template("haproxy.cfg.j2").render(
        spec=spec, backends=fleet_backends, default_backend=default.name,
        bufsize=max_body + BUFFER_HEADROOM, max_body=max_body, max_headers=MAX_HEADERS,
        too_large=too_large,
        admin_socket=admin_socket, clients_map=clients_map, backend_keys_map=backend_keys_map,
        tls_pem=tls_pem if spec.tls_cert_file else None)


def record(spec: GatewaySpec, fleet_backends: tuple[Backend, ...]) -> str:
    """The gateway's record: its address, clients (names only), backends and their servers."""
    return json.dumps({
        "port": spec.port, "bind": spec.bind, "tls": bool(spec.tls_cert_file),
        "metrics": f"{spec.metrics_bind}:{spec.metrics_port}", "client_keys": CLIENT_KEYS,
        "clients": list(spec.clients), "admin_socket": ADMIN_SOCKET,
        "backends": [{"name": b.name, "model": b.model, "servers": [s.name for s in b.servers],
                      "slots": [s.slots for s in b.servers]} for b in fleet_backends]},
        indent=1) + "\n"


def backend_keys_map(fleet_backends: tuple[Backend, ...]) -> secrets.Secret:
    """backend name -> "Bearer KEY", for the Authorization header the gateway sets. A secret:
    it only ever travels through secrets.put."""
    lines = []
    for backend in fleet_backends:
        if backend.key_file:
            lines.append(f"{backend.name} Bearer {secrets.read_key(backend.key_file)}")
    return secrets.Secret("".join(f"{line}\n" for line in lines))


# ------------------------------------------------------------------------------- operations

@operation()
def client_keys(clients: list[str], pushed: dict[str, str] | None = None,
                key_dir: str = CLIENT_KEYS, map_path: str = CLIENTS_MAP):
    """A key per client, made on the gateway when it has none (32 random bytes, hex, root-only)
    unless it is pushed, the keys of clients no longer listed removed (revoked), and the map
    HAProxy checks keys against: "sha256-of-key client" per line, so the config and the map
    hold no key.

    + clients: the client names of llm_gateway.clients
    + pushed: client name -> sha256 of its pushed key (the deploy puts the file before this runs)
    + key_dir: where the keys live, one NAME.key each, without a newline
    + map_path: the map file

    **Example:**

    .. code:: python

        client_keys(name="Client keys", clients=["team-a", "ci"], pushed={"ci": digest})
    """
    pushed = pushed or {}
    present = host.get_fact(FileDigests, path=key_dir)
    have = {name[:-4]: digest for name, (digest, *_owner) in present.items() if name.endswith(".key")}
    after = {**have, **pushed}  # each key's sha256 once this run's files are in place
    revoked = sorted(set(have) - set(clients))
    missing = [name for name in clients if name not in after]
    maps = host.get_fact(FileDigests, path=str(Path(map_path).parent))
    expected = "".join(f"{after[name]} {name}\n" for name in clients if name in after)
    current = maps.get(Path(map_path).name, (None,))[0]
    if not revoked and not missing and current == hashlib.sha256(expected.encode()).hexdigest():
        host.noop(f"{len(clients)} client keys and their map are in place")
        return
    for name in revoked:
        yield f"rm -f {shlex.quote(f'{key_dir}/{name}.key')}"
    for name in missing:
        yield services.new_key_command(f"{key_dir}/{name}.key")
    # The map from the key files on the host: sha256sum reads each key from its file, so no
    # key is on a command line.
    tmp = shlex.quote(map_path + ".tmp")
    lines = " ".join(shlex.quote(name) for name in clients)
    yield (f"umask 077 && for n in {lines}; do printf '%s %s\\n' \"$(sha256sum < "
           f"{shlex.quote(key_dir)}/$n.key | cut -d' ' -f1)\" \"$n\"; done > {tmp} && "
           f"mv {tmp} {shlex.quote(map_path)}")


@operation()
def haproxy_config(text: str, path: str = CONFIG):
    """HAProxy's config, installed only once ``haproxy -c`` accepts it on the host: a config it
    refuses fails this host and leaves the running one as it was.

    + text: the config
    + path: where HAProxy reads it

    **Example:**

    .. code:: python

        haproxy_config(name="HAProxy config", text=render_config(spec, backends))
    """
    present = host.get_fact(FileDigests, path=str(Path(path).parent)).get(Path(path).name)
    if present and present[0] == hashlib.sha256(text.encode()).hexdigest():
        host.noop(f"{path} is up to date")
        return
    staged = shlex.quote(path + ".llmhost-new")
    yield FileUploadCommand(StringIO(text), path + ".llmhost-new")
    yield (f"chown root:root {staged} && chmod 644 {staged} && "
           f"if haproxy -c -q -f {staged}; then mv -f {staged} {shlex.quote(path)}; "
           f"else rm -f {staged}; echo 'haproxy -c refused the new config; the running one is "
           f"unchanged' >&2; exit 1; fi")


@operation()
def reload(drain_timeout: int, unit: str = "haproxy.service"):
    """Reload HAProxy (the new worker takes the listening sockets over, so no connection is
    refused) and wait until the previous worker has finished the requests it had, at most
    ``drain_timeout`` seconds: a backend restarted after this is drained at the new worker,
    while the old one could still be sending it requests.

    + drain_timeout: seconds to wait for the previous worker
    + unit: HAProxy's unit

    **Example:**

    .. code:: python

        reload(name="HAProxy reload", drain_timeout=120)
    """
    yield remote.streamed(remote.helper_command(
        "gateway_admin.py", "reload", "--unit", unit, "--master-socket", MASTER_SOCKET,
        "--timeout", str(drain_timeout)), "HAProxy reload")


def gateway(settings: HostSettings) -> None:
    """Converge this host into a gateway for every service of the inventory."""
    spec = settings.gateway
    record_arguments()
    fleet, addresses = fleet_settings()
    fleet_backends = backends(fleet, addresses)
    found = problems(host.name, spec, fleet_backends, fleet)
    if found:
        raise SettingsError(found)
    installed = host.get_fact(DebPackages) or {}
    missing = [name for name in ("haproxy", "python3") if name not in installed]
    # Only when something is missing: an apt index refresh on every run would be a change.
    packages = apt.packages(name=f"HAProxy ({', '.join(missing) or 'installed'})", packages=missing,
                            update=True, no_recommends=True, _if=lambda: bool(missing))
    files.directory(name=f"Directory {HELPER_DIR}", path=HELPER_DIR, user="root", group="root",
                    mode="755")
    base.helpers()
    for path in (STATE_DIR, CLIENT_KEYS):
        files.directory(name=f"Directory {path}", path=path, user="root", group="root", mode="700")
    # Pushed keys without a newline: clients.map holds the sha256 of each key file.
    pushed = {name: secrets.Secret(secrets.read_key(path)) for name, path in spec.client_key_files}
    changed = [secrets.put(name=f"Client key {name} (pushed)", src=key,
                           dest=f"{CLIENT_KEYS}/{name}.key", user="root", group="root", mode="600")
               for name, key in pushed.items()]
    keys = client_keys(name="Client keys", clients=list(spec.clients), pushed={
        name: key.sha256 for name, key in pushed.items()})
    changed += [packages, keys]
    # The map moves to this run's keys after the backends' switches (backend_keys); a new
    # gateway gets it here, as HAProxy refuses a config whose map file is missing.
    if host.get_fact(secrets.SecretFile, path=BACKEND_KEYS_MAP) is None:
        changed.append(secrets.put(name="Backend keys (new gateway)",
                                   src=backend_keys_map(fleet_backends), dest=BACKEND_KEYS_MAP))
    if spec.tls_cert_file:
        changed.append(secrets.put(name="TLS certificate", src=secrets.Secret.from_file(
            spec.tls_cert_file), dest=TLS_PEM))
    changed.append(haproxy_config(name="HAProxy config", text=render_config(spec, fleet_backends)))
    systemd.service(name="HAProxy running", service="haproxy.service", running=True, enabled=True)
    reload(name="HAProxy reload", drain_timeout=spec.drain_timeout,
           _if=lambda: services.any_changed(changed))
    # Last, so it only describes a gateway whose every step above succeeded.
    files.put(name="Gateway record for tests/host", src=StringIO(record(spec, fleet_backends)),
              dest=RECORD, user="root", group="root", mode="644")


@operation()
def backend_keys(content: secrets.Secret | None, drain_timeout: int = 120,
                 path: str = BACKEND_KEYS_MAP):
    """The gateway's backend-keys map moved to ``content`` (secrets.put), and HAProxy reloaded
    when it changed, waiting for the previous worker's requests (see ``reload``).

    Every host of the run defines this operation, at the same line (``content`` None: not a
    gateway, nothing to do), because pyinfra orders operations as a graph of each host's own
    sequence (pyinfra.api.state.State.get_op_order): an operation one host alone defines may
    run before other hosts' earlier lines, while one that every host shares waits for all of
    them. So the map moves only once every backend of the run has switched to accept the new
    key, and the backends drop the previous one only after it.

    + content: the map, ``backend_keys_map(...)``; None on a host that is not a gateway
    + drain_timeout: seconds the reload waits for the previous worker
    + path: the map file

    **Example:**

    .. code:: python

        backend_keys(name="Backend keys", content=backend_keys_map(fleet_backends),
                     drain_timeout=120)
    """
    if content is None:
        host.noop("not a gateway")
        return
    commands = list(secrets.put._inner(src=content, dest=path))
    if commands:
        yield from commands
        yield from reload._inner(drain_timeout=drain_timeout)


def move_backend_keys(settings: HostSettings) -> None:
    """``backend_keys`` on this host: the map on a gateway, nothing elsewhere (see there)."""
    content = None
    if settings.gateway:
        fleet, addresses = fleet_settings()
        content = backend_keys_map(backends(fleet, addresses))
        present = host.get_fact(secrets.SecretFile, path=BACKEND_KEYS_MAP)
        outside = sorted(set(fleet) - {h.name for h in state.inventory.get_active_hosts()})
        if present and present["sha256"] != content.sha256 and outside:
            logger.warning(f"[{host.name}] backend keys change while {', '.join(outside)} are not "
                           f"in this run: the gateway sends their services a key they may not "
                           f"accept yet (deploy them with the gateway)")
    backend_keys(name="Backend keys", content=content,
                 drain_timeout=settings.gateway.drain_timeout if settings.gateway else 120)


# Per run: keyed by the State itself (``pyinfra.state`` is a proxy, the same object in every run).
_fleets: "weakref.WeakKeyDictionary[State, tuple[dict[str, HostSettings], dict[str, str]]]" = \
    weakref.WeakKeyDictionary()


def fleet_settings() -> tuple[dict[str, HostSettings], dict[str, str]]:
    """Settings and addresses of every host of the inventory that serves (within --limit or
    not: a gateway's config names all of them), validated once per run."""
    run_state = ctx_state.get()
    if run_state not in _fleets:
        data = {h.name: h.data.dict() for h in state.inventory if "llm_services" in h.data.dict()}
        fleet = load_inventory_settings(data)
        _fleets[run_state] = (fleet, {n: host_address(n, data[n], s) for n, s in fleet.items()})
    return _fleets[run_state]


def gateways() -> list:
    """The gateway hosts of the inventory."""
    return [h for h in state.inventory if "llm_gateway" in h.data.dict()]


# ------------------------------------------------------------------- draining a backend server
#
# Why the drain runs from the backend's switch and not as an operation of the gateway host:
# pyinfra 3.10 runs one operation at a time for every host that has it (batches of
# ``_parallel`` hosts), in an order it sorts from each host's own sequence of operations. The
# switch of every backend is one operation; an operation of the gateway defined with the deploy
# runs wholly before it (every backend drained at once) or wholly after it, never between two of
# its batches, and with --serial or --no-wait it is not interleaved with the backends at all. One
# called from inside the switch while it runs (pyinfra runs such a nested operation at once)
# would be an operation in name only: pyinfra refuses it while the gateway host is inside an
# operation of its own (two backends switching together, a gateway that also serves), and
# --serial would run it again on the gateway later. Only inside the backend's own switch is
# "drained just before, back just after, llm_max_unavailable at a time" kept. So the drain is a
# command the switch runs on the gateway host, with the connector arguments pyinfra gives an
# operation of that host in this deploy (its data, the deploy call's global arguments such as
# llama_server(_sudo=True), the command line's --sudo ...), recorded while the gateway's own
# deploy is defined (record_arguments).


@dataclass
class _Run:
    """What the drains of one pyinfra run (one State) share."""

    # (gateway, model) -> servers of the model drained there and not yet back
    out: dict[tuple[str, str], int] = field(default_factory=dict)
    # gateway -> the connector arguments an operation of it gets in this deploy
    arguments: dict[str, dict] = field(default_factory=dict)


_runs: "weakref.WeakKeyDictionary[State, _Run]" = weakref.WeakKeyDictionary()


def _run(run_state: State) -> _Run:
    return _runs.setdefault(run_state, _Run())


def connector_arguments(run_state: State, gateway_host) -> dict:
    """The connector arguments (_sudo, _sudo_user, _sudo_password, _su_user, _env, ...) that
    pyinfra gives an operation of ``gateway_host`` called here: the global arguments of the
    deploy being defined (``llama_server(_sudo=True)``), else the host's data, else the command
    line (--sudo), as pyinfra.api.arguments.pop_global_arguments resolves them."""
    arguments, _ = pop_global_arguments(run_state, gateway_host, {})
    return {key: arguments[key] for key in CONNECTOR_ARGUMENT_KEYS if key in arguments}


def record_arguments() -> None:
    """Called in the gateway host's own deploy: keep the connector arguments its operations
    get, for the drains its backends' switches run on it."""
    run_state = ctx_state.get()
    _run(run_state).arguments[host.name] = connector_arguments(run_state, host)


def drain_steps(settings: HostSettings, service) -> tuple[list[FunctionCommand], list[FunctionCommand]]:
    """Commands around a service's switch when gateways serve it: before, drain its server at
    each gateway and wait for its requests to end; after a healthy switch, put it back and wait
    until the gateway's checks see it up. A switch that fails leaves it drained (and counted
    out): at most llm_max_unavailable servers of a model are out at a gateway at once.

    A gateway not in this run (outside --limit, or not connected) cannot drain there: the
    switch is refused with one line saying how to include it, and the service keeps running as
    it was. Connecting to it on demand (its inventory data allows it) was the alternative, and
    the less safe one: it touches a host the operator left out of the run, with arguments and a
    config this run did not check or converge (a new server is not in its config yet).
    """
    model = service.alias or service.name
    backend = "be_" + _haproxy_name(model)
    server = _haproxy_name(f"{host.name}-{service.name}")
    before, after = [], []
    active = set(state.inventory.get_active_hosts())
    missing = [gw for gw in gateways() if gw not in active]
    where = f"host {host.name}: llm_services.{service.name}: {service.unit_name} not restarted"
    outside = [gw.name for gw in missing if not state.is_host_in_limit(gw)]
    if outside:
        return [remote.fail(f"{where}: gateway {', '.join(outside)} is outside this run (--limit "
                            f"or --exclude), so {server} cannot be drained there first; include "
                            f"it: --limit {host.name} {' '.join(f'--limit {n}' for n in outside)}"
                            )], []
    if missing:
        return [remote.fail(f"{where}: gateway {', '.join(gw.name for gw in missing)} could not "
                            f"be connected in this run, so {server} cannot be drained there "
                            f"first; deploy again once it answers")], []
    for gw in gateways():
        spec = preflight.inventory_settings()[gw.name].gateway  # validated, defaults filled
        timeout, interval = spec.drain_timeout, spec.check_interval
        before.append(FunctionCommand(_drain, (gw.name, model, backend, server, timeout,
                                                settings.max_unavailable), {}))
        after.append(FunctionCommand(_ready, (gw.name, model, backend, server,
                                               interval * 2 + 30), {}))
    return before, after


def _admin(run_state: State, gateway_host, *args: str) -> tuple[bool, list[str]]:
    """Run the gateway helper on the gateway host, as an operation of it would run it."""
    command = StringCommand(remote.helper_command("gateway_admin.py", "--socket", ADMIN_SOCKET, *args))
    arguments = _run(run_state).arguments.get(gateway_host.name)
    if arguments is None:  # its deploy did not call llama_server: its data and the command line
        arguments = connector_arguments(run_state, gateway_host)
    ok, output = gateway_host.run_shell_command(command, print_output=False, **arguments)
    return ok, output.output_lines


def _drain(state, host, gateway_name, model, backend, server, timeout, max_unavailable) -> bool:
    run, key = _run(state), (gateway_name, model)
    out = run.out.get(key, 0)
    if out >= max_unavailable:
        host.log_styled(f"{server}: not drained at gateway {gateway_name}: {out} server(s) of "
                        f"{model} already out (llm_max_unavailable {max_unavailable}); the service "
                        f"is not restarted", fg="red")
        return False
    run.out[key] = out + 1  # taken before the command yields to other hosts' greenlets
    gateway_host = state.inventory.get_host(gateway_name)
    ok, lines = _admin(state, gateway_host, "drain", backend, server, "--timeout", str(timeout))
    for line in lines:
        host.log_styled(f"gateway {gateway_name}: {line}", fg="cyan")
    if not ok:
        run.out[key] -= 1
    return ok


def _ready(state, host, gateway_name, model, backend, server, timeout) -> bool:
    run, key = _run(state), (gateway_name, model)
    gateway_host = state.inventory.get_host(gateway_name)
    ok, lines = _admin(state, gateway_host, "ready", backend, server, "--timeout", str(timeout))
    for line in lines:
        host.log_styled(f"gateway {gateway_name}: {line}", fg="cyan")
    if ok:
        run.out[key] = max(0, run.out.get(key, 1) - 1)
    return ok

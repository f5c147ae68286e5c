"""The gateway (llmhost.gateway): its settings and refusals, its operations (facts in, commands
out), and the rendered config run by the real HAProxy of this machine (Debian's package, which
bash .ci/setup installs) in front of small HTTP servers standing in for llama-server: keys at
the edge, routing by model, queueing at maxconn, redispatch past a dead server, drain and
ready through the runtime API, and a reload that revokes a key."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from pyinfra.context import ctx_host, ctx_state

from llmhost import gateway, remote
from llmhost.facts import FileDigests
from llmhost.secrets import SecretFile
from llmhost.settings import SettingsError, load_host_settings

REPO = Path(__file__).resolve().parents[2]
ADMIN = REPO / "files" / "gateway_admin.py"
MODEL = {"source": "local", "path": "/m/x.gguf"}
BACKEND_KEY = "sk-backend-" + "b" * 32
CLIENT_KEY = "c" * 64


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fleet(ports: dict[str, dict[str, int]], key_file: str | None, **service) -> dict:
    """host -> settings: each host's services as {name: port}."""
    extra = {"api_key_file": key_file} if key_file else {"api_key": False}
    return {name: load_host_settings(name, {"llm_services": {
        svc: {"port": port, "model": MODEL, "parallel": 1, "ctx_size": 1024, **extra, **service}
        for svc, port in services.items()}}) for name, services in ports.items()}


def gateway_spec(**values):
    return load_host_settings("gw", {"llm_gateway": {"clients": ["team-a"], **values}}).gateway


# ----------------------------------------------------------------------------- settings

@pytest.mark.parametrize("raw, found", [
    ({}, "host gw: llm_gateway.clients: found none, expected at least one client name"),
    ({"clients": ["Team A"]}, "host gw: llm_gateway.clients: found ['Team A'], expected a list of distinct names"),
    ({"clients": ["a"], "port": 8405}, "host gw: llm_gateway.metrics_port: found 8405, the API's port"),
    ({"clients": ["a"], "api_key": "x"}, "host gw: llm_gateway.api_key: found an unknown setting"),
    ({"clients": ["a"], "tls_cert_file": "cert.pem"}, "host gw: llm_gateway.tls_cert_file: found 'cert.pem', expected an absolute path"),
    ({"clients": ["a"], "client_key_files": {"b": "/k/b.key"}}, "host gw: llm_gateway.client_key_files: found b, expected names of clients"),
    ({"clients": ["a"], "max_body_mib": 0}, "host gw: llm_gateway.max_body_mib: found 0, expected an integer from 1 to 100"),
    ({"clients": ["a"], "max_body_mib": 101}, "host gw: llm_gateway.max_body_mib: found 101, expected an integer from 1 to 100 (llama-server takes no more)"),
    ({"clients": ["a"], "client_key_files": {"a": "k/a.key"}}, "host gw: llm_gateway.client_key_files: found {'a': 'k/a.key'}, expected a mapping of client name to an absolute path"),
])
def test_gateway_settings_are_refused_with_the_line_that_says_why(raw, found):
    with pytest.raises(SettingsError) as error:
        load_host_settings("gw", {"llm_gateway": raw})
    assert any(line.startswith(found) for line in error.value.problems), error.value.problems


def test_a_gateway_refuses_backends_it_could_not_serve(tmp_path):
    key_a, key_b = tmp_path / "a.key", tmp_path / "b.key"
    key_a.write_text("a\n")
    key_b.write_text("b\n")
    hosts = {"h1": load_host_settings("h1", {"llm_services": {
        "translate": {"port": 9001, "model": MODEL, "api_key_file": str(key_a)},
        "chat": {"port": 9002, "model": MODEL}}}),
             "h2": load_host_settings("h2", {"llm_services": {
        "translate": {"port": 9001, "model": MODEL, "api_key_file": str(key_b)}}})}
    addresses = {"h1": "10.0.0.1", "h2": "10.0.0.2"}
    found = gateway.problems("gw", gateway_spec(default_model="nope"),
                             gateway.backends(hosts, addresses), hosts)
    assert found == [
        "host gw: llm_gateway.default_model: found 'nope', expected one of the inventory's models: translate, chat",
        "host gw: llm_gateway: model 'translate': its servers (h1.translate, h2.translate) have "
        "different keys, expected one api_key_file for all of them (the gateway shows a model's "
        "servers one key)",
        "host h1: llm_services.translate.host: found '127.0.0.1', expected an address gateway gw "
        "can reach (it reaches the host at 10.0.0.1)",
        "host h2: llm_services.translate.host: found '127.0.0.1', expected an address gateway gw "
        "can reach (it reaches the host at 10.0.0.2)",
        "host h1: llm_services.chat.api_key_file: found none (a key generated on the host), "
        "expected a pushed key for a service behind gateway gw (the gateway must know it), or "
        "api_key: false on a loopback bind",
        "host h1: llm_services.chat.host: found '127.0.0.1', expected an address gateway gw can "
        "reach (it reaches the host at 10.0.0.1)",
    ]


# ----------------------------------------------------------------------------- operations

class FakeHost:
    name = "gw"

    def __init__(self, digests: dict[str, dict]):
        self.digests, self.noops = digests, []

    def get_fact(self, cls, path=None, **kwargs):
        assert cls is FileDigests
        return self.digests.get(path, {})

    def noop(self, text):
        self.noops.append(text)


def run_op(op, fake, **kwargs) -> list[str]:
    with ctx_host.use(fake):
        return [str(c) for c in op._inner(**kwargs)]


def test_client_keys_in_place_are_a_noop():
    digest = "d" * 64
    map_text = f"{digest} team-a\n"
    fake = FakeHost({gateway.CLIENT_KEYS: {"team-a.key": (digest, "root", "root", "640")},
                     gateway.STATE_DIR: {"clients.map": (hashlib.sha256(map_text.encode()).hexdigest(),
                                                         "root", "root", "600")}})
    assert run_op(gateway.client_keys, fake, clients=["team-a"]) == []
    assert fake.noops == ["1 client keys and their map are in place"]


def test_a_new_client_gets_a_key_a_removed_one_is_revoked_and_the_map_is_rewritten():
    fake = FakeHost({gateway.CLIENT_KEYS: {"old.key": ("e" * 64, "root", "root", "640")}})
    commands = run_op(gateway.client_keys, fake, clients=["team-a"])
    assert commands[0] == f"rm -f {gateway.CLIENT_KEYS}/old.key"
    assert "head -c 32 /dev/urandom" in commands[1] and commands[1].endswith(f"{gateway.CLIENT_KEYS}/team-a.key")
    assert commands[-1].startswith("umask 077 && for n in team-a; do") and "sha256sum <" in commands[-1]
    assert commands[-1].endswith(f"mv {gateway.CLIENTS_MAP}.tmp {gateway.CLIENTS_MAP}")
    assert len(commands) == 3


def test_a_pushed_key_is_never_generated_and_a_new_one_rewrites_the_map():
    old, new = "1" * 64, "2" * 64
    map_text = f"{old} ci\n"
    state = {gateway.CLIENT_KEYS: {"ci.key": (old, "root", "root", "600")},
             gateway.STATE_DIR: {"clients.map": (hashlib.sha256(map_text.encode()).hexdigest(),
                                                 "root", "root", "600")}}
    assert run_op(gateway.client_keys, FakeHost(state), clients=["ci"], pushed={"ci": old}) == []
    # The pushed key changed (its file is put before this runs): only the map is written again.
    commands = run_op(gateway.client_keys, FakeHost(state), clients=["ci"], pushed={"ci": new})
    assert len(commands) == 1 and commands[0].startswith("umask 077 && for n in ci; do")
    # A fresh gateway: the pushed key is not generated (its file comes from the deploy).
    commands = run_op(gateway.client_keys, FakeHost({}), clients=["ci"], pushed={"ci": new})
    assert len(commands) == 1 and "urandom" not in commands[0]


def test_the_config_is_installed_only_through_haproxy_check():
    text = "global\n"
    fake = FakeHost({"/etc/haproxy": {"haproxy.cfg": ("0" * 64, "root", "root", "644")}})
    commands = run_op(gateway.haproxy_config, fake, text=text)
    assert commands[0].startswith("FileUploadCommand") or "haproxy.cfg.llmhost-new" in commands[0]
    assert "if haproxy -c -q -f /etc/haproxy/haproxy.cfg.llmhost-new; then mv -f" in commands[1]
    same = FakeHost({"/etc/haproxy": {"haproxy.cfg": (hashlib.sha256(text.encode()).hexdigest(),
                                                      "root", "root", "644")}})
    assert run_op(gateway.haproxy_config, same, text=text) == []


class SecretHost(FakeHost):
    """Answers llmhost.secrets.SecretFile: the map as it is on the gateway (None: absent)."""

    def __init__(self, present):
        super().__init__({})
        self.present, self.logs = present, []

    def get_fact(self, cls, **kwargs):
        assert cls is SecretFile
        return self.present

    def log(self, text, log_func=None):
        self.logs.append(text)


class NoDiff:
    class config:
        DIFF = False


def test_backend_keys_move_on_a_gateway_with_a_reload_and_nowhere_else(tmp_path):
    key = tmp_path / "k"
    key.write_text(BACKEND_KEY + "\n")
    hosts = fleet({"h1": {"translate": 18083}}, str(key))
    content = gateway.backend_keys_map(gateway.backends(hosts, {"h1": "10.0.0.1"}))
    assert content.reveal() == f"be_translate Bearer {BACKEND_KEY}\n".encode()
    with ctx_state.use(NoDiff()):
        # Not a gateway: nothing (the operation is there so that it waits for every host).
        off = SecretHost(None)
        assert run_op(gateway.backend_keys, off, content=None) == [] and off.noops == ["not a gateway"]
        same = SecretHost({"user": "root", "group": "root", "mode": "600", "sha256": content.sha256,
                           "head": None})
        assert run_op(gateway.backend_keys, same, content=content) == []
        moved = run_op(gateway.backend_keys, SecretHost({**same.present, "sha256": "0" * 64}),
                       content=content, drain_timeout=30)
    assert len(moved) == 2 and BACKEND_KEY not in "".join(moved)
    assert f"mv -f \"$tmp\" {gateway.BACKEND_KEYS_MAP}" in moved[0]
    assert moved[1] == ("python3 /usr/local/lib/llmhost/gateway_admin.py reload --unit haproxy.service "
                        "--master-socket /run/haproxy-master.sock --timeout 30")


# ----------------------------------------------------------------- the config, run by HAProxy

def need_haproxy():
    if not shutil.which("haproxy"):
        pytest.fail("haproxy is not installed: bash .ci/setup installs it (apt install haproxy)")


@pytest.mark.parametrize("variant", ["plain", "tls", "two-models-no-key"])
def test_haproxy_accepts_every_rendered_config(tmp_path, variant):
    need_haproxy()
    key = tmp_path / "backend.key"
    key.write_text(BACKEND_KEY + "\n")
    if variant == "two-models-no-key":
        hosts = fleet({"h1": {"a": 9001, "b": 9002}, "h2": {"a": 9001}}, None)
    else:
        hosts = fleet({"h1": {"translate": 9001}, "h2": {"translate": 9001}}, str(key))
    spec = gateway_spec(**({"tls_cert_file": "/etc/ssl/x.pem"} if variant == "tls" else {}))
    paths = write_maps(tmp_path, hosts)
    if variant == "tls":
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                        "-subj", "/CN=gw", "-keyout", tmp_path / "k.pem", "-out", tmp_path / "c.pem"],
                       check=True, capture_output=True)
        (tmp_path / "tls.pem").write_text((tmp_path / "c.pem").read_text() + (tmp_path / "k.pem").read_text())
    text = gateway.render_config(spec, gateway.backends(hosts, {h: "127.0.0.1" for h in hosts}),
                                 tls_pem=str(tmp_path / "tls.pem"), **paths)
    (tmp_path / "haproxy.cfg").write_text(text)
    check = subprocess.run(["haproxy", "-c", "-f", tmp_path / "haproxy.cfg"], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "WARNING" not in check.stdout + check.stderr, check.stdout + check.stderr
    assert BACKEND_KEY not in text and CLIENT_KEY not in text


def write_maps(tmp_path: Path, hosts: dict, clients: dict[str, str] | None = None) -> dict:
    clients = {"team-a": CLIENT_KEY} if clients is None else clients
    (tmp_path / "clients.map").write_text(
        "".join(f"{hashlib.sha256(key.encode()).hexdigest()} {name}\n" for name, key in clients.items()))
    backends = gateway.backends(hosts, {h: "127.0.0.1" for h in hosts})
    (tmp_path / "backend-keys.map").write_bytes(gateway.backend_keys_map(backends).reveal())
    return {"clients_map": str(tmp_path / "clients.map"),
            "backend_keys_map": str(tmp_path / "backend-keys.map"),
            "admin_socket": str(tmp_path / "admin.sock")}


class FakeLlamaServer(BaseHTTPRequestHandler):
    """Answers /health and completions, records what it was sent, sleeps when asked."""

    def log_message(self, *args):
        pass

    def _send(self, code: int, body: dict):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._send(200, {"status": "ok"})

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                parts.append(self.rfile.read(size))
                self.rfile.readline()
            self.rfile.readline()
            return b"".join(parts)
        return self.rfile.read(int(self.headers["Content-Length"]))

    def do_POST(self):
        raw = self._body()
        self.server.bodies.append(hashlib.sha256(raw).hexdigest())
        if self.server.hang_up:  # read the whole request, then close without an answer
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        body = json.loads(raw)
        self.server.seen.append((self.headers.get("Authorization"), body.get("model")))
        with self.server.lock:
            self.server.busy += 1
            self.server.max_busy = max(self.server.max_busy, self.server.busy)
        time.sleep(body.get("sleep", 0))
        with self.server.lock:
            self.server.busy -= 1
        n = body.get("n_predict", 0)  # as llama-server's /completion answers
        self._send(200, {"server": self.server.label, "model": body.get("model"),
                         "tokens_predicted": n, "timings": {"predicted_per_second": 100.0}})


class QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass  # HAProxy's health checks close their connection early: not an error here


def fake_server(label: str) -> ThreadingHTTPServer:
    server = QuietServer(("127.0.0.1", 0), FakeLlamaServer)
    server.label, server.seen, server.busy, server.max_busy = label, [], 0, 0
    server.bodies, server.hang_up = [], False  # sha256 of each body received
    server.lock = threading.Lock()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def running_gateway(tmp_path):
    """HAProxy (master-worker, foreground) with the rendered config in front of three fake
    servers: h1 and h2 serve model "translate" (1 slot each), h3 serves "chat"."""
    with gateway_running(tmp_path) as gw:
        yield gw


@pytest.fixture
def small_gateway(tmp_path):
    """The same, with a request-body limit of 1 MiB."""
    with gateway_running(tmp_path, max_body_mib=1) as gw:
        yield gw


@contextlib.contextmanager
def gateway_running(tmp_path, **settings):
    need_haproxy()
    servers = {name: fake_server(name) for name in ("h1", "h2", "h3")}
    key = tmp_path / "backend.key"
    key.write_text(BACKEND_KEY + "\n")
    hosts = {name: load_host_settings(name, {"llm_services": {
        ("chat" if name == "h3" else "translate"): {
            "port": servers[name].server_address[1], "model": MODEL, "parallel": 1,
            "ctx_size": 1024, "api_key_file": str(key)}}}) for name in servers}
    port, metrics = free_port(), free_port()
    spec = gateway_spec(port=port, bind="127.0.0.1", metrics_port=metrics, check_interval=1,
                        queue_timeout=30, **settings)
    paths = write_maps(tmp_path, hosts)
    config = tmp_path / "haproxy.cfg"
    config.write_text(gateway.render_config(spec, gateway.backends(hosts, {h: "127.0.0.1" for h in hosts}),
                                            **paths))
    # -S: the master's CLI, as Debian's haproxy.service has it (the reload helper reads it).
    process = subprocess.Popen(["haproxy", "-W", "-db", "-f", str(config), "-S", str(tmp_path / "master.sock")],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: request(port, "/health")[0] == 200, "gateway /health")
        yield {"port": port, "metrics": metrics, "servers": servers, "tmp": tmp_path,
               "master": str(tmp_path / "master.sock"),
               "socket": paths["admin_socket"], "process": process, "hosts": hosts}
    finally:
        process.send_signal(signal.SIGTERM)  # our haproxy, by its PID
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
        for server in servers.values():
            server.shutdown()


def wait_for(check, what: str, timeout: float = 15):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.1)
    pytest.fail(f"{what}: not reached within {timeout}s")


def request(port: int, path: str, body: dict | None = None, key: str | None = CLIENT_KEY):
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def admin(gw, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ADMIN), "--socket", gw["socket"], *args],
                          capture_output=True, text=True, timeout=60)


def server_status(gw, backend: str, server: str) -> dict:
    for line in admin(gw, "show").stdout.splitlines():
        name, status, *fields = line.split()
        if name == f"{backend}/{server}":
            return {"status": status, **dict(f.split("=") for f in fields)}
    raise AssertionError(f"{backend}/{server} not in show")


def test_keys_are_checked_at_the_edge_and_each_backend_gets_its_own(running_gateway):
    gw = running_gateway
    assert request(gw["port"], "/v1/chat/completions", {"model": "translate"}, key=None)[0] == 401
    assert request(gw["port"], "/v1/chat/completions", {"model": "translate"}, key="wrong")[0] == 401
    assert request(gw["port"], "/health", key=None)[0] == 200
    status, body = request(gw["port"], "/v1/chat/completions", {"model": "translate"})
    assert status == 200 and body["server"] in ("h1", "h2")
    seen = [auth for s in gw["servers"].values() for auth, _ in s.seen]
    assert seen == [f"Bearer {BACKEND_KEY}"], seen  # the client's key never reached a backend


def test_requests_are_routed_by_the_model_they_name(running_gateway):
    gw = running_gateway
    assert request(gw["port"], "/v1/chat/completions", {"model": "chat"})[1]["server"] == "h3"
    for _ in range(4):
        assert request(gw["port"], "/v1/chat/completions", {"model": "translate"})[1]["server"] in ("h1", "h2")
    # A model no backend serves goes to the default (the first of the inventory).
    assert request(gw["port"], "/v1/chat/completions", {"model": "other"})[1]["server"] in ("h1", "h2")


def test_requests_beyond_the_slots_queue_at_the_gateway_and_all_succeed(running_gateway):
    gw = running_gateway
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: request(gw["port"], "/v1/chat/completions",
                                                  {"model": "translate", "sleep": 0.5}), range(8)))
    assert [status for status, _ in results] == [200] * 8
    for name in ("h1", "h2"):  # maxconn 1: never two at once on a 1-slot server
        assert gw["servers"][name].max_busy == 1, name
    backend = server_status(gw, "be_translate", "BACKEND")
    assert int(backend["qmax"]) > 0 and backend["hrsp_5xx"] == "0", backend


def test_a_dead_server_costs_no_request(running_gateway):
    gw = running_gateway
    gw["servers"]["h1"].shutdown()
    gw["servers"]["h1"].server_close()  # connection refused from now on
    statuses = [request(gw["port"], "/v1/chat/completions", {"model": "translate"})[0] for _ in range(10)]
    assert statuses == [200] * 10
    wait_for(lambda: server_status(gw, "be_translate", "h1-translate")["status"] == "DOWN",
             "h1 marked DOWN by the health checks", timeout=10)


def test_drain_takes_a_server_out_and_ready_puts_it_back(running_gateway):
    gw = running_gateway
    drained = admin(gw, "drain", "be_translate", "h1-translate", "--timeout", "10")
    assert drained.returncode == 0 and "h1-translate drained from be_translate" in drained.stdout
    assert server_status(gw, "be_translate", "h1-translate")["status"] == "DRAIN"
    before = len(gw["servers"]["h1"].seen)
    for _ in range(6):
        assert request(gw["port"], "/v1/chat/completions", {"model": "translate"})[1]["server"] == "h2"
    assert len(gw["servers"]["h1"].seen) == before
    ready = admin(gw, "ready", "be_translate", "h1-translate", "--timeout", "10")
    assert ready.returncode == 0 and "h1-translate back in be_translate: UP" in ready.stdout
    assert admin(gw, "drain", "be_translate", "nope").returncode == 1


def test_a_reload_revokes_a_removed_key_without_dropping_a_request(running_gateway):
    gw = running_gateway
    other = "d" * 64
    write_maps(gw["tmp"], gw["hosts"], clients={"team-a": CLIENT_KEY, "ci": other})
    gw["process"].send_signal(signal.SIGUSR2)  # what systemctl reload haproxy sends
    wait_for(lambda: request(gw["port"], "/v1/models", key=other)[0] == 200, "ci's key after reload")
    with ThreadPoolExecutor(2) as pool:
        slow = pool.submit(request, gw["port"], "/v1/chat/completions", {"model": "translate", "sleep": 2})
        time.sleep(0.5)
        write_maps(gw["tmp"], gw["hosts"], clients={"team-a": CLIENT_KEY})
        gw["process"].send_signal(signal.SIGUSR2)
        assert slow.result()[0] == 200  # in flight across the reload
    wait_for(lambda: request(gw["port"], "/v1/models", key=other)[0] == 401, "ci's key revoked")
    assert request(gw["port"], "/v1/models")[0] == 200


# -------------------------------------------------------------------- large request bodies

def chat_body(model: str, size: int) -> bytes:
    """A chat request of about ``size`` bytes that names its model after its messages, where a
    client serializing {"messages": ..., "model": ...} puts it."""
    return json.dumps({"messages": [{"role": "user", "content": "x" * size}],
                       "model": model}).encode()


def post_raw(port: int, body: bytes, *, chunked: bool = False, length: int | None = None,
             extra_headers: str = "") -> tuple[int, dict]:
    """POST over a raw socket, as Content-Length (``length``, else the body's) or in chunks,
    reading the answer even when the gateway answers and closes before the body is all sent
    (as curl and requests do; urllib gives up with a broken pipe)."""
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {CLIENT_KEY}"
            f"\r\nContent-Type: application/json\r\n{extra_headers}")
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            if chunked:
                sock.sendall(f"{head}Transfer-Encoding: chunked\r\n\r\n".encode())
                for i in range(0, len(body), 65536):
                    part = body[i:i + 65536]
                    sock.sendall(b"%x\r\n%s\r\n" % (len(part), part))
                sock.sendall(b"0\r\n\r\n")
            else:
                length = len(body) if length is None else length
                sock.sendall(f"{head}Content-Length: {length}\r\n\r\n".encode() + body)
        answer = b""
        with contextlib.suppress(ConnectionResetError):
            while b"\r\n\r\n" not in answer or len(answer.partition(b"\r\n\r\n")[2]) < int(
                    re.search(rb"(?i)content-length: *(\d+)", answer).group(1)):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                answer += chunk
    status = int(answer.split(b" ", 2)[1])
    return status, json.loads(answer.partition(b"\r\n\r\n")[2] or b"{}")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_a_large_request_naming_its_model_after_its_messages_reaches_that_model(running_gateway):
    gw = running_gateway
    body = chat_body("chat", 1_000_000)  # "model" about 1 MB in: far past HAProxy's 256 KiB of before
    status, answer = post_raw(gw["port"], body)
    assert (status, answer["server"], answer["model"]) == (200, "h3", "chat")
    assert gw["servers"]["h3"].bodies == [sha(body)]  # and it got the body whole
    # As much as the limit (16 MiB by default), in chunks without a Content-Length too.
    big = chat_body("chat", 16 * 1024 * 1024 - 100)
    assert post_raw(gw["port"], big, chunked=True)[1]["server"] == "h3"
    assert gw["servers"]["h3"].bodies[-1] == sha(big)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_body_over_the_limit_gets_413_and_one_at_the_limit_goes_through_whole(small_gateway, chunked):
    gw, limit = small_gateway, 1024 * 1024  # max_body_mib 1
    at_limit = b"{" + b" " * (limit - 2) + b"}"
    status, answer = post_raw(gw["port"], at_limit, chunked=chunked)
    assert status == 200 and answer["server"] in ("h1", "h2")
    # Headers up to the cap take none of the body's room.
    padded = post_raw(gw["port"], at_limit, chunked=chunked,
                      extra_headers=f"X-Pad: {'p' * (gateway.MAX_HEADERS - 400)}\r\n")
    assert padded[0] == 200
    received = gw["servers"]["h1"].bodies + gw["servers"]["h2"].bodies
    assert received == [sha(at_limit)] * 2
    over = at_limit + b" "
    status, answer = post_raw(gw["port"], over, chunked=chunked)
    assert status == 413, (status, answer)
    assert answer == {"error": {"code": 413, "message": "request body larger than the gateway limit "
                                f"of 1 MiB ({limit} bytes)", "type": "invalid_request_error"}}
    assert len(gw["servers"]["h1"].bodies + gw["servers"]["h2"].bodies) == 2  # nothing went on
    big_headers = post_raw(gw["port"], b"{}", extra_headers=f"X-Pad: {'p' * gateway.MAX_HEADERS}\r\n")
    assert big_headers[0] == 431


def test_a_body_announced_over_the_limit_is_refused_before_it_is_sent(small_gateway):
    status, answer = post_raw(small_gateway["port"], b"", length=1024 * 1024 + 1)
    assert status == 413 and answer["error"]["code"] == 413


@pytest.mark.parametrize("failure", ["refused", "hang-up"])
def test_a_retried_large_request_reaches_the_next_server_whole(running_gateway, failure):
    """h1 refuses the connection (conn-failure), or reads the whole request and closes without
    an answer (empty-response, replayed from HAProxy's copy of the request): each request is
    answered by h2, which gets the body whole."""
    gw = running_gateway
    h1, h2 = gw["servers"]["h1"], gw["servers"]["h2"]
    # Health checks off for h1: it stays UP at the gateway, so requests keep going to it.
    assert admin(gw, "show").returncode == 0
    gateway_admin_api(gw, "disable health be_translate/h1-translate")
    if failure == "refused":
        h1.shutdown()
        h1.server_close()
    else:
        h1.hang_up = True
    bodies = [chat_body("translate", 1_000_000 + i) for i in range(4)]
    for body in bodies:
        status, answer = post_raw(gw["port"], body)
        assert (status, answer.get("server")) == (200, "h2"), (status, answer)
    assert h2.bodies == [sha(body) for body in bodies]
    row = server_status(gw, "be_translate", "h1-translate")
    assert int(row["wretr"]) + int(row["wredis"]) > 0, row  # h1 was tried, and the retry went on
    if failure == "hang-up":
        assert h1.bodies and set(h1.bodies) <= set(h2.bodies)


def gateway_admin_api(gw, command: str) -> str:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(gw["socket"])
        sock.sendall(command.encode() + b"\n")
        return sock.recv(65536).decode()
def admin_module():
    spec = importlib.util.spec_from_file_location("gateway_admin", ADMIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_reload_helper_sees_the_previous_worker_until_its_requests_end(running_gateway):
    """What gateway.reload waits for (gateway_admin.py reload): after a reload the previous
    worker is listed as old while it finishes a request it had, then gone. A backend restarted
    before that would cut the request (sent with the previous backend key, say)."""
    gw, workers = running_gateway, admin_module().workers
    wait_for(lambda: workers(gw["master"]), "the master's CLI")  # opened just after the worker's
    before = set(workers(gw["master"])["workers"])
    assert len(before) == 1 and workers(gw["master"])["old workers"] == []
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(request, gw["port"], "/v1/chat/completions", {"model": "translate", "sleep": 3})
        time.sleep(0.5)
        gw["process"].send_signal(signal.SIGUSR2)
        wait_for(lambda: set(workers(gw["master"])["workers"]) - before, "a new worker")
        assert workers(gw["master"])["old workers"], "the previous worker left before its request ended"
        assert slow.result()[0] == 200
    wait_for(lambda: not workers(gw["master"])["old workers"], "the previous worker gone")


def test_the_example_group_data_of_gateways_is_valid():
    namespace: dict = {}
    exec((REPO / "group_data" / "llm_gateways.py").read_text(), namespace)
    spec = load_host_settings("gw", {"llm_gateway": namespace["llm_gateway"]}).gateway
    assert spec.clients == ("team",) and spec.metrics_bind == "127.0.0.1"


def test_the_gateway_bench_measures_through_it_and_the_report_shows_it(running_gateway, tmp_path):
    """files/bench_gateway.py on "the gateway host" (here), with the record the deploy writes,
    and the bench report's section built from its result."""
    from llmhost import bench_report

    gw = running_gateway
    keys = tmp_path / "clients"
    keys.mkdir()
    (keys / "team-a.key").write_text(CLIENT_KEY)
    spec = gateway_spec(port=gw["port"], bind="127.0.0.1")
    record = json.loads(gateway.record(spec, gateway.backends(gw["hosts"], {h: "127.0.0.1" for h in gw["hosts"]})))
    record["client_keys"] = str(keys)
    (tmp_path / "gateway.json").write_text(json.dumps(record))
    out = tmp_path / "result.json"
    run = subprocess.run([sys.executable, str(REPO / "files" / "bench_gateway.py"), "--record",
                          str(tmp_path / "gateway.json"), "--out", str(out), "--decode-tokens", "8",
                          "--parallel", "1", "--rounds", "2"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert CLIENT_KEY not in run.stdout + run.stderr + out.read_text()
    result = json.loads(out.read_text())
    by_model = {m["model"]: m for m in result["models"]}
    assert sorted(by_model) == ["chat", "translate"]
    # Levels: the asked ones and one request per slot of the model's servers (2 x 1 slot).
    assert [lv["parallel"] for lv in by_model["translate"]["levels"]] == [1, 2]
    for level in by_model["translate"]["levels"]:
        assert all(r["tokens"] == 8 * level["parallel"] for r in level["rounds"])
        assert level["aggregate_tok_s"] > 0 and level["per_request_tok_s"] == 100.0
    served = {s.label: len(s.seen) for s in gw["servers"].values()}
    assert served["h3"] == 2 and served["h1"] + served["h2"] == 2 * (1 + 2), served
    section = "\n".join(bench_report.gateway_section("gw", result, {"gw": {"services": []}}))
    assert "## Through the gateway gw" in section and "### translate (2 servers, 2 slots)" in section
    assert "Its servers were not measured on their hosts in this run" in section


def test_a_pushed_client_key_the_controller_lacks_is_named_before_anything_runs(tmp_path):
    from llmhost.preflight import controller_problems

    settings = load_host_settings("gw", {"llm_gateway": {
        "clients": ["ci"], "client_key_files": {"ci": str(tmp_path / "ci.key")}}})
    assert controller_problems(settings) == [
        f"host gw: llm_gateway.client_key_files.ci: found '{tmp_path}/ci.key', which does not "
        f"exist or is not readable on the controller; expected a file holding the client's key"]
    (tmp_path / "ci.key").write_text("sk-ci\n")
    assert controller_problems(settings) == []


# ----------------------------------------------- the drain, as the deploy wires it (facts in)

# What a fresh host answers, for the facts the default answers of pyinfra's facts do not cover.
FRESH = {"Os": "Linux", "Which": "/usr/sbin/useradd", "Users": {}, "Groups": set(),
         "UnitState": {"sha256": None, "enabled": False, "active": False, "missing": []}}


class RecordingConnector:
    """Stands in for the gateway's SSH connection: records each command and the connector
    arguments it was given, and answers as the helper does."""

    def __init__(self):
        self.calls = []

    def run_shell_command(self, command, print_output=False, **arguments):
        from pyinfra.connectors.util import CommandOutput, OutputLine
        self.calls.append((command, arguments))
        return True, CommandOutput([OutputLine("stdout", "back1-translate drained from be_translate")])


def planned(tmp_path, monkeypatch, *, limit=None, active=("back1", "gate"), back_data=None,
            gate_data=None, config=None, **deploy_arguments):
    """llama_server(**deploy_arguments) defined for a backend and a gateway through pyinfra's
    API, as the CLI defines it for each host of the run (``active``; ``limit``: --limit), with
    the facts of fresh hosts answered here. Returns the State and its hosts."""
    from pyinfra.api import Config, Inventory, State
    from pyinfra.api.host import Host
    from pyinfra.context import ctx_host, ctx_state

    from llmhost import gpu, preflight
    from llmhost.deploys import llama_server

    def fact(self, cls, *args, **kwargs):
        if cls is gpu.GpuHost:  # a CPU host with room on its disks
            return gpu.GpuFacts(disks=tuple(gpu.Disk(path, 10**12, "/") for path in (
                "/opt/llama.cpp", "/var/lib/llama-models")))
        if cls.__name__ in FRESH:
            return FRESH[cls.__name__]
        return cls.default() if hasattr(cls, "default") else None

    monkeypatch.setattr(Host, "get_fact", fact)
    key, model = tmp_path / "translate.key", tmp_path / "m.gguf"
    key.write_text(BACKEND_KEY + "\n")
    model.write_bytes(b"GGUF")
    inventory = Inventory(([
        ("back1", {"llm_services": {"translate": {
            "port": 9001, "host": "0.0.0.0", "model": {"source": "local", "path": str(model)},
            "api_key_file": str(key)}}, **(back_data or {})}),
        ("gate", {"llm_gateway": {"clients": ["team-a"]}, **(gate_data or {})})], {}))
    run_state = State(inventory, config or Config(),
                      initial_limit=[inventory.get_host(n) for n in limit] if limit else None)
    for name in active:
        run_state.activate_host(inventory.get_host(name))
    with ctx_state.use(run_state):
        for name in active:
            with ctx_host.use(inventory.get_host(name)):
                llama_server(**deploy_arguments)
    return run_state, inventory.get_host("back1"), inventory.get_host("gate")


def switch_commands(run_state, back) -> list:
    """The commands of the backend's switch (health_gated_unit), as pyinfra would run them."""
    from pyinfra.context import ctx_host, ctx_state

    for op_hash, data in run_state.ops[back].items():
        if "llama.cpp server | Service llama-translate.service" in run_state.op_meta[op_hash].names:
            with ctx_state.use(run_state), ctx_host.use(back):
                return list(data.command_generator())
    raise AssertionError("no switch on back1")


def drain_on_gateway(run_state, back, gate) -> tuple[str, dict]:
    """Run the switch's first command (the drain) with the gateway's connection recorded."""
    from pyinfra.connectors.util import extract_control_arguments, make_unix_command_for_host

    gate.connector = RecordingConnector()
    drain = switch_commands(run_state, back)[0]
    assert drain.execute(run_state, back, {}) is True
    (command, arguments), = gate.connector.calls
    shell = dict(arguments)
    extract_control_arguments(shell)  # as the SSH connector does before it builds the command
    return str(make_unix_command_for_host(run_state, gate, command, **shell)), arguments


@pytest.mark.parametrize("how", ["deploy call", "command line", "gateway's data"])
def test_the_drain_runs_on_the_gateway_with_the_global_arguments_of_the_deploy(tmp_path, monkeypatch, how):
    """llama_server(_sudo=True) in a user's deploy.py, pyinfra --sudo, or _sudo in the gateway's
    own data: the gateway helper the backend's switch runs there runs under sudo."""
    from pyinfra.api import Config

    if how == "deploy call":
        run_state, back, gate = planned(tmp_path, monkeypatch, _sudo=True)
    elif how == "command line":
        run_state, back, gate = planned(tmp_path, monkeypatch, config=Config(SUDO=True))
    else:
        run_state, back, gate = planned(tmp_path, monkeypatch,
                                        gate_data={"_sudo": True, "_sudo_user": "root"})
    command, arguments = drain_on_gateway(run_state, back, gate)
    assert arguments["_sudo"] is True, arguments
    assert command.startswith("sudo -H -n "), command
    assert command.endswith("python3 /usr/local/lib/llmhost/gateway_admin.py --socket "
                            "/run/haproxy/admin.sock drain be_translate back1-translate --timeout 120'")


def test_the_drain_takes_the_gateways_own_arguments_not_the_backends(tmp_path, monkeypatch):
    run_state, back, gate = planned(tmp_path, monkeypatch, back_data={"_sudo": True})
    command, arguments = drain_on_gateway(run_state, back, gate)
    assert arguments["_sudo"] is False and not command.startswith("sudo"), command


@pytest.mark.parametrize("outside", ["limit", "not connected"])
def test_a_backend_behind_a_gateway_not_in_the_run_is_not_restarted(tmp_path, monkeypatch, outside):
    limit = ("back1",) if outside == "limit" else None
    run_state, back, gate = planned(tmp_path, monkeypatch, limit=limit, active=("back1",))
    commands = switch_commands(run_state, back)
    # The refusal first, and no drain: pyinfra stops the operation at a failed command, so the
    # switch after it never runs.
    assert [getattr(c, "function", None) for c in commands[:-1]] == [remote._fail], commands
    message = commands[0].args[0]
    head = ("host back1: llm_services.translate: llama-translate.service not restarted: gateway "
            "gate ")
    if outside == "limit":
        assert message == head + ("is outside this run (--limit or --exclude), so back1-translate "
                                  "cannot be drained there first; include it: --limit back1 "
                                  "--limit gate")
    else:
        assert message.startswith(head + "could not be connected in this run")
    assert commands[0].execute(run_state, back, {}) is False


def test_servers_out_are_counted_per_run_and_gateway(tmp_path, monkeypatch):
    """llm_max_unavailable 1: a second server of the model is not drained while one is out, in
    the same run; a new run (a new State) starts with none out."""
    run_state, back, gate = planned(tmp_path, monkeypatch)
    drain_on_gateway(run_state, back, gate)
    drain = switch_commands(run_state, back)[0]
    assert drain.execute(run_state, back, {}) is False  # one out already
    assert gateway._run(run_state).out == {("gate", "translate"): 1}
    undrain = switch_commands(run_state, back)[-1]
    assert undrain.execute(run_state, back, {}) is True
    assert gateway._run(run_state).out == {("gate", "translate"): 0}
    other_state, back, gate = planned(tmp_path, monkeypatch)
    assert gateway._run(other_state).out == {}

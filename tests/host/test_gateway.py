"""What the deploy promised on a gateway host (llm_gateway), from its record
(/etc/llmhost-gateway/gateway.json): HAProxy running the config it checks, every server of
every model up, keys asked at the edge, no key in the config or the journal."""

from __future__ import annotations

from llmhost.hostcheck import http

ADMIN = "python3 /usr/local/lib/llmhost/gateway_admin.py --socket %s show"


def test_haproxy_is_enabled_active_and_accepts_its_config(host, gateway):
    unit = host.service("haproxy")
    assert unit.is_enabled and unit.is_running, "haproxy is not enabled and active"
    check = host.run("haproxy -c -q -f /etc/haproxy/haproxy.cfg")
    assert check.rc == 0, f"haproxy -c refuses /etc/haproxy/haproxy.cfg: {check.stderr.strip()}"


def test_every_server_of_every_model_is_up_at_the_gateway(host, gateway):
    states = {}
    for line in host.run(ADMIN, gateway["admin_socket"]).stdout.splitlines():
        name, status, *_ = line.split()
        states[name] = status
    problems = [f"{name}: {states.get(name, 'missing')}"
                for name in (f"{b['name']}/{server}" for b in gateway["backends"] for server in b["servers"])
                if states.get(name) != "UP"]
    assert not problems, "servers not UP at the gateway: " + ", ".join(problems)


def test_the_gateway_asks_a_client_key_and_serves_with_one(host, gateway):
    address = "127.0.0.1" if gateway["bind"] in ("0.0.0.0", "::") else gateway["bind"]
    scheme = "https" if gateway["tls"] else "http"
    url = f"{scheme}://{address}:{gateway['port']}/v1/models"
    status, _ = http(host, url)
    assert status == 401, f"{url} without a key answered {status}, expected 401"
    key_file = f"{gateway['client_keys']}/{gateway['clients'][0]}.key"
    status, body = http(host, url, key_file=key_file)
    assert status == 200, f"{url} with {gateway['clients'][0]}'s key answered {status}: {body[:200]}"


def test_no_client_key_in_the_config_or_the_journal(host, gateway):
    # The keys become grep's patterns through a root-only file: on no command line.
    leaks = host.run(
        f"umask 077; for f in {gateway['client_keys']}/*.key; do cat \"$f\"; echo; done "
        f"> /run/llmhost-keys && grep -lF -f /run/llmhost-keys /etc/haproxy/haproxy.cfg; "
        f"journalctl --no-pager -u haproxy | grep -cF -f /run/llmhost-keys; rm -f /run/llmhost-keys")
    assert leaks.stdout.split() == ["0"], f"a client key is in the config or the journal: {leaks.stdout}"

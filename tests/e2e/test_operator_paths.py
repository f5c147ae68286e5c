"""The paths real operators take, on sandbox hosts, with llmhost installed from its wheel:

- a wheel built from the repository, installed (not editable) into a fresh virtual environment
  outside the checkout, used from a folder holding only a user's inventory and a three-line
  deploy file: converge, zero-change rerun, the console-script verify;
- a host whose root login is refused and whose `deploy` user has sudo that asks for a password
  (`ssh_user: deploy`, `_sudo: True`, `_sudo_password`), in the same inventory as a root host:
  both converge in one run, rerun with zero changes and pass the console-script verify; every
  file the deploy made is owned as on the root host; the password appears in no output, no
  argv, no journal and no temporary file, the deploy's commands included (llmhost.sudostdin: sudo
  -S reads it from stdin; real sudo there reads exactly that line, a command only its own stdin,
  also where a NOPASSWD rule means sudo does not ask); the same host with passwordless sudo and
  no password (cloud images) reruns and verifies too;
- verify checks host keys as the inventory says: a changed key fails naming the mismatch
  (strict, and also with checking off, as pyinfra), an unknown one under strict checking is
  named, the right key passes, accept-new learns it;
- an inventory that also holds a plain host (no llm_services): left alone, saying so;
- `--limit`: only the limited hosts' Hugging Face models are resolved (the fake Hub counts);
- a CPU-only change restarts only its own service, with no build;
- the lock (the console script llmhost-lock): after a first deploy `main` moves to a re-uploaded
  file; the rerun changes nothing and asks the Hub nothing; a second host new to the model gets
  the locked bytes; `llmhost-lock --upgrade` names the file that changes and the commits, and the
  deploy after it switches both hosts behind the health gate;
- retention: three model revisions leave the live one, its rollback target and one more; what
  goes is named; a rollback after that still works;
- a secret pushed from a user's own deploy file (llmhost.secrets.put) to the sudo host: the
  password reaches sudo on stdin, the secret after it, whole, and neither is in the output
  (-vvv --debug), the journal, an argv or a file under /tmp or /var/tmp.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmhost.files import tiny_gguf
from tests.support import cache, deployment, leaks, sandbox
from tests.support.deployment import REPO, DeployResult
from tests.support.fake_hf import FakeHF

pytestmark = pytest.mark.e2e

REPO_A = "llmhost-tests/gemma-a-GGUF"
REPO_B = "llmhost-tests/gemma-b-GGUF"
DEPLOY_FILE = """from llmhost.deploys import llama_server

llama_server()
"""
# What the deploy writes, where ownership must not depend on who logged in.
DEPLOY_PATHS = ("/opt/llama.cpp/builds", "/opt/llama.cpp/src", "/var/lib/llama-models",
                "/etc/llama", "/usr/local/lib/llmhost", "/var/lib/llmhost",
                "/etc/systemd/system/llama-translate.service")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """llmhost's wheel in a fresh virtual environment outside the checkout."""
    work = tmp_path_factory.mktemp("installed")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(work), str(REPO)],
                   check=True, cwd=work)
    (wheel,) = work.glob("llmhost-*.whl")
    venv = Path("/var/tmp") / f"llmhost-venv-{os.getpid()}"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    try:
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(wheel)], check=True, cwd=work)
        yield venv
    finally:
        subprocess.run(["rm", "-rf", str(venv)], check=True)


@pytest.fixture(scope="module")
def site(installed, tmp_path_factory):
    missing = deployment.require_tools()
    if missing:
        pytest.fail(f"e2e needs {', '.join(missing)} (bash .ci/setup installs them)")
    repo, model = cache.llamacpp_repo(), cache.gemma_model()
    folder = tmp_path_factory.mktemp("user-folder")  # a user's folder: inventory and deploy file
    (folder / "deploy.py").write_text(DEPLOY_FILE)
    password = "pw-" + secrets.token_urlsafe(18)
    with deployment.booted("rootdeploy") as root_host, \
            deployment.booted("sudodeploy", login_user="deploy", sudo_password=password) as sudo_host, \
            deployment.git_daemon(repo) as git_url, FakeHF() as hub:
        leaks.record_login_commands(sudo_host)
        for name in (REPO_A, REPO_B):
            hub.add_repo(name, {cache.MODEL_NAME: model}, sha256={cache.MODEL_NAME: cache.MODEL_SHA256})
        yield {"root": root_host, "sudo": sudo_host, "git_url": git_url, "hub": hub,
               "folder": folder, "venv": installed, "model": model,
               "env": {"HF_ENDPOINT": hub.endpoint}}


SECRET_DEPLOY = """from llmhost.secrets import Secret, put

put(name="A pushed secret", src=Secret(open({key!r}).read()), dest="/etc/llmhost-sudo-test/s.key",
    user="root", group="root", mode="600")
"""
def host_leaks(host, values: list[str]) -> str:
    """Files under /tmp and /var/tmp, argv and environments, the journal of ``host`` that hold
    any of ``values`` (the patterns go on stdin into a root-only file under /run)."""
    return host.exec("sh", "-c", "umask 077; cat > /run/llmhost-patterns; grep -rlF -f "
                     "/run/llmhost-patterns /tmp /var/tmp /proc/[0-9]*/cmdline /proc/[0-9]*/environ "
                     "2>/dev/null; journalctl --no-pager | grep -cF -f /run/llmhost-patterns; "
                     "rm -f /run/llmhost-patterns", input="\n".join(values) + "\n", check=False).stdout


def test_a_secret_reaches_a_host_whose_sudo_asks_a_password(site):
    """llmhost.secrets.put from a user's own deploy file, on the host whose sudo asks a
    password: the password reaches sudo on stdin (llmhost.sudostdin) and the secret after it,
    whole; neither is in the output (-vvv --debug), the journal, an argv or a temp file."""
    host, folder = site["sudo"], site["folder"]
    password, key = host.pyinfra_data()["_sudo_password"], f"sk-sudo-{secrets.token_hex(20)}"
    asks = subprocess.run(["ssh", "-F", str(host.ssh_config), host.name, "sudo -n true"],
                          capture_output=True, text=True, timeout=60)
    assert asks.returncode != 0 and "password is required" in asks.stderr, asks.stderr
    host.exec("mkdir", "-m", "700", "-p", "/etc/llmhost-sudo-test")
    try:
        (folder / "key").write_text(key)
        (folder / "secret_deploy.py").write_text(SECRET_DEPLOY.format(key=str(folder / "key")))
        inventory = write_inventory(site, "sudo-password.py", {"sudodeploy": (host, {})})
        result = subprocess.run([str(site["venv"] / "bin" / "pyinfra"), inventory.name,
                                 "secret_deploy.py", "-y", "-vvv", "--debug"], cwd=folder,
                                capture_output=True, text=True, timeout=300)
        output = result.stdout + result.stderr
        assert result.returncode == 0, output[-4000:]
        assert "sudo -H -S -p '' -k" in output and "SUDO_ASKPASS" not in output
        written = on_host(host, "stat -c '%U:%G %a' /etc/llmhost-sudo-test/s.key && "
                                "sha256sum < /etc/llmhost-sudo-test/s.key").split()
        assert written[:2] == ["root:root", "600"]
        assert written[2] == hashlib.sha256(key.encode()).hexdigest()  # whole: nothing else on stdin
        assert password not in output and key not in output
        assert host_leaks(host, [password, key]).split() == ["0"]
    finally:
        host.exec("rm", "-rf", "/etc/llmhost-sudo-test")


def llm_data(site, port: int, **service) -> dict:
    return {"llm_llamacpp_git_url": site["git_url"],
            "llm_services": {"translate": deployment.service_settings(port, site["model"], **service)}}


def write_inventory(site, name: str, hosts: dict) -> Path:
    return deployment.write_inventory(site["folder"] / name, hosts, group="llm_hosts")


def pyinfra(site, inventory: Path, *extra: str) -> DeployResult:
    """The installed console script, from the user's folder."""
    started = time.monotonic()
    result = subprocess.run([str(site["venv"] / "bin" / "pyinfra"), inventory.name, "deploy.py", "-y", *extra],
                            cwd=site["folder"], capture_output=True, text=True, timeout=1800,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **site["env"]})
    return DeployResult(result.returncode, result.stdout + result.stderr, time.monotonic() - started)


def on_host(host, command: str) -> str:
    return host.exec("sh", "-c", command, timeout=120).stdout


def state_digest(host) -> str:
    return on_host(host, "find /etc /opt /usr/local /var/lib -xdev \\( -type f -o -type l \\) "
                         "-printf '%p %s %T@\\n' 2>/dev/null | sort | sha256sum").split()[0]


@pytest.fixture(scope="module")
def converged(site):
    """Both hosts in one inventory, deployed in parallel by the installed package."""
    ports = {"rootdeploy": 18201, "sudodeploy": 18202}
    inventory = write_inventory(site, "inventory.py", {
        name: (site[kind], llm_data(site, ports[name]))
        for name, kind in (("rootdeploy", "root"), ("sudodeploy", "sudo"))})
    first = pyinfra(site, inventory)
    assert first.returncode == 0, first.output[-8000:]
    site.update(inventory=inventory, first=first, ports=ports)
    return site


def test_root_login_is_refused_on_the_sudo_host(site):
    host = site["sudo"]
    refused = subprocess.run(["ssh", "-F", str(host.ssh_config), "-o", "User=root", "-o", "BatchMode=yes",
                              host.name, "true"], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 255 and "Permission denied" in refused.stderr, refused.stderr
    data = host.pyinfra_data()
    assert data["ssh_user"] == "deploy" and data["_sudo"] is True and data["_sudo_password"]
    # Its sudo really asks: without the password, no.
    asked = deployment.ssh(host, "sudo -n true", check=False)
    assert asked.returncode == 1 and "a password is required" in asked.stderr, asked.stderr


def verify_cli(site, inventory: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The installed console script, from the user's folder."""
    return subprocess.run([str(site["venv"] / "bin" / "llmhost-verify"), inventory, *args],
                          cwd=site["folder"], capture_output=True, text=True, timeout=900,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def rerun(converged) -> DeployResult:
    return pyinfra(converged, converged["inventory"])


@pytest.fixture(scope="module")
def verified(converged, tmp_path_factory):
    """The console-script verify of both hosts, watched for the sudo host's password: argv of
    every process here and on the hosts (sampled), files in verify's temporary folder (TMPDIR)
    while it runs, and the command strings the sudo host's login shell was given."""
    host = converged["sudo"]
    tmp = tmp_path_factory.mktemp("verify-tmpdir")
    before = leaks.login_commands(host)
    started = time.monotonic()
    with leaks.Watch(host.sudo_password, folders=(tmp,), interval=0.05) as watch:
        result = verify_cli(converged, "inventory.py", env={"TMPDIR": str(tmp)})
    hosts = [line for line in result.stdout.splitlines() if line.startswith(("rootdeploy:", "sudodeploy:"))]
    print(f"[timing] verify of 2 hosts, watched: {time.monotonic() - started:.1f}s, {watch.sweeps} sweeps; {hosts}")
    return {"result": result, "watch": watch, "tmp": tmp,
            "commands": leaks.login_commands(host)[len(before):]}


def test_the_installed_package_converges_and_reruns_with_zero_changes(converged, rerun):
    assert "llama.cpp build" in converged["first"].changed_operations
    assert rerun.returncode == 0, rerun.output[-4000:]
    assert rerun.changed_operations == [], rerun.changed_operations
    # The deploy ran from the installed copy, not from this checkout.
    assert str(REPO) not in converged["first"].output


def test_the_console_script_verify_passes_on_both_hosts(verified):
    result = verified["result"]
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "2 of 2 hosts passed" in result.stdout


def test_the_sudo_password_appears_nowhere(converged, rerun, verified):
    host = converged["sudo"]
    password = host.sudo_password
    outputs = {"deploy": converged["first"].output, "rerun": rerun.output,
               "verify": verified["result"].stdout + verified["result"].stderr}
    assert [what for what, text in outputs.items() if password in text] == []
    # verify's commands reached the host's login shell (the recorder works), none with it.
    commands = verified["commands"].splitlines()
    assert len(commands) > 20 and any("sudo -S -p '' -k" in c for c in commands), commands[:5]
    assert [c for c in commands if password in c] == []
    assert verified["watch"].hits == set(), verified["watch"].hits
    assert list(verified["tmp"].iterdir()) == []  # verify removed its work folder
    journal = leaks.journal(host)
    assert '"SYSLOG_IDENTIFIER":"sudo"' in journal and "/bin/sh -c" in journal  # sudo logged verify's commands
    assert password not in journal
    assert leaks.files_holding(host, password, "/tmp", "/var/tmp", f"/home/{host.login_user}") == []


def test_the_deploy_keeps_the_sudo_password_out_of_the_hosts_argv(converged, rerun):
    """pyinfra 3.10 alone would run `env SUDO_ASKPASS=... PYINFRA_SUDO_PASSWORD=<password> sudo -H
    -A -k ...` (the argv of the host's login shell and of env); llmhost.sudostdin gives sudo the
    password on stdin: every command the login shell ran, facts, operations and uploads alike."""
    host = converged["sudo"]
    commands = leaks.login_commands(host).splitlines()
    assert sum("sudo -H -S -p '' -k" in c for c in commands) > 50, commands[:5]  # the deploy's, recorded
    assert [c for c in commands if host.sudo_password in c] == []
    assert [c for c in commands if "ASKPASS" in c or "sudo -H -A" in c] == []


def sudo_session(host):
    """pyinfra's own API, in this process, to the sudo host with llmhost's hook installed."""
    from pyinfra.api import Config, Inventory, State
    from pyinfra.api.connect import connect_all

    import llmhost.deploys  # noqa: F401  (installs llmhost.sudostdin)

    inventory = Inventory(([("sudodeploy", host.pyinfra_data())], {}))
    connect_all(State(inventory, Config()))
    return inventory.get_host("sudodeploy")


def run_as_root(session, command: str, password: str, **arguments):
    from pyinfra.api import StringCommand

    ok, output = session.run_shell_command(StringCommand(command), _sudo=True, _sudo_password=password,
                                           **arguments)
    return ok, output.stdout_lines, output.stderr


def test_real_sudo_reads_the_password_line_and_the_command_only_its_own_stdin(converged):
    """Real sudo -S on the host: it reads exactly the password line (no more), asks on every
    command (-k), and the command's stdin starts at its own first line; a wrong password runs
    nothing and the command's stdin is not what sudo reads as further tries; `_sudo_user`,
    `_use_sudo_login` and an upload under sudo work; no command string held the password."""
    host = converged["sudo"]
    password = host.sudo_password
    before = leaks.login_commands(host)
    session = sudo_session(host)
    try:
        for _ in range(2):  # -k: asked again the second time
            assert run_as_root(session, "cat; id -u", password, _stdin="own one\nown two\n") == \
                (True, ["own one", "own two", "0"], "")
        assert run_as_root(session, "cat; id -un", password, _sudo_user="nobody")[:2] == (True, ["nobody"])
        assert run_as_root(session, "cat; id -u", password, _use_sudo_login=True)[:2] == (True, ["0"])
        ok, out, err = run_as_root(session, "cat", "not-" + password, _stdin="secret-token\n")
        assert not ok and out == [] and "secret-token" not in err, (out, err)
        from io import BytesIO
        assert session.put_file(BytesIO(b"uploaded\n"), "/root/llmhost-upload-check", _sudo=True,
                                _sudo_password=password)
        assert on_host(host, "cat /root/llmhost-upload-check; rm /root/llmhost-upload-check") == "uploaded\n"
    finally:
        session.disconnect()
    commands = leaks.login_commands(host)[len(before):]
    assert "sudo -H -S -p '' -k -u nobody sh -c" in commands and password not in commands
    assert leaks.files_holding(host, password, "/tmp", "/var/tmp", f"/home/{host.login_user}") == []


def test_a_sudo_deploy_owns_every_file_as_a_root_deploy(converged):
    listing = ("find " + " ".join(DEPLOY_PATHS) + " -printf '%p %u:%g %m\\n' 2>/dev/null | sort")
    as_root, as_sudo = (on_host(converged[kind], listing) for kind in ("root", "sudo"))
    assert as_root.count("\n") > 20, as_root
    assert as_sudo == as_root
    assert "deploy" not in as_sudo  # nothing owned by the login user


def test_a_plain_host_in_the_inventory_is_left_alone(converged):
    plain = converged["sudo"]
    before = state_digest(plain)
    plain_data = {k: v for k, v in plain.pyinfra_data().items()}  # connection only: no llm_ keys
    inventory = write_inventory(converged, "mixed.py", {
        "rootdeploy": (converged["root"], llm_data(converged, converged["ports"]["rootdeploy"])),
        "webserver": (plain, plain_data)})
    result = pyinfra(converged, inventory)
    assert result.returncode == 0, result.output[-4000:]
    assert "[webserver] no llm_services in its data: llmhost leaves this host alone" in result.output
    assert result.changed_operations == []
    assert state_digest(plain) == before


def test_limit_resolves_only_the_limited_hosts_models(converged):
    hub = converged["hub"]
    hf = {"model": {"source": "hf", "repo": REPO_A, "file": cache.MODEL_NAME}}
    other = {"model": {"source": "hf", "repo": REPO_B, "file": cache.MODEL_NAME}}
    inventory = write_inventory(converged, "limit.py", {
        "rootdeploy": (converged["root"], llm_data(converged, converged["ports"]["rootdeploy"], **hf)),
        "sudodeploy": (converged["sudo"], llm_data(converged, converged["ports"]["sudodeploy"], **other))})
    hub.log.clear()
    result = pyinfra(converged, inventory, "--limit", "rootdeploy", "--dry")
    assert result.returncode == 0, result.output[-4000:]
    asked = {entry.path.split("/")[4] for entry in hub.log if entry.path.startswith("/api/models/")}
    assert asked == {REPO_A.split("/")[1]}, [e.path for e in hub.log]


def test_a_cpu_only_kv_change_restarts_only_its_service(converged):
    host = converged["root"]
    inventory = write_inventory(converged, "kv.py", {"rootdeploy": (host, llm_data(
        converged, converged["ports"]["rootdeploy"], cache_type_k="q8_0", cache_type_v="q8_0"))})
    builds = on_host(host, "ls /opt/llama.cpp/builds")
    result = pyinfra(converged, inventory)
    assert result.returncode == 0, result.output[-4000:]
    assert result.changed_operations == ["Service llama-translate.service", "Manifest for tests/host"]
    assert on_host(host, "ls /opt/llama.cpp/builds") == builds


def lock_cli(site, inventory: Path, *args: str) -> subprocess.CompletedProcess:
    """The installed console script, from the user's folder."""
    return subprocess.run([str(site["venv"] / "bin" / "llmhost-lock"), inventory.name, *args],
                          cwd=site["folder"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **site["env"]})


def unit_model(host) -> str:
    return on_host(host, "grep -o -- '--model [^ ]*' /etc/systemd/system/llama-translate.service")


def test_the_lock_holds_until_upgraded_then_retention_keeps_three_and_rollback_works(converged, tmp_path):
    """One model through three commits. The lock: `main` moved after the first deploy changes
    nothing and the Hub is not asked; the sudo host, new to the model, gets the locked bytes;
    the upgrade names the file and the deploy after it switches both hosts. Then retention
    and a rollback on the root host."""
    root, sudo, hub = converged["root"], converged["sudo"], converged["hub"]
    host, ports = root, converged["ports"]
    port = ports["rootdeploy"]
    hf = {"model": {"source": "hf", "repo": REPO_A, "file": cache.MODEL_NAME}}
    one = {"rootdeploy": (root, llm_data(converged, ports["rootdeploy"], **hf))}
    both = {**one, "sudodeploy": (sudo, llm_data(converged, ports["sudodeploy"], **hf))}
    model_dir = f"/var/lib/llama-models/{REPO_A.replace('/', '--')}"
    inventory = write_inventory(converged, "revisions.py", one)
    lock_path = converged["folder"] / "revisions.lock"
    commits, outputs = [hub.repos[REPO_A].commit], []
    first = pyinfra(converged, inventory)
    assert first.returncode == 0, first.output[-4000:]
    outputs.append(first.output)
    locked = json.loads(lock_path.read_text())["models"][REPO_A]
    assert locked["commit"] == commits[0]
    assert locked["files"] == {cache.MODEL_NAME: {"sha256": cache.MODEL_SHA256, "size": cache.MODEL_SIZE}}

    tiny = tmp_path / "tiny.gguf"
    tiny_gguf.write(str(tiny))  # a loadable GGUF of other bytes: the re-upload
    moved = hub.new_commit(REPO_A, {cache.MODEL_NAME: tiny})
    hub.reset_counters()
    started = time.monotonic()
    again = pyinfra(converged, inventory)
    assert again.returncode == 0 and again.changed_operations == [], again.output[-4000:]
    assert hub.log == [], [e.path for e in hub.log]  # not one request to the Hub
    print(f"[timing] locked no-op rerun: {time.monotonic() - started:.1f}s")

    inventory = write_inventory(converged, "revisions.py", both)
    added = pyinfra(converged, inventory)
    assert added.returncode == 0, added.output[-4000:]
    assert hub.api_requests() == [] and all(commits[0] in e.path for e in hub.log), hub.log
    assert f"{model_dir}/{commits[0][:12]}/" in unit_model(sudo)
    print(f"[timing] second host gets the locked model: {added.seconds:.1f}s")
    assert on_host(sudo, f"sha256sum {model_dir}/{commits[0][:12]}/*.gguf").split()[0] == cache.MODEL_SHA256

    upgrade = lock_cli(converged, inventory, "--upgrade")
    assert upgrade.returncode == 0, upgrade.stdout + upgrade.stderr
    assert f"{REPO_A} (revision 'main'): {commits[0][:12]} -> {moved[:12]}" in upgrade.stdout, upgrade.stdout
    assert f"  {cache.MODEL_NAME}: sha256 {cache.MODEL_SHA256[:12]} -> " in upgrade.stdout, upgrade.stdout
    assert "llama.cpp" not in upgrade.stdout  # the package's commit did not move
    commits.append(moved)
    switched = pyinfra(converged, inventory)
    assert switched.returncode == 0, switched.output[-4000:]
    assert "Service llama-translate.service" in switched.changed_operations
    outputs.append(switched.output)
    for switched_host in (root, sudo):
        assert f"{model_dir}/{moved[:12]}/" in unit_model(switched_host)
        assert on_host(switched_host, "systemctl is-active llama-translate.service").strip() == "active"

    # A third commit, for retention, on the root host; the sudo host goes back to its own model.
    back = pyinfra(converged, converged["inventory"], "--limit", "sudodeploy")
    assert back.returncode == 0, back.output[-4000:]
    print(f"[timing] both hosts switched: {switched.seconds:.1f}s; the sudo host back: {back.seconds:.1f}s")
    inventory = write_inventory(converged, "revisions.py", one)
    commits.append(hub.new_commit(REPO_A))
    assert lock_cli(converged, inventory, "--upgrade", REPO_A).returncode == 0
    third = pyinfra(converged, inventory)
    assert third.returncode == 0, third.output[-4000:]
    outputs.append(third.output)
    commits = [c[:12] for c in commits]
    # Version folders: <owner>--<repo>/<commit12> and local-<sha12>.
    folders = on_host(host, "cd /var/lib/llama-models && { ls -d *--*/*/ local-*/ 2>/dev/null; true; }").split()
    folders = [f"/var/lib/llama-models/{f.rstrip('/')}" for f in folders]
    # Live (3rd), its rollback target (2nd), and the newest spare (1st); the local model of the
    # first deploys is older than all three: it went, and the deploy that removed it said so.
    assert sorted(folders) == sorted(f"{model_dir}/{c}" for c in commits), folders
    removed = [line for out in outputs for line in out.splitlines() if "retention: removed" in line]
    assert len(removed) == 1 and "/var/lib/llama-models/local-" in removed[0], removed
    assert "retention: removed" not in outputs[0] + outputs[1]
    # A unit that fails now rolls back to the live one, whose model is still there.
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 4096)
    failing = pyinfra(converged, write_inventory(converged, "broken.py", {"rootdeploy": (host, llm_data(
        converged, port, model={"source": "local", "path": str(broken)}))}))
    assert failing.returncode != 0
    assert "ROLLED BACK to the previous unit, which is healthy" in failing.output, failing.output[-4000:]
    assert f"{model_dir}/{commits[2]}/" in on_host(host, "cat /etc/systemd/system/llama-translate.service")


def known_hosts_line(host, public_key: str) -> str:
    """A known_hosts line for the host's address as ssh and pyinfra look it up ([ip]:port)."""
    return f"[127.0.0.1]:{host.ssh_port} {' '.join(public_key.split()[:2])}\n"


def test_verify_checks_host_keys_as_the_inventory_says(converged, tmp_path):
    """One verify run, five inventory entries for the same host, each with its own known_hosts
    file and checking; one check each is enough to show whether verify got in."""
    host, port = converged["root"], converged["ports"]["rootdeploy"]
    real = known_hosts_line(host, on_host(host, "cat /etc/ssh/ssh_host_ed25519_key.pub"))
    sandbox.write_ssh_key(tmp_path / "impostor", "impostor")
    impostor = known_hosts_line(host, (tmp_path / "impostor.pub").read_text())
    cases = {"changed-yes": (impostor, "yes"),
             # "off" still refuses a changed key, as pyinfra does (it only stops asking about
             # hosts it knows no key for).
             "changed-off": (impostor, "off"),
             "unknown": ("", "yes"), "right": (real, "yes"), "learn": ("", "accept-new")}
    hosts = {}
    for name, (known, checking) in cases.items():
        (tmp_path / name).write_text(known)
        hosts[name] = (host, {**llm_data(converged, port), "ssh_known_hosts_file": str(tmp_path / name),
                              "ssh_strict_host_key_checking": checking})
    inventory = write_inventory(converged, "host-keys.py", hosts)
    result = verify_cli(converged, inventory.name, "--", "-k", "test_unit_enabled_and_active")
    summary = result.stdout.split("per-host summary ==")[-1]
    assert result.returncode == 1 and "2 of 5 hosts passed" in summary, result.stdout[-6000:]
    entry = f"[127.0.0.1]:{host.ssh_port}"
    for name in ("changed-yes", "changed-off"):
        assert f"{name}: FAILED" in summary, summary
        assert f"HOST KEY MISMATCH: {entry} sent a different key than {tmp_path / name} holds for it" in summary
    assert f"HOST KEY UNKNOWN: {tmp_path / 'unknown'} holds no ED25519 key for {entry}" in summary, summary
    assert "UNREACHABLE" not in summary
    assert "right: PASSED (1 passed" in summary and "learn: PASSED (1 passed" in summary, summary
    # accept-new learned the key into the inventory's file; the others' files are untouched.
    assert (tmp_path / "learn").read_text().split()[1:] == real.split()[1:]
    assert [(tmp_path / name).read_text() for name in ("unknown", "right", "changed-off")] == ["", real, impostor]


def test_passwordless_sudo_reruns_and_verifies_too(converged):
    """The cloud-image case on the same host, last in this module (it changes the host's
    sudoers): sudo without a password and none in the inventory, so pyinfra runs `sudo -n` and
    verify testinfra's plain --sudo."""
    host, port = converged["sudo"], converged["ports"]["sudodeploy"]
    on_host(host, f"echo '{host.login_user} ALL=(ALL) NOPASSWD: ALL' > /etc/sudoers.d/{host.login_user}")
    data = {**llm_data(converged, port), "_sudo_password": None}
    inventory = write_inventory(converged, "passwordless.py", {"sudodeploy": (host, data)})
    assert "_sudo_password': None" in inventory.read_text()
    # Where sudo does not ask (this NOPASSWD rule), a password given anyway is dropped by the
    # root shell: the command's stdin still starts at its own first line.
    session = sudo_session(host)
    try:
        assert run_as_root(session, "cat; id -u", host.sudo_password, _stdin="own one\n") == \
            (True, ["own one", "0"], "")
    finally:
        session.disconnect()
    before = leaks.login_commands(host)
    rerun = pyinfra(converged, inventory)
    assert rerun.returncode == 0 and rerun.changed_operations == [], rerun.output[-4000:]
    commands = leaks.login_commands(host)[len(before):]
    assert "sudo -H -n" in commands and "sudo -H -A" not in commands, commands[-2000:]
    # One check shows the connection and sudo; the whole suite passed on this host above.
    result = verify_cli(converged, inventory.name, "--", "-k", "test_unit_enabled_and_active")
    assert result.returncode == 0 and "sudodeploy: PASSED (1 passed" in result.stdout, result.stdout[-4000:]

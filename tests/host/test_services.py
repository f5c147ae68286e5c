"""What the deploy promised for each service, checked on the host."""

from __future__ import annotations

import ipaddress
import json
import re
import shlex

import pytest

from llmhost.buildplan import cpu_baseline_features
from llmhost.flags import TUNED_OPTIONS
from llmhost.hostcheck import each, http, info_fields, main_pid, system_info
from llmhost.remote import HELPER_DIR


def test_unit_enabled_and_active(host, services):
    def check(s):
        unit = host.service(s.unit)
        if not unit.is_enabled:
            return f"{s.unit} is not enabled"
        if not unit.is_running:
            return f"{s.unit} is not active"
    each(services, check)


def test_process_runs_as_the_service_user(host, manifest, services):
    def check(s):
        pid = main_pid(host, s.unit)
        if not pid:
            return "no main process"
        user = host.run("ps -o user= -p %s", str(pid)).stdout.strip()
        if user != manifest.service_user:
            return f"runs as {user!r}, expected {manifest.service_user!r}"
    each(services, check)


def test_listens_on_the_configured_address_only(host, services):
    def check(s):
        pid = main_pid(host, s.unit)
        listening = host.run("ss -Hltnp").stdout.splitlines()
        mine = sorted({line.split()[3] for line in listening if f"pid={pid}," in line})
        address = s.settings.host
        expected = f"[{address}]:{s.settings.port}" if ipaddress.ip_address(address).version == 6 \
            else f"{address}:{s.settings.port}"
        if mine != [expected]:
            return f"listens on {mine}, expected only {expected}"
    each(services, check)


def test_health_answers_200_without_a_key(host, services):
    def check(s):
        status, body = http(host, s.health_url)
        if status != 200 or '"ok"' not in body:
            return f"/health answered {status}: {body[:200]}"
    each(services, check)


def test_api_requires_the_key(host, services):
    def check(s):
        if not s.key_file:
            return None
        url = s.health_url.replace("/health", "/v1/models")
        without, _ = http(host, url)
        with_key, body = http(host, url, key_file=s.key_file)
        if without != 401 or with_key != 200:
            return f"/v1/models answered {without} without the key and {with_key} with it, " \
                   f"expected 401 and 200"
    each(services, check)


def test_completion_returns_generated_text(host, services):
    def check(s):
        url = s.health_url.replace("/health", "/completion")
        status, body = http(host, url, key_file=s.key_file,
                            body={"prompt": "The capital of France is", "n_predict": 12,
                                  "temperature": 0})
        if status != 200:
            return f"/completion answered {status}: {body[:300]}"
        content = json.loads(body).get("content", "")
        if len(content.strip()) < 2:
            return f"/completion returned no text: {body[:300]}"
    each(services, check)


def test_model_files_match_their_sha256(host, services):
    def check(s):
        for f in s.files:
            digest = host.run("sha256sum %s", f.path).stdout.split(" ")[0]
            if digest != f.sha256:
                return f"{f.path} has sha256 {digest or '(missing)'}, expected {f.sha256}"
    each(services, check)


def test_unit_serves_the_manifest_model_and_build(host, manifest, services):
    def check(s):
        argv = host.file(f"/proc/{main_pid(host, s.unit)}/cmdline").content_string.split("\0")
        if argv[0] != manifest.llama_cpp.server:
            return f"runs {argv[0]}, expected {manifest.llama_cpp.server}"
        if s.model_path not in argv:
            return f"argv does not name {s.model_path}"
    each(services, check)


def test_the_service_user_can_open_every_file_it_needs(host, manifest, services):
    """Every file the service's command names (binary, model, projector, key) and the build's
    libraries, opened as the service's user: a running server keeps what it has mapped, so a
    file made unreadable under it shows only when it next starts, and fails that start."""
    helper = f"{HELPER_DIR}/access_check.py"

    def check(s):
        paths = [arg for arg in s.argv if arg.startswith("/")]
        result = host.run(shlex.join(["python3", helper, "--user", manifest.service_user,
                                      "--libraries-of", s.argv[0], *paths]))
        if result.rc:
            lines = (result.stdout + result.stderr).strip().replace("\n", "; ")
            return f"user {manifest.service_user} cannot open what the service needs: {lines}"
    each(services, check)


def test_version_names_the_pinned_commit(host, manifest):
    commit = manifest.llama_cpp.commit
    result = host.run("%s --version", manifest.llama_cpp.server)
    version = result.stdout + result.stderr
    assert re.search(rf"\b{commit[:8]}", version), f"--version says {version!r}, expected {commit[:8]}"


def test_memlock_is_unlimited_in_the_unit(host, services):
    def check(s):
        value = host.run("systemctl show -p LimitMEMLOCK --value %s", s.unit).stdout.strip()
        if value != "infinity":
            return f"LimitMEMLOCK={value}, expected infinity"
    each(services, check)


def test_memlock_is_effective_where_the_host_allows_it(host, services):
    # A host whose own hard limit is capped (the sandbox hosts of our CI: 8 MiB, no
    # CAP_SYS_RESOURCE) cannot give a service more; say so instead of passing silently.
    cap = host.run("sh -c 'ulimit -Hl'").stdout.strip()
    if cap != "unlimited":
        pytest.skip(f"this host's hard RLIMIT_MEMLOCK is {cap} KiB and cannot be raised; the unit "
                    f"setting is checked by test_memlock_is_unlimited_in_the_unit")

    def check(s):
        limits = host.file(f"/proc/{main_pid(host, s.unit)}/limits").content_string
        line = next(l for l in limits.splitlines() if l.startswith("Max locked memory"))
        if "unlimited" not in line:
            return f"effective limit: {line}"
    each(services, check)


def test_api_key_file_is_private_to_the_service_group(host, manifest, services):
    def check(s):
        if not s.key_file:
            return None
        f = host.file(s.key_file)
        if not f.exists:
            return f"{s.key_file} is missing: clients cannot read the key the server has"
        found = (f.user, f.group, f.mode)
        expected = ("root", manifest.service_user, 0o640)
        if found != expected:
            return f"{s.key_file} is {found[0]}:{found[1]} {oct(found[2])}, expected " \
                   f"root:{expected[1]} 0o640"
    each(services, check)


def test_api_key_is_in_no_unit_or_argv(host, services):
    def check(s):
        if not s.key_file or not host.file(s.key_file).exists:
            return None  # a missing key file is test_api_key_file_is_private_to_the_service_group's
        key = host.file(s.key_file).content_string.strip()
        unit = host.run("systemctl cat %s", s.unit).stdout
        argv = host.file(f"/proc/{main_pid(host, s.unit)}/cmdline").content_string
        journal = host.run("journalctl -u %s --no-pager -o cat", s.unit).stdout
        leaks = [where for where, text in (("unit", unit), ("argv", argv), ("journal", journal))
                 if key and key in text]
        if leaks:
            return f"the API key appears in: {', '.join(leaks)}"
    each(services, check)


def test_service_is_hardened(host, services):
    wanted = {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
              "PrivateTmp": "yes", "CapabilityBoundingSet": "", "RestrictSUIDSGID": "yes"}

    def check(s):
        props = host.run("systemctl show %s -p %s", s.unit, ",".join(wanted)).stdout
        found = dict(line.split("=", 1) for line in props.splitlines() if "=" in line)
        wrong = {k: found.get(k) for k, v in wanted.items() if found.get(k) != v}
        if wrong:
            return f"hardening not in place: {wrong}"
    each(services, check)


def test_unit_file_is_the_one_the_deploy_wrote(host, services):
    """A hand edit of the unit (an extra flag, say) shows here until the next deploy puts it back."""
    def check(s):
        found = host.run("sha256sum /etc/systemd/system/%s", s.unit).stdout.split(" ")[0]
        if found != s.unit_sha256:
            return f"/etc/systemd/system/{s.unit} differs from the unit the deploy wrote"
    each(services, check)


def test_running_argv_is_the_one_the_deploy_intended(host, services):
    """What runs: a drop-in or a hand edit that changed the command shows here."""
    def check(s):
        pid = main_pid(host, s.unit)
        argv = host.file(f"/proc/{pid}/cmdline").content_string.split("\0")[:-1]
        if argv != list(s.argv):
            extra = [a for a in argv if a not in s.argv]
            gone = [a for a in s.argv if a not in argv]
            return f"pid {pid} runs another command: extra {extra}, missing {gone}"
    each(services, check)


def test_running_service_matches_its_tuned_profile(host, services):
    """A service deployed with an llmhost-tune profile runs each of the profile's values (a
    deploy before the profile was written, or a hand edit, shows here)."""
    tuned = [s for s in services if s.settings.tuned]
    if not tuned:
        pytest.skip("no service runs a tuned profile (llmhost-tune)")

    def check(s):
        profile = s.settings.tuned
        argv = host.file(f"/proc/{main_pid(host, s.unit)}/cmdline").content_string.split("\0")
        wrong = []
        for key, value in profile.settings:
            option = TUNED_OPTIONS[key]
            found = argv[argv.index(option) + 1] if option in argv[:-1] else None
            if found != str(value):
                wrong.append(f"{option} {found or '(absent)'}, the profile says {value}")
        if wrong:
            return f"does not run its tuned profile {profile.name} ({profile.file}): {'; '.join(wrong)}"
    each(tuned, check)


def test_running_binary_is_the_build_on_disk(host, manifest, services):
    """A process keeps a deleted binary open: /health passes while the build is broken on disk."""
    server = manifest.llama_cpp.server
    on_disk = host.run("stat -L -c %%d:%%i %s", server).stdout.strip()

    def check(s):
        pid = main_pid(host, s.unit)
        # The same file, not the same name: a replaced binary keeps its path, and a process in
        # another mount namespace may show another one.
        running = host.run("stat -L -c %%d:%%i /proc/%s/exe", str(pid)).stdout.strip()
        if not on_disk or running != on_disk:
            return (f"pid {pid} runs a binary that is not {server} on disk (deleted or replaced "
                    f"since it started)")
    each(services, check)


def test_build_files_are_as_verified(host, manifest):
    """Every file of the build's bin/ as it was when the build was verified (size, mtime)."""
    build = manifest.llama_cpp.build_dir
    record = json.loads(host.file(f"{build}/.llmhost-build.json").content_string)
    assert record.get("files"), f"{build}: its record lists no files (redeploy to record them)"
    script = ("import json,os,sys; d=sys.argv[1]; r=json.load(open(d+'/.llmhost-build.json'))['files']\n"
              "def now(n):\n"
              "    try: s=os.stat(os.path.join(d,n)); return [s.st_size,s.st_mtime_ns]\n"
              "    except OSError: return None\n"
              "print(json.dumps({n: now(n) for n in r}))")
    found = json.loads(host.run("python3 -c %s %s", script, build).stdout)
    changed = sorted(n for n, v in record["files"].items() if found.get(n) != v)
    assert not changed, f"{build}: {', '.join(changed)} deleted or replaced since the build was verified"


def test_build_runs_the_cpu_baseline_its_self_test_found(host, manifest):
    """The build computed on this host's CPU before it was used (the build's CPU self-test),
    for the baseline the manifest records, and the binary is compiled for that baseline (its
    system_info lists that baseline's instructions and none above it)."""
    build = manifest.llama_cpp
    assert build.cpu_resolved, (f"the manifest records no CPU baseline for {build.build_dir}: "
                                f"it was never self-tested on this CPU (redeploy)")
    if build.cpu_baseline != "auto":
        assert build.cpu_resolved == build.cpu_baseline, \
            f"llm_cpu_baseline pins {build.cpu_baseline}, but the build is for {build.cpu_resolved}"
    record = json.loads(host.file(f"{build.build_dir}/.llmhost-build.json").content_string)
    cpu = record.get("cpu") or {}
    assert (cpu.get("baseline"), tuple(cpu.get("flags", ()))) == (build.cpu_resolved, build.cpu_flags), \
        (f"{build.build_dir}: built for {cpu.get('baseline')} {cpu.get('flags')}, the manifest "
         f"says {build.cpu_resolved} {list(build.cpu_flags)}")
    fields = info_fields(system_info(host, build.server))
    wrong = [f"{feature} = {fields.get(feature, 'absent')} (expected {'1' if wanted else 'absent'})"
             for feature, wanted in cpu_baseline_features(build.cpu_resolved).items()
             if (fields.get(feature) == "1") != wanted]
    assert not wrong, f"{build.server} is not compiled for {build.cpu_resolved}: {'; '.join(wrong)}"

#!/usr/bin/env python3
"""Start what a staged llama-server unit would run, where systemd is not PID 1 (the H100 machine).

    unit_exec.py UNIT_FILE ARGV_JSON [--check]

Takes ExecStart= from the unit gpu_deploy.py rendered (services.render_unit), checks that it
splits into exactly the argv in ARGV_JSON (flags.server_argv), then applies what the unit sets
that can apply without systemd: Environment=, LimitMEMLOCK=infinity, UMask=, User=/Group= (with
their supplementary groups), WorkingDirectory / (systemd's default), and execs the argv.
The sandboxing directives (ProtectSystem=, PrivateTmp=, SystemCallFilter=, ...) need systemd
and are not applied: they are listed on stderr. --check prints the argv and exits.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import resource
import shlex
import sys

APPLIED = {"ExecStart", "Environment", "LimitMEMLOCK", "UMask", "User", "Group"}


def unit_service_section(text: str) -> list[tuple[str, str]]:
    entries, section = [], None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line
            continue
        if section == "[Service]" and "=" in line:
            key, _, value = line.partition("=")
            entries.append((key, value))
    return entries


def exec_argv(value: str) -> list[str]:
    # systemd_exec_line quotes like a shell's double quotes and doubles % and $
    return [arg.replace("%%", "%").replace("$$", "$") for arg in shlex.split(value)]


def main(argv: list[str]) -> int:
    unit_file, argv_json = argv[0], argv[1]
    entries = unit_service_section(open(unit_file).read())
    starts = [v for k, v in entries if k == "ExecStart"]
    if len(starts) != 1:
        raise SystemExit(f"unit_exec: {unit_file} has {len(starts)} ExecStart= lines")
    command = exec_argv(starts[0])
    expected = json.load(open(argv_json))
    if command != expected:
        raise SystemExit(f"unit_exec: ExecStart {command} differs from {argv_json} {expected}")
    print(f"unit_exec: ExecStart = flags.server_argv ({len(command)} words): {shlex.join(command)}",
          file=sys.stderr, flush=True)
    skipped = sorted({k for k, _ in entries} - APPLIED)
    print(f"unit_exec: not applied without systemd: {', '.join(skipped)}", file=sys.stderr, flush=True)
    if "--check" in argv:
        return 0

    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
    # This machine may find its driver libraries through LD_LIBRARY_PATH, not ld.so.conf as a
    # real host does: pass it through, and say so.
    if os.environ.get("LD_LIBRARY_PATH"):
        env["LD_LIBRARY_PATH"] = os.environ["LD_LIBRARY_PATH"]
    values = dict(entries)
    for key, value in entries:
        if key == "Environment":
            name, _, val = value.partition("=")
            env[name] = val
    if values.get("LimitMEMLOCK") == "infinity":
        try:
            resource.setrlimit(resource.RLIMIT_MEMLOCK, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        except (ValueError, OSError) as error:  # a host that caps it (the dev machine: 8 MiB)
            print(f"unit_exec: LimitMEMLOCK=infinity not applied: {error}", file=sys.stderr, flush=True)
    if "UMask" in values:
        os.umask(int(values["UMask"], 8))
    os.chdir("/")
    if "User" in values:
        user = pwd.getpwnam(values["User"])
        gid = grp.getgrnam(values["Group"]).gr_gid if "Group" in values else user.pw_gid
        os.initgroups(user.pw_name, gid)
        os.setgid(gid)
        os.setuid(user.pw_uid)
        env.update(HOME=user.pw_dir, USER=user.pw_name, LOGNAME=user.pw_name)
    print(f"unit_exec: as uid {os.getuid()} gid {os.getgid()}, memlock "
          f"{resource.getrlimit(resource.RLIMIT_MEMLOCK)}, env {sorted(env)}", file=sys.stderr, flush=True)
    os.execve(command[0], command, env)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

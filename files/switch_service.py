#!/usr/bin/env python3
"""Switch one llama-server unit to new contents behind a health gate, or roll it back.

Runs on the target host as root (python3 stdlib only). Reads a JSON request on stdin:
{"unit": "llama-x.service", "text": "<unit file>", "health_url": "...", "timeout": 300,
 "gpu": {"gpus": [0]},   (GPU services only; "gpus": null for any GPU)
 "replaces": [{"unit": "llama-old.service", "health_url": "..."}]}
or, to retire units of services the settings no longer name: {"retire": ["llama-old.service"]}.

The previous unit (which names the previous build and model paths, both kept on disk) is saved
first; if the new one is not healthy in time it is put back, restarted and checked, and this
exits non-zero with the journal tail. A GPU service is healthy only when /health answers AND
its process is on its GPUs (gpu_check.py): llama-server that found no GPU serves from the CPU
with /health 200, which would otherwise pass. A unit that had no predecessor is stopped and disabled,
so a failed first deploy leaves nothing crash-looping. User drop-ins (<unit>.d/) are untouched.

"replaces" are units of removed services on the new unit's port (a renamed service): they are
stopped just before the new unit starts, retired once it is healthy, and started again when it
is not, so the port is never left without the service that held it. Retiring stops and
disables a unit and moves its file and rollback state to /var/lib/llmhost/units/retired/
(keys, builds, models and drop-ins stay).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request

import access_check  # beside this file in the helper folder
import gpu_check

UNIT_DIR = "/etc/systemd/system"
STATE_DIR = "/var/lib/llmhost/units"


def log(message: str) -> None:
    print(message, flush=True)


def systemctl(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["systemctl", *args], capture_output=True, text=True)
    if check and result.returncode:
        raise RuntimeError(f"systemctl {' '.join(args)}: {result.stderr.strip()}")
    return result


def write_atomic(path: str, text: str) -> None:
    tmp = path + ".llmhost-tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def restarts(unit: str) -> int:
    value = systemctl("show", "-p", "NRestarts", "--value", unit, check=False).stdout.strip()
    return int(value) if value.isdigit() else 0


def wait_healthy(unit: str, url: str, timeout: float) -> tuple[bool, float]:
    """Poll /health until 200 while the unit stays up; (ok, seconds waited). A server that exits
    while starting (bad model, bad flag) is failing: with Restart=always it would crash-loop
    until the timeout, so the first automatic restart ends the wait."""
    started = time.monotonic()
    last_note = started
    restarts_before = restarts(unit)
    while time.monotonic() - started < timeout:
        if healthy(url):
            return True, time.monotonic() - started
        state = systemctl("is-active", unit, check=False).stdout.strip()
        if state == "failed" or restarts(unit) > restarts_before:
            break
        if time.monotonic() - last_note >= 10:
            log(f"{unit}: waiting for {url} ({state}, {time.monotonic() - started:.0f}s)")
            last_note = time.monotonic()
        time.sleep(0.5)
    return False, time.monotonic() - started


def on_its_gpus(unit: str, gpu: dict | None) -> tuple[bool, str]:
    """For a GPU service: whether its process holds its GPUs, and the reason. /health answers
    only once the model is loaded (on the GPU when there is one), so a few tries suffice."""
    if gpu is None:
        return True, ""
    for attempt in range(5):
        if attempt:
            time.sleep(1)
        result = gpu_check.decide(gpu_check.read_evidence(unit), gpu.get("gpus"))
        if result["ok"]:
            break
    return result["ok"], result["reason"]


def serving(unit: str, url: str, timeout: float, gpu: dict | None) -> tuple[bool, str]:
    """(healthy, what to say): /health 200 in time and, for a GPU service, on its GPUs."""
    ok, waited = wait_healthy(unit, url, timeout)
    if not ok:
        return False, f"not healthy after {waited:.0f}s (timeout {timeout}s)"
    on_gpu, why = on_its_gpus(unit, gpu)
    if not on_gpu:
        return False, f"answers /health after {waited:.1f}s but {why}"
    return True, f"healthy after {waited:.1f}s" + (f", {why}" if why else "")


def outside_causes(unit: str, text: str) -> list[str]:
    """What makes a unit fail that is not in the unit the deploy wrote: files its command names
    that its user cannot open (a model or key made unreadable under a running server), and
    drop-ins of the user's that change it. Either would fail a rollback to it as well."""
    user, words = "root", []
    for line in text.splitlines():
        if line.startswith("User="):
            user = line.split("=", 1)[1].strip()
        elif line.startswith("ExecStart="):
            words = shlex.split(line[len("ExecStart="):])
    causes = []
    paths = [word for word in words if word.startswith("/")]
    if paths:
        unreadable = access_check.as_user(user, paths, binary=paths[0])
        if unreadable:
            causes.append(f"user {user} cannot open {'; '.join(unreadable)}")
    drop_ins = systemctl("show", "-p", "DropInPaths", "--value", unit, check=False).stdout.split()
    if drop_ins:
        causes.append(f"drop-ins not written by llmhost change it: {', '.join(drop_ins)}")
    return causes


def say_outside_causes(unit: str, text: str) -> None:
    causes = outside_causes(unit, text)
    if causes:
        log(f"{unit}: the switch failed for a cause outside the unit llmhost writes: "
            f"{'; '.join(causes)}")


def journal_tail(unit: str, since: str, lines: int = 30) -> str:
    result = subprocess.run(["journalctl", "-u", unit, "--since", since, "-n", str(lines),
                             "--no-pager", "-o", "cat"], capture_output=True, text=True)
    return result.stdout.strip() or result.stderr.strip()


def restart(unit: str) -> None:
    systemctl("daemon-reload")
    systemctl("enable", unit)
    systemctl("restart", unit)


def retire(unit: str) -> None:
    """Stop and disable ``unit`` and move its file aside; nothing to do when it is gone already
    (decided here, at execution, since an earlier switch of this run may have retired it)."""
    live = os.path.join(UNIT_DIR, unit)
    loaded = systemctl("show", "-p", "LoadState", "--value", unit, check=False).stdout.strip()
    if not os.path.exists(live) and loaded != "loaded":
        log(f"{unit}: already retired")
        return
    systemctl("disable", "--now", unit, check=False)
    retired_dir = os.path.join(STATE_DIR, "retired")
    os.makedirs(retired_dir, exist_ok=True)
    if os.path.exists(live):
        shutil.move(live, os.path.join(retired_dir, unit))
    # Its rollback state goes too: a service of this name added later starts afresh.
    for name in (unit + ".previous", unit + ".switching"):
        if os.path.exists(os.path.join(STATE_DIR, name)):
            shutil.move(os.path.join(STATE_DIR, name), os.path.join(retired_dir, name))
    systemctl("daemon-reload")
    systemctl("reset-failed", unit, check=False)
    log(f"{unit}: retired (stopped, disabled, unit file moved to {STATE_DIR}/retired)")


def give_back(replaced: list[dict], timeout: float) -> None:
    """Start the units this switch stopped for their port again, and say whether they answer."""
    for old in replaced:
        systemctl("start", old["unit"], check=False)
        ok, waited = wait_healthy(old["unit"], old["health_url"], timeout)
        state = "healthy" if ok else "NOT healthy"
        log(f"{old['unit']}: started again on its port, {state} after {waited:.1f}s")


def main() -> int:
    request = json.load(sys.stdin)
    if "retire" in request:
        for unit in request["retire"]:
            retire(unit)
        return 0
    unit, text, url, timeout = request["unit"], request["text"], request["health_url"], request["timeout"]
    gpu = request.get("gpu")
    replaced = request.get("replaces", [])
    live = os.path.join(UNIT_DIR, unit)
    os.makedirs(STATE_DIR, exist_ok=True)
    previous = os.path.join(STATE_DIR, unit + ".previous")

    old_text = None
    if os.path.exists(live):
        with open(live) as f:
            old_text = f.read()
    # Rolling back means returning to the unit that served before this switch. The marker
    # says a switch is under way: if one was killed after writing the new unit, the live unit
    # already has the new text and the one to return to is the saved previous one.
    switching = os.path.join(STATE_DIR, unit + ".switching")
    interrupted = os.path.exists(switching) and os.path.exists(previous)
    can_roll_back = (old_text is not None and old_text != text) or interrupted
    # After an interrupted switch the live unit never passed the health gate: the saved
    # previous one stays the unit to return to.
    if old_text is not None and old_text != text and not interrupted:
        write_atomic(previous, old_text)
    write_atomic(switching, "")
    started_at = time.strftime("%Y-%m-%d %H:%M:%S")
    write_atomic(live, text)
    log(f"{unit}: unit written, restarting")
    for old in replaced:
        log(f"{old['unit']}: stopped, {unit} takes over its port")
        systemctl("stop", old["unit"], check=False)
    restart(unit)
    ok, verdict = serving(unit, url, timeout, gpu)
    if ok:
        os.unlink(switching)
        log(f"{unit}: {verdict}")
        for old in replaced:
            retire(old["unit"])
        return 0

    evidence = journal_tail(unit, started_at)
    log(f"{unit}: {verdict}; journal:\n{evidence}")
    if can_roll_back:
        shutil.copyfile(previous, live)
        restart(unit)
        ok, verdict = serving(unit, url, timeout, gpu)
        os.unlink(switching)
        state = verdict if ok else f"NOT healthy either: {verdict}"
        log(f"{unit}: ROLLED BACK to the previous unit, which is {state}")
        give_back(replaced, timeout)
        say_outside_causes(unit, text)
        return 3
    os.unlink(switching)
    if old_text is not None:
        log(f"{unit}: the unit did not change, so there is no other unit to return to")
        give_back(replaced, timeout)
        say_outside_causes(unit, text)
        return 5
    systemctl("disable", "--now", unit, check=False)
    failed_dir = os.path.join(STATE_DIR, "failed")
    os.makedirs(failed_dir, exist_ok=True)
    shutil.move(live, os.path.join(failed_dir, unit))
    systemctl("daemon-reload")
    log(f"{unit}: no previous unit to roll back to; stopped and disabled, the failed unit is "
        f"kept in {failed_dir}")
    give_back(replaced, timeout)
    say_outside_causes(unit, text)
    return 4


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as error:  # one line for the operator, not a traceback
        log(f"switch_service: {type(error).__name__}: {error}")
        sys.exit(6)

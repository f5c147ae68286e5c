#!/usr/bin/env python3
"""Switch one llama-server unit to new contents behind a health gate, or roll it back.

Runs on the target host as root (python3 stdlib only). Reads a JSON request on stdin:
{"unit": "llama-x.service", "text": "<unit file>", "health_url": "...", "timeout": 300}.

The previous unit (which names the previous build and model paths, both kept on disk) is saved
first; if the new one is not healthy in time it is put back, restarted and checked, and this
exits non-zero with the journal tail. A unit that had no predecessor is stopped and disabled,
so a failed first deploy leaves nothing crash-looping. User drop-ins (<unit>.d/) are untouched.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request

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


def journal_tail(unit: str, since: str, lines: int = 30) -> str:
    result = subprocess.run(["journalctl", "-u", unit, "--since", since, "-n", str(lines),
                             "--no-pager", "-o", "cat"], capture_output=True, text=True)
    return result.stdout.strip() or result.stderr.strip()


def restart(unit: str) -> None:
    systemctl("daemon-reload")
    systemctl("enable", unit)
    systemctl("restart", unit)


def main() -> int:
    request = json.load(sys.stdin)
    unit, text, url, timeout = request["unit"], request["text"], request["health_url"], request["timeout"]
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
    if old_text is not None and old_text != text:
        write_atomic(previous, old_text)
    write_atomic(switching, "")
    started_at = time.strftime("%Y-%m-%d %H:%M:%S")
    write_atomic(live, text)
    log(f"{unit}: unit written, restarting")
    restart(unit)
    ok, waited = wait_healthy(unit, url, timeout)
    if ok:
        os.unlink(switching)
        log(f"{unit}: healthy after {waited:.1f}s")
        return 0

    evidence = journal_tail(unit, started_at)
    log(f"{unit}: not healthy after {waited:.0f}s (timeout {timeout}s); journal:\n{evidence}")
    if can_roll_back:
        shutil.copyfile(previous, live)
        restart(unit)
        ok, waited = wait_healthy(unit, url, timeout)
        os.unlink(switching)
        state = "healthy" if ok else "NOT healthy either"
        log(f"{unit}: ROLLED BACK to the previous unit, which is {state} after {waited:.1f}s")
        return 3
    os.unlink(switching)
    if old_text is not None:
        log(f"{unit}: the unit did not change, so there is no other unit to return to")
        return 5
    systemctl("disable", "--now", unit, check=False)
    failed_dir = os.path.join(STATE_DIR, "failed")
    os.makedirs(failed_dir, exist_ok=True)
    shutil.move(live, os.path.join(failed_dir, unit))
    systemctl("daemon-reload")
    log(f"{unit}: no previous unit to roll back to; stopped and disabled, the failed unit is "
        f"kept in {failed_dir}")
    return 4


if __name__ == "__main__":
    sys.exit(main())

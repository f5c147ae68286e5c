#!/usr/bin/env python3
"""Is a GPU service really on its GPUs? Runs on the host (python3 standard library only): the
unit switch (switch_service.py) asks it once /health answers, and the host suite runs it too.

/health answers 200 whether llama-server found its GPU or not: given --n-gpu-layers and no usable
GPU, it prints a warning and serves from the CPU at a fraction of the speed. So a GPU service is
on its GPUs only when its main process holds memory on each GPU it was given, and on no other
(nvidia-smi's compute apps; the driver reports PIDs as the caller's PID namespace sees them, as
measured on the H200 inside a sandbox host). When it is not, the reason says why: device nodes
the unit does not allow, /dev/nvidia-uvm missing, llama.cpp's own line, or no GPU memory.

    gpu_check.py --unit llama-main.service [--gpus 0,1] [--evidence]

prints one JSON object ({"ok": ..., "reason": ..., "held": [...]}, with
--evidence also what was read) and exits 0 when the service is on its GPUs, 1 when not.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import stat
import subprocess
import sys

NO_GPU_LINE = "no usable GPU found"
NVIDIA_NODE = re.compile(r"^/dev/nvidia(\d+)$")


# --------------------------------------------------------------------------- reading the host

def _run(*cmd: str) -> str:
    try:
        result = subprocess.run(list(cmd), capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return result.stdout if result.returncode == 0 else ""


def _show(unit: str, prop: str) -> str:
    return _run("systemctl", "show", "-p", prop, "--value", unit).strip()


def _device_nodes() -> list[dict]:
    """Every NVIDIA character device node: path, major, minor."""
    nodes = []
    paths = [f"/dev/{n}" for n in sorted(os.listdir("/dev")) if n.startswith("nvidia")]
    if os.path.isdir("/dev/nvidia-caps"):
        paths += [f"/dev/nvidia-caps/{n}" for n in sorted(os.listdir("/dev/nvidia-caps"))]
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            continue
        if stat.S_ISCHR(st.st_mode):
            nodes.append({"path": path, "major": os.major(st.st_rdev), "minor": os.minor(st.st_rdev)})
    return nodes


def _gpu_minors() -> dict[str, int]:
    """Device minor by PCI bus id, from the driver's /proc/driver/nvidia/gpus/<bus>/information."""
    minors = {}
    base = "/proc/driver/nvidia/gpus"
    for bus in sorted(os.listdir(base)) if os.path.isdir(base) else []:
        try:
            with open(f"{base}/{bus}/information") as f:
                match = re.search(r"Device Minor:\s*(\d+)", f.read())
        except OSError:
            continue
        if match:
            minors[normal_bus_id(bus)] = int(match.group(1))
    return minors


def read_evidence(unit: str) -> dict:
    """Everything the decision needs, as plain data (kept as a record by the callers)."""
    pid_text = _show(unit, "MainPID")
    pid = int(pid_text) if pid_text.isdigit() else 0
    invocation = _show(unit, "InvocationID")
    journal = _run("journalctl", "--no-pager", "-o", "cat", f"_SYSTEMD_INVOCATION_ID={invocation}") \
        if invocation else ""
    with open("/proc/devices") as f:
        proc_devices = f.read()
    return {
        "unit": unit,
        "pid": pid,
        "gpus": _run("nvidia-smi", "--query-gpu=index,uuid,pci.bus_id", "--format=csv,noheader"),
        "compute_apps": _run("nvidia-smi", "--query-compute-apps=pid,gpu_uuid,used_memory",
                             "--format=csv,noheader,nounits"),
        "minors": _gpu_minors(),
        "device_policy": _show(unit, "DevicePolicy"),
        "device_allow": _show(unit, "DeviceAllow"),
        "proc_devices": proc_devices,
        "nodes": _device_nodes(),
        "journal_no_gpu": [line for line in journal.splitlines() if NO_GPU_LINE in line][:3],
    }


# --------------------------------------------------------------------------- parsing (pure)

def normal_bus_id(bus: str) -> str:
    """'00000000:1B:00.0' (nvidia-smi) and '0000:1b:00.0' (/proc) -> '0000:1b:00.0'."""
    parts = bus.strip().lower().split(":")
    if len(parts) == 3 and all(parts):
        return f"{int(parts[0], 16):04x}:{parts[1]}:{parts[2]}"
    return bus.strip().lower()


def parse_gpus(text: str) -> list[dict]:
    """nvidia-smi --query-gpu=index,uuid,pci.bus_id rows."""
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.split(",")]
        if len(cells) >= 3 and cells[0].isdigit():
            rows.append({"index": int(cells[0]), "uuid": cells[1], "bus": normal_bus_id(cells[2])})
    return rows


def parse_compute_apps(text: str) -> list[dict]:
    """nvidia-smi --query-compute-apps=pid,gpu_uuid,used_memory rows (MiB)."""
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.split(",")]
        if len(cells) >= 3 and cells[0].isdigit():
            mib = int(cells[2]) if cells[2].isdigit() else 0
            rows.append({"pid": int(cells[0]), "uuid": cells[1], "mib": mib})
    return rows


def char_majors(proc_devices: str) -> dict[str, int]:
    """Name -> major of /proc/devices' character devices."""
    majors, in_char = {}, False
    for line in proc_devices.splitlines():
        text = line.strip()
        if text.endswith("devices:"):
            in_char = text == "Character devices:"
            continue
        major, _, name = text.partition(" ")
        if in_char and major.isdigit() and name:
            majors.setdefault(name.strip(), int(major))
    return majors


def _pairs(device_allow: str) -> list[tuple[str, str]]:
    """(device, mode) pairs of `systemctl show -p DeviceAllow` (one pair a line, or spaces)."""
    words = device_allow.split()
    return list(zip(words[::2], words[1::2]))


def allowed(node: dict, policy: str, device_allow: str, majors: dict[str, int]) -> bool:
    """Whether the unit's device policy lets its process open ``node`` read-write."""
    if policy in ("", "auto") and not device_allow.strip():
        return True
    for spec, mode in _pairs(device_allow):
        if "r" not in mode or "w" not in mode:
            continue
        if spec.startswith("char-"):
            pattern = spec[len("char-"):]
            if any(fnmatch.fnmatchcase(name, pattern) and major == node["major"]
                   for name, major in majors.items()):
                return True
        elif spec == node["path"]:
            return True
    return False


# --------------------------------------------------------------------------- the decision

def decide(evidence: dict, wanted: list[int] | None) -> dict:
    """{"ok", "reason", "held"} for a service given GPUs ``wanted`` (None: any of them)."""
    gpus = parse_gpus(evidence["gpus"])
    by_uuid = {g["uuid"]: g["index"] for g in gpus}
    pid = evidence["pid"]
    if not pid:
        return {"ok": False, "reason": "the unit has no main process", "held": []}
    if not gpus:
        return {"ok": False, "reason": "nvidia-smi lists no GPU on this host", "held": []}
    apps = parse_compute_apps(evidence["compute_apps"])
    held = sorted({by_uuid[a["uuid"]] for a in apps
                   if a["pid"] == pid and a["mib"] > 0 and a["uuid"] in by_uuid})
    expected = sorted(wanted) if wanted is not None else sorted(g["index"] for g in gpus)
    ok = bool(held) if wanted is None else set(held) == set(wanted)
    if ok:
        return {"ok": True, "reason": f"on GPU {', '.join(map(str, held))}", "held": held}
    stray = sorted(set(held) - set(expected)) if wanted is not None else []
    if stray and set(wanted) <= set(held):
        reason = (f"holds memory on GPU {', '.join(map(str, stray))}, which it was not given "
                  f"(gpus: {wanted})")
    else:
        reason = "ran without its GPU: " + "; ".join(_causes(evidence, expected, pid, apps, held))
    return {"ok": False, "reason": reason, "held": held}


def _causes(evidence: dict, expected: list[int], pid: int, apps: list[dict],
            held: list[int]) -> list[str]:
    majors = char_majors(evidence["proc_devices"])
    policy, device_allow = evidence["device_policy"], evidence["device_allow"]
    minors = {evidence["minors"].get(g["bus"]) for g in parse_gpus(evidence["gpus"])
              if g["index"] in expected}
    causes = []
    if not any(n["path"] == "/dev/nvidia-uvm" for n in evidence["nodes"]):
        causes.append("/dev/nvidia-uvm is missing (the nvidia-uvm module is not loaded)")
    needed = [n for n in evidence["nodes"]
              if n["path"] in ("/dev/nvidiactl", "/dev/nvidia-uvm")
              or (NVIDIA_NODE.match(n["path"]) and (n["minor"] in minors or None in minors))]
    closed = [n for n in needed if not allowed(n, policy, device_allow, majors)]
    if closed:
        nodes = ", ".join(f"{n['path']} (char {n['major']}:{n['minor']})" for n in closed)
        allow = ", ".join(" ".join(pair) for pair in _pairs(device_allow)) or "none"
        causes.append(f"its unit does not allow {nodes} (DevicePolicy={policy or 'auto'}, "
                      f"DeviceAllow={allow})")
    if evidence["journal_no_gpu"]:
        causes.append(f"llama.cpp logged: {evidence['journal_no_gpu'][0].strip()}")
    if not causes:
        listed = ", ".join(f"pid {a['pid']} {a['mib']} MiB" for a in apps) or "none"
        causes.append(f"pid {pid} holds no memory on GPU {', '.join(map(str, expected))} "
                      f"(nvidia-smi compute apps: {listed})")
    return causes


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--unit", required=True)
    parser.add_argument("--gpus", default="", help="comma-separated GPU indexes; empty: any")
    parser.add_argument("--evidence", action="store_true", help="add what was read to the JSON")
    args = parser.parse_args()
    wanted = [int(x) for x in args.gpus.split(",") if x.strip()] or None
    evidence = read_evidence(args.unit)
    result = decide(evidence, wanted)
    if args.evidence:
        result["evidence"] = evidence
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

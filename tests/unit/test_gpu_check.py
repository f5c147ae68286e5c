"""The GPU health decision (files/gpu_check.py) on nvidia-smi, /proc and journal output: a GPU
service that answers /health from the CPU is refused, with the reason."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures" / "gpu"
_spec = importlib.util.spec_from_file_location("gpu_check", REPO / "files" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)

PROC_DEVICES = (FIXTURES / "proc-devices-580.txt").read_text()
# Two H200s as nvidia-smi --query-gpu=index,uuid,pci.bus_id --format=csv,noheader prints them.
GPUS = ("0, GPU-1f2e3d4c-0000-1111-2222-333344445555, 00000000:1B:00.0\n"
        "1, GPU-9a8b7c6d-0000-1111-2222-333344445555, 00000000:43:00.0\n")
UUID0, UUID1 = "GPU-1f2e3d4c-0000-1111-2222-333344445555", "GPU-9a8b7c6d-0000-1111-2222-333344445555"
NODES = [{"path": "/dev/nvidia0", "major": 195, "minor": 0},
         {"path": "/dev/nvidia1", "major": 195, "minor": 1},
         {"path": "/dev/nvidiactl", "major": 195, "minor": 255},
         {"path": "/dev/nvidia-uvm", "major": 238, "minor": 0},
         {"path": "/dev/nvidia-uvm-tools", "major": 238, "minor": 1}]
ALLOW_580 = "char-nvidia rw char-nvidiactl rw char-nvidia-uvm rw char-nvidia-caps rw"
NO_GPU = "warning: no usable GPU found, --gpu-layers option will be ignored"


def evidence(**changes) -> dict:
    base = {"unit": "llama-main.service", "pid": 4242, "gpus": GPUS,
            "compute_apps": f"4242, {UUID0}, 1178\n",
            "minors": {"0000:1b:00.0": 0, "0000:43:00.0": 1},
            "device_policy": "closed", "device_allow": ALLOW_580, "proc_devices": PROC_DEVICES,
            "nodes": NODES, "journal_no_gpu": []}
    return {**base, **changes}


def test_memory_on_its_gpu_is_healthy():
    result = gpu_check.decide(evidence(), [0])
    assert result == {"ok": True, "reason": "on GPU 0", "held": [0]}


def test_an_unpinned_service_may_use_any_gpu():
    both = f"4242, {UUID0}, 600\n4242, {UUID1}, 580\n"
    assert gpu_check.decide(evidence(compute_apps=both), None)["held"] == [0, 1]


def test_memory_of_another_process_is_not_its_own():
    result = gpu_check.decide(evidence(compute_apps=f"981234, {UUID0}, 1178\n"), [0])
    assert not result["ok"] and result["held"] == []


def test_a_gpu_hidden_by_the_unit_is_refused_with_the_nodes_and_the_log_line():
    """The unit as shipped before: major 195 allowed under a name driver 580 does not use."""
    old_allow = ("/dev/nvidiactl rw /dev/nvidia-uvm rw /dev/nvidia-uvm-tools rw "
                 "/dev/nvidia-modeset rw char-nvidia-frontend rw char-nvidia-caps rw "
                 "char-nvidia-uvm rw")
    result = gpu_check.decide(evidence(compute_apps="", device_allow=old_allow,
                                       journal_no_gpu=[NO_GPU]), None)
    assert not result["ok"]
    assert result["reason"] == (
        "ran without its GPU: its unit does not allow /dev/nvidia0 (char 195:0), /dev/nvidia1 "
        "(char 195:1) (DevicePolicy=closed, DeviceAllow=/dev/nvidiactl rw, /dev/nvidia-uvm rw, "
        "/dev/nvidia-uvm-tools rw, /dev/nvidia-modeset rw, char-nvidia-frontend rw, "
        f"char-nvidia-caps rw, char-nvidia-uvm rw); llama.cpp logged: {NO_GPU}")


def test_missing_uvm_is_named():
    nodes = [n for n in NODES if not n["path"].startswith("/dev/nvidia-uvm")]
    result = gpu_check.decide(evidence(compute_apps="", nodes=nodes, journal_no_gpu=[NO_GPU]), [0])
    assert result["reason"].startswith(
        "ran without its GPU: /dev/nvidia-uvm is missing (the nvidia-uvm module is not loaded); "
        "llama.cpp logged: ")


def test_the_log_line_alone_is_enough_to_refuse():
    result = gpu_check.decide(evidence(compute_apps="", journal_no_gpu=[NO_GPU]), [0])
    assert not result["ok"] and result["reason"] == f"ran without its GPU: llama.cpp logged: {NO_GPU}"


def test_no_memory_and_no_cause_says_what_nvidia_smi_listed():
    result = gpu_check.decide(evidence(compute_apps=f"77, {UUID1}, 900\n"), [0])
    assert result["reason"] == ("ran without its GPU: pid 4242 holds no memory on GPU 0 "
                                "(nvidia-smi compute apps: pid 77 900 MiB)")


def test_a_pinned_service_on_another_gpu_is_refused():
    result = gpu_check.decide(evidence(compute_apps=f"4242, {UUID1}, 1178\n"), [0])
    assert not result["ok"] and result["held"] == [1]
    assert result["reason"].startswith("ran without its GPU: ")


def test_a_pinned_service_that_also_holds_another_gpu_is_refused():
    both = f"4242, {UUID0}, 600\n4242, {UUID1}, 580\n"
    result = gpu_check.decide(evidence(compute_apps=both), [0])
    assert result == {"ok": False, "held": [0, 1],
                      "reason": "holds memory on GPU 1, which it was not given (gpus: [0])"}


def test_no_main_process():
    assert gpu_check.decide(evidence(pid=0), [0])["reason"] == "the unit has no main process"


@pytest.mark.parametrize("spec, allowed", [
    ("char-nvidia rw", True), ("char-nvidia* rw", True), ("char-nvidia-frontend rw", False),
    ("/dev/nvidia0 rw", True), ("char-nvidia r", False), ("", True)])
def test_device_allow_is_resolved_like_systemd(spec, allowed):
    node = NODES[0]
    policy = "closed" if spec else "auto"
    majors = gpu_check.char_majors(PROC_DEVICES)
    assert gpu_check.allowed(node, policy, spec, majors) is allowed


def test_bus_ids_of_nvidia_smi_and_proc_agree():
    assert gpu_check.normal_bus_id("00000000:1B:00.0") == gpu_check.normal_bus_id("0000:1b:00.0")


RECORDED = sorted(FIXTURES.glob("gpu-check-*.json"))


def test_there_is_evidence_from_a_real_gpu_host():
    assert len(RECORDED) >= 4, "tests/fixtures/gpu/gpu-check-*.json went missing"


@pytest.mark.parametrize("recorded", RECORDED, ids=lambda p: p.name)
def test_recorded_evidence_gives_the_recorded_verdict(recorded):
    """Evidence read on the H200 (gpu_check.py --evidence) with the verdict the host gave it,
    and refusals derived from it as the faults there changed it (each file's "source")."""
    record = json.loads(recorded.read_text())
    result = gpu_check.decide(record["evidence"], record["wanted"])
    assert (result["ok"], result["reason"]) == (record["ok"], record["reason"])

"""The packaged deploy itself, with facts in and operations out: `llama_server()` run in a real
pyinfra State for one host whose facts are given, and the operations it defines read back (name,
whether it will change the host, its commands). Each test names the wiring whose removal makes
it fail: a service restarts when what runs under its unchanged unit changed (the build, a key the
server refuses, its GPUs lost), and not otherwise."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from pyinfra.api import Config, Inventory, State
from pyinfra.api.host import Host
from pyinfra.api.state import StateStage
from pyinfra.context import ctx_host, ctx_state
from pyinfra.facts.files import File
from pyinfra.facts.server import Groups, LinuxName, Os, Users, Which

import inspect

from llmhost import buildplan, gpu, services, weights
from llmhost.deploys import llama_server
from llmhost import hostread
from llmhost.facts import Account, BuildState, GpuHeld, JsonFile, KeyAccepted, ModelFile, UnitState
from llmhost.gpu import Disk, Gpu, GpuFacts, KernelModule, Toolkit
from llmhost.settings import load_host_settings

REPO = Path(__file__).resolve().parents[2]
DEVICES_580 = tuple(gpu.parse_proc_devices(
    (REPO / "tests" / "fixtures" / "gpu" / "proc-devices-580.txt").read_text().splitlines()))
H200 = GpuFacts(gpus=(Gpu(0, "NVIDIA H200", "9.0", "580.159.04", 143771),), smi="ok",
                module=KernelModule("open", "580.159.04"),
                toolkits=(Toolkit("/usr/local/cuda/bin/nvcc", "13.0.88"),),
                disks=(Disk("/opt/llama.cpp", 10**12, "/"), Disk("/var/lib/llama-models", 10**12, "/")),
                char_devices=DEVICES_580)
CPU_HOST = GpuFacts(disks=H200.disks)


@pytest.fixture
def model(tmp_path) -> Path:
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF" + b"\0" * 60)
    return path


def host_data(model: Path, gpu_layers: int = 0) -> dict:
    digest = hashlib.sha256(model.read_bytes()).hexdigest()
    return {"llm_services": {"main": {"port": 18082, "gpu_layers": gpu_layers, "model": {
        "source": "local", "path": str(model), "sha256": digest}}}}


def converged_facts(data: dict, gpu_facts: GpuFacts) -> dict:
    """What a host that the last deploy converged answers: the unit the deploy would write
    installed, enabled and active; build complete; model in place; key accepted; on its GPU."""
    settings = load_host_settings("h1", data)
    service = settings.services[0]
    build = buildplan.plan_for_host(settings, gpu_facts)
    placed = weights.plan(settings, service.model)
    allow = gpu.cuda_device_allow(gpu_facts.char_devices) if service.uses_gpu else ()
    unit = services.render_unit(settings, service, build, placed, allow)
    spec = placed.files[0]
    return {
        gpu.GpuHost: gpu_facts,
        BuildState: {"files": True, "changed": [], "unreadable": []},
        JsonFile: {"commit": settings.llamacpp_commit},  # source and build markers present
        ModelFile: {"size": spec.size, "mtime_ns": 1, "access_ok": True,
                    "record": {"sha256": spec.sha256, "mtime_ns": 1}},
        UnitState: {"sha256": hashlib.sha256(unit.encode()).hexdigest(), "enabled": True,
                    "active": True, "missing": []},
        KeyAccepted: True,
        # The generated key file (and every other file asked about) present, root:llama 0640.
        File: {"size": 64, "user": "root", "group": "llama", "mode": 640},
        GpuHeld: {"ok": True, "reason": "on GPU 0"},
        Account: {"home": "/var/lib/llama", "shell": "/usr/sbin/nologin", "group": "llama"},
    }


def deploy(data: dict, facts: dict, monkeypatch, reads: list | None = None) -> dict[str, bool]:
    """Run llama_server() for host h1 with ``facts`` (other facts: their defaults, as on a
    fresh host); return each operation's name -> whether it will change the host. ``reads``
    gets every (fact class, arguments) asked for."""
    inventory = Inventory((["h1"], {}), h1=(["h1"], data))
    state = State(inventory, Config())
    state.set_stage(StateStage.Prepare)
    host = inventory.get_host("h1")
    state.active_hosts.add(host)
    state.activated_hosts.add(host)

    def get_fact(self, cls, *args, **kwargs):
        if reads is not None:
            reads.append((cls, kwargs))
        if cls in facts:
            return facts[cls]
        if cls in PYINFRA_FACTS:
            return PYINFRA_FACTS[cls]
        return cls.default() if hasattr(cls, "default") else None

    monkeypatch.setattr(Host, "get_fact", get_fact)
    with ctx_state.use(state), ctx_host.use(host):
        llama_server()
    changes = {}
    for op_hash in state.get_op_order():
        op = state.ops[host].get(op_hash)
        if op is not None:
            name = ", ".join(state.op_meta[op_hash].names).rpartition(" | ")[2]
            changes[name] = bool(op.operation_meta._maybe_is_change)
    return changes


# pyinfra's own facts the base steps read, as a Debian host with nothing of ours on it.
PYINFRA_FACTS = {Os: "Linux", LinuxName: "Debian", Groups: [], Users: {}, Which: "/usr/sbin/x"}

SWITCH = "Service llama-main.service"


def test_a_converged_host_gets_no_restart(model, monkeypatch):
    data = host_data(model)
    changes = deploy(data, converged_facts(data, CPU_HOST), monkeypatch)
    assert changes[SWITCH] is False, changes
    assert changes["llama.cpp build"] is False


def test_a_build_repaired_under_the_same_unit_restarts_the_service(model, monkeypatch):
    """Fails when the deploy stops asking services.any_changed about the build."""
    data = host_data(model)
    facts = {**converged_facts(data, CPU_HOST), BuildState: {"files": True, "unreadable": [],
                                                             "changed": ["bin/llama-server"]}}
    changes = deploy(data, facts, monkeypatch)
    assert changes["llama.cpp build"] is True
    assert changes[SWITCH] is True, changes


def test_a_key_the_running_server_refuses_restarts_it(model, monkeypatch):
    """Fails when the deploy ignores the KeyAccepted fact (a key file replaced by hand)."""
    data = host_data(model)
    changes = deploy(data, {**converged_facts(data, CPU_HOST), KeyAccepted: False}, monkeypatch)
    assert changes[SWITCH] is True, changes


def test_a_gpu_service_found_off_its_gpu_restarts_and_one_on_it_does_not(model, monkeypatch):
    """Fails when the deploy stops reading GpuHeld (a restart outside the deploy on the CPU)."""
    data = host_data(model, gpu_layers=99)
    facts = converged_facts(data, H200)
    assert deploy(data, facts, monkeypatch)[SWITCH] is False
    off = {**facts, GpuHeld: {"ok": False, "reason": "ran without its GPU: /dev/nvidia-uvm is missing"}}
    assert deploy(data, off, monkeypatch)[SWITCH] is True


def test_a_model_file_made_unreadable_is_repaired_without_a_restart(model, monkeypatch):
    data = host_data(model)
    facts = converged_facts(data, CPU_HOST)
    facts[ModelFile] = {**facts[ModelFile], "access_ok": False}
    changes = deploy(data, facts, monkeypatch)
    settings = load_host_settings("h1", data)
    path = weights.plan(settings, settings.services[0].model).model_path
    assert changes[f"Model file {path}"] is True
    assert changes[SWITCH] is False, "the running server has the file mapped: no restart needed"


def _keys(reads) -> set:
    return {hostread._key(cls, inspect.getcallargs(cls().command, **kwargs)) for cls, kwargs in reads}


@pytest.mark.parametrize("gpu_layers, gpu_facts", [(0, CPU_HOST), (99, H200)], ids=["cpu", "gpu"])
def test_the_host_read_holds_every_fact_a_converged_host_is_asked(model, monkeypatch, gpu_layers,
                                                                 gpu_facts):
    """A rerun that changes nothing reads the host twice: GpuHost, then the one read of
    _host_reads, which must hold every other fact the steps ask for (one missing is read on its
    own, a round trip more). Fails when a step reads a fact _host_reads does not list."""
    data = host_data(model, gpu_layers=gpu_layers)
    asked, prefetched = [], []
    monkeypatch.setattr(hostread, "prefetch", lambda reads: prefetched.append(list(reads)))
    changes = deploy(data, converged_facts(data, gpu_facts), monkeypatch, reads=asked)
    assert changes[SWITCH] is False and changes["llama.cpp build"] is False, changes
    (listed,) = prefetched
    others = [(cls, kwargs) for cls, kwargs in asked if cls is not gpu.GpuHost]
    assert _keys(others) - _keys(listed) == set()

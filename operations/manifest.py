"""What a deploy intended for a host, as one typed, versioned record: written last by the deploy
(<llm_config_dir>/llmhost.json), read by the host suite, verify and the bench, so nothing
downstream parses llama-server's argv or cmake's flags to learn what was meant.

    manifest = Manifest.for_deploy(settings, build, models, rendered_units)
    text = manifest.to_json()
    Manifest.from_json(text).services[0].cache_type_k
"""

from __future__ import annotations

import hashlib
import json
import shlex
from dataclasses import MISSING, asdict, dataclass, fields, replace
from io import StringIO

from pyinfra import host
from pyinfra.api import FileUploadCommand, operation

from llmhost.facts import ManifestState
from llmhost.settings import ModelSpec, ServiceSpec, TunedProfile, TuneSpec

# 5: a service's tune settings and the tuned profile it runs (settings.ServiceSpec.tune, .tuned).
# 4: the build's CPU baseline, asked for and found by its CPU self-test (cpu_*).
# 3: a service's settings are recorded whole, as settings.ServiceSpec (2 listed ten of them).
VERSION = 5
# Versions read as well: a field they lack reads as its default (a version 3 build: native,
# never self-tested).
READABLE = (3, 4, VERSION)


class ManifestError(ValueError):
    """The manifest on a host is missing, unreadable or of another version."""


@dataclass(frozen=True)
class ModelFileRecord:
    path: str
    sha256: str
    size: int


@dataclass(frozen=True)
class ServiceRecord:
    """One service: the settings it was deployed with and what the deploy made of them (its
    unit, address, key file, model files and argv). ``settings`` is the deploy's own
    settings.ServiceSpec, so a setting declared there is recorded, written and read back with
    no edit here."""

    name: str
    unit: str
    health_url: str
    key_file: str | None          # the API key's path on the host; None without a key
    settings: ServiceSpec
    model_path: str
    files: tuple[ModelFileRecord, ...]
    unit_sha256: str
    argv: tuple[str, ...]

    @property
    def kv_pair(self) -> tuple[str, str]:
        return (self.settings.cache_type_k, self.settings.cache_type_v)

    @property
    def uses_gpu(self) -> bool:
        return self.settings.uses_gpu


@dataclass(frozen=True)
class BuildRecord:
    """The llama.cpp build the services run: commit, binaries, what it was compiled for."""

    commit: str
    build_dir: str
    server: str
    bench: str
    cmake_flags: tuple[str, ...]
    archs: tuple[str, ...]                    # CUDA archs ("90", "120a"); () for a CPU build
    fa_pairs: tuple[tuple[str, str], ...]     # flash-attention K/V pairs compiled; () for CPU
    nvcc: str | None
    expected_system_info: tuple[str, ...]
    # llm_cpu_baseline as set ("auto" or one baseline), and what the build's CPU self-test
    # found (its marker): the baseline it runs, that baseline's cmake flags, the baselines that
    # faulted as (baseline, signal), and the self-test's seconds. None/() before it ran.
    cpu_baseline: str = "native"
    cpu_resolved: str | None = None
    cpu_flags: tuple[str, ...] = ()
    cpu_faults: tuple[tuple[str, str], ...] = ()
    cpu_selftest_seconds: float | None = None


@dataclass(frozen=True)
class Manifest:
    llama_cpp: BuildRecord
    service_user: str
    services: tuple[ServiceRecord, ...]
    version: int = VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1) + "\n"

    def service(self, name: str) -> ServiceRecord:
        return next(s for s in self.services if s.name == name)

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        try:
            data = json.loads(text)
        except ValueError as error:
            raise ManifestError(f"not JSON: {error}") from None
        found = data.get("version") if isinstance(data, dict) else None
        if found not in READABLE:
            raise ManifestError(f"found version {found!r}, expected {VERSION}: redeploy the host "
                                f"with this llmhost to rewrite it")
        return cls(
            llama_cpp=_record(BuildRecord, data["llama_cpp"]),
            service_user=data["service_user"],
            services=tuple(_record(ServiceRecord, s) for s in data["services"]),
        )

    @classmethod
    def for_deploy(cls, settings, build, models: dict, rendered: dict[str, str]) -> "Manifest":
        """The record of this deploy: ``models`` by service name (weights.PlacedModel),
        ``rendered`` unit name -> unit text."""
        from llmhost.flags import server_argv
        from llmhost.services import key_path, unit_paths

        services = tuple(
            ServiceRecord(
                name=s.name, unit=s.unit_name, health_url=s.health_url,
                key_file=key_path(settings, s), settings=s,
                model_path=models[s.name].model_path,
                files=tuple(ModelFileRecord(f.dest, f.sha256, f.size) for f in models[s.name].files),
                unit_sha256=hashlib.sha256(rendered[s.unit_name].encode()).hexdigest(),
                argv=tuple(server_argv(s, unit_paths(settings, s, build, models[s.name]))))
            for s in settings.services)
        return cls(
            llama_cpp=BuildRecord(
                commit=settings.llamacpp_commit, build_dir=build.build_dir,
                server=build.server_binary, bench=build.bench_binary,
                cmake_flags=tuple(build.cmake_flags), archs=tuple(build.archs),
                fa_pairs=tuple(build.fa_pairs), nvcc=build.nvcc,
                expected_system_info=tuple(build.expected_system_info),
                cpu_baseline=build.cpu_baseline),
            service_user=settings.service_user, services=services)

    def with_cpu(self, cpu: dict | None) -> "Manifest":
        """This manifest with what the build's CPU self-test found (the ``cpu`` record of the
        build's marker, files/build_llamacpp.py), or as it is when there is none yet."""
        if not cpu:
            return self
        return replace(self, llama_cpp=replace(
            self.llama_cpp, cpu_resolved=cpu["baseline"], cpu_flags=tuple(cpu["flags"]),
            cpu_faults=tuple((f["baseline"], f["signal"]) for f in cpu["faults"]),
            cpu_selftest_seconds=cpu["selftest_seconds"]))


@operation()
def manifest_file(dest: str, manifest: Manifest):
    """Write the deploy's manifest to ``dest`` (root's, 644), with the CPU baseline the build
    runs read from the build's marker when this operation runs: a build made earlier in the
    same deploy is recorded as its self-test found it, and a rerun that changes nothing reads
    one fact and writes nothing.

    + dest: the manifest's path on the host (llm_config_dir/llmhost.json)
    + manifest: what the deploy intended (Manifest.for_deploy)

    **Example:**

    .. code:: python

        manifest_file(name="Manifest for tests/host", dest="/etc/llama/llmhost.json",
                      manifest=Manifest.for_deploy(settings, build, models, rendered))
    """
    # Read when planning and again when the operation runs (pyinfra calls it twice), so the
    # marker a build wrote in between is seen.
    found = host.get_fact(ManifestState, path=dest, build_dir=manifest.llama_cpp.build_dir)
    text = manifest.with_cpu(found["cpu"]).to_json()
    if found["file"] == [hashlib.sha256(text.encode()).hexdigest(), "root", "root", "644"]:
        host.noop(f"{dest} is up to date")
        return
    staged = dest + ".llmhost-new"
    yield FileUploadCommand(StringIO(text), staged)
    yield (f"chown root:root {shlex.quote(staged)} && chmod 644 {shlex.quote(staged)} && "
           f"mv -f {shlex.quote(staged)} {shlex.quote(dest)}")


def _record(cls, data: dict):
    """A record from its JSON object: lists become tuples, nested records are built."""
    values = {}
    for f in fields(cls):
        if f.name not in data and f.default is not MISSING:
            continue  # written by an older version (READABLE): its default
        value = data[f.name]
        if f.name == "files":
            value = tuple(ModelFileRecord(**item) for item in value)
        elif f.name in ("fa_pairs", "cpu_faults"):
            value = tuple(tuple(pair) for pair in value)
        elif f.name == "settings":
            value = _service_settings(value)
        elif isinstance(value, list):
            value = tuple(value)
        values[f.name] = value
    return cls(**values)


def _tuple(value):
    """JSON lists back to the tuples the settings hold (nested: K/V pairs)."""
    return tuple(_tuple(v) for v in value) if isinstance(value, list) else value


def _service_settings(data: dict) -> ServiceSpec:
    """A service's settings from JSON. A setting this manifest lacks (declared after the deploy
    that wrote it) reads as its declared default."""
    values = {}
    for f in fields(ServiceSpec):
        value = data.get(f.name, f.default)
        if f.name == "model" and value is not None:
            # JSON lists back into the tuples the deploy held (the lock's file records).
            value = ModelSpec(**{k: tuple(tuple(x) if isinstance(x, list) else x for x in v)
                                 if isinstance(v, list) else v for k, v in value.items()})
        elif f.name == "tune" and value is not None:
            value = TuneSpec(**{k: _tuple(v) for k, v in value.items()})
        elif f.name == "tuned" and value is not None:
            value = TunedProfile(**{**value, "settings": tuple(tuple(p) for p in value["settings"])})
        elif isinstance(value, list):
            value = tuple(value)
        values[f.name] = value
    return ServiceSpec(**values)

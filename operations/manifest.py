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
from dataclasses import asdict, dataclass, fields

VERSION = 2


class ManifestError(ValueError):
    """The manifest on a host is missing, unreadable or of another version."""


@dataclass(frozen=True)
class ModelFileRecord:
    path: str
    sha256: str
    size: int


@dataclass(frozen=True)
class ServiceRecord:
    """One service: its unit and address, its model files, and the full flag intent."""

    name: str
    unit: str
    host: str
    port: int
    health_url: str
    api_key_file: str | None
    gpu_layers: int
    gpus: tuple[int, ...] | None
    ctx_size: int
    parallel: int
    flash_attn: str
    cache_type_k: str
    cache_type_v: str
    load_mode: str
    reasoning: str
    threads: int | None
    model_path: str
    files: tuple[ModelFileRecord, ...]
    unit_sha256: str
    argv: tuple[str, ...]

    @property
    def kv_pair(self) -> tuple[str, str]:
        return (self.cache_type_k, self.cache_type_v)


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
        if found != VERSION:
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
                name=s.name, unit=s.unit_name, host=s.host, port=s.port, health_url=s.health_url,
                api_key_file=key_path(settings, s), gpu_layers=s.gpu_layers, gpus=s.gpus,
                ctx_size=s.ctx_size, parallel=s.parallel, flash_attn=s.flash_attn,
                cache_type_k=s.cache_type_k, cache_type_v=s.cache_type_v, load_mode=s.load_mode,
                reasoning=s.reasoning, threads=s.threads,
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
                expected_system_info=tuple(build.expected_system_info)),
            service_user=settings.service_user, services=services)


def _record(cls, data: dict):
    """A record from its JSON object: lists become tuples, nested records are built."""
    values = {}
    for f in fields(cls):
        value = data[f.name]
        if f.name == "files":
            value = tuple(ModelFileRecord(**item) for item in value)
        elif f.name == "fa_pairs":
            value = tuple(tuple(pair) for pair in value)
        elif isinstance(value, list):
            value = tuple(value)
        values[f.name] = value
    return cls(**values)

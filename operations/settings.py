"""Every setting the deploys read: name, type, default, meaning and validation, in one place.

Host data (inventory.py, group_data/) is validated for every host of the inventory before any
operation is defined, and turned into frozen dataclasses; operations and templates receive those,
never raw dicts. Settings are the host-data keys that start with ``llm_``; any other key belongs to
pyinfra or to the user's other deploys and is left alone.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Mapping

from pyinfra.api.exceptions import PyinfraError

from llmhost import profiles, tuned as tuned_files

PREFIX = "llm_"

# The llama.cpp commit CI builds (llama-cpp-python 0.3.36 vendors it), so what CI proves is what
# users get. Its upstream build number is 11312 (release tag b11312).
PINNED_COMMIT = "0c1e57098bba43ac29e6e3b677cdceebdd22334f"
PINNED_BUILD_NUMBER = 11312

# K/V cache types llama-server accepts for -ctk/-ctv at the pinned commit.
CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")
# The guide's measurements (RTX 5090, Qwen3.5-35B-A3B): warn, do not refuse.
CACHE_TYPE_WARNINGS = {
    "iq4_nl": "IQ4_NL K/V measured about 5x slower than q4_0 in the guide (38 vs 188 tok/s)",
    "q5_0": "Q5 K/V measured slower than Q4 in the guide (153 vs 186 tok/s)",
    "q5_1": "Q5 K/V measured slower than Q4 in the guide (153 vs 186 tok/s)",
}
# K/V types ggml can compile flash-attention vector kernels for (ggml/cmake/common.cmake
# FA_TYPES at the pinned commit). Any other type in GGML_CUDA_FA_QUANTS is a cmake FATAL_ERROR.
FA_TYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "bf16", "f16")
LOAD_MODES = ("auto", "none", "mmap", "mlock", "mmap+mlock", "dio")
ON_OFF_AUTO = ("on", "off", "auto")
REASONING_FORMATS = ("none", "deepseek", "deepseek-legacy", "auto")
MODEL_SOURCES = ("local", "hf", "mirror")
LLAMACPP_SOURCES = ("git", "local")
# llm_cpu_baseline: what llama.cpp's CPU code is compiled for, best first (their cmake options:
# llmhost.buildplan.cpu_baseline_flags); auto tries them in this order.
CPU_BASELINES = ("native", "x86-64-v4", "x86-64-v3", "x86-64-v2")
CPU_BASELINE_CHOICES = ("auto", *CPU_BASELINES)
# llmhost-tune's goals (llm_services.<name>.tune.goal).
TUNE_GOALS = ("latency", "throughput", "mix")
# The guide's K/V table (section 3.2) rows it calls lossless and recommends: f16/f16 (its
# baseline), q4_0/q8_0 and q4_0/q4_0; q5_0 (slower) and iq4_nl (5x slower) are its traps.
GUIDE_LOSSLESS_KV_PAIRS = (("f16", "f16"), ("q4_0", "q8_0"), ("q4_0", "q4_0"))
# The service settings a tuned profile (llmhost-tune, tuned/<host>.py) may set.
TUNABLE = ("threads", "batch_size", "ubatch_size", "parallel", "ctx_size", "cache_type_k",
           "cache_type_v", "gpu_layers", "n_cpu_moe")
UNIT_NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,31}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
CUDA_ARCH_RE = re.compile(r"^[1-9][0-9]{1,2}[af]?$")


class SettingsError(PyinfraError):
    """One line per problem: host, setting, value found, what is allowed. A PyinfraError, so
    pyinfra prints it as it is and stops before any operation runs."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid settings, no host was changed:\n" + "\n".join(problems))


@dataclass(frozen=True)
class Setting:
    name: str
    types: tuple[type, ...]
    default: Any
    meaning: str
    allowed: str = ""
    check: Callable[[Any], bool] | None = None
    choices: tuple[Any, ...] = ()

    def problem(self, where: str, value: Any) -> str | None:
        """The error line for ``value``, or None when it is valid."""
        if value is self.default:  # defaults are trusted; None means "not set"
            return None
        if isinstance(value, bool) and bool not in self.types:
            return _line(where, value, self.expected())
        if not isinstance(value, self.types):
            return _line(where, value, self.expected())
        if _has_control_chars(value):
            # A newline in anything that reaches the unit splits its ExecStart into directives.
            return _line(where, value, "text without control characters (newline, tab, ...)")
        if self.choices and value not in self.choices:
            return _line(where, value, self.expected())
        if self.check and not self.check(value):
            return _line(where, value, self.expected())
        return None

    def expected(self) -> str:
        if self.choices:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        if self.allowed:
            return self.allowed
        return " or ".join(_type_name(t) for t in self.types)


def _type_name(t: type) -> str:
    return {str: "a string", int: "an integer", bool: "true or false", list: "a list",
            dict: "a mapping", float: "a number"}.get(t, t.__name__)


def _line(where: str, value: Any, expected: str) -> str:
    return f"{where}: found {value!r}, expected {expected}"


def _port(v: Any) -> bool:
    return 1 <= v <= 65535


def _positive(v: Any) -> bool:
    return v > 0


def _non_negative(v: Any) -> bool:
    return v >= 0


def _has_control_chars(value: Any) -> bool:
    if isinstance(value, str):
        return any(ord(c) < 32 or ord(c) == 127 for c in value)
    if isinstance(value, (list, tuple)):
        return any(_has_control_chars(item) for item in value)
    return False


def _abs_path(v: Any) -> bool:
    return v.startswith("/") and " " not in v and ".." not in v.split("/")


# Folders the deploy must not take as its own: it creates, cleans (retention) and locks down
# what it is given, so a system folder would have builds, models or keys spread through it.
SYSTEM_FOLDERS = frozenset({
    "/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib32", "/lib64", "/media", "/mnt",
    "/opt", "/proc", "/root", "/run", "/sbin", "/srv", "/sys", "/tmp", "/usr", "/usr/bin",
    "/usr/lib", "/usr/local", "/usr/local/bin", "/usr/local/lib", "/usr/sbin", "/usr/share",
    "/var", "/var/cache", "/var/lib", "/var/log", "/var/tmp", "/etc/systemd",
    "/etc/systemd/system"})


def _own_folder(v: Any) -> bool:
    return _abs_path(v) and (v.rstrip("/") or "/") not in SYSTEM_FOLDERS


def _repo_file(v: Any) -> bool:
    """A path inside a repo: no leading /, no .. (the download would land outside its folder)."""
    return not v.startswith("/") and ".." not in v.split("/") and v.strip() != ""


def _ip(v: Any) -> bool:
    try:
        ipaddress.ip_address(v)
    except ValueError:
        return False
    return True


def _str_list(v: Any) -> bool:
    return all(isinstance(x, str) for x in v)


def _gpu_indexes(v: Any) -> bool:
    # Distinct: CUDA_VISIBLE_DEVICES=0,0 is one GPU named twice, not two.
    return all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v) \
        and len(set(v)) == len(v)


def _fa_pair_list(v: Any) -> bool:
    return all(isinstance(p, (list, tuple)) and len(p) == 2 and all(t in FA_TYPES for t in p)
               for p in v)


def _arch_list(v: Any) -> bool:
    return all(isinstance(x, str) and CUDA_ARCH_RE.match(x) for x in v)


OWN_FOLDER = "an absolute path without spaces or .., not a system folder (/, /etc, /usr, /opt, ...)"

def setting(default: Any, meaning: str, *, types: tuple[type, ...], allowed: str = "",
            check: Callable[[Any], bool] | None = None, choices: tuple[Any, ...] = (),
            convert: Callable[[Any], Any] | None = None, owns: tuple[str, ...] = ()) -> Any:
    """A setting, declared once as the field of the typed object it fills: its default, its
    meaning, the type it has in host data and its check. The validation, the README tables
    (python -m llmhost.docs), the typed objects and the manifest all come from these fields.
    ``convert`` turns the value of host data into the field's (a list into a tuple, say);
    ``owns`` lists the llama-server options (every alias its --help lists at the pinned commit)
    the setting sets, which extra_args may then not set."""
    return field(default=default, metadata={"setting": {
        "types": types, "meaning": meaning, "allowed": allowed, "check": check,
        "choices": choices, "convert": convert, "owns": owns}})


def settings_of(cls, prefix: str = "") -> tuple[Setting, ...]:
    """The Setting of every field of ``cls`` declared with setting(), in declaration order."""
    return tuple(
        Setting(prefix + f.name, m["types"], f.default, m["meaning"], m["allowed"], m["check"],
                m["choices"])
        for f in fields(cls) if (m := f.metadata.get("setting")))


def _typed(cls, values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Field name -> value for ``cls`` from validated host data (keys with ``prefix``)."""
    out = {}
    for f in fields(cls):
        meta = f.metadata.get("setting")
        if meta and prefix + f.name in values:
            value = values[prefix + f.name]
            out[f.name] = meta["convert"](value) if meta["convert"] and value is not None else value
    return out


def _folder(v: str) -> str:
    return v.rstrip("/")


def _kv_pair_list(v: Any) -> bool:
    return all(isinstance(p, (list, tuple)) and len(p) == 2 and all(t in CACHE_TYPES for t in p)
               for p in v) and len(v) > 0


def _slot_list(v: Any) -> bool:
    return len(v) > 0 and all(isinstance(x, int) and not isinstance(x, bool) and 1 <= x <= 64
                              for x in v)


@dataclass(frozen=True)
class TuneSpec:
    """How llmhost-tune searches a service's flags: llm_services.<name>.tune."""

    goal: str = setting("throughput", "what the search optimises: latency (the fastest single "
                                      "request), throughput (the best aggregate decode with every "
                                      "request at least min_tok_s and min_ctx), mix (the most "
                                      "slots whose each request keeps at least half of the "
                                      "single-request decode, like the guide's agents plus "
                                      "translations)", types=(str,), choices=TUNE_GOALS)
    min_tok_s: float = setting(20, "throughput and mix: decode each request must keep, tok/s",
                               types=(int, float), allowed="a positive number", check=_positive)
    min_ctx: int | None = setting(None, "context each slot must hold, tokens; unset: the "
                                        "service's ctx_size / parallel", types=(int,),
                                  allowed="a positive integer", check=_positive)
    slots: tuple[int, ...] = setting((1, 2, 4, 8), "slot counts (parallel) the search measures",
                                     types=(list,), allowed="a list of integers from 1 to 64",
                                     check=_slot_list, convert=lambda v: tuple(sorted(set(v))))
    kv_pairs: tuple[tuple[str, str], ...] = setting(
        GUIDE_LOSSLESS_KV_PAIRS, "GPU services: the [K, V] cache pairs the search may choose "
                                 "(default the guide's lossless set); a pair the build has not "
                                 "compiled is reported as a rebuild, not measured",
        types=(list,), allowed="a non-empty list of [K, V] pairs of " +
                               ", ".join(repr(t) for t in CACHE_TYPES),
        check=_kv_pair_list, convert=lambda v: tuple(tuple(p) for p in v))
    memory_budget_mib: int | None = setting(None, "GPU services: the most GPU memory the service "
                                                  "may use, MiB (a share of a GPU, or a smaller "
                                                  "card's size); unset: the whole GPU",
                                            types=(int,), allowed="a positive integer",
                                            check=_positive)
    ballast: bool = setting(False, "GPU services with memory_budget_mib: hold the GPU's memory "
                                   "beyond the budget with an allocation while tuning "
                                   "(files/gpu_ballast.py), so llama.cpp itself sees only the "
                                   "budget (a big GPU standing in for a smaller card)",
                            types=(bool,))
    time_budget_s: int = setting(900, "seconds the search of this service may take (said at the "
                                      "start; past it the best so far is reported)",
                                 types=(int,), allowed="an integer from 60 to 86400",
                                 check=lambda v: 60 <= v <= 86400)
    keep_margin: float = setting(0.05, "a new profile replaces the one the service runs only "
                                       "when it is better by more than this fraction on the "
                                       "goal's figure, measured alternated with it",
                                 types=(float, int), allowed="a number from 0 to 1",
                                 check=lambda v: 0 <= v <= 1)


@dataclass(frozen=True)
class TunedProfile:
    """Where a service's tuned values came from (llmhost-tune's tuned/<host>.py): recorded in
    the manifest, checked by the host suite. Not a setting: read from the profile file."""

    name: str
    date: str
    build_commit: str
    goal: str
    file: str
    model_sha256: str | None = None
    settings: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class ModelSpec:
    """A service's model: llm_services.<name>.model."""

    profile: str | None = setting(None, "a built-in model profile from the guide", types=(str,),
                                  choices=tuple(profiles.PROFILES))
    source: str = setting("hf", "where the file comes from", types=(str,), choices=MODEL_SOURCES)
    path: str | None = setting(None, "controller path of the GGUF (source local)", types=(str,),
                               allowed="an absolute path", check=_abs_path)
    sha256: str | None = setting(None, "expected sha256 (source local; computed when unset)",
                                 types=(str,), allowed="64 lowercase hex digits",
                                 check=lambda v: bool(SHA256_RE.match(v)))
    repo: str | None = setting(None, "Hugging Face repo, owner/name (source hf or mirror)",
                               types=(str,), allowed="owner/name",
                               check=lambda v: bool(re.match(r"^[\w.-]+/[\w.-]+$", v)))
    revision: str = setting("main", "branch, tag or commit of the repo", types=(str,))
    file: str | None = setting(None, "GGUF file in the repo (the first shard of a split GGUF)",
                               types=(str,), allowed="a path inside the repo (no leading /, no ..)",
                               check=_repo_file)
    mmproj: str | None = setting(None, "vision projector file in the same repo (--mmproj)",
                                 types=(str,),
                                 allowed="a path inside the repo (no leading /, no ..), or a "
                                         "controller path for source local")
    endpoint: str | None = setting(None, "HF_ENDPOINT-style base URL (source mirror)", types=(str,),
                                   allowed="an http(s) URL",
                                   check=lambda v: v.startswith(("http://", "https://")))
    token_file: str | None = setting(None, "controller path of a file holding the HF token (else "
                                           "HF_TOKEN from the environment)", types=(str,),
                                     allowed="an absolute path", check=_abs_path)

    # Not settings: what the lock holds for this model (llmhost.lock), filled in by the
    # preflight: the commit and each needed file as (name, sha256, size).
    locked_commit: str | None = None
    locked_files: tuple[tuple[str, str, int], ...] = ()

    @property
    def filename(self) -> str:
        if self.source == "local":
            return self.path.rsplit("/", 1)[-1]
        return self.file


@dataclass(frozen=True)
class ServiceSpec:
    """One llama-server service: llm_services.<name>. ``owns``: the llama-server options the
    setting sets (each alias --help lists at the pinned commit), which extra_args may not set."""

    # port and model are required (validation says so); None only as the declared default.
    port: int = setting(None, "TCP port llama-server listens on (required)", types=(int,),
                        allowed="an integer from 1 to 65535", check=_port, owns=("--port",))
    host: str = setting("127.0.0.1", "address llama-server binds; loopback unless a key is set",
                        types=(str,), allowed="an IP address", check=_ip, owns=("--host",))
    model: ModelSpec = setting(None, "the model to serve (see the model settings; required)",
                               types=(dict,),
                               owns=("-m", "--model", "-mu", "--model-url", "-hf", "--hf-repo",
                                     "-hff", "--hf-file", "-mm", "--mmproj", "-mmu",
                                     "--mmproj-url"))
    gpu_layers: int = setting(0, "-ngl: layers offloaded to the GPU; 0 is a CPU-only service",
                              types=(int,), allowed="a non-negative integer", check=_non_negative,
                              owns=("-ngl", "--gpu-layers", "--n-gpu-layers"))
    ctx_size: int = setting(4096, "-c: total context, shared by the slots", types=(int,),
                            allowed="a positive integer", check=_positive,
                            owns=("-c", "--ctx-size"))
    parallel: int = setting(4, "-np: parallel slots (concurrent requests)", types=(int,),
                            allowed="a positive integer", check=_positive,
                            owns=("-np", "--parallel"))
    flash_attn: str = setting("on", "-fa: flash attention (required for a quantized V cache)",
                              types=(str,), choices=ON_OFF_AUTO, owns=("-fa", "--flash-attn"))
    cache_type_k: str = setting("f16", "-ctk: K cache type", types=(str,), choices=CACHE_TYPES,
                                owns=("-ctk", "--cache-type-k"))
    cache_type_v: str = setting("f16", "-ctv: V cache type", types=(str,), choices=CACHE_TYPES,
                                owns=("-ctv", "--cache-type-v"))
    load_mode: str = setting("mmap+mlock", "--load-mode (the guide's --mlock is mmap+mlock at the "
                                           "pinned commit)", types=(str,), choices=LOAD_MODES,
                             owns=("-lm", "--load-mode"))
    reasoning: str = setting("auto", "--reasoning: thinking on, off or per request", types=(str,),
                             choices=ON_OFF_AUTO, owns=("-rea", "--reasoning"))
    reasoning_format: str | None = setting(None, "--reasoning-format (the guide's main service: "
                                                 "deepseek)", types=(str,),
                                           choices=REASONING_FORMATS, owns=("--reasoning-format",))
    reasoning_budget: int | None = setting(None, "--reasoning-budget: thinking token cap (-1 "
                                                 "unlimited)", types=(int,),
                                           allowed="an integer >= -1", check=lambda v: v >= -1,
                                           owns=("--reasoning-budget",))
    threads: int | None = setting(None, "-t: CPU threads for generation; unset lets llama.cpp "
                                        "choose", types=(int,), allowed="a positive integer",
                                  check=_positive, owns=("-t", "--threads"))
    batch_size: int | None = setting(None, "-b: logical batch size (prompt tokens per step); "
                                           "unset: llama.cpp's 2048", types=(int,),
                                     allowed="a positive integer", check=_positive,
                                     owns=("-b", "--batch-size"))
    ubatch_size: int | None = setting(None, "-ub: physical batch size; unset: llama.cpp's 512",
                                      types=(int,), allowed="a positive integer",
                                      check=_positive, owns=("-ub", "--ubatch-size"))
    n_cpu_moe: int | None = setting(None, "--n-cpu-moe: MoE expert weights of the first N "
                                          "layers kept in CPU memory (a model larger than the "
                                          "GPU); unset: none", types=(int,),
                                    allowed="a non-negative integer", check=_non_negative,
                                    owns=("-ncmoe", "--n-cpu-moe", "-cmoe", "--cpu-moe"))
    metrics: bool = setting(True, "--metrics: Prometheus /metrics endpoint", types=(bool,),
                            owns=("--metrics",))
    alias: str | None = setting(None, "--alias: model name reported by the API", types=(str,),
                                owns=("-a", "--alias"))
    gpus: tuple[int, ...] | None = setting(None, "GPU indexes the service may use "
                                                 "(CUDA_VISIBLE_DEVICES; --device names each, so "
                                                 "it exits rather than serve without them); "
                                                 "unset: all of the host's", types=(list,),
                                           allowed="a list of distinct non-negative integers",
                                           check=_gpu_indexes, convert=tuple,
                                           owns=("-dev", "--device"))
    api_key_file: str | None = setting(None, "controller path of a file holding this service's "
                                             "API key; unset: generated on the host", types=(str,),
                                       allowed="an absolute path", check=_abs_path,
                                       owns=("--api-key-file",))
    allow_public_without_key: bool = setting(False, "allow a non-loopback bind with the API key "
                                                    "disabled (api_key: false)", types=(bool,))
    api_key: bool = setting(True, "require an API key (true) or serve without one (false); keys "
                                  "themselves never go here", types=(bool,))
    extra_args: tuple[str, ...] = setting((), "extra llama-server arguments, checked against "
                                              "--help", types=(list,), allowed="a list of strings",
                                          check=_str_list, convert=tuple)
    tune: TuneSpec | None = setting(None, "how llmhost-tune searches this service (see the tune "
                                          "settings); unset: their defaults", types=(dict,))
    # Not settings: the name is llm_services' key, the warnings come from the checks, the
    # tuned profile (llmhost-tune) from the host's profile file.
    name: str = ""
    warnings: tuple[str, ...] = ()
    tuned: TunedProfile | None = None

    @property
    def tuning(self) -> TuneSpec:
        return self.tune or TuneSpec()

    @property
    def unit_name(self) -> str:
        return f"llama-{self.name}.service"

    @property
    def uses_gpu(self) -> bool:
        return self.gpu_layers > 0

    @property
    def health_url(self) -> str:
        address = self.host
        if address in ("0.0.0.0", "::"):
            address = "127.0.0.1"
        if ":" in address:
            address = f"[{address}]"
        return f"http://{address}:{self.port}/health"


CLIENT_NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,62}$")
# A model name the gateway routes on: it appears unquoted in HAProxy's config.
GATEWAY_ALIAS_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")


def _client_names(v: Any) -> bool:
    return all(isinstance(x, str) and CLIENT_NAME_RE.match(x) for x in v) and len(set(v)) == len(v)


def _client_key_files(v: Any) -> bool:
    return all(isinstance(name, str) and CLIENT_NAME_RE.match(name) and isinstance(path, str)
               and _abs_path(path) for name, path in v.items())


@dataclass(frozen=True)
class GatewaySpec:
    """A gateway (llm_gateway): HAProxy in front of every service of the inventory, one
    OpenAI-compatible address routed by the request's model, keys checked at the edge."""

    clients: tuple[str, ...] = setting((), "names of the clients that get a key, generated on the "
                                           "gateway (root-only, /etc/llmhost-gateway/clients/"
                                           "NAME.key); a name removed is a key revoked (required)",
                                       types=(list,),
                                       allowed="a list of distinct names of lowercase letters, "
                                               "digits and '-'", check=_client_names,
                                       convert=tuple)
    client_key_files: tuple[tuple[str, str], ...] = setting(
        (), "keys pushed instead of generated: client name -> controller path of a file holding "
            "its key (the name must be in clients)", types=(dict,),
        allowed="a mapping of client name to an absolute path", check=_client_key_files,
        convert=lambda v: tuple(sorted(dict(v).items())))
    port: int = setting(8080, "port of the API (/v1/..., /health); every request but /health "
                              "needs a client key", types=(int,),
                        allowed="an integer from 1 to 65535", check=_port)
    bind: str = setting("0.0.0.0", "address the API binds", types=(str,),
                        allowed="an IP address", check=_ip)
    default_model: str | None = setting(None, "the model (a service's alias, else its name) for "
                                              "requests that name none or an unknown one; unset: "
                                              "the first of the inventory", types=(str,))
    queue_timeout: int = setting(60, "seconds a request waits at the gateway for a free slot "
                                     "(each backend takes as many as its service has) before "
                                     "503", types=(int,), allowed="a positive integer",
                                 check=_positive)
    timeout: int = setting(600, "seconds a request may take, a streamed completion included",
                           types=(int,), allowed="a positive integer", check=_positive)
    check_interval: int = setting(2, "seconds between health checks of each backend's /health; "
                                     "out after 2 failures, back after 2 successes", types=(int,),
                                  allowed="a positive integer", check=_positive)
    max_body_mib: int = setting(16, "largest request body the gateway takes, in MiB: bodies up to "
                                    "it are routed by their model wherever the field is and "
                                    "replayed whole when retried, larger ones get 413. 16 holds the "
                                    "guide's 131072-token context (0.5-1.5 MiB of JSON) and a few "
                                    "base64 photos. Memory: each request in flight at a server "
                                    "holds about this much in HAProxy (the copy kept for a retry) "
                                    "plus its body; 32 in flight took 0.55-1.0 GiB at 16, idle 25 "
                                    "MiB (benchmarks/RESULTS.md)",
                                types=(int,),
                                allowed="an integer from 1 to 100 (llama-server takes no more)",
                                check=lambda v: 1 <= v <= 100)
    drain_timeout: int = setting(120, "seconds a redeploy waits for a drained backend's requests "
                                      "to finish before it restarts the service anyway",
                                 types=(int,), allowed="a positive integer", check=_positive)
    tls_cert_file: str | None = setting(None, "controller path of a PEM file (certificate, then "
                                              "key) to serve the API over TLS", types=(str,),
                                        allowed="an absolute path", check=_abs_path)
    metrics_port: int = setting(8405, "port of HAProxy's Prometheus exporter (/metrics) and "
                                      "stats page (/stats)", types=(int,),
                                allowed="an integer from 1 to 65535", check=_port)
    metrics_bind: str = setting("127.0.0.1", "address of the metrics port", types=(str,),
                                allowed="an IP address", check=_ip)


@dataclass(frozen=True)
class HostSettings:
    """A host's settings: the host-data keys llm_<field>. Defaults are the guide's choices where
    the guide made one."""

    llamacpp_source: str = setting("git", "where llama.cpp comes from: git (clone "
                                          "llm_llamacpp_git_url on the host) or local "
                                          "(llm_llamacpp_local_path on the controller, pushed to "
                                          "the host)", types=(str,), choices=LLAMACPP_SOURCES)
    llamacpp_git_url: str = setting("https://github.com/ggml-org/llama.cpp",
                                    "git URL the host clones llama.cpp from (source git)",
                                    types=(str,))
    llamacpp_commit: str = setting(PINNED_COMMIT, "full llama.cpp commit sha to build; the default "
                                                  "is the commit CI builds", types=(str,),
                                   allowed="a full 40-character lowercase commit sha",
                                   check=lambda v: bool(COMMIT_RE.match(v)))
    llamacpp_build_number: int = setting(PINNED_BUILD_NUMBER, "llama.cpp build number passed to "
                                                              "cmake (a shallow clone cannot count "
                                                              "it)", types=(int,),
                                         allowed="a non-negative integer", check=_non_negative)
    llamacpp_local_path: str | None = setting(None, "controller path of a llama.cpp .tar.gz or git "
                                                    "checkout (source local)", types=(str,),
                                              allowed="an absolute path", check=_abs_path)
    install_dir: str = setting("/opt/llama.cpp", "host directory for llama.cpp sources, builds and "
                                                 "the shared ccache", types=(str,),
                               allowed=OWN_FOLDER, check=_own_folder, convert=_folder)
    model_dir: str = setting("/var/lib/llama-models", "host directory for model files, one folder "
                                                      "per model version", types=(str,),
                             allowed=OWN_FOLDER, check=_own_folder, convert=_folder)
    config_dir: str = setting("/etc/llama", "host directory for API keys and staged units",
                              types=(str,), allowed=OWN_FOLDER, check=_own_folder, convert=_folder)
    service_user: str = setting("llama", "system user (and group) the services run as",
                                types=(str,),
                                allowed="a lowercase user name other than root (the units' "
                                        "hardening assumes an unprivileged user)",
                                check=lambda v: bool(re.match(r"^[a-z_][a-z0-9_-]{0,30}$", v))
                                and v != "root")
    build_jobs: int = setting(0, "parallel compile jobs for the llama.cpp build; 0 means one per "
                                 "CPU", types=(int,), allowed="a non-negative integer",
                              check=_non_negative)
    build_cache: str | bool = setting("~/.cache/llmhost/builds",
                                      "controller folder of built llama.cpp artefacts, one per "
                                      "key (commit, cmake flags, CUDA toolkit, build folder, "
                                      "distribution, C library, machine, CPU): the first host of "
                                      "a run to need a key builds it, the others receive it and "
                                      "verify it; copy a key's folder in to pre-seed it; false: "
                                      "every host builds", types=(str, bool),
                                      allowed="a folder path on the controller, or false",
                                      check=lambda v: v is False or (isinstance(v, str) and v.strip() != ""))
    cpu_baseline: str = setting("auto", "what the CPU code of llama.cpp is compiled for: auto "
                                        "(native, and where that faults in the build's CPU "
                                        "self-test, the first of x86-64-v4, -v3, -v2 that runs), "
                                        "or one of them pinned (a pinned one that faults fails "
                                        "the host)", types=(str,), choices=CPU_BASELINE_CHOICES)
    cuda_architectures: tuple[str, ...] | None = setting(
        None, "CUDA archs to build for (e.g. ['120a', '89']); unset means computed from the GPUs "
              "present", types=(list,), allowed="a list of arch strings like '90', '89' or '120a'",
        check=_arch_list, convert=tuple)
    cuda_fa_extra_pairs: tuple[tuple[str, str], ...] = setting(
        (), "flash-attention K/V pairs to compile beyond those the GPU services use (a later "
            "change of cache types then needs no rebuild; the bench's K/V sweep runs them)",
        types=(list,), allowed="a list of [K, V] pairs of " + ", ".join(repr(t) for t in FA_TYPES),
        check=_fa_pair_list, convert=lambda v: tuple(tuple(p) for p in v))
    cuda_toolkit_install: bool = setting(False, "install NVIDIA's CUDA toolkit from its apt "
                                                "repository (the driver is never touched)",
                                         types=(bool,))
    cuda_toolkit_version: str = setting("12-8", "the cuda-toolkit-X-Y package to install when "
                                                "llm_cuda_toolkit_install is true", types=(str,),
                                        allowed="a version like '12-8'",
                                        check=lambda v: bool(re.match(r"^\d+-\d+$", v)))
    download_connections: int = setting(8, "parallel ranged connections per model download (1 for "
                                           "a single stream)", types=(int,),
                                        allowed="an integer from 1 to 32",
                                        check=lambda v: 1 <= v <= 32)
    keep_previous: int = setting(1, "builds and model versions kept on the host beyond those a unit "
                                    "or its rollback target uses, newest first, each kind; older "
                                    "ones are removed", types=(int,),
                                 allowed="a non-negative integer", check=_non_negative)
    health_timeout: int | None = setting(None, "seconds a restarted service may take to answer "
                                               "/health 200 before it is rolled back; unset: 120 "
                                               "plus 10 per GB of its model files (19 GB: 310)",
                                         types=(int,), allowed="a positive integer",
                                         check=_positive)
    lock_file: str | None = setting(None, "controller path of the lock file that holds what this "
                                          "host's models and llama.cpp resolved to; unset: beside "
                                          "the inventory (inventory.py -> inventory.lock)",
                                    types=(str,), allowed="an absolute path", check=_abs_path)
    tuned_dir: str = setting("tuned", "controller folder of llmhost-tune's profiles (<host>.py "
                                      "each, meant to be committed); a profile there sets the "
                                      "tuned values of its services; relative to the current "
                                      "directory, like group_data/", types=(str,),
                             allowed="a folder path without spaces or ..",
                             check=lambda v: " " not in v and ".." not in v.split("/"))
    services: tuple[ServiceSpec, ...] = setting(None, "the llama-server services of this host, by "
                                                      "name (see the service settings)",
                                                types=(dict,))
    gateway: GatewaySpec | None = setting(None, "make this host a gateway for every service of "
                                                "the inventory (see the gateway settings)",
                                          types=(dict,))
    address: str | None = setting(None, "address a gateway reaches this host's services at; "
                                        "unset: its ssh_hostname, else its inventory name",
                                  types=(str,))
    max_unavailable: int = setting(1, "backends of one model a deploy takes out of the gateways "
                                      "at once, across the run", types=(int,),
                                   allowed="a positive integer", check=_positive)
    # Not settings: which host, and whether it has llm_services at all (a web server in the same
    # inventory has none, and is left alone).
    host_name: str = ""
    managed: bool = True

    @property
    def uses_gpu(self) -> bool:
        return any(s.uses_gpu for s in self.services)

    @property
    def fa_pairs(self) -> tuple[tuple[str, str], ...]:
        """(K, V) pairs the GPU services need, always with f16/f16 (the unquantized default), and
        the extra ones asked for. CPU services compute any pair on the CPU: their K/V types never
        change the CUDA build."""
        pairs = {("f16", "f16")} | {(s.cache_type_k, s.cache_type_v) for s in self.services
                                    if s.uses_gpu} | set(self.cuda_fa_extra_pairs)
        return tuple(sorted(pairs))


HOST_SETTINGS = settings_of(HostSettings, prefix=PREFIX)
SERVICE_SETTINGS = settings_of(ServiceSpec)
MODEL_SETTINGS = settings_of(ModelSpec)
GATEWAY_SETTINGS = settings_of(GatewaySpec)
TUNE_SETTINGS = settings_of(TuneSpec)
SECRET_KEYS = {"api_key_value", "key", "token", "hf_token", "password", "secret"}


def host_default(name: str):
    """The default of a host setting, for code that reads host data without validating it."""
    return next(s.default for s in HOST_SETTINGS if s.name == name)


def manifest_path(data: Mapping[str, Any]) -> str:
    """Where the deploy writes its manifest on a host (read by tests/host, verify, bench)."""
    config_dir = data.get("llm_config_dir") or host_default("llm_config_dir")
    return f"{str(config_dir).rstrip('/')}/llmhost.json"


def _validate_block(where: str, data: Mapping[str, Any], settings: tuple[Setting, ...],
                    problems: list[str], sep: str = ".") -> dict[str, Any]:
    """Check ``data`` against ``settings``; return every setting's value, defaults filled in."""
    known = {s.name: s for s in settings}
    values: dict[str, Any] = {}
    for key in data:
        if key not in known:
            if key.lower() in SECRET_KEYS:
                problems.append(
                    f"{where}{sep}{key}: found a secret in plain settings, expected it in a file "
                    f"(api_key_file, token_file, or HF_TOKEN in the controller's environment)")
            else:
                allowed = ", ".join(sorted(known))
                problems.append(f"{where}{sep}{key}: found an unknown setting, expected one of {allowed}")
    for s in settings:
        value = data.get(s.name, s.default)
        problem = s.problem(f"{where}{sep}{s.name}", value)
        if problem:
            problems.append(problem)
            continue
        values[s.name] = value
    return values


# What each service setting owns: extra_args may not set it, or the unit carries two values and
# the later one wins, past the checks of the setting (an open bind without a key, say).
OWNED_OPTIONS: dict[str, tuple[str, ...]] = {
    f.name: f.metadata["setting"]["owns"] for f in fields(ServiceSpec)
    if f.metadata.get("setting", {}).get("owns")}
# Options whose value is a secret: on a command line it is readable by every local user
# (/proc/PID/cmdline), and it would land in the unit file.
SECRET_OPTIONS = ("--api-key", "-hft", "--hf-token")


def extra_args_problems(where: str, extra_args) -> list[str]:
    problems = []
    owner = {option: setting for setting, options in OWNED_OPTIONS.items() for option in options}
    for word in extra_args or ():
        option = word.split("=", 1)[0]
        if option in SECRET_OPTIONS:
            problems.append(f"{where}.extra_args: found {option!r}, expected no secret on the "
                            f"command line (argv and the unit are readable); API keys are "
                            f"generated on the host or pushed with api_key_file")
        elif option in owner:
            problems.append(f"{where}.extra_args: found {option!r}, expected it through the "
                            f"setting {where.split(': ', 1)[1]}.{owner[option]} (extra_args may "
                            f"not set what a setting owns)")
    return problems


def _load_model(where: str, raw: Any, problems: list[str]) -> ModelSpec | None:
    if raw is None:
        problems.append(f"{where}: found no model, expected a mapping with source local (path) "
                        f"or hf/mirror (repo and file), or a profile")
        return None
    if not isinstance(raw, dict):
        problems.append(_line(where, raw, "a mapping"))
        return None
    before = len(problems)
    merged = dict(raw)
    profile_name = raw.get("profile")
    if isinstance(profile_name, str) and profile_name in profiles.PROFILES:
        merged = {**profiles.PROFILES[profile_name].as_settings(), **raw}
    values = _validate_block(where, merged, MODEL_SETTINGS, problems)
    if len(problems) > before:
        return None
    source = values["source"]
    if source == "local" and not values["path"]:
        problems.append(f"{where}.path: found nothing, expected the controller path of the GGUF "
                        f"for source 'local'")
    if source in ("hf", "mirror"):
        for key in ("repo", "file"):
            if not values[key]:
                problems.append(f"{where}.{key}: found nothing, expected it for source {source!r}")
    if source == "mirror" and not values["endpoint"]:
        problems.append(f"{where}.endpoint: found nothing, expected the mirror's base URL for "
                        f"source 'mirror'")
    if source == "local" and values["mmproj"] and not _abs_path(values["mmproj"]):
        problems.append(f"{where}.mmproj: found {values['mmproj']!r}, expected an absolute "
                        f"controller path for source 'local'")
    if source != "local" and values["mmproj"] and not _repo_file(values["mmproj"]):
        problems.append(f"{where}.mmproj: found {values['mmproj']!r}, expected a path inside the "
                        f"repo (no leading /, no ..)")
    if len(problems) > before:
        return None
    return ModelSpec(**_typed(ModelSpec, values))


def _load_service(host_name: str, name: Any, raw: Any, problems: list[str],
                  profile: TunedProfile | None = None) -> ServiceSpec | None:
    where = f"host {host_name}: llm_services.{name}"
    if not isinstance(name, str) or not UNIT_NAME_RE.match(name):
        problems.append(f"host {host_name}: llm_services: found service name {name!r}, expected "
                        f"lowercase letters, digits and '-', starting with a letter")
        return None
    if not isinstance(raw, dict):
        problems.append(_line(where, raw, "a mapping of service settings"))
        return None
    before = len(problems)
    if profile:  # the tuned values, validated where they came from (_load_profile)
        raw = {**raw, **dict(profile.settings)}
    values = _validate_block(where, {k: v for k, v in raw.items() if k != "model"},
                             tuple(s for s in SERVICE_SETTINGS if s.name != "model"), problems)
    tune = _load_tune(f"{where}.tune", raw["tune"], problems) if raw.get("tune") is not None else None
    if "port" in values and values["port"] is None:
        problems.append(f"{where}.port: found nothing, expected an integer from 1 to 65535")
    model = _load_model(f"{where}.model", raw.get("model"), problems)
    if len(problems) > before:
        return None
    if values["ctx_size"] % values["parallel"]:
        problems.append(f"{where}.ctx_size: found {values['ctx_size']}, expected a multiple of "
                        f"parallel ({values['parallel']}) so every slot gets the same context")
    if values["cache_type_v"] not in ("f16", "f32", "bf16") and values["flash_attn"] != "on":
        problems.append(f"{where}.flash_attn: found {values['flash_attn']!r}, expected 'on' because "
                        f"cache_type_v {values['cache_type_v']!r} is quantized (llama.cpp needs "
                        f"flash attention for a quantized V cache)")
    loopback = ipaddress.ip_address(values["host"]).is_loopback
    if not values["api_key"] and not loopback and not values["allow_public_without_key"]:
        problems.append(f"{where}.host: found {values['host']!r} with api_key false, expected a "
                        f"loopback address, or allow_public_without_key: true to accept the risk")
    problems += extra_args_problems(where, values["extra_args"])
    if values["gpus"] is not None and values["gpu_layers"] == 0:
        problems.append(f"{where}.gpus: found {values['gpus']!r} on a CPU-only service "
                        f"(gpu_layers 0), expected gpu_layers > 0 or no gpus")
    if values["n_cpu_moe"] is not None and values["gpu_layers"] == 0:
        problems.append(f"{where}.n_cpu_moe: found {values['n_cpu_moe']} on a CPU-only service "
                        f"(gpu_layers 0), expected gpu_layers > 0 or no n_cpu_moe")
    if values["ubatch_size"] and values["batch_size"] and values["ubatch_size"] > values["batch_size"]:
        problems.append(f"{where}.ubatch_size: found {values['ubatch_size']}, expected at most "
                        f"batch_size ({values['batch_size']})")
    if len(problems) > before:
        return None
    warnings = tuple(
        f"{where}.{key}: {t}: {CACHE_TYPE_WARNINGS[t]}"
        for key, t in (("cache_type_k", values["cache_type_k"]), ("cache_type_v", values["cache_type_v"]))
        if t in CACHE_TYPE_WARNINGS
    )
    return ServiceSpec(**{**_typed(ServiceSpec, values), "model": model, "tune": tune}, name=name,
                       warnings=warnings + _stale(where, profile, model), tuned=profile)


def _load_tune(where: str, raw: Any, problems: list[str]) -> TuneSpec | None:
    if not isinstance(raw, dict):
        problems.append(_line(where, raw, "a mapping of tune settings"))
        return None
    before = len(problems)
    values = _validate_block(where, raw, TUNE_SETTINGS, problems)
    if len(problems) > before:
        return None
    return TuneSpec(**_typed(TuneSpec, values))


def _load_profile(host_name: str, tuned_dir: str, services: Mapping[str, Any],
                  problems: list[str]) -> dict[str, TunedProfile]:
    """The host's tuned profile (llmhost-tune's file), by service; its problems name the file."""
    path = tuned_files.profile_path(tuned_dir, host_name)
    found, read_problems = tuned_files.read(path)
    problems += [f"host {host_name}: {p}" for p in read_problems]
    out: dict[str, TunedProfile] = {}
    known = {s.name: s for s in SERVICE_SETTINGS}
    for name, entry in (found or {}).items():
        where = f"host {host_name}: {path}: {name}"
        if name not in services:
            continue  # a service since removed: its entry does nothing (the next tune drops it)
        entry_problems = tuned_files.entry_problems(where, entry)
        if entry_problems:
            problems += entry_problems
            continue
        before = len(problems)
        for key, value in entry["settings"].items():
            if key not in TUNABLE:
                problems.append(f"{where}.settings.{key}: found a setting a profile may not set, "
                                f"expected one of {', '.join(TUNABLE)}")
                continue
            problem = known[key].problem(f"{where}.settings.{key}", value)
            if problem:
                problems.append(problem)
        if len(problems) == before:
            out[name] = TunedProfile(name=entry["profile"], date=entry["date"],
                                     build_commit=entry["build_commit"], goal=entry["goal"],
                                     file=str(path), model_sha256=entry.get("model_sha256"),
                                     settings=tuple(entry["settings"].items()))
    return out


def _stale(where: str, profile: TunedProfile | None, model: ModelSpec) -> tuple[str, ...]:
    """A profile measured on another model: said at every deploy until it is re-tuned."""
    if profile and profile.model_sha256 and model.sha256 and profile.model_sha256 != model.sha256:
        return (f"{where}: the tuned profile {profile.name} ({profile.file}) was measured with "
                f"model sha256 {profile.model_sha256[:12]}, the service now has "
                f"{model.sha256[:12]}: re-tune (llmhost-tune INVENTORY --service "
                f"{where.rsplit('.', 1)[-1]}) or delete the profile",)
    return ()


def load_host_settings(host_name: str, data: Mapping[str, Any]) -> HostSettings:
    """Validate one host's data; raise SettingsError listing every problem."""
    problems: list[str] = []
    ours = {k: v for k, v in data.items() if k.startswith(PREFIX)}
    values = _validate_block(f"host {host_name}", ours, HOST_SETTINGS, problems, sep=": ")
    services: list[ServiceSpec] = []
    raw_services = values.get("llm_services")
    if "llm_services" in ours and not raw_services:
        problems.append(f"host {host_name}: llm_services: found no services, expected a mapping "
                        f"of service name to settings (group_data/ has the guide's two)")
    tuned = _load_profile(host_name, values.get("llm_tuned_dir") or "tuned",
                          raw_services if isinstance(raw_services, dict) else {}, problems)
    for name, raw in (raw_services or {}).items():
        service = _load_service(host_name, name, raw, problems, tuned.get(name))
        if service:
            commit = values.get("llm_llamacpp_commit")
            if service.tuned and commit and service.tuned.build_commit != commit:
                service = replace(service, warnings=service.warnings + (
                    f"host {host_name}: llm_services.{name}: the tuned profile "
                    f"{service.tuned.name} was measured with llama.cpp "
                    f"{service.tuned.build_commit[:12]}, the host builds "
                    f"{commit[:12]}: re-tune (llmhost-tune INVENTORY "
                    f"--limit {host_name} --service {name})",))
            services.append(service)
    seen_ports: dict[int, str] = {}
    for service in services:
        if service.port in seen_ports:
            problems.append(f"host {host_name}: llm_services.{service.name}.port: found "
                            f"{service.port}, already used by llm_services.{seen_ports[service.port]}, "
                            f"expected a port unique on the host")
        seen_ports.setdefault(service.port, service.name)
    if values.get("llm_llamacpp_source") == "local" and not values.get("llm_llamacpp_local_path"):
        problems.append(f"host {host_name}: llm_llamacpp_local_path: found nothing, expected the "
                        f"controller path of a llama.cpp tarball or git checkout for source 'local'")
    gateway = _load_gateway(host_name, ours["llm_gateway"], problems) if "llm_gateway" in ours else None
    # The gateway's ports are the host's too (whatever the binds: one port, one listener).
    for setting, port in ((("port", gateway.port), ("metrics_port", gateway.metrics_port))
                          if gateway else ()):
        if port in seen_ports:
            problems.append(f"host {host_name}: llm_gateway.{setting}: found {port}, already used "
                            f"by llm_services.{seen_ports[port]}, expected a port unique on the host")
    if problems:
        raise SettingsError(problems)
    typed = _typed(HostSettings, values, prefix=PREFIX)
    return HostSettings(**{**typed, "services": tuple(services), "gateway": gateway},
                        host_name=host_name, managed="llm_services" in ours)


def _load_gateway(host_name: str, raw: Any, problems: list[str]) -> GatewaySpec | None:
    where = f"host {host_name}: llm_gateway"
    if not isinstance(raw, dict):
        problems.append(_line(where, raw, "a mapping of gateway settings"))
        return None
    before = len(problems)
    values = _validate_block(where, raw, GATEWAY_SETTINGS, problems)
    if len(problems) > before:
        return None
    if not values["clients"]:
        problems.append(f"{where}.clients: found none, expected at least one client name (each "
                        f"gets a key; the gateway serves no one without a key)")
    unknown = sorted(set(values["client_key_files"] or ()) - set(values["clients"] or ()))
    if unknown:
        problems.append(f"{where}.client_key_files: found {', '.join(unknown)}, expected names of "
                        f"clients (a key for a client not listed would be revoked at once)")
    if values["metrics_port"] == values["port"]:
        problems.append(f"{where}.metrics_port: found {values['metrics_port']}, the API's port, "
                        f"expected a port of its own")
    return GatewaySpec(**_typed(GatewaySpec, values))


def load_inventory_settings(hosts: Mapping[str, Mapping[str, Any]]) -> dict[str, HostSettings]:
    """Validate every host; raise one SettingsError with the problems of all hosts."""
    problems: list[str] = []
    result: dict[str, HostSettings] = {}
    for host_name, data in hosts.items():
        try:
            result[host_name] = load_host_settings(host_name, data)
        except SettingsError as error:
            problems.extend(error.problems)
    if problems:
        raise SettingsError(problems)
    return result

"""Service settings -> llama-server argv, for the pinned llama.cpp version. Pure functions.

Long option names are used throughout so a unit reads without the --help at hand. The guide's
`--mlock` does not exist at the pinned commit: loading is `--load-mode` there, and the guide's
mlock is `--load-mode mmap+mlock` (a settings value, see settings.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from llmhost.settings import ServiceSpec


# The option each setting a tuned profile may set (settings.TUNABLE) becomes in the argv below:
# the host suite checks a running service against its profile with it (files/tune_service.py,
# which cannot import this package on the host, keeps a copy a unit test compares).
TUNED_OPTIONS = {"threads": "--threads", "batch_size": "--batch-size",
                 "ubatch_size": "--ubatch-size", "parallel": "--parallel",
                 "ctx_size": "--ctx-size", "cache_type_k": "--cache-type-k",
                 "cache_type_v": "--cache-type-v", "gpu_layers": "--n-gpu-layers",
                 "n_cpu_moe": "--n-cpu-moe"}


@dataclass(frozen=True)
class ServerPaths:
    """Where the service's inputs live on the host, and the GPUs it sees."""

    binary: str
    model: str
    mmproj: str | None = None
    api_key_file: str | None = None
    # GPUs visible to the process (its `gpus`, else all of the host's); 0 for a CPU service.
    visible_gpus: int = 0


def cuda_devices(count: int) -> str:
    """--device for a GPU service: every visible GPU by llama.cpp's name (CUDA0, CUDA1, ... as
    CUDA_VISIBLE_DEVICES renumbers them). Naming them makes a start without them an error
    ("invalid device"), where -ngl alone would warn and serve from the CPU."""
    return ",".join(f"CUDA{i}" for i in range(count))


def server_argv(service: ServiceSpec, paths: ServerPaths) -> list[str]:
    argv = [paths.binary, "--model", paths.model]
    if paths.mmproj:
        argv += ["--mmproj", paths.mmproj]
    if service.uses_gpu:
        argv += ["--device", cuda_devices(paths.visible_gpus)]
    argv += [
        "--n-gpu-layers", str(service.gpu_layers),
        "--ctx-size", str(service.ctx_size),
        "--parallel", str(service.parallel),
        "--flash-attn", service.flash_attn,
        "--cache-type-k", service.cache_type_k,
        "--cache-type-v", service.cache_type_v,
        "--load-mode", service.load_mode,
        "--cont-batching",
        "--cache-prompt",
        "--reasoning", service.reasoning,
    ]
    if service.reasoning_format:
        argv += ["--reasoning-format", service.reasoning_format]
    if service.reasoning_budget is not None:
        argv += ["--reasoning-budget", str(service.reasoning_budget)]
    if service.threads:
        argv += ["--threads", str(service.threads)]
    if service.batch_size:
        argv += ["--batch-size", str(service.batch_size)]
    if service.ubatch_size:
        argv += ["--ubatch-size", str(service.ubatch_size)]
    if service.n_cpu_moe is not None:
        argv += ["--n-cpu-moe", str(service.n_cpu_moe)]
    if service.metrics:
        argv.append("--metrics")
    if service.alias:
        argv += ["--alias", service.alias]
    if paths.api_key_file:
        argv += ["--api-key-file", paths.api_key_file]
    # Always explicit: upstream is moving the default port (8080 -> 9931).
    argv += ["--host", service.host, "--port", str(service.port)]
    argv += list(service.extra_args)
    return argv


def option_names(argv: list[str]) -> list[str]:
    """The options (not their values) of an argv, in order: what --help must list."""
    return [arg.split("=", 1)[0] for arg in argv[1:] if arg.startswith("-") and not _is_number(arg)]


def _is_number(arg: str) -> bool:
    return bool(re.match(r"^-\d+(\.\d+)?$", arg))


_HELP_OPTION = re.compile(r"^(--?[A-Za-z][\w-]*)")


def help_options(help_text: str) -> set[str]:
    """Every option name `llama-server --help` lists, aliases included.

    An entry looks like `-m,    --model FNAME        model path ...`: names and metavars, then
    two or more spaces and the description.
    """
    names: set[str] = set()
    for line in help_text.splitlines():
        if not line.lstrip().startswith("-"):
            continue
        for match in re.finditer(r"(\S+)(\s*)", line.lstrip()):
            token, gap = match.groups()
            option = _HELP_OPTION.match(token)
            if option:
                names.add(option.group(1))
            if not token.endswith(",") and len(gap) >= 2:
                break
    return names


def unknown_options(argv: list[str], help_text: str) -> list[str]:
    known = help_options(help_text)
    return [name for name in option_names(argv) if name not in known]


def systemd_exec_line(argv: list[str]) -> str:
    """Join argv for ExecStart=, quoting what systemd would otherwise split or expand."""
    return " ".join(_systemd_quote(arg) for arg in argv)


def _systemd_quote(arg: str) -> str:
    # systemd expands % specifiers and $VAR in ExecStart; escape both, quote whitespace.
    escaped = arg.replace("%", "%%").replace("$", "$$")
    if re.search(r'[\s"\'\\;]', escaped) or escaped == "":
        escaped = '"' + escaped.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return escaped

"""Inventory of the H100 proof: the lent device machine itself, through pyinfra's @local connector.

One GPU service shaped like the guide's main service (group_data/gpu_servers.py: -ngl 99, 131072
context, 4 slots, -fa on, K=q4_0 V=q8_0, mmap+mlock, reasoning-format deepseek, an API key), but
serving the small gemma-3-270m that receive.sh reassembled. Everything lives under
$LLMHOST_WORK (default /var/tmp/llmhost), readable by the service user like /opt would be.

    LLMHOST_EXTRA_PAIR=q8_0-q8_0   adds a second GPU service with that K/V pair (point 4 of the
                                   proof: one more flash-attention pair, a build beside the old one)
"""

import os

W = os.environ.get("LLMHOST_WORK", "/var/tmp/llmhost")


def _manifest_model() -> tuple[str, str]:
    """(file name, sha256) of the model, from the manifest pack.sh wrote."""
    try:
        with open(f"{W}/manifest.txt") as manifest:
            for line in manifest:
                parts = line.split()
                if parts[:1] == ["model"]:
                    return parts[1], parts[3]
    except OSError:
        pass
    return "gemma-3-270m-q4_k_m.gguf", "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


_name, _sha256 = _manifest_model()
MODEL = {"source": "local", "path": f"{W}/model/{_name}", "sha256": _sha256}

services = {
    "main": {
        "port": 18082,
        "model": MODEL,
        "gpu_layers": 99,
        "ctx_size": 131072,
        "parallel": 4,
        "flash_attn": "on",
        "cache_type_k": "q4_0",
        "cache_type_v": "q8_0",
        "load_mode": "mmap+mlock",
        "reasoning": "auto",
        "reasoning_format": "deepseek",
    },
}

_extra = os.environ.get("LLMHOST_EXTRA_PAIR")
if _extra:
    _k, _, _v = _extra.partition("-")
    services["alt"] = {
        "port": 18084,
        "model": MODEL,
        "gpu_layers": 99,
        "ctx_size": 8192,
        "parallel": 2,
        "flash_attn": "on",
        "cache_type_k": _k,
        "cache_type_v": _v,
    }

h100 = [
    ("@local", {
        "llm_llamacpp_source": "local",
        "llm_llamacpp_local_path": f"{W}/llama.cpp.tar.gz",
        "llm_install_dir": f"{W}/opt/llama.cpp",
        "llm_model_dir": f"{W}/models",
        "llm_config_dir": f"{W}/etc/llama",
        "llm_services": services,
    }),
]

"""CPU-only hosts: the guide's translator alone."""

llm_services = {
    "translate": {
        "port": 18083,
        "model": {"profile": "qwen2.5-1.5b-instruct-q8_0"},
        "gpu_layers": 0,
        "ctx_size": 4096,
        "parallel": 4,
        "reasoning": "off",
    },
}

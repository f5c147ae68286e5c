"""The guide's two services (benchmarks/reference/rtx5090-llamacpp-guide.txt, section 4), made
safe: loopback bind and an API key by default, and `--load-mode mmap+mlock` where the guide had
`--mlock` (the pinned llama.cpp no longer has that flag)."""

llm_services = {
    # The GPU model server: Qwen3.5-35B-A3B UD-Q4_K_XL with its vision projector.
    "main": {
        "port": 18082,
        "model": {"profile": "qwen3.5-35b-a3b-ud-q4_k_xl"},
        "gpu_layers": 99,
        "ctx_size": 131072,
        "parallel": 4,
        "flash_attn": "on",
        "cache_type_k": "q4_0",
        "cache_type_v": "q8_0",
        "load_mode": "mmap+mlock",
        # Thinking per request: clients send chat_template_kwargs {"enable_thinking": false}.
        "reasoning": "auto",
        "reasoning_format": "deepseek",
    },
    # The CPU-only translator: Qwen2.5-1.5B Q8_0, thinking off so a sentence costs no 400 tokens.
    "translate": {
        "port": 18083,
        "model": {"profile": "qwen2.5-1.5b-instruct-q8_0"},
        "gpu_layers": 0,
        "ctx_size": 4096,
        "parallel": 4,
        "reasoning": "off",
    },
}

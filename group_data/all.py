"""Settings for every host. The defaults (operations/settings.py, README.md's table) already pin
llama.cpp to the commit CI builds; set what differs for your fleet here."""

# llm_llamacpp_commit = "0c1e57098bba43ac29e6e3b677cdceebdd22334f"
# llm_model_dir = "/var/lib/llama-models"

"""The main job: `pyinfra inventory.py deploy.py` turns each host of the inventory into a
llama.cpp server (what it does, in order: llmhost.deploys.llama_server)."""

from llmhost.deploys import llama_server

llama_server()

"""verify checks each host against the manifest where the deploy wrote it (llm_config_dir)."""

from llmhost.verify import target_for


def test_manifest_follows_the_hosts_config_dir():
    assert target_for(0, "gpu1", {"ssh_user": "root"}).manifest == "/etc/llama/llmhost.json"
    moved = target_for(1, "gpu2", {"ssh_user": "root", "llm_config_dir": "/srv/llama/"})
    assert moved.manifest == "/srv/llama/llmhost.json"
    assert target_for(2, "@local", {"llm_config_dir": "/x"}).manifest == "/x/llmhost.json"

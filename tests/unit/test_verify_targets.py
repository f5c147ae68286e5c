"""verify checks each host against the manifest where the deploy wrote it (llm_config_dir)."""

from llmhost.verify import target_for


def test_manifest_follows_the_hosts_config_dir():
    assert target_for(0, "gpu1", {"ssh_user": "root"}).manifest == "/etc/llama/llmhost.json"
    moved = target_for(1, "gpu2", {"ssh_user": "root", "llm_config_dir": "/srv/llama/"})
    assert moved.manifest == "/srv/llama/llmhost.json"
    assert target_for(2, "@local", {"llm_config_dir": "/x"}).manifest == "/x/llmhost.json"


def test_a_missing_ssh_key_names_its_host(tmp_path):
    key = tmp_path / "id_ed25519"
    key.write_text("k")
    target = target_for(0, "gpu1", {"ssh_user": "root", "ssh_key": str(tmp_path / "nope")})
    assert target.problem == (f"host gpu1: ssh_key: found '{tmp_path}/nope', which does not exist "
                              f"on the controller; expected the private key file to log in with")
    assert target_for(0, "gpu1", {"ssh_user": "root", "ssh_key": str(key)}).problem is None


def test_the_inventory_check_stops_on_missing_keys_before_pyinfra_connects(tmp_path):
    import pytest
    from pyinfra.api.exceptions import PyinfraError

    from llmhost.inventory import check_ssh_keys

    key = tmp_path / "id_ed25519"
    key.write_text("k")
    inventory = {"gpu_servers": [("gpu1", {"ssh_key": str(key)}), ("gpu2", {"ssh_key": "/nope/a"})],
                 "web": (["web1", ("web2", {})], {"ssh_key": "/nope/b"}), "not_a_group": 3}
    with pytest.raises(PyinfraError) as error:
        check_ssh_keys(inventory)
    assert str(error.value).splitlines() == [
        "host gpu2: ssh_key: found '/nope/a', which does not exist on the controller; expected the "
        "private key file to log in with",
        "host web1: ssh_key: found '/nope/b', which does not exist on the controller; expected the "
        "private key file to log in with",
        "host web2: ssh_key: found '/nope/b', which does not exist on the controller; expected the "
        "private key file to log in with"]
    check_ssh_keys({"gpu_servers": [("gpu1", {"ssh_key": str(key)})]})  # present: no error


def test_hosts_without_services_or_gateway_are_left_alone(tmp_path, capsys):
    """A web server in the same inventory is not checked (it would fail for a missing
    manifest it was never meant to have)."""
    from llmhost.verify import main

    inventory = tmp_path / "inventory.py"
    inventory.write_text("web = [('web1', {'ssh_user': 'root'})]\n")
    assert main([str(inventory)]) == 0
    assert "verify: left alone (no llm_services, no llm_gateway): web1" in capsys.readouterr().out

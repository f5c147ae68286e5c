"""Gateway hosts: HAProxy in front of every service of the inventory, one address for the team.
Put a host in the group `llm_gateways` of inventory.py (any host, GPU or not). Each service
behind it needs a pushed key (`api_key_file`, the same file for all hosts serving one model)
and a bind the gateway can reach (`host`); set `llm_address` on a host the gateway reaches at
another address than its SSH one."""

llm_gateway = {
    # One key per client, made on the gateway: /etc/llmhost-gateway/clients/<name>.key
    # (root-only). Remove a name to revoke its key; the gateway reloads without dropping a request.
    "clients": ["team"],
    # Or push a key you hold: "client_key_files": {"team": "/home/me/keys/team.key"},
    "port": 8080,
}

"""Your hosts, by group. Each list is a group; its settings live in group_data/<group>.py and
can be overridden per host in the host's dict (see the settings table in README.md).

    pyinfra inventory.py deploy.py                   # every host
    pyinfra inventory.py deploy.py --limit gpu1      # one host
    pyinfra inventory.py deploy.py --dry             # show what would change
"""

# The guide's box: an RTX 5090 serving Qwen3.5-35B-A3B on the GPU and Qwen2.5-1.5B on the CPU
# (group_data/gpu_servers.py).
gpu_servers = [
    ("gpu1.example.net", {"ssh_user": "root"}),
]

# Hosts without a GPU that only run the translator (group_data/cpu_servers.py).
cpu_servers = [
    # ("cpu1.example.net", {"ssh_user": "root"}),
]

# Cloud images log in as a user with sudo: ("gpu2.example.net", {"ssh_user": "ubuntu", "_sudo": True}).

# Before pyinfra connects: a missing ssh_key file names its host (pyinfra's own error does not).
from llmhost.inventory import check_ssh_keys  # noqa: E402

check_ssh_keys(globals())

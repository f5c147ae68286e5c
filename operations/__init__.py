"""llmhost: pyinfra deploys that turn fresh Ubuntu/Debian GPU hosts into llama.cpp servers.

The repository keeps the design card's layout (operations/, files/, templates/, tests/host/);
pyproject.toml installs them as this package and its data, found here wherever pip put them.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path


def data_dir(name: str) -> Path:
    """The folder of ``llmhost.<name>`` (files, templates, hostsuite): inside the installed
    package, or in the checkout for an editable install."""
    spec = importlib.util.find_spec(f"{__name__}.{name}")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"{__name__}.{name} is not installed with the package (reinstall llmhost)")
    return Path(next(iter(spec.submodule_search_locations)))

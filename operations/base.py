"""The host's base: packages, the service user, directories and our helper scripts."""

from __future__ import annotations

import hashlib
import shlex
from io import StringIO
from pathlib import Path

from pyinfra import host
from pyinfra.api import FileUploadCommand, StringCommand, operation
from pyinfra.facts.deb import DebPackages
from pyinfra.operations import apt, files, server

from llmhost import data_dir, remote
from llmhost.facts import Account, FileDigests
from llmhost.remote import HELPER_DIR
from llmhost.settings import HostSettings

FILES = data_dir("files")

# What building and running llama.cpp on the CPU needs on Debian and Ubuntu.
BUILD_PACKAGES = ("git", "cmake", "ninja-build", "g++", "ccache", "python3", "ca-certificates",
                  "libgomp1")


@operation()
def build_packages(packages: list[str]):
    """Install what building and running llama.cpp needs, with apt's output printed as it
    comes (a fresh host takes a minute: the operator sees it work).

    + packages: the Debian package names

    It is pyinfra's ``apt.packages`` (update, no recommends), its commands streamed.

    **Example:**

    .. code:: python

        build_packages(name="Install build packages", packages=["cmake", "ninja-build"])
    """
    for command in apt.packages._inner(packages=packages, update=True, no_recommends=True):
        is_shell = isinstance(command, (str, StringCommand))
        yield remote.streamed(str(command), "apt") if is_shell else command


def packages() -> None:
    installed = host.get_fact(DebPackages) or {}
    missing = [name for name in BUILD_PACKAGES if name not in installed]
    # Only when something is missing: an apt index refresh on every run would be a change.
    if missing:
        build_packages(name=f"Install build packages ({', '.join(missing)})", packages=missing)


@operation()
def system_user(user: str, group: str, home: str, shell: str):
    """A system account for services: pyinfra's ``server.user`` (no home made by useradd; the
    home folder then kept as the user's), but read through this one account (the ``Account``
    fact) where ``server.user`` reads every account on the host (its Users fact: a few commands
    per account, a third of a rerun that changes nothing).

    + user: the account
    + group: its primary group (it must exist)
    + home: its home folder
    + shell: its login shell

    **Example:**

    .. code:: python

        system_user(name="System user llama", user="llama", group="llama",
                    home="/var/lib/llama", shell="/usr/sbin/nologin")
    """
    if host.get_fact(Account, user=user) != {"home": home, "shell": shell, "group": group}:
        yield from server.user._inner(user=user, group=group, system=True, shell=shell, home=home,
                                      create_home=False)
        return
    # What server.user does for an account that matches: its home folder, owned by it.
    yield from files.directory._inner(path=home, user=user, group=group, _no_fail_on_link=True)


def service_user(settings: HostSettings) -> None:
    server.group(name=f"Group {settings.service_user}", group=settings.service_user, system=True)
    system_user(name=f"System user {settings.service_user}", user=settings.service_user,
                group=settings.service_user, home=service_home(settings), shell="/usr/sbin/nologin")
    # For interactive use of the binaries (llama-bench) as the service user; the services
    # themselves get LimitMEMLOCK=infinity in their units, since limits.d does not reach them.
    files.put(name="memlock limit for the service user",
              src=StringIO(f"{settings.service_user} - memlock unlimited\n"),
              dest=memlock_path(settings), user="root", group="root", mode="644")


def service_home(settings: HostSettings) -> str:
    return f"/var/lib/{settings.service_user}"


def memlock_path(settings: HostSettings) -> str:
    return f"/etc/security/limits.d/90-{settings.service_user}-memlock.conf"


def directories(settings: HostSettings) -> None:
    for path, group, mode in _directories(settings):
        files.directory(name=f"Directory {path}", path=path, user="root", group=group, mode=mode)


def _directories(settings: HostSettings) -> list[tuple[str, str, str]]:
    """(path, group, mode) of every folder the deploy makes, root-owned."""
    folders = [(path, "root", "755") for path in (
        settings.install_dir, f"{settings.install_dir}/src", f"{settings.install_dir}/builds",
        settings.model_dir, HELPER_DIR, settings.config_dir)]
    return folders + [(f"{settings.config_dir}/keys", settings.service_user, "750")]


def directory_paths(settings: HostSettings) -> list[str]:
    return [path for path, _, _ in _directories(settings)]


# The bench uploads its own helper when it runs (llmhost.bench): a deploy never ships it, so an
# edit of the bench changes nothing on a host's next deploy.
NOT_DEPLOYED = ("__init__.py", "bench_service.py", "bench_gateway.py")


@operation()
def helper_files(sources: dict[str, str], dest_dir: str):
    """Our host helpers in ``dest_dir``, root:root 0755, exactly the files of ``sources``: one
    fact reads them all (name, sha256, owner, mode), and only the files that differ are
    uploaded; a helper no longer shipped is removed.

    + sources: file name -> its path on the controller
    + dest_dir: the folder on the host

    **Example:**

    .. code:: python

        helper_files(name="Host helpers", sources={"switch_service.py": "/.../switch_service.py"},
                     dest_dir="/usr/local/lib/llmhost")
    """
    present = host.get_fact(FileDigests, path=dest_dir)
    wanted = {name: hashlib.sha256(Path(src).read_bytes()).hexdigest() for name, src in sources.items()}
    changed = sorted(n for n, digest in wanted.items() if present.get(n) != (digest, "root", "root", "755"))
    stale = sorted(set(present) - set(wanted))
    if not changed and not stale:
        host.noop(f"{len(wanted)} helpers in {dest_dir} are up to date")
        return
    for name in changed:
        yield FileUploadCommand(sources[name], f"{dest_dir}/{name}")
    paths = " ".join(shlex.quote(f"{dest_dir}/{name}") for name in changed)
    if changed:
        # With _sudo an upload lands as the login user until it is chowned.
        yield f"chown root:root {paths} && chmod 755 {paths}"
    if stale:
        yield "rm -f " + " ".join(shlex.quote(f"{dest_dir}/{name}") for name in stale)


def helpers() -> None:
    sources = {p.name: str(p) for p in sorted(FILES.glob("*.py")) if p.name not in NOT_DEPLOYED}
    helper_files(name="Host helpers", sources=sources, dest_dir=HELPER_DIR)

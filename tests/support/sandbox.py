"""Fresh Debian hosts with systemd as PID 1, booted in a folder on this machine, reached over SSH.

The recipe, measured on these machines (done loosely, it once cost a machine its network):
debootstrap (cached as a tarball outside the checkout), then `unshare` into new PID, mount, UTS,
IPC and cgroup namespaces, API filesystems mounted by hand with /sys READ-ONLY, chroot, exec
systemd. The host shares this machine's network namespace, so everything that could touch the
network or the kernel is masked before boot, and sshd listens on 127.0.0.1 on a free port.

Use `booted_host(...)` as a context manager: the host is powered off and its folder removed on
exit, pass or fail.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.support import cache

SUITES = {"bookworm": "12", "trixie": "13"}
MIRROR = "http://deb.debian.org/debian"
# What a minimal cloud image has and our deploy assumes: systemd, sshd, python3 (pyinfra facts
# and our host helpers), iproute2 and procps (testinfra's socket and process checks), sudo (the
# login user of cloud images is not root).
BASE_PACKAGES = ("systemd", "systemd-sysv", "dbus", "openssh-server", "python3",
                 "ca-certificates", "iproute2", "procps", "sudo")

# Units that would reach into this machine's kernel or network if they ran here (seen here:
# a writable /sys let udev rename the machine's interface and networkd flush its address).
MASKED_UNITS = (
    "systemd-networkd.service", "systemd-networkd.socket", "systemd-networkd-wait-online.service",
    "systemd-udevd.service", "systemd-udevd-control.socket", "systemd-udevd-kernel.socket",
    "systemd-udev-trigger.service", "systemd-udev-settle.service",
    "systemd-resolved.service", "systemd-timesyncd.service",
    # Also kernel-wide state: sysctls (the network ones belong to the shared namespace), modules,
    # binfmt, the root filesystem's mount options, TRIM of real disks, and the real consoles.
    "systemd-sysctl.service", "systemd-modules-load.service", "kmod-static-nodes.service",
    "systemd-binfmt.service", "proc-sys-fs-binfmt_misc.automount", "proc-sys-fs-binfmt_misc.mount",
    "systemd-remount-fs.service", "fstrim.timer", "fstrim.service",
    "getty.target", "console-getty.service", "getty@.service", "serial-getty@.service",
    "systemd-hwdb-update.service", "sys-kernel-config.mount", "sys-kernel-debug.mount",
    "sys-kernel-tracing.mount", "sys-fs-fuse-connections.mount", "apt-daily.timer",
    "apt-daily-upgrade.timer", "e2scrub_all.timer", "e2scrub_reap.service",
)

BOOT_SCRIPT = r"""
set -eu
R=$1; CGROUPS=$2; shift 2
# The root must be a mount point, or systemd cannot set up a unit's mount namespace (EINVAL):
# every hardened unit, logind and llama-server's among them, would fail at step NAMESPACE.
mount --bind "$R" "$R"
mount -t proc -o nosuid,nodev,noexec proc "$R/proc"
mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$R/sys"
if [ "$CGROUPS" = unified ]; then
  # A cgroup2-only machine (the GPU machines): the host's own tree, seen from the sandbox's
  # cgroup namespace, whose root is the sandbox's cgroup.
  mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 "$R/sys/fs/cgroup"
else
  mount -t tmpfs -o mode=755,nosuid,nodev tmpfs "$R/sys/fs/cgroup"
  mkdir "$R/sys/fs/cgroup/systemd" "$R/sys/fs/cgroup/unified"
  mount -t cgroup -o none,name=systemd cgroup "$R/sys/fs/cgroup/systemd"
  mount -t cgroup2 cgroup2 "$R/sys/fs/cgroup/unified"
fi
mount -t tmpfs -o mode=755,nosuid,nodev tmpfs "$R/run"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$R/tmp"
mount --rbind /dev "$R/dev"
while [ $# -gt 0 ]; do
  mkdir -p "$R/$2"; mount --bind "$1" "$R/$2"
  if [ "$3" = ro ]; then mount -o remount,bind,ro "$R/$2"; fi
  shift 3
done
# Libraries bound in from the machine (the GPU driver's) join the host's linker cache.
if [ -e "$R/etc/ld.so.conf.d/llmhost-sandbox.conf" ]; then chroot "$R" /sbin/ldconfig; fi
hostname "$(cat "$R/etc/hostname")"
exec env -i container=llmhost-sandbox PATH=/usr/sbin:/usr/bin:/sbin:/bin \
  chroot "$R" /lib/systemd/systemd
"""


def cgroup_mode() -> str:
    """'unified' where this machine mounts only cgroup2 at /sys/fs/cgroup (the GPU machines),
    else 'hybrid' (this development machine). LLMHOST_SANDBOX_CGROUPS=unified tries the GPU
    machines' way on a hybrid machine too (a cgroup2 tree without controllers)."""
    if os.environ.get("LLMHOST_SANDBOX_CGROUPS") == "unified":
        return "unified"
    return "unified" if _mounts().get("/sys/fs/cgroup") == "cgroup2" else "hybrid"


def _mounts() -> dict[str, str]:
    """Mount point -> filesystem type, from /proc/self/mountinfo."""
    found = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        found[left.split()[4]] = right.split()[0]
    return found


def _cgroup2_root() -> Path:
    return Path(next(point for point, kind in _mounts().items() if kind == "cgroup2"))


def write_ssh_key(path: Path, comment: str) -> None:
    """An ed25519 key pair in OpenSSH's formats (cryptography, a paramiko dependency: no
    ssh-keygen needed on this machine)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()))
    path.chmod(0o600)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    Path(f"{path}.pub").write_text(f"{public.decode()} {comment}\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_tarball(suite: str = "bookworm", extra: tuple[str, ...] = ()) -> Path:
    """The debootstrap result for ``suite`` (with ``extra`` packages too), made once and kept in
    the cache directory."""
    if suite not in SUITES:
        raise ValueError(f"suite {suite!r}: expected one of {', '.join(SUITES)}")
    packages = BASE_PACKAGES + tuple(extra)
    tarball = cache.cache_dir() / f"debootstrap-{suite}-{cache.short_hash(*packages)}.tar"
    if tarball.exists():
        return tarball
    with tempfile.TemporaryDirectory(dir=cache.cache_dir(), prefix="debootstrap-") as tmp:
        target = Path(tmp) / "root"
        # A private mount namespace: whatever debootstrap mounts in the target stays in it.
        cmd = ["unshare", "--mount", "--propagation", "private", "debootstrap", "--variant=minbase",
               "--include=" + ",".join(packages), suite, str(target), MIRROR]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode:
            raise RuntimeError(f"debootstrap {suite} failed ({result.returncode}):\n"
                               + (result.stdout + result.stderr)[-3000:])
        partial = tarball.with_suffix(".partial")
        subprocess.run(["tar", "-C", str(target), "-cf", str(partial), "."], check=True)
        partial.rename(tarball)
    return tarball


@dataclass
class SandboxHost:
    name: str
    suite: str
    workdir: Path
    ssh_port: int
    key_path: Path
    binds: dict[str, str] = field(default_factory=dict)
    # Folders of this machine bound read-only (a GPU machine's driver and toolkit).
    binds_ro: dict[str, str] = field(default_factory=dict)
    # A root filesystem tarball to unpack instead of the debootstrap cache (the GPU machine's).
    tarball: Path | None = None
    # Who logs in over SSH: root, or (as on cloud images) a user with passwordless sudo, and
    # then root's login is refused.
    login_user: str = "root"
    # Downloaded .deb files shared between hosts by copying (a shared bind mount would make
    # hosts that run apt at the same time fight over its lock).
    apt_cache: Path | None = None
    process: subprocess.Popen | None = None
    init_pid: int | None = None

    @property
    def root(self) -> Path:
        return self.workdir / "root"

    @property
    def ssh_config(self) -> Path:
        return self.workdir / "ssh_config"

    @property
    def testinfra_url(self) -> str:
        return f"ssh://{self.name}"

    def pyinfra_data(self) -> dict:
        """Connection data for a pyinfra inventory entry."""
        data = {
            "ssh_hostname": "127.0.0.1",
            "ssh_port": self.ssh_port,
            "ssh_user": self.login_user,
            "ssh_key": str(self.key_path),
            "ssh_strict_host_key_checking": "off",
            "ssh_known_hosts_file": "/dev/null",
        }
        if self.login_user != "root":
            data["_sudo"] = True
        return data

    def exec(self, *command: str, check: bool = True, timeout: float = 60,
             input: str | None = None) -> subprocess.CompletedProcess:
        """Run a command inside the host's namespaces (not over SSH): for fixtures and faults.
        ``input`` goes to its stdin (a test's secret stays off every command line)."""
        if not self.init_pid:
            raise RuntimeError(f"sandbox {self.name} is not running")
        cmd = ["nsenter", "--target", str(self.init_pid), "--mount", "--uts", "--ipc", "--pid",
               "--root", "--wd", "--", *command]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=input,
                                env={"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                                     "LANG": "C.UTF-8"})
        if check and result.returncode:
            raise RuntimeError(f"{self.name}: {' '.join(command)} exited {result.returncode}:\n"
                               f"{result.stdout}{result.stderr}")
        return result

    # -- lifecycle --------------------------------------------------------------------------

    def prepare(self) -> None:
        self.root.mkdir(parents=True)
        subprocess.run(["tar", "-C", str(self.root), "-xf",
                        str(self.tarball or base_tarball(self.suite))], check=True)
        etc = self.root / "etc"
        (etc / "hostname").write_text(self.name + "\n")
        (etc / "hosts").write_text(f"127.0.0.1 localhost\n127.0.1.1 {self.name}\n")
        if os.path.exists("/etc/resolv.conf"):  # the GPU machine has no network, maybe no file
            shutil.copy("/etc/resolv.conf", etc / "resolv.conf")
        (etc / "machine-id").write_text("")
        units = etc / "systemd" / "system"
        for unit in MASKED_UNITS:
            link = units / unit
            if link.exists() or link.is_symlink():
                link.unlink()
            link.symlink_to("/dev/null")
        if self.apt_cache:
            _link_debs(self.apt_cache, self.root / "var/cache/apt/archives")
        (etc / "ssh" / "sshd_config.d").mkdir(parents=True, exist_ok=True)
        (etc / "ssh" / "sshd_config.d" / "sandbox.conf").write_text(
            f"Port {self.ssh_port}\nListenAddress 127.0.0.1\n"
            f"PermitRootLogin {'prohibit-password' if self.login_user == 'root' else 'no'}\n"
            "PasswordAuthentication no\nUseDNS no\n")
        write_ssh_key(self.key_path, self.name)
        ssh_dir = self.root / "root" / ".ssh"
        ssh_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        shutil.copy(f"{self.key_path}.pub", ssh_dir / "authorized_keys")
        if self.login_user != "root":
            self._add_sudo_user()
        self.ssh_config.write_text(
            f"Host {self.name}\n  HostName 127.0.0.1\n  Port {self.ssh_port}\n  User {self.login_user}\n"
            f"  IdentityFile {self.key_path}\n  IdentitiesOnly yes\n  StrictHostKeyChecking no\n"
            f"  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n")

    def _add_sudo_user(self) -> None:
        user = self.login_user
        subprocess.run(["chroot", str(self.root), "useradd", "--create-home", "--shell", "/bin/bash",
                        user], check=True)
        sudoers = self.root / "etc" / "sudoers.d" / user
        sudoers.write_text(f"{user} ALL=(ALL) NOPASSWD: ALL\n")
        sudoers.chmod(0o440)
        ssh_dir = self.root / "home" / user / ".ssh"
        ssh_dir.mkdir(mode=0o700)
        shutil.copy(f"{self.key_path}.pub", ssh_dir / "authorized_keys")
        subprocess.run(["chroot", str(self.root), "chown", "-R", f"{user}:{user}", f"/home/{user}/.ssh"],
                       check=True)

    def _cgroup_dirs(self) -> list[Path]:
        if cgroup_mode() == "unified":
            return [_cgroup2_root() / "llmhost-sandbox" / self.workdir.name]
        return [Path("/sys/fs/cgroup") / h / "llmhost-sandbox" / self.workdir.name
                for h in ("systemd", "unified") if (Path("/sys/fs/cgroup") / h).is_dir()]

    def boot(self, timeout: float = 90) -> None:
        # Its own cgroup subtree, entered before `unshare --cgroup`, so each host's systemd sees
        # an empty hierarchy of its own and several hosts can run side by side.
        cgroups = self._cgroup_dirs()
        for path in cgroups:
            path.mkdir(parents=True, exist_ok=True)

        def enter_cgroups() -> None:
            for path in cgroups:
                (path / "cgroup.procs").write_text(str(os.getpid()))

        bind_args = [arg for src, dst in self.binds.items() for arg in (src, dst, "rw")]
        bind_args += [arg for src, dst in self.binds_ro.items() for arg in (src, dst, "ro")]
        log = open(self.workdir / "console.log", "wb")
        self.process = subprocess.Popen(
            ["unshare", "--fork", "--pid", "--mount", "--uts", "--ipc", "--cgroup",
             "--propagation", "private", "bash", "-c", BOOT_SCRIPT, "boot", str(self.root),
             cgroup_mode(), *bind_args],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            preexec_fn=enter_cgroups, start_new_session=True)
        self.init_pid = self._wait_for_init()
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"sandbox {self.name} exited while booting:\n"
                                   + (self.workdir / "console.log").read_text(errors="replace")[-3000:])
            state = self.exec("systemctl", "is-system-running", check=False).stdout.strip()
            if state in ("running", "degraded"):
                break
            time.sleep(0.5)
        else:
            raise TimeoutError(f"sandbox {self.name}: systemd state {state!r} after {timeout}s")
        if state == "degraded":
            failed = self.exec("systemctl", "--failed", "--no-legend", check=False).stdout
            raise RuntimeError(f"sandbox {self.name} booted degraded:\n{failed}")
        self._wait_for_ssh(deadline)

    def _wait_for_init(self) -> int:
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        for _ in range(100):
            pids = children.read_text().split() if children.exists() else []
            if pids:
                return int(pids[0])
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"sandbox {self.name}: init did not start:\n"
                           + (self.workdir / "console.log").read_text(errors="replace")[-3000:])

    def _wait_for_ssh(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                with socket.create_connection(("127.0.0.1", self.ssh_port), timeout=2) as s:
                    if s.recv(4).startswith(b"SSH-"):
                        return
            time.sleep(0.3)
        raise TimeoutError(f"sandbox {self.name}: sshd not answering on 127.0.0.1:{self.ssh_port}")

    def stop(self, timeout: float = 30) -> None:
        """Power the host off (SIGRTMIN+4 is systemd's poweroff), kill it if it lingers."""
        if self.process and self.process.poll() is None:
            if self.init_pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.init_pid, signal.SIGRTMIN + 4)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                # Killing the PID namespace's init kills every process in it.
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.init_pid, signal.SIGKILL)
                self.process.wait(timeout=30)
        self.init_pid = None
        for path in self._cgroup_dirs():
            _remove_cgroup_tree(path)

    def destroy(self) -> None:
        self.stop()
        if self.apt_cache and self.root.is_dir():
            _link_debs(self.root / "var/cache/apt/archives", self.apt_cache)
        # The mounts lived in the host's private mount namespace, gone with its last process;
        # refuse to delete anything while one still shows here.
        mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
        inside = [m for m in mounts if m.startswith(str(self.workdir))]
        if inside:
            raise RuntimeError(f"sandbox {self.name}: mounts still present, not deleting: {inside}")
        shutil.rmtree(self.workdir, ignore_errors=True)


def _link_debs(source: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for deb in source.glob("*.deb"):
        if not (target / deb.name).exists():
            with contextlib.suppress(OSError):
                os.link(deb, target / deb.name)


def _remove_cgroup_tree(path: Path) -> None:
    if not path.is_dir():
        return
    for child in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        with contextlib.suppress(OSError):
            child.rmdir()
    with contextlib.suppress(OSError):
        path.rmdir()


@contextlib.contextmanager
def booted_host(name: str = "sandbox1", suite: str = "bookworm", binds: dict[str, str] | None = None,
                apt_cache: Path | None = None, login_user: str = "root"):
    """A fresh, running sandbox host; powered off and deleted on exit, pass or fail.

    ``binds`` maps directories of this machine to paths inside the host (ccache, which is safe
    to share); ``apt_cache`` is a folder of .deb files copied in and back out.
    """
    workdir = Path(tempfile.mkdtemp(prefix=f"llmhost-{name}-", dir="/var/tmp"))
    host = SandboxHost(name=name, suite=suite, workdir=workdir, ssh_port=free_port(),
                       key_path=workdir / "id_ed25519", binds=dict(binds or {}), apt_cache=apt_cache,
                       login_user=login_user)
    try:
        host.prepare()
        host.boot()
        yield host
    finally:
        host.destroy()

#!/usr/bin/env python3
"""Make sure /dev/nvidia-uvm exists, as root, before any GPU service starts (the oneshot unit
llmhost-nvidia-uvm.service runs this; GPU services require it).

Every CUDA context opens /dev/nvidia-uvm. Its module (nvidia_uvm) is loaded at boot from
/etc/modules-load.d, but nothing guarantees the node exists when a service starts, and a
hardened service (NoNewPrivileges, no capabilities) can neither load the module nor make the
node: it would find no GPU and serve from the CPU. This loads the module when its major is
missing and makes /dev/nvidia-uvm (minor 0) and /dev/nvidia-uvm-tools (minor 1) with the
major /proc/devices gives, as nvidia-modprobe -u does. Python 3 standard library only.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys

NODES = (("/dev/nvidia-uvm", 0), ("/dev/nvidia-uvm-tools", 1))


def uvm_major() -> int | None:
    in_char = False
    with open("/proc/devices") as f:
        for line in f:
            text = line.strip()
            if text.endswith("devices:"):
                in_char = text == "Character devices:"
                continue
            major, _, name = text.partition(" ")
            if in_char and name.strip() == "nvidia-uvm" and major.isdigit():
                return int(major)
    return None


def main() -> int:
    major = uvm_major()
    if major is None and shutil.which("modprobe"):
        subprocess.run(["modprobe", "nvidia-uvm"], check=False)
        major = uvm_major()
    if major is None:
        print("nvidia-uvm: the module is not loaded and modprobe nvidia-uvm did not load it "
              "(is the NVIDIA driver installed?)", flush=True)
        return 1
    for path, minor in NODES:
        wanted = os.makedev(major, minor)
        try:
            st = os.stat(path)
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == wanted:
                continue
            os.unlink(path)  # a stale node from an earlier driver's major
        except FileNotFoundError:
            pass
        os.mknod(path, 0o666 | stat.S_IFCHR, wanted)
        os.chmod(path, 0o666)  # as the driver's own nodes; access is the units' DeviceAllow
        print(f"nvidia-uvm: made {path} (char {major}:{minor})", flush=True)
    print(f"nvidia-uvm: /dev/nvidia-uvm is char {major}:0", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

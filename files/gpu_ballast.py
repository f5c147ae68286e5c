#!/usr/bin/env python3
"""Hold a GPU's memory beyond a budget, so that everything else on it (llmhost-tune's candidate
servers, llama.cpp's own --fit) sees only the budget free: a big GPU standing in for a smaller
card. Standard library only: libcudart through ctypes, cudaMalloc in blocks until the free
memory cudaMemGetInfo reports is down to the budget, then it sleeps until SIGTERM/SIGINT and
frees all (the driver frees it too when the process dies).

    gpu_ballast.py --leave-mib 16384 --ready-file /tmp/ballast.json [--device 0]

The ready file (JSON, written once holding) says held_mib, free_mib (what others now see),
total_mib. Exit 0 after a signal, 2 when CUDA cannot be used or the budget exceeds what is free.
Only runs on a GPU host (llmhost-tune uploads and starts it with tune.ballast: true).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import glob
import json
import os
import signal
import sys
import time

MIB = 1 << 20


def load_cudart() -> ctypes.CDLL:
    names = [ctypes.util.find_library("cudart")]
    names += sorted(glob.glob("/usr/local/cuda/lib64/libcudart.so*"), reverse=True)
    names += sorted(glob.glob("/usr/local/cuda/targets/*/lib/libcudart.so*"), reverse=True)
    for name in filter(None, names):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise OSError("libcudart not found (ldconfig, /usr/local/cuda/lib64)")


def blocks(excess_mib: int, largest_mib: int = 1024) -> list[int]:
    """Allocation sizes (MiB) adding up to ``excess_mib``: large blocks, then the rest."""
    out = [largest_mib] * (excess_mib // largest_mib)
    if excess_mib % largest_mib:
        out.append(excess_mib % largest_mib)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--leave-mib", type=int, required=True, help="GPU memory left free, MiB")
    p.add_argument("--ready-file", required=True)
    p.add_argument("--device", type=int, default=0, help="CUDA device index (as visible)")
    args = p.parse_args(argv)
    try:
        cuda = load_cudart()
    except OSError as error:
        print(f"ballast: {error}", file=sys.stderr)
        return 2
    if cuda.cudaSetDevice(args.device):
        print(f"ballast: cudaSetDevice({args.device}) failed", file=sys.stderr)
        return 2
    free, total = ctypes.c_size_t(), ctypes.c_size_t()

    def info() -> tuple[float, float]:
        cuda.cudaMemGetInfo(ctypes.byref(free), ctypes.byref(total))
        return free.value / MIB, total.value / MIB

    held: list[ctypes.c_void_p] = []
    held_mib = 0
    free_mib, total_mib = info()
    if free_mib < args.leave_mib:
        print(f"ballast: only {free_mib:.0f} MiB free, less than the {args.leave_mib} MiB budget",
              file=sys.stderr)
        return 2
    # Twice over: the allocator's own granularity leaves a few MiB more free than asked.
    for _ in range(2):
        for size in blocks(int(free_mib - args.leave_mib)):
            pointer = ctypes.c_void_p()
            if cuda.cudaMalloc(ctypes.byref(pointer), ctypes.c_size_t(size * MIB)):
                break
            held.append(pointer)
            held_mib += size
        free_mib, total_mib = info()
        if free_mib - args.leave_mib < 16:
            break
    report = {"held_mib": held_mib, "free_mib": free_mib, "total_mib": total_mib,
              "leave_mib": args.leave_mib, "pid": os.getpid(), "device": args.device}
    tmp = args.ready_file + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f)
    os.replace(tmp, args.ready_file)
    print(f"ballast: holding {held_mib} MiB; {free_mib:.0f} of {total_mib:.0f} MiB free", flush=True)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    while not stop:
        time.sleep(0.5)
    for pointer in held:
        cuda.cudaFree(pointer)
    return 0


if __name__ == "__main__":
    sys.exit(main())

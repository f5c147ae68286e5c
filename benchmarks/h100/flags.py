#!/usr/bin/env python3
"""Print the CUDA cmake flags that operations/gpu.py computes, one per line, so the H100 proof
builds with the project's own arithmetic. Run from anywhere; pyinfra need not be installed (the
device machine has none): only gpu.py's pure functions are used.

    flags.py --nvcc /usr/local/cuda/bin/nvcc --arch 90 --defaults f16-f16 q4_0-q8_0
"""

from __future__ import annotations

import argparse
import sys
import types
import typing
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def _stub_pyinfra() -> None:
    """operations.gpu subclasses pyinfra's FactBase; a stand-in is enough for its pure functions."""
    try:
        import pyinfra.api  # noqa: F401
        return
    except ImportError:
        pass
    T = typing.TypeVar("T")

    class FactBase(typing.Generic[T]):
        pass

    api = types.ModuleType("pyinfra.api")
    api.FactBase = FactBase
    root = types.ModuleType("pyinfra")
    root.api = api
    sys.modules.update({"pyinfra": root, "pyinfra.api": api})


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nvcc", required=True)
    parser.add_argument("--arch", action="append", required=True, help="repeat for several")
    parser.add_argument("--defaults", action="store_true", help="add ggml's default FA pairs")
    parser.add_argument("--archs-define", action="store_true",
                        help="print only what system_info shows as ARCHS")
    parser.add_argument("pairs", nargs="*", help="K-V pairs like q4_0-q8_0")
    args = parser.parse_args(argv)
    _stub_pyinfra()
    from operations import gpu

    if args.archs_define:
        print(gpu.system_info_archs(args.arch))
        return 0
    pairs = [*args.pairs, *(gpu.FA_DEFAULT_PAIRS if args.defaults else ())]
    print("\n".join(gpu.cuda_cmake_flags(args.nvcc, args.arch, pairs)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

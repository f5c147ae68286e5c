"""Per-operation wall times, for benchmarks: with LLMHOST_TIMINGS=FILE set, every operation's
host, name and seconds are appended to FILE as JSON lines. Off (and free) otherwise."""

from __future__ import annotations

import json
import os
import time

from pyinfra.api.state import BaseStateCallback

_installed: set[int] = set()


class OperationTimer(BaseStateCallback):
    def __init__(self, path: str):
        self.path = path
        self.started: dict[tuple[str, str], float] = {}

    def operation_host_start(self, state, host, op_hash):
        self.started[(host.name, op_hash)] = time.monotonic()

    def operation_host_success(self, state, host, op_hash, retry_count=0):
        self._record(state, host, op_hash, "ok")

    def operation_host_error(self, state, host, op_hash, retry_count=0, max_retries=0):
        self._record(state, host, op_hash, "error")

    def _record(self, state, host, op_hash, result):
        started = self.started.pop((host.name, op_hash), None)
        if started is None:
            return
        name = ", ".join(state.op_meta[op_hash].names)
        with open(self.path, "a") as f:
            f.write(json.dumps({"host": host.name, "operation": name, "result": result,
                                "seconds": round(time.monotonic() - started, 2)}) + "\n")


def install(state) -> None:
    path = os.environ.get("LLMHOST_TIMINGS")
    if path and id(state) not in _installed:
        _installed.add(id(state))
        state.add_callback_handler(OperationTimer(path))

"""Watching a service's /health from the controller while a deploy runs (sandbox hosts share
this machine's loopback), to prove the old service kept answering."""

from __future__ import annotations

import threading
import time
import urllib.request


class HealthPoller(threading.Thread):
    """/health every 0.2 s from the controller, bounded by ``limit`` seconds; (time, ok) samples."""

    def __init__(self, port: int, limit: float = 1500):
        super().__init__(daemon=True)
        self.url, self.limit, self.samples = f"http://127.0.0.1:{port}/health", limit, []
        self.stop_event = threading.Event()

    def run(self):
        started = time.monotonic()
        while not self.stop_event.is_set() and time.monotonic() - started < self.limit:
            try:
                with urllib.request.urlopen(self.url, timeout=2) as r:
                    ok = r.status == 200
            except OSError:
                ok = False
            self.samples.append((time.monotonic(), ok))
            time.sleep(0.2)

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=10)

    def outages(self, since: float = 0.0, until: float = float("inf")) -> list[tuple[float, float]]:
        """(start, seconds) of each run of failed samples inside [since, until]."""
        windows, start = [], None
        for t, ok in self.samples:
            if t < since or t > until:
                continue
            if not ok and start is None:
                start = t
            if ok and start is not None:
                windows.append((start, t - start))
                start = None
        if start is not None:
            windows.append((start, float("inf")))
        return windows

    def wait_ok(self, timeout: float) -> bool:
        """Poll /health (without the thread) until it answers 200 or ``timeout`` seconds pass."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url, timeout=2) as r:
                    if r.status == 200:
                        return True
            except OSError:
                pass
            time.sleep(0.2)
        return False

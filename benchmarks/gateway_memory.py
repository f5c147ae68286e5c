"""What the gateway's request-body limit costs HAProxy in memory: the worker's resident memory
idle, with N large requests in flight at once (held by slow backends, so each one is whole in
its buffer while it waits), and after they ended.

    python -m benchmarks.gateway_memory [--max-body-mib 16] [--body-mib 16] [--requests 8 32]

Runs this machine's HAProxy (Debian's 2.6) on the config llmhost renders, in front of small
HTTP servers on 127.0.0.1 that read each body and answer after --hold seconds; also the same
config with the 256 KiB buffers of before, for comparison. Prints a Markdown table for
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from llmhost import gateway
from llmhost.settings import load_host_settings

KEY = "k" * 64


class Slow(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        self._answer(b'{"status":"ok"}')

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        time.sleep(self.server.hold)
        self._answer(b'{"choices":[]}')

    def _answer(self, data: bytes):
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class Quiet(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid: int) -> int:
    """Resident memory of the HAProxy worker (the master's child), KiB."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    for line in Path(f"/proc/{children[0]}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def measure(max_body_mib: int, body_mib: int, levels: list[int], hold: float,
            old_buffers: bool) -> dict:
    servers = []
    for _ in range(2):
        server = Quiet(("127.0.0.1", 0), Slow)
        server.hold = hold
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
    slots = max(levels)  # every request in flight at a backend, none queued
    hosts = {f"h{i}": load_host_settings(f"h{i}", {"llm_services": {"chat": {
        "port": s.server_address[1], "model": {"source": "local", "path": "/m.gguf"},
        "parallel": slots, "ctx_size": slots * 256, "api_key": False}}})
        for i, s in enumerate(servers)}
    port = free_port()
    spec = load_host_settings("gw", {"llm_gateway": {
        "clients": ["bench"], "port": port, "bind": "127.0.0.1", "metrics_port": free_port(),
        "max_body_mib": max_body_mib}}).gateway
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "clients.map").write_text(f"{hashlib.sha256(KEY.encode()).hexdigest()} bench\n")
        (Path(tmp) / "keys.map").write_text("")
        text = gateway.render_config(spec, gateway.backends(hosts, {h: "127.0.0.1" for h in hosts}),
                                     admin_socket=f"{tmp}/admin.sock",
                                     clients_map=f"{tmp}/clients.map",
                                     backend_keys_map=f"{tmp}/keys.map")
        text = text.replace("    chroot /var/lib/haproxy\n", "").replace("    user haproxy\n", "") \
            .replace("    group haproxy\n", "").replace("    daemon\n", "")
        if old_buffers:
            text = "\n".join("    tune.bufsize 262144" if line.strip().startswith("tune.bufsize")
                             else line for line in text.splitlines()) + "\n"
        (Path(tmp) / "haproxy.cfg").write_text(text)
        process = subprocess.Popen(["haproxy", "-W", "-db", "-f", f"{tmp}/haproxy.cfg"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            for _ in range(100):
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                    break
                except OSError:
                    time.sleep(0.1)
            time.sleep(0.5)
            result = {"idle": rss_kib(process.pid), "levels": {}}
            filler = "x" * (body_mib * 1024 * 1024 - 100)
            body = json.dumps({"messages": [{"role": "user", "content": filler}],
                               "model": "chat"}).encode()

            def send(_):
                req = urllib.request.Request(url, data=body, headers={
                    "Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=120) as response:
                    return response.status

            for n in levels:
                peak = 0
                with ThreadPoolExecutor(n) as pool:
                    futures = [pool.submit(send, i) for i in range(n)]
                    deadline = time.monotonic() + hold
                    while time.monotonic() < deadline:
                        peak = max(peak, rss_kib(process.pid))
                        time.sleep(0.05)
                    statuses = [f.result() for f in futures]
                time.sleep(0.5)
                result["levels"][n] = {"peak": peak, "after": rss_kib(process.pid),
                                       "ok": statuses.count(200)}
            return result
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=10)
            for server in servers:
                server.shutdown()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-body-mib", type=int, default=16)
    parser.add_argument("--body-mib", type=int, default=16)
    parser.add_argument("--requests", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--hold", type=float, default=4.0)
    args = parser.parse_args()
    version = subprocess.run(["haproxy", "-v"], capture_output=True, text=True).stdout.split("\n")[0]
    print(f"{version}; bodies of {args.body_mib} MiB, held {args.hold} s by the backends\n")
    print("| buffers | idle RSS | " + " | ".join(
        f"{n} in flight: peak / after" for n in args.requests) + " |")
    print("|---|---:|" + "---:|" * len(args.requests))
    for old in (True, False):
        # 256 KiB: the buffers before the limit; such a body streams through unbuffered.
        label = "256 KiB (before)" if old else f"{args.max_body_mib} MiB + 64 KiB"
        result = measure(args.max_body_mib, args.body_mib, args.requests, args.hold, old)
        cells = [f"{v['peak'] / 1024:.0f} / {v['after'] / 1024:.0f} MiB ({v['ok']} ok)"
                 for v in result["levels"].values()]
        print(f"| {label} | {result['idle'] / 1024:.1f} MiB | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

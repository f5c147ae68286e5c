"""Drain a server of the gateway and put it back, through HAProxy's runtime API (its admin
socket): the steps a backend's redeploy runs on the gateway host (llmhost.gateway).

    gateway_admin.py drain BACKEND SERVER --timeout S   # no new requests; wait for its own
    gateway_admin.py ready BACKEND SERVER --timeout S   # back in; wait until its checks pass
    gateway_admin.py show                               # servers and backends: state, queue
    gateway_admin.py reload --timeout S                 # reload; wait for the old worker's end
"""

from __future__ import annotations

import argparse
import csv
import io
import socket
import subprocess
import sys
import time


def api(socket_path: str, command: str, half_close: bool = False) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(socket_path)
        sock.sendall(command.encode() + b"\n")
        if half_close:  # the master's CLI answers, then waits for more until we close our side
            sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode()


def server_row(socket_path: str, backend: str, server: str) -> dict | None:
    """The server's line of `show stat` (status, scur = requests in progress, qcur = queued)."""
    text = api(socket_path, "show stat").lstrip("# ")
    for row in csv.DictReader(io.StringIO(text)):
        if row.get("pxname") == backend and row.get("svname") == server:
            return row
    return None


def drain(args) -> int:
    row = server_row(args.socket, args.backend, args.server)
    if row is None:
        print(f"{args.backend}/{args.server}: no such server in the running config")
        return 1
    answer = api(args.socket, f"set server {args.backend}/{args.server} state drain").strip()
    if answer:
        print(f"{args.backend}/{args.server}: drain refused: {answer}")
        return 1
    started, first = time.monotonic(), int(row["scur"] or 0)
    while time.monotonic() - started < args.timeout:
        row = server_row(args.socket, args.backend, args.server)
        if int(row["scur"] or 0) == 0 and int(row["qcur"] or 0) == 0:
            print(f"{args.server} drained from {args.backend} after {time.monotonic() - started:.1f}s "
                  f"({first} request(s) in progress when the drain began, none left)")
            return 0
        time.sleep(0.2)
    print(f"{args.server} drained from {args.backend}; {row['scur']} request(s) still in progress "
          f"after {args.timeout}s: the service restarts anyway")
    return 0


def ready(args) -> int:
    answer = api(args.socket, f"set server {args.backend}/{args.server} state ready").strip()
    if answer:
        print(f"{args.backend}/{args.server}: ready refused: {answer}")
        return 1
    started = time.monotonic()
    while time.monotonic() - started < args.timeout:
        row = server_row(args.socket, args.backend, args.server)
        if row and row["status"].startswith("UP"):
            print(f"{args.server} back in {args.backend}: UP at the gateway after "
                  f"{time.monotonic() - started:.1f}s")
            return 0
        time.sleep(0.2)
    print(f"{args.server} put back in {args.backend} but not UP at the gateway after "
          f"{args.timeout}s (status {row['status'] if row else 'unknown'})")
    return 1


def show(args) -> int:
    text = api(args.socket, "show stat").lstrip("# ")
    for row in csv.DictReader(io.StringIO(text)):
        if row["svname"] != "FRONTEND":  # servers, and each backend's own queue
            print(f"{row['pxname']}/{row['svname']} {row['status'].replace(' ', '_')} scur={row['scur']} "
                  f"qcur={row['qcur']} qmax={row['qmax']} stot={row['stot']} "
                  f"hrsp_5xx={row['hrsp_5xx']} wredis={row['wredis']} wretr={row['wretr']}")
    return 0


def workers(master_socket: str) -> dict[str, list[str]]:
    """The master's `show proc`: PIDs of the current workers and of the old ones (a reload's
    previous worker, finishing the requests it had)."""
    found: dict[str, list[str]] = {"workers": [], "old workers": []}
    section = None
    for line in api(master_socket, "show proc", half_close=True).splitlines():
        if line.startswith("#"):
            section = line[1:].strip()
            continue
        parts = line.split()
        if section in found and len(parts) > 1 and parts[1] == "worker":
            found[section].append(parts[0])
    return found


def reload(args) -> int:
    """`systemctl reload`, then wait until a new worker serves and the old one has finished its
    requests: a backend restarted next is drained at the new worker, and the old one may still
    be sending it requests (with the previous backend key, say)."""
    before, error = None, None
    for _ in range(10):  # a master that has just started (or reloaded) opens its CLI a moment later
        try:
            before = set(workers(args.master_socket)["workers"])
            break
        except OSError as e:
            error = e
            time.sleep(0.3)
    if before is None:
        print(f"HAProxy's master socket {args.master_socket} does not answer ({error}): the reload "
              f"does not wait for the previous worker's requests")
    result = subprocess.run(["systemctl", "reload", args.unit], capture_output=True, text=True)
    if result.returncode:
        print(f"systemctl reload {args.unit} failed: {result.stderr.strip()}")
        return 1
    if before is None:
        return 0
    started, state = time.monotonic(), {"workers": [], "old workers": []}
    while time.monotonic() - started < args.timeout:
        try:
            state = workers(args.master_socket)
        except OSError:  # the master re-executes itself on reload: a moment without its socket
            state = {"workers": [], "old workers": ["?"]}
        if set(state["workers"]) - before and not state["old workers"]:
            print(f"HAProxy reloaded: the previous worker finished its requests after "
                  f"{time.monotonic() - started:.1f}s")
            return 0
        time.sleep(0.2)
    print(f"HAProxy reloaded; after {args.timeout}s the previous worker still has requests "
          f"(workers {state['workers']}, old {state['old workers']}): going on")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--socket", default="/run/haproxy/admin.sock")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("drain", "ready"):
        p = sub.add_parser(name)
        p.add_argument("backend")
        p.add_argument("server")
        p.add_argument("--timeout", type=float, default=120)
    sub.add_parser("show")
    p = sub.add_parser("reload")
    p.add_argument("--unit", default="haproxy.service")
    p.add_argument("--master-socket", default="/run/haproxy-master.sock")
    p.add_argument("--timeout", type=float, default=120)
    args = parser.parse_args()
    return {"drain": drain, "ready": ready, "show": show, "reload": reload}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())

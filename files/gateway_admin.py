"""Drain a server of the gateway and put it back, through HAProxy's runtime API (its admin
socket): the steps a backend's redeploy runs on the gateway host (llmhost.gateway).

    gateway_admin.py drain BACKEND SERVER --timeout S   # no new requests; wait for its own
    gateway_admin.py ready BACKEND SERVER --timeout S   # back in; wait until its checks pass
    gateway_admin.py show                               # servers and backends: state, queue
"""

from __future__ import annotations

import argparse
import csv
import io
import socket
import sys
import time


def api(socket_path: str, command: str) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(socket_path)
        sock.sendall(command.encode() + b"\n")
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
    args = parser.parse_args()
    return {"drain": drain, "ready": ready, "show": show}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())

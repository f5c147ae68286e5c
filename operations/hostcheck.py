"""What the host suite (tests/host, installed as llmhost.hostsuite) asks a host, over testinfra's
``host``: shared by its test modules, which pytest loads from the checkout or from the package."""

from __future__ import annotations

import json
import re


def each(services, check) -> None:
    """Run check(service) for every service; fail once, naming every service that failed."""
    problems = [f"{s.name}: {problem}" for s in services if (problem := check(s))]
    assert not problems, "\n".join(problems)


def http(host, url: str, *, key_file: str | None = None, body: dict | None = None,
         timeout: int = 120) -> tuple[int, str]:
    """An HTTP request made on the host itself (python3 there; curl may be absent). The API key
    is read from its file on the host, so it never crosses the wire to us or shows in argv."""
    script = (
        "import json,sys,urllib.request,urllib.error\n"
        "url,key_file,body=sys.argv[1],sys.argv[2],sys.argv[3]\n"
        "headers={'Content-Type':'application/json'}\n"
        "if key_file: headers['Authorization']='Bearer '+open(key_file).readline().strip()\n"
        "req=urllib.request.Request(url,data=body.encode() if body else None,headers=headers)\n"
        "try:\n"
        f"    r=urllib.request.urlopen(req,timeout={timeout}); print(r.status); print(r.read().decode())\n"
        "except urllib.error.HTTPError as e:\n"
        "    print(e.code); print(e.read().decode())\n"
        "except Exception as e:\n"
        "    print(0); print(repr(e))\n"
    )
    result = host.run("python3 -c %s %s %s %s", script, url, key_file or "",
                      json.dumps(body) if body is not None else "")
    status, _, text = result.stdout.partition("\n")
    return int(status or 0), text


def main_pid(host, unit: str) -> int:
    return int(host.run("systemctl show -p MainPID --value %s", unit).stdout.strip() or 0)


def system_info(host, server: str) -> str:
    """The system_info line of ``server`` as this host runs it (the CUDA backend's fields are
    printed only at run time, with the GPU present); printed before the model loads, so a
    model that does not exist is enough, on port 0. A check fails when it prints none."""
    result = host.run("timeout 120 %s -lv 4 --host 127.0.0.1 --port 0 "
                      "--model /nonexistent/llmhost-probe.gguf 2>&1", server)
    lines = [line for line in result.stdout.splitlines() if "system_info:" in line]
    assert lines, f"{server} printed no system_info line: {result.stdout[-500:]}"
    return lines[-1].split("system_info:", 1)[1]


def info_fields(line: str) -> dict[str, str]:
    """KEY = VALUE fields of a system_info line."""
    return {k: v.strip() for k, v in re.findall(r"(\w+) = ([^|]+)", line)}

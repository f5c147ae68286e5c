"""What the host suite (tests/host, installed as llmhost.hostsuite) asks a host, over testinfra's
``host``: shared by its test modules, which pytest loads from the checkout or from the package."""

from __future__ import annotations

import json


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

#!/usr/bin/env python3
"""Served decode speed of a llama-server on 127.0.0.1, with 1 and N parallel requests (stdlib).

Every loop is bounded: the health wait by --health-timeout, the rounds by --rounds, each request
by --request-timeout. Prints one JSON object: per concurrency, the median over rounds of
  decode_tok_s: sum of server-side predicted_per_second (at 1 request: that request's speed)
  wall_tok_s:   generated tokens / client wall time (prompt and HTTP included)

    decode_client.py --port 18082 --parallel 1 4 --tokens 256 --rounds 3 [--api-key-file F]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
import urllib.error
import urllib.request

HOST = "127.0.0.1"  # never anything else: the proof machine's server is not for the network
PROMPT = "The capital of France is"  # a base model: the text does not matter, its length does


def wait_healthy(base: str, timeout: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=5) as response:
                if response.status == 200:
                    return time.monotonic() - start
        except (urllib.error.URLError, OSError):
            pass  # 503 while loading, refused before listening
        time.sleep(0.25)
    raise SystemExit(f"decode_client: {base}/health not 200 within {timeout:.0f} s")


def complete(base: str, tokens: int, key: str | None, timeout: float) -> dict:
    body = json.dumps({"prompt": PROMPT, "n_predict": tokens, "temperature": 0,
                       "ignore_eos": True, "cache_prompt": False}).encode()
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(f"{base}/completion", body, headers)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.load(response)["timings"]


def one_round(base: str, parallel: int, tokens: int, key: str | None, timeout: float) -> dict:
    results: list[dict] = []
    errors: list[str] = []

    def worker() -> None:
        try:
            results.append(complete(base, tokens, key, timeout))
        except Exception as error:  # reported, not hidden
            errors.append(repr(error))

    threads = [threading.Thread(target=worker) for _ in range(parallel)]
    start = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout + 5)
    wall = time.monotonic() - start
    if errors or len(results) != parallel:
        raise SystemExit(f"decode_client: {parallel} parallel: {errors or 'a request hung'}")
    generated = sum(r["predicted_n"] for r in results)
    return {"decode_tok_s": sum(r["predicted_per_second"] for r in results),
            "wall_tok_s": generated / wall, "tokens": generated}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--parallel", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--health-timeout", type=float, default=120)
    parser.add_argument("--request-timeout", type=float, default=120)
    parser.add_argument("--api-key-file")
    args = parser.parse_args(argv)
    base = f"http://{HOST}:{args.port}"
    key = open(args.api_key_file).read().strip() if args.api_key_file else None
    report: dict = {"health_s": round(wait_healthy(base, args.health_timeout), 2),
                    "tokens_per_request": args.tokens, "rounds": args.rounds}
    one_round(base, 1, 16, key, args.request_timeout)  # warm-up: first-request costs
    for parallel in args.parallel:
        rounds = [one_round(base, parallel, args.tokens, key, args.request_timeout)
                  for _ in range(args.rounds)]
        report[str(parallel)] = {
            "decode_tok_s": round(statistics.median(r["decode_tok_s"] for r in rounds), 1),
            "wall_tok_s": round(statistics.median(r["wall_tok_s"] for r in rounds), 1),
            "all_decode_tok_s": [round(r["decode_tok_s"], 1) for r in rounds],
        }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

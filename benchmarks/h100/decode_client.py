#!/usr/bin/env python3
"""Served decode speed of a llama-server on 127.0.0.1, with 1 and N parallel requests (stdlib).

Every loop is bounded: the health wait by --health-timeout, the rounds by --rounds, each request
by --request-timeout. The requests of a round start together (a barrier). Prints one JSON object:
per concurrency, the median over rounds of
  decode_tok_s:      sum of server-side predicted_per_second (at 1 request: that request's speed)
  per_request_tok_s: the round's median predicted_per_second
  span_tok_s:        generated tokens / span of the decode intervals (each ends when its answer
                     arrived and lasted the server's predicted_ms)
  wall_tok_s:        generated tokens / client wall time (prompt and HTTP included)

    decode_client.py --port 18082 --parallel 1 4 --tokens 256 --rounds 3 [--api-key-file F]
                     [--reset-slots 4]
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
        return {**json.load(response)["timings"], "end": time.monotonic()}


def reset_slots(base: str, slots: int, key: str | None, timeout: float) -> list[int]:
    """One 1-token request pinned to each slot (id_slot) with cache_prompt off: the server drops
    what the slot held (a long prompt left there by an earlier request), so every block of
    measurements starts from the same small slots. Returns the slot ids that answered."""
    done = []
    for slot in range(slots):
        body = json.dumps({"prompt": PROMPT, "n_predict": 1, "temperature": 0, "id_slot": slot,
                           "cache_prompt": False}).encode()
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(f"{base}/completion", body, headers)
        with urllib.request.urlopen(request, timeout=timeout) as response:
            json.load(response)
        done.append(slot)
    return done


def one_round(base: str, parallel: int, tokens: int, key: str | None, timeout: float) -> dict:
    results: list[dict] = []
    errors: list[str] = []

    barrier = threading.Barrier(parallel)

    def worker() -> None:
        try:
            barrier.wait(timeout=30)
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
    # span of the decode intervals: each ends when its answer arrived and lasted predicted_ms
    span = max(r["end"] for r in results) - min(r["end"] - r["predicted_ms"] / 1000 for r in results)
    return {"decode_tok_s": sum(r["predicted_per_second"] for r in results),
            "per_request_tok_s": statistics.median(r["predicted_per_second"] for r in results),
            "span_tok_s": generated / span if span > 0 else None,
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
    parser.add_argument("--reset-slots", type=int, default=0,
                        help="first clear this many slots (one pinned 1-token request each)")
    args = parser.parse_args(argv)
    base = f"http://{HOST}:{args.port}"
    key = open(args.api_key_file).read().strip() if args.api_key_file else None
    report: dict = {"health_s": round(wait_healthy(base, args.health_timeout), 2),
                    "tokens_per_request": args.tokens, "rounds": args.rounds}
    if args.reset_slots:
        report["reset_slots"] = reset_slots(base, min(args.reset_slots, 64), key, args.request_timeout)
    one_round(base, 1, 16, key, args.request_timeout)  # warm-up: first-request costs
    for parallel in args.parallel:
        rounds = [one_round(base, parallel, args.tokens, key, args.request_timeout)
                  for _ in range(args.rounds)]
        report[str(parallel)] = {
            "decode_tok_s": round(statistics.median(r["decode_tok_s"] for r in rounds), 1),
            "wall_tok_s": round(statistics.median(r["wall_tok_s"] for r in rounds), 1),
            "all_decode_tok_s": [round(r["decode_tok_s"], 1) for r in rounds],
            "per_request_tok_s": round(statistics.median(r["per_request_tok_s"] for r in rounds), 1),
            "span_tok_s": round(statistics.median(r["span_tok_s"] for r in rounds), 1),
            "all_per_request_tok_s": [round(r["per_request_tok_s"], 1) for r in rounds],
            "all_span_tok_s": [round(r["span_tok_s"], 1) for r in rounds],
        }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

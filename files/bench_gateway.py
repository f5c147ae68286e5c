"""Decode through a gateway, measured on the gateway host (uploaded by llmhost.bench only when it
runs, like bench_service.py; the deploy never ships it).

    bench_gateway.py --record /etc/llmhost-gateway/gateway.json --out result.json
                     [--decode-tokens 128] [--parallel 1 2 4] [--rounds 3]

For each model the gateway routes, and each parallel level (plus one request per slot of the
whole fleet), batches of that many completions at once through the gateway's own address with
the first client's key: aggregate decode = tokens generated / wall time of the batch, per
request = the median of the servers' own timings. The key is read from its file, never printed.
Every loop is bounded (levels x rounds batches, each request with a timeout).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor


def completion(url: str, key: str, model: str, tokens: int) -> dict:
    body = json.dumps({"model": model, "prompt": "Write a long story about a lighthouse keeper.",
                       "n_predict": tokens, "temperature": 0, "ignore_eos": True,
                       "cache_prompt": False}).encode()
    request = urllib.request.Request(url, data=body, headers={
        "Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.load(response)


def batch(url: str, key: str, model: str, parallel: int, tokens: int) -> dict:
    started = time.monotonic()
    with ThreadPoolExecutor(parallel) as pool:
        answers = list(pool.map(lambda _: completion(url, key, model, tokens), range(parallel)))
    seconds = time.monotonic() - started
    generated = sum(int(a.get("tokens_predicted", 0)) for a in answers)
    rates = [a["timings"]["predicted_per_second"] for a in answers if a.get("timings")]
    return {"aggregate_tok_s": generated / seconds, "seconds": seconds, "tokens": generated,
            "per_request_tok_s": statistics.median(rates) if rates else None}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--record", default="/etc/llmhost-gateway/gateway.json")
    parser.add_argument("--out", required=True)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--parallel", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with open(args.record) as f:
        record = json.load(f)
    address = "127.0.0.1" if record["bind"] in ("0.0.0.0", "::") else record["bind"]
    url = f"http://{address}:{record['port']}/completion"
    if record.get("tls"):
        url = url.replace("http://", "https://", 1)
    with open(f"{record['client_keys']}/{record['clients'][0]}.key") as f:
        key = f.read().strip()
    result = {"url": url, "client": record["clients"][0], "decode_tokens": args.decode_tokens,
              "models": []}
    for backend in record["backends"]:
        slots = sum(backend.get("slots", [1] * len(backend["servers"])))
        levels = sorted({n for n in args.parallel if 1 <= n <= 256} | {slots})
        model = {"model": backend["model"], "servers": backend["servers"], "slots": slots,
                 "levels": []}
        for parallel in levels:
            rounds = [batch(url, key, backend["model"], parallel, args.decode_tokens)
                      for _ in range(max(1, min(args.rounds, 20)))]
            level = {"parallel": parallel, "rounds": rounds,
                     "aggregate_tok_s": statistics.median(r["aggregate_tok_s"] for r in rounds),
                     "per_request_tok_s": statistics.median(
                         r["per_request_tok_s"] for r in rounds if r["per_request_tok_s"] is not None)
                     if any(r["per_request_tok_s"] is not None for r in rounds) else None}
            model["levels"].append(level)
            print(f"bench: gateway {backend['model']} at {parallel} parallel: aggregate "
                  f"{level['aggregate_tok_s']:.1f} tok/s", flush=True)
        result["models"].append(model)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

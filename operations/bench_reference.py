"""What a bench result is held to: the guide's own figures
(benchmarks/reference/rtx5090-llamacpp-guide.txt), for the hardware and model the guide measured,
and nothing else.

Each measured figure becomes a Row: PASS (within the tolerance of the guide's figure), BELOW, or
NO-REFERENCE (no one measured this GPU, model or setting in the guide: the figure is shown, never
judged). A figure that was not measured is SKIPPED. No reference is derived, scaled or guessed.
"""

from __future__ import annotations

from dataclasses import dataclass

TOLERANCE = 0.90  # a user accepts 90% of the guide's throughput (or 1/0.9 of its latency)
SOURCE = "benchmarks/reference/rtx5090-llamacpp-guide.txt"

PASS, BELOW, NO_REFERENCE, SKIPPED = "PASS", "BELOW", "NO-REFERENCE", "SKIPPED"

GUIDE_GPU = "RTX 5090"
MAIN_MODEL = "qwen3.5-35b-a3b-ud-q4_k_xl.gguf"

# Section 3.5: concurrency, K=q4_0 V=q8_0, 4 slots. parallel -> (per request, aggregate) tok/s.
GUIDE_CONCURRENCY = {1: (190.0, 190.0), 2: (145.0, 290.0), 4: (96.0, 356.0)}
GUIDE_CONCURRENCY_KV = ("q4_0", "q8_0")
# Section 3.2: decode tok/s of the main model by K/V pair.
GUIDE_KV_DECODE = {("f16", "f16"): 195.0, ("q4_0", "q8_0"): 188.0, ("q4_0", "q4_0"): 186.0,
                   ("q5_0", "q5_0"): 153.0, ("iq4_nl", "iq4_nl"): 38.0}
# Section 3.1: decode tok/s of the other models the guide measured on the same card.
GUIDE_MODEL_DECODE = {"qwen3.5-35b-a3b-mxfp4_moe.gguf": 167.0, "qwen3.5-27b-q4_k_m.gguf": 66.0}
# Section 3.4: context tokens -> prefill seconds, needle found (the main model).
GUIDE_PREFILL = {9_000: 1.2, 53_000: 6.6, 107_000: 16.3, 178_000: 34.9}
GUIDE_NEEDLE_MAX = 178_000
# Conclusions table and 3.3: translation latency with thinking off; start-up with mlock.
GUIDE_THINKING_OFF_S = 0.2
GUIDE_START_S = 5.0
CONTEXT_MATCH = 0.10  # a tested context within 10% of a guide point is compared with it


@dataclass(frozen=True)
class Row:
    section: str
    label: str
    measured: float | bool | None
    unit: str
    reference: float | bool | None = None
    higher_is_better: bool = True
    note: str = ""

    @property
    def verdict(self) -> str:
        if self.measured is None:
            return SKIPPED
        if self.reference is None:
            return NO_REFERENCE
        if isinstance(self.reference, bool):
            return PASS if bool(self.measured) == self.reference else BELOW
        if self.higher_is_better:
            return PASS if self.measured >= self.reference * TOLERANCE else BELOW
        return PASS if self.measured <= self.reference / TOLERANCE else BELOW


def guide_gpu(result: dict) -> bool:
    """The service runs on the guide's card: every GPU it may use is an RTX 5090."""
    service = result.get("service", {})
    if not service.get("gpu_layers"):
        return False
    gpus = result.get("host", {}).get("gpus") or []
    wanted = service.get("gpus")
    used = [g for g in gpus if wanted is None or g.get("index") in wanted]
    return bool(used) and all(GUIDE_GPU in g.get("name", "") for g in used)


def model_file(result: dict) -> str:
    return (result.get("service", {}).get("model_file") or "").lower()


def is_guide_main(result: dict) -> bool:
    return guide_gpu(result) and model_file(result) == MAIN_MODEL


def profile_name(result: dict) -> str:
    if is_guide_main(result):
        return "the guide's main service (RTX 5090, Qwen3.5-35B-A3B UD-Q4_K_XL)"
    if guide_gpu(result) and model_file(result) in GUIDE_MODEL_DECODE:
        return f"a model the guide measured on an RTX 5090 ({model_file(result)})"
    return "not measured by the guide: figures only"


def _get(d: dict | None, *keys):
    for key in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(key)
    return d


def rows(result: dict) -> list[Row]:
    """Every figure of one service's result, with the guide's figure where the guide has one."""
    out: list[Row] = []
    service = result.get("service", {})
    main = is_guide_main(result)
    kv = (service.get("cache_type_k"), service.get("cache_type_v"))
    slots = service.get("parallel") or 0

    for level in _get(result, "decode", "levels") or []:
        n = level["parallel"]
        per_ref = agg_ref = None
        note = ""
        if main and kv == GUIDE_CONCURRENCY_KV and n in GUIDE_CONCURRENCY and slots >= n:
            per_ref, agg_ref = GUIDE_CONCURRENCY[n]
        elif main and n == 1 and kv in GUIDE_KV_DECODE:
            per_ref = agg_ref = GUIDE_KV_DECODE[kv]
            note = f"guide's K/V table for {kv[0]}/{kv[1]}"
        elif n == 1 and guide_gpu(result) and model_file(result) in GUIDE_MODEL_DECODE:
            per_ref = agg_ref = GUIDE_MODEL_DECODE[model_file(result)]
            note = "guide's model table"
        elif main and slots < n:
            note = f"the guide ran 4 slots; this service has {slots}"
        if level.get("queued"):
            note = (note + "; " if note else "") + f"{n} requests on {slots} slots: some queued"
        out.append(Row("decode", f"per request at {n} parallel", level.get("per_request_tok_s"),
                       "tok/s", per_ref, True, note))
        out.append(Row("decode", f"aggregate at {n} parallel", level.get("aggregate_tok_s"),
                       "tok/s", agg_ref, True, note))

    out.append(Row("latency", "time to first token", _get(result, "ttft", "ms"), "ms",
                   higher_is_better=False))
    out.append(Row("latency", "prompt processing", _get(result, "prompt", "tok_s"), "tok/s"))
    out.append(Row("engine", "llama-bench pp512", _get(result, "engine", "pp512_tok_s"), "tok/s"))
    out.append(Row("engine", "llama-bench tg128", _get(result, "engine", "tg128_tok_s"), "tok/s"))

    thinking = result.get("thinking") or {}
    if "skipped" not in thinking and "error" not in thinking:
        out.append(Row("thinking", "thinking on: tokens", _get(thinking, "on", "completion_tokens"),
                       "tokens", higher_is_better=False))
        out.append(Row("thinking", "thinking on: latency", _get(thinking, "on", "seconds"), "s",
                       higher_is_better=False))
        out.append(Row("thinking", "thinking off: tokens", _get(thinking, "off", "completion_tokens"),
                       "tokens", higher_is_better=False))
        out.append(Row("thinking", "thinking off: latency", _get(thinking, "off", "seconds"), "s",
                       GUIDE_THINKING_OFF_S if main else None, False))

    for point in _get(result, "needle", "points") or []:
        tokens = point.get("prompt_tokens") or point.get("target_tokens")
        found_ref = True if main and tokens <= GUIDE_NEEDLE_MAX else None
        out.append(Row("needle", f"needle found at {tokens} tokens", point.get("found"), "",
                       found_ref))
        prefill_ref, note = None, ""
        if main:
            for ctx, seconds in GUIDE_PREFILL.items():
                if abs(tokens - ctx) <= ctx * CONTEXT_MATCH:
                    prefill_ref, note = seconds, f"guide's {ctx // 1000}K point"
        out.append(Row("needle", f"prefill of {tokens} tokens", point.get("prefill_s"), "s",
                       prefill_ref, False, note))

    out.append(Row("startup", "restart to /health 200", _get(result, "startup", "seconds"), "s",
                   GUIDE_START_S if main else None, False))

    for pair in _get(result, "kv_sweep", "pairs") or []:
        key = (pair["k"], pair["v"])
        ref = GUIDE_KV_DECODE.get(key) if main else None
        out.append(Row("kv-sweep", f"tg128 with K/V {key[0]}/{key[1]}", pair.get("tg128_tok_s"),
                       "tok/s", ref, True, "guide's figure is served decode" if ref else ""))
    return out


def counts(all_rows: list[Row]) -> dict[str, int]:
    out = {PASS: 0, BELOW: 0, NO_REFERENCE: 0, SKIPPED: 0}
    for row in all_rows:
        out[row.verdict] += 1
    return out

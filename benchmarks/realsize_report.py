"""The guide's tables beside what benchmarks/gpu_realsize.py measured on the GPU host, as ratios,
and decode against the GPU's measured memory bandwidth (bytes per token from the shape-true
recipe, benchmarks/shape_true.py). Reads the files a `prove` call brought back; writes
report.md beside them.

    python -m benchmarks.realsize_report benchmarks/gpu-sandbox/realsize-c10bbda
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from benchmarks import shape_true
from benchmarks.gpu_realsize import GUIDE_AGGREGATE, GUIDE_KV, GUIDE_PREFILL_S

# The tg128 context: 128 tokens generated from an empty cache (llama-bench -p 0 -n 128).
TG_CONTEXT = 64
# A ratio that differs from the guide's by more than this is explained in RESULTS.md.
TOLERANCE = 0.15


def moe_step_bytes(r, parallel: int, ctx_tokens: int) -> float:
    """Weight bytes one decoding step of ``parallel`` sequences reads: every non-expert tensor
    once, and the experts the step's tokens route to, expected distinct over uniform routing
    (n_expert * (1 - (1 - used/n_expert) ** parallel) of each expert stack), plus each
    sequence's K/V and recurrent state."""
    shared = experts = 0
    for t in r.tensors:
        if t.name == "token_embd.weight":
            shared += parallel * t.nbytes // t.shape[1]
        elif t.expert:
            experts += t.nbytes
        else:
            shared += t.nbytes
    used = 1 - (1 - r.n_expert_used / r.n_expert) ** parallel
    per_sequence = (shape_true.kv_bytes_per_token(r, ctx_tokens, "q4_0", "q8_0")
                    + shape_true.decode_bytes_per_token(r, 0, "q4_0", "q8_0")
                    - shape_true.weight_bytes_per_token(r))
    return shared + experts * used + parallel * per_sequence


def ratio_row(label: str, ours: float | None, guide: float) -> str:
    if ours is None:
        return f"| {label} | not measured | {guide:.3f} | |"
    diff = ours / guide - 1
    flag = " **>15 %**" if abs(diff) > TOLERANCE else ""
    return f"| {label} | {ours:.3f} | {guide:.3f} | {diff:+.1%}{flag} |"


def report(folder: Path) -> str:
    tables = json.loads((folder / "tables.json").read_text())
    service = tables["bench"]["services"][0]
    moe = shape_true.recipe(tables["recipes"]["moe"])
    lines = ["# The guide's tables on the H200 (shape-true models), as ratios", "",
             f"Measured by `python3 -m benchmarks.gpu_realsize prove` (files in this folder); "
             f"written by `python -m benchmarks.realsize_report {folder}`.", ""]

    # K/V types: tg128 of each pair over f16/f16.
    tg = {(p["k"], p["v"]): p.get("tg128_tok_s") for p in service["kv_sweep"]["pairs"]}
    iq4 = [r["avg_ts"] for r in tables["iq4_nl"] if r.get("n_gen")]
    tg[("iq4_nl", "iq4_nl")] = iq4[0] if iq4 else None
    base = tg[("f16", "f16")]
    lines += ["## K/V cache types: decode (tg128) / F16-F16", "",
              "| K/V | tok/s here | ratio here | guide | differs by |", "|---|---|---|---|---|"]
    for pair, guide in GUIDE_KV.items():
        ours = tg.get(pair)
        r = ours / base if ours and base else None
        g = guide / GUIDE_KV[("f16", "f16")]
        cells = ratio_row("/".join(pair), r, g).split(" | ")
        lines.append(f"| {'/'.join(pair)} | {ours:.1f} | " + " | ".join(cells[1:])
                     if ours else f"| {'/'.join(pair)} | — | " + " | ".join(cells[1:]))
    levels = {lv["parallel"]: lv for lv in service["decode"]["levels"]}
    lines += ["", "## Concurrency: aggregate decode / one request (server, 256 tokens each)", "",
              "| parallel | aggregate tok/s | per request | ratio here | guide | differs by |",
              "|---|---|---|---|---|---|"]
    one = levels[1]["aggregate_tok_s"]
    for n, guide in GUIDE_AGGREGATE.items():
        lv = levels.get(n)
        cells = ratio_row(str(n), lv["aggregate_tok_s"] / one if lv else None,
                          guide / GUIDE_AGGREGATE[1]).split(" | ")
        lines.append(f"| {n} | {lv['aggregate_tok_s']:.1f} | {lv['per_request_tok_s']:.1f} | "
                     + " | ".join(cells[1:]))
    prefill = {row["tokens"]: row for row in tables["prefill"]}
    first = min(prefill)
    lines += ["", "## Context: prefill time / prefill at 9K (llama-bench -p N, K=q4_0 V=q8_0)", "",
              "| tokens | seconds | tok/s | GPU MiB of the bench process (peak - service) | "
              "ratio here | guide | differs by |", "|---|---|---|---|---|---|---|"]
    for n, guide in GUIDE_PREFILL_S.items():
        row = prefill.get(n)
        if not row:
            continue
        cells = ratio_row(str(n), row["prefill_s"] / prefill[first]["prefill_s"],
                          guide / GUIDE_PREFILL_S[first]).split(" | ")
        lines.append(f"| {n} | {row['prefill_s']:.2f} | {row['tok_s']:.0f} | "
                     f"{row['gpu_mib_peak'] - row['gpu_mib_before']} | " + " | ".join(cells[1:]))

    bandwidth = tables["bandwidth"]["read_write_GBps"] * 1e9
    engine = service["engine"]
    tg128 = engine["tg128_tok_s"]
    paired = engine["paired"]["served_over_tg128"]
    per_token = moe_step_bytes(moe, 1, TG_CONTEXT)
    lines += ["", "## Decode against the memory bandwidth (MoE)", "",
              f"- Device-to-device copy, 8 GiB, best of 10: {bandwidth / 1e9:.0f} GB/s read+write.",
              f"- Bytes one decoded token reads (recipe): {per_token / 1e9:.3f} GB (weights "
              f"{shape_true.weight_bytes_per_token(moe) / 1e9:.3f} GB: shared and attention "
              f"tensors, {moe.n_expert_used} of {moe.n_expert} experts, one embedding row; plus "
              f"the recurrent state and the K/V at {TG_CONTEXT} tokens).",
              f"- llama-bench tg128: {tg128:.1f} tok/s -> {tg128 * per_token / 1e12:.3f} TB/s, "
              f"{tg128 * per_token / bandwidth:.3f} of the copy bandwidth.",
              f"- Served, 1 request of 256 tokens: {one:.1f} tok/s -> "
              f"{one * per_token / bandwidth:.3f}; served / tg128, alternated: {paired:.3f}."]
    for n in (2, 4):
        lv = levels.get(n)
        if lv:
            step = moe_step_bytes(moe, n, TG_CONTEXT)
            steps = lv["aggregate_tok_s"] / n
            lines.append(f"- {n} parallel: {lv['aggregate_tok_s']:.1f} tok/s aggregate = "
                         f"{steps:.1f} steps/s of {step / 1e9:.2f} GB (experts expected distinct "
                         f"over uniform routing) -> {steps * step / bandwidth:.3f} of the bandwidth.")
    lines += ["", "The dense 27B was not measured in this sitting (device time)."]
    return "\n".join(lines) + "\n"


def main() -> int:
    folder = Path(sys.argv[1])
    text = report(folder)
    (folder / "report.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

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
from benchmarks.gpu_realsize import (GUIDE_AGGREGATE, GUIDE_DENSE_OVER_MOE, GUIDE_KV,
                                     GUIDE_PREFILL_S)

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
    lines += [""] + dense_section(folder, bandwidth)
    return "\n".join(lines) + "\n"


def tg128(rows: list[dict]) -> float | None:
    found = [r["avg_ts"] for r in rows if r.get("n_gen")]
    return found[0] if found else None


def dense_section(folder: Path, bandwidth: float) -> list[str]:
    """The dense model beside the MoE (`gpu_realsize dense`: tables-dense.json), when measured."""
    path = folder / "tables-dense.json"
    if not path.exists():
        return ["The dense 27B was not measured in this sitting (device time)."]
    found = json.loads(path.read_text())
    dense = shape_true.recipe(found["recipes"]["dense"])
    # Round 1 reads each file into the page cache: rounds 2 and 3 are compared.
    by_role: dict[str, list[float]] = {"dense": [], "moe": []}
    for entry in found["alternated"]:
        rate = tg128(entry["rows"])
        if entry["round"] > 0 and rate:
            by_role[entry["role"]].append(rate)
    d, m = (sum(v) / len(v) for v in (by_role["dense"], by_role["moe"]))
    per_token = shape_true.decode_bytes_per_token(dense, TG_CONTEXT, "q4_0", "q8_0")
    served = found["dense_served_1"]["median"]
    reboot = found["cold_reboot"]
    lines = ["## The dense 27B", "",
             f"- llama-bench tg128, K=q4_0 V=q8_0, rounds 2-3 of 3 alternated with the MoE: dense "
             f"{d:.1f} tok/s, MoE {m:.1f} tok/s.",
             ratio_table_line("dense / MoE decode", d / m, GUIDE_DENSE_OVER_MOE),
             f"- Bytes one decoded token reads (recipe): {per_token / 1e9:.3f} GB (every weight but "
             f"the embedding table, one embedding row, the recurrent state, the K/V at "
             f"{TG_CONTEXT} tokens).",
             f"- tg128 {d:.1f} tok/s -> {d * per_token / 1e12:.3f} TB/s, "
             f"{d * per_token / bandwidth:.3f} of the copy bandwidth.",
             f"- Served, 1 request of 256 tokens (llama-server by hand with main's flags), median of "
             f"3: {served:.1f} tok/s; served / tg128 = {served / d:.3f}.",
             "", "Flags the project controls, dense tg128 (one run each, after the rounds above):", "",
             "| variant | tok/s | of the copy bandwidth |", "|---|---|---|"]
    for label, rows in found["variants"].items():
        rate = tg128(rows)
        lines.append(f"| {label} | {rate:.1f} | {rate * per_token / bandwidth:.3f} |" if rate
                     else f"| {label} | no result | |")
    lines += ["", f"Reboot with the machine's page cache dropped first: main answered "
                  f"{reboot['since_boot_s']:.1f} s after the boot began "
                  f"({reboot['main_first_answer_s']:.1f} s after sshd)."]
    return lines


def ratio_table_line(label: str, ours: float, guide: float) -> str:
    diff = ours / guide - 1
    flag = " (more than 15 %)" if abs(diff) > TOLERANCE else ""
    return f"- {label}: {ours:.3f} here, {guide:.3f} in the guide (66 / 190): {diff:+.1%}{flag}."


def dense_report(folder: Path) -> str:
    """A sitting of `gpu_realsize dense` alone: the dense section, against that sitting's own
    bandwidth measurement (bandwidth.json, or the one tables-dense.json carries)."""
    found = json.loads((folder / "tables-dense.json").read_text())
    measured = found.get("bandwidth") or json.loads((folder / "bandwidth.json").read_text())
    return "\n".join(["# The dense 27B beside the MoE on the H200 (shape-true models)", "",
                      f"Measured by `python3 -m benchmarks.gpu_realsize start/up/dense` with "
                      f"LLMHOST_REALSIZE_DENSE=1 (files in this folder); written by "
                      f"`python -m benchmarks.realsize_report {folder}`.", "",
                      f"- Device-to-device copy, 8 GiB, best of 10: "
                      f"{measured['read_write_GBps']:.0f} GB/s read+write.", ""]
                     + dense_section(folder, measured["read_write_GBps"] * 1e9)) + "\n"


def main() -> int:
    folder = Path(sys.argv[1])
    text = report(folder) if (folder / "tables.json").exists() else dense_report(folder)
    (folder / "report.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

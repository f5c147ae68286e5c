"""The bench's Markdown report (tables like the guide's, a fleet summary) and its PNG plots.

Plots need matplotlib, an optional extra (`pip install 'llmhost[bench]'`); without it the report
says the plots were skipped and why. Input: {host name: {"services": [result, ...], "error": ...}}
as llmhost.bench collects them.
"""

from __future__ import annotations

from pathlib import Path

from llmhost import bench_reference as ref

PLOTS = {"throughput": "throughput.png", "context": "context.png"}


def fmt(value, digits: int = 1) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(header: list[str], body: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(c) if not isinstance(c, str) else c for c in row) + " |"
              for row in body]
    return lines + [""]


def services(fleet: dict) -> list[tuple[str, dict]]:
    return [(host, result) for host, entry in fleet.items() for result in entry.get("services", [])]


def row_map(result: dict) -> dict[str, ref.Row]:
    return {f"{r.section}:{r.label}": r for r in ref.rows(result)}


def guide_cell(row: ref.Row | None) -> str:
    if row is None or row.reference is None:
        return "—"
    return fmt(row.reference) if not isinstance(row.reference, bool) else "found"


def verdict_cell(row: ref.Row | None) -> str:
    return row.verdict if row else "—"


def skipped(section: dict | None) -> str | None:
    if not isinstance(section, dict):
        return "not measured"
    if "skipped" in section:
        return f"Skipped: {section['skipped']}"
    if "error" in section:
        return f"FAILED: {section['error']}"
    return None


def service_section(host: str, result: dict, plots: dict[str, str]) -> list[str]:
    s, h, llama = result["service"], result.get("host", {}), result.get("llama_cpp", {})
    rows = row_map(result)
    gpus = ", ".join(f"{g['name']} ({g['memory_total_mib'] / 1024:.0f} GiB)" for g in h.get("gpus", []))
    out = [f"## {host} / {s['name']}", "",
           f"- Model `{s['model_file']}` ({fmt((s.get('model_bytes') or 0) / 1e9, 2)} GB), "
           f"-ngl {s['gpu_layers']}, K/V {s['cache_type_k']}/{s['cache_type_v']}, "
           f"flash attention {s.get('flash_attn') or '—'}, {s.get('parallel')} slots of "
           f"{s.get('per_slot_ctx')} tokens (ctx {s.get('ctx_size')}), reasoning {s.get('reasoning')}",
           f"- Host: {h.get('cpus')} CPUs ({h.get('cpu') or 'unknown CPU'}), "
           f"{fmt((h.get('memory_mib') or 0) / 1024, 0)} GiB RAM, GPUs: {gpus or 'none'}; "
           f"load average at start {h.get('loadavg_start')}, at end {h.get('loadavg_end')}",
           f"- llama.cpp {str(llama.get('commit'))[:12]} ({s.get('build_info') or 'build info unknown'}), "
           f"`{llama.get('bench')}`",
           f"- Compared with: {ref.profile_name(result)}",
           f"- Started {result.get('started')}, {result.get('seconds')} s; the service at "
           f"{s.get('base_url')} (its own address, from the host itself)", ""]

    out += ["### Decode vs parallel requests", ""]
    why = skipped(result.get("decode"))
    if why:
        out += [why, ""]
    else:
        body = []
        for level in result["decode"]["levels"]:
            n = level["parallel"]
            per = rows.get(f"decode:per request at {n} parallel")
            agg = rows.get(f"decode:aggregate at {n} parallel")
            verdicts = {per.verdict, agg.verdict}
            verdict = ref.BELOW if ref.BELOW in verdicts else (ref.PASS if ref.PASS in verdicts
                                                               else ref.NO_REFERENCE)
            guide = f"{guide_cell(per)} / {guide_cell(agg)}" if per.reference else "—"
            body.append([n, level["per_request_tok_s"], level["aggregate_tok_s"], guide, verdict,
                         per.note or ""])
        out += table(["Parallel", "Per request tok/s", "Aggregate tok/s", "Guide (per req / agg)",
                      "Verdict", "Note"], body)
        out += [f"{result['decode']['tokens_per_request']} tokens per request; "
                f"{result['decode']['method']}.", ""]

    out += ["### Latency and prompt processing", ""]
    body = []
    ttft, prompt = result.get("ttft") or {}, result.get("prompt") or {}
    body.append(["time to first token (streamed)", fmt(ttft.get("ms"), 0) + " ms",
                 skipped(ttft) or f"median of {len(ttft.get('samples_ms', []))}"])
    body.append(["prompt processing", fmt(prompt.get("tok_s")) + " tok/s",
                 skipped(prompt) or f"{prompt.get('prompt_tokens')}-token prompt, server timings"])
    out += table(["Measure", "Value", "How"], body)

    out += ["### Engine ceiling (llama-bench)", ""]
    engine = result.get("engine") or {}
    why = skipped(engine)
    if why:
        out += [why, ""]
    else:
        decode1 = next((lv["per_request_tok_s"] for lv in (result.get("decode") or {}).get("levels", [])
                        if lv["parallel"] == 1), None)
        ratio = decode1 / engine["tg128_tok_s"] if decode1 and engine.get("tg128_tok_s") else None
        paired = engine.get("paired") or {}
        out += table(["K/V", "pp512 tok/s", "tg128 tok/s", "Decode at 1 / tg128 (separate steps)",
                      "Served / tg128, alternated"],
                     [[f"{engine['k']}/{engine['v']}", engine.get("pp512_tok_s"),
                       engine.get("tg128_tok_s"), fmt(ratio, 2),
                       fmt(paired.get("served_over_tg128"), 3) if "pairs" in paired
                       else "—"]])
        out += [f"`{' '.join(engine.get('argv', []))}`", ""]
        if "pairs" in paired:
            low, high = (f(p["ratio"] for p in paired["pairs"]) for f in (min, max))
            out += [f"Served / tg128, alternated: median {paired['served_over_tg128']:.3f} "
                    f"(range {low:.3f}-{high:.3f}) over {paired['method']}. Below 1 means "
                    f"llama-bench is the ceiling; the separate-steps ratio also carries the "
                    f"machine's drift between the two steps.", ""]
        elif skipped(paired):
            out += [f"Served / tg128, alternated: {skipped(paired)}", ""]

    out += ["### Thinking on vs off (short translation)", ""]
    thinking = result.get("thinking") or {}
    why = skipped(thinking)
    if why:
        out += [why, ""]
    else:
        body = []
        for mode in ("on", "off"):
            part = thinking.get(mode) or {}
            if "skipped" in part:
                body.append([mode, "—", "—", "—", ref.SKIPPED, part["skipped"]])
                continue
            latency = rows.get(f"thinking:thinking {mode}: latency")
            body.append([mode, part.get("completion_tokens"), part.get("seconds"),
                         guide_cell(latency), verdict_cell(latency), ""])
        out += table(["Thinking", "Tokens", "Latency s", "Guide s", "Verdict", "Note"], body)

    out += ["### Long context (needle)", ""]
    needle = result.get("needle") or {}
    why = skipped(needle)
    if why:
        out += [why, ""]
    else:
        body = []
        for point in needle["points"]:
            if "skipped" in point:
                body.append([point["target_tokens"], "—", "—", "—", "—", "—", "—", point["skipped"]])
                continue
            tokens = point["prompt_tokens"]
            found = rows.get(f"needle:needle found at {tokens} tokens")
            prefill = rows.get(f"needle:prefill of {tokens} tokens")
            verdicts = {found.verdict, prefill.verdict}
            verdict = ref.BELOW if ref.BELOW in verdicts else (ref.PASS if ref.PASS in verdicts
                                                               else ref.NO_REFERENCE)
            body.append([tokens, point["prefill_s"], fmt(point.get("gpu_mem_growth_mib")),
                         fmt(point.get("rss_growth_mib")), "found" if point["found"] else "NOT found",
                         guide_cell(prefill), verdict, prefill.note or ""])
        out += table(["Context tokens", "Prefill s", "GPU mem +MiB", "RSS +MiB", "Needle",
                      "Guide prefill s", "Verdict", "Note"], body)
        out += [f"Needle at depth {needle['depth']:.0%} of a list of \"The secret code of X is "
                f"NNNNNN.\" lines, asked as a completion; per-slot context {needle['per_slot_ctx']}; "
                f"memory from {needle.get('memory_source')}.", ""]

    out += ["### Start-up", ""]
    startup = result.get("startup") or {}
    why = skipped(startup)
    if why:
        out += [why, ""]
    else:
        row = rows.get("startup:restart to /health 200")
        out += table(["Measure", "Seconds", "Guide s", "Verdict"],
                     [["systemctl restart to /health 200", startup["seconds"], guide_cell(row),
                       verdict_cell(row)]])

    out += ["### K/V cache sweep (llama-bench)", ""]
    sweep = result.get("kv_sweep") or {}
    why = skipped(sweep)
    if why:
        out += [why, ""]
    else:
        body = []
        for pair in sweep["pairs"]:
            label = f"{pair['k']}/{pair['v']}"
            if "skipped" in pair or "error" in pair:
                body.append([label, "—", "—", "—", ref.SKIPPED, pair.get("skipped") or pair.get("error")])
                continue
            row = rows.get(f"kv-sweep:tg128 with K/V {label}")
            body.append([label, pair.get("pp512_tok_s"), pair.get("tg128_tok_s"), guide_cell(row),
                         verdict_cell(row), row.note if row else ""])
        out += table(["K/V", "pp512 tok/s", "tg128 tok/s", "Guide tok/s", "Verdict", "Note"], body)

    if result.get("errors"):
        out += ["### Failed steps", ""] + [f"- {e['step']}: {e['error']}" for e in result["errors"]] + [""]
    return out


def fleet_summary(fleet: dict) -> list[str]:
    body = []
    for host, result in services(fleet):
        s = result["service"]
        levels = {lv["parallel"]: lv for lv in (result.get("decode") or {}).get("levels", [])}
        top = max(levels) if levels else None
        points = [p for p in (result.get("needle") or {}).get("points", []) if "found" in p]
        found = [p["prompt_tokens"] for p in points if p["found"]]
        gpus = ", ".join(g["name"] for g in result.get("host", {}).get("gpus", [])
                         if s.get("gpus") is None or g["index"] in s["gpus"]) if s["gpu_layers"] else "CPU"
        c = ref.counts(ref.rows(result))
        body.append([host, s["name"], gpus or "CPU", f"`{s['model_file']}`",
                     f"{s['cache_type_k']}/{s['cache_type_v']}",
                     (levels.get(1) or {}).get("per_request_tok_s"),
                     f"{fmt((levels.get(top) or {}).get('aggregate_tok_s'))} @{top}" if top else "—",
                     (result.get("engine") or {}).get("tg128_tok_s"),
                     fmt((result.get("ttft") or {}).get("ms"), 0),
                     (result.get("prompt") or {}).get("tok_s"),
                     f"{len(found)} of {len(points)} sizes, largest {max(found)}" if found else
                     ("none" if points else "—"),
                     (result.get("startup") or {}).get("seconds"),
                     c[ref.PASS], c[ref.BELOW], c[ref.NO_REFERENCE]])
    for host, entry in fleet.items():
        if entry.get("error"):
            body.append([host, "—", "—", "—", "—", "—", "—", "—", "—", "—", "—", "—", "—", "—",
                         f"FAILED: {entry['error']}"])
    return table(["Host", "Service", "GPU", "Model", "K/V", "Decode@1 tok/s", "Aggregate tok/s",
                  "tg128 tok/s", "TTFT ms", "Prompt tok/s", "Needle found", "Start s",
                  "PASS", "BELOW", "NO-REF"], body)


def render(fleet: dict, *, command: str, started: str, plots: dict[str, str], plot_note: str) -> str:
    out = ["# llmhost bench report", "",
           f"- Run {started}: `{command}`",
           f"- Reference: the guide's tables ({ref.SOURCE}) for the hardware and models it measured "
           f"(an RTX 5090 with its models); a row PASSes at {ref.TOLERANCE:.0%} of a guide "
           f"throughput or within 1/{ref.TOLERANCE} of a guide time. Other GPUs and models: "
           "figures only (NO-REFERENCE). SKIPPED: not measured in this run.",
           "- Each service was measured on its own host against its own address "
           "(files/bench_service.py); decode figures are the server's own `timings`.", "",
           "## Fleet summary", ""]
    out += fleet_summary(fleet)
    if plots:
        out += ["## Plots", ""] + [f"![{name}]({path})" for name, path in plots.items()] + [""]
    out += [plot_note, ""] if plot_note else []
    for host, result in services(fleet):
        out += service_section(host, result, plots)
    for host, entry in fleet.items():
        if entry.get("gateway"):
            out += gateway_section(host, entry["gateway"], fleet)
    return "\n".join(out).rstrip() + "\n"


def gateway_section(host: str, result: dict, fleet: dict) -> list[str]:
    """Decode through the gateway, beside each of its servers' own aggregate from this run."""
    out = [f"## Through the gateway {host}", "",
           f"Measured on the gateway host against {result['url']} with client "
           f"{result['client']}'s key; {result['decode_tokens']} tokens per request; aggregate = "
           "tokens generated / wall time of each batch (median of rounds), per request = the "
           "servers' own timings.", ""]
    own = {f"{h}-{r['service']['name']}": max((lv["aggregate_tok_s"] for lv in
                                              (r.get("decode") or {}).get("levels", [])), default=None)
           for h, r in services(fleet)}
    for model in result["models"]:
        out += [f"### {model['model']} ({len(model['servers'])} servers, {model['slots']} slots)", ""]
        out += table(["Parallel", "Aggregate tok/s", "Per request tok/s"],
                     [[lv["parallel"], fmt(lv["aggregate_tok_s"]), fmt(lv["per_request_tok_s"])]
                      for lv in model["levels"]])
        figures = [own.get(server) for server in model["servers"]]
        if any(f is not None for f in figures):
            out += ["Each server's own best aggregate in this run (on its host, its own address): " +
                    ", ".join(f"{server} {fmt(f)}" for server, f in zip(model["servers"], figures)) +
                    f"; sum {fmt(sum(f for f in figures if f is not None))} tok/s.", ""]
        else:
            out += ["Its servers were not measured on their hosts in this run (add them to --limit "
                    "to see their own aggregate beside this).", ""]
    return out


def make_plots(fleet: dict, directory: Path) -> tuple[dict[str, str], str]:
    """PNG plots; returns ({name: file name}, a note for the report)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}, ("Plots skipped: matplotlib is not installed on the controller "
                    "(`pip install 'llmhost[bench]'`).")
    made: dict[str, str] = {}
    entries = services(fleet)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = False
    for host, result in entries:
        levels = (result.get("decode") or {}).get("levels") or []
        if not levels:
            continue
        xs = [lv["parallel"] for lv in levels]
        label = f"{host}/{result['service']['name']}"
        line, = ax.plot(xs, [lv["aggregate_tok_s"] for lv in levels], "o-", label=f"{label} aggregate")
        ax.plot(xs, [lv["per_request_tok_s"] for lv in levels], "s--", color=line.get_color(),
                label=f"{label} per request")
        drawn = True
        if ref.is_guide_main(result):
            gx = sorted(ref.GUIDE_CONCURRENCY)
            ax.plot(gx, [ref.GUIDE_CONCURRENCY[n][1] for n in gx], "k^:", label="guide aggregate")
            ax.plot(gx, [ref.GUIDE_CONCURRENCY[n][0] for n in gx], "kv:", label="guide per request")
    if drawn:
        ax.set_xlabel("parallel requests")
        ax.set_ylabel("decode tok/s")
        ax.set_title("Decode throughput vs parallel requests")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(directory / PLOTS["throughput"], dpi=110)
        made["throughput"] = PLOTS["throughput"]
    plt.close(fig)

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    drawn = False
    memory_label = "memory growth MiB"
    for host, result in entries:
        points = [p for p in (result.get("needle") or {}).get("points", []) if "prefill_s" in p]
        if not points:
            continue
        label = f"{host}/{result['service']['name']}"
        xs = [p["prompt_tokens"] for p in points]
        line, = left.plot(xs, [p["prefill_s"] for p in points], "o-", label=label)
        missed = [p for p in points if not p["found"]]
        if missed:
            left.plot([p["prompt_tokens"] for p in missed], [p["prefill_s"] for p in missed], "rx",
                      markersize=10, label=f"{label} needle NOT found")
        gpu = [p.get("gpu_mem_growth_mib") for p in points]
        if all(v is not None for v in gpu):
            right.plot(xs, gpu, "o-", color=line.get_color(), label=f"{label} GPU (nvidia-smi)")
        else:
            right.plot(xs, [p.get("rss_growth_mib") or 0 for p in points], "s--",
                       color=line.get_color(), label=f"{label} RSS (no GPU)")
        drawn = True
        if ref.is_guide_main(result):
            gx = sorted(ref.GUIDE_PREFILL)
            left.plot(gx, [ref.GUIDE_PREFILL[x] for x in gx], "k^:", label="guide")
    if drawn:
        left.set_xlabel("context tokens")
        left.set_ylabel("prefill s")
        left.set_title("Prefill time vs context")
        right.set_xlabel("context tokens")
        right.set_ylabel(memory_label)
        right.set_title("Memory growth during the request")
        for ax in (left, right):
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(directory / PLOTS["context"], dpi=110)
        made["context"] = PLOTS["context"]
    plt.close(fig)
    return made, ""

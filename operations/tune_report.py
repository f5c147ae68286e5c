"""llmhost-tune's report: what each service's search measured, as tables (and PNG plots when
matplotlib is installed, as the bench's), with llama-server's defaults, the current flags and the
chosen profile side by side from the same run."""

from __future__ import annotations

import json
from pathlib import Path


def _f(value, digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
            *["| " + " | ".join(map(str, r)) + " |" for r in rows], ""]


def service_section(host: str, name: str, r: dict, plots: dict[str, str]) -> list[str]:
    c = r["constraints"]
    out = [f"## {host} / {name} ({'GPU' if r['on_gpu'] else 'CPU'})", "",
           f"Goal **{r['goal']}** (min {c['min_tok_s']:g} tok/s per request, {c['min_ctx']} tokens "
           f"of context per slot, slots {c['slots']}"
           + (f", GPU memory budget {c['memory_budget_mib']} MiB" if c.get("memory_budget_mib") else "")
           + (" held by the ballast" if c.get("ballast") else "") + "). "
           f"Time budget {r['budget_s']:.0f} s, used {r['seconds']:.0f} s. "
           f"Build `{r['build']['commit'][:12]}`, model `{Path(r['model']['path']).name}`.", ""]
    if r.get("stopped_early"):
        out += [f"Stopped early: {r['stopped_early']}.", ""]
    for e in r.get("errors") or ():
        out += [f"FAILED ({e['step']}): {e['error']}", ""]
    proposal = r.get("proposal")
    if proposal:
        verdict = "keeps the current flags" if proposal["keep_current"] else "proposes new flags"
        out += [f"**The profile {verdict}**: {proposal['reason']}.", ""]
        chosen = r["chosen"]
        out += [f"Why these slots: {chosen['reason']}.", ""]
        rows = [[f"`{k}`", r["current"].get(k) if r["current"].get(k) is not None else "unset",
                 chosen["flags"].get(k), f"**{v}**", chosen["notes"].get(k, "")]
                for k, v in proposal["settings"].items()]
        out += ["### The profile", ""] + _table(["setting", "current", "chosen by the search",
                                                  "profile", "measured"], rows)
    comparison = r.get("comparison")
    if comparison:
        out += [f"### Side by side (alternated, {comparison['method']})", ""]
        rows = []
        for label, row in comparison["rows"].items():
            rows.append([label, _f(row.get("decode_1_tok_s")), _f(row.get("per_request_min_tok_s")),
                         _f(row.get("aggregate_tok_s")), _f(row.get("start_s")),
                         _f(row.get("memory_mib"), 0), len(row.get("rounds") or ()),
                         row.get("error", "") or "", "`" + " ".join(row.get("argv", [])[:40])[:160] + "`"])
        out += _table(["flags", "1 request tok/s", f"slowest of {comparison['load']} tok/s",
                       f"aggregate of {comparison['load']} tok/s", "start s", "memory MiB",
                       "rounds", "error", "argv"], rows)
    stages = r.get("stages") or {}
    if stages.get("threads"):
        out += ["### Threads (1 request)", ""] + _table(
            ["threads", "tok/s", "error"],
            [[t["threads"], _f(t.get("decode_1_tok_s")), t.get("error", "")] for t in stages["threads"]])
    if stages.get("batch"):
        out += ["### Batch / ubatch (prompt rate)", ""] + _table(
            ["batch", "ubatch", "prompt tok/s", "memory MiB", "error"],
            [[b["batch_size"], b["ubatch_size"], _f(b.get("prompt_tok_s"), 0),
              _f(b.get("memory_mib"), 0), b.get("error", "")] for b in stages["batch"]])
    if stages.get("slots"):
        out += ["### Decode and aggregate vs slots (N requests at once on N slots)", ""] + _table(
            ["slots", "context each", "1 request tok/s", "slowest request tok/s",
             "aggregate tok/s", "memory MiB", "error"],
            [[s["slots"], s["per_slot_ctx"], _f(s.get("decode_1_tok_s")),
              _f(s.get("per_request_min_tok_s")), _f(s.get("aggregate_tok_s")),
              _f(s.get("memory_mib"), 0), s.get("error", "")] for s in stages["slots"]])
        if "slots" in plots:
            out += [f"![decode vs slots]({plots['slots']})", ""]
    if stages.get("kv") or stages.get("kv_rebuild"):
        out += ["### K/V pairs (1 request; context with every layer on the GPU)", ""]
        out += _table(["K/V", "1 request tok/s", "largest context that started"],
                      [[f"{k['k']}/{k['v']}", _f(k.get("decode_1_tok_s")), k.get("max_ctx")]
                       for k in stages.get("kv") or ()])
        out += [f"- {line}" for line in stages.get("kv_rebuild") or ()] + [""]
        points = [[f"{k['k']}/{k['v']}", p["ctx"], "yes" if p["fits"] else "no",
                   _f(p.get("memory_mib"), 0), (p.get("error") or "")[:120]]
                  for k in stages.get("kv") or () for p in k["points"]]
        out += ["### Context vs memory (each a server started)", ""] + _table(
            ["K/V", "total context", "fits", "GPU MiB", "error"], points)
        if "context" in plots:
            out += [f"![context vs memory]({plots['context']})", ""]
    if stages.get("offload"):
        out += ["### Offload (the model does not fit with every layer on the GPU)", ""] + _table(
            ["option", "value", "fits", "1 request tok/s", "GPU MiB"],
            [[o["option"], o["value"], "yes" if o.get("fits", True) else "no",
              _f(o.get("decode_1_tok_s")), _f(o.get("memory_mib"), 0)] for o in stages["offload"]])
    return out


def make_plots(directory: Path, host: str, results: dict) -> tuple[dict, str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}, "Plots skipped: matplotlib is not installed (`pip install 'llmhost[bench]'`)."
    plots: dict = {}
    for name, r in results.items():
        made = {}
        slots = [s for s in (r.get("stages") or {}).get("slots") or () if s.get("aggregate_tok_s")]
        if slots:
            fig, ax = plt.subplots(figsize=(6, 4))
            xs = [s["slots"] for s in slots]
            ax.plot(xs, [s["aggregate_tok_s"] for s in slots], "o-", label="aggregate")
            ax.plot(xs, [s["per_request_min_tok_s"] for s in slots], "s--", label="slowest request")
            ax.axhline(r["constraints"]["min_tok_s"], color="grey", lw=0.8, label="min per request")
            ax.set_xlabel("slots (= requests at once)")
            ax.set_ylabel("tok/s")
            ax.set_title(f"{host}/{name}: decode vs slots")
            ax.legend()
            fig.tight_layout()
            made["slots"] = f"{name}-slots.png"
            fig.savefig(directory / made["slots"], dpi=100)
            plt.close(fig)
        kv = (r.get("stages") or {}).get("kv") or ()
        if any(p.get("memory_mib") for k in kv for p in k["points"]):
            fig, ax = plt.subplots(figsize=(6, 4))
            for k in kv:
                pts = [(p["ctx"], p["memory_mib"]) for p in k["points"] if p["fits"] and p.get("memory_mib")]
                if pts:
                    ax.plot(*zip(*sorted(pts)), "o-", label=f"{k['k']}/{k['v']}")
            ax.set_xlabel("total context (tokens)")
            ax.set_ylabel("GPU MiB")
            ax.set_title(f"{host}/{name}: context vs memory")
            ax.legend()
            fig.tight_layout()
            made["context"] = f"{name}-context.png"
            fig.savefig(directory / made["context"], dpi=100)
            plt.close(fig)
        plots[name] = made
    return plots, ""


def write(directory: Path, host: str, results: dict, command: str, profile: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, r in results.items():
        (directory / f"{name}.json").write_text(json.dumps(r, indent=1) + "\n")
    plots, note = make_plots(directory, host, results)
    lines = [f"# llmhost-tune: {host}", "", f"Command: `{command}`", "",
             f"Profile written: `{profile}` (keep it by committing it, discard it by deleting it).",
             "", "How to read it: *1 request* is one request alone (latency); *slowest* and "
             "*aggregate* are N requests at once on the flags' slots (throughput); every figure is "
             "the median of alternated rounds, from llama-server's own timings.", ""]
    if note:
        lines += [note, ""]
    for name, r in results.items():
        lines += service_section(host, name, r, plots.get(name, {}))
    path = directory / "report.md"
    path.write_text("\n".join(lines))
    return path

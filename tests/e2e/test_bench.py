"""The acceptance bench against a converged sandbox host: `python -m llmhost.bench` over the
same kind of inventory the deploy used, the CPU service with gemma-3-270m, small contexts
(ctx 4096, 4 slots of 1024, so 4 parallel requests really run together) and bounded token
counts, then the report is checked.

    LLMHOST_BENCH_OUT=benchmarks/cpu-sandbox python3 -m pytest tests/e2e/test_bench.py
keeps the report, JSON and plots in that folder (how benchmarks/cpu-sandbox/ was made).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from llmhost import bench_reference, settings
from tests.support import cache, deployment, sandbox
from tests.support.deployment import REPO, run_deploy

pytestmark = pytest.mark.e2e

HOST = "benchsvc"
BENCH_ARGS = ("--decode-tokens", "64", "--rounds", "2", "--bench-repetitions", "2",
              "--restart", "--kv-sweep", "--time-budget", "900")
HEADINGS = ("## Fleet summary", "### Decode vs parallel requests", "### Latency and prompt processing",
            "### Engine ceiling (llama-bench)", "### Thinking on vs off", "### Long context (needle)",
            "### Start-up", "### K/V cache sweep (llama-bench)")
# Served decode over llama-bench tg128, alternated (the bench's --ceiling-pairs). The server does
# the same per-token work plus sampling and HTTP, so the ratio sits just under 1: on this 2-core VM
# 10 pairs gave a median of 0.991 (range 0.848-1.029) and three 5-pair runs 0.923, 0.953 and 1.022
# (2026-11-24). The bound leaves room for that noise and still catches a mismatched engine run:
# llama-bench on 1 thread beside a 2-thread server gave a median of 1.27.
# (Across separate steps the ratio is no ceiling check: this VM drifts by +-15% over tens of
# seconds, and served 81.0 vs tg128 66.7 tok/s came out once.)
CEILING_NOISE = 1.10
# llmhost-tune on the translator: 2 cores, 1024 tokens a slot, every request >= 10 tok/s (one
# request alone decodes ~64 tok/s here), a few minutes at most.
TUNE = {"goal": "throughput", "min_tok_s": 10, "slots": [1, 2, 4], "time_budget_s": 150}
TUNE_ARGS = ("--tokens", "32")


def matplotlib_installed() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    """One sandbox host, deployed once, for the bench and the tuner (which runs after it)."""
    missing = deployment.require_tools()
    if missing:
        pytest.fail(f"e2e needs {', '.join(missing)} (bash .ci/setup installs them)")
    repo, model = cache.llamacpp_repo(), cache.gemma_model()
    workdir = tmp_path_factory.mktemp("bench")
    with deployment.booted(HOST) as host, \
            deployment.git_daemon(repo) as git_url:
        port = sandbox.free_port()
        inventory = deployment.write_inventory(workdir / "inventory.py", {
            HOST: (host, {"llm_llamacpp_git_url": git_url, "llm_tuned_dir": str(workdir / "tuned"),
                          "llm_services": {"translate": deployment.service_settings(
                              port, model, ctx_size=4096, parallel=4, tune=TUNE)}}),
        })
        deployed = run_deploy(inventory)
        assert deployed.returncode == 0, deployed.output[-8000:]
        yield {"host": host, "inventory": inventory, "port": port, "workdir": workdir}


@pytest.fixture(scope="module")
def benched(deployed):
    """The deployed host benchmarked once by the real CLI."""
    host, port = deployed["host"], deployed["port"]
    out = Path(os.environ.get("LLMHOST_BENCH_OUT") or deployed["workdir"] / "results").resolve()
    key = deployment.ssh(host, "cat /etc/llama/keys/translate.key").stdout.strip()
    command = [sys.executable, "-m", "llmhost.bench", str(deployed["inventory"]), "--limit", HOST,
               "--out", str(out), *BENCH_ARGS]
    bench = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1500)
    health = deployment.ssh(host, f"python3 -c \"import urllib.request; print(urllib.request."
                                  f"urlopen('http://127.0.0.1:{port}/health').status)\"",
                            check=False).stdout.strip()
    output = bench.stdout + bench.stderr
    assert bench.returncode == 0, output[-8000:]
    yield {"out": out, "output": output, "key": key, "health_after": health,
           "result": json.loads((out / f"{HOST}.json").read_text())["services"][0],
           "report": (out / "report.md").read_text()}


def test_every_table_is_in_the_report(benched):
    report = benched["report"]
    for heading in HEADINGS:
        assert heading in report, heading
    assert f"| {HOST} | translate | CPU | `gemma-3-270m-q4_k_m.gguf` |" in report
    # No reference for this CPU and model in the guide: figures only, never a verdict.
    verdicts = {row.verdict for row in bench_reference.rows(benched["result"])}
    assert verdicts == {bench_reference.NO_REFERENCE}, verdicts
    assert not re.search(r"\| (PASS|BELOW) \|[^\n]*\d", report)
    assert "FAILED" not in report, report


def test_decode_figures_are_positive_and_consistent(benched):
    levels = {lv["parallel"]: lv for lv in benched["result"]["decode"]["levels"]}
    assert sorted(levels) == [1, 2, 4]
    for level in levels.values():
        assert level["per_request_tok_s"] > 0 and level["aggregate_tok_s"] > 0
        assert len(level["rounds"]) == 2
    assert levels[4]["aggregate_tok_s"] >= levels[1]["aggregate_tok_s"], levels
    assert not levels[4]["queued"]  # 4 slots: batched decode, not a queue


def test_llama_bench_is_the_ceiling_of_the_served_decode(benched):
    engine = benched["result"]["engine"]
    assert engine["pp512_tok_s"] > 0 and engine["tg128_tok_s"] > 0
    assert engine["k"] == "q4_0" and engine["v"] == "q8_0" and "-fa" in engine["argv"]
    paired = engine["paired"]
    assert len(paired["pairs"]) == 5, paired
    assert all(p["served_tok_s"] > 0 and p["tg128_tok_s"] > 0 for p in paired["pairs"])
    assert paired["served_over_tg128"] <= CEILING_NOISE, paired
    assert f"alternated: median {paired['served_over_tg128']:.3f}" in benched["report"]


def test_latency_prompt_and_startup_are_measured(benched):
    result = benched["result"]
    assert result["ttft"]["ms"] > 0 and result["prompt"]["tok_s"] > 0
    assert result["prompt"]["prompt_tokens"] >= 256
    assert 0 < result["startup"]["seconds"] < 120
    assert benched["health_after"] == "200"  # the restart left the service serving


def test_thinking_is_skipped_with_its_reason(benched):
    assert "no thinking" in benched["result"]["thinking"]["skipped"]
    assert "no thinking" in benched["report"]


def test_needle_is_found_at_the_smallest_context(benched):
    needle = benched["result"]["needle"]
    points = needle["points"]
    assert needle["per_slot_ctx"] == 1024 and len(points) >= 3
    assert points[0]["found"], points[0]
    assert all(p["prompt_tokens"] <= 1024 and p["prefill_s"] > 0 for p in points)
    assert [p["prompt_tokens"] for p in points] == sorted(p["prompt_tokens"] for p in points)


def test_kv_sweep_covers_the_guides_pairs_on_a_cpu_build(benched):
    pairs = benched["result"]["kv_sweep"]["pairs"]
    assert [(p["k"], p["v"]) for p in pairs] == [("f16", "f16"), ("q4_0", "q8_0"), ("q4_0", "q4_0"),
                                                ("q5_0", "q5_0"), ("iq4_nl", "iq4_nl")]
    assert all(p["tg128_tok_s"] > 0 and p["pp512_tok_s"] > 0 for p in pairs), pairs


def test_plots_are_written(benched):
    out = benched["out"]
    if not matplotlib_installed():
        assert "matplotlib is not installed" in benched["report"]
        pytest.skip("matplotlib is not installed: the report says the plots were skipped")
    for name in ("throughput.png", "context.png"):
        path = out / name
        assert path.exists() and path.stat().st_size > 5000, name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({name})" in benched["report"]


def test_progress_is_printed_and_the_key_never_is(benched):
    output = benched["output"]
    for step in ("decode:", "ttft:", "prompt:", "engine:", "needle:", "startup:", "kv-sweep:"):
        assert f"[{HOST}] bench: {step}" in output, step
    assert benched["key"] and benched["key"] not in output
    assert benched["key"] not in (benched["out"] / f"{HOST}.json").read_text()


# -- llmhost-tune on the same host, after the bench ----------------------------------------------

def tune(deployed) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmhost.tune", str(deployed["inventory"]),
                           "--limit", HOST, *TUNE_ARGS], cwd=REPO, capture_output=True, text=True,
                          timeout=TUNE["time_budget_s"] + 300)


def test_tune_writes_a_profile_the_deploy_applies_and_verify_checks(deployed):
    """llmhost-tune end to end on the CPU translator: the search (threads, batch, slots) within
    its stated budget, the profile and its report, the deploy applying it, verify passing on
    it, and a second tune with nothing changed proposing the same settings or saying why not."""
    first = tune(deployed)
    output = first.stdout + first.stderr
    print("\n".join(l for l in output.splitlines() if "proposal" in l or "[benchsvc]" in l))
    assert first.returncode == 0, output[-8000:]
    assert f"time budget {TUNE['time_budget_s']} s" in output
    profile = deployed["workdir"] / "tuned" / f"{HOST}.py"
    text = profile.read_text()
    entry = settings.load_host_settings(HOST, {**json_data(deployed), "llm_tuned_dir": str(
        profile.parent)}).services[0].tuned
    values = dict(entry.settings)
    assert {"parallel", "ctx_size"} <= set(values), text
    assert "# " in text.split("'parallel'")[1].splitlines()[0], text  # its measurement beside it
    report = next((deployed["workdir"] / "tuned" / "reports").glob(f"{HOST}-*/report.md")).read_text()
    for heading in ("### The profile", "### Side by side", "### Threads (1 request)",
                    "### Batch / ubatch", "### Decode and aggregate vs slots"):
        assert heading in report, heading
    for label in ("| chosen |", "| current |", "| defaults |"):
        assert label in report, label
    result = json.loads(next((deployed["workdir"] / "tuned" / "reports").glob(
        f"{HOST}-*/translate.json")).read_text())
    # Kept: a request under way at the end may run a few seconds past it (its GRACE_S).
    assert result["seconds"] <= TUNE["time_budget_s"] + 10, result["seconds"]
    assert result["comparison"]["rows"]["chosen"]["rounds"], result["comparison"]

    redeploy = run_deploy(deployed["inventory"])
    assert redeploy.returncode == 0, redeploy.output[-8000:]
    argv = deployment.ssh(deployed["host"], "tr '\\0' ' ' < /proc/$(systemctl show -p MainPID "
                                            "--value llama-translate)/cmdline").stdout
    assert f"--parallel {values['parallel']} " in argv and f"--ctx-size {values['ctx_size']} " in argv
    verified = subprocess.run([sys.executable, "-m", "llmhost.verify", str(deployed["inventory"]),
                               "--limit", HOST], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert verified.returncode == 0, verified.stdout[-6000:]
    assert "test_running_service_matches_its_tuned_profile" not in verified.stdout.split(
        "per-host summary")[-1]  # neither failed nor skipped: it ran and passed

    second = tune(deployed)
    again = second.stdout + second.stderr
    print("\n".join(l for l in again.splitlines() if "proposal" in l or "[benchsvc]" in l))
    assert second.returncode == 0, again[-8000:]
    after = dict(settings.load_host_settings(HOST, {**json_data(deployed), "llm_tuned_dir": str(
        profile.parent)}).services[0].tuned.settings)
    if after == values:
        assert "the same settings as its profile" in again, again[-3000:]
    else:  # a real improvement beyond the margin: said, with the figure
        assert "more than the" in again or "leave a request under" in again, again[-3000:]


def json_data(deployed) -> dict:
    """The inventory's host data, as the deploy reads it."""
    from llmhost.inventory import load_inventory
    return load_inventory(deployed["inventory"], [HOST])[0].data

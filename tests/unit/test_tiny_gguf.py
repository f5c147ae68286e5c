"""files/tiny_gguf.py: the CPU self-test's model parses as GGUF (read here from the format's
specification, not with the writer's code): header, metadata, tensor infos, alignment, sizes,
and weights whose block scales are small finite fp16."""

from __future__ import annotations

import math
import struct
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "files"))
import tiny_gguf  # noqa: E402

# ggml type id -> (name, elements per block, bytes per block), from ggml.c's type_traits.
TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 8: ("Q8_0", 32, 34),
         12: ("Q4_K", 256, 144), 14: ("Q6_K", 256, 210)}
# Where each block type keeps its fp16 scales (ggml-common.h block_*).
SCALE_OFFSETS = {"Q4_0": (0,), "Q8_0": (0,), "Q4_K": (0, 2), "Q6_K": (208,)}


class Reader:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def take(self, fmt: str):
        values = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return values[0] if len(values) == 1 else values

    def string(self) -> str:
        n = self.take("Q")
        text = self.data[self.pos:self.pos + n].decode()
        self.pos += n
        return text

    def value(self, kind: int):
        scalar = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q",
                  11: "q", 12: "d"}
        if kind == 8:
            return self.string()
        if kind == 9:
            item_kind, n = self.take("I"), self.take("Q")
            return [self.value(item_kind) for _ in range(n)]
        return self.take(scalar[kind])


def parse(path: Path) -> dict:
    data = path.read_bytes()
    r = Reader(data)
    assert data[:4] == b"GGUF"
    r.pos = 4
    version, n_tensors, n_kv = r.take("I"), r.take("Q"), r.take("Q")
    kv = {}
    for _ in range(n_kv):
        key = r.string()
        kv[key] = r.value(r.take("I"))
    tensors = []
    for _ in range(n_tensors):
        name = r.string()
        dims = [r.take("Q") for _ in range(r.take("I"))]
        kind, offset = r.take("I"), r.take("Q")
        tensors.append({"name": name, "dims": dims, "type": TYPES[kind][0], "offset": offset})
    alignment = kv.get("general.alignment", 32)
    start = r.pos + (-r.pos % alignment)
    return {"version": version, "kv": kv, "tensors": tensors, "data_start": start,
            "alignment": alignment, "data": data}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    size = tiny_gguf.write(str(path))
    assert size == path.stat().st_size
    return parse(path)


def nbytes(tensor) -> int:
    _, per_block, block_bytes = next(t for t in TYPES.values() if t[0] == tensor["type"])
    n = math.prod(tensor["dims"])
    assert n % per_block == 0, tensor
    return n // per_block * block_bytes


def test_header_and_the_llama_metadata_llama_cpp_reads(model):
    kv = model["kv"]
    assert model["version"] == 3
    assert kv["general.architecture"] == "llama"
    n_embd, n_ff = kv["llama.embedding_length"], kv["llama.feed_forward_length"]
    assert n_embd % 256 == 0 and n_ff % 256 == 0
    assert n_embd % kv["llama.attention.head_count"] == 0
    assert kv["llama.block_count"] == 2 and kv["llama.vocab_size"] == 512


def test_the_vocabulary_is_a_sentencepiece_one_with_byte_tokens(model):
    kv = model["kv"]
    tokens = kv["tokenizer.ggml.tokens"]
    assert kv["tokenizer.ggml.model"] == "llama"
    assert len(tokens) == len(set(tokens)) == kv["llama.vocab_size"]
    assert len(kv["tokenizer.ggml.scores"]) == len(kv["tokenizer.ggml.token_type"]) == len(tokens)
    # llama.cpp looks the newline's byte token up when it loads an SPM vocabulary.
    assert "<0x0A>" in tokens and tokens[:3] == ["<unk>", "<s>", "</s>"]


def test_tensors_are_aligned_back_to_back_and_fill_the_file(model):
    offset = 0
    for tensor in model["tensors"]:
        assert tensor["offset"] == offset and offset % model["alignment"] == 0, tensor
        offset += nbytes(tensor) + (-nbytes(tensor) % model["alignment"])
    assert model["data_start"] % model["alignment"] == 0
    assert model["data_start"] + offset == len(model["data"])


def test_matrix_weights_use_the_cpu_types_of_real_models_at_multiples_of_256(model):
    weights = [t for t in model["tensors"] if len(t["dims"]) == 2]
    assert {t["type"] for t in weights} == {"Q4_0", "Q8_0", "Q4_K", "Q6_K", "F16"}
    assert all(d % 256 == 0 for t in weights for d in t["dims"]), weights
    vocab = model["kv"]["llama.vocab_size"]
    names = {t["name"]: t["dims"] for t in model["tensors"]}
    assert names["token_embd.weight"] == [model["kv"]["llama.embedding_length"], vocab]
    assert names["blk.1.ffn_down.weight"] == [model["kv"]["llama.feed_forward_length"],
                                             model["kv"]["llama.embedding_length"]]


def test_block_scales_are_small_finite_fp16_and_f16_weights_too(model):
    data, start = model["data"], model["data_start"]
    for tensor in model["tensors"]:
        base, kind = start + tensor["offset"], tensor["type"]
        if kind in SCALE_OFFSETS:
            block = next(t[2] for t in TYPES.values() if t[0] == kind)
            for i in range(nbytes(tensor) // block):
                for at in SCALE_OFFSETS[kind]:
                    scale = struct.unpack_from("<e", data, base + i * block + at)[0]
                    assert 0 < scale < 0.01, (tensor["name"], i, scale)
        elif kind == "F16":
            values = struct.unpack_from(f"<{nbytes(tensor) // 2}e", data, base)
            assert all(math.isfinite(v) and 0.01 < abs(v) < 0.05 for v in values), tensor["name"]
        else:
            values = struct.unpack_from(f"<{nbytes(tensor) // 4}f", data, base)
            assert set(values) == {1.0}, tensor["name"]


def test_the_same_seed_writes_the_same_bytes(tmp_path):
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    tiny_gguf.write(str(a)), tiny_gguf.write(str(b))
    assert a.read_bytes() == b.read_bytes()

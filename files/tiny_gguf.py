"""A tiny llama-architecture GGUF (~5 MB), written with the standard library only, for the CPU
self-test of a llama.cpp build (files/build_llamacpp.py): the pinned llama.cpp loads it and
computes with it, on the CPU code paths real models take.

Why these choices:
- Its matrix weights use the types real models use on the CPU (Q4_0, Q8_0, Q4_K, Q6_K, F16), and
  every dimension is a multiple of 256 (the K-quants' block), so ggml's repacked Q4_0/Q4_K
  kernels, its AMX and AVX-512 paths take them as they would take a real model's.
- Weights are random but valid: each block's fp16 scale is small and finite, so a forward pass
  stays finite (no NaN/inf from a random exponent).
- The vocabulary is a SentencePiece ("llama") one llama.cpp loads as it is: <unk> <s> </s>, the
  256 byte tokens (llama.cpp looks up "<0x0A>" at load) and plain pieces up to VOCAB.

    python3 tiny_gguf.py /tmp/tiny.gguf
"""

from __future__ import annotations

import os
import random
import struct
import sys

ALIGNMENT = 32  # general.alignment's default; every tensor's data starts at a multiple of it

# head_dim 128 and grouped-query attention (2 K/V heads), as in real models; K and V are
# then 256 wide.
N_EMBD, N_FF, N_HEAD, N_HEAD_KV, N_LAYER, VOCAB, N_CTX = 512, 1536, 4, 2, 2, 512, 256

# ggml types: id, elements per block, bytes per block (ggml/src/ggml.c type_traits).
F32, F16, Q4_0, Q8_0, Q4_K, Q6_K = "F32", "F16", "Q4_0", "Q8_0", "Q4_K", "Q6_K"
GGML_TYPES = {F32: (0, 1, 4), F16: (1, 1, 2), Q4_0: (2, 32, 18), Q8_0: (8, 32, 34),
              Q4_K: (12, 256, 144), Q6_K: (14, 256, 210)}

# GGUF metadata value types (gguf.h).
UINT32, INT32, FLOAT32, STRING, ARRAY = 4, 5, 6, 8, 9

# Each matrix's type, mixed the way quantized models mix them (Q4_K_M: Q4_K with Q6_K for
# ffn_down and output; Q4_0 and Q8_0 models; F16 ones). Every type appears in a mul_mat.
LAYER_TYPES = (
    {"attn_q": Q4_0, "attn_k": Q4_0, "attn_v": Q8_0, "attn_output": Q4_K,
     "ffn_gate": Q4_K, "ffn_up": Q4_K, "ffn_down": Q6_K},
    {"attn_q": F16, "attn_k": Q8_0, "attn_v": Q6_K, "attn_output": F16,
     "ffn_gate": Q4_0, "ffn_up": Q8_0, "ffn_down": Q4_K},
)
TOKEN_EMBD_TYPE, OUTPUT_TYPE = Q8_0, Q6_K


def tensors() -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape in ggml order: ne0 first, type) of every tensor, in file order."""
    head_dim = N_EMBD // N_HEAD
    out = [("token_embd.weight", (N_EMBD, VOCAB), TOKEN_EMBD_TYPE)]
    for i in range(N_LAYER):
        types = LAYER_TYPES[i % len(LAYER_TYPES)]
        shapes = {"attn_q": (N_EMBD, N_EMBD), "attn_k": (N_EMBD, N_HEAD_KV * head_dim),
                  "attn_v": (N_EMBD, N_HEAD_KV * head_dim), "attn_output": (N_EMBD, N_EMBD),
                  "ffn_gate": (N_EMBD, N_FF), "ffn_up": (N_EMBD, N_FF), "ffn_down": (N_FF, N_EMBD)}
        out.append((f"blk.{i}.attn_norm.weight", (N_EMBD,), F32))
        out += [(f"blk.{i}.{part}.weight", shapes[part], types[part])
                for part in ("attn_q", "attn_k", "attn_v", "attn_output")]
        out.append((f"blk.{i}.ffn_norm.weight", (N_EMBD,), F32))
        out += [(f"blk.{i}.{part}.weight", shapes[part], types[part])
                for part in ("ffn_gate", "ffn_up", "ffn_down")]
    out += [("output_norm.weight", (N_EMBD,), F32), ("output.weight", (N_EMBD, VOCAB), OUTPUT_TYPE)]
    return out


def vocabulary() -> tuple[list[str], list[int]]:
    """Tokens and their types (1 normal, 2 unknown, 3 control, 6 byte)."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    pieces = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    pieces += ["\u2581" + p for p in pieces] + [f"\u2581w{i}" for i in range(VOCAB)]
    tokens += pieces[:VOCAB - len(tokens)]
    types += [1] * (VOCAB - len(types))
    return tokens, types


def metadata() -> list[tuple[str, int, object]]:
    tokens, types = vocabulary()
    return [
        ("general.architecture", STRING, "llama"),
        ("general.name", STRING, "llmhost cpu self-test"),
        ("llama.context_length", UINT32, N_CTX),
        ("llama.embedding_length", UINT32, N_EMBD),
        ("llama.block_count", UINT32, N_LAYER),
        ("llama.feed_forward_length", UINT32, N_FF),
        ("llama.attention.head_count", UINT32, N_HEAD),
        ("llama.attention.head_count_kv", UINT32, N_HEAD_KV),
        ("llama.attention.layer_norm_rms_epsilon", FLOAT32, 1e-5),
        ("llama.rope.dimension_count", UINT32, N_EMBD // N_HEAD),
        ("llama.vocab_size", UINT32, VOCAB),
        ("tokenizer.ggml.model", STRING, "llama"),
        ("tokenizer.ggml.tokens", ARRAY, (STRING, tokens)),
        ("tokenizer.ggml.scores", ARRAY, (FLOAT32, [0.0] * len(tokens))),
        ("tokenizer.ggml.token_type", ARRAY, (INT32, types)),
        ("tokenizer.ggml.bos_token_id", UINT32, 1),
        ("tokenizer.ggml.eos_token_id", UINT32, 2),
        ("tokenizer.ggml.unknown_token_id", UINT32, 0),
    ]


def _string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


_SCALAR = {UINT32: "<I", INT32: "<i", FLOAT32: "<f"}


def _value(kind: int, value) -> bytes:
    if kind == STRING:
        return _string(value)
    if kind == ARRAY:
        item_kind, items = value
        head = struct.pack("<IQ", item_kind, len(items))
        if item_kind == STRING:
            return head + b"".join(_string(item) for item in items)
        return head + struct.pack(f"<{len(items)}{_SCALAR[item_kind][1]}", *items)
    return struct.pack(_SCALAR[kind], value)


def _fp16(value: float) -> bytes:
    return struct.pack("<e", value)


def _with_scale(data: bytearray, block: int, offset: int, scale: bytes) -> bytearray:
    """Set the fp16 at ``offset`` of every ``block``-byte block (strided slices: C speed)."""
    n = len(data) // block
    data[offset::block] = scale[:1] * n
    data[offset + 1::block] = scale[1:] * n
    return data


def tensor_data(shape: tuple[int, ...], kind: str, rng: random.Random) -> bytes:
    """Random weights with valid, small block scales (|w| below about 0.1)."""
    n = 1
    for dim in shape:
        n *= dim
    _, per_block, block_bytes = GGML_TYPES[kind]
    if kind == F32:  # norms: ones
        return struct.pack(f"<{n}f", *([1.0] * n))
    size = n // per_block * block_bytes
    data = bytearray(rng.randbytes(size))
    if kind == F16:
        # The high byte keeps the random sign and mantissa bits, with exponent 2^-6: |w| in
        # [0.0156, 0.031).
        data[1::2] = bytes(data[1::2]).translate(bytes((b & 0x83) | 0x24 for b in range(256)))
        return bytes(data)
    if kind == Q4_0:    # d, then 16 bytes of nibbles: w = d * (q - 8)
        return bytes(_with_scale(data, block_bytes, 0, _fp16(0.005)))
    if kind == Q8_0:    # d, then 32 int8: w = d * q
        return bytes(_with_scale(data, block_bytes, 0, _fp16(0.0004)))
    if kind == Q4_K:    # d, dmin, 12 bytes of 6-bit scales/mins, 128 bytes of nibbles
        _with_scale(data, block_bytes, 0, _fp16(0.0001))
        return bytes(_with_scale(data, block_bytes, 2, _fp16(0.0001)))
    if kind == Q6_K:    # 128 ql, 64 qh, 16 int8 scales, then d: w = d * scale * (q - 32)
        return bytes(_with_scale(data, block_bytes, 208, _fp16(0.00001)))
    raise ValueError(f"no writer for {kind}")


def _pad(offset: int) -> int:
    return -offset % ALIGNMENT


def write(path: str, seed: int = 0) -> int:
    """Write the model to ``path`` (through a temporary file, then renamed); its size."""
    rng = random.Random(seed)
    items = tensors()
    meta = metadata()
    header = bytearray(b"GGUF" + struct.pack("<IQQ", 3, len(items), len(meta)))
    for key, kind, value in meta:
        header += _string(key) + struct.pack("<I", kind) + _value(kind, value)
    offset = 0
    for name, shape, kind in items:
        header += _string(name) + struct.pack("<I", len(shape))
        header += struct.pack(f"<{len(shape)}Q", *shape)
        header += struct.pack("<IQ", GGML_TYPES[kind][0], offset)
        n = 1
        for dim in shape:
            n *= dim
        size = n // GGML_TYPES[kind][1] * GGML_TYPES[kind][2]
        offset += size + _pad(size)
    header += bytes(_pad(len(header)))
    tmp = f"{path}.partial"
    with open(tmp, "wb") as f:
        f.write(header)
        for _, shape, kind in items:
            data = tensor_data(shape, kind, rng)
            f.write(data + bytes(_pad(len(data))))
        size = f.tell()
    os.replace(tmp, path)
    return size


if __name__ == "__main__":
    print(write(sys.argv[1]))

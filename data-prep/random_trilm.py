#!/usr/bin/env python3
"""Writes a Hugging Face Llama directory whose projections are random ternary matrices times one
float16 scale each (a TriLM as Spectra releases them, unpacked), for speed measurements at sizes
that cannot be trained here: `tern export --from-hf DIR --format packed | gguf` packs it, and
data-prep/bench_decode.py times the packed file against llama.cpp on the GGUF. Speed does not
depend on training. Embedding and head are float16 normal(0, 0.02); norms are ones.

    python3 data-prep/random_trilm.py OUT --hidden 1792 --intermediate 5120 --layers 24 --heads 28
        [--kv-heads N] [--tokenizer data/sample/tokenizer.json] [--seed 0]

The vocabulary is the tokenizer's (the sample's: 4096). Needs numpy and safetensors.
"""
import argparse
import json
import shutil
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

ROOT = Path(__file__).resolve().parent.parent


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--hidden", type=int, required=True)
    ap.add_argument("--intermediate", type=int, required=True)
    ap.add_argument("--layers", type=int, required=True)
    ap.add_argument("--heads", type=int, required=True)
    ap.add_argument("--kv-heads", type=int)
    ap.add_argument("--tokenizer", default=str(ROOT / "data" / "sample" / "tokenizer.json"))
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    kv = a.kv_heads or a.heads
    if a.hidden % a.heads or a.heads % kv:
        raise SystemExit(f"--heads {a.heads} must divide --hidden {a.hidden}, and --kv-heads {kv} "
                         f"must divide --heads")
    hd = a.hidden // a.heads
    vocab = len(json.load(open(a.tokenizer))["model"]["vocab"])
    rng = np.random.default_rng(a.seed)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    def ternary(rows, cols):
        w = rng.integers(-1, 2, size=(rows, cols), dtype=np.int8).astype(np.float16)
        return w * np.float16(rng.uniform(0.01, 0.05))

    t = {"model.embed_tokens.weight": (rng.standard_normal((vocab, a.hidden)) * 0.02).astype(np.float16),
         "lm_head.weight": (rng.standard_normal((vocab, a.hidden)) * 0.02).astype(np.float16),
         "model.norm.weight": np.ones(a.hidden, np.float16)}
    for i in range(a.layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = np.ones(a.hidden, np.float16)
        t[p + "post_attention_layernorm.weight"] = np.ones(a.hidden, np.float16)
        t[p + "self_attn.q_proj.weight"] = ternary(a.heads * hd, a.hidden)
        t[p + "self_attn.k_proj.weight"] = ternary(kv * hd, a.hidden)
        t[p + "self_attn.v_proj.weight"] = ternary(kv * hd, a.hidden)
        t[p + "self_attn.o_proj.weight"] = ternary(a.hidden, a.heads * hd)
        t[p + "mlp.gate_proj.weight"] = ternary(a.intermediate, a.hidden)
        t[p + "mlp.up_proj.weight"] = ternary(a.intermediate, a.hidden)
        t[p + "mlp.down_proj.weight"] = ternary(a.hidden, a.intermediate)
    save_file(t, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
           "hidden_size": a.hidden, "intermediate_size": a.intermediate,
           "num_hidden_layers": a.layers, "num_attention_heads": a.heads,
           "num_key_value_heads": kv, "hidden_act": "silu", "rms_norm_eps": 1e-5,
           "rope_theta": 10000.0, "max_position_embeddings": 2048, "tie_word_embeddings": False,
           "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float16",
           "pretraining_model_parallel": 1}
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    shutil.copy(a.tokenizer, out / "tokenizer.json")
    n = sum(v.size for v in t.values())
    print(f"{out}: {n / 1e6:.1f}M parameters, vocabulary {vocab}")


if __name__ == "__main__":
    main()

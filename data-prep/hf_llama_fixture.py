#!/usr/bin/env python3
"""Writes tests/fixtures/hf-llama/: two small random Hugging Face `LlamaForCausalLM` directories
and their logits for fixed token ids, computed by transformers (the reference implementation).
tern's Llama must give the same logits (max |difference| <= 1e-4 in float32; tests/distill_cli.rs).

- `untied-f32/`: grouped-query attention (4 heads, 2 KV heads), untied head, float32 weights,
  `rope_parameters` as transformers 5 writes it, rope_theta 10000.
- `tied-bf16/`: the same shapes, tied embeddings, rope_theta 500000 as a top-level `rope_theta`
  (older files' spelling, TinyLlama's), weights stored in bfloat16; its reference logits come from
  the bfloat16 weights upcast to float32, as tern reads them.
- `input_ids.safetensors`: `input_ids` [2, 11] int64; `logits-<name>.safetensors`: `logits`
  [2, 11, 96] float32.

Weights are drawn larger than transformers' default init (std 0.2, norm weights 1 + 0.1 N(0, 1)) so
that every tensor changes the logits visibly.

    python3 -m venv /tmp/venv-ref && /tmp/venv-ref/bin/pip install torch transformers safetensors
    /tmp/venv-ref/bin/python data-prep/hf_llama_fixture.py

Made with torch 2.15.0 and transformers 5.23.0 (CPU, eager attention).
"""
import json
import os
import shutil

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "hf-llama")


def make(name, tied, theta, dtype, seed):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied, rms_norm_eps=1e-5,
        rope_theta=theta, max_position_embeddings=64, attention_bias=False, mlp_bias=False,
        bos_token_id=1, eos_token_id=2,
    )
    cfg._attn_implementation = "eager"
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    path = os.path.join(OUT, name)
    shutil.rmtree(path, ignore_errors=True)
    model.to(dtype).save_pretrained(path, safe_serialization=True)
    for extra in ("generation_config.json",):
        if os.path.exists(os.path.join(path, extra)):
            os.remove(os.path.join(path, extra))
    return path


def set_rope_spelling(path, top_level, theta):
    p = os.path.join(path, "config.json")
    c = json.load(open(p))
    c.pop("rope_theta", None)
    c.pop("rope_parameters", None)
    c.pop("rope_scaling", None)
    if top_level:
        c["rope_theta"] = theta
    else:
        c["rope_parameters"] = {"rope_theta": theta, "rope_type": "default"}
    json.dump(c, open(p, "w"), indent=2)


def logits(path, ids):
    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float().contiguous()


def main():
    os.makedirs(OUT, exist_ok=True)
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 96, (2, 11), generator=g, dtype=torch.int64)
    save_file({"input_ids": ids}, os.path.join(OUT, "input_ids.safetensors"))
    for name, tied, theta, dtype, top in [
        ("untied-f32", False, 10000.0, torch.float32, False),
        ("tied-bf16", True, 500000.0, torch.bfloat16, True),
    ]:
        path = make(name, tied, theta, dtype, seed=1 if tied else 0)
        set_rope_spelling(path, top, theta)
        out = logits(path, ids)
        # The config edits must not change what transformers computes: a second load agrees.
        again = logits(path, ids)
        assert torch.equal(out, again)
        save_file({"logits": out}, os.path.join(OUT, f"logits-{name}.safetensors"))
        print(name, "max |logit|", out.abs().max().item(), json.load(open(os.path.join(path, "config.json"))))
    for root, _, files in os.walk(OUT):
        for f in sorted(files):
            p = os.path.join(root, f)
            print(os.path.relpath(p, OUT), os.path.getsize(p))


if __name__ == "__main__":
    main()

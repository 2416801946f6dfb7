#!/usr/bin/env python3
"""Writes small TriLM-shaped Hugging Face Llama directories, unpacked as Spectra releases its
TriLMs: every projection holds scale_g * {-1, 0, 1} in float16, one absmean scale per
model-parallel shard of training (row blocks for q, k, v, gate, up; column blocks for o, down),
and transformers' float32 logits on fixed ids. tests/infer_cli.rs imports them with
`tern export --from-hf` and compares.

    python3 data-prep/trilm_fixture.py tests/fixtures   # writes trilm-mp2/ and trilm-mp3/
    python3 data-prep/trilm_fixture.py OUT --big        # a 512-hidden MP=2 model (GGUF, by hand)

trilm-mp2 carries `pretraining_model_parallel = 2` in config.json; trilm-mp3 does not (tern finds
the 3 shards from the values).
"""
import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parent.parent


def ternarize(w, shards, by_rows):
    """scale_g * clamp(round(w / scale_g), -1, 1), scale_g = mean |w| over shard g."""
    parts = w.chunk(shards, dim=0 if by_rows else 1)
    out = []
    for p in parts:
        s = p.abs().mean().clamp_min(1e-5).half().float()
        out.append(s * (p / s).round().clamp(-1, 1))
    return torch.cat(out, dim=0 if by_rows else 1)


def make(out, mp, hidden, inter, heads, kv, layers, vocab, record_mp, seed, tokenizer=None):
    torch.manual_seed(seed)
    extra = {"pretraining_model_parallel": mp} if record_mp else {}
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, max_position_embeddings=256, rms_norm_eps=1e-5,
                      rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1,
                      eos_token_id=2, **extra)
    model = LlamaForCausalLM(cfg).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_proj.weight"):
                by_rows = not (name.endswith("o_proj.weight") or name.endswith("down_proj.weight"))
                p.copy_(ternarize(torch.randn_like(p) * 0.05, mp, by_rows))
            elif "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.5 * torch.randn_like(p))
    model = model.half()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer:
        shutil.copy(tokenizer, out / "tokenizer.json")
    # Logits in float32 from the float16 values (exactly scale * code).
    model = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32)
    model.eval()
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, vocab, (2, 16), generator=g)
    with torch.no_grad():
        logits = model(ids).logits
    save_file({"input_ids": ids.to(torch.int64)}, str(out / "input_ids.safetensors"))
    save_file({"logits": logits.contiguous()}, str(out / "transformers_logits.safetensors"))
    print(json.dumps({"dir": str(out), "mp": mp, "recorded": record_mp,
                      "max_abs_logit": float(logits.abs().max())}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--big", action="store_true")
    a = ap.parse_args()
    out = Path(a.out)
    if a.big:
        make(out, 2, 512, 1024, 8, 4, 2, 4096, True, 3,
             tokenizer=ROOT / "data" / "sample" / "tokenizer.json")
        return
    make(out / "trilm-mp2", 2, 48, 96, 4, 2, 2, 128, True, 1)
    make(out / "trilm-mp3", 3, 48, 96, 4, 2, 2, 128, False, 2)


if __name__ == "__main__":
    main()

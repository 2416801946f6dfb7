#!/usr/bin/env python3
"""Regenerates tests/fixtures/packed-tiny: a small ternary model trained by tern, packed, and the
logits Hugging Face transformers computes on tern's Hugging Face export of it.

    python3 data-prep/hf_export_fixture.py --tern target/release/tern

Steps: `tern train` (tiny recipe, a smaller and deliberately ragged model: hidden 48, 4 heads, 2
key/value heads, intermediate 136, 2 scale groups, tied embeddings, 20 steps), `tern export
--format packed --float-dtype f16` -> model.tpk; `tern export --format hf` of that packed file ->
a temporary directory, loaded with transformers' LlamaForCausalLM (float32, eager attention);
logits of fixed ids -> transformers_logits.safetensors (with input_ids.safetensors).
Needs torch, transformers, safetensors (checked with torch 2.15.0, transformers 5.23.0).
"""
import argparse
import json
import subprocess
import tempfile
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file
from transformers import LlamaForCausalLM

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "packed-tiny"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tern", default=str(ROOT / "target" / "release" / "tern"))
    a = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        sets = {
            "model.hidden": 48, "model.n_heads": 4, "model.n_kv_heads": 2,
            "model.intermediate": 136, "model.n_layers": 2, "model.scale_groups": 2,
            "model.tie_embeddings": "true", "train.steps": 20, "optim.warmup_steps": 2,
            "optim.decay_steps": 20, "train.eval_every": 0,
        }
        cmd = [a.tern, "train", "--run-dir", str(run)]
        for k, v in sets.items():
            cmd += ["--set", f"{k}={v}"]
        subprocess.run(cmd, check=True, cwd=ROOT)
        packed = OUT / "model.tpk"
        subprocess.run([a.tern, "export", "--checkpoint", str(run), "--format", "packed",
                        "--float-dtype", "f16", "--out", str(packed)], check=True)
        hf = Path(tmp) / "hf"
        subprocess.run([a.tern, "export", "--checkpoint", str(packed), "--format", "hf",
                        "--out", str(hf)], check=True)
        model = LlamaForCausalLM.from_pretrained(hf, torch_dtype=torch.float32,
                                                 attn_implementation="eager").eval()
        g = torch.Generator().manual_seed(7)
        vocab = json.load(open(hf / "config.json"))["vocab_size"]
        ids = torch.randint(0, vocab, (2, 9), generator=g, dtype=torch.int64)
        with torch.no_grad():
            logits = model(ids).logits.float().contiguous()
        save_file({"input_ids": ids}, OUT / "input_ids.safetensors")
        save_file({"logits": logits}, OUT / "transformers_logits.safetensors",
                  metadata={"torch": torch.__version__, "transformers": transformers.__version__})
        print(f"wrote {OUT}: logits {list(logits.shape)}, |max| {logits.abs().max().item():.3f}")


if __name__ == "__main__":
    main()

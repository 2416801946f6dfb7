#!/usr/bin/env python3
"""Runs a GGUF file from `tern export --format gguf` in llama.cpp (through llama-cpp-python) and
compares its logits with tern's on the same ids (`tern logits`), and its tokenization with the
tokenizer.json the model was trained with.

    pip install llama-cpp-python numpy safetensors tokenizers   # builds llama.cpp from the sdist
    python3 data-prep/llamacpp_logits.py MODEL.gguf TERN_MODEL [--tern target/release/tern]

TERN_MODEL is what the GGUF was exported from (checkpoint, run dir or packed file). Prints one
JSON line: max |logit difference|, the largest |logit|, the share of positions whose argmax agree,
and whether llama.cpp's token ids for a sample text equal Hugging Face tokenizers' ids. With
`--jsonl FILE.jsonl(.zst) --blocks K --block-len L` it also takes the first K blocks of L tokens of
that file's texts (joined by the tokenizer's end-of-text token) and prints both runtimes' mean
next-token loss on them: a check that llama.cpp reads the weights as tern holds them.
llama.cpp's CPU path multiplies TQ1_0 / TQ2_0 weights with activations quantized to 8 bits
(Q8_K), so its logits differ from tern's float ones by more than rounding.
"""
import argparse
import json
import subprocess
import tempfile
from pathlib import Path

import numpy as np
from llama_cpp import Llama
from safetensors.numpy import load_file, save_file
from tokenizers import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
TEXT = "The history of the city began in the year 1850, when the river was crossed."


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf")
    ap.add_argument("tern_model")
    ap.add_argument("--tern", default=str(ROOT / "target" / "release" / "tern"))
    ap.add_argument("--tokenizer", default=str(ROOT / "data" / "sample" / "tokenizer.json"))
    ap.add_argument("--jsonl", help="held-out text for a loss comparison")
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--block-len", type=int, default=128)
    ap.add_argument("--eos", default="</s>", help="end-of-text token between documents")
    a = ap.parse_args()

    llm = Llama(model_path=a.gguf, logits_all=True, n_ctx=max(256, a.block_len), n_threads=2,
                verbose=False)
    ids = Tokenizer.from_file(a.tokenizer).encode(TEXT, add_special_tokens=False).ids
    cpp_ids = llm.tokenize(TEXT.encode(), add_bos=False, special=False)
    llm.reset()
    llm.eval(ids)
    cpp = np.array(llm.scores[: len(ids)], dtype=np.float32)

    with tempfile.TemporaryDirectory() as tmp:
        ids_file = Path(tmp) / "ids.safetensors"
        out = Path(tmp) / "logits.safetensors"
        save_file({"input_ids": np.array([ids], dtype=np.int64)}, ids_file)
        subprocess.run([a.tern, "logits", "--model", a.tern_model, "--input-ids", str(ids_file),
                        "--out", str(out)], check=True, capture_output=True)
        tern = load_file(out)["logits"][0]
    report = {
        "positions": len(ids),
        "max_abs_diff": float(np.abs(cpp - tern).max()),
        "max_abs_logit": float(np.abs(tern).max()),
        "argmax_agree": float((cpp.argmax(-1) == tern.argmax(-1)).mean()),
        "same_token_ids": list(cpp_ids) == list(ids),
    }
    if a.jsonl:
        report.update(held_out_loss(a, llm))
    print(json.dumps(report))


def nll(logits, ids):
    """Mean next-token negative log-likelihood of `ids[1:]` under `logits[:-1]` (float64)."""
    z = logits[:-1].astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return float(-logp[np.arange(len(ids) - 1), ids[1:]].mean())


def held_out_loss(a, llm):
    import io
    import zstandard
    tok = Tokenizer.from_file(a.tokenizer)
    raw = open(a.jsonl, "rb").read()
    if a.jsonl.endswith(".zst"):
        raw = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(raw)).read()
    eos = tok.token_to_id(a.eos)
    if eos is None:
        raise SystemExit(f"--eos {a.eos!r} is not a token of {a.tokenizer}")
    stream = []
    for line in raw.decode().splitlines():
        stream += tok.encode(json.loads(line)["text"], add_special_tokens=False).ids + [eos]
        if len(stream) >= a.blocks * a.block_len:
            break
    if len(stream) < a.blocks * a.block_len:
        raise SystemExit(f"{a.jsonl} holds {len(stream)} tokens, fewer than --blocks {a.blocks} x "
                         f"--block-len {a.block_len}")
    blocks = np.array(stream[: a.blocks * a.block_len], dtype=np.int64).reshape(a.blocks, -1)
    cpp_loss = []
    for b in blocks:
        llm.reset()
        llm.eval(b.tolist())
        cpp_loss.append(nll(np.array(llm.scores[: len(b)], dtype=np.float32), b))
    with tempfile.TemporaryDirectory() as tmp:
        ids_file, out = Path(tmp) / "ids.safetensors", Path(tmp) / "logits.safetensors"
        save_file({"input_ids": blocks}, ids_file)
        subprocess.run([a.tern, "logits", "--model", a.tern_model, "--input-ids", str(ids_file),
                        "--out", str(out)], check=True, capture_output=True)
        tl = load_file(out)["logits"]
    tern_loss = [nll(tl[i], b) for i, b in enumerate(blocks)]
    return {"held_out_tokens": int(blocks.size), "llamacpp_loss": float(np.mean(cpp_loss)),
            "tern_loss": float(np.mean(tern_loss))}


if __name__ == "__main__":
    main()

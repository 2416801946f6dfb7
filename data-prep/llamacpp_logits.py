#!/usr/bin/env python3
"""Runs a GGUF file from `tern export --format gguf` in llama.cpp (through llama-cpp-python) and
compares its logits with tern's on the same ids (`tern logits`), and its tokenization with the
tokenizer.json the model was trained with.

    pip install llama-cpp-python numpy safetensors tokenizers   # builds llama.cpp from the sdist
    python3 data-prep/llamacpp_logits.py MODEL.gguf TERN_MODEL [--tern target/release/tern]

TERN_MODEL is what the GGUF was exported from (checkpoint, run dir or packed file). Prints one
JSON line: max |logit difference|, the largest |logit|, the share of positions whose argmax agree,
and whether llama.cpp's token ids for a sample text equal Hugging Face tokenizers' ids.
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
    a = ap.parse_args()

    llm = Llama(model_path=a.gguf, logits_all=True, n_ctx=256, n_threads=2, verbose=False)
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
    print(json.dumps({
        "positions": len(ids),
        "max_abs_diff": float(np.abs(cpp - tern).max()),
        "max_abs_logit": float(np.abs(tern).max()),
        "argmax_agree": float((cpp.argmax(-1) == tern.argmax(-1)).mean()),
        "same_token_ids": list(cpp_ids) == list(ids),
    }))


if __name__ == "__main__":
    main()

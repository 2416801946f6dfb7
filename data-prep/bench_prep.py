#!/usr/bin/env python3
"""Prep throughput: `tern prep` against Hugging Face `tokenizers` from Python on the same text.

Decompresses the inputs once (both sides read the same JSONL), runs `tern prep` (all cores), then
tokenises the same documents with `tokenizers.Tokenizer.encode_batch` (Rust underneath, all
cores) and prints MB of text/s and tokens/s for each and the ratio.

Usage: python3 data-prep/bench_prep.py [--input DIR] [--tokenizer FILE] [--repeat N] [--format hdf5]
       (needs `pip install tokenizers zstandard` or the zstd CLI, and a release build of tern)
"""
import argparse
import json
import pathlib
import re
import subprocess
import tempfile
import time

from tokenizers import Tokenizer

ROOT = pathlib.Path(__file__).resolve().parent.parent


def read_lines(path):
    if path.suffix == ".zst":
        raw = subprocess.run(["zstd", "-dc", str(path)], check=True, capture_output=True).stdout
        return raw.decode().splitlines()
    return path.read_text().splitlines()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--input", default=str(ROOT / "data/sample/train"))
    ap.add_argument("--tokenizer", default=str(ROOT / "data/sample/tokenizer.json"))
    ap.add_argument("--repeat", type=int, default=8, help="copies of the input (a bigger corpus)")
    ap.add_argument("--format", default="litpkds", choices=["litpkds", "hdf5"])
    # 64 blocks of 2049: shards small enough that every worker writes several, large enough that
    # per-shard fsyncs do not dominate (TinyLlama's own chunks are 16x larger).
    ap.add_argument("--chunk-size", type=int, default=2049 * 64)
    a = ap.parse_args()
    files = sorted(p for p in pathlib.Path(a.input).rglob("*") if p.name.endswith((".jsonl", ".jsonl.zst")))
    lines = [l for f in files for l in read_lines(f) if l.strip()] * a.repeat
    docs = [json.loads(l)["text"] for l in lines]
    mb = sum(len(d.encode()) for d in docs) / 1e6
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        inp = tmp / "in"
        inp.mkdir()
        # One file per copy, so that tern's workers (one per core) all have work.
        per = len(lines) // a.repeat
        for k in range(a.repeat):
            (inp / f"part{k:03d}.jsonl").write_text("\n".join(lines[k * per:(k + 1) * per]) + "\n")
        start = time.perf_counter()
        out = subprocess.run(
            [str(ROOT / "target/release/tern"), "prep", "--input", str(inp), "--tokenizer",
             a.tokenizer, "--out", str(tmp / "out"), "--chunk-size", str(a.chunk_size), "--format", a.format],
            check=True, capture_output=True, text=True).stdout
        tern_s = time.perf_counter() - start
        tokens = sum(int(x) for x in re.findall(r"(\d+) tokens written, (\d+) dropped", out)[0])
    tok = Tokenizer.from_file(a.tokenizer)
    start = time.perf_counter()
    n = 0
    for i in range(0, len(docs), 64):
        n += sum(len(e.ids) + 1 for e in tok.encode_batch(docs[i:i + 64], add_special_tokens=False))
    py_s = time.perf_counter() - start
    print(f"text {mb:.1f} MB, {len(docs)} documents")
    print(f"tern prep --format {a.format} (tokenise + write shards, process start included): {tern_s:.2f} s, "
          f"{mb / tern_s:.2f} MB/s, {tokens / tern_s / 1e6:.2f} M tokens/s")
    print(f"python tokenizers encode_batch (tokenise only): {py_s:.2f} s, "
          f"{mb / py_s:.2f} MB/s, {n / py_s / 1e6:.2f} M tokens/s")
    print(f"ratio tern / python: {py_s / tern_s:.2f}")


if __name__ == "__main__":
    main()

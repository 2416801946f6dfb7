#!/usr/bin/env python3
"""Writes synthetic token shards for `tern data bench` (the sampler's random-window reads):
DIR/litpkds/*.bin in TinyLlama's packed format and DIR/hdf5/*.h5 in tern's HDF5 layout, with
random ids below 4096 and the embedded sample tokenizer's sha256 (so tern accepts them with
data/sample/tokenizer.json). Default: 2 x 256M tokens (1 GB of files), more than any CPU cache.

    pip install h5py numpy
    python3 data-prep/bench_shards.py /tmp/bench-shards [--tokens 268435456]
    tern data bench /tmp/bench-shards/litpkds --tokenizer data/sample/tokenizer.json
    tern data bench /tmp/bench-shards/hdf5 --tokenizer data/sample/tokenizer.json
"""
import argparse
import hashlib
import os
import struct

import h5py
import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
CHUNK = 2049 * 1024  # TinyLlama's chunk size


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--tokens", type=int, default=256 * 2**20)
    a = ap.parse_args()
    with open(os.path.join(ROOT, "data/sample/tokenizer.json"), "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(a.out, "litpkds"), exist_ok=True)
    os.makedirs(os.path.join(a.out, "hdf5"), exist_ok=True)
    for i in range(max(1, a.tokens // CHUNK)):
        t = rng.integers(0, 4096, CHUNK, dtype=np.uint16)
        with open(os.path.join(a.out, "litpkds", f"train_bench_0_{i:010d}.bin"), "wb") as f:
            f.write(b"LITPKDS" + struct.pack("<QBQ", 1, 8, CHUNK) + t.tobytes())
    per_h5 = 16 * CHUNK
    for i in range(max(1, a.tokens // per_h5)):
        t = rng.integers(0, 4096, per_h5, dtype=np.uint16)
        with h5py.File(os.path.join(a.out, "hdf5", f"train_bench_0_{i:010d}.h5"), "w") as f:
            f.create_dataset("tokens", data=t)  # contiguous, uncompressed
            f.create_dataset("doc_offsets", data=np.array([0, per_h5], dtype=np.uint64))
            for k, v in dict(version=1, vocab_size=4096, eos_id=2, documents=1, tokens=per_h5).items():
                f.attrs.create(k, v, dtype=np.uint64)
            f.attrs["format"] = "tern-tokens"
            f.attrs["tokenizer_sha256"] = sha
            f.attrs["source_files"] = ["synthetic"]
    print("wrote", a.out)


if __name__ == "__main__":
    main()

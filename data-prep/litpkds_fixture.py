#!/usr/bin/env python3
"""Writes tests/fixtures/litpkds/: a few token documents (documents.json) and the shards TinyLlama's
PackedDatasetBuilder (lit_gpt/packed_dataset.py) makes of them, as its prepare_slimpajama.py
drives it: dtype "auto" for a small vocabulary (uint16), EOS (2) after every document, chunks of
16 tokens named train_slimpajama_0_{counter:010d}.bin, the last partial chunk dropped.

The builder's behaviour is transcribed here with NumPy and struct (header: b"LITPKDS", <Q version
1, <B dtype code (8 = uint16), <Q chunk size; then the chunk's tokens in C order), so the fixture
needs neither TinyLlama nor torch.

Usage: python3 data-prep/litpkds_fixture.py  (needs numpy)
"""
import json
import pathlib
import struct

import numpy as np

CHUNK, EOS, PREFIX = 16, 2, "train_slimpajama_0"


def main():
    out = pathlib.Path(__file__).resolve().parent.parent / "tests/fixtures/litpkds"
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.bin"):
        old.unlink()
    rng = np.random.default_rng(83)
    docs = [list(map(int, rng.integers(3, 100, size=int(n)))) + [EOS]
            for n in rng.integers(1, 12, size=9)]
    (out / "documents.json").write_text(json.dumps(docs) + "\n")
    arr = np.full(CHUNK, EOS, dtype=np.uint16)
    idx, counter = 0, 0
    for d in docs:
        d = np.array(d, dtype=np.uint16)
        while idx + len(d) > CHUNK:  # the builder's add_array
            part = CHUNK - idx
            arr[idx:] = d[:part]
            with open(out / f"{PREFIX}_{counter:010d}.bin", "wb") as f:
                f.write(b"LITPKDS")
                f.write(struct.pack("<Q", 1))
                f.write(struct.pack("<B", 8))
                f.write(struct.pack("<Q", CHUNK))
                f.write(arr.tobytes(order="C"))
            counter += 1
            arr.fill(EOS)
            idx = 0
            d = d[part:]
        arr[idx:idx + len(d)] = d
        idx += len(d)
    # prepare_slimpajama.py leaves builder.write_reminder() commented out: the tail is dropped.
    print(f"wrote {counter} shards and documents.json to {out}")


if __name__ == "__main__":
    main()

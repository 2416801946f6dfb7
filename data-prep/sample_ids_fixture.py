#!/usr/bin/env python3
"""Writes tests/fixtures/sample_validation_ids.json: the token ids that Hugging Face's Python
`tokenizers` (the reference implementation) gives for the embedded sample's validation split,
documents in file order, each followed by EOS (`</s>` = 2), RedPajamaGithub documents left out,
as `tern prep` does. tern's HDF5 and LITPKDS shards of that split must hold exactly these ids.

    pip install tokenizers==0.23.3 zstandard
    python3 data-prep/sample_ids_fixture.py
"""
import glob
import io
import json
import os

import zstandard
from tokenizers import Tokenizer

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def main():
    tok = Tokenizer.from_file(os.path.join(ROOT, "data/sample/tokenizer.json"))
    eos = tok.token_to_id("</s>")
    ids = []
    files = sorted(glob.glob(os.path.join(ROOT, "data/sample/validation/**/*.jsonl.zst"), recursive=True))
    for path in files:
        with open(path, "rb") as f:
            text = zstandard.ZstdDecompressor().stream_reader(f).read().decode()
        for line in io.StringIO(text):
            if not line.strip():
                continue
            rec = json.loads(line)
            if rec.get("meta", {}).get("redpajama_set_name") == "RedPajamaGithub":
                continue
            ids.extend(tok.encode(rec["text"], add_special_tokens=False).ids)
            ids.append(eos)
    out = os.path.join(ROOT, "tests/fixtures/sample_validation_ids.json")
    with open(out, "w") as f:
        json.dump(ids, f, separators=(",", ":"))
    print(out, len(ids), "tokens")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Regenerates tern's embedded sample corpus and tokenizer (data/sample/).

Source: the shortened English Wikipedia dump that gensim ships as test data
(gensim wheel, gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2),
text under CC BY-SA 3.0. The wiki markup is stripped to plain prose, each article becomes one
SlimPajama-format record {"text", "meta": {"redpajama_set_name": "RedPajamaWikipedia"}}, written as
.jsonl.zst in SlimPajama's directory layout (train/chunk1, validation/chunk1). A byte-level BPE
tokenizer is trained on the train split with HF `tokenizers` and saved as tokenizer.json.

    pip download --no-deps -d /tmp/gensim gensim==4.4.0
    pip install tokenizers==0.23.3 zstandard
    python3 data-prep/make_sample.py /tmp/gensim/gensim-4.4.0-*.whl data/sample
"""
import bz2, html, io, json, os, re, sys, zipfile
import xml.etree.ElementTree as ET

import zstandard
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

DUMP = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
VOCAB = 4096
VALIDATION_EVERY = 20  # every 20th article goes to the validation split


def strip_nested(text, open_, close):
    out, depth, i = [], 0, 0
    while i < len(text):
        if text.startswith(open_, i):
            depth += 1
            i += len(open_)
        elif depth and text.startswith(close, i):
            depth -= 1
            i += len(close)
        else:
            if not depth:
                out.append(text[i])
            i += 1
    return "".join(out)


def clean(wiki):
    t = html.unescape(wiki)
    t = re.sub(r"<!--.*?-->", "", t, flags=re.S)
    t = re.sub(r"<ref[^>]*/>", "", t)
    t = re.sub(r"<ref.*?</ref>", "", t, flags=re.S)
    t = strip_nested(t, "{{", "}}")
    t = strip_nested(t, "{|", "|}")
    t = re.sub(r"\[\[(?:File|Image|Category):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]", "", t)
    t = re.sub(r"\[\[[^\]|]*\|([^\]]*)\]\]", r"\1", t)
    t = re.sub(r"\[\[([^\]]*)\]\]", r"\1", t)
    t = re.sub(r"\[https?://\S+ ([^\]]*)\]", r"\1", t)
    t = re.sub(r"\[https?://\S+\]", "", t)
    t = re.sub(r"<[^>]+>", "", t)
    t = re.sub(r"'{2,}", "", t)
    t = re.sub(r"^=+\s*(.*?)\s*=+\s*$", r"\1", t, flags=re.M)
    lines = []
    for line in t.split("\n"):
        line = line.strip()
        if line.startswith(("*", "#", ":", ";")):
            line = line.lstrip("*#:; ")
        if line.lower() in ("see also", "references", "external links", "further reading", "notes"):
            break
        lines.append(line)
    t = "\n".join(lines)
    t = re.sub(r"\n{3,}", "\n\n", t)
    return t.strip()


def main(wheel, out):
    raw = bz2.decompress(zipfile.ZipFile(wheel).read(DUMP))
    ns = "{http://www.mediawiki.org/xml/export-0.10/}"
    docs = []
    for page in ET.fromstring(raw).iter(ns + "page"):
        if page.find(ns + "ns").text != "0":
            continue
        text = page.find(f"{ns}revision/{ns}text").text or ""
        if text.lstrip().upper().startswith("#REDIRECT"):
            continue
        body = clean(text)
        if len(body) < 500:
            continue
        docs.append(page.find(ns + "title").text + "\n\n" + body)
    splits = {"train": [], "validation": []}
    for i, d in enumerate(docs):
        splits["validation" if i % VALIDATION_EVERY == VALIDATION_EVERY - 1 else "train"].append(d)
    for split, items in splits.items():
        d = os.path.join(out, split, "chunk1")
        os.makedirs(d, exist_ok=True)
        name = "example_train_0.jsonl.zst" if split == "train" else "example_holdout_0.jsonl.zst"
        lines = "".join(
            json.dumps({"text": t, "meta": {"redpajama_set_name": "RedPajamaWikipedia"}}) + "\n" for t in items
        )
        with open(os.path.join(d, name), "wb") as f:
            f.write(zstandard.ZstdCompressor(level=19).compress(lines.encode()))
        print(split, len(items), "documents", len(lines), "bytes of JSONL")

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<unk>", "<s>", "</s>"],  # ids 0, 1, 2 as in LLaMA / TinyLlama
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(splits["train"], trainer=trainer)
    tok.save(os.path.join(out, "tokenizer.json"))
    print("tokenizer vocab", tok.get_vocab_size())


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

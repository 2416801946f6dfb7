#!/usr/bin/env python3
"""Prompt and decode speed of `tern generate` on a packed file against llama.cpp (through
llama-cpp-python) on GGUF exports of the same weights, same thread count, runs interleaved.

    pip install llama-cpp-python numpy        # builds llama.cpp from its PyPI sdist
    python3 data-prep/bench_decode.py --packed m.tpk --gguf m-tq2.gguf m-tq1.gguf \
        [--rounds 5] [--threads 2] [--decode 128] [--tern target/release/tern] [--before OTHER_TERN]

Each round runs tern once per `--activations` mode (exact, int8) and llama.cpp once per GGUF,
greedy, `--decode` new tokens after a fixed prompt, ignoring end of sequence. tern's figures are
what it prints (decode includes sampling); llama.cpp's come from its own counters
(llama_perf_context: prompt and decode evaluation time only), so the comparison favours llama.cpp.
With --before, another tern binary (an earlier build) also runs its exact mode in each round, so a
change is measured side by side with its baseline and llama.cpp. Prints one JSON line per round
and a summary with medians and ratios to the first GGUF.
"""
import argparse
import json
import os
import re
import statistics
import subprocess
from pathlib import Path

import llama_cpp
from llama_cpp import Llama

ROOT = Path(__file__).resolve().parent.parent
PROMPT = (
    "The history of the city began in the year 1850, when the first settlers crossed the river "
    "and built a small church on the hill. Over the next decades the town grew around the "
    "market square, and by the end of the century it had a railway station, two schools and a "
    "newspaper that was read in every village of the valley."
)
LINE = re.compile(
    r"\[(\d+) prompt tokens in [\d.]+ s \(([\d.]+) tokens/s\); (\d+) generated in [\d.]+ s "
    r"\(([\d.]+) tokens/s\)"
)


def tern_run(a, mode, binary=None):
    env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads))
    out = subprocess.run(
        [binary or a.tern, "generate", "--model", a.packed, "--prompt", PROMPT, "--max-tokens",
         str(a.decode), "--temperature", "0", "--ignore-eos", "--activations", mode],
        capture_output=True, text=True, env=env, check=True)
    m = LINE.search(out.stderr)
    if not m:
        raise SystemExit(f"tern generate printed no timing line:\n{out.stderr}")
    return {"prompt_tokens": int(m[1]), "prompt_tps": float(m[2]), "decode_tokens": int(m[3]),
            "decode_tps": float(m[4])}


def cpp_run(llm, decode):
    tokens = llm.tokenize(PROMPT.encode(), add_bos=False, special=False)
    llm.reset()
    llama_cpp.llama_perf_context_reset(llm._ctx.ctx)
    n = 0
    for _ in llm.generate(tokens, temp=0.0, top_k=1, reset=True):
        n += 1
        if n >= decode:
            break
    p = llama_cpp.llama_perf_context(llm._ctx.ctx)
    return {"prompt_tokens": p.n_p_eval, "prompt_tps": 1e3 * p.n_p_eval / p.t_p_eval_ms,
            "decode_tokens": p.n_eval, "decode_tps": 1e3 * p.n_eval / p.t_eval_ms}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--packed", required=True)
    ap.add_argument("--gguf", nargs="+", required=True)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--tern", default=str(ROOT / "target" / "release" / "tern"))
    ap.add_argument("--before", help="an earlier tern binary, run in exact mode beside --tern")
    a = ap.parse_args()
    llms = {Path(g).name: Llama(model_path=g, n_ctx=512, n_batch=512, n_threads=a.threads,
                                n_threads_batch=a.threads, verbose=False) for g in a.gguf}
    runs = {}
    for r in range(a.rounds):
        row = {}
        if a.before:
            row["tern exact (before)"] = tern_run(a, "exact", a.before)
        for mode in ["exact", "int8"]:
            row[f"tern {mode}"] = tern_run(a, mode)
        for name, llm in llms.items():
            row[f"llama.cpp {name}"] = cpp_run(llm, a.decode)
        for k, v in row.items():
            runs.setdefault(k, []).append(v)
        print(json.dumps({"round": r, **{k: (v["prompt_tps"], v["decode_tps"])
                                          for k, v in row.items()}}), flush=True)
    med = {k: {f: statistics.median(x[f] for x in v) for f in ["prompt_tps", "decode_tps"]}
           for k, v in runs.items()}
    ref = med[f"llama.cpp {Path(a.gguf[0]).name}"]
    print(json.dumps({"median": med, "prompt_tokens": runs["tern exact"][0]["prompt_tokens"],
                      "llama_cpp_prompt_tokens":
                          runs[f"llama.cpp {Path(a.gguf[0]).name}"][0]["prompt_tokens"],
                      "ratio_to_first_gguf": {
                          k: {"prompt": m["prompt_tps"] / ref["prompt_tps"],
                              "decode": m["decode_tps"] / ref["decode_tps"]}
                          for k, m in med.items()}}, indent=1))


if __name__ == "__main__":
    main()

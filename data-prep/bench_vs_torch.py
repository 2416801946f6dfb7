#!/usr/bin/env python3
"""tern against its PyTorch eager peer (data-prep/bench_torch.py), interleaved, on the same shapes
and thread count: tokens/s of whole training steps (forward, backward, clipping, AdamW), their
ratio, and the peak resident memory of each process.

    python data-prep/bench_vs_torch.py [--rounds 3] [--threads 2] [--steps 10]
        [--case tiny=recipes/tiny.toml:8x128] [--case trilm-99m=recipes/trilm-99m.toml:2x256]

Each round runs tern then PyTorch for every case, alternating which goes first, so that a slow
spell of the machine hits both; the table shows every round's figures and the medians. Needs the
`tern` binary (`cargo build --release`) and a Python with torch (the one running this script, or
--python).
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CASES = ["tiny=recipes/tiny.toml:8x128", "trilm-99m=recipes/trilm-99m.toml:2x256"]


def timed(cmd, env):
    """`cmd` under /usr/bin/time: its stdout and its peak resident memory in MB."""
    rss_file = Path("/tmp/bench_vs_torch.rss")
    p = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", str(rss_file)] + cmd,
                       capture_output=True, env=env, cwd=REPO)
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{p.stderr.decode()}")
    return p.stdout.decode(), int(rss_file.read_text().split()[-1]) / 1024


def tern(args, recipe, batch, seq, env):
    cmd = [args.tern, "bench", recipe, "--steps", str(args.steps),
           "--set", f"train.micro_batch={batch}", "--set", f"train.global_batch={batch}",
           "--set", f"data.seq_len={seq}"]
    out, rss = timed(cmd, env)
    m = re.search(r"train step .*\| ([0-9.]+) tokens/s \| ([0-9.]+) GFLOP/s", out)
    if not m:
        sys.exit(f"no 'train step' line in tern bench's output:\n{out}")
    return float(m.group(1)), float(m.group(2)), rss


def torch(args, recipe, batch, seq, env):
    cmd = [args.python, str(REPO / "data-prep/bench_torch.py"), recipe, "--batch", str(batch),
           "--seq", str(seq), "--threads", str(args.threads), "--steps", str(args.steps)]
    out, rss = timed(cmd, env)
    return json.loads(out.strip().splitlines()[-1])["tokens_per_s"], rss


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per run (after warm-up)")
    ap.add_argument("--case", action="append", help="NAME=RECIPE:BATCHxSEQ (repeatable)")
    ap.add_argument("--tern", default=str(REPO / "target/release/tern"))
    ap.add_argument("--python", default=sys.executable)
    args = ap.parse_args()
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads))
    cases = []
    for c in args.case or CASES:
        name, rest = c.split("=", 1)
        recipe, shape = rest.rsplit(":", 1)
        b, t = (int(x) for x in shape.split("x"))
        cases.append((name, recipe, b, t))
    rows = {name: {"tern": [], "torch": [], "gflops": [], "rss": ([], [])} for name, *_ in cases}
    for r in range(args.rounds):
        for name, recipe, b, t in cases:
            order = ["tern", "torch"] if r % 2 == 0 else ["torch", "tern"]
            for who in order:
                if who == "tern":
                    tok, gf, rss = tern(args, recipe, b, t, env)
                    rows[name]["tern"].append(tok)
                    rows[name]["gflops"].append(gf)
                    rows[name]["rss"][0].append(rss)
                else:
                    tok, rss = torch(args, recipe, b, t, env)
                    rows[name]["torch"].append(tok)
                    rows[name]["rss"][1].append(rss)
            x = rows[name]
            print(f"round {r + 1} {name}: tern {x['tern'][-1]:.0f} tokens/s, pytorch {x['torch'][-1]:.0f}, "
                  f"ratio {x['tern'][-1] / x['torch'][-1]:.2f}", flush=True)
    print(f"\n{args.threads} threads, {args.steps} timed steps a run, {args.rounds} interleaved rounds (medians)")
    print("| case | tern tokens/s | PyTorch tokens/s | ratio | tern GFLOP/s | peak RSS tern / PyTorch |")
    print("|---|---|---|---|---|---|")
    med = statistics.median
    for name, *_ in cases:
        x = rows[name]
        ratios = [a / b for a, b in zip(x["tern"], x["torch"])]
        print(f"| {name} | {med(x['tern']):.0f} | {med(x['torch']):.0f} | {med(ratios):.2f} "
              f"({min(ratios):.2f}-{max(ratios):.2f}) | {med(x['gflops']):.1f} | "
              f"{med(x['rss'][0]) / 1024:.2f} / {med(x['rss'][1]) / 1024:.2f} GB |")


if __name__ == "__main__":
    main()

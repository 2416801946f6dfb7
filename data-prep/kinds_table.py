#!/usr/bin/env python3
"""The table of docs/architectures.md: each block kind's tiny recipe trained on the embedded
sample with float and with ternary linears, equal tokens for all (the recipes share the batch,
the sequence length and the schedule), printing the validation loss at the end and the median
step time.

    python data-prep/kinds_table.py [--steps 200] [--runs-dir /tmp/kinds] [--threads 2] [--reuse]

Runs `target/release/tern` (build it first); one run per cell, the cells in the order kind by
kind, float then ternary, so a slow spell of the machine hits both of a kind. Step time is the
median over the run's steps after the first (which includes setup), from `metrics.jsonl`.
"""

import argparse
import json
import os
import statistics
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
KINDS = [
    ("LLaMA (tiny)", "recipes/tiny.toml"),
    ("mixture of experts", "recipes/moe-tiny.toml"),
    ("mixture of attention heads", "recipes/moa-tiny.toml"),
    ("Mixture-of-Depths", "recipes/mod-tiny.toml"),
    ("Jamba (Mamba + attention + experts)", "recipes/jamba-tiny.toml"),
]


def run(recipe, linear, steps, run_dir, threads):
    cmd = [str(REPO / "target/release/tern"), "train", recipe, "--run-dir", str(run_dir),
           "--set", f'model.linear="{linear}"', "--set", f"train.steps={steps}",
           "--set", f"train.eval_every={steps}", "--set", f"train.checkpoint_every={steps}"]
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    subprocess.run(cmd, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)


def summary(run_dir):
    """Final validation loss, median step time in ms (steps after the first), first and last
    training loss, of a finished run."""
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val = [l["val_loss"] for l in lines if "val_loss" in l][-1]
    steps = [l for l in lines if "tokens_per_s" in l]
    # `tokens` counts the run's tokens so far: a step's are the difference.
    ms = [1e3 * (b["tokens"] - a["tokens"]) / b["tokens_per_s"] for a, b in zip(steps, steps[1:])]
    return val, statistics.median(ms), steps[0]["loss"], steps[-1]["loss"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--runs-dir", default="/tmp/kinds")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reuse", action="store_true", help="summarize the runs already in --runs-dir")
    a = ap.parse_args()
    rows = []
    for name, recipe in KINDS:
        cells = {}
        for linear in ("float", "ternary"):
            d = Path(a.runs_dir) / f"{Path(recipe).stem}-{linear}"
            if not a.reuse:
                run(recipe, linear, a.steps, d, a.threads)
            cells[linear] = summary(d)
        rows.append((name, recipe, cells))
        f, t = cells["float"], cells["ternary"]
        print(f"{name}: float val {f[0]:.4f} ({f[1]:.0f} ms/step), ternary val {t[0]:.4f} "
              f"({t[1]:.0f} ms/step)", flush=True)
    print()
    print("| kind | recipe | val loss float | val loss ternary | ms/step float | ms/step ternary |")
    print("|---|---|---|---|---|---|")
    for name, recipe, c in rows:
        f, t = c["float"], c["ternary"]
        print(f"| {name} | `{recipe}` | {f[0]:.3f} | {t[0]:.3f} | {f[1]:.0f} | {t[1]:.0f} |")


if __name__ == "__main__":
    main()

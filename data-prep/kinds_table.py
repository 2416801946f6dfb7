#!/usr/bin/env python3
"""The table of docs/architectures.md: each block kind's tiny recipe trained on the embedded
sample with float and with ternary linears, equal tokens for all (the recipes share the batch,
the sequence length and the schedule), printing the validation loss at the end and the median
step time.

    python data-prep/kinds_table.py [--steps 200] [--runs-dir /tmp/kinds] [--threads 2]

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
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val = [l["val_loss"] for l in lines if "val_loss" in l][-1]
    steps_ms = [1e3 * l["tokens"] / l["tokens_per_s"] for l in lines
                if "tokens_per_s" in l and l["step"] > 1]
    loss = [l["loss"] for l in lines if "loss" in l]
    return val, statistics.median(steps_ms), loss[0], loss[-1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--runs-dir", default="/tmp/kinds")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    rows = []
    for name, recipe in KINDS:
        cells = {}
        for linear in ("float", "ternary"):
            d = Path(a.runs_dir) / f"{Path(recipe).stem}-{linear}"
            cells[linear] = run(recipe, linear, a.steps, d, a.threads)
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

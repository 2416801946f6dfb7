#!/usr/bin/env python3
"""Writes tests/fixtures/galore_reference.json: a few GaLore-AdamW steps on fixed gradients,
computed from the paper's algorithm as jiaweizzhao/GaLore implements it (galore_torch/adamw.py,
galore_projector.py), in float64 NumPy:

- at steps 0, T, 2T, ... the projection comes from an SVD of the gradient: m >= n -> right,
  P = Vh[:r] (r x n), R = G P^T, back N P; m < n -> left, P = U[:, :r], R = P^T G, back P N
  (proj_type "std"); the moments are kept when P changes (the reference's behaviour);
- m = b1 m + (1 - b1) R, v = b2 v + (1 - b2) R^2, N = m / (sqrt(v) + eps),
  W -= lr sqrt(1 - b2^t) / (1 - b1^t) * scale * back(N), then W -= lr wd W;
- other parameters: the same Adam without projection (and without scale).

Singular vectors are only defined up to sign; both this script and tern flip each one so that
its entry of largest magnitude is positive, so that the two agree across refreshes.

Usage: python3 data-prep/galore_reference.py  (needs numpy)
"""
import json
import pathlib

import numpy as np

RANK, GAP, SCALE = 2, 2, 0.25
LR, WD, B1, B2, EPS = 0.01, 0.1, 0.9, 0.999, 1e-6
STEPS = 5
# "right" and "left" are GaLore matrices; "dense" a matrix on plain Adam (as the embedding);
# "vector" a norm weight (no weight decay).
SHAPES = {"right": (6, 4), "left": (3, 5), "dense": (5, 3), "vector": (4,)}
LOW_RANK = ("right", "left")


def canonical(vectors):
    """Rows of `vectors` with the sign that makes each row's largest-|x| entry positive."""
    idx = np.argmax(np.abs(vectors), axis=1)
    signs = np.sign(vectors[np.arange(len(vectors)), idx])
    return vectors * signs[:, None]


def projection(g):
    u, _, vh = np.linalg.svd(g, full_matrices=False)
    if g.shape[0] >= g.shape[1]:
        return "right", canonical(vh[:RANK, :])
    return "left", canonical(u[:, :RANK].T).T


def main():
    rng = np.random.default_rng(20240307)
    weights = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
    grads = [{k: rng.standard_normal(s) for k, s in SHAPES.items()} for _ in range(STEPS)]
    init = {k: w.copy() for k, w in weights.items()}
    state = {k: {"m": None, "v": None, "p": None, "side": None} for k in SHAPES}
    after = []
    for t in range(STEPS):
        for k, w in weights.items():
            g, st = grads[t][k], state[k]
            low = k in LOW_RANK
            if low:
                if st["p"] is None or t % GAP == 0:
                    st["side"], st["p"] = projection(g)
                r = g @ st["p"].T if st["side"] == "right" else st["p"].T @ g
            else:
                r = g
            if st["m"] is None:
                st["m"], st["v"] = np.zeros_like(r), np.zeros_like(r)
            st["m"] = B1 * st["m"] + (1 - B1) * r
            st["v"] = B2 * st["v"] + (1 - B2) * r * r
            n = st["m"] / (np.sqrt(st["v"]) + EPS)
            step = t + 1
            size = LR * np.sqrt(1 - B2**step) / (1 - B1**step)
            if low:
                n = (n @ st["p"] if st["side"] == "right" else st["p"] @ n) * SCALE
            w -= size * n
            if g.ndim == 2:  # decay on matrices only, as tern does
                w -= LR * WD * w
        after.append({k: w.tolist() for k, w in weights.items()})
    out = {
        "settings": {"rank": RANK, "update_proj_gap": GAP, "scale": SCALE, "lr": LR,
                     "weight_decay": WD, "beta1": B1, "beta2": B2, "eps": EPS},
        "shapes": {k: list(s) for k, s in SHAPES.items()},
        "init": {k: w.tolist() for k, w in init.items()},
        "grads": [{k: g.tolist() for k, g in step.items()} for step in grads],
        "after": after,
    }
    path = pathlib.Path(__file__).resolve().parent.parent / "tests/fixtures/galore_reference.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

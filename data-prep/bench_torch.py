#!/usr/bin/env python3
"""PyTorch eager peer of `tern bench`: the same LLaMA / TriLM model and training step, timed.

An idiomatic PyTorch implementation (nn.Module, F.scaled_dot_product_attention, torch.optim.AdamW,
clip_grad_norm_) of the model a tern recipe describes: RMSNorm, RoPE (rotate_half), grouped-query
causal attention, SwiGLU or ReLU^2 GLU, untied or tied head, float or TriLM ternary projections
(per-group absmean scales, straight-through estimator), in f32 on the CPU. Each step: one
micro-batch of random tokens forward and backward, gradient clipping, an AdamW update. Prints one
JSON line: the median tokens/s over the timed steps, each step's time, the peak resident memory.

    python data-prep/bench_torch.py recipes/tiny.toml --batch 8 --seq 128 --threads 2 --steps 10
"""

import argparse
import json
import resource
import statistics
import time
import tomllib

import torch
import torch.nn as nn
import torch.nn.functional as F


class Linear(nn.Module):
    """A bias-free projection; ternary ones quantise W per scale group with an STE."""

    def __init__(self, d_in, d_out, kind, groups, axis, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in) * 0.02)
        self.kind, self.groups, self.axis, self.eps = kind, groups, axis, eps

    def forward(self, x):
        w = self.weight
        if self.kind == "ternary":
            out, inp, g = w.shape[0], w.shape[1], self.groups
            v = w.view(g, out // g, inp) if self.axis == "rows" else w.view(out, g, inp // g)
            dims = (1, 2) if self.axis == "rows" else (0, 2)
            gamma = v.abs().mean(dim=dims, keepdim=True) + self.eps
            q = ((v / gamma).round().clamp(-1, 1) * gamma).view_as(w)
            w = w + (q - w).detach()
        return F.linear(x, w)


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        h, nh = c["hidden"], c["n_heads"]
        nkv = c.get("n_kv_heads") or nh
        hd = h // nh
        self.nh, self.nkv, self.hd = nh, nkv, hd

        def proj(i, o, axis):
            return Linear(i, o, c.get("linear", "ternary"), c.get("scale_groups", 1), axis,
                          c.get("ternary_eps", 1e-5))

        self.q = proj(h, nh * hd, "rows")
        self.k = proj(h, nkv * hd, "rows")
        self.v = proj(h, nkv * hd, "rows")
        self.o = proj(nh * hd, h, "cols")
        self.gate = proj(h, c["intermediate"], "rows")
        self.up = proj(h, c["intermediate"], "rows")
        self.down = proj(c["intermediate"], h, "cols")
        eps = c.get("rms_eps", 1e-5)
        self.n1 = nn.RMSNorm(h, eps=eps)
        self.n2 = nn.RMSNorm(h, eps=eps)
        self.relu2 = c.get("mlp", "swiglu") == "relu2glu"

    def forward(self, x, cos, sin):
        b, t, _ = x.shape
        y = self.n1(x)

        def heads(z, n):
            return z.view(b, t, n, self.hd).transpose(1, 2)

        def rope(z):
            half = self.hd // 2
            rot = torch.cat([-z[..., half:], z[..., :half]], dim=-1)
            return z * cos + rot * sin

        q = rope(heads(self.q(y), self.nh))
        k = rope(heads(self.k(y), self.nkv))
        v = heads(self.v(y), self.nkv)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.nkv != self.nh)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, self.nh * self.hd))
        y = self.n2(x)
        g = self.gate(y)
        g = F.relu(g).square() if self.relu2 else F.silu(g)
        return x + self.down(g * self.up(y))


class Model(nn.Module):
    def __init__(self, c, vocab):
        super().__init__()
        self.c = c
        self.embed = nn.Embedding(vocab, c["hidden"])
        nn.init.normal_(self.embed.weight, std=0.02)
        self.blocks = nn.ModuleList([Block(c) for _ in range(c["n_layers"])])
        self.norm = nn.RMSNorm(c["hidden"], eps=c.get("rms_eps", 1e-5))
        self.head = None if c.get("tie_embeddings", False) else nn.Linear(c["hidden"], vocab, bias=False)
        if self.head is not None:
            nn.init.normal_(self.head.weight, std=0.02)

    def forward(self, tokens):
        t = tokens.shape[1]
        hd = self.c["hidden"] // self.c["n_heads"]
        inv = self.c.get("rope_theta", 10000.0) ** (-torch.arange(0, hd, 2).float() / hd)
        ang = torch.arange(t).float()[:, None] * inv[None, :]
        ang = torch.cat([ang, ang], dim=-1)
        cos, sin = ang.cos(), ang.sin()
        x = self.embed(tokens)
        for blk in self.blocks:
            x = blk(x, cos, sin)
        x = self.norm(x)
        return x @ self.embed.weight.T if self.head is None else self.head(x)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("recipe")
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--seq", type=int, required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=5,
                    help="untimed steps first (oneDNN builds its kernels on the first calls)")
    ap.add_argument("--vocab", type=int, default=4096, help="when the recipe leaves it to the tokenizer")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    r = tomllib.load(open(a.recipe, "rb"))
    c, o = r["model"], r.get("optim", {})
    vocab = c.get("vocab_size") or a.vocab
    model = Model(c, vocab)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    plain = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.get("weight_decay", 0.1)},
                             {"params": plain, "weight_decay": 0.0}],
                            lr=o.get("lr", 1e-3), betas=(o.get("beta1", 0.9), o.get("beta2", 0.95)),
                            eps=o.get("eps", 1e-8))
    clip = o.get("grad_clip", 1.0)
    tokens = torch.randint(0, vocab, (a.batch, a.seq + 1))
    times = []
    for i in range(a.warmup + a.steps):
        start = time.perf_counter()
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, vocab), tokens[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        if i >= a.warmup:
            times.append(time.perf_counter() - start)
    step = statistics.median(times)
    print(json.dumps({
        "peer": f"pytorch {torch.__version__} eager",
        "threads": torch.get_num_threads(),
        "tokens_per_s": a.batch * a.seq / step,
        "step_ms": [round(t * 1e3, 2) for t in times],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "loss": loss.item(),
    }))


if __name__ == "__main__":
    main()

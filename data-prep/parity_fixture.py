#!/usr/bin/env python3
"""The PyTorch reference of tern's parity harness (tests/parity.rs, docs/parity.md).

Written from the papers' formulas and tern's documented recipe semantics (docs/recipes.md,
docs/bitnet-qsparse.md, docs/distill.md), not from tern's code: a LLaMA decoder in float64 with
the block projections tern trains (FloatLM, TriLM ternary with scale groups, BitNet b1.58's
BitLinear, Q-Sparse top-K, a distillation student's 1-bit input encoders), PyTorch's own AdamW and
clipping, the GaLore authors' `galore_torch.GaLoreAdamW`, and transformers' LlamaForCausalLM as a
check of the float skeleton.

Reads what tern wrote (`inputs.json`: the cases, the token batch; `init.safetensors`: every case's
initial weights by tern's parameter names) and writes, for every case, `<case>.safetensors`
(`logits`, `grad.<name>`, `<optimizer>.<name>` = the parameters after the last step; f32) and
`reference.json` (losses, gradient norms, versions).

    python data-prep/parity_fixture.py [--dir tests/fixtures/parity]

Needs torch, transformers, safetensors and galore-torch (which imports bitsandbytes).
"""

import argparse
import json
import math
import platform
import re
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file, save_file

DT = torch.float64
# Sequences per forward pass (inputs.json's micro_batch).
MICRO_BATCH = 1

# ---------------------------------------------------------------------------------------------
# The block projections, one function per documented kind. `w` is W[out, in] (Hugging Face
# layout); every function returns the tensor the forward pass multiplies by, with the documented
# straight-through gradient.


def groups_view(w, groups, axis):
    """W split into its scale groups: row blocks ([g, out/g, in]) or column blocks ([out, g, in/g])."""
    out, inp = w.shape
    if axis == "rows":
        return w.reshape(groups, out // groups, inp)
    return w.reshape(out, groups, inp // groups)


def group_mean_abs(w, groups, axis):
    """mean |W| of each scale group, shaped to broadcast against groups_view."""
    v = groups_view(w.abs(), groups, axis)
    if axis == "rows":
        return v.mean(dim=(1, 2), keepdim=True)
    return v.mean(dim=(0, 2), keepdim=True)


def ternary_weight(w, groups, axis, eps):
    """TriLM: gamma_g = eps + mean|W_g|, W~ = gamma_g clamp(round(W / gamma_g), -1, 1); STE."""
    gamma = group_mean_abs(w, groups, axis) + eps
    q = (groups_view(w, groups, axis) / gamma).round().clamp(-1, 1) * gamma
    return w + (q.reshape(w.shape) - w).detach()


def bitnet_weight(w, groups, axis):
    """BitNet b1.58: gamma_g = max(mean|W_g|, 1e-5), same ternary rounding; STE."""
    gamma = group_mean_abs(w, groups, axis).clamp_min(1e-5)
    q = (groups_view(w, groups, axis) / gamma).round().clamp(-1, 1) * gamma
    return w + (q.reshape(w.shape) - w).detach()


def absmax8(x):
    """8-bit absmax per row: s = 127 / max(max|x|, 1e-5), clamp(round(x s), -128, 127) / s."""
    s = 127.0 / x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-5)
    return (x * s).round().clamp(-128, 127) / s


def bitnet_input(x, rms_eps):
    """BitLinear's input: weightless RMSNorm, then 8-bit absmax; STE through the rounding."""
    xn = x / torch.sqrt(x.pow(2).mean(dim=-1, keepdim=True) + rms_eps)
    return xn + (absmax8(xn) - xn).detach()


def top_k_input(x, keep, quantized, rescale):
    """Q-Sparse: per row the k = round(keep d) entries of largest magnitude (after 8-bit absmax when
    quantized), ties kept lowest index first; optionally scaled back to the row's norm; STE."""
    d = x.shape[-1]
    k = min(max(int(math.floor(keep * d + 0.5)), 1), d)
    v = absmax8(x) if quantized else x
    # A stable sort keeps equal magnitudes in index order.
    order = torch.sort(v.abs(), dim=-1, descending=True, stable=True).indices[..., :k]
    mask = torch.zeros_like(v).scatter(-1, order, 1.0)
    kept = v * mask
    if rescale:
        kept = kept * x.norm(dim=-1, keepdim=True) / kept.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return x + (kept - x).detach()


class Heaviside(torch.autograd.Function):
    """alpha * sign(z - beta) per channel, with the documented surrogate gradients:
    d/dz = alpha (2/pi) s / sqrt((s y)^2 + 1) (asinh) or alpha (2/pi) s / (1 + (s y)^2) (arctan),
    d/dalpha = (2/pi) atan(y), d/dbeta = -d/dz, where y = z - beta."""

    @staticmethod
    def forward(ctx, z, alpha, beta, surrogate, s):
        y = z - beta
        ctx.save_for_backward(y, alpha)
        ctx.surrogate, ctx.s = surrogate, s
        return alpha * torch.sign(y)

    @staticmethod
    def backward(ctx, g):
        y, alpha = ctx.saved_tensors
        s = ctx.s
        if ctx.surrogate == "asinh":
            slope = (2 / math.pi) * s / torch.sqrt((s * y) ** 2 + 1)
        else:
            slope = (2 / math.pi) * s / (1 + (s * y) ** 2)
        dz = g * alpha * slope
        rows = tuple(range(g.dim() - 1))
        dalpha = (g * (2 / math.pi) * torch.atan(y)).sum(dim=rows)
        dbeta = -dz.sum(dim=rows)
        return dz, dalpha, dbeta, None, None


def encoder(P, prefix, x, distill):
    """Linear(d -> d/2) -> ReLU -> Linear(d/2 -> d) -> Heaviside (docs/distill.md)."""
    h = F.relu(x @ P[prefix + ".fc1"].T)
    z = h @ P[prefix + ".fc2"].T
    return Heaviside.apply(z, P[prefix + ".alpha"], P[prefix + ".beta"], distill["surrogate"], distill["surrogate_scale"])


# ---------------------------------------------------------------------------------------------
# The model: a LLaMA decoder (pre-norm RMSNorm, RoPE in the rotate_half layout, grouped-query
# causal attention, gated MLP), parameters by tern's names.

def axis_of(name):
    """Scale groups split the output rows of a projection that reads the block's input (q, k, v,
    gate, up, Mamba's in and x projections, the experts' own), the input columns of one that
    writes back to it (o, down, Mamba's out)."""
    last = [p for p in name.split(".") if not p.isdigit()][-1]
    return "cols" if last in ("o_proj", "down_proj", "out_proj") else "rows"


class Model:
    def __init__(self, cfg, params, encoded_blocks=(), distill=None):
        """cfg: tern's [model]; params: name -> tensor; encoded_blocks: a student's distilled blocks
        (encoders in front of their projections, cfg's linear kind); the other blocks of a student
        are float copies of the teacher."""
        self.c, self.P = cfg, params
        self.encoded = set(encoded_blocks)
        self.student = distill is not None
        self.distill = distill

    def kind_of(self, layer):
        if self.student and layer not in self.encoded:
            return "float", None
        return self.c["linear"], self.c.get("sparsity")

    def proj(self, layer, name, x, taps=None):
        c = self.c
        prefix = f"layers.{layer}.{name}"
        w = self.P[prefix + ".weight"]
        kind, sparsity = self.kind_of(layer)
        inp = x
        if layer in self.encoded:
            x = encoder(self.P, prefix + ".encoder", x, self.distill)
        axis = axis_of(name)
        if kind == "ternary":
            w = ternary_weight(w, c["scale_groups"], axis, c["ternary_eps"])
        elif kind == "bitnet":
            x = bitnet_input(x, c["rms_eps"])
            w = bitnet_weight(w, c["scale_groups"], axis)
        if sparsity:
            attn = name.startswith("self_attn.")
            keep = sparsity.get("attn_top_k" if attn else "mlp_top_k") or sparsity.get("top_k")
            if keep is not None:
                x = top_k_input(x, keep, sparsity.get("quantized", False), sparsity.get("rescale", False))
        y = x @ w.T
        if taps is not None:
            taps.append((name, inp, y))
        return y

    def norm(self, name, x):
        return x / torch.sqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.c["rms_eps"]) * self.P[name]

    def rope(self, t, hd):
        inv = self.c["rope_theta"] ** (-torch.arange(0, hd, 2, dtype=DT) / hd)
        ang = torch.arange(t, dtype=DT)[:, None] * inv[None, :]
        ang = torch.cat([ang, ang], dim=-1)
        return ang.cos(), ang.sin()

    def attend(self, q, k, v):
        """Causal attention of q [b, nh, t, hd] over k, v [b, nkv, t, hd] (grouped-query, RoPE
        applied by the caller) -> [b, t, nh * hd]."""
        b, nh, t, hd = q.shape
        nkv = k.shape[1]
        k = k.repeat_interleave(nh // nkv, dim=1)
        v = v.repeat_interleave(nh // nkv, dim=1)
        scores = q @ k.transpose(2, 3) / math.sqrt(hd)
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        return (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, t, nh * hd)

    def heads(self, y, n, cos=None, sin=None):
        """[b, t, n * hd] -> [b, n, t, hd], rotated (rotate_half) when the tables are given."""
        b, t, _ = y.shape
        hd = self.c["hidden"] // self.c["n_heads"]
        y = y.reshape(b, t, n, hd).transpose(1, 2)
        if cos is None:
            return y
        rotated = torch.cat([-y[..., hd // 2:], y[..., : hd // 2]], dim=-1)
        return y * cos + rotated * sin

    def attention(self, layer, x, cos, sin, taps):
        c = self.c
        nh, nkv = c["n_heads"], c.get("n_kv_heads") or c["n_heads"]
        q = self.heads(self.proj(layer, "self_attn.q_proj", x, taps), nh, cos, sin)
        k = self.heads(self.proj(layer, "self_attn.k_proj", x, taps), nkv, cos, sin)
        v = self.heads(self.proj(layer, "self_attn.v_proj", x, taps), nkv)
        return self.proj(layer, "self_attn.o_proj", self.attend(q, k, v), taps)

    def mlp(self, layer, x, taps, prefix="mlp."):
        g = self.proj(layer, prefix + "gate_proj", x, taps)
        g = F.silu(g) if self.c["mlp"] == "swiglu" else F.relu(g) ** 2
        return self.proj(layer, prefix + "down_proj", g * self.proj(layer, prefix + "up_proj", x, taps), taps)

    # Issue 23's block kinds (docs/architectures.md, docs/recipes.md).

    def route(self, x, router, k):
        """Top-k routing of every token of x [b, t, h] over the experts of router [E, h]: a dense
        [b, t, E] gate (the softmax weights of the k best renormalized to 1, zero elsewhere) and
        Switch Transformer's balancing loss E sum_e f_e P_e (f_e: share of the t k slots, a count)."""
        probs = (x @ router.T).softmax(dim=-1)
        w, idx = probs.topk(k, dim=-1)
        w = w / w.sum(dim=-1, keepdim=True)
        e = router.shape[0]
        gates = torch.zeros_like(probs).scatter_add(-1, idx, w)
        share = F.one_hot(idx, e).to(DT).reshape(-1, e).mean(dim=0)
        aux = e * (probs.reshape(-1, e).mean(dim=0) * share).sum()
        return gates, aux

    def moe(self, layer, x):
        m = self.c["moe"]
        gates, aux = self.route(x, self.P[f"layers.{layer}.moe.router"], m["top_k"])
        # Every expert on every token, weighted by the gate: zero for the tokens it does not get.
        out = sum(gates[..., e:e + 1] * self.mlp(layer, x, None, f"moe.experts.{e}.")
                  for e in range(m["experts"]))
        return out, m["aux_loss_weight"] * aux

    def moa(self, layer, x, cos, sin):
        c, m = self.c, self.c["moa"]
        nh, nkv = c["n_heads"], c.get("n_kv_heads") or c["n_heads"]
        gates, aux = self.route(x, self.P[f"layers.{layer}.moa.router"], m["top_k"])
        k = self.heads(self.proj(layer, "moa.k_proj", x), nkv, cos, sin)
        v = self.heads(self.proj(layer, "moa.v_proj", x), nkv)
        out = 0
        for e in range(m["experts"]):
            q = self.heads(self.proj(layer, f"moa.q_proj.{e}", x), nh, cos, sin)
            out = out + gates[..., e:e + 1] * self.proj(layer, f"moa.o_proj.{e}", self.attend(q, k, v))
        return out, m["aux_loss_weight"] * aux

    def mamba(self, layer, x):
        """Mamba's selective SSM mixer, the recurrence run step by step."""
        c, m = self.c, self.c.get("mamba") or {}
        h = c["hidden"]
        di, n, dc = m.get("expand", 2) * h, m.get("d_state", 16), m.get("d_conv", 4)
        r = m.get("dt_rank") or -(-h // 16)
        p = lambda name: self.P[f"layers.{layer}.mamba.{name}"]
        xz = self.proj(layer, "mamba.in_proj", x)
        xs, z = xz[..., :di], xz[..., di:]
        b, t, _ = xs.shape
        padded = F.pad(xs, (0, 0, dc - 1, 0))
        conv = p("conv_bias") + sum(padded[:, j:j + t, :] * p("conv_weight")[:, j] for j in range(dc))
        u = F.silu(conv)
        dbc = self.proj(layer, "mamba.x_proj", u)
        delta = F.softplus(dbc[..., :r] @ p("dt_proj_weight").T + p("dt_proj_bias"))
        bm, cm = dbc[..., r:r + n], dbc[..., r + n:r + 2 * n]
        a = -p("a_log").exp()
        state = torch.zeros(b, di, n, dtype=DT)
        ys = []
        for i in range(t):
            dt = delta[:, i, :, None]
            state = (dt * a).exp() * state + dt * bm[:, i, None, :] * u[:, i, :, None]
            ys.append((state * cm[:, i, None, :]).sum(dim=-1) + p("d") * u[:, i])
        y = torch.stack(ys, dim=1)
        return self.proj(layer, "mamba.out_proj", y * F.silu(z))

    def kind(self, i):
        c = self.c
        attention = i % c.get("attention_period", 1) == c.get("attention_offset", 0)
        mixer = ("moa" if c.get("moa") else "attention") if attention else "mamba"
        picks = lambda s, d: s is not None and i % s.get("period", d[0]) == s.get("offset", d[1])
        return mixer, picks(c.get("moe"), (1, 0)), picks(c.get("mod"), (2, 1))

    def block(self, i, x, cos, sin, taps):
        """One block over every token of x: (output, weighted auxiliary loss or 0)."""
        mixer, moe, _ = self.kind(i)
        aux = 0
        hn = self.norm(f"layers.{i}.input_layernorm.weight", x)
        if mixer == "attention":
            x = x + self.attention(i, hn, cos, sin, taps)
        elif mixer == "moa":
            y, a = self.moa(i, hn, cos, sin)
            x, aux = x + y, aux + a
        else:
            x = x + self.mamba(i, hn)
        hn = self.norm(f"layers.{i}.post_attention_layernorm.weight", x)
        if moe:
            y, a = self.moe(i, hn)
            x, aux = x + y, aux + a
        else:
            x = x + self.mlp(i, hn, taps)
        return x, aux

    def routed(self, i, x, cos, sin):
        """Mixture-of-Depths, causal: a token goes through the block when its score x . w is above
        0; its update is scaled by sigmoid(score). The router learns from a binary cross-entropy
        against each sequence's top ceil(capacity t) scores. The block's own auxiliary losses are
        averaged over the sequences that ran it."""
        d = self.c["mod"]
        s = x @ self.P[f"layers.{i}.mod_router.weight"]
        b, t = s.shape
        k = min(max(math.ceil(d["capacity"] * t), 1), t)
        target = torch.zeros_like(s).scatter(-1, s.topk(k, dim=-1).indices, 1.0)
        aux = d["aux_loss_weight"] * (F.softplus(s) - target * s).mean()
        rows, inner = [], []
        for r in range(b):
            pick = (s[r] > 0).nonzero().flatten()
            if len(pick) == 0:
                rows.append(x[r])
                continue
            xs = x[r:r + 1, pick]
            ys, a = self.block(i, xs, cos[pick], sin[pick], None)
            gate = torch.sigmoid(s[r, pick])[None, :, None]
            rows.append(x[r:r + 1].index_add(1, pick, (ys - xs) * gate)[0])
            inner.append(a)
        if inner:
            aux = aux + sum(inner) / len(inner)
        return torch.stack(rows), aux

    def forward(self, tokens, tap_layers=()):
        """logits [b, t, vocab] and, for each layer in tap_layers, its projections' (name, input,
        output); self.aux holds the blocks' weighted auxiliary losses."""
        c = self.c
        x = self.P["embed_tokens.weight"][tokens]
        cos, sin = self.rope(tokens.shape[1], c["hidden"] // c["n_heads"])
        taps = {}
        self.aux = 0
        for i in range(c["n_layers"]):
            tp = taps.setdefault(i, []) if i in tap_layers else None
            if self.kind(i)[2]:
                x, a = self.routed(i, x, cos, sin)
            else:
                x, a = self.block(i, x, cos, sin, tp)
            self.aux = self.aux + a
        x = self.norm("norm.weight", x)
        head = self.P["embed_tokens.weight"] if c["tie_embeddings"] else self.P["lm_head.weight"]
        return x @ head.T, taps


def param_names(cfg, student_blocks=()):
    """tern's parameter names of a case, in tern's module order (docs/architectures.md)."""
    names = ["embed_tokens.weight"]
    model = Model(cfg, {})
    h = cfg["hidden"]
    for i in range(cfg["n_layers"]):
        mixer, moe, routed = model.kind(i)
        blk = [f"input_layernorm.weight"]
        if mixer == "attention":
            blk += [f"self_attn.{p}_proj.weight" for p in "qkvo"]
        elif mixer == "moa":
            e = cfg["moa"]["experts"]
            blk += ["moa.router"] + [f"moa.q_proj.{x}.weight" for x in range(e)]
            blk += ["moa.k_proj.weight", "moa.v_proj.weight"] + [f"moa.o_proj.{x}.weight" for x in range(e)]
        else:
            blk += [f"mamba.{p}" for p in ("in_proj.weight", "conv_weight", "conv_bias", "x_proj.weight",
                                             "dt_proj_weight", "dt_proj_bias", "a_log", "d", "out_proj.weight")]
        blk.append("post_attention_layernorm.weight")
        if moe:
            blk.append("moe.router")
            for x in range(cfg["moe"]["experts"]):
                blk += [f"moe.experts.{x}.{p}_proj.weight" for p in ("gate", "up", "down")]
        else:
            blk += [f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
        if routed:
            blk.append("mod_router.weight")
        for n in blk:
            names.append(f"layers.{i}.{n}")
            if i in student_blocks and n.endswith("_proj.weight"):
                p = n[: -len(".weight")]
                names += [f"layers.{i}.{p}.encoder.{e}" for e in ("fc1", "fc2", "alpha", "beta")]
    names.append("norm.weight")
    if not cfg["tie_embeddings"]:
        names.append("lm_head.weight")
    return names


# ---------------------------------------------------------------------------------------------
# Losses and the recipe semantics: schedule, distillation phases.


def ce(logits, targets):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


class Distill:
    """docs/distill.md: blocks alone for block_steps each, then all together, then end to end."""

    def __init__(self, d, n_layers):
        self.d = d
        self.blocks = d.get("blocks") or list(range(n_layers))

    def phase(self, step):
        per = len(self.blocks) * self.d["block_steps"]
        if step < per:
            return ("block", self.blocks[step // self.d["block_steps"]])
        if step < per + self.d["all_steps"]:
            return ("all", None)
        return ("e2e", None)

    def matched(self, phase):
        return {"block": [phase[1]], "all": self.blocks, "e2e": []}[phase[0]]

    def trains(self, phase, name):
        if phase[0] == "e2e":
            return True
        if name.startswith("layers."):
            return int(name.split(".")[1]) in self.matched(phase)
        if name.startswith("embed_tokens."):
            return self.d["train_embeddings"]
        return self.d["train_head"]

    def loss(self, phase, student, teacher, inputs, targets):
        """mse_weight * sum_i MSE(W_i Enc_i(x_i), y_i) + ce_weight * CE + kl_weight * T^2 KL(t || s)."""
        d = self.d
        matched = self.matched(phase)
        with torch.no_grad():
            t_logits, taps = teacher.forward(inputs, tap_layers=matched)
        mse = torch.zeros((), dtype=DT)
        for layer in matched:
            for name, x, y in taps[layer]:
                mse = mse + (student.proj(layer, name, x) - y).pow(2).mean()
        wm = 0.0 if phase[0] == "e2e" else d["mse_weight"]
        s_logits, _ = student.forward(inputs)
        ce_loss = ce(s_logits, targets)
        temp = d["temperature"]
        log_t = F.log_softmax(t_logits / temp, dim=-1)
        log_s = F.log_softmax(s_logits / temp, dim=-1)
        b, t, _ = log_s.shape
        kl = (log_t.exp() * (log_t - log_s)).sum() / (b * t) * temp**2
        return wm * mse + d["ce_weight"] * ce_loss + d["kl_weight"] * kl, s_logits


def frac_step(f, total):
    return None if f is None else int(math.floor(f * total + 0.5))


def lr_at(o, step, total):
    """Linear warmup to the peak, cosine to lr * min_lr_ratio at the end; from lr_drop_at on the
    peak is lr * lr_drop_factor (docs/recipes.md, [optim])."""
    peak = o["lr"]
    drop = frac_step(o.get("lr_drop_at"), total)
    if drop is not None and step >= drop:
        peak *= o["lr_drop_factor"]
    if step < o["warmup_steps"]:
        return peak * (step + 1) / o["warmup_steps"]
    if o["schedule"] == "constant":
        return peak
    progress = min((step - o["warmup_steps"]) / max(total - o["warmup_steps"], 1), 1.0)
    floor = min(o["lr"] * o["min_lr_ratio"], peak)
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def wd_at(o, step, total):
    off = frac_step(o.get("wd_off_at"), total)
    return 0.0 if off is not None and step >= off else o["weight_decay"]


# ---------------------------------------------------------------------------------------------
# Optimizers: PyTorch's AdamW; the GaLore authors' GaLoreAdamW.


def fixed_sign_svd(self, weights, rank, type):
    """GaLore's projection from an f64 SVD, each singular vector's sign fixed so that its entry
    of largest magnitude (the first such) is positive: SVD routines disagree on signs, and with the
    moments kept across a refresh the update depends on them (docs/recipes.md, optim.svd)."""
    u, _, vh = torch.linalg.svd(weights.to(DT), full_matrices=False)

    def fix(vectors):  # columns
        big = vectors.abs().argmax(dim=0)
        signs = torch.sign(vectors[big, torch.arange(vectors.shape[1])])
        return vectors * signs

    if type == "right":
        return fix(vh[:rank, :].T).T.to(weights.dtype)
    if type == "left":
        return fix(u[:, :rank]).to(weights.dtype)
    raise ValueError(type)


def make_optimizer(o, named):
    """Param groups as tern applies decay: matrices decay, vectors (norm weights, alpha, beta) do
    not; GaLore projects the seven block matrices of every layer."""

    def block_matrix(n, p):
        # Every block projection whose smaller side reaches the rank (docs/recipes.md).
        return re.match(r"layers\.\d+\..*_proj(\.\d+)?\.weight$", n) and min(p.shape) >= (o["rank"] or 0)

    def decays(n, p):
        # Matrices decay, vectors and Mamba's A_log do not.
        return p.dim() >= 2 and not n.endswith(".a_log")

    decay = [p for n, p in named if decays(n, p) and not (o["name"] == "galore_adamw" and block_matrix(n, p))]
    plain = [p for n, p in named if not decays(n, p)]
    kw = dict(lr=o["lr"], betas=(o["beta1"], o["beta2"]), eps=o["eps"])
    groups = [{"params": decay, "weight_decay": o["weight_decay"], "decays": True},
              {"params": plain, "weight_decay": 0.0, "decays": False}]
    if o["name"] == "adamw":
        return torch.optim.AdamW(groups, foreach=False, **kw)
    import galore_torch
    from galore_torch import galore_projector

    galore_projector.GaLoreProjector.get_orthogonal_matrix = fixed_sign_svd
    groups.append({"params": [p for n, p in named if block_matrix(n, p)], "weight_decay": o["weight_decay"],
                   "decays": True, "rank": o["rank"], "update_proj_gap": o["update_proj_gap"],
                   "scale": o["scale"], "proj_type": o["proj_type"]})
    return galore_torch.GaLoreAdamW(groups, no_deprecation_warning=True, **kw)


# ---------------------------------------------------------------------------------------------
# A case.


def build(case, init):
    c = case["model"]
    distill = case.get("distill")
    blocks = (distill.get("blocks") or list(range(c["n_layers"]))) if distill else []
    names = param_names(c, blocks)
    params = {n: init[n].to(DT).clone().requires_grad_(True) for n in names}
    student = Model(c, params, blocks, distill)
    teacher = None
    if distill:
        tc = dict(c, linear="float", sparsity=None)
        tparams = {n: init[n].to(DT) for n in param_names(tc)}
        teacher = Model(tc, tparams)
    return names, params, student, teacher


def batch_loss(case, step, student, teacher, tokens):
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    if teacher is None:
        # Micro-batch by micro-batch, as the trainer accumulates them: the balancing losses are
        # over each micro-batch's tokens (docs/architectures.md), so they do not add up to the
        # whole batch's. The cross-entropy's mean is the same either way (equal sizes).
        m = MICRO_BATCH
        parts = []
        for i in range(0, len(inputs), m):
            logits, _ = student.forward(inputs[i:i + m])
            parts.append((ce(logits, targets[i:i + m]) + student.aux, logits))
        loss = sum(l for l, _ in parts) / len(parts)
        return loss, torch.cat([lg for _, lg in parts])
    d = Distill(case["distill"], case["model"]["n_layers"])
    return d.loss(d.phase(step), student, teacher, inputs, targets)


def trainable(case, step, names):
    if not case.get("distill"):
        return {n: True for n in names}
    d = Distill(case["distill"], case["model"]["n_layers"])
    ph = d.phase(step)
    return {n: d.trains(ph, n) for n in names}


def run_case(case, init, tokens, steps):
    names, params, student, teacher = build(case, init)
    loss, logits = batch_loss(case, 0, student, teacher, tokens)
    loss.backward()
    out = {"logits": logits.detach()}
    for n in names:
        g = params[n].grad
        out[f"grad.{n}"] = torch.zeros_like(params[n]) if g is None else g.detach()
    scalars = {"loss": loss.item()}
    for opt_name, o in case["optims"].items():
        names, params, student, teacher = build(case, init)
        named = [(n, params[n]) for n in names]
        opt = make_optimizer(o, named)
        total = o.get("decay_steps") or steps
        losses, norms = [], []
        for step in range(steps):
            for p in params.values():
                p.grad = None
            loss, _ = batch_loss(case, step, student, teacher, tokens)
            loss.backward()
            train = trainable(case, step, names)
            for n in names:
                # Frozen: no gradient, so no update and no change of the optimizer's state.
                if not train[n]:
                    params[n].grad = None
                elif params[n].grad is None:
                    params[n].grad = torch.zeros_like(params[n])
            live = [params[n] for n in names if train[n]]
            clip = o["grad_clip"]
            norm = torch.nn.utils.clip_grad_norm_(live, clip if clip > 0 else float("inf"))
            for g in opt.param_groups:
                g["lr"] = lr_at(o, step, total)
                if g["decays"]:
                    g["weight_decay"] = wd_at(o, step, total)
            opt.step()
            losses.append(loss.item())
            norms.append(norm.item())
        scalars[opt_name] = {"losses": losses, "grad_norms": norms}
        for n in names:
            out[f"{opt_name}.{n}"] = params[n].detach()
    return out, scalars


def transformers_logits(case, init, tokens):
    """The float case's logits from transformers' LlamaForCausalLM (f32, eager attention)."""
    c = case["model"]
    cfg = transformers.LlamaConfig(
        vocab_size=c["vocab_size"], hidden_size=c["hidden"], intermediate_size=c["intermediate"],
        num_hidden_layers=c["n_layers"], num_attention_heads=c["n_heads"],
        num_key_value_heads=c.get("n_kv_heads") or c["n_heads"], rms_norm_eps=c["rms_eps"],
        rope_theta=c["rope_theta"], tie_word_embeddings=c["tie_embeddings"], hidden_act="silu",
        max_position_embeddings=tokens.shape[1], attention_bias=False, mlp_bias=False)
    cfg._attn_implementation = "eager"
    model = transformers.LlamaForCausalLM(cfg).to(torch.float32).eval()
    state = {("lm_head.weight" if n == "lm_head.weight" else "model." + n): init[n]
             for n in param_names(c)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    with torch.no_grad():
        return model(tokens[:, :-1]).logits.to(DT)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default=str(Path(__file__).resolve().parent.parent / "tests/fixtures/parity"))
    args = ap.parse_args()
    d = Path(args.dir)
    torch.set_num_threads(2)
    inputs = json.loads((d / "inputs.json").read_text())
    global MICRO_BATCH
    MICRO_BATCH = inputs["micro_batch"]
    init = load_file(d / "init.safetensors")
    tokens = torch.tensor(inputs["tokens"], dtype=torch.long)
    report = {
        "written_by": "python data-prep/parity_fixture.py",
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__,
                     "galore_torch": __import__("importlib.metadata").metadata.version("galore-torch")},
        "cases": {},
    }
    for name, case in inputs["cases"].items():
        tensors, scalars = run_case(case, init, tokens, inputs["steps"])
        if name == "float":
            diff = (transformers_logits(case, init, tokens) - tensors["logits"]).abs().max().item()
            scale = tensors["logits"].abs().max().item()
            # transformers computes in f32 (norms, RoPE tables, softmax): agreement to f32 rounding.
            assert diff <= 1e-5 * scale, f"float logits differ from transformers' by {diff}"
            report["transformers_float_logits_max_abs_diff"] = diff
        save_file({k: v.to(torch.float32).contiguous() for k, v in tensors.items()}, d / f"{name}.safetensors")
        report["cases"][name] = scalars
        print(name, "loss", scalars["loss"], {k: v["losses"][-1] for k, v in scalars.items() if k != "loss"})
    (d / "reference.json").write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()

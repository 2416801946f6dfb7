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
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file, save_file

DT = torch.float64

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

COLUMN = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"}


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
        axis = "rows" if name in COLUMN else "cols"
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

    def attention(self, layer, x, cos, sin, taps):
        c = self.c
        b, t, _ = x.shape
        nh, nkv = c["n_heads"], c.get("n_kv_heads") or c["n_heads"]
        hd = c["hidden"] // nh

        def heads(y, n):
            return y.reshape(b, t, n, hd).transpose(1, 2)

        def rotate_half(y):
            return torch.cat([-y[..., hd // 2:], y[..., : hd // 2]], dim=-1)

        q = heads(self.proj(layer, "self_attn.q_proj", x, taps), nh)
        k = heads(self.proj(layer, "self_attn.k_proj", x, taps), nkv)
        v = heads(self.proj(layer, "self_attn.v_proj", x, taps), nkv)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k = k.repeat_interleave(nh // nkv, dim=1)
        v = v.repeat_interleave(nh // nkv, dim=1)
        scores = q @ k.transpose(2, 3) / math.sqrt(hd)
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        out = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, t, nh * hd)
        return self.proj(layer, "self_attn.o_proj", out, taps)

    def mlp(self, layer, x, taps):
        g = self.proj(layer, "mlp.gate_proj", x, taps)
        g = F.silu(g) if self.c["mlp"] == "swiglu" else F.relu(g) ** 2
        return self.proj(layer, "mlp.down_proj", g * self.proj(layer, "mlp.up_proj", x, taps), taps)

    def forward(self, tokens, tap_layers=()):
        """logits [b, t, vocab] and, for each layer in tap_layers, its projections' (name, input,
        output)."""
        c = self.c
        x = self.P["embed_tokens.weight"][tokens]
        cos, sin = self.rope(tokens.shape[1], c["hidden"] // c["n_heads"])
        taps = {}
        for i in range(c["n_layers"]):
            tp = taps.setdefault(i, []) if i in tap_layers else None
            x = x + self.attention(i, self.norm(f"layers.{i}.input_layernorm.weight", x), cos, sin, tp)
            x = x + self.mlp(i, self.norm(f"layers.{i}.post_attention_layernorm.weight", x), tp)
        x = self.norm("norm.weight", x)
        head = self.P["embed_tokens.weight"] if c["tie_embeddings"] else self.P["lm_head.weight"]
        return x @ head.T, taps


def param_names(cfg, student_blocks=()):
    """tern's parameter names of a case, in tern's module order."""
    names = ["embed_tokens.weight"]
    projs = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    for i in range(cfg["n_layers"]):
        names.append(f"layers.{i}.input_layernorm.weight")
        for p in projs:
            if p == "mlp.gate_proj":
                names.append(f"layers.{i}.post_attention_layernorm.weight")
            names.append(f"layers.{i}.{p}.weight")
            if i in student_blocks:
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

    def block_matrix(n):
        return n.startswith("layers.") and n.endswith("_proj.weight")

    decay = [p for n, p in named if p.dim() >= 2 and not (o["name"] == "galore_adamw" and block_matrix(n))]
    plain = [p for n, p in named if p.dim() < 2]
    kw = dict(lr=o["lr"], betas=(o["beta1"], o["beta2"]), eps=o["eps"])
    groups = [{"params": decay, "weight_decay": o["weight_decay"], "decays": True},
              {"params": plain, "weight_decay": 0.0, "decays": False}]
    if o["name"] == "adamw":
        return torch.optim.AdamW(groups, foreach=False, **kw)
    import galore_torch
    from galore_torch import galore_projector

    galore_projector.GaLoreProjector.get_orthogonal_matrix = fixed_sign_svd
    groups.append({"params": [p for n, p in named if block_matrix(n)], "weight_decay": o["weight_decay"],
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
        logits, _ = student.forward(inputs)
        return ce(logits, targets), logits
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

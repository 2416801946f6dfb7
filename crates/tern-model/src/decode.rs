//! Generation on the burn path, for every block kind: tokens run after a cache of what came
//! before them, the keys and values of attention (shared by a mixture of attention heads' experts)
//! and the convolution window and state of a Mamba mixer. A routed block (Mixture-of-Depths)
//! caches only the tokens it picked, which is what its attention saw in training. The logits
//! equal the training forward pass's at every position (tested), so generation is as causal as
//! training: nothing a token's logits depend on comes after it.
//!
//! One sequence at a time (batch 1), as `tern generate` runs.

use burn::tensor::activation::{sigmoid, silu, softmax};
use burn::tensor::backend::Backend;
use burn::tensor::{IndexingUpdateOp, Int, Tensor, TensorData};
use tern_kernels::Kernels;

use crate::attention::Attention;
use crate::hooks::Hooks;
use crate::mamba::Mamba;
use crate::moa::Moa;
use crate::model::{Block, Llama};
use crate::rope::rope_tables;

/// What one block keeps of the tokens it has run.
#[derive(Debug, Clone)]
pub struct BlockCache<B: Backend> {
    /// Keys (after RoPE) and values, `[1, tokens, kv_heads, head_dim]`.
    pub kv: Option<(Tensor<B, 4>, Tensor<B, 4>)>,
    /// Mamba: the last `d_conv - 1` inputs of the convolution, `[1, d_conv - 1, d_inner]`.
    pub conv: Option<Tensor<B, 3>>,
    /// Mamba: the state, `[1, d_inner, d_state]`.
    pub ssm: Option<Tensor<B, 3>>,
}

impl<B: Backend> Default for BlockCache<B> {
    fn default() -> Self {
        Self {
            kv: None,
            conv: None,
            ssm: None,
        }
    }
}

/// A sequence's cache: one per block, and the positions run so far.
#[derive(Debug, Clone)]
pub struct DecodeCache<B: Backend> {
    pub blocks: Vec<BlockCache<B>>,
    pub len: usize,
}

impl<B: Backend> DecodeCache<B> {
    pub fn new(n_layers: usize) -> Self {
        Self {
            blocks: (0..n_layers).map(|_| BlockCache::default()).collect(),
            len: 0,
        }
    }
}

impl<B: Kernels, H: Hooks<B>> Llama<B, H> {
    /// The logits `[1, s, vocab]` of `tokens` (`[1, s]`), which follow the `cache.len` positions
    /// the cache holds; the cache is extended by them.
    pub fn decode(&self, tokens: Tensor<B, 2, Int>, cache: &mut DecodeCache<B>) -> Tensor<B, 3> {
        let [b, s] = tokens.dims();
        assert_eq!(b, 1, "decoding runs one sequence");
        let device = tokens.device();
        let (pos0, end) = (cache.len, cache.len + s);
        let (cos, sin) = rope_tables::<B>(end, self.head_dim, self.rope_theta, &device);
        let positions: Vec<i64> = (pos0 as i64..end as i64).collect();
        let mut x = self.embed(tokens);
        for (block, c) in self.layers.iter().zip(&mut cache.blocks) {
            x = block.decode(x, &positions, (&cos, &sin), c);
        }
        cache.len = end;
        self.ends.whole_logits(self.head(x))
    }
}

fn ints<B: Backend>(v: &[i64], device: &B::Device) -> Tensor<B, 1, Int> {
    Tensor::from_data(TensorData::new(v.to_vec(), [v.len()]), device)
}

impl<B: Kernels, H: Hooks<B>> Block<B, H> {
    /// `x: [1, s, hidden]` at `positions`, with the RoPE tables of every position so far.
    fn decode(
        &self,
        x: Tensor<B, 3>,
        positions: &[i64],
        (cos, sin): (&Tensor<B, 2>, &Tensor<B, 2>),
        cache: &mut BlockCache<B>,
    ) -> Tensor<B, 3> {
        let device = x.device();
        let table = |t: &Tensor<B, 2>, p: &[i64]| t.clone().select(0, ints::<B>(p, &device));
        let Some(router) = &self.mod_router else {
            return self.decode_every_token(x, table(cos, positions), table(sin, positions), cache);
        };
        // Mixture-of-Depths: the causal pick of training ([`crate::depth::DepthRouter::pick`]).
        let mut pick = router.pick(x.clone());
        let (scores, picked) = (pick.scores, pick.rows.remove(0));
        if picked.is_empty() {
            return x;
        }
        let n = picked.len();
        let at: Vec<i64> = picked.iter().map(|&i| positions[i as usize]).collect();
        let idx = ints::<B>(&picked, &device);
        let xs = x.clone().select(1, idx.clone());
        let ys = self.decode_every_token(xs.clone(), table(cos, &at), table(sin, &at), cache);
        let gate = sigmoid(scores).select(1, idx.clone()).reshape([1, n, 1]);
        x.select_assign(1, idx, (ys - xs) * gate, IndexingUpdateOp::Add)
    }

    fn decode_every_token(
        &self,
        x: Tensor<B, 3>,
        cos: Tensor<B, 2>,
        sin: Tensor<B, 2>,
        cache: &mut BlockCache<B>,
    ) -> Tensor<B, 3> {
        let h = self.input_layernorm.forward(x.clone());
        let mixed = if let Some(a) = &self.self_attn {
            a.decode(h, cos, sin, &mut cache.kv)
        } else if let Some(a) = &self.moa {
            a.decode(h, cos, sin, &mut cache.kv)
        } else {
            let m = self.mamba.as_ref().expect("a block has a mixer");
            m.decode(h, cache)
        };
        let x = x + mixed;
        let h = self.post_attention_layernorm.forward(x.clone());
        let fed = match (&self.mlp, &self.moe) {
            (Some(m), _) => m.forward(h),
            (None, Some(m)) => m.forward(h).0,
            (None, None) => unreachable!("a block has a feed-forward layer"),
        };
        x + fed
    }
}

/// Attention of `q: [1, s, heads, hd]` over every cached key and value `[1, t, kv_heads, hd]`
/// (the last `s` of which are the queries' own): query `i` sees keys up to `t - s + i`.
fn attend<B: Backend>(q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>) -> Tensor<B, 3> {
    let [b, s, nh, hd] = q.dims();
    let [_, t, nkv, _] = k.dims();
    let group = nh / nkv;
    let widen = |x: Tensor<B, 4>| {
        x.reshape([b, t, nkv, 1, hd])
            .expand([b, t, nkv, group, hd])
            .reshape([b, t, nh, hd])
            .swap_dims(1, 2)
    };
    let (k, v) = (widen(k), widen(v));
    let q = q.swap_dims(1, 2);
    let scores = q.matmul(k.swap_dims(2, 3)) / (hd as f64).sqrt();
    let mask: Vec<bool> = (0..s)
        .flat_map(|i| (0..t).map(move |j| j > t - s + i))
        .collect();
    let mask = Tensor::<B, 2, burn::tensor::Bool>::from_data(
        TensorData::new(mask, [s, t]),
        &scores.device(),
    )
    .reshape([1, 1, s, t])
    .expand([b, nh, s, t]);
    let p = softmax(scores.mask_fill(mask, f32::NEG_INFINITY), 3);
    p.matmul(v).swap_dims(1, 2).reshape([b, s, nh * hd])
}

/// Appends `k, v` to the cache, returning all keys and values so far.
fn extend<B: Backend>(
    kv: &mut Option<(Tensor<B, 4>, Tensor<B, 4>)>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
) -> (Tensor<B, 4>, Tensor<B, 4>) {
    let all = match kv.take() {
        Some((k0, v0)) => (Tensor::cat(vec![k0, k], 1), Tensor::cat(vec![v0, v], 1)),
        None => (k, v),
    };
    *kv = Some(all.clone());
    all
}

/// `y: [b, s, n * hd]` as `n` heads, rotated by the RoPE tables of its positions.
fn rope_heads<B: Kernels>(
    y: Tensor<B, 3>,
    n: usize,
    (cos, sin): (&Tensor<B, 2>, &Tensor<B, 2>),
) -> Tensor<B, 4> {
    let [b, s, w] = y.dims();
    B::rope(y.reshape([b, s, n, w / n]), cos.clone(), sin.clone())
}

impl<B: Kernels, H: Hooks<B>> Attention<B, H> {
    fn decode(
        &self,
        x: Tensor<B, 3>,
        cos: Tensor<B, 2>,
        sin: Tensor<B, 2>,
        kv: &mut Option<(Tensor<B, 4>, Tensor<B, 4>)>,
    ) -> Tensor<B, 3> {
        let x = self.input.module_input(x);
        let q = rope_heads(self.q_proj.forward(x.clone()), self.n_heads, (&cos, &sin));
        let k = rope_heads(
            self.k_proj.forward(x.clone()),
            self.n_kv_heads,
            (&cos, &sin),
        );
        let [b, s, _] = x.dims();
        let v = self
            .v_proj
            .forward(x)
            .reshape([b, s, self.n_kv_heads, self.head_dim]);
        let (k, v) = extend(kv, k, v);
        self.o_proj.forward(attend(q, k, v))
    }
}

impl<B: Kernels, H: Hooks<B>> Moa<B, H> {
    fn decode(
        &self,
        x: Tensor<B, 3>,
        cos: Tensor<B, 2>,
        sin: Tensor<B, 2>,
        kv: &mut Option<(Tensor<B, 4>, Tensor<B, 4>)>,
    ) -> Tensor<B, 3> {
        let [b, s, h] = x.dims();
        let hd = self.head_dim;
        let (gates, _) = self.gates(x.clone());
        let x = self.input.module_input(x);
        let k = rope_heads(
            self.k_proj.forward(x.clone()),
            self.n_kv_heads,
            (&cos, &sin),
        );
        let v = self
            .v_proj
            .forward(x.clone())
            .reshape([b, s, self.n_kv_heads, hd]);
        let (k, v) = extend(kv, k, v);
        let mut out = Tensor::<B, 3>::zeros([b, s, h], &x.device());
        for (ex, (qp, op)) in self.q_proj.iter().zip(&self.o_proj).enumerate() {
            let q = rope_heads(qp.forward(x.clone()), self.n_heads, (&cos, &sin));
            let gate = gates
                .clone()
                .slice([0..b * s, ex..ex + 1])
                .reshape([b, s, 1]);
            out = out + op.forward(attend(q, k.clone(), v.clone())) * gate;
        }
        out
    }
}

impl<B: Kernels, H: Hooks<B>> Mamba<B, H> {
    /// The mixer over `x: [1, s, hidden]` after the cached window and state, step by step.
    fn decode(&self, x: Tensor<B, 3>, cache: &mut BlockCache<B>) -> Tensor<B, 3> {
        let (xs, z) = self.split_input(x);
        let [b, s, d_inner] = xs.dims();
        let device = xs.device();
        let n = self.d_state;
        let k = self.conv_weight.dims()[1];
        let past =
            (cache.conv.take()).unwrap_or_else(|| Tensor::zeros([b, k - 1, d_inner], &device));
        let window = Tensor::cat(vec![past, xs], 1);
        cache.conv = Some(window.clone().slice([0..b, s..s + k - 1, 0..d_inner]));
        let x = self.conv(window);
        let (delta, bm, cm) = self.selection(x.clone());
        let a = self.a_log.val().exp().neg().reshape([1, d_inner, n]);
        let d = self.d.val().reshape([1, 1, d_inner]);
        let mut state =
            (cache.ssm.take()).unwrap_or_else(|| Tensor::zeros([b, d_inner, n], &device));
        let mut ys = Vec::with_capacity(s);
        for t in 0..s {
            let step = |v: &Tensor<B, 3>, w: usize| v.clone().slice([0..b, t..t + 1, 0..w]);
            let dt = step(&delta, d_inner).reshape([b, d_inner, 1]);
            let xt = step(&x, d_inner).reshape([b, d_inner, 1]);
            let bt = step(&bm, n).reshape([b, 1, n]);
            let ct = step(&cm, n).reshape([b, 1, n]);
            state = (dt.clone() * a.clone()).exp() * state + dt * xt * bt;
            ys.push((state.clone() * ct).sum_dim(2).reshape([b, 1, d_inner]));
        }
        cache.ssm = Some(state);
        let y = Tensor::cat(ys, 1) + x * d;
        self.out_proj.forward(y * silu(z))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linear::LinearKind;
    use crate::model::tests::kinds;
    use crate::ModelConfig;
    use burn::backend::Flex;

    /// Running a sequence a few tokens at a time through the cache gives the training forward
    /// pass's logits at every position, for every kind (LLaMA too), float and ternary.
    #[test]
    fn cached_decoding_gives_the_forward_logits() {
        let dev = Default::default();
        for linear in [LinearKind::Float, LinearKind::Ternary] {
            let mut all = kinds(linear);
            all.push(("llama", ModelConfig::tiny(50, linear)));
            for (what, c) in all {
                let m = Llama::<Flex>::new(&c, &dev);
                let ids: Vec<i32> = (0..11).map(|i| (i * 7 + 3) % 50).collect();
                let tokens = |v: &[i32]| {
                    Tensor::<Flex, 2, Int>::from_data(
                        TensorData::new(v.to_vec(), [1, v.len()]),
                        &dev,
                    )
                };
                let want: Vec<f32> = m.forward(tokens(&ids)).into_data().to_vec().unwrap();
                let mut cache = DecodeCache::new(c.n_layers);
                let mut got = Vec::new();
                // A prompt of 4, then 1, 1, then 3 and 2 (a later turn's prompt).
                for chunk in [0..4, 4..5, 5..6, 6..9, 9..11] {
                    let l: Vec<f32> = m
                        .decode(tokens(&ids[chunk]), &mut cache)
                        .into_data()
                        .to_vec()
                        .unwrap();
                    got.extend(l);
                }
                assert_eq!(cache.len, 11);
                let diff = got
                    .iter()
                    .zip(&want)
                    .fold(0f32, |d, (a, b)| d.max((a - b).abs()));
                assert!(diff < 2e-4, "{what} {linear:?}: max difference {diff}");
            }
        }
    }
}

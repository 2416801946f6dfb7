//! The LLaMA / TriLM decoder: embedding, blocks of (RMSNorm, attention, RMSNorm, SwiGLU), final
//! norm, LM head. Field names follow Hugging Face's `LlamaForCausalLM` so checkpoints map 1:1.

use std::marker::PhantomData;

use burn::module::{Initializer, Module};
use burn::nn::{Embedding, EmbeddingConfig};
use burn::tensor::backend::Backend;
use burn::tensor::{ElementConversion, Int, Tensor};
use tern_kernels::Kernels;

use crate::attention::Attention;
use crate::config::ModelConfig;
use crate::hooks::{Hooks, NoHooks};
use crate::linear::{LinearKind, ProjLinear, ProjLinearConfig, ScaleAxis};
use crate::mlp::Mlp;
use crate::norm::RmsNorm;
use crate::rope::rope_tables;

#[derive(Module, Debug)]
pub struct Block<B: Backend, H = NoHooks> {
    pub input_layernorm: RmsNorm<B>,
    pub self_attn: Attention<B, H>,
    pub post_attention_layernorm: RmsNorm<B>,
    pub mlp: Mlp<B, H>,
    /// Tells burn's derive that `H` is not a module (only the projections carry hooks).
    #[module(skip)]
    pub hooks: PhantomData<H>,
}

impl<B: Backend> Block<B> {
    fn new(c: &ModelConfig, device: &B::Device) -> Self {
        let norm = || RmsNorm::new(c.hidden, c.rms_eps, device);
        Self {
            input_layernorm: norm(),
            self_attn: Attention::new(c, device),
            post_attention_layernorm: norm(),
            mlp: Mlp::new(c, device),
            hooks: PhantomData,
        }
    }
}

/// The Hugging Face names of a block's seven projections, in module order.
pub const PROJECTION_NAMES: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

impl<B: Backend, H> Block<B, H> {
    /// The seven projections with their Hugging Face names ([`PROJECTION_NAMES`]).
    pub fn projections(&self) -> [(&'static str, &ProjLinear<B, H>); 7] {
        let (a, m) = (&self.self_attn, &self.mlp);
        let p = [
            &a.q_proj,
            &a.k_proj,
            &a.v_proj,
            &a.o_proj,
            &m.gate_proj,
            &m.up_proj,
            &m.down_proj,
        ];
        std::array::from_fn(|i| (PROJECTION_NAMES[i], p[i]))
    }

    /// Sets every projection's [`ProjLinear::quant_mix`] (a ramp into quantization: 0 float, 1
    /// the linear kind's quantized weight; float layers ignore it).
    pub fn set_quant_mix(&mut self, mix: f64) {
        let (a, m) = (&mut self.self_attn, &mut self.mlp);
        for p in [
            &mut a.q_proj,
            &mut a.k_proj,
            &mut a.v_proj,
            &mut a.o_proj,
            &mut m.gate_proj,
            &mut m.up_proj,
            &mut m.down_proj,
        ] {
            p.quant_mix = mix;
        }
    }

    /// The projection named `name` (`self_attn.q_proj`, ..., as [`Self::projections`] names them).
    pub fn projection(&self, name: &str) -> &ProjLinear<B, H> {
        self.projections()
            .into_iter()
            .find(|(n, _)| *n == name)
            .map(|(_, p)| p)
            .unwrap_or_else(|| panic!("no projection {name}"))
    }

    /// This block with every projection's (and module input's) hooks mapped by `f`, which is told
    /// the projection's name (`None` for a module input).
    pub fn map_hooks<H2>(self, f: &mut impl FnMut(Option<&'static str>, H) -> H2) -> Block<B, H2> {
        let (a, m) = (self.self_attn, self.mlp);
        let mut p = |name, x: ProjLinear<B, H>| x.map_hooks(|h| f(Some(name), h));
        let [nq, nk, nv, no, ngate, nup, ndown] = PROJECTION_NAMES;
        let (q, k, v, o) = (
            p(nq, a.q_proj),
            p(nk, a.k_proj),
            p(nv, a.v_proj),
            p(no, a.o_proj),
        );
        let (gate, up, down) = (
            p(ngate, m.gate_proj),
            p(nup, m.up_proj),
            p(ndown, m.down_proj),
        );
        Block {
            input_layernorm: self.input_layernorm,
            self_attn: Attention {
                q_proj: q,
                k_proj: k,
                v_proj: v,
                o_proj: o,
                input: f(None, a.input),
                n_heads: a.n_heads,
                n_kv_heads: a.n_kv_heads,
                head_dim: a.head_dim,
            },
            post_attention_layernorm: self.post_attention_layernorm,
            mlp: Mlp {
                gate_proj: gate,
                up_proj: up,
                down_proj: down,
                input: f(None, m.input),
                kind: m.kind,
            },
            hooks: PhantomData,
        }
    }
}

impl<B: Kernels, H: Hooks<B>> Block<B, H> {
    /// `x: [batch, seq, hidden]` through attention and the MLP, each with its residual.
    pub fn forward(&self, x: Tensor<B, 3>, cos: &Tensor<B, 2>, sin: &Tensor<B, 2>) -> Tensor<B, 3> {
        let x = x.clone()
            + self
                .self_attn
                .forward(self.input_layernorm.forward(x), cos, sin);
        x.clone() + self.mlp.forward(self.post_attention_layernorm.forward(x))
    }
}

/// The decoder. `H` is what was applied to its projections from outside (tensor parallelism by
/// `tern_parallel::parallelize`, the distillation taps of [`crate::taps`]); `NoHooks` is the model.
#[derive(Module, Debug)]
pub struct Llama<B: Backend, H = NoHooks> {
    pub embed_tokens: Embedding<B>,
    pub layers: Vec<Block<B, H>>,
    pub norm: RmsNorm<B>,
    /// `None` when the head is tied to the embedding.
    pub lm_head: Option<ProjLinear<B, H>>,
    #[module(skip)]
    pub head_dim: usize,
    #[module(skip)]
    pub rope_theta: f64,
    /// The hooks of the model's ends: the embedding, the head's input, the loss.
    #[module(skip)]
    pub ends: H,
}

impl<B: Backend> Llama<B> {
    /// Builds the model; `config.validate()` must have passed.
    pub fn new(c: &ModelConfig, device: &B::Device) -> Self {
        let embed_tokens = EmbeddingConfig::new(c.vocab(), c.hidden)
            .with_initializer(Initializer::Normal {
                mean: 0.0,
                std: c.init_std,
            })
            .init(device);
        let layers = (0..c.n_layers).map(|_| Block::new(c, device)).collect();
        let lm_head = (!c.tie_embeddings).then(|| {
            ProjLinearConfig {
                d_in: c.hidden,
                d_out: c.vocab(),
                kind: LinearKind::Float,
                groups: 1,
                axis: ScaleAxis::Rows,
                eps: c.ternary_eps,
                init_std: c.init_std,
                sparsity: None,
                rms_eps: c.rms_eps,
            }
            .init(device)
        });
        Self {
            embed_tokens,
            layers,
            norm: RmsNorm::new(c.hidden, c.rms_eps, device),
            lm_head,
            head_dim: c.head_dim(),
            rope_theta: c.rope_theta,
            ends: NoHooks,
        }
    }
}

impl<B: Kernels, H: Hooks<B>> Llama<B, H> {
    /// `tokens: [batch, seq]` -> logits `[batch, seq, vocab]`.
    pub fn forward(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let x = self.forward_blocks(tokens, self.layers.len());
        self.ends.whole_logits(self.head(x))
    }

    /// The embedding of `tokens`, as the first block takes it.
    pub fn embed(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        self.ends.embed(self.embed_tokens.weight.val(), tokens)
    }

    /// The hidden states after the embedding and the first `n_blocks` blocks (a pass that stops
    /// early, as layer-wise distillation's teacher does).
    pub fn forward_blocks(&self, tokens: Tensor<B, 2, Int>, n_blocks: usize) -> Tensor<B, 3> {
        let [_, t] = tokens.dims();
        let (cos, sin) = self.rope(t, &tokens.device());
        let mut x = self.embed(tokens);
        for block in self.layers.iter().take(n_blocks) {
            x = block.forward(x, &cos, &sin);
        }
        x
    }

    /// The RoPE tables of `seq` positions.
    pub fn rope(&self, seq: usize, device: &B::Device) -> (Tensor<B, 2>, Tensor<B, 2>) {
        rope_tables::<B>(seq, self.head_dim, self.rope_theta, device)
    }

    /// Final norm and LM head: hidden states -> logits (this rank's block of the vocabulary
    /// when it is split).
    pub fn head(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let x = self.ends.head_input(self.norm.forward(x));
        match &self.lm_head {
            Some(head) => head.forward(x),
            None => {
                let [b, t, h] = x.dims();
                let w = self.embed_tokens.weight.val();
                let v = w.dims()[0];
                <B as Kernels>::linear(x.reshape([b * t, h]), w).reshape([b, t, v])
            }
        }
    }

    /// Mean next-token cross-entropy of `tokens[:, :-1]` predicting `tokens[:, 1:]`.
    pub fn loss(&self, block: Tensor<B, 2, Int>) -> Tensor<B, 1> {
        let [_, t1] = block.dims();
        let inputs = block.clone().narrow(1, 0, t1 - 1);
        let targets = block.narrow(1, 1, t1 - 1);
        self.head_loss(self.forward_blocks(inputs, self.layers.len()), targets)
    }

    /// Mean cross-entropy of the last hidden states `x` against `targets`.
    pub fn head_loss(&self, x: Tensor<B, 3>, targets: Tensor<B, 2, Int>) -> Tensor<B, 1> {
        self.ends.loss(self.head(x), targets)
    }
}

impl<B: Backend, H> Llama<B, H> {
    /// This model with every hook mapped by `f` (told the layer and the projection's name; `None`
    /// for module inputs, the head and the model's ends): how `parallelize` and the taps are applied.
    pub fn map_hooks<H2>(
        self,
        mut f: impl FnMut(Option<(usize, &'static str)>, H) -> H2,
    ) -> Llama<B, H2> {
        let layers = self
            .layers
            .into_iter()
            .enumerate()
            .map(|(i, b)| b.map_hooks(&mut |name, h| f(name.map(|n| (i, n)), h)))
            .collect();
        Llama {
            embed_tokens: self.embed_tokens,
            layers,
            norm: self.norm,
            lm_head: self.lm_head.map(|p| p.map_hooks(|h| f(None, h))),
            head_dim: self.head_dim,
            rope_theta: self.rope_theta,
            ends: f(None, self.ends),
        }
    }
}

impl<B: Backend, H> Llama<B, H> {
    /// `(layer name, fraction of zero ternary codes)` for every ternary projection.
    pub fn ternary_zero_fractions(&self) -> Vec<(String, f64)> {
        let (mut names, mut shares) = (Vec::new(), Vec::new());
        for (i, l) in self.layers.iter().enumerate() {
            for (name, p) in l.projections() {
                if let Some(z) = p.zero_share() {
                    names.push(format!("layers.{i}.{name}"));
                    shares.push(z);
                }
            }
        }
        if shares.is_empty() {
            return Vec::new();
        }
        // One read back for all of them.
        let values = Tensor::cat(shares, 0).into_data();
        names.into_iter().zip(values.iter::<f64>()).collect()
    }
}

/// Zero entries in the inputs a type of projection multiplies (after the top-K and BitNet's
/// quantization, when there are): Q-Sparse's achieved activation sparsity.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ActivationCount {
    pub layer: crate::sparsity::LayerType,
    pub zeros: f64,
    pub total: f64,
    /// The input is this rank's block of the columns (row-parallel): counts add over the group.
    pub sharded: bool,
}

impl<B: Kernels, H: Hooks<B>> Llama<B, H> {
    /// One forward pass over `tokens`, counting zero inputs of every projection by layer type.
    pub fn activation_counts(&self, tokens: Tensor<B, 2, Int>) -> Vec<ActivationCount> {
        let layers: Vec<usize> = (0..self.layers.len()).collect();
        let (tapped, recorder) = crate::taps::tap(self.clone(), &layers);
        tapped.forward_blocks(tokens, self.layers.len());
        let mut out = Vec::new();
        for (block, taps) in self.layers.iter().zip(recorder.take::<B>(&layers)) {
            for tap in taps {
                let p = block.projection(tap.name);
                let x = p.matmul_input(tap.input.detach());
                let total = x.shape().num_elements() as f64;
                let zeros: f64 = x.equal_elem(0.0).int().sum().into_scalar().elem();
                out.push(ActivationCount {
                    layer: if tap.name.starts_with("mlp.") {
                        crate::sparsity::LayerType::Mlp
                    } else {
                        crate::sparsity::LayerType::Attention
                    },
                    zeros,
                    total,
                    sharded: p.hooks.splits_input(),
                });
            }
        }
        out
    }
}

/// Mean cross-entropy of `logits: [batch, seq, vocab]` against `targets: [batch, seq]`.
pub fn cross_entropy<B: Kernels>(logits: Tensor<B, 3>, targets: Tensor<B, 2, Int>) -> Tensor<B, 1> {
    let [b, t, v] = logits.dims();
    B::cross_entropy(logits.reshape([b * t, v]), targets.reshape([b * t])).mean()
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::ndarray::NdArray;
    use burn::backend::{Autodiff, Flex};
    use burn::module::{AutodiffModule, ModuleMapper, ModuleVisitor, Param};
    use burn::tensor::{Distribution, TensorData};

    #[test]
    fn cross_entropy_closed_form() {
        let dev = Default::default();
        // Uniform logits over 4 classes: loss ln 4; one-hot-ish logits: softmax by hand.
        let logits = Tensor::<Flex, 3>::from_data(
            TensorData::new(vec![0f32, 0., 0., 0., 2., 0., 0., 0.], [1, 2, 4]),
            &dev,
        );
        let targets =
            Tensor::<Flex, 2, Int>::from_data(TensorData::new(vec![3i32, 0], [1, 2]), &dev);
        let l = cross_entropy(logits, targets).into_scalar();
        let p0 = (2f64.exp() / (2f64.exp() + 3.0)).ln();
        let expect = (4f64.ln() - p0) / 2.0;
        assert!((l as f64 - expect).abs() < 1e-6, "{l} vs {expect}");
    }

    #[test]
    fn causal_model_ignores_future_tokens() {
        let dev = Default::default();
        let c = ModelConfig::tiny(50, LinearKind::Ternary);
        let m = Llama::<Flex>::new(&c, &dev);
        let a = Tensor::<Flex, 2, Int>::from_data(
            TensorData::new(vec![1i32, 2, 3, 4, 5], [1, 5]),
            &dev,
        );
        let b = Tensor::<Flex, 2, Int>::from_data(
            TensorData::new(vec![1i32, 2, 3, 9, 7], [1, 5]),
            &dev,
        );
        let la: Vec<f32> = m.forward(a).narrow(1, 0, 3).into_data().to_vec().unwrap();
        let lb: Vec<f32> = m.forward(b).narrow(1, 0, 3).into_data().to_vec().unwrap();
        assert_eq!(la, lb);
    }

    #[test]
    fn parameter_count_matches_config_tied_and_untied() {
        let dev = Default::default();
        for tie in [false, true] {
            let mut c = ModelConfig::tiny(50, LinearKind::Ternary);
            c.tie_embeddings = tie;
            let m = Llama::<Flex>::new(&c, &dev);
            assert_eq!(m.num_params(), c.num_params());
            assert_eq!(m.lm_head.is_none(), tie);
            let x =
                Tensor::<Flex, 2, Int>::from_data(TensorData::new(vec![1i32, 2, 3], [1, 3]), &dev);
            assert_eq!(m.forward(x).dims(), [1, 3, 50]);
        }
    }

    #[test]
    fn taps_are_the_plain_forward_passes_values() {
        let dev = Default::default();
        let c = ModelConfig::tiny(50, LinearKind::Float);
        let m = Llama::<Flex>::new(&c, &dev);
        let tokens = Tensor::<Flex, 2, Int>::from_data(
            TensorData::new(vec![1i32, 7, 3, 4, 5, 9, 2, 8], [2, 4]),
            &dev,
        );
        // Lazy parameters: a clone of a model never run would draw its own initial values.
        let plain = m.forward(tokens.clone());
        let (tapped, recorder) = crate::taps::tap(m.clone(), &[1, 0]);
        let logits = tapped.forward(tokens.clone());
        let taps = recorder.take::<Flex>(&[1, 0]);
        let same = |a: Tensor<Flex, 3>, b: Tensor<Flex, 3>, what: &str| {
            let (a, b): (Vec<f32>, Vec<f32>) = (
                a.into_data().to_vec().unwrap(),
                b.into_data().to_vec().unwrap(),
            );
            let diff = a
                .iter()
                .zip(&b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(diff <= 1e-6, "{what}: max diff {diff}");
        };
        same(logits, plain, "logits");
        // A pass that stops after block 0 records the same taps of it.
        let (first, rec) = crate::taps::tap(m.clone(), &[0]);
        first.forward_blocks(tokens.clone(), 1);
        let early = rec.take::<Flex>(&[0]);
        assert_eq!(early.len(), 1);
        assert_eq!(early[0].len(), 7);
        for (a, b) in early[0].iter().zip(&taps[1]) {
            same(a.output.clone(), b.output.clone(), "forward_blocks");
        }
        let names: Vec<&str> = taps[1].iter().map(|t| t.name).collect();
        assert_eq!(
            names,
            [
                "self_attn.q_proj",
                "self_attn.k_proj",
                "self_attn.v_proj",
                "self_attn.o_proj",
                "mlp.gate_proj",
                "mlp.up_proj",
                "mlp.down_proj"
            ]
        );
        // Every tap's output is its projection applied to its input.
        for (k, layer) in [(0, 1), (1, 0)] {
            for t in &taps[k] {
                let p = m.layers[layer].projection(t.name);
                same(p.forward(t.input.clone()), t.output.clone(), t.name);
            }
        }
        // The inputs are the residual stream as a plain pass computes it.
        let l0 = &m.layers[0];
        let t0 = &taps[1];
        let h0 = m.embed_tokens.forward(tokens);
        same(
            t0[0].input.clone(),
            l0.input_layernorm.forward(h0.clone()),
            "q input",
        );
        let h1 = h0 + t0[3].output.clone();
        same(
            t0[4].input.clone(),
            l0.post_attention_layernorm.forward(h1.clone()),
            "gate input",
        );
        let g = t0[4].output.clone();
        let silu = g.clone() * burn::tensor::activation::sigmoid(g);
        same(
            t0[6].input.clone(),
            silu * t0[5].output.clone(),
            "down input",
        );
        let h2 = h1 + t0[6].output.clone();
        same(
            taps[0][0].input.clone(),
            m.layers[1].input_layernorm.forward(h2),
            "layer 1 q input",
        );
    }

    type F64 = NdArray<f64>;
    type AdF64 = Autodiff<F64>;

    /// Collects every float parameter flattened, in module order.
    struct Flatten(Vec<Vec<f64>>);
    impl<B: Backend> ModuleVisitor<B> for Flatten {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
            self.0
                .push(p.val().into_data().convert::<f64>().to_vec().unwrap());
        }
    }
    /// Sets parameter `which` element `idx` to `value`.
    struct Poke {
        which: usize,
        idx: usize,
        value: f64,
        seen: usize,
    }
    impl<B: Backend> ModuleMapper<B> for Poke {
        fn map_float<const D: usize>(&mut self, p: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let me = self.seen;
            self.seen += 1;
            if me != self.which {
                return p;
            }
            let (id, t, mapper) = p.consume();
            let shape = t.shape();
            let mut v: Vec<f64> = t.to_data().convert::<f64>().to_vec().unwrap();
            v[self.idx] = self.value;
            let t = Tensor::from_data(TensorData::new(v, shape), &t.device());
            Param::from_mapped_value(id, t, mapper)
        }
    }

    #[test]
    fn float_gradient_matches_finite_differences() {
        let dev = Default::default();
        let mut c = ModelConfig::tiny(11, LinearKind::Float);
        c.hidden = 8;
        c.intermediate = 12;
        c.n_heads = 2;
        c.n_kv_heads = Some(1);
        c.init_std = 0.3;
        <F64 as Backend>::seed(&dev, 7);
        let model = Llama::<AdF64>::new(&c, &dev);
        let tokens = Tensor::<AdF64, 2, Int>::from_data(
            TensorData::new(vec![1i64, 5, 3, 7, 2, 10, 0, 4, 4, 9, 8, 6], [2, 6]),
            &dev,
        );
        let loss = model.loss(tokens.clone());
        let grads = loss.backward();
        // Analytic gradients in module order.
        struct Grads<'a>(
            &'a <AdF64 as burn::tensor::backend::AutodiffBackend>::Gradients,
            Vec<Vec<f64>>,
        );
        impl ModuleVisitor<AdF64> for Grads<'_> {
            fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<AdF64, D>>) {
                let g = p.val().grad(self.0).unwrap();
                self.1
                    .push(g.into_data().convert::<f64>().to_vec().unwrap());
            }
        }
        let mut g = Grads(&grads, vec![]);
        model.visit(&mut g);
        let analytic = g.1;

        let plain = model.valid();
        let mut values = Flatten(vec![]);
        plain.visit(&mut values);
        let inner_tokens = tokens.inner();
        let h = 1e-6;
        let mut checked = 0;
        for (which, params) in values.0.iter().enumerate() {
            // A few entries of every parameter (embedding, norms, projections, head).
            for idx in [0, params.len() / 2, params.len() - 1] {
                let f = |v: f64| {
                    let m = plain.clone().map(&mut Poke {
                        which,
                        idx,
                        value: v,
                        seen: 0,
                    });
                    m.loss(inner_tokens.clone()).into_scalar()
                };
                let x = params[idx];
                let fd = (f(x + h) - f(x - h)) / (2.0 * h);
                let an = analytic[which][idx];
                assert!(
                    (fd - an).abs() <= 1e-7 + 1e-5 * an.abs().max(fd.abs()),
                    "param {which} idx {idx}: analytic {an} vs finite difference {fd}"
                );
                checked += 1;
            }
        }
        assert_eq!(checked, 3 * analytic.len());
        let _ = Distribution::Default;
    }
}

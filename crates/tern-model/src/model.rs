//! The LLaMA / TriLM decoder: embedding, blocks of (RMSNorm, attention, RMSNorm, SwiGLU), final
//! norm, LM head. Field names follow Hugging Face's `LlamaForCausalLM` so checkpoints map 1:1.

use std::collections::HashSet;
use std::marker::PhantomData;
use std::sync::{Mutex, OnceLock};

use burn::module::{Initializer, Module};
use burn::nn::{Embedding, EmbeddingConfig};
use burn::tensor::activation::sigmoid;
use burn::tensor::backend::Backend;
use burn::tensor::{ElementConversion, IndexingUpdateOp, Int, Tensor, TensorData};
use tern_kernels::Kernels;

use crate::attention::Attention;
use crate::config::{Mixer, ModelConfig};
use crate::depth::DepthRouter;
use crate::hooks::{Hooks, NoHooks};
use crate::linear::{LinearKind, ProjLinear, ProjLinearConfig, ScaleAxis};
use crate::mamba::Mamba;
use crate::mlp::Mlp;
use crate::moa::Moa;
use crate::moe::Moe;
use crate::norm::RmsNorm;
use crate::rope::rope_tables;

/// One decoder block: RMSNorm, a sequence mixer, RMSNorm, a feed-forward layer, each with its
/// residual. A LLaMA block has attention and an MLP; the other kinds ([`ModelConfig::block_kind`])
/// put mixture of attention heads or a Mamba mixer in the first place, a mixture of experts in
/// the second, and a Mixture-of-Depths router around the whole. Exactly one mixer and one
/// feed-forward are present; the absent ones take no parameters and no names.
#[derive(Module, Debug)]
pub struct Block<B: Backend, H = NoHooks> {
    pub input_layernorm: RmsNorm<B>,
    pub self_attn: Option<Attention<B, H>>,
    pub moa: Option<Moa<B, H>>,
    pub mamba: Option<Mamba<B, H>>,
    pub post_attention_layernorm: RmsNorm<B>,
    pub mlp: Option<Mlp<B, H>>,
    pub moe: Option<Moe<B, H>>,
    pub mod_router: Option<DepthRouter<B>>,
    /// The router's auxiliary loss weight (`model.mod.aux_loss_weight`).
    #[module(skip)]
    pub mod_aux_weight: f64,
    /// Tells burn's derive that `H` is not a module (only the projections carry hooks).
    #[module(skip)]
    pub hooks: PhantomData<H>,
}

impl<B: Backend> Block<B> {
    /// Block `i` of the model `c` describes.
    pub fn new(c: &ModelConfig, i: usize, device: &B::Device) -> Self {
        let kind = c.block_kind(i);
        let norm = || RmsNorm::new(c.hidden, c.rms_eps, device);
        let moe = c.moe.as_ref().filter(|_| kind.moe);
        let depth = c.depth.as_ref().filter(|_| kind.routed);
        Self {
            input_layernorm: norm(),
            self_attn: (kind.mixer == Mixer::Attention).then(|| Attention::new(c, device)),
            moa: match (&c.moa, kind.mixer) {
                (Some(m), Mixer::Moa) => Some(Moa::new(c, m, device)),
                _ => None,
            },
            mamba: (kind.mixer == Mixer::Mamba).then(|| Mamba::new(c, &c.mamba_config(), device)),
            post_attention_layernorm: norm(),
            mlp: moe.is_none().then(|| Mlp::new(c, device)),
            moe: moe.map(|m| Moe::new(c, m, device)),
            mod_router: depth.map(|d| DepthRouter {
                weight: Initializer::Normal {
                    mean: 0.0,
                    std: c.init_std,
                }
                .init([c.hidden], device),
                capacity: d.capacity,
            }),
            mod_aux_weight: depth.map_or(0.0, |d| d.aux_loss_weight),
            hooks: PhantomData,
        }
    }
}

/// The Hugging Face names of a LLaMA block's seven projections, in module order.
pub const PROJECTION_NAMES: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

/// `name` as a `&'static str`, each distinct name leaked once: projection names are a small
/// fixed set per model (experts numbered), and hooks keep them for the model's life.
pub fn intern(name: String) -> &'static str {
    static NAMES: OnceLock<Mutex<HashSet<&'static str>>> = OnceLock::new();
    let mut names = NAMES
        .get_or_init(Default::default)
        .lock()
        .expect("no panic while interning");
    match names.get(name.as_str()) {
        Some(n) => n,
        None => {
            let n: &'static str = Box::leak(name.into_boxed_str());
            names.insert(n);
            n
        }
    }
}

impl<B: Backend, H> Block<B, H> {
    /// Every projection of the block with its name within the block (its parameter path less
    /// `.weight`), in module order; a LLaMA block's are [`PROJECTION_NAMES`].
    pub fn projections(&self) -> Vec<(&'static str, &ProjLinear<B, H>)> {
        let mut out = Vec::new();
        if let Some(a) = &self.self_attn {
            out.extend(a.projections());
        }
        if let Some(a) = &self.moa {
            out.extend(a.projections());
        }
        if let Some(a) = &self.mamba {
            out.extend(a.projections());
        }
        if let Some(m) = &self.mlp {
            let named = m
                .projections()
                .map(|(n, p)| (intern(format!("mlp.{n}")), p));
            out.extend(named);
        }
        if let Some(m) = &self.moe {
            out.extend(m.projections());
        }
        out
    }

    pub fn projections_mut(&mut self) -> Vec<&mut ProjLinear<B, H>> {
        let mut out = Vec::new();
        if let Some(a) = &mut self.self_attn {
            out.extend(a.projections_mut());
        }
        if let Some(a) = &mut self.moa {
            out.extend(a.projections_mut());
        }
        if let Some(a) = &mut self.mamba {
            out.extend(a.projections_mut());
        }
        if let Some(m) = &mut self.mlp {
            out.extend(m.projections_mut());
        }
        if let Some(m) = &mut self.moe {
            out.extend(m.projections_mut());
        }
        out
    }

    /// The attention of a LLaMA block (distillation's students and teachers are LLaMA).
    pub fn attention(&self) -> &Attention<B, H> {
        self.self_attn
            .as_ref()
            .expect("a LLaMA block (checked when the recipe is read)")
    }

    /// The MLP of a LLaMA block.
    pub fn mlp(&self) -> &Mlp<B, H> {
        self.mlp
            .as_ref()
            .expect("a LLaMA block (checked when the recipe is read)")
    }

    /// Sets every projection's [`ProjLinear::quant_mix`] (a ramp into quantization: 0 float, 1
    /// the linear kind's quantized weight; float layers ignore it).
    pub fn set_quant_mix(&mut self, mix: f64) {
        for p in self.projections_mut() {
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
        Block {
            input_layernorm: self.input_layernorm,
            self_attn: self.self_attn.map(|a| a.map_hooks(f)),
            moa: self.moa.map(|a| a.map_hooks(f)),
            mamba: self.mamba.map(|a| a.map_hooks(f)),
            post_attention_layernorm: self.post_attention_layernorm,
            mlp: self.mlp.map(|m| m.map_hooks("mlp.", f)),
            moe: self.moe.map(|m| m.map_hooks(f)),
            mod_router: self.mod_router,
            mod_aux_weight: self.mod_aux_weight,
            hooks: PhantomData,
        }
    }
}

/// A block's weighted auxiliary losses (balancing, routing), `[1]`; `None` when it has none.
pub type Aux<B> = Option<Tensor<B, 1>>;

/// The sum of two blocks' auxiliary losses.
pub fn add_aux<B: Backend>(a: Aux<B>, b: Aux<B>) -> Aux<B> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a + b),
        (a, b) => a.or(b),
    }
}

impl<B: Kernels, H: Hooks<B>> Block<B, H> {
    /// `x: [batch, seq, hidden]` through the block; `cos`/`sin` are the RoPE tables of its
    /// positions. Returns the output and the block's weighted auxiliary losses.
    pub fn forward_aux(
        &self,
        x: Tensor<B, 3>,
        cos: &Tensor<B, 2>,
        sin: &Tensor<B, 2>,
    ) -> (Tensor<B, 3>, Aux<B>) {
        match &self.mod_router {
            None => self.forward_every_token(x, cos, sin),
            Some(r) => self.forward_routed(r, x, cos, sin),
        }
    }

    /// The block's output alone (what distillation and tests read).
    pub fn forward(&self, x: Tensor<B, 3>, cos: &Tensor<B, 2>, sin: &Tensor<B, 2>) -> Tensor<B, 3> {
        self.forward_aux(x, cos, sin).0
    }

    fn forward_every_token(
        &self,
        x: Tensor<B, 3>,
        cos: &Tensor<B, 2>,
        sin: &Tensor<B, 2>,
    ) -> (Tensor<B, 3>, Aux<B>) {
        let h = self.input_layernorm.forward(x.clone());
        let (mixed, aux) = if let Some(a) = &self.self_attn {
            (a.forward(h, cos, sin), None)
        } else if let Some(a) = &self.moa {
            let (y, aux) = a.forward(h, cos, sin);
            (y, Some(aux * a.aux_weight))
        } else {
            let m = self.mamba.as_ref().expect("a block has a mixer");
            (m.forward(h), None)
        };
        let x = x + mixed;
        let h = self.post_attention_layernorm.forward(x.clone());
        let (fed, aux2) = match (&self.mlp, &self.moe) {
            (Some(m), _) => (m.forward(h), None),
            (None, Some(m)) => {
                let (y, aux) = m.forward(h);
                (y, Some(aux * m.aux_weight))
            }
            (None, None) => unreachable!("a block has a feed-forward layer"),
        };
        (x + fed, add_aux(aux, aux2))
    }

    /// Mixture-of-Depths: each row's picked tokens ([`DepthRouter::pick`]) go through the
    /// block as a shorter sequence at their own positions; the rest pass unchanged.
    fn forward_routed(
        &self,
        router: &DepthRouter<B>,
        x: Tensor<B, 3>,
        cos: &Tensor<B, 2>,
        sin: &Tensor<B, 2>,
    ) -> (Tensor<B, 3>, Aux<B>) {
        let [b, l, h] = x.dims();
        let device = x.device();
        let pick = router.pick(x.clone());
        let mut aux = Some(router.aux_loss(pick.scores.clone(), &pick.host) * self.mod_aux_weight);
        let (mut inner_aux, mut runs) = (None, 0);
        let gates = sigmoid(pick.scores);
        let mut rows = Vec::with_capacity(b);
        for (i, picked) in pick.rows.into_iter().enumerate() {
            let row = x.clone().slice([i..i + 1, 0..l, 0..h]);
            let n = picked.len();
            if n == 0 {
                rows.push(row);
                continue;
            }
            let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(picked, [n]), &device);
            let xs = row.clone().select(1, idx.clone());
            let (ys, a) = self.forward_every_token(
                xs.clone(),
                &cos.clone().select(0, idx.clone()),
                &sin.clone().select(0, idx.clone()),
            );
            let gate = gates
                .clone()
                .slice([i..i + 1, 0..l])
                .select(1, idx.clone())
                .reshape([1, n, 1]);
            rows.push(row.select_assign(1, idx, (ys - xs) * gate, IndexingUpdateOp::Add));
            inner_aux = add_aux(inner_aux, a);
            runs += 1;
        }
        if let Some(a) = inner_aux {
            aux = add_aux(aux, Some(a / runs as f64));
        }
        (Tensor::cat(rows, 0), aux)
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
        let layers = (0..c.n_layers).map(|i| Block::new(c, i, device)).collect();
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
        self.forward_blocks_aux(tokens, n_blocks).0
    }

    /// [`Self::forward_blocks`] and the sum of the blocks' weighted auxiliary losses.
    pub fn forward_blocks_aux(
        &self,
        tokens: Tensor<B, 2, Int>,
        n_blocks: usize,
    ) -> (Tensor<B, 3>, Aux<B>) {
        let [_, t] = tokens.dims();
        let (cos, sin) = self.rope(t, &tokens.device());
        let mut x = self.embed(tokens);
        let mut aux = None;
        for block in self.layers.iter().take(n_blocks) {
            let (y, a) = block.forward_aux(x, &cos, &sin);
            x = y;
            aux = add_aux(aux, a);
        }
        (x, aux)
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

    /// The training objective of `block` (`[batch, seq + 1]` tokens): the mean next-token
    /// cross-entropy of `tokens[:, :-1]` predicting `tokens[:, 1:]`, plus the blocks' weighted
    /// auxiliary losses (none in a LLaMA model).
    pub fn loss(&self, block: Tensor<B, 2, Int>) -> Tensor<B, 1> {
        let (ce, aux) = self.losses(block);
        match aux {
            Some(a) => ce + a,
            None => ce,
        }
    }

    /// The next-token cross-entropy alone (validation's loss) and the weighted auxiliary losses.
    pub fn losses(&self, block: Tensor<B, 2, Int>) -> (Tensor<B, 1>, Aux<B>) {
        let [_, t1] = block.dims();
        let inputs = block.clone().narrow(1, 0, t1 - 1);
        let targets = block.narrow(1, 1, t1 - 1);
        let (x, aux) = self.forward_blocks_aux(inputs, self.layers.len());
        (self.head_loss(x, targets), aux)
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
                    layer: if ["mlp.", "moe.", "mamba."]
                        .iter()
                        .any(|p| tap.name.starts_with(p))
                    {
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

impl<B: Kernels, H: Hooks<B>> Llama<B, H> {
    /// `(layer, share of tokens picked)` of every routed block (Mixture-of-Depths) in a forward
    /// pass over `tokens`: how close the causal pick is to the capacity the router is trained for.
    pub fn routed_shares(&self, tokens: Tensor<B, 2, Int>) -> Vec<(usize, f64)> {
        let [_, t] = tokens.dims();
        let (cos, sin) = self.rope(t, &tokens.device());
        let mut x = self.embed(tokens);
        let mut out = Vec::new();
        for (i, block) in self.layers.iter().enumerate() {
            if let Some(r) = &block.mod_router {
                let pick = r.pick(x.clone());
                let picked: usize = pick.rows.iter().map(Vec::len).sum();
                out.push((i, picked as f64 / pick.host.len().max(1) as f64));
            }
            x = block.forward(x, &cos, &sin);
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
pub(crate) mod tests {
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

    /// The block kinds of issue 23 on a tiny model: a Jamba layout (Mamba blocks with attention
    /// every second block, experts every second block), mixture of attention heads, and
    /// Mixture-of-Depths routing over experts.
    pub(crate) fn kinds(linear: LinearKind) -> Vec<(&'static str, ModelConfig)> {
        use crate::depth::ModConfig;
        use crate::mamba::MambaConfig;
        use crate::moa::MoaConfig;
        use crate::moe::MoeConfig;
        let base = ModelConfig {
            n_layers: 4,
            ..ModelConfig::tiny(50, linear)
        };
        let mamba = MambaConfig {
            d_state: 4,
            ..Default::default()
        };
        let moe = MoeConfig {
            experts: 4,
            top_k: 2,
            intermediate: Some(32),
            period: 2,
            offset: 1,
            aux_loss_weight: 0.01,
        };
        vec![
            (
                "jamba",
                ModelConfig {
                    attention_period: 2,
                    attention_offset: 1,
                    mamba: Some(mamba.clone()),
                    moe: Some(moe.clone()),
                    ..base.clone()
                },
            ),
            (
                "moa",
                ModelConfig {
                    moa: Some(MoaConfig {
                        experts: 3,
                        top_k: 2,
                        aux_loss_weight: 0.01,
                    }),
                    ..base.clone()
                },
            ),
            (
                "mod-mamba",
                ModelConfig {
                    attention_period: 2,
                    attention_offset: 1,
                    mamba: Some(mamba.clone()),
                    depth: Some(ModConfig {
                        capacity: 0.5,
                        period: 2,
                        offset: Some(0),
                        aux_loss_weight: 0.01,
                    }),
                    ..base.clone()
                },
            ),
            (
                "mod",
                ModelConfig {
                    moe: Some(moe),
                    depth: Some(ModConfig {
                        capacity: 0.5,
                        period: 2,
                        offset: Some(1),
                        aux_loss_weight: 0.01,
                    }),
                    ..base
                },
            ),
        ]
    }

    /// Names and shapes of every parameter of a built model, in module order.
    struct Shapes(Vec<String>, Vec<(String, Vec<usize>)>);
    impl<B: Backend> ModuleVisitor<B> for Shapes {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.0.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.0.pop();
        }
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
            let shape = p.lazy_shape().dims::<D>().to_vec();
            self.1.push((self.0.join("."), shape));
        }
    }

    #[test]
    fn every_kind_builds_what_its_config_lists() {
        let dev = Default::default();
        for linear in [LinearKind::Float, LinearKind::Ternary] {
            for (what, c) in kinds(linear) {
                c.validate().unwrap();
                assert!(!c.is_llama(), "{what}");
                let m = Llama::<Flex>::new(&c, &dev);
                let mut v = Shapes(vec![], vec![]);
                m.visit(&mut v);
                assert_eq!(v.1, c.param_shapes(), "{what}");
                // Every projection named by `projections` is a parameter path.
                for (i, l) in m.layers.iter().enumerate() {
                    for (name, p) in l.projections() {
                        let path = format!("layers.{i}.{name}.weight");
                        let found = v.1.iter().find(|(n, _)| *n == path);
                        assert_eq!(found.map(|f| f.1.clone()), Some(p.weight.dims().to_vec()));
                    }
                }
            }
        }
    }

    /// The training forward pass: no logit at position t moves when a later token changes, for
    /// every kind and linear kind; the changed position's logits do move (the control).
    #[test]
    fn every_kind_ignores_future_tokens() {
        let dev = Default::default();
        for linear in [LinearKind::Float, LinearKind::Ternary, LinearKind::Bitnet] {
            for (what, c) in kinds(linear) {
                <Flex as Backend>::seed(&dev, 3);
                let m = Llama::<Flex>::new(&c, &dev);
                let ids: Vec<i32> = (0..2 * 12).map(|i| (i * 7 + 3) % 50).collect();
                let row = |ids: Vec<i32>| {
                    let t = Tensor::<Flex, 2, Int>::from_data(TensorData::new(ids, [2, 12]), &dev);
                    m.forward(t).into_data().to_vec::<f32>().unwrap()
                };
                let base = row(ids.clone());
                for s in [0usize, 5, 11] {
                    let mut changed = ids.clone();
                    for b in 0..2 {
                        changed[b * 12 + s] = (changed[b * 12 + s] + 17) % 50;
                    }
                    let other = row(changed);
                    for b in 0..2 {
                        for t in 0..12 {
                            let at = |v: &[f32]| v[(b * 12 + t) * 50..][..50].to_vec();
                            let diff = at(&base)
                                .iter()
                                .zip(at(&other))
                                .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
                            // Routed blocks run the picked tokens as a shorter sequence, whose
                            // length the changed token may alter: products of other shapes may
                            // round differently in the last bit, nothing more.
                            if t < s {
                                assert!(diff <= 1e-5, "{what} {linear:?}: token {s} changed, position {t} moved by {diff}");
                            }
                            if t == s {
                                assert!(
                                    diff > 1e-3,
                                    "{what} {linear:?}: position {s} did not move"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    /// The objective is the cross-entropy plus the weighted balancing and routing losses; a
    /// LLaMA model has none.
    #[test]
    fn the_loss_adds_the_weighted_auxiliary_losses() {
        let dev = Default::default();
        let tokens = Tensor::<Flex, 2, Int>::from_data(
            TensorData::new(
                (0..2 * 9).map(|i| (i * 5 + 1) % 50).collect::<Vec<i32>>(),
                [2, 9],
            ),
            &dev,
        );
        for (what, c) in kinds(LinearKind::Ternary) {
            let m = Llama::<Flex>::new(&c, &dev);
            let (ce, aux) = m.losses(tokens.clone());
            let (ce, aux) = (ce.into_scalar(), aux.expect(what).into_scalar());
            // Balancing losses are >= 1 per layer (times 0.01); the routing BCE is positive.
            assert!(aux > 0.0099, "{what}: {aux}");
            let total = m.loss(tokens.clone()).into_scalar();
            assert!((total - ce - aux).abs() < 1e-6, "{what}");
        }
        let llama = Llama::<Flex>::new(&ModelConfig::tiny(50, LinearKind::Ternary), &dev);
        assert!(llama.losses(tokens).1.is_none());
    }

    /// A routed block whose router scores every token at 0 picks none (the rule is score > 0):
    /// the block passes its input through; a router that picks every token gives the unrouted
    /// block's update times sigmoid(score).
    #[test]
    fn a_routed_block_updates_only_picked_tokens() {
        let dev = Default::default();
        let (_, c) = kinds(LinearKind::Float).remove(3);
        let m = Llama::<Flex>::new(&c, &dev);
        let x = Tensor::<Flex, 3>::random([2, 6, 32], Distribution::Normal(0.0, 1.0), &dev);
        let (cos, sin) = m.rope(6, &dev);
        let mut block = m.layers.into_iter().nth(1).unwrap();
        let router = block.mod_router.as_mut().unwrap();
        router.weight = Param::from_tensor(Tensor::zeros([32], &dev));
        let y = block.forward(x.clone(), &cos, &sin);
        assert_eq!(y.into_data(), x.clone().into_data());
        // All picked: a router along a direction every token is made to share.
        let w = Tensor::<Flex, 1>::ones([32], &dev);
        block.mod_router.as_mut().unwrap().weight = Param::from_tensor(w.clone());
        let x = x.abs() + 0.1;
        let y = block.forward(x.clone(), &cos, &sin);
        let router = block.mod_router.take().unwrap();
        let gate = burn::tensor::activation::sigmoid(router.scores(x.clone())).reshape([2, 6, 1]);
        let want = x.clone() + (block.forward(x.clone(), &cos, &sin) - x) * gate;
        let (y, want): (Vec<f32>, Vec<f32>) = (
            y.into_data().to_vec().unwrap(),
            want.into_data().to_vec().unwrap(),
        );
        for (a, b) in y.iter().zip(&want) {
            assert!((a - b).abs() < 1e-5 * (1.0 + b.abs()), "{a} vs {b}");
        }
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

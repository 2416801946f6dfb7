//! Next-token sampling (as Hugging Face `generate` orders its logits processors): repetition
//! penalty, temperature, top-k, top-p, then a seeded draw. Temperature 0 is greedy.

use anyhow::{bail, Result};

use crate::model::{InferModel, KvCache};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplerConfig {
    pub temperature: f32,
    /// Keep the k most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches p (1: all).
    pub top_p: f32,
    /// CTRL's penalty on tokens already in the context (1: none).
    pub repetition_penalty: f32,
    pub seed: u64,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        Self {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            repetition_penalty: 1.1,
            seed: 0,
        }
    }
}

impl SamplerConfig {
    pub fn check(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            bail!("--temperature {} must be >= 0", self.temperature);
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            bail!("--top-p {} must be in (0, 1]", self.top_p);
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            bail!(
                "--repetition-penalty {} must be > 0",
                self.repetition_penalty
            );
        }
        Ok(())
    }
}

pub struct Sampler {
    cfg: SamplerConfig,
    state: u64,
}

impl Sampler {
    pub fn new(cfg: SamplerConfig) -> Self {
        Self {
            cfg,
            state: cfg.seed,
        }
    }

    /// A uniform draw in [0, 1) (SplitMix64).
    fn uniform(&mut self) -> f64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }

    /// The next token given the last position's `logits` and the tokens so far.
    pub fn sample(&mut self, logits: &[f32], context: &[u32]) -> u32 {
        let mut l = logits.to_vec();
        let pen = self.cfg.repetition_penalty;
        if pen != 1.0 {
            let mut seen = vec![false; l.len()];
            for &t in context {
                let t = t as usize;
                if t < l.len() && !seen[t] {
                    seen[t] = true;
                    l[t] = if l[t] > 0.0 { l[t] / pen } else { l[t] * pen };
                }
            }
        }
        let argmax = |l: &[f32]| {
            l.iter()
                .enumerate()
                .fold((0, f32::NEG_INFINITY), |best, (i, &v)| {
                    if v > best.1 {
                        (i, v)
                    } else {
                        best
                    }
                })
                .0 as u32
        };
        if self.cfg.temperature == 0.0 {
            return argmax(&l);
        }
        // Candidates by descending logit (ties by id, so the order is deterministic).
        let mut idx: Vec<u32> = (0..l.len() as u32).collect();
        idx.sort_by(|&a, &b| l[b as usize].total_cmp(&l[a as usize]).then(a.cmp(&b)));
        if self.cfg.top_k > 0 {
            idx.truncate(self.cfg.top_k);
        }
        let max = l[idx[0] as usize];
        let mut p: Vec<f64> = idx
            .iter()
            .map(|&i| (((l[i as usize] - max) / self.cfg.temperature) as f64).exp())
            .collect();
        let total: f64 = p.iter().sum();
        p.iter_mut().for_each(|x| *x /= total);
        if self.cfg.top_p < 1.0 {
            let mut cum = 0.0;
            let keep = p
                .iter()
                .position(|&x| {
                    cum += x;
                    cum >= self.cfg.top_p as f64
                })
                .map_or(p.len(), |k| k + 1);
            p.truncate(keep);
            idx.truncate(keep);
        }
        let total: f64 = p.iter().sum();
        let mut u = self.uniform() * total;
        for (i, &x) in p.iter().enumerate() {
            if u < x {
                return idx[i];
            }
            u -= x;
        }
        *idx.last().unwrap()
    }
}

/// What [`generate`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    pub tokens: Vec<u32>,
    /// Prompt positions processed, and the time it took.
    pub prompt_tokens: usize,
    pub prompt_seconds: f64,
    pub decode_seconds: f64,
    pub stopped_at_eos: bool,
}

/// A model that runs tokens after what its cache holds: the packed runtime ([`InferModel`]) or
/// a burn model of any block kind ([`crate::burn_decode::BurnDecoder`]).
pub trait Decode {
    type Cache;
    fn new_cache(&self) -> Self::Cache;
    /// Positions the cache holds.
    fn cached(cache: &Self::Cache) -> usize;
    /// Runs `tokens` after the cache (extending it) and returns the last position's logits.
    fn decode(&self, tokens: &[u32], cache: &mut Self::Cache) -> Result<Vec<f32>>;
}

impl Decode for InferModel {
    type Cache = KvCache;
    fn new_cache(&self) -> KvCache {
        KvCache::new(self.config.n_layers)
    }
    fn cached(cache: &KvCache) -> usize {
        cache.len()
    }
    fn decode(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Vec<f32>> {
        self.forward(tokens, cache, false)
    }
}

/// The state of a conversation: the model's cache and the tokens so far.
pub struct Conversation<C = KvCache> {
    pub cache: C,
    pub context: Vec<u32>,
    /// The last sampled token: in the context but not yet run through the model (the next turn
    /// runs it first).
    pub pending: Option<u32>,
}

impl<C> Conversation<C> {
    pub fn new<M: Decode<Cache = C>>(model: &M) -> Self {
        Self {
            cache: model.new_cache(),
            context: Vec::new(),
            pending: None,
        }
    }
}

/// Samples up to `max_tokens` after `prompt`, calling `on_token` with each new token (for
/// streaming); stops at `eos`. `conv` holds earlier turns (and is extended).
pub fn generate<M: Decode>(
    model: &M,
    conv: &mut Conversation<M::Cache>,
    prompt: &[u32],
    max_tokens: usize,
    sampler: &mut Sampler,
    eos: Option<u32>,
    mut on_token: impl FnMut(u32),
) -> Result<Generated> {
    let t0 = std::time::Instant::now();
    let Conversation {
        cache,
        context,
        pending,
    } = conv;
    let run: Vec<u32> = pending
        .take()
        .into_iter()
        .chain(prompt.iter().copied())
        .collect();
    let mut logits = model.decode(&run, cache)?;
    context.extend_from_slice(prompt);
    let prompt_seconds = t0.elapsed().as_secs_f64();
    let t1 = std::time::Instant::now();
    let mut tokens = Vec::new();
    let mut stopped_at_eos = false;
    for k in 0..max_tokens {
        let next = sampler.sample(&logits, context);
        context.push(next);
        // Run by the next forward pass, in this turn or the next one.
        *pending = Some(next);
        if Some(next) == eos {
            stopped_at_eos = true;
            break;
        }
        tokens.push(next);
        on_token(next);
        if k + 1 < max_tokens {
            logits = model.decode(&[next], cache)?;
            *pending = None;
        }
    }
    debug_assert_eq!(M::cached(cache) + pending.is_some() as usize, context.len());
    Ok(Generated {
        tokens,
        prompt_tokens: run.len(),
        prompt_seconds,
        decode_seconds: t1.elapsed().as_secs_f64(),
        stopped_at_eos,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(temperature: f32, top_k: usize, top_p: f32, pen: f32) -> SamplerConfig {
        SamplerConfig {
            temperature,
            top_k,
            top_p,
            repetition_penalty: pen,
            seed: 5,
        }
    }

    #[test]
    fn greedy_and_penalty() {
        let l = [1.0, 3.0, 2.0, -1.0];
        assert_eq!(Sampler::new(cfg(0.0, 0, 1.0, 1.0)).sample(&l, &[]), 1);
        // 3.0 / 2 = 1.5 < 2.0: the penalised token loses.
        assert_eq!(Sampler::new(cfg(0.0, 0, 1.0, 2.0)).sample(&l, &[1]), 2);
        // A negative logit is multiplied: -1 * 2 stays below.
        assert_eq!(
            Sampler::new(cfg(0.0, 0, 1.0, 2.0)).sample(&l, &[3, 1, 1]),
            2
        );
    }

    #[test]
    fn top_k_and_top_p_restrict_the_draw() {
        let l = [0.0, 5.0, 4.9, 4.8, -3.0];
        let mut s = Sampler::new(cfg(1.0, 2, 1.0, 1.0));
        let mut seen = [0usize; 5];
        for _ in 0..2000 {
            seen[s.sample(&l, &[]) as usize] += 1;
        }
        assert_eq!(seen[0] + seen[3] + seen[4], 0, "{seen:?}");
        assert!(seen[1] > 800 && seen[2] > 700, "{seen:?}");
        // p(1) = 0.37 of the three near-equal ones; top_p 0.3 keeps token 1 alone.
        let mut s = Sampler::new(cfg(1.0, 0, 0.3, 1.0));
        assert!((0..200).all(|_| s.sample(&l, &[]) == 1));
        // Frequencies follow the softmax: tokens 1 and 2 at temperature 1 differ by e^0.1.
        let mut s = Sampler::new(cfg(1.0, 0, 1.0, 1.0));
        let mut seen = [0f64; 5];
        for _ in 0..20000 {
            seen[s.sample(&l, &[]) as usize] += 1.0;
        }
        let ratio = seen[1] / seen[2];
        assert!((ratio - 0.1f64.exp()).abs() < 0.08, "{ratio}");
    }

    /// A tiny random ternary model (vocab 50).
    fn tiny_model() -> InferModel {
        let config = tern_model::ModelConfig::tiny(50, tern_model::LinearKind::Ternary);
        let mut s = 1u64;
        let tensors = config
            .param_shapes()
            .into_iter()
            .map(|(name, shape)| {
                let n: usize = shape.iter().product();
                let values = (0..n)
                    .map(|_| {
                        if name.ends_with("norm.weight") {
                            return 1.0;
                        }
                        s = s
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.6
                    })
                    .collect();
                (name, shape, values)
            })
            .collect();
        let p = crate::pack_model(
            &config,
            None,
            tensors,
            tern_pack::Encoding::Bits2,
            tern_pack::file::FloatDtype::F32,
        )
        .unwrap();
        InferModel::from_packed(p).unwrap()
    }

    fn greedy_from_scratch(model: &InferModel, context: &[u32], n: usize) -> Vec<u32> {
        let mut ctx = context.to_vec();
        let mut out = Vec::new();
        for _ in 0..n {
            let mut cache = KvCache::new(model.config.n_layers);
            let l = model.forward(&ctx, &mut cache, false).unwrap();
            let best = Sampler::new(cfg(0.0, 0, 1.0, 1.0)).sample(&l, &[]);
            out.push(best);
            ctx.push(best);
        }
        out
    }

    /// Two turns of a conversation with the KV cache give what full forward passes over the whole
    /// context give: the last token of a turn is run at the start of the next.
    #[test]
    fn conversation_turns_equal_full_passes() {
        let model = tiny_model();
        let mut conv = Conversation::new(&model);
        let mut s = Sampler::new(cfg(0.0, 0, 1.0, 1.0));
        let t1 = generate(&model, &mut conv, &[1, 2, 3], 4, &mut s, None, |_| {}).unwrap();
        assert_eq!(t1.tokens, greedy_from_scratch(&model, &[1, 2, 3], 4));
        assert_eq!(conv.cache.len() + 1, conv.context.len());
        let before: Vec<u32> = conv.context.iter().copied().chain([4, 5]).collect();
        let t2 = generate(&model, &mut conv, &[4, 5], 3, &mut s, None, |_| {}).unwrap();
        assert_eq!(t2.tokens, greedy_from_scratch(&model, &before, 3));
        // An end-of-sequence token stops the turn and is kept in the context.
        let mut conv = Conversation::new(&model);
        let before: Vec<u32> = vec![4, 5];
        let g = generate(
            &model,
            &mut conv,
            &before,
            5,
            &mut s,
            Some(greedy_from_scratch(&model, &before, 1)[0]),
            |_| {},
        )
        .unwrap();
        assert!(g.stopped_at_eos && g.tokens.is_empty());
        assert_eq!(conv.context.len(), 3);
    }

    /// A packed file whose tensors disagree with its config is refused, naming the tensor.
    #[test]
    fn packed_config_is_checked_against_the_tensors() {
        let config = tern_model::ModelConfig::tiny(50, tern_model::LinearKind::Ternary);
        let tensors = config
            .param_shapes()
            .into_iter()
            .map(|(name, shape)| {
                let n = shape.iter().product();
                (name, shape, vec![0.5f32; n])
            })
            .collect();
        let mut p = crate::pack_model(
            &config,
            None,
            tensors,
            tern_pack::Encoding::Bits2,
            tern_pack::file::FloatDtype::F32,
        )
        .unwrap();
        assert!(crate::packed_config(&p).is_ok());
        p.config["n_heads"] = serde_json::json!(8);
        p.config["n_kv_heads"] = serde_json::json!(8);
        p.config["intermediate"] = serde_json::json!(32);
        let e = crate::packed_config(&p).unwrap_err().to_string();
        assert!(
            e.contains("layers.0.self_attn.k_proj.weight") || e.contains("gate_proj"),
            "{e}"
        );
        p.config["vocab_size"] = serde_json::Value::Null;
        let e = crate::packed_config(&p).unwrap_err().to_string();
        assert!(e.contains("vocab_size"), "{e}");
    }

    #[test]
    fn same_seed_same_draws() {
        let l: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let draws = |seed| {
            let mut s = Sampler::new(SamplerConfig {
                seed,
                ..cfg(1.0, 0, 1.0, 1.0)
            });
            (0..30).map(|_| s.sample(&l, &[])).collect::<Vec<_>>()
        };
        assert_eq!(draws(1), draws(1));
        assert_ne!(draws(1), draws(2));
    }
}

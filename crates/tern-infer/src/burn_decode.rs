//! Generation with a burn model, for the block kinds the packed runtime does not hold (Mamba
//! mixers, experts, Mixture-of-Depths): the model's own cached decoding
//! ([`tern_model::decode`]) on the CPU backend.

use anyhow::Result;
use burn::backend::Flex;
use burn::tensor::{Int, Tensor, TensorData};
use tern_model::decode::DecodeCache;
use tern_model::Llama;

use crate::sample::Decode;

/// A whole model on the CPU backend, run token by token with its cache.
pub struct BurnDecoder {
    pub model: Llama<Flex>,
}

impl Decode for BurnDecoder {
    type Cache = DecodeCache<Flex>;

    fn new_cache(&self) -> Self::Cache {
        DecodeCache::new(self.model.layers.len())
    }

    fn cached(cache: &Self::Cache) -> usize {
        cache.len
    }

    fn decode(&self, tokens: &[u32], cache: &mut Self::Cache) -> Result<Vec<f32>> {
        let ids: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
        let n = ids.len();
        let device = Default::default();
        let x = Tensor::<Flex, 2, Int>::from_data(TensorData::new(ids, [1, n]), &device);
        let logits = self.model.decode(x, cache);
        let vocab = logits.dims()[2];
        let last = logits.slice([0..1, n - 1..n, 0..vocab]);
        Ok(last
            .into_data()
            .convert::<f32>()
            .to_vec()
            .expect("f32 logits"))
    }
}

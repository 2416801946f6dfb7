//! Which parameters a tensor-parallel group splits, and along which dimension: checkpoints store
//! each rank's part with this, and loading re-splits whole tensors with it.

use tern_model::shard_dim;

use crate::params::ParamInfo;

/// The dimension along which a `tp`-way group splits each parameter (`None`: replicated).
pub fn shard_dims(infos: &[ParamInfo], tp: usize) -> Vec<Option<usize>> {
    infos
        .iter()
        .map(|i| shard_dim(&i.name).filter(|_| tp > 1))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_matrices_split_and_the_rest_replicated() {
        let info = |name: &str| ParamInfo {
            name: name.into(),
            shape: vec![4, 4],
        };
        let infos = [
            info("embed_tokens.weight"),
            info("layers.0.self_attn.o_proj.weight"),
            info("layers.0.mlp.up_proj.weight"),
            info("layers.0.input_layernorm.weight"),
        ];
        assert_eq!(shard_dims(&infos, 2), vec![None, Some(1), Some(0), None]);
        assert_eq!(shard_dims(&infos, 1), vec![None; 4]);
    }
}

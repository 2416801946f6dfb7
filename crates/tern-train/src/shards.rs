//! Flat parameter lists (weights, optimizer state) from this rank's tensor-parallel shard back to
//! the full model. Checkpoints hold full tensors, so a run resumes on any `parallel.tp`.

use tern_dist::Comm;
use tern_model::{shard_dim, unshard_values};

use crate::params::ParamInfo;

/// The full values from every rank's shard (a collective: every member of `tp` calls it).
/// `local_infos` name this rank's shapes; replicated values are taken as they are.
pub fn gather_all(local: Vec<Vec<f32>>, local_infos: &[ParamInfo], tp: &dyn Comm) -> Vec<Vec<f32>> {
    if tp.size() == 1 {
        return local;
    }
    local
        .into_iter()
        .zip(local_infos)
        .map(|(v, info)| match shard_dim(&info.name) {
            Some(dim) => {
                let mut full = info.shape.clone();
                full[dim] *= tp.size();
                gather_whole(v, &full, dim, tp)
            }
            None => v,
        })
        .collect()
}

/// A whole tensor of `full_shape` from every rank's block along `dim` (a collective).
pub fn gather_whole(local: Vec<f32>, full_shape: &[usize], dim: usize, tp: &dyn Comm) -> Vec<f32> {
    let mut all = vec![0f32; local.len() * tp.size()];
    tp.all_gather(&local, &mut all);
    let mut local_shape = full_shape.to_vec();
    local_shape[dim] /= tp.size();
    unshard_values(&all, &local_shape, dim, tp.size())
}

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
    use tern_dist::ThreadComm;
    use tern_model::shard_values;

    #[test]
    fn shard_then_gather_gives_back_the_full_values() {
        let infos = vec![
            ParamInfo {
                name: "embed_tokens.weight".into(),
                shape: vec![3, 2],
            },
            ParamInfo {
                name: "layers.0.self_attn.o_proj.weight".into(),
                shape: vec![2, 4],
            },
            ParamInfo {
                name: "layers.0.mlp.up_proj.weight".into(),
                shape: vec![4, 2],
            },
        ];
        let full: Vec<Vec<f32>> = infos
            .iter()
            .enumerate()
            .map(|(k, i)| (0..i.numel()).map(|x| (100 * k + x) as f32).collect())
            .collect();
        let back: Vec<Vec<Vec<f32>>> = std::thread::scope(|sc| {
            let hs: Vec<_> = ThreadComm::group(2)
                .into_iter()
                .map(|c| {
                    let (full, infos) = (full.clone(), infos.clone());
                    sc.spawn(move || {
                        let local: Vec<Vec<f32>> = full
                            .iter()
                            .zip(&infos)
                            .map(|(v, i)| match shard_dim(&i.name) {
                                Some(d) => shard_values(v, &i.shape, d, c.rank(), 2),
                                None => v.clone(),
                            })
                            .collect();
                        let local_infos: Vec<ParamInfo> = infos
                            .iter()
                            .map(|i| ParamInfo {
                                name: i.name.clone(),
                                shape: match shard_dim(&i.name) {
                                    Some(0) => vec![i.shape[0] / 2, i.shape[1]],
                                    Some(_) => vec![i.shape[0], i.shape[1] / 2],
                                    None => i.shape.clone(),
                                },
                            })
                            .collect();
                        assert_eq!(
                            local[1],
                            if c.rank() == 0 {
                                vec![100., 101., 104., 105.]
                            } else {
                                vec![102., 103., 106., 107.]
                            }
                        );
                        assert_eq!(local[0].len(), 6, "the embedding is replicated");
                        gather_all(local, &local_infos, &c)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for b in back {
            assert_eq!(b, full);
        }
        assert_eq!(shard_dims(&infos, 2), vec![None, Some(1), Some(0)]);
        assert_eq!(shard_dims(&infos, 1), vec![None, None, None]);
    }
}

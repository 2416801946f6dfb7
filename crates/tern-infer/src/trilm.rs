//! Unpacked TriLMs (Spectra's releases: a Hugging Face Llama whose projection matrices hold
//! `scale_g * {-1, 0, 1}` in f16, one scale per model-parallel shard of training) back to codes
//! and scales, losslessly. Shards are row blocks for q, k, v, gate and up (split by output, as
//! column-parallel layers are) and column blocks for o and down (row-parallel: split by input).
//! The number of shards is the config's `pretraining_model_parallel` when given, else the
//! smallest count under which every shard of every projection holds one magnitude.

use anyhow::{bail, Result};
use tern_model::{LinearKind, ModelConfig, ScaleAxis};
use tern_pack::{PackedTensor, TernaryMatrix};

/// The most shards searched for when the config does not say.
const MAX_SHARDS: usize = 64;

fn axis_of(name: &str) -> Option<ScaleAxis> {
    if !name.starts_with("layers.") || !name.ends_with("_proj.weight") {
        return None;
    }
    if name.ends_with("o_proj.weight") || name.ends_with("down_proj.weight") {
        Some(ScaleAxis::Cols)
    } else {
        Some(ScaleAxis::Rows)
    }
}

/// Shard `g` of `groups` of a `[rows, cols]` matrix: its values, in any order.
fn shard<'a>(
    w: &'a [f32],
    rows: usize,
    cols: usize,
    groups: usize,
    axis: ScaleAxis,
    g: usize,
) -> Box<dyn Iterator<Item = f32> + 'a> {
    match axis {
        ScaleAxis::Rows => {
            let n = rows / groups;
            Box::new(w[g * n * cols..(g + 1) * n * cols].iter().copied())
        }
        ScaleAxis::Cols => {
            let n = cols / groups;
            Box::new(
                w.chunks(cols)
                    .flat_map(move |r| r[g * n..(g + 1) * n].iter().copied()),
            )
        }
    }
}

/// The one nonzero magnitude of each shard (0 for an all-zero shard), or `None` when a shard
/// holds two.
fn shard_scales(
    w: &[f32],
    rows: usize,
    cols: usize,
    groups: usize,
    axis: ScaleAxis,
) -> Option<Vec<f32>> {
    (0..groups)
        .map(|g| {
            let mut scale = 0f32;
            for v in shard(w, rows, cols, groups, axis, g) {
                let a = v.abs();
                if a == 0.0 {
                    continue;
                }
                if scale == 0.0 {
                    scale = a;
                } else if a != scale {
                    return None;
                }
            }
            Some(scale)
        })
        .collect()
}

fn split_len(rows: usize, cols: usize, axis: ScaleAxis) -> usize {
    match axis {
        ScaleAxis::Rows => rows,
        ScaleAxis::Cols => cols,
    }
}

/// Distinct nonzero magnitudes of a matrix, for the refusal's message (counted up to 100).
fn magnitudes(w: &[f32]) -> (usize, bool) {
    let mut seen: Vec<u32> = Vec::new();
    for v in w {
        let b = v.abs().to_bits();
        if b != 0 && !seen.contains(&b) {
            seen.push(b);
            if seen.len() > 100 {
                return (100, true);
            }
        }
    }
    (seen.len(), false)
}

/// The model-parallel size a TriLM was trained with: `given`, checked against every projection,
/// or the least common multiple of each projection's smallest consistent shard count.
pub fn find_shards(
    tensors: &[(String, Vec<usize>, Vec<f32>)],
    given: Option<usize>,
) -> Result<usize> {
    let projections = tensors
        .iter()
        .filter_map(|(n, s, v)| axis_of(n).map(|a| (n, s, v, a)));
    let mut groups = given.unwrap_or(1);
    for (name, shape, w, axis) in projections {
        let (rows, cols) = (shape[0], shape[1]);
        let len = split_len(rows, cols, axis);
        let what = match axis {
            ScaleAxis::Rows => "row",
            ScaleAxis::Cols => "column",
        };
        if let Some(mp) = given {
            if !len.is_multiple_of(mp) {
                bail!(
                    "{name}: pretraining_model_parallel = {mp} does not divide its {len} {what}s"
                );
            }
            if shard_scales(w, rows, cols, mp, axis).is_none() {
                let (n, more) = magnitudes(w);
                bail!(
                    "{name} is not ternary times {mp} per-shard scales (blocks of {} {what}s): it holds {}{n} distinct nonzero magnitudes",
                    len / mp,
                    if more { "more than " } else { "" }
                );
            }
            continue;
        }
        let found = (1..=MAX_SHARDS.min(len))
            .filter(|m| len.is_multiple_of(*m))
            .find(|&m| shard_scales(w, rows, cols, m, axis).is_some());
        let Some(m) = found else {
            let (n, more) = magnitudes(w);
            bail!(
                "{name} is not ternary times per-shard scales: it holds {}{n} distinct nonzero magnitudes, and no split into up to {MAX_SHARDS} {what} blocks gives one magnitude a block",
                if more { "more than " } else { "" }
            );
        };
        groups = lcm(groups, m);
    }
    // Each projection's count divides `groups`; `groups` must divide each split dimension too.
    for (name, shape, _) in tensors {
        if let Some(axis) = axis_of(name) {
            let len = split_len(shape[0], shape[1], axis);
            if !len.is_multiple_of(groups) {
                bail!("{name}: its projections' shard counts need {groups} shards, which do not divide its {len}");
            }
        }
    }
    Ok(groups)
}

fn lcm(a: usize, b: usize) -> usize {
    fn gcd(a: usize, b: usize) -> usize {
        if b == 0 {
            a
        } else {
            gcd(b, a % b)
        }
    }
    a / gcd(a, b) * b
}

/// `w` as codes and one scale per shard, when every shard holds one magnitude (`w = scale * code`
/// exactly).
pub fn ternary_of(
    w: &[f32],
    rows: usize,
    cols: usize,
    groups: usize,
    axis: ScaleAxis,
) -> Option<TernaryMatrix> {
    let scales = shard_scales(w, rows, cols, groups, axis)?;
    let group = |r: usize, c: usize| match axis {
        ScaleAxis::Rows => r / (rows / groups),
        ScaleAxis::Cols => c / (cols / groups),
    };
    let codes = w
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            if v == 0.0 {
                0
            } else if (v > 0.0) == (scales[group(i / cols, i % cols)] > 0.0) {
                1
            } else {
                -1
            }
        })
        .collect();
    let (row_groups, col_groups) = match axis {
        ScaleAxis::Rows => (groups, 1),
        ScaleAxis::Cols => (1, groups),
    };
    Some(TernaryMatrix {
        rows,
        cols,
        row_groups,
        col_groups,
        codes,
        scales,
    })
}

/// A float Llama's tensors (`config`'s order) as a TriLM with `groups` scale groups: each
/// projection becomes codes and its shards' scales, exactly (`w = scale * code` for every value).
pub fn to_ternary(
    config: &ModelConfig,
    tensors: Vec<(String, Vec<usize>, Vec<f32>)>,
    groups: usize,
) -> Result<(ModelConfig, Vec<(String, PackedTensor)>)> {
    let mut c = config.clone();
    c.linear = LinearKind::Ternary;
    c.scale_groups = groups;
    c.validate()
        .map_err(|e| anyhow::anyhow!("the TriLM's config with {groups} scale groups: {e}"))?;
    let mut out = Vec::with_capacity(tensors.len());
    for (name, shape, w) in tensors {
        let Some(axis) = axis_of(&name) else {
            out.push((name, PackedTensor::Float { shape, values: w }));
            continue;
        };
        let Some(m) = ternary_of(&w, shape[0], shape[1], groups, axis) else {
            bail!("{name}: not one magnitude per shard of {groups}");
        };
        out.push((name, PackedTensor::Ternary(m)));
    }
    Ok((c, out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(name: &str, rows: usize, cols: usize, w: Vec<f32>) -> (String, Vec<usize>, Vec<f32>) {
        (name.to_string(), vec![rows, cols], w)
    }

    #[test]
    fn shards_are_found_from_the_values_and_packed_exactly() {
        // q: 4 rows in 2 row blocks (scales 0.5, 0.25); o: 3 columns in 3 column blocks.
        let q = vec![0.5, -0.5, 0.0, 0.5, 0.0, 0.25, -0.25, 0.0];
        let o = vec![0.1, 0.2, -0.3, -0.1, 0.0, 0.3];
        let t = vec![
            named("layers.0.self_attn.q_proj.weight", 4, 2, q.clone()),
            named("layers.0.self_attn.o_proj.weight", 2, 3, o.clone()),
            named("norm.weight", 1, 2, vec![1.0, 2.0]),
        ];
        assert_eq!(find_shards(&t[..1], None).unwrap(), 2);
        assert_eq!(find_shards(&t[1..2], None).unwrap(), 3);
        // Together: 6 shards would not divide q's 4 rows.
        let err = find_shards(&t, None).unwrap_err().to_string();
        assert!(err.contains("need 6 shards"), "{err}");
        assert!(find_shards(&t[..1], Some(1))
            .unwrap_err()
            .to_string()
            .contains("q_proj"));
        let err = find_shards(&t[..1], Some(3)).unwrap_err().to_string();
        assert!(err.contains("does not divide its 4 rows"), "{err}");
        let m = ternary_of(&q, 4, 2, 2, ScaleAxis::Rows).unwrap();
        assert_eq!(m.scales, vec![0.5, 0.25]);
        assert_eq!(m.codes, vec![1, -1, 0, 1, 0, 1, -1, 0]);
        assert_eq!(m.dequantize(), q);
        let m = ternary_of(&o, 2, 3, 3, ScaleAxis::Cols).unwrap();
        assert_eq!((m.row_groups, m.col_groups), (1, 3));
        assert_eq!(m.dequantize(), o);
        assert!(ternary_of(&o, 2, 3, 1, ScaleAxis::Cols).is_none());
    }

    #[test]
    fn a_float_matrix_is_refused_with_its_magnitudes() {
        let w: Vec<f32> = (0..16).map(|i| i as f32 * 0.01).collect();
        let t = vec![named("layers.3.mlp.up_proj.weight", 4, 4, w)];
        let err = find_shards(&t, None).unwrap_err().to_string();
        assert!(
            err.contains("layers.3.mlp.up_proj.weight") && err.contains("15 distinct"),
            "{err}"
        );
    }
}
